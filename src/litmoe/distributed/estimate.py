"""`run_train.py --estimate`: parameters, FLOPs and per-device memory of a run, without allocating the model.

Memory per device:
  weights, gradients, optimizer state  bytes per parameter for the precision (AdamW: two states; DeepSpeed's
                                       16-bit training keeps an fp32 master copy with them, 2 + 2 + 12 bytes
                                       as in the ZeRO paper), divided by the ranks that share them:
                                         FSDP (LitGPT: hybrid, within a node)   all three across a node's GPUs
                                         ZeRO-1 / ZeRO-2 / ZeRO-3               optimizer / + gradients / + weights
                                       across all ranks; offloaded parts live in CPU memory or on NVMe instead
  gathered weights                     ZeRO-3 and FSDP gather one block at a time and prefetch the next
  activations                          what autograd saves per token, counted from the architecture:
      per layer   8 D + 4 n_head head_size              (norms, residuals, q/k/v, attention output)
                + k (4 F + 3 D) + 2 E                   (routed tokens, fc_1|fc_2 output, SwiGLU, expert out)
      logits      padded_vocab x 4 bytes                (fp32 log-softmax kept by the chunked cross-entropy)
    with activation checkpointing only each block's input (D per layer) is kept, plus one block's
    activations while it is recomputed.
"""

import os
import resource
from dataclasses import dataclass, field
from pathlib import Path

import torch

from litmoe.distributed.plans import StrategyChoice
from litmoe.model.attention import compute_dtype
from litmoe.model.experts import expert_size, looped_experts_reason
from litmoe.model.flops import (
    ROUTED_EXPERTS,
    active_parameters,
    device_peak_flops,
    total_parameters,
    training_flops_per_token,
)

GiB = 2**30


def element_bytes(precision: str) -> int:
    """Bytes of one activation value under `precision` (bf16-mixed computes in 2)."""
    return torch.finfo(compute_dtype(precision)).bits // 8


def bytes_per_parameter(precision: str, deepspeed: bool = False) -> tuple[int, int, int]:
    """(weights, gradients, AdamW state) bytes per parameter.

    Lightning's *-mixed keeps fp32 weights and gradients. DeepSpeed's 16-bit training keeps 16-bit weights and
    gradients and puts an fp32 master copy next to the two AdamW states (4 + 4 + 4)."""
    width = element_bytes(precision)
    if deepspeed:
        return (2, 2, 12) if width == 2 else (4, 4, 8)
    if precision.endswith("-mixed"):
        width = 4
    return width, width, 2 * width


@dataclass
class TrainingEstimate:
    """What a run needs before it is placed on devices."""

    total_parameters: int
    active_parameters: int
    block_parameters: int
    flops_per_token: int
    activations: float  # bytes per micro-batch
    activations_checkpointed: float
    expert_parameters: int = 0  # of the routed experts, all layers
    micro_batch_tokens: int = 0
    layers: int = field(kw_only=True)  # transformer blocks: one block holds expert_parameters / layers


@dataclass
class DeviceMemory:
    """One rank's bytes on its device, and what it keeps offloaded."""

    weights: float
    gradients: float
    optimizer: float
    gathered: float
    activations: float
    cpu_offload: float = 0.0
    nvme_offload: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.gathered + self.activations


def activation_bytes_per_token(config, act_bytes: int, checkpointing: bool) -> float:
    D, F, E, k = config.n_embd, expert_size(config), config.n_expert, config.n_expert_per_token
    per_layer = 8 * D + 4 * config.n_head * config.head_size + k * (4 * F + 3 * D) + 2 * E
    logits = config.padded_vocab_size * 4
    if checkpointing:
        return config.n_layer * D * act_bytes + per_layer * act_bytes + logits
    return config.n_layer * per_layer * act_bytes + logits


def estimate_training(config, precision: str, micro_batch_size: int, seq_len: int) -> TrainingEstimate:
    from litgpt import GPT

    with torch.device("meta"):
        model = GPT(config)
    act_bytes = element_bytes(precision)
    tokens = micro_batch_size * seq_len
    return TrainingEstimate(
        total_parameters=total_parameters(model),
        active_parameters=active_parameters(model),
        block_parameters=total_parameters(model.transformer.h[0]),
        flops_per_token=training_flops_per_token(model, seq_len),
        activations=tokens * activation_bytes_per_token(config, act_bytes, checkpointing=False),
        activations_checkpointed=tokens * activation_bytes_per_token(config, act_bytes, checkpointing=True),
        expert_parameters=sum(p.numel() for name, p in model.named_parameters() if ROUTED_EXPERTS in name),
        micro_batch_tokens=tokens,
        layers=config.n_layer,
    )


def all_to_all_bytes(config, estimate: TrainingEstimate, precision: str, expert_parallel: int) -> float:
    """Bytes one rank sends per micro-batch under expert parallelism: each token's k routed rows of n_embd values
    go to their expert's rank and back, in the forward and again (as gradients) in the backward, in every MoE
    layer; with uniform routing (EP - 1) / EP of them leave the rank."""
    act_bytes = element_bytes(precision)
    rows = estimate.micro_batch_tokens * config.n_expert_per_token
    return 4 * config.n_layer * rows * config.n_embd * act_bytes * (expert_parallel - 1) / expert_parallel


def fsdp_gathered_bytes(estimate: TrainingEstimate, precision: str, world_size: int, expert_parallel: int) -> float:
    """Bytes one rank receives per micro-batch under FSDP with expert parallelism: the dense weights from all
    ranks and its own experts from their replicas, for the forward and again for the backward, less its shard."""
    weight = bytes_per_parameter(precision)[0]
    replicas = world_size // expert_parallel
    dense = estimate.total_parameters - estimate.expert_parameters
    own_experts = estimate.expert_parameters / expert_parallel
    return 2 * weight * (dense * (world_size - 1) / world_size + own_experts * (replicas - 1) / replicas)


def zero3_gathered_bytes(estimate: TrainingEstimate, precision: str, ranks: int) -> float:
    """Bytes one rank receives per micro-batch under ZeRO-3: every weight, gathered for the forward and again for
    the backward, less its own shard."""
    weight = bytes_per_parameter(precision, deepspeed=True)[0]
    return 2 * estimate.total_parameters * weight * (ranks - 1) / ranks


def per_device_memory(
    estimate: TrainingEstimate, precision: str, choice: StrategyChoice, world_size: int = 1,
    devices_per_node: int = 1, checkpointing: bool = False,
) -> DeviceMemory:  # fmt: skip
    """One rank's memory under a strategy (see the module docstring for what is sharded where)."""
    weight, gradient, state = bytes_per_parameter(precision, deepspeed=choice.name == "deepspeed")
    stage = 3 if choice.name == "fsdp" else choice.zero_stage or 0
    others = estimate.expert_parameters * (1 - 1 / choice.expert_parallel)  # experts other ranks hold
    if choice.shards_experts:  # 1 / world of the dense part, and of the rank's own experts 1 / their replicas
        held, ranks = estimate.total_parameters, world_size
        block = estimate.block_parameters - others / estimate.layers  # gathered: a block's dense part, own experts
    else:
        held = estimate.total_parameters - others
        ranks = {"fsdp": devices_per_node, "deepspeed": world_size}.get(choice.name, 1)
        block = estimate.block_parameters

    def sharded(nbytes: float, from_stage: int) -> float:
        return held * nbytes / (ranks if stage >= from_stage else 1)

    parts = {"weights": sharded(weight, 3), "gradients": sharded(gradient, 2), "optimizer": sharded(state, 1)}
    offloaded = {"none": 0.0, "cpu": 0.0, "nvme": 0.0}
    for part, device in (("optimizer", choice.offload_optimizer), ("weights", choice.offload_params)):
        if device != "none":
            offloaded[device] += parts[part]
            parts[part] = 0.0
    gathers = stage >= 3 and (ranks > 1 or choice.offload_params != "none")
    return DeviceMemory(
        **parts,
        gathered=2 * block * weight if gathers else 0.0,
        activations=estimate.activations_checkpointed if checkpointing else estimate.activations,
        cpu_offload=offloaded["cpu"],
        nvme_offload=offloaded["nvme"],
    )


def resident_bytes() -> int:
    """This process's resident memory now (Linux), else its peak so far."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s" if seconds >= 1 else "under a second"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    days = seconds / 86400
    return f"{days:.0f} days" if days < 730 else f"{days / 365.25:.3g} years"


def token_count(tokens: float) -> str:
    """A token budget as people write it: 200,000,000; 1.2e+15 when the digits stop meaning anything."""
    return f"{tokens:,.0f}" if tokens < 1e15 else f"{tokens:.3g}"


def reference_peak_flops(precision: str) -> tuple[str, float]:
    """The GPU here, or an H100 SXM for reference."""
    dtype = compute_dtype(precision)
    if torch.cuda.is_available():
        device = torch.device("cuda", 0)
        peak = device_peak_flops(device, dtype)
        if peak:
            return torch.cuda.get_device_name(device), peak
    return "H100 SXM (reference; no GPU here)", 989.5e12 if dtype in (torch.bfloat16, torch.float16) else 494.7e12


def expert_parallel_traffic(
    estimate: TrainingEstimate, config, precision: str, choice: StrategyChoice, world_size: int
) -> str:
    """What expert parallelism moves per micro-batch, against ZeRO-3 without it, and its worst case."""
    split = choice.expert_parallel
    sent = all_to_all_bytes(config, estimate, precision, split)
    zero3 = zero3_gathered_bytes(estimate, precision, world_size)
    fsdp = ""
    if choice.shards_experts:
        gathered = fsdp_gathered_bytes(estimate, precision, world_size, split)
        fsdp = f" and FSDP gathers {gathered / GiB:.3f} GiB of weights (the dense part and its own experts)"
    worst = estimate.micro_batch_tokens * config.n_expert_per_token * split * config.n_embd * element_bytes(precision)
    return (
        f"expert parallel {split}: each rank holds {config.n_expert // split} of {config.n_expert} experts and sends"
        f" {sent / GiB:.3f} GiB per micro-batch by all-to-all (uniform routing){fsdp}; ZeRO-3 over {world_size} ranks"
        f" would gather {zero3 / GiB:.3f} GiB per micro-batch instead. Dropless: a skewed router can send one rank up"
        f" to {split}x its share of rows, at worst {worst / GiB:.3f} GiB received per layer"
    )


def describe(
    estimate: TrainingEstimate, config, precision: str, choice: StrategyChoice, memory: DeviceMemory,
    checkpointing: bool, world_size: int, devices_per_node: int, max_tokens: float | None, mfu: float = 0.4,
) -> str:  # fmt: skip
    gpu, peak = reference_peak_flops(precision)
    tokens_per_sec = mfu * peak * world_size / estimate.flops_per_token
    output_head = config.padded_vocab_size * config.n_embd
    other = estimate.activations if checkpointing else estimate.activations_checkpointed
    lines = [
        f"{config.name}: {estimate.total_parameters:,} parameters in total,"
        f" {estimate.active_parameters - output_head:,} active non-embedding parameters per token",
        f"training FLOPs per token: {estimate.flops_per_token / 1e9:.4f} GFLOP",
        *([f"experts: {reason}"] if (reason := looped_experts_reason(config, precision)) else []),
        f"strategy: {choice.label(world_size, devices_per_node)} ({choice.reason})",
        f"training state per device ({precision}, micro-batch activations"
        f" {'with' if checkpointing else 'without'} activation checkpointing):",
        f"  weights          {memory.weights / GiB:8.2f} GiB",
        f"  gradients        {memory.gradients / GiB:8.2f} GiB",
        f"  optimizer state  {memory.optimizer / GiB:8.2f} GiB",
    ]
    if memory.gathered:
        lines.append(f"  gathered blocks  {memory.gathered / GiB:8.2f} GiB")
    lines += [
        f"  activations      {memory.activations / GiB:8.2f} GiB"
        f" ({other / GiB:.2f} GiB {'without' if checkpointing else 'with'} activation checkpointing)",
        f"  total            {memory.total / GiB:8.2f} GiB",
    ]
    lines.append(
        f"  not counted: the runtime. This process holds {resident_bytes() / GiB:.2f} GiB before any training"
        " (Python, PyTorch, LitGPT); a run adds allocator caches and data-loader buffers, and each GPU a CUDA"
        " context of about 0.5-1 GiB"
    )
    for where, nbytes in (("CPU memory", memory.cpu_offload), ("NVMe", memory.nvme_offload)):
        if nbytes:
            lines.append(f"  offloaded to {where}: {nbytes / GiB:.2f} GiB per rank,"
                         f" {nbytes * devices_per_node / GiB:.2f} GiB per node")  # fmt: skip
    if choice.expert_parallel > 1:
        lines.append(expert_parallel_traffic(estimate, config, precision, choice, world_size))
    budget = f", {duration(max_tokens / tokens_per_sec)} for {token_count(max_tokens)} tokens" if max_tokens else ""
    if torch.cuda.is_available():
        lines.append(f"speed at {mfu:.0%} MFU on {world_size} x {gpu}: {tokens_per_sec:,.0f} tokens/s{budget}")
    else:  # a planning figure for a GPU machine, not this machine's speed
        lines.append(
            f"no GPU here: for planning, {world_size} x H100 SXM at {mfu:.0%} MFU would train this model at"
            f" {tokens_per_sec:,.0f} tokens/s{budget} (this machine's own speed is printed at the end of a run)"
        )
    return "\n".join(lines)
