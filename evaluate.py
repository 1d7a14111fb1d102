"""Score checkpoints on held-out text: loss, perplexity, bits per byte, expert load.

uv run python evaluate.py --checkpoints [out/moe-tiny/final]
uv run python evaluate.py --checkpoints [out/a/final,out/b/final] --file held_out.txt --out results.json
"""

if __name__ == "__main__":  # litdata starts worker processes with spawn: keep this guard
    from litmoe.core.cli import run_command

    run_command("litmoe.inference.evaluate:evaluate")
