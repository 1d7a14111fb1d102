"""Lightning's DDP with the experts split over ranks (`--strategy ddp --strategy.expert_parallel N`).

The dense weights stay with DDP: replicated, their gradients averaged by its bucketed all-reduce. The experts'
weights are left out of DDP (each rank holds other experts) and handled here, once per optimizer step:

  gradients  summed over the ranks that hold the same experts, divided by the world size
             (litmoe.distributed.expert_parallel), before clipping and the optimizer step
  clip norm  the norm of all gradients of the model: the dense part (equal on every rank) plus the experts' part
             summed over the expert group, as one process holding everything would compute it
  save       weights and optimizer moments gathered to every expert under stock keys: the checkpoint is what a
             run without expert parallelism writes, so it resumes at any expert-parallel size or none
  load       each rank keeps its experts' weights and moments from such a checkpoint
"""

from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from litmoe.distributed.clipping import Float64DDPStrategy, squared_norm
from litmoe.distributed.expert_parallel import (
    ExpertParallelism,
    full_optimizer_state,
    full_state_dict,
    optimizers_loading,
    reduce_expert_gradients,
    sliced_optimizer_state,
    split_experts,
)


class ExpertParallelDDPStrategy(Float64DDPStrategy):
    def __init__(self, parallelism: ExpertParallelism, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.parallelism = parallelism
        self.split: dict[int, tuple] = {}  # id(expert parameter) -> (its experts, their group)
        self.expert_parameters: list[torch.nn.Parameter] = []
        self.reduced = False  # whether this optimizer step's expert gradients are reduced already

    def setup_environment(self) -> None:
        super().setup_environment()
        self.parallelism.connect()  # before LitGPT builds the model, whose MoE layers take the groups

    def setup_module(self, module: torch.nn.Module):
        self.split = split_experts(module)
        self.expert_parameters = [parameter for parameter in module.parameters() if id(parameter) in self.split]
        module._ddp_params_and_buffers_to_ignore = [
            name for name, parameter in module.named_parameters() if id(parameter) in self.split
        ]
        return super().setup_module(module)

    def reduce_expert_gradients(self) -> None:
        if not self.reduced:
            reduce_expert_gradients(self.expert_parameters, self.parallelism.replicas, self.world_size)
            self.reduced = True

    def clip_gradients_norm(self, module, optimizer: Optimizer, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.reduce_expert_gradients()
        return super().clip_gradients_norm(module, optimizer, *args, **kwargs)

    def squared_norm_of(self, parameters: list[torch.nn.Parameter]) -> torch.Tensor:
        experts = squared_norm([p.grad for p in parameters if id(p) in self.split], self.root_device)
        dist.all_reduce(experts, group=self.parallelism.group.group)
        return experts + squared_norm([p.grad for p in parameters if id(p) not in self.split], self.root_device)

    def optimizer_step(self, optimizer, **kwargs: Any) -> Any:
        self.reduce_expert_gradients()
        self.reduced = False
        return super().optimizer_step(optimizer, **kwargs)

    def get_module_state_dict(self, module: torch.nn.Module) -> dict[str, Any]:
        return full_state_dict(module.module if isinstance(module, DistributedDataParallel) else module)

    def get_optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        return full_optimizer_state(optimizer, self.split)

    def load_checkpoint(self, path, state=None, strict: bool = True, weights_only: bool | None = None):
        """Loading as DDP does, each optimizer taking its experts' share of the full moments."""
        with optimizers_loading(state, partial(sliced_optimizer_state, split=self.split)):
            return super().load_checkpoint(path, state, strict, weights_only)
