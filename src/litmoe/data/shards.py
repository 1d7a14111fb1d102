"""The workers of prepare_data.py: each takes one shard of the sources, splits its documents into train and
val, tokenizes them and writes litdata chunks of its own; the finished shards are then merged into one dataset
per split.

A worker holds a batch of text and one chunk at a time, so its memory does not grow with the corpus. A shard
marked done (`done.json`, written last) is kept by an interrupted preparation that is started again.
"""

import ctypes
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import time
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from litmoe.core.checksums import remember_digest
from litmoe.core.errors import UserError
from litmoe.data.prepared import SPLITS
from litmoe.data.sources import Shard
from litmoe.data.tokenizer import literal_special_tokens, load_tokenizer

PIECE_CHARS = 1 << 18  # a long document goes through the tokenizer in pieces of at most this many characters
BATCH_CHARS = 1 << 22  # characters per tokenizer call
FINGERPRINTS = "fingerprints.npy"  # a shard's documents, hashed, where a given validation set is checked for copies
SHARD_DONE = "done.json"  # written last into a shard's scratch directory: its counts
CHUNK_SUMS = "chunk_sha256.json"  # beside a shard's index.json: each chunk's digest, taken as it was written


@dataclass(frozen=True)
class TokenizerSpec:
    """The prepared tokenizer as a worker needs it: its directory and the BOS/EOS ids LitGPT reads from it."""

    directory: str
    bos_id: int
    eos_id: int


@dataclass(frozen=True)
class Job:
    """One shard for a worker: where its documents go (`split`: train, val, or by content hash) and its output."""

    shard: Shard
    split: str  # train | val | hash
    val_fraction: float
    tokenizer: TokenizerSpec
    out_dir: str


# ---------------------------------------------------------------------------------------------- splitting


def is_validation(document: str, val_fraction: float) -> bool:
    """Deterministic split by content: a document lands in the same split on every run and machine."""
    return zlib.crc32(document.encode("utf-8")) / 2**32 < val_fraction


def split_documents(
    documents: Iterable[str], val_fraction: float, split: str = "hash", counts: dict | None = None
) -> Iterator[tuple[str, str]]:
    """Yield (split, document) for each non-empty document: all into `split`, or by content hash. The empty ones
    are counted in `counts["empty"]`, where given, to be reported."""
    for document in documents:
        if not document.strip() and counts is not None:
            counts["empty"] += 1
        if document.strip():
            yield (
                (("val" if is_validation(document, val_fraction) else "train") if split == "hash" else split),
                document,
            )


# --------------------------------------------------------------------------------------------- tokenizing


def pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in pieces of at most `size` characters, each cut before a space that starts a word. Byte-level BPE
    pre-tokenizers (GPT-2's, ours) split there anyway, so the pieces encode exactly as the whole text does;
    a text without such a space is cut at `size`."""
    start = 0
    while len(text) - start > size:
        cut = text.rfind(" ", start + 1, start + size)
        while cut > start and (text[cut - 1].isspace() or text[cut + 1 : cut + 2].isspace()):
            cut = text.rfind(" ", start + 1, cut)
        cut = cut if cut > start else start + size
        yield text[start:cut]
        start = cut
    yield text[start:]


@dataclass
class Encoder:
    """Text to token ids without BOS/EOS, as LitGPT's Tokenizer encodes, and the ids that frame a document.

    A tokenizer.json is encoded by the `tokenizers` library directly, as LitGPT's Tokenizer does, so a worker
    process never imports LitGPT (12 s and 0.9 GB per process on two cores); sentencepiece goes through LitGPT."""

    processor: Any  # tokenizers.Tokenizer, or litgpt.Tokenizer for tokenizer.model
    bos_id: int
    eos_id: int

    @classmethod
    def load(cls, spec: TokenizerSpec) -> "Encoder":
        json_file = Path(spec.directory) / "tokenizer.json"
        if json_file.is_file():  # LitGPT prefers it over tokenizer.model too
            from tokenizers import Tokenizer

            return cls(literal_special_tokens(Tokenizer.from_file(str(json_file))), spec.bos_id, spec.eos_id)
        return cls(load_tokenizer(Path(spec.directory)), spec.bos_id, spec.eos_id)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        if hasattr(self.processor, "encode_batch"):
            encodings = self.processor.encode_batch(texts, add_special_tokens=False)
            return [np.asarray(encoding.ids, dtype=np.int32) for encoding in encodings]
        return [self.processor.encode(text, bos=False, eos=False).numpy().astype(np.int32) for text in texts]


def encode_documents(
    encoder: Encoder,
    documents: Iterable[tuple[str, str]],
    piece_chars: int = PIECE_CHARS,
    batch_chars: int = BATCH_CHARS,
) -> Iterator[tuple[str, np.ndarray]]:
    """(split, token ids framed BOS ... EOS) for each (split, document). Documents are cut into pieces and the
    pieces batched by characters, so memory follows the largest document, not the corpus or the batch count."""
    framing = np.asarray([encoder.bos_id], dtype=np.int32), np.asarray([encoder.eos_id], dtype=np.int32)
    batch: list[str] = []
    owners: list[tuple[str, bool]] = []  # each piece's split, and whether it ends its document
    done: list[np.ndarray] = []  # encoded pieces of the document being assembled

    def flush() -> Iterator[tuple[str, np.ndarray]]:
        for ids, (split, last) in zip(encoder.encode_batch(batch), owners, strict=True):
            done.append(ids)
            if last:
                yield split, np.concatenate([framing[0], *done, framing[1]])
                done.clear()
        batch.clear()
        owners.clear()

    size = 0
    for split, document in documents:
        parts = list(pieces(document, piece_chars))
        for index, piece in enumerate(parts):
            batch.append(piece)
            owners.append((split, index == len(parts) - 1))
            size += len(piece)
            if size >= batch_chars:
                yield from flush()
                size = 0
    yield from flush()


# ------------------------------------------------------------------------------------------ the workers

_encoders: dict[TokenizerSpec, Encoder] = {}  # one per worker process and tokenizer


def process_shard(job: Job) -> dict[str, dict[str, int]]:
    """Tokenize one shard into litdata chunks of its own (`out_dir/train`, `out_dir/val`), then mark it done with
    its counts. Runs in a worker process (or in-process with one worker)."""
    import torch

    out_dir = Path(job.out_dir)
    if (out_dir / SHARD_DONE).is_file():  # finished by an earlier, interrupted run
        return json.loads((out_dir / SHARD_DONE).read_text())
    shutil.rmtree(out_dir, ignore_errors=True)
    if job.tokenizer not in _encoders:
        _encoders[job.tokenizer] = Encoder.load(job.tokenizer)
    writers: dict[str, Any] = {}
    digests: dict[str, dict[str, str]] = {split: {} for split in SPLITS}
    counts = {"documents": dict.fromkeys(SPLITS, 0), "tokens": dict.fromkeys(SPLITS, 0), "empty": 0}
    documents = split_documents(job.shard.documents(), job.val_fraction, job.split, counts)
    fingerprints = None if job.split == "hash" else []  # a given validation set is compared with the training data
    for split, ids in encode_documents(_encoders[job.tokenizer], documents):
        if split not in writers:
            writers[split] = chunk_writer(out_dir / split, digests[split])
        writers[split].add_item(counts["documents"][split], torch.from_numpy(ids))
        counts["documents"][split] += 1
        counts["tokens"][split] += len(ids)
        if fingerprints is not None:
            fingerprints.append(int.from_bytes(hashlib.blake2b(ids.tobytes(), digest_size=8).digest(), "little"))
    for split, writer in writers.items():
        writer.done()
        writer.merge()
        (out_dir / split / CHUNK_SUMS).write_text(json.dumps(digests[split]))
    out_dir.mkdir(parents=True, exist_ok=True)  # a shard without documents wrote nothing yet
    if fingerprints is not None:
        np.save(out_dir / FINGERPRINTS, np.unique(np.asarray(fingerprints, dtype=np.uint64)))
    (out_dir / f"{SHARD_DONE}.partial").write_text(json.dumps(counts))
    (out_dir / f"{SHARD_DONE}.partial").replace(out_dir / SHARD_DONE)
    return counts


def chunk_writer(folder: Path, digests: dict[str, str]) -> Any:
    """litdata's chunk writer into `folder`, each chunk hashed as it is written: its digest goes into `digests` by
    file name (for the dataset's SHA256SUMS, without reading the chunks again)."""
    from litdata.streaming import TokensLoader
    from litdata.streaming.writer import BinaryWriter

    writer = BinaryWriter(str(folder), chunk_bytes="64MB", item_loader=TokensLoader())
    write = writer.write_chunk_to_file

    def write_hashed(raw_data: bytes, filename: str) -> None:
        write(raw_data, filename)
        digests[filename] = hashlib.sha256(raw_data).hexdigest()  # uncompressed: the bytes of the file

    writer.write_chunk_to_file = write_hashed  # this writer only
    return writer


def run_jobs(jobs: list[Job], workers: int) -> list[dict]:
    """Every job's counts, in order; the shards run on `workers` processes (in this one when 1 is enough)."""
    from tqdm import tqdm

    progress = tqdm(total=len(jobs), unit="shard", desc="tokenizing", disable=None)
    results = []
    if workers <= 1 or len(jobs) == 1:
        for job in jobs:
            results.append(process_shard(job))
            progress.update()
    else:
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=start_worker, initargs=(os.getpid(),))
        try:
            for counts in pool.map(process_shard, jobs):
                results.append(counts)
                progress.update()
        except BaseException:  # a stop signal, Ctrl-C or a failed shard: no worker goes on without us
            stop_workers(pool)
            raise
        pool.shutdown()
    progress.close()
    return results


def stop_workers(pool: ProcessPoolExecutor, grace: float = 5.0) -> None:
    """Ask every worker to leave (`leave_shard`: it exits as Python does, releasing the semaphores it holds, where
    SIGKILL would leave them to the resource tracker's warnings), and kill any still running after `grace` s."""
    processes = list(pool._processes.values())  # the executor has no API to stop running workers
    for process in processes:
        if process.is_alive():
            os.kill(process.pid, signal.SIGUSR1)
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + grace
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
    pool.shutdown(wait=True)


def leave_shard(signum: int, frame) -> None:
    raise SystemExit(1)


def start_worker(parent: int) -> None:
    """In each worker process: die with the parent, leave signals to it (SIGUSR1 is its request to stop), and
    tokenize on one thread."""
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent decides
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, leave_shard)
    # the workers share the cores, so each tokenizes on one thread (unless the user set TOKENIZERS_PARALLELISM);
    # with one worker, the tokenizer's own threads use every core
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def die_with_parent(parent: int) -> None:
    """On Linux the kernel kills this process when its parent dies, even by kill -9 (PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent kills its workers when it stops
        return
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


class PreparationStopped(Exception):
    """SIGTERM or SIGINT during a preparation; the finished shards are kept."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


@contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise `PreparationStopped` in the main thread, where the pool is stopped and the finished
    shards kept."""

    def stop(signum: int, frame) -> None:
        raise PreparationStopped(signal.Signals(signum).name)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def copied_documents(jobs: list[Job]) -> tuple[int, int]:
    """(validation documents that are exact copies of a training document, validation documents), for a given
    validation set (a content-hash split cannot put one text in both)."""

    def fingerprints(split: str) -> np.ndarray:
        files = [Path(job.out_dir) / FINGERPRINTS for job in jobs if job.split == split]
        arrays = [np.load(path) for path in files if path.is_file()]  # absent: finished before this check existed
        return np.unique(np.concatenate(arrays)) if arrays else np.empty(0, dtype=np.uint64)

    held_out = fingerprints("val")
    return int(np.isin(held_out, fingerprints("train")).sum()), len(held_out)


def merge_shards(jobs: list[Job], counts: list[dict], scratch: Path, source_names: str) -> tuple[dict, dict]:
    """The shards' chunks as one litdata dataset per split (chunk files renamed into it, one index); returns
    ({split: documents}, {split: tokens})."""
    documents = {split: sum(count["documents"][split] for count in counts) for split in SPLITS}
    tokens = {split: sum(count["tokens"][split] for count in counts) for split in SPLITS}
    for split, number in documents.items():
        if number == 0:
            lone_text = any(job.shard.kind == "text" for job in jobs)
            paragraphs = " (a .txt file is split at blank lines)" if lone_text else ""
            raise UserError(
                f"{source_names}: no document fell into the {split} split ({documents}); give more documents"
                f"{paragraphs}, change --val_fraction, or give --val_source"
            )
    for split in SPLITS:
        chunks, config = [], None
        (scratch / split).mkdir(parents=True)
        for number, job in enumerate(jobs):
            index_file = Path(job.out_dir) / split / "index.json"
            if not index_file.is_file():  # no document of this shard went into this split
                continue
            index = json.loads(index_file.read_text())
            config = index["config"]
            sums = index_file.with_name(CHUNK_SUMS)
            digests = json.loads(sums.read_text()) if sums.is_file() else {}  # else read again at the end
            for chunk in index["chunks"]:
                name = f"chunk-{number}-{chunk['filename'].removeprefix('chunk-')}"
                (Path(job.out_dir) / split / chunk["filename"]).rename(scratch / split / name)
                if chunk["filename"] in digests:
                    remember_digest(scratch / split / name, digests[chunk["filename"]])
                chunks.append({**chunk, "filename": name})
        index = {"chunks": chunks, "config": config, "updated_at": str(time.time())}
        (scratch / split / "index.json").write_text(json.dumps(index, sort_keys=True))
    return documents, tokens
