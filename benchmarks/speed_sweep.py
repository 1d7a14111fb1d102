"""One table of the GPU-speed levers for MoE-200M (issue #21): each variant trains the same model on the same data
for the same tokens, one after the other in this process, and the table gives its steady tokens/s, MFU, peak
memory and training loss at the end, beside stock LitGPT's layer measured in the same call.

    uv run python benchmarks/speed_sweep.py                  # on a GPU: the MoE-200M recipe, 1.6M tokens each
    uv run python benchmarks/speed_sweep.py --dry-run        # anywhere: MoE-tiny, one step each, the table prints
    uv run python benchmarks/speed_sweep.py --only "litmoe (recipe)" "micro-batch 16"

A variant is run_train.py flags on top of the recipe (the global batch stays 64 sequences, so a larger micro-batch
accumulates less). Arguments after `--` go to every run. A variant that fails is a row saying why; the sweep goes
on. Steady tokens/s and MFU leave out the first two optimizer steps (compilation, autotuning), validation and
checkpoints, as the run summary does.
"""

import argparse
import csv
import tempfile
import time
import traceback
from pathlib import Path

import torch

from litmoe.training.cli import main as run_train

VARIANTS = {
    "stock LLaMAMoE": ["--moe.layer", "stock"],
    "litmoe (recipe)": [],
    "micro-batch 16": ["--train.micro_batch_size", "16"],
    "micro-batch 32": ["--train.micro_batch_size", "32"],
    "compile fullgraph": ["--optimization.compile_fullgraph", "true"],
    "compile max-autotune-no-cudagraphs": ["--compile-mode", "max-autotune-no-cudagraphs"],
    "compile reduce-overhead (CUDA graphs)": ["--compile-mode", "reduce-overhead"],
    "no compile": ["--no-compile"],
}
# A dry run: the CPU-sized model, one optimizer step per variant, compiled variants compiled all the same.
DRY_RUN = [
    "--model", "MoE-tiny", "--model.n_layer", "1", "--train.max_seq_length", "64", "--train.global_batch_size", "32",
    "--train.micro_batch_size", "8", "--train.max_tokens", "2048", "--train.lr_warmup_steps", "1", "--compile",
    "--no-flash-attention", "--precision", "32-true",
]  # fmt: skip


def final_train_loss(out_dir: Path) -> float:
    rows = list(csv.DictReader((out_dir / "logs" / "csv" / "version_0" / "metrics.csv").open()))
    losses = [float(row["loss"]) for row in rows if row.get("loss")]
    return sum(losses[-3:]) / len(losses[-3:])


def run_variant(name: str, flags: list[str], common: list[str], out_dir: Path) -> str:
    """One table row: the variant's numbers, or why it failed."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.empty_cache()
    start = time.perf_counter()
    try:
        run = run_train([f"--out_dir={out_dir}", "--train.log_interval=1", "--eval.initial_validation=false",
                         "--eval.final_validation=false", *common, *flags])  # fmt: skip
    except (Exception, SystemExit) as err:  # noqa: BLE001  (a row per failure, and the sweep goes on)
        reason = " ".join(traceback.format_exception_only(err)[-1].split())[:100]
        return f"| {name} | failed: {reason} | | | | {time.perf_counter() - start:.0f} s |"
    summary = run.summary
    mfu = f"{summary.mfu:.1%}" if summary.mfu is not None else "n/a (no GPU)"
    return (
        f"| {name} | {summary.tokens_per_sec:,.0f} | {mfu} | {summary.peak_memory_gb:.1f} |"
        f" {final_train_loss(out_dir):.3f} | {time.perf_counter() - start:.0f} s |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="MoE-tiny, one step per variant (any machine)")
    parser.add_argument("--tokens", type=int, default=1_638_400, help="per variant (default: 12 optimizer steps)")
    parser.add_argument("--only", nargs="*", default=None, help="the variants to run, by name")
    parser.add_argument("run_train_args", nargs="*", help="after --: flags for every run")
    args = parser.parse_args()
    chosen = {name: VARIANTS[name] for name in (args.only or VARIANTS)}
    common = [*DRY_RUN] if args.dry_run else ["--no-cpu-profile", f"--train.max_tokens={args.tokens}"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run: not speeds)"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, flags) in enumerate(chosen.items()):
            rows.append(run_variant(name, flags, [*common, *args.run_train_args], Path(tmp) / f"v{index}"))
    print(f"\nSpeed sweep on {device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print("| variant | steady tokens/s | MFU | peak memory (GB) | train loss (last 3 logs) | wall time |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
