"""The output head and the cross-entropy together, a chunk of tokens at a time, so that the logits never exist whole.

At MoE-200M's micro-batch of 8 x 2048 tokens and a 50k vocabulary the logits are 1.6 GB in bf16 and their fp32
softmax 3.3 GB. With `--optimization.fused_loss true` the GPT's head hands the final hidden states through
unchanged (`HiddenStatesHead`: the same parameter objects, so state-dict keys and optimizer state are unchanged),
and the loss LitGPT's loop computes from "the logits" is `FusedLinearCrossEntropy` of those hidden states with the
head's weight. Its forward goes through `CHUNK_ROWS` tokens at a time: their logits in the compute dtype (bf16
under autocast, as the head would have run), the log-sum-exp in fp32, and already the gradients of the hidden
states and of the head (softmax minus one-hot), which backward only scales by the incoming gradient. Peak memory
is one chunk's logits instead of all of them. Nothing is read by the host: the count of scored targets stays a
device tensor. (Liger Kernel's version, used before, read two numbers per micro-batch and ran the head in TF32.)
"""

import torch
import torch.nn as nn

from litmoe.model.attention import autocast_dtype

CHUNK_ROWS = 2048  # at a 50k vocabulary: 0.4 GB of fp32 logits per chunk


def fused_loss_blocker(config, sharded: bool) -> str | None:
    """Why the fused loss cannot run here, or None when it can."""
    if sharded:
        return "FSDP and ZeRO-3 shard the head's weight, and the loss reads it outside the model's forward"
    if config.final_logit_softcapping is not None:
        return f"this model caps its logits (final_logit_softcapping {config.final_logit_softcapping})"
    return None


class LinearCrossEntropy(torch.autograd.Function):
    """The mean cross-entropy of `hidden @ weight.T + bias` against `targets` (those equal to `ignore_index` left
    out), computed and differentiated chunk by chunk in forward (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
        scored = targets != ignore_index
        count = scored.sum().clamp_min(1).float()
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if b is not None else None
        for start in range(0, hidden.shape[0], CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            h, target, keep = hidden[rows].to(dtype), targets[rows].clamp_min(0).unsqueeze(1), scored[rows]
            logits = (h @ w.t() if b is None else torch.addmm(b, h, w.t())).float()
            log_sum_exp = logits.logsumexp(dim=-1)
            loss += ((log_sum_exp - logits.gather(1, target).squeeze(1)) * keep).sum()
            # d(loss)/d(logits): softmax minus one-hot, for the scored rows, over the count
            grad = (logits - log_sum_exp.unsqueeze(1)).exp_().scatter_add_(1, target, -torch.ones_like(logits[:, :1]))
            grad = (grad * (keep.unsqueeze(1) / count)).to(dtype)
            grad_hidden[rows] = grad @ w
            grad_weight += (grad.t() @ h).float()
            if grad_bias is not None:
                grad_bias += grad.float().sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.hidden_dtype = hidden.dtype
        return loss / count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        grad_hidden = (grad_hidden * grad_output).to(ctx.hidden_dtype)
        grad_bias = grad_bias * grad_output if grad_bias is not None else None
        return grad_hidden, grad_weight * grad_output, grad_bias, None, None, None


class HiddenStatesHead(nn.Linear):
    """The head's parameters without its product: the fused loss applies them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FusedLinearCrossEntropy:
    """Stands in for LitGPT's `chunked_cross_entropy(logits, targets)` once `attach` has made the model's head a
    `HiddenStatesHead`: its first argument is then the hidden states, and the head's weight is applied here."""

    def __init__(self) -> None:
        self.head: HiddenStatesHead | None = None

    def attach(self, model: nn.Module) -> None:
        head = model.lm_head
        passthrough = HiddenStatesHead(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
        passthrough.weight, passthrough.bias = head.weight, head.bias  # the same tensors, tied embeddings included
        model.lm_head = passthrough
        self.head = passthrough

    def __call__(self, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int = 0, ignore_index: int = -100):
        if self.head is None:
            raise RuntimeError("the fused loss ran before a model was attached to it")
        flat, head = hidden.reshape(-1, hidden.size(-1)), self.head
        return LinearCrossEntropy.apply(
            flat, head.weight, head.bias, targets.reshape(-1), ignore_index, autocast_dtype(flat)
        )
