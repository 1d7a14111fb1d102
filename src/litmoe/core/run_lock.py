"""One run per output directory: a lock file in --out_dir, held by the launching process for the whole run.

Two runs writing into one directory would overwrite each other's checkpoints. The lock is created exclusively
(O_EXCL) and records the holder's host, pid, process start time and start date. A second run stops with one
line naming the holder. A lock whose process is gone (same host, pid not running, or running but started at
another time: a reused pid) is stale: it is reported and taken over. On another host liveness cannot be
checked, so the message says how to remove the lock once that run is known to be gone.
"""

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from litmoe.core.errors import UserError

LOCK_FILE = ".litmoe.lock"
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")
EMPTY_LOCK_GRACE_SECONDS = 10


def launching_process() -> bool:
    """Whether this process is global rank 0 of its launch (torchrun, SLURM, DeepSpeed, or Lightning's own
    launcher, whose child ranks see LOCAL_RANK): only that one takes the lock."""
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def holder_alive(holder: dict[str, Any]) -> bool | None:
    """True or False on this host; None when the holder runs on another host (unknowable from here)."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = int(holder.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return holder.get("process_start") in (None, process_start(pid))


def read_holder(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # being written this instant, or garbage: treated as held by an unknown process
    return holder if isinstance(holder, dict) else {}


@contextmanager
def run_lock(out_dir: Path, lock_name: str = LOCK_FILE) -> Iterator[None]:
    """Hold the lock file `lock_name` in `out_dir` for the duration; an `out_dir` created for the lock alone is
    removed again."""
    if not launching_process():
        yield
        return
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / lock_name
    me = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": process_start(os.getpid()),
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    while True:
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            take_over_if_stale(path, out_dir)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        json.dump(me, file)
    try:
        yield
    finally:
        if read_holder(path).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()


def take_over_if_stale(path: Path, out_dir: Path) -> None:
    holder = read_holder(path)
    if holder:
        alive = holder_alive(holder)
    else:  # a holder writes its record right after creating the file: an empty one that stays so was cut short
        alive = path.exists() and time.time() - path.stat().st_mtime < EMPTY_LOCK_GRACE_SECONDS
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} (since {holder.get('started', '?')})"
    if alive is False:
        print(f"{out_dir}: taking over the lock of {who}, which is no longer running")
        path.unlink(missing_ok=True)
        return
    if alive is None:
        raise UserError(
            f"{out_dir} is in use by {who}; wait for that run or choose another --out_dir (if it is gone, delete"
            f" {path})"
        )
    raise UserError(f"{out_dir} is in use by {who}; wait for that run to end or choose another --out_dir")
