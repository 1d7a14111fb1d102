"""`run_train.py --estimate`: parameters, FLOPs and per-device memory of a run, without allocating the model.

Memory per device:
  weights, gradients, optimizer state  bytes per parameter for the precision (AdamW: two states), divided by
                                       the sharding degree (LitGPT shards with FSDP across the devices of a
                                       node when it trains on more than one)
  activations                          what autograd saves per token, counted from the architecture:
      per layer   8 D + 4 n_head head_size              (norms, residuals, q/k/v, attention output)
                + k (4 F + 3 D) + 2 E                   (routed tokens, fc_1|fc_2 output, SwiGLU, expert out)
      logits      padded_vocab x 4 bytes                (fp32 log-softmax kept by the chunked cross-entropy)
    with activation checkpointing only each block's input (D per layer) is kept, plus one block's
    activations while it is recomputed.
"""

from dataclasses import dataclass

import torch

from litmoe.attention import compute_dtype
from litmoe.flops import active_parameters, total_parameters, training_flops_per_token

GiB = 2**30


def bytes_per_parameter(precision: str) -> tuple[int, int, int]:
    """(weights, gradients, AdamW state) bytes per parameter; Lightning's *-mixed keeps fp32 weights."""
    width = 4 if precision.endswith("-mixed") else torch.finfo(compute_dtype(precision)).bits // 8
    return width, width, 2 * width


@dataclass
class TrainingEstimate:
    total_parameters: int
    active_parameters: int
    flops_per_token: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    activations_checkpointed: float

    def memory(self, checkpointing: bool) -> float:
        activations = self.activations_checkpointed if checkpointing else self.activations
        return self.weights + self.gradients + self.optimizer + activations


def activation_bytes_per_token(config, act_bytes: int, checkpointing: bool) -> float:
    D, F, E, k = config.n_embd, config.moe_intermediate_size, config.n_expert, config.n_expert_per_token
    per_layer = 8 * D + 4 * config.n_head * config.head_size + k * (4 * F + 3 * D) + 2 * E
    logits = config.padded_vocab_size * 4
    if checkpointing:
        return config.n_layer * D * act_bytes + per_layer * act_bytes + logits
    return config.n_layer * per_layer * act_bytes + logits


def estimate_training(
    config, precision: str, micro_batch_size: int, seq_len: int, shard_degree: int = 1
) -> TrainingEstimate:
    from litgpt import GPT

    with torch.device("meta"):
        model = GPT(config)
    total = total_parameters(model)
    weight_bytes, grad_bytes, optimizer_bytes = bytes_per_parameter(precision)
    act_bytes = torch.finfo(compute_dtype(precision)).bits // 8
    tokens = micro_batch_size * seq_len
    return TrainingEstimate(
        total_parameters=total,
        active_parameters=active_parameters(model),
        flops_per_token=training_flops_per_token(model, seq_len),
        weights=total * weight_bytes / shard_degree,
        gradients=total * grad_bytes / shard_degree,
        optimizer=total * optimizer_bytes / shard_degree,
        activations=tokens * activation_bytes_per_token(config, act_bytes, checkpointing=False),
        activations_checkpointed=tokens * activation_bytes_per_token(config, act_bytes, checkpointing=True),
    )


def reference_peak_flops(precision: str) -> tuple[str, float]:
    """The GPU here (Lightning's table), or an H100 SXM for reference."""
    from lightning.fabric.utilities.throughput import get_available_flops

    dtype = compute_dtype(precision)
    if torch.cuda.is_available():
        device = torch.device("cuda", 0)
        peak = get_available_flops(device, dtype)
        if peak:
            return torch.cuda.get_device_name(device), float(peak)
    return "H100 SXM (reference; no GPU here)", 989.5e12 if dtype in (torch.bfloat16, torch.float16) else 494.7e12


def describe(estimate: TrainingEstimate, config, precision: str, checkpointing: bool, devices: int,
             shard_degree: int, max_tokens: float, mfu: float = 0.4) -> str:  # fmt: skip
    gpu, peak = reference_peak_flops(precision)
    tokens_per_sec = mfu * peak * devices / estimate.flops_per_token
    hours = max_tokens / tokens_per_sec / 3600
    shard = f", sharded {shard_degree} ways (FSDP)" if shard_degree > 1 else ""
    output_head = config.padded_vocab_size * config.n_embd
    lines = [
        f"{config.name}: {estimate.total_parameters:,} parameters in total,"
        f" {estimate.active_parameters - output_head:,} active non-embedding parameters per token",
        f"training FLOPs per token: {estimate.flops_per_token / 1e9:.4f} GFLOP",
        f"memory per device ({precision}{shard}):",
        f"  weights          {estimate.weights / GiB:8.2f} GiB",
        f"  gradients        {estimate.gradients / GiB:8.2f} GiB",
        f"  optimizer state  {estimate.optimizer / GiB:8.2f} GiB",
        f"  activations      {estimate.activations / GiB:8.2f} GiB"
        f" ({estimate.activations_checkpointed / GiB:.2f} GiB with activation checkpointing)",
        f"  total            {estimate.memory(checkpointing) / GiB:8.2f} GiB"
        f" ({'with' if checkpointing else 'without'} activation checkpointing)",
        f"speed at {mfu:.0%} MFU on {devices} x {gpu}: {tokens_per_sec:,.0f} tokens/s,"
        f" {hours:.1f} h for {max_tokens:,.0f} tokens",
    ]
    return "\n".join(lines)
