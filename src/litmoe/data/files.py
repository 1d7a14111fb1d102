"""Finding the data files of a `--source` folder or glob: every real file once, whatever links lead to it.

Folders are walked following symbolic links, as a user who linked a corpus into a folder expects, but never into a
folder already walked (a link to `.` or to a parent would loop forever) and never twice to one file; the links
skipped are counted and said. A glob is matched against that same walk, so `**` cannot loop either.
"""

import os
import re
from pathlib import Path

from litmoe.core.errors import UserError

DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".arrow", ".txt")
GLOB_CHARACTERS = re.compile(r"[*?[]")


def data_kind(path: Path) -> str | None:
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
        return "jsonl"
    return {".parquet": "parquet", ".arrow": "arrow", ".txt": "txt"}.get(path.suffix)


def walk(root: Path) -> tuple[list[Path], int]:
    """(every file under `root`, each real file once, in walk order; the links skipped because they lead to a folder
    or file already walked). An unreadable folder is an error, not skipped."""

    def unreadable(err: OSError) -> None:
        raise UserError(f"{err.filename}: cannot read this folder ({err.strerror}); fix its permissions") from None

    walked, read, files, skipped = {os.path.realpath(root)}, set(), [], 0
    for folder, folders, names in os.walk(root, onerror=unreadable, followlinks=True):
        fresh = []
        for name in sorted(folders, key=lambda name: (os.path.islink(os.path.join(folder, name)), name)):
            real = os.path.realpath(os.path.join(folder, name))
            if real in walked:  # a link back up (`a -> .`), or a second way into one folder
                skipped += 1
                continue
            walked.add(real)
            fresh.append(name)
        folders[:] = fresh
        for name in sorted(names):
            real = os.path.realpath(os.path.join(folder, name))
            if real in read:
                skipped += 1
                continue
            read.add(real)
            files.append(Path(folder) / name)
    return files, skipped


def report_skipped_links(where: str, skipped: int) -> None:
    if skipped:
        print(f"{where}: skipped {skipped} link{'s' if skipped != 1 else ''} to folders or files already read")


def files_in(folder: Path) -> list[Path]:
    """Every data file under `folder`, sorted; an unreadable folder or file is an error, not skipped."""
    files, skipped = walk(folder)
    report_skipped_links(str(folder), skipped)
    return readable_data_files(files)


def readable_data_files(files: list[Path]) -> list[Path]:
    special = [path for path in files if data_kind(path) and not path.is_file()]
    if special:
        print(
            f"Skipped {len(special)} data file name{'s' if len(special) != 1 else ''} that are not regular files"
            f" (pipes, sockets, devices, broken links), e.g. {special[0]}"
        )
    files = [path for path in files if data_kind(path) and path.is_file()]
    for path in files:
        if not os.access(path, os.R_OK):
            raise UserError(f"{path}: cannot read it (permission denied); fix its permissions or remove it")
    return sorted(files)


def is_glob(source: str) -> bool:
    """Whether `source` is a pattern: it has glob characters and is not itself an existing path (`corpus[1]/`)."""
    return bool(GLOB_CHARACTERS.search(source)) and not Path(source).exists()


def glob_files(pattern: str) -> list[Path]:
    """The data files a glob matches (`*`, `?`, `[...]` within a name, `**` across folders), and the data files under
    each folder it matches."""
    parts = Path(pattern).parts
    fixed = next(index for index, part in enumerate(parts) if GLOB_CHARACTERS.search(part))
    base = Path(*parts[:fixed]) if fixed else Path(".")
    if not base.is_dir():
        return []
    matches = pattern_regex(pattern).fullmatch
    files, skipped = walk(base)
    report_skipped_links(pattern, skipped)
    chosen = []
    for path in files:
        folders = [path.parents[index] for index in range(len(path.relative_to(base).parts) - 1)]
        if any(matches(shown(candidate, base, fixed)) for candidate in [path, *folders]):
            chosen.append(path)
    return readable_data_files(chosen)


def shown(path: Path, base: Path, fixed: int) -> str:
    """`path` as the pattern spells it (no `./` prefix when the pattern had none)."""
    return str(path) if fixed else str(path.relative_to(base))


def pattern_regex(pattern: str) -> re.Pattern:
    """A glob as a regular expression over whole paths: `**/` any folders (or none), `*` and `?` within a name."""
    regex, index = "", 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            regex, index = regex + "(?:.*/)?", index + 3
        elif pattern.startswith("**", index):
            regex, index = regex + ".*", index + 2
        elif pattern[index] == "*":
            regex, index = regex + "[^/]*", index + 1
        elif pattern[index] == "?":
            regex, index = regex + "[^/]", index + 1
        elif pattern[index] == "[" and (end := pattern.find("]", index + 2)) != -1:
            body = pattern[index + 1 : end].replace("\\", "\\\\")
            body = "^" + body[1:] if body.startswith("!") else body
            regex, index = regex + "[" + body + "]", end + 1
        else:
            regex, index = regex + re.escape(pattern[index]), index + 1
    return re.compile(regex)
