"""Where documents come from, in the formats corpora ship in, cut into shards that prepare_data.py's workers take
one at a time (and that an interrupted preparation resumes by).

  a .txt file                     documents separated by blank lines (or by <|endoftext|>, as TinyStories does)
  a folder of .txt files          one document per file (grouped into shards of many files)
  .jsonl, .jsonl.gz, .jsonl.zst   one JSON record per line: the `text_field` string, or chat `messages`
  .parquet                        one row per document: the `text_field` column, or chat `messages` (FineWeb,
                                  SlimPajama and The Stack ship as parquet)
  .arrow                          a Hugging Face dataset saved with `save_to_disk` (its data-*.arrow files)
  a folder or a glob              any mix of these, searched recursively; a local Hugging Face dataset (a
                                  `save_to_disk` directory, or a snapshot of parquet files) is such a folder
  python-docs                     Python's own documentation, the default corpus (no download)
  tinystories                     the MoE-200M recipe's data set, downloaded once

Every reading problem is one line naming the file (and line or row) and the fix.
"""

import gzip
import hashlib
import io
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

from litmoe.core.errors import UserError
from litmoe.data.files import DATA_SUFFIXES, data_kind, files_in, glob_files, is_glob

DEFAULT_SOURCE = "python-docs"
TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/{name}"
TINYSTORIES_FILES = ("TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt")
TINYSTORIES_SEPARATOR = "<|endoftext|>"
TXT_FILES_PER_SHARD = 512
ROWS_PER_BATCH = 1024  # rows read from a parquet or Arrow file at a time


@dataclass(frozen=True)
class Shard:
    """One unit of work: one data file, or a group of .txt files (one document each). Picklable, for workers."""

    kind: str  # txt-files | text | jsonl | parquet | arrow | python-docs
    paths: tuple[str, ...] = ()
    text_field: str = "text"

    @property
    def name(self) -> str:
        """Stable across runs (an interrupted preparation finds its finished shards by it)."""
        digest = hashlib.sha256("\n".join((self.kind, self.text_field, *self.paths)).encode()).hexdigest()[:12]
        return f"{Path(self.paths[0]).stem if self.paths else self.kind}-{digest}"

    def documents(self) -> Iterator[str]:
        if self.kind == "txt-files":
            return (read_text_file(Path(path)) for path in self.paths)
        if self.kind == "text":
            return split_text(read_text_file(Path(self.paths[0])))
        if self.kind == "jsonl":
            return read_jsonl(Path(self.paths[0]), self.text_field)
        if self.kind in ("parquet", "arrow"):
            return read_table(Path(self.paths[0]), self.text_field)
        return iter(python_docs())


@dataclass(frozen=True)
class Source:
    """Documents from one `--source` (or `--val_source`): their shards and a fingerprint of what they were read from."""

    name: str
    fingerprint: str
    shards: tuple[Shard, ...]
    count: int | None = None  # documents, when known without reading them (for progress)
    files: tuple[Path, ...] = field(default=(), repr=False)

    def documents(self) -> Iterator[str]:
        return chain.from_iterable(shard.documents() for shard in self.shards)


# ------------------------------------------------------------------------------------------------ readers


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


def record_text(record, text_field: str, where: str) -> str | None:
    """A record's document: its `text_field` string, or its rendered chat `messages`; None for a null text."""
    if not isinstance(record, dict):
        raise UserError(
            f"{where}: a JSON {json_type(record)}, not an object; each record must be {{{text_field!r}: ...}}"
        )
    if isinstance(record.get(text_field), str):
        return record[text_field]
    if record.get("messages") is not None:
        return render_chat(record["messages"], where)
    if text_field in record and record[text_field] is None:
        return None
    if text_field in record:
        raise UserError(f"{where}: {text_field!r} is a JSON {json_type(record[text_field])}, not text")
    raise UserError(
        f"{where}: record has no {text_field!r} string or 'messages' list; add one, or name the field with --text_field"
    )


def json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return names.get(type(value), "null")


def unique_keys(where: str):
    """A json `object_pairs_hook` refusing a key given twice (json keeps the last without a word)."""

    def build(pairs: list[tuple[str, object]]) -> dict:
        record = dict(pairs)
        if len(record) < len(pairs):
            twice = next(key for index, (key, _) in enumerate(pairs) if key in dict(pairs[:index]))
            raise UserError(f"{where}: the key {twice!r} appears twice in one object; keep one")
        return record

    return build


def open_text(path: Path):
    """A text stream of a file, decompressing .gz and .zst (a UTF-8 byte-order mark, as Windows tools write, is
    dropped)."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="strict")
    if path.name.endswith(".zst"):
        return io.TextIOWrapper(io.BufferedReader(ZstdFrames(path)), encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig", errors="strict")


def compression_problem(path: Path) -> str | None:
    """Why a compressed file cannot be decompressed to its end (a corrupt or cut-off file decompresses to garbage
    before the checksum says so), or None when it is sound or not compressed."""
    if not path.name.endswith((".gz", ".zst")):
        return None
    try:
        with open_text(path) as file:
            while file.buffer.read(1 << 20):
                pass
    except decompression_errors() as err:
        return reason(err)
    return None


class ZstdFrames(io.RawIOBase):
    """A .zst file's decompressed bytes, frame after frame; a file that ends inside a frame (a cut-off download)
    is an EOFError at its end, not a silently shorter corpus."""

    def __init__(self, path: Path) -> None:
        import zstandard

        self.file, self.decompressor = open(path, "rb"), zstandard.ZstdDecompressor()
        self.frame, self.pending, self.started = self.decompressor.decompressobj(), b"", False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            chunk = self.file.read(1 << 20)
            if not chunk:
                if self.started and not self.frame.eof:
                    raise EOFError("the file ends inside a zstd frame: it is truncated (an interrupted download?)")
                return 0
            self.pending = self.decompress(chunk)
        size = min(len(buffer), len(self.pending))
        buffer[:size], self.pending = self.pending[:size], self.pending[size:]
        return size

    def decompress(self, chunk: bytes) -> bytes:
        self.started, out = True, b""
        while chunk:
            if self.frame.eof:  # the next frame of a multi-frame file
                self.frame = self.decompressor.decompressobj()
            out += self.frame.decompress(chunk)
            chunk = self.frame.unused_data if self.frame.eof else b""
        return out

    def close(self) -> None:
        self.file.close()
        super().close()


def read_jsonl(path: Path, text_field: str = "text") -> Iterator[str]:
    """One document per line: a record with a `text_field` string, or a chat record with `messages`. A .json file
    may instead hold one array of such records."""
    try:
        for where, record in json_records(path):
            if (text := record_text(record, text_field, where)) is not None:
                yield text
    except UnicodeDecodeError as err:
        if problem := compression_problem(path):
            raise corrupt(path, problem) from None
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); re-encode it as UTF-8") from None
    except decompression_errors() as err:  # corrupt compression, unreadable file
        raise unreadable(path, err) from None


def unreadable(path: Path, err: Exception) -> UserError:
    if path.name.endswith((".gz", ".zst")) and getattr(err, "errno", None) is None:  # not the file system's
        return corrupt(path, reason(err))
    return UserError(f"{path}: cannot read it ({reason(err)}); check the file, or remove it")


def corrupt(path: Path, problem: str) -> UserError:
    return UserError(f"{path}: a corrupt compressed file ({problem}); download or compress it again")


def json_records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) for each record of a JSON Lines file, or of a .json file holding one array."""
    with open_text(path) as file:
        if path.suffix == ".json" and file.read(4096).lstrip().startswith("["):
            file.seek(0)
            records = parse_json(file.read(), str(path), "the file must be one JSON array of objects")
            yield from ((f"{path}, record {index}", record) for index, record in enumerate(records, start=1))
            return
        if path.suffix == ".json":
            file.seek(0)
        for line_no, line in enumerate(file, start=1):
            if line.strip():
                where = f"{path}:{line_no}"
                yield where, parse_json(line, where, "each line must be one JSON object", path)


def parse_json(text: str, where: str, form: str, path: Path | None = None):
    try:
        return json.loads(text, object_pairs_hook=unique_keys(where))
    except json.JSONDecodeError as err:
        if path is not None and (problem := compression_problem(path)):
            raise corrupt(path, problem) from None
        raise UserError(f"{where}: not valid JSON ({err.msg}); {form}") from None


def decompression_errors() -> tuple[type[Exception], ...]:
    """What reading a damaged or unreadable (compressed) file raises."""
    import zlib

    import zstandard

    return OSError, EOFError, ValueError, zlib.error, zstandard.ZstdError


def read_table(path: Path, text_field: str) -> Iterator[str]:
    """Rows of a parquet file or of an Arrow file (Hugging Face's save_to_disk), a batch of rows at a time."""
    import pyarrow as pa

    try:
        batches, columns = table_batches(path)
        column = text_field if text_field in columns else "messages" if "messages" in columns else None
        if column is None:
            raise UserError(
                f"{path}: no {text_field!r} column (it has {', '.join(columns)}); name the text one with --text_field"
            )
        row = 0
        for batch in batches(column):
            for value in batch.column(0).to_pylist():
                row += 1
                if value is None:
                    continue
                if column == "messages":
                    value = render_chat(value, f"{path}, row {row}")
                elif not isinstance(value, str):
                    raise UserError(f"{path}, row {row}: {text_field!r} is {type(value).__name__}, not text")
                yield value
    except (OSError, pa.ArrowException) as err:
        raise UserError(f"{path}: cannot read it as {path.suffix[1:]} ({reason(err)}); check the file") from None


def table_batches(path: Path):
    """(batches(column) -> record batches of that column, column names) of a parquet or Arrow file."""
    import pyarrow.ipc
    import pyarrow.parquet

    if path.suffix == ".parquet":
        parquet = pyarrow.parquet.ParquetFile(path)
        columns = parquet.schema_arrow.names  # the top-level columns (schema.names lists a struct's leaves)
        return (lambda column: parquet.iter_batches(batch_size=ROWS_PER_BATCH, columns=[column])), columns
    try:  # save_to_disk writes the Arrow streaming format; the file format is tried too
        reader = pyarrow.ipc.open_stream(path)
        return (lambda column: (batch.select([column]) for batch in reader)), reader.schema.names
    except pyarrow.ArrowInvalid:
        reader = pyarrow.ipc.open_file(path)
        batches = (reader.get_batch(index) for index in range(reader.num_record_batches))
        return (lambda column: (batch.select([column]) for batch in batches)), reader.schema.names


def reason(err: BaseException) -> str:
    return " ".join(str(err).split())[:160] or type(err).__name__


def read_text_file(path: Path) -> str:
    """A text file's content (a UTF-8 byte-order mark dropped); binary data posing as text is refused."""
    try:
        text = path.read_text(encoding="utf-8-sig")
        if "\x00" in text:
            raise UserError(f"{path}: holds NUL bytes, so it is binary data, not text; remove it from the source")
        return text
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start});"
            f" re-encode it (iconv -f <encoding> -t utf-8) or remove it"
        ) from err
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror}); fix its permissions or remove it") from None


def split_text(text: str) -> Iterator[str]:
    """The documents of one text file: separated by `<|endoftext|>` where the file uses it (as TinyStories
    does), else by blank lines."""
    separator = TINYSTORIES_SEPARATOR if TINYSTORIES_SEPARATOR in text else re.compile(r"\n[ \t]*\n")
    parts = text.split(separator) if isinstance(separator, str) else separator.split(text)
    return (part.strip() for part in parts if part.strip())


# ---------------------------------------------------------------------------------------- built-in corpora

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


def python_docs() -> list[str]:
    """Python's own documentation: the pydoc reference topics and the standard library's docstrings (about 1.6M
    characters; every Python installation ships it, so the default corpus needs no download)."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)] + list(stdlib_docstrings())


def python_docs_source() -> Source:
    version = ".".join(map(str, sys.version_info[:3]))
    fingerprint = hashlib.sha256(version.encode()).hexdigest()[:16]
    return Source(f"python-docs:{version}", fingerprint, (Shard("python-docs"),), count=len(python_docs()))


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
    if cache_dir.exists() and not cache_dir.is_dir():
        raise UserError(f"--cache_dir {cache_dir} is a file; give a directory to keep downloaded sources in")
    files = [cache_dir / name for name in TINYSTORIES_FILES]
    for path in files:
        if not path.is_file():
            download(TINYSTORIES_URL.format(name=path.name), path)
    return Source("tinystories", files_fingerprint(files, "text"), tuple(Shard("text", (str(p),)) for p in files))


# ------------------------------------------------------------------------------------------- resolving


def files_fingerprint(files: list[Path], text_field: str) -> str:
    digest = hashlib.sha256(text_field.encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def shards_of(files: list[Path], text_field: str, lone_text_file: bool) -> tuple[Shard, ...]:
    """One shard per data file; .txt files (one document each) in groups. A .txt file given alone is a corpus
    of documents separated by blank lines instead."""
    texts = [str(path) for path in files if data_kind(path) == "txt"]
    shards = [Shard(data_kind(path), (str(path),), text_field) for path in files if data_kind(path) != "txt"]
    if lone_text_file:
        return (Shard("text", tuple(texts)),)
    groups = [tuple(texts[start : start + TXT_FILES_PER_SHARD]) for start in range(0, len(texts), TXT_FILES_PER_SHARD)]
    return (*shards, *(Shard("txt-files", group) for group in groups))


def resolve_source(source: str, cache_dir: Path, text_field: str = "text", flag: str = "--source") -> Source:
    if source == DEFAULT_SOURCE:
        return python_docs_source()
    if source == "tinystories":
        return tinystories_source(cache_dir)
    if is_glob(source):
        files = glob_files(source)
        if not files:
            raise UserError(f"{flag} {source}: the pattern matches no data files ({', '.join(DATA_SUFFIXES)})")
        return Source(f"glob:{source}", files_fingerprint(files, text_field), shards_of(files, text_field, False))
    path = Path(source)
    if not path.exists():
        raise UserError(
            f"{flag} {source}: no such file or folder; give a folder or file of {', '.join(DATA_SUFFIXES)} data, a"
            f" glob, {DEFAULT_SOURCE!r} or 'tinystories'"
        )
    if path.is_dir():
        files = files_in(path)
        if not files:
            raise UserError(f"{path}: no data files found ({', '.join(DATA_SUFFIXES)}); put your text in this folder")
        txt_count = sum(data_kind(file) == "txt" for file in files)
        count = txt_count if txt_count == len(files) else None
        return Source(f"folder:{path}", files_fingerprint(files, text_field), shards_of(files, text_field, False),
                      count=count)  # fmt: skip
    if not path.is_file():
        raise UserError(f"{flag} {source}: not a regular file (a pipe, socket or device); give a data file or folder")
    kind = "jsonl" if path.suffix == ".json" else data_kind(path)
    if kind is None:
        raise UserError(f"{flag} {source}: unsupported file type {path.suffix!r}; use {', '.join(DATA_SUFFIXES)}")
    shards = shards_of([path], text_field, True) if kind == "txt" else (Shard(kind, (str(path),), text_field),)
    return Source(f"{kind}:{path}", files_fingerprint([path], text_field), shards)
