"""Export a run_train.py checkpoint to Hugging Face format (Mixtral architecture).

uv run python export_hf.py --checkpoint out/moe-200m/final --out_dir hf/moe-200m
"""

if __name__ == "__main__":
    from litmoe.core.cli import run_command

    run_command("litmoe.inference.export:export_hf")
