"""When another rank dies, stalls or never joins: one line on every surviving rank, one exit status, no process left.

A collective with a rank that is gone fails in gloo or NCCL with a C++ message (`Connection reset by peer`, a
timeout) under a traceback of LitGPT's loop; `peer_failure` turns it into one line naming this rank, its host and
what the collective said, and the command exits with EXIT_PEER_LOST. The process that launched the others kills
what it started first, so that a stalled rank (SIGSTOP, a hung GPU) is not left behind.
"""

import os
import re
import signal
import socket
import sys
from pathlib import Path

from litmoe.core.errors import EXIT_PEER_LOST

# What gloo, NCCL and torch.distributed say when a peer is gone; nothing else in a training run says these.
PEER_MARKERS = ("gloo/transport", "Connection reset by peer", "Connection closed by peer", "NCCL", "ProcessGroup")
DISTRIBUTED_ERRORS = ("DistError", "DistBackendError", "DistNetworkError", "DistStoreError")
ADVICE = (
    "another rank died, stalled past --timeout-minutes or never joined (its own output says why); every rank"
    " stops (a training run keeps its last checkpoint: --resume auto once every rank can run)"
)


def peer_failure(err: BaseException) -> str | None:
    """The one line for `err` when it is a collective that failed because of another rank, else None."""
    names = {cls.__name__ for cls in type(err).__mro__}
    message = str(err)
    if not names & set(DISTRIBUTED_ERRORS) and not (
        isinstance(err, RuntimeError) and any(marker in message for marker in PEER_MARKERS)
    ):
        return None
    detail = re.sub(r"^\[[^\]]*\.(cc|cpp):\d+\]\s*", "", message.strip().splitlines()[0] if message.strip() else "")
    detail = detail.split(" This is typically caused by")[0].rstrip(". ")
    return f"{this_rank()}: a collective with the other ranks failed ({detail}); {ADVICE}"


def this_rank() -> str:
    rank = os.environ.get("RANK")
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        rank = str(distributed.get_rank())
    return f"rank {rank or 0} on {socket.gethostname()}"


def kill_children() -> None:
    """SIGKILL every process this one started (the ranks a launcher spawned, loader workers): none is left to hang
    on a collective that will never complete."""
    for task in Path(f"/proc/{os.getpid()}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                os.kill(int(child), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def stop_run(line: str) -> None:
    """How a rank ends when another is lost: `error: line` on stderr, what this process started killed, and exit
    with EXIT_PEER_LOST at once."""
    print(f"error: {line}", file=sys.stderr)
    kill_children()
    leave(EXIT_PEER_LOST)


def leave(status: int) -> None:
    """Exit now, without the interpreter's teardown: after a collective failed, destroying its process group can
    abort the process (gloo: "terminate called without an active exception", status -6) instead of exiting with
    `status`. What is printed is flushed first; the stack's own cleanups (the run lock) have run already."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream
            pass
    os._exit(status)
