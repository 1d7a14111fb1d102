"""Settings of ours that LitGPT's pretrain arguments do not have (`optimization:`, `moe:`, `strategy:`)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from litmoe.core.errors import UserError

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the torch.compile modes that replay CUDA graphs


@dataclass
class OptimizationArgs:
    """How the model is compiled and run; each switch is independent."""

    compile: bool = True
    """Compile the model with torch.compile (LitGPT always compiles; here it is a choice)."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile mode. reduce-overhead and max-autotune use CUDA graphs (if that fails with a CUDAGraphs error,
    use max-autotune-no-cudagraphs or default)."""
    compile_dynamic: bool = False
    """Compile for dynamic shapes (pretraining batches all have the same shape, so static is faster)."""
    compile_fullgraph: bool = False
    """Compile the whole model as one graph and fail at the first graph break, instead of running that part eagerly
    (litmoe's MoE layer has none; a break elsewhere then shows up at once)."""
    compile_scope: Literal["model", "blocks"] = "model"
    """model: one compiled graph for the whole GPT; blocks: each transformer block compiled on its own, as torchtitan
    does (the blocks share one graph, compiled once; embedding, final norm and loss run eagerly)."""
    fused_loss: bool = False
    """Compute the output head and cross-entropy together, 2048 tokens at a time, never materialising all the logits
    (litmoe.model.fused_loss; less memory with large vocabularies; not with FSDP or ZeRO-3)."""
    running_loss_nan_check: bool = False
    """LitGPT's running loss checks every micro-batch's loss for NaN and drops it: two host-device syncs per
    micro-batch (the GPU idles while the host catches up) and a NaN hidden from the log. Off: the loss is averaged
    on the GPU as it is, and a NaN reaches the logged loss, where the health check acts on it."""
    flash_attention: bool = True
    """Check at start that attention runs on the FlashAttention kernel; warn, with the reason, when it cannot."""
    flash_attention_force: bool = False
    """Refuse to start without FlashAttention, and pin attention to it so it cannot silently fall back."""
    gradient_checkpointing: bool = False
    """Recompute each transformer block's activations in backward (non-reentrant): less memory, ~30% more compute."""
    keep_host_memory: bool = True
    """On the CPU: keep freed memory in the process for the next step instead of returning it to the OS, which
    costs a page fault per 4 KiB on every reuse (litmoe.training.host_memory; glibc only)."""


@dataclass
class MoEArgs:
    """Which MoE layer trains, and how experts are kept in balance (the `moe:` section)."""

    layer: Literal["litmoe", "stock"] = "litmoe"
    """litmoe: the fast dropless layer with load balancing; stock: LitGPT's LLaMAMoE (for comparison)."""
    aux_loss_coef: float = 0.01
    """Switch-Transformer load-balancing loss coefficient (0 disables it)."""
    z_loss_coef: float = 0.001
    """Router z-loss coefficient: keeps router logits small (0 disables it)."""
    bias_update_rate: float = 0.0
    """DeepSeek-V3 auxiliary-loss-free balancing: per-expert selection bias step after each optimizer step
    (about 1e-3 to enable; 0 disables it)."""
    capacity_factor: float | None = None
    """null (default): dropless, every routed token reaches its expert. A number (e.g. 1.25): each expert takes
    at most capacity_factor x its fair share of a micro-batch's routed tokens, in token order, and runs exactly
    that many rows (padded), so memory and all-to-all sizes are bounded; the tokens over capacity skip that expert
    (the dropped share is a routing statistic). As Megatron's --moe-expert-capacity-factor with
    --moe-pad-expert-input-to-capacity."""


@dataclass
class StrategyArgs:
    """How training spreads over devices and nodes (the `strategy:` section); see litmoe.distributed.strategy."""

    name: Literal["auto", "single", "ddp", "fsdp", "deepspeed"] = "auto"
    """auto: decide from the hardware and the model's memory estimate (printed with the reason)."""
    zero_stage: Literal[1, 2, 3] | None = None
    """DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also weights (default 2). Setting it
    with name auto means DeepSpeed."""
    offload_optimizer: Literal["none", "cpu", "nvme"] | None = None
    """DeepSpeed: keep optimizer state (and the optimizer step) in CPU memory or on NVMe (nvme needs ZeRO-3)."""
    offload_params: Literal["none", "cpu", "nvme"] | None = None
    """DeepSpeed ZeRO-3: keep the weights in CPU memory or on NVMe between uses."""
    nvme_path: Path | None = None
    """A directory on a fast local NVMe disk, for NVMe offload."""
    deepspeed_config: Path | None = None
    """A DeepSpeed JSON config of your own, passed through; litmoe only fills in what LitGPT's loop needs
    (batch size, clipping, caller-owned gradient accumulation)."""
    expert_parallel: int = 1
    """Expert parallelism: split each MoE layer's experts over this many ranks (consecutive ranks; data parallel
    over the rest), the routed tokens moving to their expert and back by all-to-all. It must divide the number of
    ranks and of experts; 1 (the default) keeps every expert on every rank. Runs on DDP (--strategy ddp) or on
    FSDP2 (--strategy fsdp: the rest sharded over all ranks, each rank's experts over their replicas); not on
    DeepSpeed."""
    timeout_minutes: int = 30
    """How long a collective may wait for the other ranks before the run fails (a dead node ends the job instead
    of hanging it); applies to DDP, FSDP and DeepSpeed."""

    @property
    def decided_by_auto(self) -> bool:
        """Whether litmoe.distributed.strategy chooses (name auto and no DeepSpeed-only option)."""
        return self.name == "auto" and not self.asks_for_zero

    @property
    def asks_for_zero(self) -> bool:
        """Whether a DeepSpeed-only option was given."""
        offload = {self.offload_optimizer, self.offload_params} - {None, "none"}
        return self.zero_stage is not None or bool(offload) or self.deepspeed_config is not None


@dataclass
class CheckpointArgs:
    """Which checkpoints are kept (the `checkpoint:` section); LitGPT's train.save_interval sets how often."""

    keep_last: int | None = None
    """Keep only the newest N step-* checkpoints: older ones are removed once a newer one is complete; final/ always
    stays. null keeps every one."""


@dataclass
class HealthArgs:
    """What a run does when its numbers go wrong (the `health:` section); see litmoe.training.health."""

    nonfinite: Literal["stop", "skip", "off"] = "stop"
    """A non-finite loss or gradient norm: stop (keep the last good checkpoint and say what to try; read one step
    late, no host sync), skip that optimizer step (stop after max_skips in a row; one host sync per step), or off
    (no check)."""
    max_skips: int = 3
    """With nonfinite skip: stop after this many skipped steps in a row."""
    spike_window: int = 50
    """Loss spikes are judged against this many recent logged losses."""
    spike_sigmas: float = 6.0
    """A logged loss this many standard deviations above the recent mean is logged as a spike event."""


@dataclass
class UpcycleArgs:
    """Sparse upcycling: start the MoE from a dense checkpoint (the `upcycle:` section; see
    litmoe.training.initial_weights)."""

    dense_checkpoint: Path | None = None
    """A dense LLaMA-style LitGPT checkpoint dir (LLaMAMLP, same attention, embeddings and vocabulary as the MoE)."""
    router_std: float = 0.02
    """Standard deviation of the router's initial weights (coarse experts; fine-grained experts start at zero)."""
    noise: float = 0.0
    """Relative noise on each expert's copy of the dense weights, to break their symmetry (0: an exact start)."""


SEEDS = 2**32  # numpy's range: Lightning seeds numpy with the same seed


def check_seed(seed: int) -> None:
    if not 0 <= seed < SEEDS:
        raise UserError(f"--seed {seed}: must be between 0 and {SEEDS - 1} (numpy's range; Lightning seeds it too)")
