"""Training under CUDA graphs (`--compile-mode reduce-overhead` or `max-autotune`), with gradient accumulation.

A CUDA-graph replay writes its outputs into the same memory every time, and torch.compile must be told where each
training step begins; these two pieces make LitGPT's loop fit that.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from litmoe.core.patching import swapped


class CudaGraphSteps:
    """The train loader, marking each micro-batch as a new step of the compiled graphs' CUDA-graph replays
    (compile modes reduce-overhead and max-autotune), as torch.compile asks for training loops."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            torch.compiler.cudagraph_mark_step_begin()
            yield batch


@contextmanager
def gradients_outside_graph_outputs(state: dict) -> Iterator[None]:
    """A CUDA-graph replay writes its outputs into the same memory every time. The first backward of a step would
    hand its gradient outputs to `.grad` as they are, and the next micro-batch's replay would overwrite them before
    they are accumulated into. So every gradient is allocated before the first step and zeroed in place, never
    freed (`zero_grad(set_to_none=False)`, whatever the caller asks): each backward then adds into it."""
    optimizer = state["optimizer"]
    for parameter in state["model"].parameters():
        if parameter.requires_grad and parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    zero_grad = optimizer.zero_grad
    with swapped(optimizer, "zero_grad", lambda *args, **kwargs: zero_grad(set_to_none=False)):
        yield
