"""Two ranks, four ways to hold the experts: DDP (every rank holds all), ZeRO-3 (weights sharded, gathered for
each use), expert parallelism (each rank holds half of the experts; tokens travel by all-to-all) on DDP, and on
FSDP (the rest sharded too). For each model: steady tokens/s, the first losses, and the bytes each plan moves per
micro-batch, from `--estimate`.

    uv run python benchmarks/expert_parallel.py                       # CPU: 2 gloo ranks, MoE-tiny and wide experts
    uv run python benchmarks/expert_parallel.py -- --no-cpu-profile    # GPU machine: the recipe

Each run is run_train.py in its own processes, one after the other, with the same config, data and seed.
Arguments after `--` go to every run.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from zero_strategies import first_losses

REPO = Path(__file__).resolve().parents[1]
PLANS = {
    "DDP": ["--strategy", "ddp"],
    "ZeRO-3": ["--strategy", "deepspeed", "--zero-stage", "3", "--no-compile"],
    "expert parallel 2": ["--strategy", "ddp", "--strategy.expert_parallel", "2"],
    "FSDP + expert parallel 2": ["--strategy", "fsdp", "--strategy.expert_parallel", "2"],
}
MODELS = {  # the CPU profile's MoE-tiny, and a variant whose experts hold most of the weights
    "MoE-tiny": [],
    "wide experts (16 x 1024)": ["--model.n_expert", "16", "--model.moe_intermediate_size", "1024"],
}
COMMON = ["--devices", "2", "--train.max_tokens", "81920", "--train.log_interval", "1", "--num_workers", "0",
          "--eval.initial_validation", "false", "--eval.final_validation", "false"]  # fmt: skip


def moved_per_micro_batch(estimate: str, plan: str) -> str:
    """What a rank sends or receives per micro-batch beyond DDP's gradient all-reduce (once per step)."""
    if "expert parallel" in plan:
        sent = re.search(r"sends ([\d.]+ GiB) per micro-batch by all-to-all", estimate)
        gathered = re.search(r"FSDP gathers ([\d.]+ GiB)", estimate)
        moved = f"{sent.group(1)} all-to-all" if sent else "-"
        return moved + (f" + {gathered.group(1)} gathered" if gathered else "")
    if plan == "ZeRO-3":
        match = re.search(r"would gather ([\d.]+ GiB) per micro-batch", estimate)
        return f"{match.group(1)} gathered" if match else "-"
    return "none"


def run(plan: str, model: list[str], out_dir: Path, extra: list[str]) -> list[str]:
    command = [sys.executable, "run_train.py", f"--out_dir={out_dir}", *COMMON, *PLANS[plan], *model, *extra]
    # an expert-parallel plan's estimate prints its all-to-all (and FSDP) bytes, and what ZeRO-3 would gather
    estimate_plan = PLANS[plan] if "expert parallel" in plan else PLANS["expert parallel 2"]
    estimate_command = [sys.executable, "run_train.py", *COMMON, *estimate_plan, *model, *extra, "--estimate"]
    estimate = subprocess.run(estimate_command, cwd=REPO, capture_output=True, text=True, check=True).stdout
    environment = {**os.environ, "LITMOE_DEEPSPEED_CPU": "1"}  # DeepSpeed on its CPU accelerator where no GPU
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        return ["failed: " + (result.stdout + result.stderr).strip().splitlines()[-1], "-", "-"]
    rate = re.search(r"throughput\s*: ([\d,]+) tokens/s", result.stdout)
    losses = ", ".join(f"{loss:.4f}" for loss in first_losses(out_dir, 4))
    return [rate.group(1) if rate else "-", moved_per_micro_batch(estimate, plan), losses]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", nargs="*", default=list(PLANS), choices=list(PLANS))
    parser.add_argument("run_train_args", nargs="*")
    args = parser.parse_args()
    print("| model | plan | steady tokens/s (2 ranks) | moved per micro-batch and rank | first losses |")
    print("| --- | --- | ---: | ---: | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for model_name, model in MODELS.items():
            for index, plan in enumerate(args.plans):
                cells = run(plan, model, Path(tmp) / f"{model_name[:4]}{index}", args.run_train_args)
                print(f"| {model_name} | {plan} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
