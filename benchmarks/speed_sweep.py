"""One table of the GPU-speed levers for MoE-200M (issue #21): each variant trains the same model on the same data
for the same tokens, one after the other in this process, and the table gives its steady tokens/s, MFU, peak
memory and training loss at the end, beside stock LitGPT's layer measured in the same call.

    uv run python benchmarks/speed_sweep.py                  # on a GPU: the MoE-200M recipe, 12 optimizer steps each
    uv run python benchmarks/speed_sweep.py --dry-run        # anywhere: MoE-tiny, one step each, the table prints
    uv run python benchmarks/speed_sweep.py --only "litmoe (recipe)" "micro-batch 16"
    uv run python benchmarks/speed_sweep.py --profile        # and the recipe under torch.profiler: top kernels

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
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from litmoe.training.cli import main as run_train

VARIANTS = {  # in order of what the table most needs, should the call run out of time
    "litmoe (recipe)": [],
    "stock LLaMAMoE": ["--moe.layer", "stock"],
    "running-loss NaN check (2 host syncs per micro-batch)": ["--optimization.running_loss_nan_check", "true"],
    "fused loss (Liger)": ["--optimization.fused_loss", "true"],
    "compile per block, fullgraph": [
        "--optimization.compile_scope",
        "blocks",
        "--optimization.compile_fullgraph",
        "true",
    ],
    "compile reduce-overhead (CUDA graphs)": ["--compile-mode", "reduce-overhead"],
    "no compile": ["--no-compile"],
    "compile max-autotune-no-cudagraphs": ["--compile-mode", "max-autotune-no-cudagraphs"],
}
# Measured and settled (benchmarks/README.md, H200, 2026-11-30), so no longer swept: micro-batch 16 and 32 (within
# 2% of 8, which needs the least memory), foreach AdamW (10% slower than the fused default), whole-model fullgraph.
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
        run = run_train([f"--out_dir={out_dir}", "--eval.initial_validation=false",
                         "--eval.final_validation=false", *common, *flags])  # fmt: skip
    except (Exception, SystemExit) as err:  # noqa: BLE001  (a row per failure, and the sweep goes on)
        traceback.print_exc()  # the whole story in the log; the row keeps its first words
        reason = " ".join(traceback.format_exception_only(err)[-1].split())[:100]
        return f"| {name} | failed: {reason} | | | | {time.perf_counter() - start:.0f} s |"
    summary = run.summary
    mfu = f"{summary.mfu:.1%}" if summary.mfu is not None else "n/a (no GPU)"
    return (
        f"| {name} | {summary.tokens_per_sec:,.0f} | {mfu} | {summary.peak_memory_gb:.1f} |"
        f" {final_train_loss(out_dir):.3f} | {time.perf_counter() - start:.0f} s |"
    )


def profile_recipe(common: list[str], out_dir: Path, steps: tuple[int, int]) -> None:
    """The recipe once more under torch.profiler, recording `steps` = (skipped, recorded) optimizer steps: the
    kernels that take the time and the host-device synchronisations; and, on a GPU, where in the code every sync
    of the whole run comes from (CUDA's sync debug mode: a warning with the caller at each one)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    skipped, recorded = steps
    with profile(activities=activities, schedule=schedule(wait=skipped, warmup=1, active=recorded)) as profiler:
        hook = register_optimizer_step_post_hook(lambda *_: profiler.step())
        try:
            with sync_origins() as origins:
                run_variant("litmoe (recipe), profiled", [], common, out_dir)
        finally:
            hook.remove()
    events = profiler.key_averages()
    if not events:
        print(f"\nProfile: the run had fewer than {skipped + 1 + recorded} optimizer steps; nothing recorded")
        return
    time_column = "device_time_total" if torch.cuda.is_available() else "cpu_time_total"
    print(f"\nProfile of the recipe, {recorded} optimizer steps after {skipped + 1}, by {time_column}:")
    print(events.table(sort_by=time_column, row_limit=30, max_name_column_width=70))
    syncs = {event.key: event.count for event in events if is_sync(event.key)}
    print(f"host-device synchronisations in those steps: {syncs or 'none'}")
    print("where the whole run's syncs come from (CUDA only):")
    for stack, count in origins.most_common(10):
        print(f"  {count:5d} x {stack}")


@contextmanager
def sync_origins() -> Iterator[Counter]:
    """Counts of the Python call sites (innermost frames outside torch) of every CUDA host sync in the scope."""
    origins: Counter = Counter()
    if not torch.cuda.is_available():
        yield origins
        return

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchronizing" not in str(message):
            return show(message, category, filename, lineno, file, line)
        ours = [
            f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename and "warnings" not in f.filename
        ]
        origins[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in ours[-4:][::-1])] += 1

    show = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield origins
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = show


def is_sync(name: str) -> bool:
    return "Synchronize" in name or name in ("aten::item", "aten::_local_scalar_dense")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="MoE-tiny, one step per variant (any machine)")
    parser.add_argument("--tokens", type=int, default=1_572_864, help="per variant (default: 12 optimizer steps)")
    parser.add_argument("--only", nargs="*", default=None, help="the variants to run, by name")
    parser.add_argument("--profile", action="store_true", help="profile the recipe after its row (torch.profiler)")
    parser.add_argument("run_train_args", nargs="*", help="after --: flags for every run")
    args = parser.parse_args()
    chosen = {name: VARIANTS[name] for name in (args.only or VARIANTS)}
    # log every 4 steps on a GPU (3 logs for the loss column), as a log step adds its own host syncs
    common = [*DRY_RUN, "--train.log_interval=1"] if args.dry_run else ["--no-cpu-profile", "--train.log_interval=4",
                                                                       f"--train.max_tokens={args.tokens}"]  # fmt: skip
    common += args.run_train_args
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run: not speeds)"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, flags) in enumerate(chosen.items()):
            rows.append(run_variant(name, flags, common, Path(tmp) / f"v{index}"))
            print(f"SWEEP ROW {rows[-1]}", flush=True)  # each row as it comes, should the call be cut short
            if args.profile and index == 0:  # early, with the compile cache warm, so that a cut-short call has it
                try:
                    profile_recipe(common, Path(tmp) / "profile", (0, 1) if args.dry_run else (3, 2))
                except Exception:  # noqa: BLE001  (the sweep goes on without the profile)
                    traceback.print_exc()
        print(f"\nSpeed sweep on {device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
        print("| variant | steady tokens/s | MFU | peak memory (GB) | train loss (last 3 logs) | wall time |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
