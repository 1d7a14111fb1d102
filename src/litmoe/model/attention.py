"""Which scaled-dot-product-attention kernel training will use, and why FlashAttention can or cannot run.

LitGPT calls `F.scaled_dot_product_attention(q, k, v, is_causal=True)` with no mask in training, which
makes the FlashAttention kernels eligible: FlashAttention-2 and cuDNN's fused attention (the same tiled,
never-materialized algorithm). PyTorch picks a backend per call and falls back silently; this module says up
front what it will pick on this device, dtype and head size. On an H100 with torch 2.11, PyTorch picks cuDNN's,
and it runs MoE-200M's attention 1.47x faster than FlashAttention-2 (benchmarks/README.md).
"""

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from litmoe.core.errors import UserError

# The FlashAttention-algorithm kernels, in the order PyTorch prefers them on Hopper (torch 2.11).
FLASH_KERNELS = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION)
PRECISION_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16, "32": torch.float32, "64": torch.float64}


def default_precision(training: bool) -> str:
    """bf16 on a CUDA GPU (mixed for training, true for inference), fp32 on CPU."""
    if not torch.cuda.is_available():
        return "32-true"
    return "bf16-mixed" if training else "bf16-true"


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype attention sees under a Lightning precision setting such as 'bf16-mixed' or '32-true'."""
    return PRECISION_DTYPES[precision.split("-")[0]]


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on `x` compute in: autocast's where it is on (bf16 under bf16-mixed), else x's own."""
    device = x.device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def flash_blockers(device: torch.device, dtype: torch.dtype, head_size: int) -> list[str]:
    """Reasons the CUDA FlashAttention kernel cannot run here; empty when it can."""
    reasons = []
    if device.type != "cuda":
        reasons.append(f"no CUDA GPU (training on {device.type})")
    else:
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            reasons.append(f"GPU compute capability {major}.{minor} < 8.0 (needs Ampere or newer)")
    if dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"dtype {str(dtype).removeprefix('torch.')} (needs bf16 or fp16: --precision bf16-mixed)")
    if head_size > 256 or head_size % 8:
        reasons.append(f"head size {head_size} (needs a multiple of 8, at most 256)")
    return reasons


def chosen_backend(device: torch.device, dtype: torch.dtype, n_head: int, head_size: int) -> SDPBackend:
    """The backend PyTorch's dispatcher picks for a causal, unmasked call of this shape."""
    q = torch.zeros(1, n_head, 64, head_size, device=device, dtype=dtype)
    return SDPBackend(torch._fused_sdp_choice(q, q, q, None, 0.0, True))


@dataclass
class AttentionReport:
    device: torch.device
    dtype: torch.dtype
    head_size: int
    backend: SDPBackend
    blockers: list[str]

    @property
    def kernel(self) -> str:
        if self.device.type == "cpu" and self.backend == SDPBackend.FLASH_ATTENTION:
            return "the CPU fused attention kernel (flash-style C++; the CUDA FlashAttention kernel needs a GPU)"
        if self.backend == SDPBackend.CUDNN_ATTENTION:
            return "CUDNN_ATTENTION on cuda (cuDNN's fused FlashAttention)"
        return f"{self.backend.name} on {self.device.type}"

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"Attention: {dtype}, head size {self.head_size} -> {self.kernel}"


def check_attention(
    device: torch.device, precision: str, n_head: int, head_size: int, want_flash: bool, force_flash: bool
) -> AttentionReport:
    """Report the attention kernel; warn when FlashAttention is wanted but unusable, raise when forced."""
    dtype = compute_dtype(precision)
    report = AttentionReport(
        device,
        dtype,
        head_size,
        chosen_backend(device, dtype, n_head, head_size),
        flash_blockers(device, dtype, head_size),
    )
    print(report.describe())
    why = "; ".join(report.blockers)
    if force_flash and report.blockers:
        raise UserError(f"--flash-attention-force: FlashAttention cannot run here: {why}. Drop the flag to train")
    if want_flash and report.blockers:
        print(f"Warning: FlashAttention unavailable: {why}. Training continues with {report.kernel}.")
    elif want_flash and report.backend not in FLASH_KERNELS:
        print(
            f"Note: FlashAttention is usable but PyTorch prefers {report.backend.name} here;"
            " --flash-attention-force pins the FlashAttention kernels."
        )
    return report


def attention_kernel_scope(force_flash: bool) -> AbstractContextManager:
    """Pin SDPA to the FlashAttention kernels when forced: PyTorch still picks the faster of the two for each
    call, and errors rather than falls back to the memory-efficient or math kernel."""
    return sdpa_kernel(list(FLASH_KERNELS)) if force_flash else nullcontext()


@contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """fp32 matmuls (the few a bf16-mixed run keeps) on TF32 tensor cores, as `litgpt pretrain` sets for its
    whole process (litgpt/__main__.py); restored afterwards, since the setting is process-wide."""
    before = torch.get_float32_matmul_precision()
    if enabled:
        torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
