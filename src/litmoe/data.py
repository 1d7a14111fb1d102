"""Turn text into LitGPT pretraining data: documents -> tokenizer -> litdata-optimized train/val chunks.

The output directory holds what `litgpt.data.LitData(path, split_names=("train", "val"))` streams:

    out_dir/
      tokenizer/        tokenizer.json + tokenizer_config.json (loads with litgpt.Tokenizer)
      train/ val/       litdata chunks of token ids; each document is BOS ... EOS
      manifest.json     what was prepared from what, with token counts

Everything is built in a sibling scratch directory and moved into place at the end, so a failed or
interrupted run never leaves a half-written `out_dir` or destroys one that was there before.
"""

import hashlib
import json
import os
import re
import shutil
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from litmoe.errors import UserError
from litmoe.tokenizer import copy_tokenizer, load_tokenizer, tokenizer_fingerprint, train_bpe_tokenizer

DEFAULT_SOURCE = "python-docs"
TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/{name}"
TINYSTORIES_FILES = ("TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt")
TINYSTORIES_SEPARATOR = "<|endoftext|>"
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
PREPARED_ENTRIES = {MANIFEST, "tokenizer", *SPLITS}  # all a prepared directory holds; --force replaces only these
MIN_VOCAB_SIZE = 258


@dataclass(frozen=True)
class Source:
    """A re-iterable stream of documents and a fingerprint of what they were read from."""

    name: str
    fingerprint: str
    documents: Callable[[], Iterator[str]]
    count: int | None = None  # number of documents, when known without reading them (for progress)


@dataclass
class Manifest:
    source: str
    source_fingerprint: str
    tokenizer_fingerprint: str
    val_fraction: float
    documents: dict[str, int]
    tokens: dict[str, int]

    def same_input(self, other: "Manifest") -> bool:
        return (self.source_fingerprint, self.tokenizer_fingerprint, self.val_fraction) == (
            other.source_fingerprint,
            other.tokenizer_fingerprint,
            other.val_fraction,
        )


# ---------------------------------------------------------------------------------------------- sources


def render_chat(messages: list, where: str) -> str:
    """Chat records become plain text: one `<|role|>` header line per message, then its content."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    parts = []
    for message in messages:
        if not isinstance(message, dict) or not {"role", "content"} <= message.keys():
            raise UserError(f"{where}: each message needs 'role' and 'content', got {message!r:.80}")
        role, content = message["role"], message["content"]
        if not (isinstance(role, str) and role.strip() and isinstance(content, str)):
            raise UserError(
                f"{where}: a message's role must be a non-empty string and its content a string, got {message!r:.80}"
            )
        parts.append(f"<|{role}|>\n{content}\n")
    return "".join(parts)


def read_jsonl(path: Path) -> Iterator[str]:
    """One document per line: a record with a `text` string, or a chat record with `messages`."""
    with open(path, encoding="utf-8", errors="strict") as file:
        for line_no, line in enumerate(_decoded_lines(file, path), start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: not valid JSON ({err.msg}); each line must be one JSON object") from err
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                yield record["text"]
            elif isinstance(record, dict) and "messages" in record:
                yield render_chat(record["messages"], where)
            else:
                raise UserError(f"{where}: record has no 'text' string or 'messages' list; add one of the two")


def _decoded_lines(file, path: Path) -> Iterator[str]:
    try:
        yield from file
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); re-encode it as UTF-8") from err


def read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start});"
            f" re-encode it (iconv -f <encoding> -t utf-8) or remove it"
        ) from err
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror}); fix its permissions or remove it") from None


def text_files(folder: Path) -> list[Path]:
    """Every .txt file under `folder`, sorted; an unreadable folder or file is an error, not skipped."""

    def unreadable(err: OSError) -> None:
        raise UserError(f"{err.filename}: cannot read this folder ({err.strerror}); fix its permissions") from None

    files = []
    for root, _, names in os.walk(folder, onerror=unreadable):
        files += [Path(root) / name for name in names if name.endswith(".txt")]
    for path in files:
        if path.is_file() and not os.access(path, os.R_OK):
            raise UserError(f"{path}: cannot read it (permission denied); fix its permissions or remove it")
    return sorted(path for path in files if path.is_file())


def _file_fingerprint(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def folder_source(folder: Path) -> Source:
    files = text_files(folder)
    if not files:
        raise UserError(f"{folder}: no .txt files found; put one document per .txt file in this folder")
    documents = lambda: (read_text_file(f) for f in files)  # noqa: E731
    return Source(f"folder:{folder}", _file_fingerprint(files), documents, count=len(files))


def jsonl_source(path: Path) -> Source:
    return Source(f"jsonl:{path}", _file_fingerprint([path]), lambda: read_jsonl(path))


def split_text(text: str) -> Iterator[str]:
    """The documents of one text file: separated by `<|endoftext|>` where the file uses it (as TinyStories
    does), else by blank lines."""
    separator = TINYSTORIES_SEPARATOR if TINYSTORIES_SEPARATOR in text else re.compile(r"\n[ \t]*\n")
    parts = text.split(separator) if isinstance(separator, str) else separator.split(text)
    return (part.strip() for part in parts if part.strip())


def text_file_source(path: Path) -> Source:
    return Source(f"text:{path}", _file_fingerprint([path]), lambda: split_text(read_text_file(path)))


_SKIPPED_STDLIB = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"}


def stdlib_docstrings() -> Iterator[str]:
    """One document per standard-library module: the module's, classes' and functions' docstrings."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if _SKIPPED_STDLIB & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        docs = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds)]
        if text := "\n\n".join(doc for doc in docs if doc and len(doc) > 200):
            yield text


def python_docs_source() -> Source:
    """Python's own documentation: the pydoc reference topics and the standard library's docstrings.

    Every Python installation ships it, so the default corpus needs no download (about 1.6M characters).
    """
    from pydoc_data.topics import topics

    documents = [topics[key] for key in sorted(topics)] + list(stdlib_docstrings())
    version = ".".join(map(str, sys.version_info[:3]))
    fingerprint = hashlib.sha256(version.encode()).hexdigest()[:16]
    return Source(f"python-docs:{version}", fingerprint, lambda: iter(documents), count=len(documents))


def download(url: str, destination: Path) -> None:
    """Download to `destination` through a temporary file, so an interrupted download leaves nothing."""
    import urllib.request

    from tqdm import tqdm

    partial = destination.with_name(destination.name + ".partial")
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length", 0)) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=destination.name) as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
        partial.replace(destination)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise UserError(
            f"could not download {url} ({err}); without network access, prepare your own text with --source PATH"
        ) from err


def tinystories_source(cache_dir: Path) -> Source:
    """TinyStories (the MoE-200M recipe's data set), downloaded once into `cache_dir`."""
    files = [cache_dir / name for name in TINYSTORIES_FILES]
    for path in files:
        if not path.is_file():
            download(TINYSTORIES_URL.format(name=path.name), path)

    def documents() -> Iterator[str]:
        for path in files:
            yield from split_text(read_text_file(path))

    return Source("tinystories", _file_fingerprint(files), documents)


def resolve_source(source: str, cache_dir: Path) -> Source:
    if source == DEFAULT_SOURCE:
        return python_docs_source()
    if source == "tinystories":
        return tinystories_source(cache_dir)
    path = Path(source)
    if not path.exists():
        raise UserError(
            f"--source {source}: no such file or folder; give a folder of .txt files, a .jsonl file,"
            f" {DEFAULT_SOURCE!r} or 'tinystories'"
        )
    if path.is_dir():
        return folder_source(path)
    if path.suffix in (".jsonl", ".json"):
        return jsonl_source(path)
    if path.suffix == ".txt":
        return text_file_source(path)
    raise UserError(f"--source {source}: unsupported file type {path.suffix!r}; use a .jsonl or .txt file or a folder")


# ------------------------------------------------------------------------------------------- splitting


def is_validation(document: str, val_fraction: float) -> bool:
    """Deterministic split by content: a document lands in the same split on every run and machine."""
    return zlib.crc32(document.encode("utf-8")) / 2**32 < val_fraction


def split_documents(documents: Iterable[str], val_fraction: float) -> Iterator[tuple[str, str]]:
    """Yield (split, document) for each non-empty document."""
    for document in documents:
        if document.strip():
            yield ("val" if is_validation(document, val_fraction) else "train"), document


# --------------------------------------------------------------------------------------------- writing


PIECE_CHARS = 1 << 18  # a long document goes through the tokenizer in pieces of at most this many characters
BATCH_CHARS = 1 << 22  # characters per tokenizer call (its threads share them)


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


def encode_texts(tokenizer, texts: list[str]) -> list[np.ndarray]:
    if tokenizer.backend == "huggingface":
        encodings = tokenizer.processor.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(encoding.ids, dtype=np.int32) for encoding in encodings]
    return [tokenizer.encode(text, bos=False, eos=False).numpy().astype(np.int32) for text in texts]


def encode_documents(
    tokenizer, documents: Iterable[tuple[str, str]], piece_chars: int = PIECE_CHARS, batch_chars: int = BATCH_CHARS
) -> Iterator[tuple[str, np.ndarray]]:
    """(split, token ids framed BOS ... EOS) for each (split, document). Documents are cut into pieces and the
    pieces batched by characters, so memory follows the largest document, not the corpus or the batch count."""
    framing = np.asarray([tokenizer.bos_id], dtype=np.int32), np.asarray([tokenizer.eos_id], dtype=np.int32)
    batch: list[str] = []
    owners: list[tuple[str, bool]] = []  # each piece's split, and whether it ends its document
    done: list[np.ndarray] = []  # encoded pieces of the document being assembled

    def flush() -> Iterator[tuple[str, np.ndarray]]:
        for ids, (split, last) in zip(encode_texts(tokenizer, batch), owners, strict=True):
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


def write_chunks(split_docs: Iterable[tuple[str, str]], tokenizer, out_dir: Path, source: "Source") -> tuple:
    """Tokenize and write each split as litdata chunks. Returns ({split: documents}, {split: tokens})."""
    import torch
    from litdata.streaming import TokensLoader
    from litdata.streaming.writer import BinaryWriter
    from tqdm import tqdm

    writers = {
        split: BinaryWriter(str(out_dir / split), chunk_bytes="64MB", item_loader=TokensLoader()) for split in SPLITS
    }
    documents = dict.fromkeys(SPLITS, 0)
    tokens = dict.fromkeys(SPLITS, 0)
    progress = tqdm(total=source.count, unit="doc", desc="tokenizing", disable=None)
    for split, ids in encode_documents(tokenizer, split_docs):
        writers[split].add_item(documents[split], torch.from_numpy(ids))
        documents[split] += 1
        tokens[split] += len(ids)
        progress.update()
    progress.close()
    for split, count in documents.items():
        if count == 0:  # litdata's writer would wait forever for the index of an empty split
            raise UserError(
                f"{source.name}: no document fell into the {split} split ({documents}); give more documents"
                " (a .txt file is split at blank lines) or change --val_fraction"
            )
    for writer in writers.values():
        writer.done()
        writer.merge()
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


def check_output_dir(out_dir: Path, source: str) -> None:
    """Refuse an --out_dir whose replacement could delete what the user owns, with or without --force: only a
    directory holding nothing but prepared data is ever replaced."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out_dir {out_dir} is a file; give a directory for the prepared data")
    if Path(source).exists():
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


def _check_existing(out_dir: Path, wanted_tokenizer: str | None, source: Source, val_fraction: float) -> bool:
    """True when `out_dir` already holds exactly this preparation; raises when it holds other prepared data."""
    existing = read_manifest(out_dir)
    if existing is None:
        return False
    if wanted_tokenizer is not None and existing.tokenizer_fingerprint != wanted_tokenizer:
        raise UserError(
            f"{out_dir / MANIFEST}: this data was made with another tokenizer"
            f" ({existing.tokenizer_fingerprint}); pass --force to replace it, or choose another --out_dir"
        )
    if existing.source_fingerprint != source.fingerprint or existing.val_fraction != val_fraction:
        raise UserError(
            f"{out_dir / MANIFEST}: this data was prepared from {existing.source} (val_fraction"
            f" {existing.val_fraction}); pass --force to replace it, or choose another --out_dir"
        )
    return True


def prepare(
    source: str = DEFAULT_SOURCE,
    out_dir: Path = Path("data/default"),
    tokenizer_dir: Path | None = None,
    vocab_size: int = 8192,
    val_fraction: float = 0.05,
    force: bool = False,
    cache_dir: Path = Path("data/cache"),
) -> Manifest:
    """Prepare pretraining data for run_train.py.

    Args:
        source: A folder of .txt files (one document each), a .jsonl file (records with a `text` field, or chat
            records with `messages`), a .txt file, 'python-docs' (Python's bundled documentation, no download) or
            'tinystories' (downloaded into `cache_dir`).
        out_dir: Where the tokenizer, the train/val chunks and manifest.json go.
        tokenizer_dir: A LitGPT tokenizer directory to use. When not given, a byte-level BPE tokenizer of
            `vocab_size` tokens is trained on the training split.
        vocab_size: Size of the tokenizer trained when no `tokenizer_dir` is given.
        val_fraction: Fraction of documents held out for validation (split by content hash, deterministic).
        force: Rebuild even if `out_dir` already holds prepared data, replacing it once the new data is complete
            (a directory holding anything else is never replaced).
        cache_dir: Where downloaded sources are kept.
    """
    if not 0 < val_fraction < 1:
        raise UserError(f"--val_fraction {val_fraction}: must be between 0 and 1 (e.g. 0.05)")
    if tokenizer_dir is None and vocab_size < MIN_VOCAB_SIZE:
        raise UserError(
            f"--vocab_size {vocab_size}: a byte-level BPE tokenizer needs at least {MIN_VOCAB_SIZE} tokens (256 bytes,"
            " BOS and EOS); 8192 suits small corpora"
        )
    out_dir = Path(out_dir)
    check_output_dir(out_dir, source)
    src = resolve_source(source, Path(cache_dir))
    wanted_tokenizer = None
    if tokenizer_dir is not None:
        load_tokenizer(Path(tokenizer_dir))
        wanted_tokenizer = tokenizer_fingerprint(Path(tokenizer_dir))
    if not force and _check_existing(out_dir, wanted_tokenizer, src, val_fraction):
        print(f"{out_dir} already holds this data ({read_manifest(out_dir).tokens}); --force rebuilds it")
        return read_manifest(out_dir)

    scratch = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        manifest = _build(src, scratch, tokenizer_dir, vocab_size, val_fraction)
        _replace(scratch, out_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(
        f"Prepared {out_dir}: {manifest.documents['train']:,} train / {manifest.documents['val']:,} val documents,"
        f" {manifest.tokens['train']:,} / {manifest.tokens['val']:,} tokens"
    )
    return manifest


def _build(src: Source, scratch: Path, tokenizer_dir: Path | None, vocab_size: int, val_fraction: float) -> Manifest:
    tokenizer_out = scratch / "tokenizer"
    if tokenizer_dir is None:
        print(f"Training a byte-level BPE tokenizer ({vocab_size} tokens) on the training split ...")
        documents = split_documents(src.documents(), val_fraction)
        train_texts = (piece for split, doc in documents if split == "train" for piece in pieces(doc))
        train_bpe_tokenizer(train_texts, vocab_size, tokenizer_out)
    else:
        copy_tokenizer(Path(tokenizer_dir), tokenizer_out)
    tokenizer = load_tokenizer(tokenizer_out)
    documents, tokens = write_chunks(split_documents(src.documents(), val_fraction), tokenizer, scratch, src)
    manifest = Manifest(
        src.name, src.fingerprint, tokenizer_fingerprint(tokenizer_out), val_fraction, documents, tokens
    )
    (scratch / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2) + "\n")
    return manifest


def _replace(new: Path, out_dir: Path) -> None:
    """Move `new` to `out_dir`; an existing `out_dir` is removed only after the new one is in place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        out_dir.rename(old)
    new.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
