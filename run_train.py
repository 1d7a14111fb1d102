"""Pretrain an MoE language model with LitGPT's pretrain loop.

uv run python run_train.py                          # the recipe on a GPU, a CPU-sized run without one
uv run python run_train.py --compile --flash-attention --progress
uv run python run_train.py --resume auto            # continue from the newest checkpoint
uv run python run_train.py --help                   # every setting
"""

if __name__ == "__main__":  # litdata and torch start worker processes with spawn: keep this guard
    from litmoe.core.cli import run_command

    run_command("litmoe.training.cli:main", parses_its_flags=True)
