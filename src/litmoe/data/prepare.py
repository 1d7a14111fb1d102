"""Turn text into LitGPT pretraining data: documents -> tokenizer -> litdata-optimized train/val chunks.

The output directory (litmoe.data.prepared) holds what `litgpt.data.LitData(path, split_names=("train",
"val"))` streams. The sources (litmoe.data.sources) come in shards: data files, or groups of .txt files. Workers
(`--workers`, one process each, all cores by default; litmoe.data.shards) take a shard at a time and write its
litdata chunks; the chunks of all shards are then merged into `train/` and `val/` (a rename of each chunk file
and one index).

Everything is built in the sibling scratch directory `.NAME.partial`: an interrupted preparation started again
with the same inputs keeps its tokenizer and its finished shards and does the rest. The finished directory then
replaces `out_dir` in one rename, so a failed run never leaves a half-written `out_dir` or destroys one that was
there before.
"""

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from litmoe.core.checksums import write_checksums
from litmoe.core.errors import EXIT_PREEMPTED, RunStopped, UserError
from litmoe.data.prepared import MANIFEST, Manifest, check_existing, check_output_dir, read_manifest
from litmoe.data.shards import (
    SHARD_DONE,
    Job,
    PreparationStopped,
    TokenizerSpec,
    copied_documents,
    merge_shards,
    pieces,
    run_jobs,
    split_documents,
    stop_signals,
)
from litmoe.data.sources import DEFAULT_SOURCE, Source, resolve_source
from litmoe.data.tokenizer import copy_tokenizer, document_markers, tokenizer_fingerprint, train_bpe_tokenizer

MIN_VOCAB_SIZE = 258
TOKENIZER_TRAINING_CHARS = 1 << 28  # a tokenizer is trained on at most this much of the training text (256M)


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
    if val_source is not None and Path(source).exists() and Path(val_source).exists():
        train_path, val_path = Path(source).resolve(), Path(val_source).resolve()
        if val_path == train_path or train_path in val_path.parents:
            raise UserError(
                f"--val_source {val_source} is {'--source' if val_path == train_path else 'inside --source'}"
                f" {source}: its documents would train too; give a validation set outside the training data, or drop"
                " --val_source to hold out --val_fraction of the documents"
            )
    train = resolve_source(source, cache_dir, text_field)
    if val_source is None:
        return train, None
    held_out = resolve_source(val_source, cache_dir, text_field, "--val_source")
    if shared := sorted(source_files(train) & source_files(held_out)):
        raise UserError(
            f"--val_source {val_source}: {len(shared)} of its files ({shared[0]}{', ...' if len(shared) > 1 else ''})"
            f" are also read by --source {source}: their documents would train too; give a validation set outside"
            " the training data"
        )
    return train, held_out


def source_files(source: Source) -> set[str]:
    """The real paths of the files a source reads (links resolved)."""
    return {os.path.realpath(path) for shard in source.shards for path in shard.paths}


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
    verify: bool = False,
) -> Manifest | None:
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
        verify: Only check `out_dir`'s files against its SHA256SUMS (written when it was prepared), one line,
            then exit (status 65 when one differs); nothing is prepared.
    """
    if verify:
        from litmoe.core.checkpoint_io import verify as verify_folders  # torch: not for preparing data

        verify_folders([out_dir])
        return None
    workers = (os.cpu_count() or 1) if workers is None else workers
    check_prepare_arguments(val_fraction, tokenizer_dir, vocab_size, workers, text_field)
    out_dir = Path(out_dir)
    if out_dir.is_symlink() and out_dir.exists():  # data linked to a bigger disk: rebuilt there, the link kept
        print(f"--out_dir {out_dir} links to {out_dir.resolve()}: the data is prepared there")
        out_dir = out_dir.resolve()
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

    from litmoe.core.run_lock import run_lock

    scratch = out_dir.with_name(f".{out_dir.name}.partial")
    with run_lock(out_dir.parent, lock_name=f".{out_dir.name}.prepare.lock"):
        inputs = json.dumps({**asdict(wanted), "vocab_size": vocab_size}, sort_keys=True)
        resume_scratch(scratch, inputs)
        try:
            with stop_signals():
                manifest = build(train_source, held_out, scratch, tokenizer_dir, vocab_size, wanted, workers)
        except UserError:  # bad input: nothing worth resuming (an interruption keeps the scratch directory)
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        except PreparationStopped as stop:
            done = len(list(scratch.glob(f"shards/*/{SHARD_DONE}")))
            raise RunStopped(
                f"Stopped by {stop.signal_name}: {done} finished shard(s) are kept in {scratch}; run the same command"
                " again to continue",
                EXIT_PREEMPTED,
            ) from None
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
    """Keep an interrupted preparation's scratch directory when it was made from the same inputs; else start over.
    Only a directory a preparation made (its inputs record, or a finished manifest), or an empty one, is removed."""
    record = scratch / "inputs.json"
    ours = record.is_file() or (scratch / MANIFEST).is_file() or (scratch.is_dir() and not any(scratch.iterdir()))
    if scratch.exists() and not ours:
        raise UserError(
            f"{scratch}: prepare_data.py builds --out_dir {scratch.name[1 : -len('.partial')]} in this path, but it"
            " holds something a preparation did not make; move it away, or choose another --out_dir"
        )
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
    if empty := sum(count.get("empty", 0) for count in counts):
        print(f"Skipped {empty:,} empty document{'s' if empty != 1 else ''} (blank files or records, empty text)")
    if held_out is not None and (copies := copied_documents(jobs))[0]:
        print(
            f"Note: {copies[0]:,} of the {copies[1]:,} given validation documents are exact copies of training"
            " documents; their validation loss measures memorisation, not generalisation"
        )
    names = train_source.name + (f" and {held_out.name}" if held_out else "")
    documents, tokens = merge_shards(jobs, counts, scratch, names)
    shutil.rmtree(scratch / "shards")
    (scratch / "inputs.json").unlink()
    manifest = Manifest(**{**asdict(wanted), "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer_out),
                           "documents": documents, "tokens": tokens})  # fmt: skip
    (scratch / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2) + "\n")
    write_checksums(scratch)  # the chunks hashed as the workers wrote them; index and manifest read here
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
