"""Preemption: SIGTERM, SIGINT and SIGUSR1 end a run at the next optimizer-step boundary, with a checkpoint.

Clusters warn before they take a node away: SLURM sends SIGTERM (and, with `--signal=B:USR1@180`, SIGUSR1
180 s before the time limit), Kubernetes SIGTERM, a user at the terminal SIGINT (Ctrl-C). The handler only
records the signal. The train loader looks at the record before it hands out the first micro-batch of an
optimizer step: by then the step in flight has finished, with LitGPT's logging, validation and its own
checkpoint, so a checkpoint written there resumes exactly. With several ranks the ranks vote at each step
boundary, so every rank stops at the same step even when the signal reached only some of them: a one-number
all-reduce over a host-side (gloo) group, started at one boundary and read at the next, when it has long
finished. The GPU is never asked and no step waits; a stop then comes one optimizer step after the signal.

A second signal ends the process at once, without a checkpoint (the atomic save keeps the previous ones whole).
Exit status after a stop with a checkpoint: 75 on rank 0 (EX_TEMPFAIL: run again with --resume auto), 0 on the
other ranks, so that launchers watching child processes do not kill rank 0 while it finishes.
"""

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from litmoe.training.readback import host_buffer

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(Exception):
    """A stop signal was agreed on at an optimizer-step boundary."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


class StopSignal:
    """Records the first stop signal; a second one exits the process immediately."""

    def __init__(self) -> None:
        self.received: int | None = None

    def handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            os.write(2, f"{name} again: exiting now, without a checkpoint\n".encode())
            os._exit(128 + signum)
        self.received = signum
        os.write(2, f"{name}: stopping after this optimizer step, with a checkpoint (again: exit now)\n".encode())

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"

    @contextmanager
    def installed(self) -> Iterator["StopSignal"]:
        previous = {signum: signal.signal(signum, self.handle) for signum in STOP_SIGNALS}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


class StopAtStepBoundary:
    """The train loader, unchanged, except that before the first micro-batch of each optimizer step it raises
    `Preempted` when a stop signal arrived on any rank."""

    def __init__(self, loader, fabric, state: dict, accumulation: int, stop: StopSignal) -> None:
        self.loader, self.state = loader, state
        self.accumulation = accumulation
        self.stop = stop
        self.vote = StopVote() if fabric.world_size > 1 else None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            if self.state["iter_num"] % self.accumulation == 0 and self.stop_agreed():
                raise Preempted(self.stop.name)
            try:
                batch = next(batches)
            except StopIteration:
                return
            yield batch

    def stop_agreed(self) -> bool:
        requested = self.stop.received is not None
        return requested if self.vote is None else self.vote.agreed(requested)


class StopVote:
    """Whether any rank asked to stop, agreed by all ranks over a gloo group of their own (host memory only):
    each step boundary reads the vote started at the previous one and starts the next."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.group = dist.new_group(backend="gloo")  # every rank builds it at the same point of the run
        self.ballot = host_buffer((1,), torch.float32)
        self.counting = None

    def agreed(self, requested: bool) -> bool:
        import torch.distributed as dist

        if self.counting is not None:
            self.counting.wait()
            self.counting = None
            if self.ballot.item() > 0:
                return True
        self.ballot.fill_(float(requested))
        self.counting = dist.all_reduce(self.ballot, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return False
