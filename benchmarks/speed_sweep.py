"""One table of the GPU-speed levers for MoE-200M: each variant trains the same model on the same data for the same
tokens in a process of its own (nothing compiled, cached or allocated by another variant), and the table gives its
steady tokens/s, TFLOP/s, MFU against the GPU's own dense peak, peak memory and training loss at the end.

    python benchmarks/speed_sweep.py --profile         # on a GPU: every variant, then the recipe profiled
    python benchmarks/speed_sweep.py --dry-run --profile -- --no-compile    # anywhere: MoE-tiny, one step each
    python benchmarks/speed_sweep.py --only "recipe, 50k vocabulary" "stock LLaMAMoE"

The data is synthetic (benchmarks/synthetic_corpus.py), 20M training tokens per vocabulary, written before the
first variant: no run reaches the end of an epoch, and the model's vocabulary is the corpus's, GPT-2's 50,257 (the
recipe's model) or the default corpus's 8,192. A variant is run_train.py flags on top of the recipe; arguments
after `--` go to every run. A variant that fails or runs past `--timeout` is a row saying so; the sweep goes on.
Steady tokens/s and MFU leave out the first two optimizer steps (compilation, autotuning), validation and
checkpoints, as the run summary does.
"""

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

VOCABULARIES = {"50k": 50257, "8k": 8192}
VARIANTS = {  # name -> (vocabulary, flags), in order of what the table most needs, should the call be cut short
    "recipe, 50k vocabulary": ("50k", []),
    "recipe, 8k vocabulary": ("8k", []),
    "no loader workers": ("50k", ["--num_workers", "0"]),
    "no non-finite check": ("50k", ["--health.nonfinite", "off"]),
    "compile reduce-overhead (CUDA graphs)": ("50k", ["--compile-mode", "reduce-overhead"]),
    "stock LLaMAMoE": ("50k", ["--moe.layer", "stock"]),
}
PROFILED = "recipe, 50k vocabulary"
RESULT = "sweep-result.json"  # what a variant's process leaves in its output directory
CORPUS_TOKENS = 20_000_000
# Measured and settled (benchmarks/README.md, H200, 2026-11-30), so no longer swept: micro-batch 16 and 32 (within
# 2% of 8, which needs the least memory), foreach AdamW (10% slower than the fused default), whole-model fullgraph,
# per-block compile, the fused loss at 8k (no faster), the running loss's NaN check (off by default).
# A dry run: the CPU-sized model on a small corpus, one optimizer step per variant.
DRY_RUN = [
    "--model", "MoE-tiny", "--model.n_layer", "1", "--train.max_seq_length", "64", "--train.global_batch_size", "32",
    "--train.micro_batch_size", "8", "--train.max_tokens", "2048", "--train.lr_warmup_steps", "1", "--compile",
    "--no-flash-attention", "--precision", "32-true", "--train.log_interval", "1",
]  # fmt: skip
DRY_RUN_CORPUS_TOKENS = 200_000


def final_train_loss(out_dir: Path) -> float:
    rows = list(csv.DictReader((out_dir / "logs" / "csv" / "version_0" / "metrics.csv").open()))
    losses = [float(row["loss"]) for row in rows if row.get("loss")]
    return sum(losses[-3:]) / len(losses[-3:])


def run_variant(flags: list[str], out_dir: Path) -> dict:
    """One variant in this process: its numbers, as the parent's table needs them."""
    from litmoe.training.cli import main as run_train

    start = time.perf_counter()
    run = run_train([f"--out_dir={out_dir}", "--eval.initial_validation=false", "--eval.final_validation=false",
                     *flags])  # fmt: skip
    summary = run.summary
    rate = summary.steady or summary  # the steady rate when the run had one
    flops_per_sec = rate.flops / rate.seconds
    return {
        "tokens_per_sec": summary.tokens_per_sec,
        "tflops": flops_per_sec / 1e12,
        "mfu": summary.mfu,
        "peak_flops": summary.peak_flops,
        "memory_gb": summary.peak_memory_gb,
        "loss": final_train_loss(out_dir),
        "seconds": time.perf_counter() - start,
    }


def row(name: str, result: dict) -> str:
    if "failed" in result:
        return f"| {name} | {result['failed']} | | | | | {result['seconds']:.0f} s |"
    mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a (no GPU)"
    return (
        f"| {name} | {result['tokens_per_sec']:,.0f} | {result['tflops']:.1f} | {mfu} | {result['memory_gb']:.1f} |"
        f" {result['loss']:.3f} | {result['seconds']:.0f} s |"
    )


def in_own_process(flags: list[str], out_dir: Path, timeout: float, *options: str) -> dict:
    """Run one variant (or, with option --profile, the profile) in a fresh interpreter, its output streaming into
    this one's; its result, or why there is none."""
    command = [sys.executable, __file__, "--child", json.dumps(flags), "--out", str(out_dir), *options]
    start = time.perf_counter()
    try:
        status = subprocess.run(command, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {timeout:.0f} s", "seconds": time.perf_counter() - start}
    result = out_dir / RESULT
    if not result.is_file():
        return {"failed": f"failed: exit status {status}", "seconds": time.perf_counter() - start}
    return json.loads(result.read_text())


def profile_recipe(flags: list[str], out_dir: Path, steps: tuple[int, int]) -> None:
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
                run_variant(flags, out_dir)
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


def child(args: argparse.Namespace) -> None:
    """A variant in this process (the parent's `in_own_process`): its numbers, or why not, into out/RESULT; or
    the profile."""
    flags = json.loads(args.child)
    if args.profile:
        profile_recipe(flags, args.out, (0, 1) if args.dry_run else (3, 2))
        return
    start = time.perf_counter()
    try:
        result = run_variant(flags, args.out)
    except (Exception, SystemExit) as err:  # noqa: BLE001  (a row per failure, and the sweep goes on)
        traceback.print_exc()  # the whole story in the log; the row keeps its first words
        reason = " ".join(traceback.format_exception_only(err)[-1].split())[:100]
        result = {"failed": f"failed: {reason}", "seconds": time.perf_counter() - start}
    (args.out / RESULT).write_text(json.dumps(result))


def corpora(vocabularies: set[str], folder: Path, tokens: int) -> dict[str, Path]:
    from synthetic_corpus import write_corpus

    made = {}
    for name in sorted(vocabularies):
        start = time.perf_counter()
        made[name] = write_corpus(folder / f"corpus-{name}", VOCABULARIES[name], tokens)
        print(f"Synthetic corpus: {tokens:,} tokens, vocabulary {VOCABULARIES[name]:,}, in"
              f" {time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="MoE-tiny, one step per variant (any machine)")
    parser.add_argument("--tokens", type=int, default=2_097_152, help="per variant (default: 16 optimizer steps)")
    parser.add_argument("--only", nargs="*", default=None, help="the variants to run, by name")
    parser.add_argument("--profile", action="store_true", help="then profile the recipe (torch.profiler)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per variant")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a variant's flags, run in this process
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("run_train_args", nargs="*", help="after --: flags for every run")
    args = parser.parse_args()
    if args.child is not None:
        return child(args)
    chosen = {name: VARIANTS[name] for name in (args.only or VARIANTS)}
    # a log every 4 steps on a GPU (4 logs for the loss column): each log step reads the device once
    recipe = ["--no-cpu-profile", "--train.log_interval=4", f"--train.max_tokens={args.tokens}"]
    common = [*(DRY_RUN if args.dry_run else recipe), *args.run_train_args]
    dry_run = ["--dry-run"] if args.dry_run else []
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run: not speeds)"
    needed = {vocabulary for vocabulary, _ in chosen.values()} | ({VARIANTS[PROFILED][0]} if args.profile else set())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = corpora(needed, Path(tmp), DRY_RUN_CORPUS_TOKENS if args.dry_run else CORPUS_TOKENS)
        for index, (name, (vocabulary, flags)) in enumerate(chosen.items()):
            run_flags = [*common, f"--data_dir={data[vocabulary]}", *flags]
            rows.append(row(name, in_own_process(run_flags, Path(tmp) / f"v{index}", args.timeout)))
            print(f"SWEEP ROW {rows[-1]}", flush=True)  # each row as it comes, should the call be cut short
        print(f"\nSpeed sweep on {device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, each variant in"
              " its own process")  # fmt: skip
        print("| variant | steady tokens/s | TFLOP/s | MFU | peak memory (GB) | train loss (last 3 logs) | wall time |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        print("\n".join(rows), flush=True)
        if args.profile:
            flags = [*common, f"--data_dir={data[VARIANTS[PROFILED][0]]}", *VARIANTS[PROFILED][1]]
            in_own_process(flags, Path(tmp) / "profile", args.timeout, "--profile", *dry_run)


if __name__ == "__main__":
    main()
