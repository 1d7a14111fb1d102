"""The Fabric that runs a strategy choice, built where LitGPT's pretrain loop builds its own.

LitGPT's `pretrain.setup` constructs one `L.Fabric(strategy=..., ...)`; the training patches swap `pretrain.L`
for a namespace whose `Fabric` is `fabric_builder(choice, ...)`. Every Fabric built here has the collective
timeout, clips by a float64 norm (litmoe.distributed.clipping) except under DeepSpeed, and its single-file saves
go straight into the scratch directory of litmoe.training.saving (no temporary file in $TMPDIR). LitGPT's own
strategy argument (FSDP, hybrid-sharded within a node, for more than one device) is kept when it is the choice,
except with expert parallelism (FSDP2, litmoe.distributed.expert_parallel_fsdp). `rank_watch` makes the launching
process say in one line which rank it launched has died.
"""

import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from litmoe.core.checksums import save_hashed
from litmoe.core.patching import swapped
from litmoe.core.peers import ADVICE, stop_run, this_rank
from litmoe.distributed.clipping import Float64DDPStrategy, Float64SingleDeviceStrategy
from litmoe.distributed.expert_parallel import ExpertParallelism
from litmoe.distributed.plans import StrategyChoice
from litmoe.distributed.strategy import DEEPSPEED_ON_CPU


class DirectCheckpointIO(TorchCheckpointIO):
    """Lightning's single-file save without its temporary file in $TMPDIR (the scratch directory around it is
    what makes the checkpoint appear atomically), hashed as it is written, and a memory-mapped load."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        """Hashed while written (litmoe.core.checksums: the checkpoint's SHA256SUMS needs no second read)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_hashed(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Memory-mapped: the ranks of a node share the file's pages instead of each reading the whole checkpoint
        into its own memory."""
        return torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)


def fabric_builder(
    choice: StrategyChoice, deepspeed_config: dict[str, Any] | None = None, optimizer: str | dict = "AdamW",
    timeout_minutes: int = 30, expert_parallelism: ExpertParallelism | None = None,
) -> Callable[..., Any]:  # fmt: skip
    """Builds the Fabric for `choice` from the arguments LitGPT's `pretrain.setup` passes to `L.Fabric`, with the
    collective timeout, and single-file saves written straight into litmoe.training.saving's scratch directory."""
    import lightning as L

    timeout = timedelta(minutes=timeout_minutes)

    def build(*, strategy: Any, **kwargs: Any) -> L.Fabric:
        if choice.name == "deepspeed":
            from litmoe.distributed.zero import LoopDeepSpeedStrategy, ZeroFabric, optimizer_builder

            on_cpu = os.environ.get(DEEPSPEED_ON_CPU) == "1" and not torch.cuda.is_available()
            deepspeed = LoopDeepSpeedStrategy(config=deepspeed_config, allow_cpu=on_cpu, timeout=timeout)
            return ZeroFabric(
                strategy=deepspeed, build_optimizer=optimizer_builder(optimizer, deepspeed_config), **kwargs
            )
        if choice.name == "ddp":
            options = {"process_group_backend": None if torch.cuda.is_available() else "gloo", "timeout": timeout}
            if expert_parallelism is not None:
                from litmoe.distributed.expert_parallel_ddp import ExpertParallelDDPStrategy

                strategy = ExpertParallelDDPStrategy(expert_parallelism, checkpoint_io=DirectCheckpointIO(), **options)
            else:
                strategy = Float64DDPStrategy(checkpoint_io=DirectCheckpointIO(), **options)
        elif choice.name == "fsdp" and expert_parallelism is not None:
            from litmoe.distributed.expert_parallel_fsdp import ExpertParallelFSDPStrategy

            world_size = kwargs["devices"] * kwargs.get("num_nodes", 1)
            backend = None if torch.cuda.is_available() else "gloo"
            strategy = ExpertParallelFSDPStrategy(
                expert_parallelism, world_size, DirectCheckpointIO(), timeout, process_group_backend=backend
            )
        elif choice.name == "fsdp":  # LitGPT's own FSDPStrategy, which saves its files directly
            strategy._timeout = timeout
        else:
            device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
            strategy = Float64SingleDeviceStrategy(device, checkpoint_io=DirectCheckpointIO())
        return L.Fabric(strategy=strategy, **kwargs)

    return build


@contextmanager
def rank_watch() -> Iterator[None]:
    """Within this scope, the process that launches the other ranks (`run_train.py --devices N`) watches them as
    Lightning does, but when one ends with an error it says which one in one line, kills the others and exits with
    EXIT_PEER_LOST (Lightning's watcher SIGKILLs its own process without a word)."""
    from lightning.fabric.strategies.launchers import subprocess_script

    class RankWatch(subprocess_script._ChildProcessObserver):
        def _terminate_all(self) -> None:
            ended = [(rank, proc) for rank, proc in enumerate(self._child_processes, start=1) if proc.returncode]
            rank, proc = ended[0]
            how = (
                f"signal {signal.Signals(-proc.returncode).name}"
                if proc.returncode < 0
                else f"status {proc.returncode}"
            )
            # exits at once: this thread cannot unwind the main one, which may wait in a collective
            stop_run(f"rank {rank} (pid {proc.pid}) ended with {how}, seen by {this_rank()}; {ADVICE}")

    with swapped(subprocess_script, "_ChildProcessObserver", RankWatch):
        yield
