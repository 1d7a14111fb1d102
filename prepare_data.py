"""Turn text into training data for run_train.py.

uv run python prepare_data.py                                  # Python's own documentation, no download
uv run python prepare_data.py --source my_texts/ --out_dir data/mine
uv run python prepare_data.py --source chats.jsonl --tokenizer_dir checkpoints/some/tokenizer
uv run python prepare_data.py --source tinystories --out_dir data/tinystories
"""

if __name__ == "__main__":  # litdata and torch start worker processes with spawn: keep this guard
    from litmoe.core.cli import run_command

    run_command("litmoe.data.prepare:prepare")
