"""Sparse upcycling against training from scratch, on the CPU profile: a dense model (Dense-tiny) is trained first,
then MoE-tiny is trained for the same budget twice: upcycled from it (--upcycle-from) and from scratch. Prints
the two validation-loss curves side by side, and the dense model's own loss.

    uv run python benchmarks/upcycling.py                          # default corpus, 300k tokens each
    uv run python benchmarks/upcycling.py --dense-tokens 600000 --moe-tokens 300000

Both MoE runs use the same data, seed, schedule and evaluation batches; only their starting weights differ.
"""

import argparse
import csv
import tempfile
from pathlib import Path

from litmoe.training.cli import main as run_train

EVERY = 10  # optimizer steps between evaluations


def validation_losses(out_dir: Path, tokens_per_iteration: int) -> dict[int, float]:
    """{tokens trained: val loss} from a run's CSV log. LitGPT logs a validation after iteration i at step i - 1;
    the initial one (before any step) is logged last, at step 0."""
    rows = list(csv.DictReader((out_dir / "logs" / "csv" / "version_0" / "metrics.csv").open()))
    *during, initial = [(int(row["step"]), float(row["val_loss"])) for row in rows if row.get("val_loss")]
    return {0: initial[1], **{(step + 1) * tokens_per_iteration: loss for step, loss in during}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense-tokens", type=int, default=300_000)
    parser.add_argument("--moe-tokens", type=int, default=300_000)
    args = parser.parse_args()
    common = [f"--eval.interval={EVERY}", "--eval.max_iters=8", "--train.save_interval=1000"]
    with tempfile.TemporaryDirectory() as tmp:
        dense = Path(tmp) / "dense"
        dense_run = run_train(["--model=Dense-tiny", f"--out_dir={dense}", f"--train.max_tokens={args.dense_tokens}",
                               *common])  # fmt: skip
        curves = {}
        for name, start in (("upcycled", [f"--upcycle-from={dense / 'final'}"]), ("scratch", [])):
            out_dir = Path(tmp) / name
            run = run_train([f"--out_dir={out_dir}", f"--train.max_tokens={args.moe_tokens}", *common, *start])
            curves[name] = validation_losses(out_dir, run.tokens_per_micro_batch)
    print(f"Dense-tiny after {args.dense_tokens:,} tokens: val loss {dense_run.summary.val_loss:.3f}")
    print("| MoE-tiny tokens trained | val loss, upcycled from Dense-tiny | val loss, from scratch |")
    print("| ---: | ---: | ---: |")
    for tokens in sorted(curves["scratch"]):
        print(f"| {tokens:,} | {curves['upcycled'].get(tokens, float('nan')):.3f} | {curves['scratch'][tokens]:.3f} |")


if __name__ == "__main__":
    main()
