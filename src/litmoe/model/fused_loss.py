"""The output head and the cross-entropy in one chunked kernel, so that the logits are never materialised.

At MoE-200M's micro-batch of 8 x 2048 tokens and a 50k vocabulary the logits are 1.6 GB in bf16, and LitGPT's
loss reads them again in fp32: memory-bound work on about a fifth of the model's FLOPs. With
`--optimization.fused_loss true` the GPT's head hands the final hidden states through unchanged
(`HiddenStatesHead`, the same parameter objects, so state-dict keys and optimizer state are unchanged), and the
loss LitGPT's loop computes from "the logits" is Liger Kernel's fused linear cross-entropy of those hidden states
with the head's weight: per chunk of tokens, the logits, their softmax and both gradients, then the next chunk.
"""

from collections.abc import Callable

import torch
import torch.nn as nn

LossKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def fused_loss_blocker(config, device: torch.device, sharded: bool) -> str | None:
    """Why the fused loss cannot run here, or None when it can."""
    if device.type != "cuda":
        return "it needs a CUDA GPU (Liger Kernel's kernels are Triton)"
    if sharded:
        return "FSDP and ZeRO-3 shard the head's weight, and the loss reads it outside the model's forward"
    if config.final_logit_softcapping is not None:
        return f"this model caps its logits (final_logit_softcapping {config.final_logit_softcapping})"
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return "Liger Kernel is not installed (uv sync --extra liger)"
    return None


def liger_kernel() -> LossKernel:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda weight, hidden, targets, bias: loss(weight, hidden, targets, bias=bias)


class HiddenStatesHead(nn.Linear):
    """The head's parameters without its product: the fused loss applies them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FusedLinearCrossEntropy:
    """Stands in for LitGPT's `chunked_cross_entropy(logits, targets)` once `attach` has made the model's head a
    `HiddenStatesHead`: its first argument is then the hidden states, and the head's weight is applied here."""

    def __init__(self, kernel: Callable[[], LossKernel] = liger_kernel) -> None:
        self.make_kernel = kernel
        self.head: HiddenStatesHead | None = None
        self.kernel: LossKernel | None = None

    def attach(self, model: nn.Module) -> None:
        head = model.lm_head
        passthrough = HiddenStatesHead(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
        passthrough.weight, passthrough.bias = head.weight, head.bias  # the same tensors, tied embeddings included
        model.lm_head = passthrough
        self.head, self.kernel = passthrough, self.make_kernel()

    def __call__(self, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int = 0, ignore_index: int = -100):
        if self.head is None or self.kernel is None:
            raise RuntimeError("the fused loss ran before a model was attached to it")
        if ignore_index != -100:
            raise ValueError(f"the fused loss ignores the targets -100, not {ignore_index}")
        flat = hidden.reshape(-1, hidden.size(-1))
        return self.kernel(self.head.weight, flat, targets.reshape(-1), self.head.bias)
