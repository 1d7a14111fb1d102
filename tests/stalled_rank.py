"""Two gloo ranks, the second stopped (SIGSTOP) before a collective that waits --timeout-minutes for it: what the
commands' error path (litmoe.core.cli.run_cli) makes of the stall (tests/test_environment.py).

    MASTER_PORT=PORT TIMEOUT_SECONDS=S python tests/stalled_rank.py

Rank 0 starts rank 1 as Lightning's launcher does (a child with the same command), prints its pid, and both meet
in a gloo process group whose collectives wait S seconds.
"""

import os
import signal
import subprocess
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from litmoe.core.cli import run_cli


def main() -> None:
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        other = subprocess.Popen([sys.executable, __file__], env={**os.environ, "RANK": "1"})
        print(f"rank 1 pid {other.pid}", flush=True)
    timeout = timedelta(seconds=float(os.environ["TIMEOUT_SECONDS"]))
    address = f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}"
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=2, timeout=timeout)
    dist.all_reduce(torch.ones(1))  # both ranks are up
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # a hung rank: alive, holding its connections, never answering
    dist.all_reduce(torch.ones(1))


if __name__ == "__main__":
    run_cli(main)
