"""Gradient clipping by the whole model's norm, taken in float64 in every plan.

The norm sets each step's clip coefficient. Summed in float32, tensor by tensor or shard by shard, it differs
between plans in its sixth digit (PyTorch's float32 vector norm on the CPU loses ~2e-5 relative on a million
elements), and a coefficient 1e-5 off flips a routing choice some steps later: FSDP with the experts split parted
from DDP by 7.7e-4 in 20 steps of MoE-tiny once clipping bit. Accumulated in float64, every plan's norm is the
single-device norm to the precision of the gradients themselves, for one float64 reduction of the squares a step:

  single device, DDP    the gradients this process holds (after DDP's all-reduce, the same on every rank)
  DDP, experts split    the dense part's squares, plus the experts' squares summed over the expert group
  FSDP, experts split   each rank's shards hold every element once: their squares summed over all ranks

DeepSpeed clips inside its engine, with its own float32 norm (litmoe.distributed.zero).
"""

from typing import Any

import torch
from lightning.fabric.strategies import DDPStrategy, SingleDeviceStrategy
from torch.optim import Optimizer

from litmoe.distributed.expert_parallel import local


def squared_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The sum of the squares of `grads`, accumulated in float64."""
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64)).square().sum()


def clip_to_norm(grads: list[torch.Tensor], max_norm: float, norm: torch.Tensor, error_if_nonfinite: bool) -> None:
    """Scale `grads` (those this rank holds) so that the whole model's gradient norm `norm` is at most `max_norm`,
    as `torch.nn.utils.clip_grad_norm_` does for a model held by one process."""
    if error_if_nonfinite and not torch.isfinite(norm):
        raise RuntimeError(f"the total norm of the gradients is {norm.item()}")
    if grads:
        torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0).to(grads[0].dtype))


class Float64Clipping:
    """A Lightning strategy's `clip_gradients_norm` with the norm in float64; `squared_norm_of` says how a plan
    adds up the squares of the gradients its ranks hold."""

    def clip_gradients_norm(
        self, module: Any, optimizer: Optimizer, max_norm: float, norm_type: float = 2.0,
        error_if_nonfinite: bool = True,
    ) -> torch.Tensor:  # fmt: skip
        if norm_type != 2.0:
            raise ValueError(f"litmoe clips by the 2-norm of the gradients, not the {norm_type}-norm")
        self.precision.unscale_gradients(optimizer)
        parameters = [p for p in self.precision.main_params(optimizer) if p.grad is not None]
        norm = self.squared_norm_of(parameters).sqrt()
        clip_to_norm([local(p.grad) for p in parameters], max_norm, norm, error_if_nonfinite)
        return norm

    def squared_norm_of(self, parameters: list[torch.nn.Parameter]) -> torch.Tensor:
        return squared_norm([p.grad for p in parameters], self.root_device)


class Float64SingleDeviceStrategy(Float64Clipping, SingleDeviceStrategy):
    pass


class Float64DDPStrategy(Float64Clipping, DDPStrategy):
    pass
