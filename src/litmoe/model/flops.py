"""FLOPs a training step really does, counted from the model's parameters (no tracing).

LitGPT measures FLOPs by running the model on the meta device, which fails for LLaMAMoE (data-dependent
`torch.nonzero` has no meta kernel) and, when forced to run, counts every expert as seeing every token.
Here only the experts a token is routed to count:

    training FLOPs per token = 6 * active parameters          (matmuls: forward 2, backward 4 per weight)
                             + 12 * n_layer * n_embd * seq_len (attention scores and weighted values)

Active parameters are all parameters except the input embedding (a lookup), with the routed experts'
weights scaled by n_expert_per_token / n_expert. The lm_head is counted; with tied embeddings its weight
is the embedding's, so it is counted once.
"""

import torch
import torch.nn as nn

ROUTED_EXPERTS = ".mlp.experts."
EMBEDDING = "transformer.wte."


def active_parameters(model: nn.Module) -> int:
    """Parameters one token goes through in a forward pass (embedding lookup excluded)."""
    config = model.config
    routed_share = config.n_expert_per_token / config.n_expert if config.n_expert else 1.0
    active = 0.0
    # remove_duplicate=False: with tied embeddings the shared weight still shows up once as lm_head.weight
    for name, param in model.named_parameters(remove_duplicate=False):
        if name.startswith(EMBEDDING):
            continue
        active += param.numel() * (routed_share if ROUTED_EXPERTS in name else 1.0)
    return round(active)


def total_parameters(model: nn.Module) -> int:
    return sum(param.numel() for param in model.parameters())


def attention_flops_per_token(n_layer: int, n_embd: int, seq_len: int) -> int:
    """Forward + backward FLOPs of QK^T and AV per token (full, non-causal count, as in PaLM's MFU)."""
    return 12 * n_layer * n_embd * seq_len


def training_flops_per_token(model: nn.Module, seq_len: int) -> int:
    config = model.config
    return 6 * active_parameters(model) + attention_flops_per_token(config.n_layer, config.n_embd, seq_len)


class TrainingFlops:
    """A drop-in for `lightning.fabric.utilities.throughput.measure_flops` as LitGPT's pretrain loop calls it.

    LitGPT asks for the FLOPs of one forward+backward of a micro-batch on a meta-device copy of the model.
    We answer from the parameter count, for the micro-batch size and sequence length the run really uses
    (LitGPT's meta input always has block_size tokens, even when train.max_seq_length is shorter).
    """

    def __init__(self, micro_batch_size: int, seq_len: int) -> None:
        self.micro_batch_size = micro_batch_size
        self.seq_len = seq_len
        self.per_micro_batch = 0  # the last answer, for the run summary

    def __call__(self, model: nn.Module, forward_fn=None, loss_fn=None) -> int:
        tokens = self.micro_batch_size * self.seq_len
        self.per_micro_batch = training_flops_per_token(model, self.seq_len) * tokens
        return self.per_micro_batch


# Dense (not sparsity) tensor-core peaks Lightning's table lacks: it knows an H200 only by the names "H200 SXM1"
# and "H200 NVL1", which CUDA does not report ("NVIDIA H200"), and lists it with the 2:4-sparsity figures.
# Source: NVIDIA's H200 datasheet (SXM: 989 TFLOP/s bf16/fp16 dense, 495 tf32, 67 fp32; NVL: 835, 418, 60).
HOPPER_H200 = {
    "sxm": {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, "tfloat32": 494.7e12, torch.float32: 66.9e12},
    "nvl": {torch.bfloat16: 835.5e12, torch.float16: 835.5e12, "tfloat32": 417.8e12, torch.float32: 60.0e12},
}


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The GPU's dense peak FLOP/s in `dtype` (fp32 counts as TF32 when matmuls may use it), or None if unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    if "h200" in name:
        table = HOPPER_H200["nvl" if "nvl" in name else "sxm"]
        tf32 = dtype is torch.float32 and torch.get_float32_matmul_precision() != "highest"
        return table["tfloat32" if tf32 else dtype] if (tf32 or dtype in table) else None
    from lightning.fabric.utilities.throughput import get_available_flops

    peak = get_available_flops(device, dtype)
    return float(peak) if peak else None
