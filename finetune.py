"""Fine-tune a checkpoint written by run_train.py with LitGPT's own loops and litmoe's MoE layer.

uv run python finetune.py lora out/moe-tiny/final --data JSON --data.json_path data.json --out_dir out/lora
uv run python finetune.py full out/moe-tiny/final --data JSON --data.json_path data.json --out_dir out/full
uv run python finetune.py lora --help     (LitGPT's flags for a mode)
"""

if __name__ == "__main__":
    from litmoe.core.cli import run_command

    run_command("litmoe.finetuning.command:main", parses_its_flags=True)
