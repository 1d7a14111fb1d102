"""Which Fabric strategy trains on more than one device (LitGPT hard-codes FSDP there).

`--strategy` choices: auto (FSDP on CUDA, DDP on CPU), single (refuses more than one device), ddp, fsdp.
The choice reaches LitGPT through its one construction of a multi-device strategy: `pretrain.FSDPStrategy`
is swapped for `fsdp_stand_in(...)` by the training patches.
"""

from typing import Any, Literal

import torch

from litmoe.errors import UserError

StrategyName = Literal["auto", "single", "ddp", "fsdp"]


def resolve_strategy(name: StrategyName, world_size: int, cuda: bool) -> tuple[StrategyName, str]:
    """(strategy, reason) for `world_size` processes; raises for contradictions, before any work starts."""
    if world_size == 1:
        return "single", "one device"
    if name == "single":
        raise UserError(f"--strategy single trains on one device, but --devices x --num_nodes is {world_size}")
    if name != "auto":
        return name, f"--strategy {name}"
    if cuda:
        return "fsdp", f"{world_size} GPUs: LitGPT's FSDP (hybrid-sharded within each node)"
    return "ddp", f"{world_size} CPU processes: DDP over gloo (FSDP needs CUDA)"


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
