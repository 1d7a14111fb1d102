"""Turn text into LitGPT pretraining data: documents -> tokenizer -> litdata-optimized train/val chunks.

The output directory holds what `litgpt.data.LitData(path, split_names=("train", "val"))` streams:

    out_dir/
      tokenizer/        tokenizer.json + tokenizer_config.json (loads with litgpt.Tokenizer)
      train/ val/       litdata chunks of token ids; each document is BOS ... EOS
      manifest.json     what was prepared from what, with token counts

The sources (litmoe.sources) come in shards: data files, or groups of .txt files. Workers (`--workers`, one
process each, all cores by default) take a shard at a time: read it, split each document into train or val,
tokenize, and write its own litdata chunks. Memory per worker is bounded by a batch of text and one chunk, so it
does not grow with the corpus. A finished shard is marked done; the chunks of all shards are then merged into
`train/` and `val/` (a rename of each chunk file and one index).

Everything is built in the sibling scratch directory `.NAME.partial`: an interrupted preparation started again
with the same inputs keeps its tokenizer and its finished shards and does the rest. The finished directory then
replaces `out_dir` in one rename, so a failed run never leaves a half-written `out_dir` or destroys one that was
there before.
"""

import json
import multiprocessing
import os
import shutil
import time
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from litmoe.errors import UserError
from litmoe.sources import DEFAULT_SOURCE, Shard, Source, resolve_source
from litmoe.tokenizer import (
    copy_tokenizer,
    document_markers,
    load_tokenizer,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
)

MANIFEST = "manifest.json"
SPLITS = ("train", "val")
PREPARED_ENTRIES = {MANIFEST, "tokenizer", *SPLITS}  # all a prepared directory holds; --force replaces only these
MIN_VOCAB_SIZE = 258
PIECE_CHARS = 1 << 18  # a long document goes through the tokenizer in pieces of at most this many characters
BATCH_CHARS = 1 << 22  # characters per tokenizer call
TOKENIZER_TRAINING_CHARS = 1 << 28  # a tokenizer is trained on at most this much of the training text (256M)
SHARD_DONE = "done.json"  # written last into a shard's scratch directory: its counts


@dataclass
class Manifest:
    source: str
    source_fingerprint: str
    tokenizer_fingerprint: str
    val_fraction: float
    documents: dict[str, int]
    tokens: dict[str, int]
    val_source: str | None = None  # a given validation set, kept as it is (None: held out by content hash)
    val_source_fingerprint: str | None = None
    text_field: str = "text"


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


def split_documents(documents: Iterable[str], val_fraction: float, split: str = "hash") -> Iterator[tuple[str, str]]:
    """Yield (split, document) for each non-empty document: all into `split`, or by content hash."""
    for document in documents:
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

            return cls(Tokenizer.from_file(str(json_file)), spec.bos_id, spec.eos_id)
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
    from litdata.streaming import TokensLoader
    from litdata.streaming.writer import BinaryWriter

    out_dir = Path(job.out_dir)
    if (out_dir / SHARD_DONE).is_file():  # finished by an earlier, interrupted run
        return json.loads((out_dir / SHARD_DONE).read_text())
    shutil.rmtree(out_dir, ignore_errors=True)
    if job.tokenizer not in _encoders:
        _encoders[job.tokenizer] = Encoder.load(job.tokenizer)
    writers: dict[str, BinaryWriter] = {}
    counts = {"documents": dict.fromkeys(SPLITS, 0), "tokens": dict.fromkeys(SPLITS, 0)}
    documents = split_documents(job.shard.documents(), job.val_fraction, job.split)
    for split, ids in encode_documents(_encoders[job.tokenizer], documents):
        if split not in writers:
            writers[split] = BinaryWriter(str(out_dir / split), chunk_bytes="64MB", item_loader=TokensLoader())
        writers[split].add_item(counts["documents"][split], torch.from_numpy(ids))
        counts["documents"][split] += 1
        counts["tokens"][split] += len(ids)
    for writer in writers.values():
        writer.done()
        writer.merge()
    out_dir.mkdir(parents=True, exist_ok=True)  # a shard without documents wrote nothing yet
    (out_dir / f"{SHARD_DONE}.partial").write_text(json.dumps(counts))
    (out_dir / f"{SHARD_DONE}.partial").replace(out_dir / SHARD_DONE)
    return counts


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
        with ProcessPoolExecutor(workers, mp_context=context, initializer=one_tokenizer_thread) as pool:
            for counts in pool.map(process_shard, jobs):
                results.append(counts)
                progress.update()
    progress.close()
    return results


def one_tokenizer_thread() -> None:
    """In each worker process: the workers share the cores, so each tokenizes on one thread (unless the user set
    TOKENIZERS_PARALLELISM). With one worker, the tokenizer's own threads use every core."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def merge_shards(jobs: list[Job], counts: list[dict], scratch: Path, source_names: str) -> tuple[dict, dict]:
    """The shards' chunks as one litdata dataset per split (chunk files renamed into it, one index); returns
    ({split: documents}, {split: tokens})."""
    documents = {split: sum(count["documents"][split] for count in counts) for split in SPLITS}
    tokens = {split: sum(count["tokens"][split] for count in counts) for split in SPLITS}
    for split, number in documents.items():
        if number == 0:
            raise UserError(
                f"{source_names}: no document fell into the {split} split ({documents}); give more documents"
                " (a .txt file is split at blank lines), change --val_fraction, or give --val_source"
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
            for chunk in index["chunks"]:
                name = f"chunk-{number}-{chunk['filename'].removeprefix('chunk-')}"
                (Path(job.out_dir) / split / chunk["filename"]).rename(scratch / split / name)
                chunks.append({**chunk, "filename": name})
        index = {"chunks": chunks, "config": config, "updated_at": str(time.time())}
        (scratch / split / "index.json").write_text(json.dumps(index, sort_keys=True))
    return documents, tokens


# ----------------------------------------------------------------------------------------- the pipeline


def read_manifest(out_dir: Path) -> Manifest | None:
    path = out_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        return Manifest(**json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError, OSError) as err:
        raise UserError(f"{path}: not a manifest prepare_data.py can read ({err}); prepare the data again") from None


def check_output_dir(out_dir: Path, sources: list[str]) -> None:
    """Refuse an --out_dir whose replacement could delete what the user owns, with or without --force: only a
    directory holding nothing but prepared data is ever replaced."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out_dir {out_dir} is a file; give a directory for the prepared data")
    for source in sources:
        if not Path(source).exists():
            continue
        source_path, out_path = Path(source).resolve(), out_dir.resolve()
        if out_path == source_path or source_path in out_path.parents:
            raise UserError(
                f"--out_dir {out_dir} is inside --source {source}; it would be read as input: choose a directory"
                " outside the source"
            )
        if out_path in source_path.parents:
            raise UserError(
                f"--source {source} is inside --out_dir {out_dir}; replacing the output would delete it: choose"
                " another --out_dir"
            )
    if out_dir.is_dir() and any(out_dir.iterdir()):
        foreign = sorted(entry.name for entry in out_dir.iterdir() if entry.name not in PREPARED_ENTRIES)
        if foreign or read_manifest(out_dir) is None:
            what = ", ".join(foreign[:3]) if foreign else f"no {MANIFEST}"
            raise UserError(
                f"--out_dir {out_dir} holds files that are not prepared data ({what}); prepare_data.py replaces only"
                " what it made, even with --force: move them or choose another --out_dir"
            )


def check_existing(out_dir: Path, wanted: Manifest, wanted_tokenizer: str | None) -> bool:
    """True when `out_dir` already holds exactly this preparation; raises when it holds other prepared data."""
    existing = read_manifest(out_dir)
    if existing is None:
        return False
    if wanted_tokenizer is not None and existing.tokenizer_fingerprint != wanted_tokenizer:
        raise UserError(
            f"{out_dir / MANIFEST}: this data was made with another tokenizer"
            f" ({existing.tokenizer_fingerprint}); pass --force to replace it, or choose another --out_dir"
        )
    inputs = ("source_fingerprint", "val_fraction", "val_source_fingerprint", "text_field")
    if any(getattr(existing, key) != getattr(wanted, key) for key in inputs):
        raise UserError(
            f"{out_dir / MANIFEST}: this data was prepared from {existing.source} (val_fraction"
            f" {existing.val_fraction}, val_source {existing.val_source}); pass --force to replace it, or choose"
            " another --out_dir"
        )
    return True


def resolve_sources(
    source: str, val_source: str | None, cache_dir: Path, text_field: str
) -> tuple[Source, Source | None]:
    """The training source and the given validation source, if any: `--val_source`, or the `train/` and `val/`
    subfolders of a `--source` folder."""
    path = Path(source)
    if val_source is None and has_split_folders(path):
        return (
            resolve_source(str(path / "train"), cache_dir, text_field),
            resolve_source(str(path / "val"), cache_dir, text_field, flag="--source (val/)"),
        )
    train = resolve_source(source, cache_dir, text_field)
    return train, (resolve_source(val_source, cache_dir, text_field, "--val_source") if val_source else None)


def has_split_folders(path: Path) -> bool:
    try:
        return (path / "train").is_dir() and (path / "val").is_dir()
    except OSError:  # unreadable: resolve_source says so in one line
        return False


def prepare(
    source: str = DEFAULT_SOURCE,
    out_dir: Path = Path("data/default"),
    tokenizer_dir: Path | None = None,
    vocab_size: int = 8192,
    val_fraction: float = 0.05,
    val_source: str | None = None,
    text_field: str = "text",
    workers: int | None = None,
    force: bool = False,
    cache_dir: Path = Path("data/cache"),
) -> Manifest:
    """Prepare pretraining data for run_train.py.

    Args:
        source: A file, folder or glob of .txt, .jsonl (.gz, .zst), .parquet or .arrow data (a folder of .txt files is
            one document per file; a single .txt file is split at blank lines; JSONL, parquet and Arrow records
            hold `text_field` or chat `messages`); a local Hugging Face dataset directory; 'python-docs' (Python's
            bundled documentation, no download) or 'tinystories' (downloaded into `cache_dir`). A folder with
            `train/` and `val/` subfolders gives its own validation set.
        out_dir: Where the tokenizer, the train/val chunks and manifest.json go.
        tokenizer_dir: A tokenizer directory to use as it is (LitGPT's, or a Hugging Face one such as GPT-2's or
            Llama's); the model's vocabulary follows it. When not given, a byte-level BPE tokenizer of `vocab_size`
            tokens is trained on (at most 256M characters of) the training split.
        vocab_size: Size of the tokenizer trained when no `tokenizer_dir` is given.
        val_fraction: Fraction of documents held out for validation (split by content hash, deterministic).
        val_source: A validation set to keep as it is (same formats as `source`); then all of `source` trains.
        text_field: The field (JSONL) or column (parquet, Arrow) holding each document's text.
        workers: Processes that read, tokenize and write in parallel (default: every core).
        force: Rebuild even if `out_dir` already holds prepared data, replacing it once the new data is complete
            (a directory holding anything else is never replaced).
        cache_dir: Where downloaded sources are kept.
    """
    workers = (os.cpu_count() or 1) if workers is None else workers
    check_prepare_arguments(val_fraction, tokenizer_dir, vocab_size, workers, text_field)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, [source] + ([val_source] if val_source else []))
    train_source, held_out = resolve_sources(source, val_source, Path(cache_dir), text_field)
    wanted_tokenizer = None
    if tokenizer_dir is not None:
        document_markers(Path(tokenizer_dir))  # a tokenizer that cannot frame documents is refused now
        wanted_tokenizer = tokenizer_fingerprint(Path(tokenizer_dir))
    wanted = Manifest(
        train_source.name, train_source.fingerprint, wanted_tokenizer or "", val_fraction, {}, {},
        held_out and held_out.name, held_out and held_out.fingerprint, text_field,
    )  # fmt: skip
    if not force and check_existing(out_dir, wanted, wanted_tokenizer):
        print(f"{out_dir} already holds this data ({read_manifest(out_dir).tokens}); --force rebuilds it")
        return read_manifest(out_dir)

    from litmoe.run_lock import run_lock

    scratch = out_dir.with_name(f".{out_dir.name}.partial")
    with run_lock(out_dir.parent, lock_name=f".{out_dir.name}.prepare.lock"):
        inputs = json.dumps({**asdict(wanted), "vocab_size": vocab_size}, sort_keys=True)
        resume_scratch(scratch, inputs)
        try:
            manifest = build(train_source, held_out, scratch, tokenizer_dir, vocab_size, wanted, workers)
        except UserError:  # bad input: nothing worth resuming (an interruption keeps the scratch directory)
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        replace_dir(scratch, out_dir)
    print(
        f"Prepared {out_dir}: {manifest.documents['train']:,} train / {manifest.documents['val']:,} val documents,"
        f" {manifest.tokens['train']:,} / {manifest.tokens['val']:,} tokens"
    )
    return manifest


def check_prepare_arguments(
    val_fraction: float, tokenizer_dir: Path | None, vocab_size: int, workers: int, text_field: str
) -> None:
    if not 0 < val_fraction < 1:
        raise UserError(f"--val_fraction {val_fraction}: must be between 0 and 1 (e.g. 0.05)")
    if tokenizer_dir is None and vocab_size < MIN_VOCAB_SIZE:
        raise UserError(
            f"--vocab_size {vocab_size}: a byte-level BPE tokenizer needs at least {MIN_VOCAB_SIZE} tokens (256 bytes,"
            " BOS and EOS); 8192 suits small corpora"
        )
    if workers < 1:
        raise UserError(f"--workers {workers}: must be at least 1 (default: every core)")
    if not text_field:
        raise UserError("--text_field: give the name of the field holding the text (default text)")


def resume_scratch(scratch: Path, inputs: str) -> None:
    """Keep an interrupted preparation's scratch directory when it was made from the same inputs; else start over."""
    record = scratch / "inputs.json"
    if scratch.exists() and not (record.is_file() and record.read_text() == inputs):
        shutil.rmtree(scratch)
    if scratch.exists():
        done = len(list(scratch.glob(f"shards/*/{SHARD_DONE}")))
        print(f"Resuming the preparation in {scratch}: {done} shard(s) already done")
        return
    scratch.mkdir(parents=True)
    record.write_text(inputs)


def build(
    train_source: Source, held_out: Source | None, scratch: Path, tokenizer_dir: Path | None, vocab_size: int,
    wanted: Manifest, workers: int,
) -> Manifest:  # fmt: skip
    tokenizer_out = scratch / "tokenizer"
    if not (tokenizer_out / "tokenizer.json").is_file() and not (tokenizer_out / "tokenizer.model").is_file():
        made = scratch / "tokenizer.partial"
        shutil.rmtree(made, ignore_errors=True)
        if tokenizer_dir is None:
            print(f"Training a byte-level BPE tokenizer ({vocab_size} tokens) on the training split ...")
            train_bpe_tokenizer(training_text(train_source, wanted.val_fraction, held_out is None), vocab_size, made)
        else:
            copy_tokenizer(Path(tokenizer_dir), made)
        made.rename(tokenizer_out)
    spec = TokenizerSpec(str(tokenizer_out), *document_markers(tokenizer_out))
    jobs = [
        Job(shard, split, wanted.val_fraction, spec, str(scratch / "shards" / shard.name))
        for source, split in ((train_source, "hash" if held_out is None else "train"), (held_out, "val"))
        if source is not None
        for shard in source.shards
    ]
    earlier = [(Path(job.out_dir) / SHARD_DONE).is_file() for job in jobs]  # done before an interruption
    start = time.perf_counter()
    counts = run_jobs(jobs, workers)
    report_rate(counts, earlier, time.perf_counter() - start, workers)
    names = train_source.name + (f" and {held_out.name}" if held_out else "")
    documents, tokens = merge_shards(jobs, counts, scratch, names)
    shutil.rmtree(scratch / "shards")
    (scratch / "inputs.json").unlink()
    manifest = Manifest(**{**asdict(wanted), "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer_out),
                           "documents": documents, "tokens": tokens})  # fmt: skip
    (scratch / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2) + "\n")
    return manifest


def report_rate(counts: list[dict], earlier: list[bool], seconds: float, workers: int) -> None:
    tokens = sum(sum(count["tokens"].values()) for count, done in zip(counts, earlier, strict=True) if not done)
    workers_used = min(workers, len(counts))
    print(
        f"Tokenized {tokens:,} tokens in {seconds:.1f} s: {tokens / max(seconds, 1e-9):,.0f} tokens/s"
        f" ({workers_used} worker{'s' if workers_used != 1 else ''})"
    )


def training_text(source: Source, val_fraction: float, hashed: bool) -> Iterator[str]:
    """Pieces of the training split's documents, up to TOKENIZER_TRAINING_CHARS, for training a tokenizer."""
    seen = 0
    for split, document in split_documents(source.documents(), val_fraction, "hash" if hashed else "train"):
        if split != "train":
            continue
        for piece in pieces(document):
            yield piece
            seen += len(piece)
            if seen >= TOKENIZER_TRAINING_CHARS:
                return


def replace_dir(new: Path, out_dir: Path) -> None:
    """Move `new` to `out_dir`; an existing `out_dir` is removed only after the new one is in place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        out_dir.rename(old)
    new.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
