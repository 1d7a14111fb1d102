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

How each format is read, and every reading problem as one line naming the file (and line or row) and the fix, is
litmoe.data.readers.
"""

import hashlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

from litmoe.core.errors import UserError
from litmoe.data.files import DATA_SUFFIXES, data_kind, files_in, glob_files, is_glob
from litmoe.data.readers import read_jsonl, read_table, read_text_file, split_text

DEFAULT_SOURCE = "python-docs"
TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/{name}"
TINYSTORIES_FILES = ("TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt")
TXT_FILES_PER_SHARD = 512


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
