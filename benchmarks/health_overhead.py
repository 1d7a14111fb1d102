"""What the non-finite guard costs: tokens/s of run_train.py with `--health.nonfinite stop` (one host sync per
optimizer step to read the gradient norm) against `off`, in the same process, the two alternating for several
rounds so that both see the same machine state.

    uv run python benchmarks/health_overhead.py                        # CPU profile (MoE-tiny)
    uv run python benchmarks/health_overhead.py --rounds 3 -- --no-cpu-profile --train.max_seq_length 512

Arguments after `--` go to run_train.py as they are.
"""

import argparse
import statistics
import tempfile
from pathlib import Path

from litmoe.training.cli import main as run_train

POLICIES = ("off", "stop")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("run_train_args", nargs="*")
    args = parser.parse_args()
    rates: dict[str, list[float]] = {policy: [] for policy in POLICIES}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for policy in POLICIES:
                out_dir = Path(tmp) / f"{policy}-{round_index}"
                run = run_train(
                    [f"--health.nonfinite={policy}", f"--out_dir={out_dir}", f"--train.max_tokens={args.tokens}",
                     "--eval.final_validation=false", "--eval.initial_validation=false", *args.run_train_args]
                )  # fmt: skip
                rates[policy].append(run.summary.tokens_per_sec)
    print("| health.nonfinite | tokens/s per round | median |")
    print("| --- | --- | ---: |")
    for policy, values in rates.items():
        print(f"| {policy} | {', '.join(f'{value:,.0f}' for value in values)} | {statistics.median(values):,.0f} |")
    ratios = [stop / off for off, stop in zip(rates["off"], rates["stop"], strict=True)]
    print(f"stop / off, paired by round: {', '.join(f'{ratio:.3f}' for ratio in ratios)}")


if __name__ == "__main__":
    main()
