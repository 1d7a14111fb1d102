"""The one check every command makes before it writes where the user pointed it, and the one way it writes a file.

An output path is refused when it is one of the command's inputs, when it lies inside a checkpoint or
prepared-data directory (a later save or `prepare_data.py --force` would replace it, or it would
corrupt them), and, for a file, when a file is there that this command did not write (unless --force). A file is
written beside its target and renamed over it, so a failed write never leaves half a file or loses the old one.
"""

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from litmoe.core.errors import UserError


def protected_owner(path: Path) -> tuple[Path, str] | None:
    """The checkpoint or prepared-data directory that is `path` or holds it, with what it is; else None."""
    for folder in (path, *path.parents):
        if (folder / "lit_model.pth").exists():
            return folder, "checkpoint"
        if (folder / "manifest.json").is_file() and (folder / "tokenizer").is_dir():
            return folder, "prepared-data"
    return None


def check_output(
    path: Path | str, flag: str, inputs: Iterable[tuple[str, Path | None]] = (), replaces: str | None = None
) -> Path:
    """`path` as an output of the command, refused (one line naming the flag and the fix) when writing there could
    destroy something the user has. `inputs` are (flag, path) of what the command reads; `replaces` the kind of
    directory the command itself makes and may replace whole ("prepared-data" for prepare_data.py)."""
    if str(path).strip() == "":
        raise UserError(f"{flag} '': give a path")
    path = Path(path).expanduser()  # `~` from a config file or `--flag=~/x`, where no shell expanded it
    target = path.resolve()
    if target in (Path(target.anchor), Path.home().resolve()):
        raise UserError(f"{flag} {path} is {'your home directory' if target.parts[1:] else 'the root directory'};"
                        " give a directory of its own (e.g. out/my-run)")  # fmt: skip
    for input_flag, input_path in inputs:
        if input_path is None or str(input_path) == "":
            continue
        if target == Path(input_path).resolve():
            raise UserError(f"{flag} {path} is {input_flag} {input_path}, an input; choose another path")
    if (owner := protected_owner(target)) is not None and owner != (target, replaces):
        folder, kind = owner
        raise UserError(
            f"{flag} {path} is inside the {kind} directory {folder}; writing there could destroy it: choose a path"
            " outside it"
        )
    return path


def check_output_dir(
    path: Path | str, flag: str, inputs: Iterable[tuple[str, Path | None]] = (), replaces: str | None = None
) -> Path:
    """`check_output` for a directory the command writes into (made when missing)."""
    path = check_output(path, flag, inputs, replaces)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; give a directory")
    return path


def check_output_file(
    path: Path | str, flag: str, inputs: Iterable[tuple[str, Path | None]] = (),
    written_by_us: Callable[[Path], bool] = lambda path: False, force: bool = False,
) -> Path:  # fmt: skip
    """`check_output`, and an existing file there is replaced only when this command wrote it, or with --force."""
    path = check_output(path, flag, inputs)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; give a file path")
    if path.exists() and not force and not written_by_us(path):
        raise UserError(f"{flag} {path} exists and this command did not write it; choose a new path or pass --force")
    return path


def write_file(path: Path, text: str) -> None:
    """`text` into `path` through a sibling temporary file renamed over it: all or nothing. The file gets the
    permissions `open()` would give a new one (mkstemp's are the owner's alone)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(scratch, 0o666 & ~current_umask())
        os.replace(scratch, path)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    umask = os.umask(0o022)  # reading it means setting it; set back at once
    os.umask(umask)
    return umask


def figure_written_by(path: Path, software: str) -> bool:
    """Whether `path` is a PNG figure whose metadata names `software` as its writer (one a command may replace)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.info.get("Software") == software
    except (OSError, ValueError):
        return False
