"""Reading the documents of one data file, in the formats corpora ship in (litmoe.data.sources lists them).

Data is read as it was meant: a UTF-8 byte-order mark (Notepad, PowerShell) is dropped, a `.json` file may be one
array of records, a compressed file must decompress to its end. Every problem is one line naming the file (and
line, record or row) and the fix: a record that is not an object, a text that is not a string, a key given twice,
NUL bytes in a text file, a corrupt compressed file (even when its garbage reaches the JSON parser first).
"""

import gzip
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

from litmoe.core.errors import UserError

TINYSTORIES_SEPARATOR = "<|endoftext|>"  # between documents in a .txt file, as TinyStories ships
ROWS_PER_BATCH = 1024  # rows read from a parquet or Arrow file at a time


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
