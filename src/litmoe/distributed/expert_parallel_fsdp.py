"""FSDP2 with the experts split over ranks (`--strategy fsdp --strategy.expert_parallel N`), as torchtitan does.

Hosted by Lightning's `ModelParallelStrategy`, whose `parallelize_fn` is `shard` below:

  experts     each rank builds only its expert group's share (litmoe.distributed.expert_parallel); those are
              sharded once more over the ranks that hold the same experts (`fully_shard` on the replica group),
              whose reduce-scatter sums and then divides by the world size, so every gradient is DDP's average
  dense part  every transformer block, then the rest of the model, sharded over all ranks (`fully_shard`)
  clip norm   each rank's shards of every gradient hold each element once across the world: the squares of the
              local shards summed over all ranks are the squared norm of the whole model
  accumulate  the reduce-scatter runs after every micro-batch, so that gradients stay sharded between them
  save        weights and optimizer moments gathered to every expert under stock keys, the same file the DDP
              strategies write, so a run resumes at any expert-parallel size, under DDP or FSDP
  load        each rank keeps its own shard of its experts and of the dense weights from such a file

Every rank builds the whole model before sharding it (no meta device), so the initial weights are DDP's for the
same seed; a model that does not fit one device before sharding needs ZeRO-3 instead.
"""

from contextlib import nullcontext
from datetime import timedelta
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.strategies import ModelParallelStrategy
from lightning.fabric.strategies.strategy import Strategy, _BackwardSyncControl
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim import Optimizer

from litmoe.distributed.clipping import Float64Clipping, squared_norm
from litmoe.distributed.expert_parallel import (
    ExpertParallelism,
    full_optimizer_state,
    full_state_dict,
    local,
    optimizers_loading,
    sliced_optimizer_state,
    split_experts,
)
from litmoe.model.experts import stacked_from_stock_keys
from litmoe.model.moe import moe_layers


class ExpertParallelFSDPStrategy(Float64Clipping, ModelParallelStrategy):
    def __init__(
        self, parallelism: ExpertParallelism, world_size: int, checkpoint_io: CheckpointIO, timeout: timedelta,
        process_group_backend: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(
            self.shard, data_parallel_size=world_size, tensor_parallel_size=1, save_distributed_checkpoint=False,
            process_group_backend=process_group_backend, timeout=timeout,
        )  # fmt: skip
        self.parallelism = parallelism
        self.file_io = checkpoint_io
        self.split: dict[int, tuple] = {}  # id(expert parameter) -> (its experts, their group), once sharded
        self._backward_sync_control = ReduceEveryMicroBatch()

    @property
    def checkpoint_io(self) -> CheckpointIO:  # ModelParallelStrategy has none (it writes distributed checkpoints)
        return self.file_io

    @checkpoint_io.setter
    def checkpoint_io(self, io: CheckpointIO) -> None:
        self.file_io = io

    def setup_environment(self) -> None:
        super().setup_environment()
        self.parallelism.connect()  # before LitGPT builds the model, whose MoE layers take the groups

    def module_init_context(self, empty_init: bool | None = None):
        """The whole model on every rank's device, initialized as under DDP (on the meta device each shard would be
        initialized on its own); `shard` then keeps each rank's part."""
        return Strategy.module_init_context(self, empty_init)

    def shard(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        from litgpt.model import Block
        from torch.distributed.fsdp import fully_shard

        world = mesh["data_parallel"]
        replicas = DeviceMesh.from_group(self.parallelism.replicas, self.root_device.type)
        for layer in moe_layers(module):
            experts = fully_shard(layer.experts, mesh=replicas)
            experts.set_gradient_divide_factor(self.world_size)
            # A sum, then one division: gloo has no pre-scaled sum (NCCL's PREMUL_SUM). Not for one replica, where
            # torch 2.15's FSDP2 would then divide twice (tests/test_distributed.py checks both cases).
            experts.set_force_sum_reduction_for_comms(replicas.size() > 1)
        for block in module.modules():
            if isinstance(block, Block):
                fully_shard(block, mesh=world)
        fully_shard(module, mesh=world)
        self.split = split_experts(module)  # the sharded parameters replace the module's own
        return module

    def squared_norm_of(self, parameters: list[torch.nn.Parameter]) -> torch.Tensor:
        squares = squared_norm([local(p.grad) for p in parameters], self.root_device)
        dist.all_reduce(squares)
        return squares

    def get_module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        return full_state_dict(module)

    def get_optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        return full_optimizer_state(optimizer, self.split)

    def save_checkpoint(self, path, state: dict, storage_options: Any = None, filter: dict | None = None) -> None:
        Strategy.save_checkpoint(self, path, state, storage_options, filter)  # one file, as DDP writes

    def load_checkpoint(self, path, state=None, strict: bool = True, weights_only: bool | None = None):
        """Loading as DDP does, each parameter and optimizer moment cut to this rank's shard."""
        with optimizers_loading(state, partial(sharded_moments, split=self.split)):
            return Strategy.load_checkpoint(self, path, state, strict, weights_only)

    def load_module_state_dict(self, module: nn.Module, state_dict: dict[str, Any], strict: bool = True) -> None:
        state_dict = stacked_from_stock_keys(module, state_dict)
        parameters = dict(module.named_parameters())
        module.load_state_dict(
            {
                key: shard_like(parameters[key], value) if key in parameters else value
                for key, value in state_dict.items()
            },
            strict=strict,
        )


class ReduceEveryMicroBatch(_BackwardSyncControl):
    """Gradient accumulation that keeps FSDP's reduce-scatter after every micro-batch (as torchtitan does): skipping
    it would keep every rank's whole unsharded gradients between micro-batches, the memory FSDP is there to save."""

    def no_backward_sync(self, module: nn.Module, enabled: bool):
        return nullcontext()


def shard_like(parameter: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A full tensor cut to `parameter`'s shard on this rank (no communication: every rank holds the value)."""
    if not isinstance(parameter, DTensor):
        return value
    value = value.to(device=parameter.device, dtype=parameter.dtype)
    return distribute_tensor(value, parameter.device_mesh, parameter.placements, src_data_rank=None)


def sharded_moments(optimizer: Optimizer, state: dict, split: dict[int, tuple]) -> dict:
    """A full optimizer state dict cut to this rank's experts, and each moment to its parameter's shard."""
    state = sliced_optimizer_state(optimizer, state, split)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    for index, moments in state["state"].items():
        state["state"][index] = {
            key: shard_like(parameters[index], value) if torch.is_tensor(value) and value.dim() > 0 else value
            for key, value in moments.items()
        }
    return state
