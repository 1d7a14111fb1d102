"""LoRA fine-tuning tokens/s: finetune.py (litmoe's layer) against `litgpt finetune_lora` (LitGPT's own LLaMAMoE),
the same checkpoint, data and flags, each variant in a process of its own, alternating for --rounds.

    uv run python benchmarks/finetune_speed.py --checkpoint out/moe-tiny/final --steps 20 --rounds 2

Both read the base weights finetune.py writes into OUT/base/ (LitGPT's command needs them converted). The rate
is LitGPT's own end-of-run `Tok/sec` (tokens over the whole fine-tuning loop, warm-up steps included).
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def instructions(path: Path, count: int) -> Path:
    words = "the cat sees a red ball in the garden today and the dog follows it home".split()
    examples = [
        {"instruction": f"Repeat {i}: " + " ".join(words[(i + j) % len(words)] for j in range(24)), "input": "",
         "output": " ".join(words[(3 * i + j) % len(words)] for j in range(40))}
        for i in range(count)
    ]  # fmt: skip
    path.write_text(json.dumps(examples))
    return path


def tokens_per_second(command: list[str]) -> float:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    rate = re.search(r"Tok/sec\s*:\s*([0-9.]+)", result.stdout)
    if rate is None:
        sys.exit(f"no Tok/sec in the output of {' '.join(command)}")
    return float(rate.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--micro_batch_size", type=int, default=4)
    parser.add_argument("--precision", default=None, help="LitGPT's default when not given (bf16-true on a GPU)")
    parser.add_argument("--lora_mlp", action="store_true", help="LoRA on the router and the experts too")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="finetune-speed-"))
    data = instructions(work / "data.json", 400)
    flags = [
        "--data", "JSON", "--data.json_path", str(data), "--data.val_split_fraction", "0.05",
        "--train.max_steps", str(args.steps), "--train.micro_batch_size", str(args.micro_batch_size),
        "--train.global_batch_size", str(args.micro_batch_size), "--train.lr_warmup_steps", "1",
        "--train.save_interval", "100000", "--eval.interval", "100000", "--eval.initial_validation", "false",
        "--eval.final_validation", "false", "--devices", "1", "--lora_mlp", str(args.lora_mlp).lower(),
        *(["--precision", args.precision] if args.precision else []),
    ]  # fmt: skip
    rates: dict[str, list[float]] = {"litmoe": [], "LitGPT": []}
    for round_ in range(args.rounds):
        ours = work / f"litmoe-{round_}"
        command = [sys.executable, "finetune.py", "lora", str(args.checkpoint), *flags, "--out_dir", str(ours)]
        rates["litmoe"].append(tokens_per_second(command))
        stock = [sys.executable, "-m", "litgpt", "finetune_lora", str(ours / "base"), *flags,
                 "--out_dir", str(work / f"litgpt-{round_}")]  # fmt: skip
        rates["LitGPT"].append(tokens_per_second(stock))
    best = {name: max(values) for name, values in rates.items()}
    print(f"| layer | tokens/s (best of {args.rounds}) | each round | vs LitGPT |")
    print("| --- | ---: | --- | ---: |")
    for name, values in rates.items():
        each = ", ".join(f"{value:,.0f}" for value in values)
        print(f"| {name} | {best[name]:,.0f} | {each} | {best[name] / best['LitGPT']:.2f}x |")


if __name__ == "__main__":
    main()
