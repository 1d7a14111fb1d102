"""The training loss, compiled as a graph of its own beside the model's (torchtitan compiles its loss the same way).

LitGPT's `chunked_cross_entropy` splits the logits into chunks of 128 rows, so that eager PyTorch never holds an
fp32 copy of them all. At a micro-batch of 8 x 2048 tokens that is 128 chunks: about 400 forward and 520 backward
ops dispatched one by one from Python at every micro-batch, each a small kernel, while the GPU waits for the host.
Compiled, the loss is one graph: the upcast, the log-softmax and the gather fuse into a few kernels that read the
logits (bf16 under autocast: the head runs in bf16) once, and backward recomputes the softmax instead of storing
it, so chunking buys nothing there. With `--compile`, pretraining and validation compute it this way; without,
LitGPT's chunked loss stays.
"""

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 128, ignore_index: int = -100):
    """What LitGPT's `chunked_cross_entropy(logits, targets)` computes (the mean over the targets that are not
    `ignore_index`), in one piece; `chunk_size` is accepted and has no use here."""
    logits = logits.reshape(-1, logits.size(-1))
    return F.cross_entropy(logits.float(), targets.reshape(-1), ignore_index=ignore_index)


def compiled_loss(compile_fn: Callable, stock_loss: Callable, **how: Any) -> Callable:
    """LitGPT's loss call, compiled by `compile_fn` (torch.compile) with the model's options `how`. LitGPT's
    fine-tuning passes the logits as a list of chunks; those keep `stock_loss`."""
    compiled = compile_fn(cross_entropy, **how)

    def loss(logits, targets: torch.Tensor, chunk_size: int = 128, ignore_index: int = -100) -> torch.Tensor:
        if isinstance(logits, list):
            return stock_loss(logits, targets, chunk_size=chunk_size, ignore_index=ignore_index)
        return compiled(logits, targets, ignore_index=ignore_index)

    return loss
