"""Checksums of the checkpoints a run writes, so that no checkpoint is trusted blindly.

Every checkpoint folder gets `SHA256SUMS` (the format of `sha256sum`, so `sha256sum -c SHA256SUMS` checks it by
hand too), written last, before the folder is published. Large files are hashed while they are written, so the
list needs no second read of them: the weights (`HashingWriter`), DeepSpeed's shards on the rank that writes each
(the digests handed to rank 0 through the folder), prepared data's chunks in the worker that writes each. The
small files beside them are hashed after, and so are the files LitGPT's fine-tuning writes. Whoever loads a
checkpoint checks its weights against the list (`checksum_problem`): a flipped byte is found at load, not twenty
steps later as a diverging loss. The YAML and tokenizer files are parsed and checked at every load anyway, and
may be edited by hand; `--verify` checks every file. A folder without the list (written before it existed, or
by LitGPT itself) loads as before.
"""

import hashlib
from functools import cache
from pathlib import Path
from typing import Any, BinaryIO

SUMS = "SHA256SUMS"
HANDED_OVER = ".sha256-rank"  # + the rank: digests another rank took while writing, for write_checksums
CHUNK = 1 << 24
_written: dict[Path, str] = {}  # digests of the files this process wrote through a HashingWriter


class HashingWriter:
    """A binary file that hashes what goes through it (torch.save writes a checkpoint sequentially)."""

    def __init__(self, file: BinaryIO, path: Path) -> None:
        self.file, self.path, self.digest = file, Path(path), hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def remember(self) -> None:
        """Keep the digest of what was written, for `write_checksums`."""
        remember_digest(self.path, self.digest.hexdigest())


def remember_digest(path: Path, digest: str) -> None:
    """The digest of `path`, taken while it was written (here or in a worker), for `write_checksums`."""
    _written[Path(path).resolve()] = digest


def save_hashed(obj: Any, path: Path, **save_options: Any) -> None:
    """`torch.save(obj, path)`, hashed while written (for `write_checksums`)."""
    import torch  # here: preparing data, which hashes too, runs without torch

    with open(path, "wb") as file:
        writer = HashingWriter(file, path)
        torch.save(obj, writer, **save_options)
    writer.remember()


def hand_over_digests(folder: Path, rank: int) -> None:
    """Leave the digests this process took of files under `folder` in the folder, for the rank that writes its
    SHA256SUMS (another process)."""
    root = Path(folder).resolve()
    mine = {path: _written.pop(path) for path in list(_written) if path.is_relative_to(root)}
    if mine:
        lines = "".join(f"{digest}  {path.relative_to(root).as_posix()}\n" for path, digest in mine.items())
        (root / f"{HANDED_OVER}{rank}").write_text(lines, encoding="utf-8")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(folder: Path) -> None:
    """`folder/SHA256SUMS` for every file under `folder`, with the digests taken while writing where there are
    (this process's, and those other processes handed over)."""
    for handed in Path(folder).glob(f"{HANDED_OVER}*"):
        for line in handed.read_text(encoding="utf-8").splitlines():
            digest, _, name = line.partition("  ")
            remember_digest(Path(folder) / name, digest)
        handed.unlink()
    lines = []
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and path.name != SUMS:
            digest = _written.pop(path.resolve(), None) or file_digest(path)
            lines.append(f"{digest}  {path.relative_to(folder).as_posix()}\n")
    (Path(folder) / SUMS).write_text("".join(lines), encoding="utf-8")


def checksum_problem(folder: Path, only: str | None = None) -> str | None:
    """The first file of `folder` (or only `only` and what is under it) whose bytes differ from what SHA256SUMS
    recorded, or that is gone, as the one line to show; None when all match or there is no list."""
    sums = Path(folder) / SUMS
    if not sums.is_file():
        return None
    for line in sums.read_text(encoding="utf-8", errors="replace").splitlines():
        expected, _, name = line.partition("  ")
        if only is not None and name != only and not name.startswith(f"{only}/"):
            continue
        path = Path(folder) / name
        if not path.is_file():
            return f"{name} is missing (listed in {SUMS})"
        stat = path.stat()
        if digest_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns) != expected:
            return f"{name} does not match its checksum in {SUMS} (its bytes changed after it was written)"
    return None


@cache
def digest_of(path: str, size: int, modified_ns: int) -> str:
    """A file's digest, read once per process for each size and modification time."""
    del size, modified_ns  # the cache key: a file rewritten since is read again
    return file_digest(Path(path))


def verify_line(folder: Path, problem: str | None, checkpoint: bool) -> str:
    """`--verify`'s line for one folder, given what is wrong with it (None: nothing); a checkpoint's structure was
    checked too."""
    sums = Path(folder) / SUMS
    if problem is not None:
        return f"FAILED  {folder}: {problem}"
    if not sums.is_file():
        checked = "only its structure was checked" if checkpoint else "nothing to compare"
        return f"ok      {folder}: no {SUMS} (written before checksums existed, or not by litmoe), {checked}"
    count = len(sums.read_text(encoding="utf-8").splitlines())
    return f"ok      {folder}: {count} files match {SUMS}"
