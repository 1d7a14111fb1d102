"""Export a run_train.py checkpoint to Hugging Face format (Mixtral architecture).

uv run python export_hf.py --checkpoint out/moe-200m/final --out_dir hf/moe-200m
"""

if __name__ == "__main__":
    from jsonargparse import CLI

    from litmoe.cli import run_cli
    from litmoe.export import export_hf

    run_cli(lambda: CLI(export_hf, as_positional=False))
