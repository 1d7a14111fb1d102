"""`run_train.py --check-environment`: one screen on what this machine can do for training.

Each line is a check with a verdict (ok / warn / missing / info) and, where something is missing, the fix.
"""

import importlib.metadata
import importlib.util
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from litmoe.model.attention import flash_blockers


@dataclass
class Check:
    name: str
    verdict: str  # ok, warn, missing, info
    detail: str
    fix: str = ""

    def line(self) -> str:
        fix = f"  -> {self.fix}" if self.fix else ""
        return f"[{self.verdict:^7}] {self.name:<18} {self.detail}{fix}"


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def software_checks() -> list[Check]:
    cuda = torch.version.cuda or "none (CPU build)"
    checks = [
        Check("python", "info", platform.python_version()),
        Check("torch", "ok", f"{torch.__version__}, CUDA build {cuda}"),
    ]
    for name in ("litgpt", "lightning", "litdata"):
        version = package_version(name)
        checks.append(
            Check(name, "ok" if version else "missing", version or "not installed", "" if version else "uv sync")
        )
    return checks


def gpu_checks() -> list[Check]:
    if not torch.cuda.is_available():
        return [
            Check(
                "CUDA GPUs", "warn", "none visible: training runs on the CPU (the cpu_profile of train_config.yaml)",
                "check nvidia-smi and CUDA_VISIBLE_DEVICES if this machine has GPUs",
            )
        ]  # fmt: skip
    checks = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        capability = f"{props.major}.{props.minor}"
        checks.append(
            Check(f"GPU {index}", "ok", f"{props.name}, {props.total_memory / 2**30:.0f} GiB, sm {capability}")
        )
    device = torch.device("cuda", 0)
    bf16 = torch.cuda.is_bf16_supported()
    checks.append(Check("bf16", "ok" if bf16 else "warn", "supported" if bf16 else "not supported", "" if bf16 else
                        "use --precision 16-mixed"))  # fmt: skip
    blockers = flash_blockers(device, torch.bfloat16, head_size=64)
    checks.append(
        Check("FlashAttention", "ok" if not blockers else "warn", "usable (SDPA flash kernel)" if not blockers else
              "; ".join(blockers), "" if not blockers else "--no-flash-attention (SDPA picks another kernel)")
    )  # fmt: skip
    cudnn = torch.backends.cudnn.is_available()
    checks.append(Check("cuDNN attention", "ok" if cudnn else "warn", "available" if cudnn else "cuDNN not found"))
    nccl = torch.distributed.is_nccl_available()
    checks.append(Check("NCCL", "ok" if nccl else "missing", "available" if nccl else "not built into torch",
                        "" if nccl else "install a CUDA build of torch"))  # fmt: skip
    return checks


DEEPSPEED_OPS = (
    ("CPUAdamBuilder", "cpu_adam", "optimizer offload", "needs a C++ compiler (g++) and ninja"),
    ("AsyncIOBuilder", "async_io", "NVMe offload", "install libaio (apt install libaio-dev)"),
)


def deepspeed_checks() -> list[Check]:
    version = package_version("deepspeed")
    if version is None:
        return [
            Check("DeepSpeed", "missing", "not installed (needed for ZeRO and offload)", "uv sync --extra deepspeed")
        ]
    ops = "CUDA GPU present" if torch.cuda.is_available() else "no CUDA GPU: DeepSpeed cannot train here"
    checks = [Check("DeepSpeed", "ok" if torch.cuda.is_available() else "warn", f"{version}; {ops}")]
    if not torch.cuda.is_available():  # said above; otherwise DeepSpeed logs its guess as a warning of its own
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    for builder_name, op, used_for, fix in DEEPSPEED_OPS:
        builder = get_accelerator().create_op_builder(builder_name)
        usable = builder is not None and builder.is_compatible(verbose=False)
        detail = f"{op}: {'can be built' if usable else 'cannot be built'} (for {used_for})"
        checks.append(Check("DeepSpeed op", "ok" if usable else "warn", detail, "" if usable else fix))
    return checks


def host_checks(out_dir: Path) -> list[Check]:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    existing = next((p for p in [out_dir, *out_dir.resolve().parents] if p.exists()), Path("/"))
    free = shutil.disk_usage(existing).free / 2**30
    disk_ok = free >= 10
    return [
        Check("CPU", "info", f"{os.cpu_count()} cores, {memory:.0f} GiB memory"),
        Check(f"disk at {out_dir}", "ok" if disk_ok else "warn", f"{free:.0f} GiB free",
              "" if disk_ok else "checkpoints need space: free some or choose another --out_dir"),
        Check("flash-attn package", "info", "installed" if importlib.util.find_spec("flash_attn") else
              "not installed (optional: PyTorch's SDPA kernels are used)"),
    ]  # fmt: skip


def check_environment(out_dir: Path) -> list[Check]:
    checks = [*software_checks(), *gpu_checks(), *deepspeed_checks(), *host_checks(Path(out_dir))]
    for check in checks:
        print(check.line())
    return checks
