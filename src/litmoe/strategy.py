"""Which Fabric strategy trains on more than one device (LitGPT hard-codes FSDP there).

`--strategy` choices: auto (DDP while a full replica fits in a GPU, else FSDP; DDP on CPU), single (refuses
more than one device), ddp, fsdp.
The choice reaches LitGPT through its one construction of a multi-device strategy: `pretrain.FSDPStrategy`
is swapped for `fsdp_stand_in(...)` by the training patches.
"""

from typing import Any, Literal

import torch

from litmoe.errors import UserError

StrategyName = Literal["auto", "single", "ddp", "fsdp"]


def resolve_strategy(
    name: StrategyName, world_size: int, gpu_memory: float | None = None, needed_unsharded: float | None = None
) -> tuple[StrategyName, str]:
    """(strategy, reason) for `world_size` processes; raises for contradictions, before any work starts.

    `gpu_memory` is one GPU's memory in bytes (None: no GPU); `needed_unsharded` what one rank needs without
    sharding (weights, gradients, optimizer state, activations). `auto` replicates (DDP) while that fits in
    90% of a GPU, and shards (FSDP) when it does not.
    """
    if world_size == 1:
        return "single", "one device"
    if name == "single":
        raise UserError(f"--strategy single trains on one device, but --devices x --num_nodes is {world_size}")
    if name != "auto":
        return name, f"--strategy {name}"
    if gpu_memory is None:
        return "ddp", f"{world_size} CPU processes: DDP over gloo (FSDP needs CUDA)"
    need, have = f"{needed_unsharded / 2**30:.1f} GiB", f"{gpu_memory / 2**30:.0f} GiB"
    if needed_unsharded is not None and needed_unsharded <= 0.9 * gpu_memory:
        return "ddp", f"{world_size} GPUs; a full replica ({need}) fits in each GPU's {have}: DDP"
    return "fsdp", f"{world_size} GPUs; a full replica ({need}) does not fit in {have}: FSDP sharding"


def fsdp_stand_in(name: StrategyName, stock_fsdp: type) -> type:
    """A stand-in for the name `FSDPStrategy` inside litgpt.pretrain.

    Calling it, as LitGPT does for more than one device, builds the chosen strategy. `isinstance(x, it)`, as
    LitGPT's weight initialisation asks, still means "x is an FSDPStrategy".
    """
    from lightning.fabric.strategies import DDPStrategy

    class ChosenStrategy(type):
        def __call__(cls, **fsdp_kwargs: Any):
            if name == "ddp":
                return DDPStrategy(process_group_backend=None if torch.cuda.is_available() else "gloo")
            return stock_fsdp(**fsdp_kwargs)

        def __instancecheck__(cls, instance: Any) -> bool:
            return isinstance(instance, stock_fsdp)

    return ChosenStrategy("FSDPStrategy", (), {})
