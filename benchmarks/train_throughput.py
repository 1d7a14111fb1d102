"""Tokens/s of run_train.py with litmoe's MoE layer vs LitGPT's stock LLaMAMoE: same config, data and
seed, in the same process, one run after the other. Also reports the training loss at the end of each run,
which must agree within noise.

    uv run python benchmarks/train_throughput.py                       # CPU profile (MoE-tiny)
    uv run python benchmarks/train_throughput.py --tokens 400000 -- --model MoE-200M --train.max_seq_length 512

Arguments after `--` go to run_train.py as they are.
"""

import argparse
import csv
import tempfile
from pathlib import Path

from litmoe.training.cli import main as run_train


def final_train_loss(out_dir: Path) -> float:
    rows = csv.DictReader((out_dir / "logs" / "csv" / "version_0" / "metrics.csv").open())
    losses = [float(row["loss"]) for row in rows if row.get("loss")]
    return sum(losses[-3:]) / len(losses[-3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("run_train_args", nargs="*")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layer in ("stock", "litmoe"):
            out_dir = Path(tmp) / layer
            run = run_train(
                [f"--moe.layer={layer}", f"--out_dir={out_dir}", f"--train.max_tokens={args.tokens}",
                 "--train.log_interval=1", "--eval.final_validation=false", "--eval.initial_validation=false",
                 *args.run_train_args]
            )  # fmt: skip
            results[layer] = (run.summary.tokens_per_sec, final_train_loss(out_dir))
    print("| layer | tokens/s | train loss (last 3 logs) |")
    print("| --- | ---: | ---: |")
    for layer, (tokens_per_sec, loss) in results.items():
        print(f"| {layer} | {tokens_per_sec:,.0f} | {loss:.3f} |")
    print(f"speed-up: {results['litmoe'][0] / results['stock'][0]:.2f}x")


if __name__ == "__main__":
    main()
