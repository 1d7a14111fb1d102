"""The plans a run can take across devices: a strategy choice, and the hardware it is made for.

Shared by the decision (litmoe.distributed.strategy), the memory estimate (litmoe.distributed.estimate) and
the Fabric that runs the choice (litmoe.distributed.fabric).
"""

import os
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class StrategyChoice:
    name: Literal["single", "ddp", "fsdp", "deepspeed"]
    reason: str
    zero_stage: int | None = None
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    offload_params: Literal["none", "cpu", "nvme"] = "none"
    expert_parallel: int = 1  # ranks that share out each MoE layer's experts

    @property
    def shards_experts(self) -> bool:
        """FSDP2 with the experts split: the dense part sharded over all ranks, each rank's experts over their
        replicas (litmoe.distributed.expert_parallel_fsdp)."""
        return self.name == "fsdp" and self.expert_parallel > 1

    def label(self, world_size: int, devices_per_node: int) -> str:
        if self.name == "single":
            return "single device"
        if self.name == "ddp" and self.expert_parallel > 1:
            return f"DDP across {world_size} ranks, experts split over {self.expert_parallel} (expert parallel)"
        if self.name == "ddp":
            return f"DDP across {world_size} ranks"
        if self.shards_experts:
            return f"FSDP across {world_size} ranks, experts split over {self.expert_parallel} (expert parallel)"
        if self.name == "fsdp":
            return f"FSDP, sharded within each node's {devices_per_node} devices"
        label = f"DeepSpeed ZeRO-{self.zero_stage} across {world_size} rank{'s' if world_size > 1 else ''}"
        for what, device in (("optimizer", self.offload_optimizer), ("weights", self.offload_params)):
            if device != "none":
                label += f", {what} offloaded to {device.upper() if device == 'nvme' else 'CPU memory'}"
        return label


@dataclass(frozen=True)
class Hardware:
    devices_per_node: int
    num_nodes: int
    gpu_memory: float | None  # one GPU's bytes; None: no CUDA GPU
    cpu_memory: float  # one node's bytes
    deepspeed_installed: bool

    @property
    def world_size(self) -> int:
        return self.devices_per_node * self.num_nodes

    @classmethod
    def here(cls, devices_per_node: int, num_nodes: int) -> "Hardware":
        import importlib.util

        gpu = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
        cpu = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return cls(devices_per_node, num_nodes, gpu, cpu, importlib.util.find_spec("deepspeed") is not None)
