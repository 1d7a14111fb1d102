import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from litmoe.inference.loading import resolve_checkpoint_dir
from litmoe.model.configs import register_configs

register_configs()  # the presets, for Config.from_name in every test

REPO = Path(__file__).resolve().parents[1]

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the robot", "a small bird", "the teacher"]
VERBS = ["sees", "likes", "follows", "draws", "finds", "paints", "carries"]
OBJECTS = ["a red ball", "the green door", "some warm bread", "a tiny boat", "the blue sky", "an apple"]
ENDINGS = ["today.", "in the garden.", "at night.", "with joy.", "by the river.", "again."]


def make_documents(count: int, sentences: int, seed: int = 0) -> list[str]:
    """Small, learnable English-like documents (a toy grammar), the same on every run."""
    rng = random.Random(seed)
    return [
        " ".join(
            f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}"
            for _ in range(sentences)
        )
        for _ in range(count)
    ]


@pytest.fixture(scope="session")
def text_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("texts")
    for index, document in enumerate(make_documents(count=60, sentences=40)):
        (folder / f"doc{index:03d}.txt").write_text(document, encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, text_folder) -> Path:
    from litmoe.data.prepare import prepare

    out_dir = tmp_path_factory.mktemp("prepared") / "data"
    prepare(source=str(text_folder), out_dir=out_dir, vocab_size=300, val_fraction=0.2)
    return out_dir


TINY_MODEL = """\
name: test-moe
block_size: 64
vocab_size: 300
padding_multiple: 64
n_layer: 2
n_embd: 64
n_head: 4
n_query_groups: 2
norm_class_name: RMSNorm
bias: false
parallel_residual: false
rotary_percentage: 1.0
mlp_class_name: LLaMAMoE
intermediate_size: 128
moe_intermediate_size: 128
n_expert: 4
n_expert_per_token: 2
"""


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.yaml"
    path.write_text(TINY_MODEL)
    return path


def tiny_run_args(prepared: Path, model_file: Path, out_dir: Path, max_tokens: int, extra=()) -> list[str]:
    """Command-line arguments for a training run of a few seconds on the tiny model."""
    return [
        "--config", str(REPO / "train_config.yaml"),
        "--model", str(model_file),
        "--data_dir", str(prepared),
        "--out_dir", str(out_dir),
        "--train.max_tokens", str(max_tokens),
        "--train.micro_batch_size", "4",
        "--train.global_batch_size", "4",
        "--train.max_seq_length", "64",
        "--train.lr_warmup_steps", "2",
        "--train.log_interval", "1",
        "--train.save_interval", "4",
        "--eval.interval", "8",
        "--eval.max_iters", "4",
        "--optimizer.init_args.lr", "0.01",
        *extra,
    ]  # fmt: skip


def run_train_process(args: list[str], **env: str) -> str:
    """run_train.py in its own process, as users launch it (needed where torch.distributed gets initialised);
    returns its stdout and fails the test with its output's tail when it fails. A run here takes 30-90 s; the
    timeout turns a hang into a failure before it eats the CI budget."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    command = [sys.executable, "run_train.py", *args, "--num_workers", "0"]
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def litgpt(*args: str) -> None:
    """The `litgpt` command line, in this process (its entry point, `litgpt.__main__:main`)."""
    from litgpt.__main__ import main

    argv = sys.argv
    sys.argv = ["litgpt", *args]
    try:
        main()
    finally:
        sys.argv = argv


def final_weights(out_dir: Path) -> dict:
    """The model weights of a run's final checkpoint (DeepSpeed shards are consolidated first)."""
    return torch.load(resolve_checkpoint_dir(out_dir / "final") / "lit_model.pth", weights_only=False)["model"]


@pytest.fixture
def train_args(prepared, tiny_model_file, tmp_path):
    def build(out_dir: Path | None = None, max_tokens: int = 4096, extra: tuple[str, ...] = ()) -> list[str]:
        return tiny_run_args(prepared, tiny_model_file, out_dir or tmp_path / "out", max_tokens, extra)

    return build


@pytest.fixture(scope="session")
def trained(tmp_path_factory, prepared, tiny_model_file) -> Path:
    """A tiny model trained once for the whole session: its training output dir."""
    from litmoe.training.cli import main

    out_dir = tmp_path_factory.mktemp("trained") / "out"
    main(tiny_run_args(prepared, tiny_model_file, out_dir, max_tokens=256 * 30, extra=("--eval.interval", "100")))
    return out_dir
