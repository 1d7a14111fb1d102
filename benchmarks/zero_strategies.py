"""Short training runs of the same model under each strategy: tokens/s, MFU, peak memory next to the
estimate, and the first losses next to the single-device run's.

Each plan runs run_train.py in its own process (DeepSpeed initialises torch.distributed), one after the
other, with the same config, data and seed.

    uv run python benchmarks/zero_strategies.py -- --no-cpu-profile --train.max_tokens 1e6 --no-compile
    LITMOE_DEEPSPEED_CPU=1 uv run python benchmarks/zero_strategies.py   # CPU: the pipeline, not the speed

Arguments after `--` go to every run as they are.
"""

import argparse
import csv
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLANS = {
    "single": ["--strategy", "single"],
    "ZeRO-2": ["--zero-stage", "2"],
    "ZeRO-3": ["--zero-stage", "3"],
    "ZeRO-2 + CPU optimizer": ["--zero-stage", "2", "--offload-optimizer", "cpu"],
    "ZeRO-3 + CPU optimizer": ["--zero-stage", "3", "--offload-optimizer", "cpu"],
}
SUMMARY = {
    "tokens/s": r"throughput\s*: ([\d,]+) tokens/s",
    "MFU": r"MFU ([\d.]+%)",
    "peak memory": r"peak memory\s*: ([\d.]+ GB \([^)]*\))",
    "estimate": r"^\s+total\s+([\d.]+ GiB)",
}


def first_losses(out_dir: Path, count: int) -> list[float]:
    rows = csv.DictReader((out_dir / "logs" / "csv" / "version_0" / "metrics.csv").open())
    return [float(row["loss"]) for row in rows if row.get("loss")][:count]


def run(plan: list[str], out_dir: Path, extra: list[str]) -> tuple[dict[str, str], list[float]]:
    command = [sys.executable, "run_train.py", f"--out_dir={out_dir}", "--train.log_interval=1", *plan, *extra]
    estimate = subprocess.run([*command, "--estimate"], cwd=REPO, capture_output=True, text=True, check=True)
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        return {"tokens/s": "failed: " + (result.stdout + result.stderr).strip().splitlines()[-1]}, []
    found = {}
    for name, pattern in SUMMARY.items():
        match = re.search(pattern, estimate.stdout if name == "estimate" else result.stdout, re.MULTILINE)
        found[name] = match.group(1) if match else "-"
    return found, first_losses(out_dir, 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", nargs="*", default=list(PLANS), choices=list(PLANS))
    parser.add_argument("run_train_args", nargs="*")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for index, name in enumerate(args.plans):
            rows[name] = run(PLANS[name], Path(tmp) / str(index), args.run_train_args)
    reference = rows.get("single", (None, []))[1]
    print("| plan | tokens/s | MFU | peak memory | estimated per device | first losses | max rel. diff vs single |")
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for name, (found, losses) in rows.items():
        diff = max((abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=False)), default=float("nan"))
        cells = [found.get(key, "-") for key in SUMMARY]
        print(f"| {name} | {' | '.join(cells)} | {', '.join(f'{x:.4f}' for x in losses)} | {diff:.1e} |")


if __name__ == "__main__":
    main()
