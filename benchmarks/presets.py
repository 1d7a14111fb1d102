"""The table of model presets in docs/training.md (and README.md): parameters, FLOPs per token, and --estimate's
memory per GPU for one GPU and for 8 GPUs under ZeRO-2 and ZeRO-3 (bf16-mixed, micro-batch 4 of full blocks,
activation checkpointing on).
Everything is computed from the configs on the meta device; the memory columns are estimates.

    uv run python benchmarks/presets.py
"""

import torch
from litgpt import GPT, Config

from litmoe.distributed.estimate import GiB, estimate_training, per_device_memory
from litmoe.distributed.plans import StrategyChoice
from litmoe.model.configs import register_configs
from litmoe.model.flops import active_parameters, total_parameters

PRESETS = ("MoE-tiny", "MoE-200M", "MoE-1B", "MoE-FG-2B", "MoE-4B", "MoE-8B")
PRECISION, MICRO_BATCH = "bf16-mixed", 4
PLANS = {
    "1 GPU": (StrategyChoice("single", ""), 1),
    "8 GPUs, ZeRO-2": (StrategyChoice("deepspeed", "", 2), 8),
    "8 GPUs, ZeRO-3": (StrategyChoice("deepspeed", "", 3), 8),
}


def row(name: str) -> str:
    config = Config.from_name(name)
    with torch.device("meta"):
        model = GPT(config)
    head = config.padded_vocab_size * config.n_embd
    estimate = estimate_training(config, PRECISION, MICRO_BATCH, config.block_size)
    memory = [
        per_device_memory(estimate, PRECISION, choice, world_size=ranks, devices_per_node=ranks, checkpointing=True)
        for choice, ranks in PLANS.values()
    ]
    experts = f"{config.n_expert} x {config.moe_intermediate_size}, top-{config.n_expert_per_token}"
    if config.n_shared_expert:
        experts += f", 1 shared of {config.n_shared_expert * config.moe_intermediate_size}"
    return (
        f"| {name} | {config.n_layer} x {config.n_embd} | {experts} | {config.block_size} | {total_parameters(model):,}"
        f" | {active_parameters(model) - head:,} | {estimate.flops_per_token / 1e9:.2f} | "
        + " | ".join(f"{part.total / GiB:.1f}" for part in memory)
        + " |"
    )


def main() -> None:
    register_configs()
    print(
        "| preset | layers x width | experts | block | parameters | active non-embedding | GFLOP/token (train) | "
        + " | ".join(f"GiB/GPU, {plan}" for plan in PLANS)
        + " |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in PLANS) + " |")
    for name in PRESETS:
        print(row(name))


if __name__ == "__main__":
    main()
