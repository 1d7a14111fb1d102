"""Sample text from a checkpoint written by run_train.py.

uv run python generate.py --checkpoint out/moe-tiny/final --prompt "The for statement"
uv run python generate.py --checkpoint out/moe-tiny --temperature 0 --max_new_tokens 50 < prompt.txt
"""

if __name__ == "__main__":
    from litmoe.core.cli import run_command

    run_command("litmoe.inference.generate:generate")
