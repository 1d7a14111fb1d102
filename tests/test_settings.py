"""Valid input works: every documented spelling of a setting reaches the run, checked by reading the value the
optimizer and the loop really used."""

import json
import re
import runpy
import sys

import pytest
import yaml
from conftest import REPO, make_documents
from test_train import logged

from litmoe.core.cli import flag_types, normalize_flags, normalize_settings, take_section_flags
from litmoe.core.user_files import read_yaml
from litmoe.data.prepared import MANIFEST
from litmoe.training.cli import main
from litmoe.training.run import setup
from litmoe.training.settings import resolve_optimizer

ADAMW = "torch.optim.AdamW"
CONFIGURED = {"class_path": ADAMW, "init_args": {"lr": 3e-3, "weight_decay": 0.1}}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--optimizer.init_args.lr", "1e-3"], {"class_path": ADAMW, "init_args": {"lr": 1e-3, "weight_decay": 0.1}}),
        (["--optimizer.lr=2e-3", "--optimizer.betas", "[0.9, 0.99]"],
         {"class_path": ADAMW, "init_args": {"lr": 2e-3, "weight_decay": 0.1, "betas": [0.9, 0.99]}}),
        (["--optimizer", "SGD", "--optimizer.lr", "0.1"], {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}),
        (["--optimizer", '{"class_path": "torch.optim.Adam", "init_args": {"lr": 5e-4}}'],
         {"class_path": "torch.optim.Adam", "init_args": {"lr": 5e-4}}),
        (["--optimizer.class_path", "torch.optim.RMSprop"], {"class_path": "torch.optim.RMSprop", "init_args": {}}),
        ([], CONFIGURED),
    ],
)  # fmt: skip
def test_every_optimizer_spelling_resolves(argv, expected):
    rest, flags = take_section_flags(["--seed", "1", *argv], "--optimizer")
    assert rest == ["--seed", "1"]
    assert resolve_optimizer(CONFIGURED, flags) == expected


def test_numbers_as_users_write_them():
    assert read_yaml("3e-4") == 3e-4 and read_yaml("[0.9, 1e-3]") == [0.9, 1e-3] and read_yaml("abc") == "abc"
    types = flag_types(setup)
    argv = ["--train.max_tokens", "2e6", "--train.micro_batch_size=1.6e1", "--seed", "1e1", "--out_dir", "1e3"]
    assert normalize_flags(argv, types) == [
        "--train.max_tokens", "2000000", "--train.micro_batch_size=16", "--seed", "10", "--out_dir", "1e3",
    ]  # fmt: skip
    settings = {"train": {"max_tokens": read_yaml("2e8"), "min_lr": read_yaml("3e-5")}, "out_dir": "1e3"}
    assert normalize_settings(settings, types) == {
        "train": {"max_tokens": 200_000_000, "min_lr": 3e-5},
        "out_dir": "1e3",
    }


def test_yaml_merge_keys_work_and_the_mapping_s_own_keys_win():
    text = "base: &base {micro_batch_size: 4, max_tokens: 1e6}\ntrain:\n  <<: *base\n  max_tokens: 2e6\n"
    assert read_yaml(text)["train"] == {"micro_batch_size": 4, "max_tokens": 2e6}
    with pytest.raises(yaml.YAMLError, match="the key 'max_tokens' is given twice"):
        read_yaml("train:\n  <<: {a: 1}\n  max_tokens: 1\n  max_tokens: 2\n")


def test_a_setting_given_twice_in_one_config_file_is_refused(tmp_path):
    """As a dotted key and under its section: one line names it (the nested one was kept silently)."""
    from litmoe.core.errors import UserError

    config = tmp_path / "mine.yaml"
    config.write_text("train.max_tokens: 2048\noptimizer:\n  init_args:\n    lr: 0.1\ntrain:\n  max_tokens: 4096\n")
    with pytest.raises(UserError) as refused:
        main(["--config", str(config), "--estimate"])
    assert str(refused.value) == (
        f"{config}: train.max_tokens is set twice, as `train.max_tokens:` and under `train:`; keep one"
    )
    config.write_text("optimizer.init_args.lr: 0.2\noptimizer:\n  init_args:\n    lr: 0.1\n")
    with pytest.raises(UserError, match="optimizer.init_args.lr is set twice, as `optimizer.init_args.lr:` and under"):
        main(["--config", str(config), "--estimate"])


def test_documented_flags_reach_the_optimizer_and_the_loop(train_args, tmp_path):
    """README: `--optimizer.init_args.lr 1e-3`, `--train.max_tokens 2e6`; the loop's learning rate peaks at the
    optimizer's lr after warmup, and the budget is the number of tokens trained."""
    out_dir = tmp_path / "run"
    run = main(train_args(out_dir, extra=("--optimizer.init_args.lr", "2e-2", "--train.max_tokens", "2.56e3")))
    assert max(logged(out_dir, "learning_rate").values()) == pytest.approx(2e-2)
    assert run.summary.tokens == 2560
    saved = read_yaml((out_dir / "final" / "hyperparameters.yaml").read_text())
    assert saved["optimizer"]["init_args"]["lr"] == 2e-2 and saved["train"]["max_tokens"] == 2560


def run_prepare(argv: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["prepare_data.py", *argv])
    runpy.run_path(str(REPO / "prepare_data.py"), run_name="__main__")


def test_bare_force_rebuilds_and_a_single_text_file_is_split_into_documents(tmp_path, monkeypatch):
    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(make_documents(count=40, sentences=5, seed=3)) + "\n")
    out_dir = tmp_path / "data"
    argv = ["--source", str(book), "--out_dir", str(out_dir), "--vocab_size", "300", "--val_fraction", "0.2"]
    run_prepare(argv, monkeypatch)
    manifest = json.loads((out_dir / MANIFEST).read_text())
    assert manifest["documents"]["train"] + manifest["documents"]["val"] == 40 and manifest["documents"]["val"] > 0
    first = (out_dir / MANIFEST).stat().st_mtime_ns
    run_prepare([*argv, "--force"], monkeypatch)  # bare, as the README shows it
    assert (out_dir / MANIFEST).stat().st_mtime_ns != first
    assert sorted(path.name for path in tmp_path.iterdir()) == ["book.txt", "data"]


def test_help_shows_this_runs_defaults_and_explains_the_short_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(REPO / "train_config.yaml"), "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--train.max_tokens MAX_TOKENS Total number of tokens to train on (type: int | None, default: 700000)" in (
        help_text
    )  # the cpu profile's budget, not the dataclass's null
    assert "default: out/moe-tiny" in help_text
    for line in ("--compile compile the model with torch.compile (--optimization.compile=true)",
                 "--keep-last keep only the newest N step-* checkpoints (--checkpoint.keep_last)",
                 "--profile NAME apply the train config's profile NAME (cpu, small-gpu)"):  # fmt: skip
        assert line in help_text
    # LitGPT's shared argument classes: what pretraining does not read says so, and each such flag still exists
    from litmoe.training.cli import NOT_READ_HERE

    for dest, note in NOT_READ_HERE.items():
        assert (
            f"--{dest} {dest.split('.')[1].upper()} ({note})" in help_text
            or f"--{dest} {{true,false}} ({note})" in (help_text)
        ), dest


def test_the_small_gpu_profile_fits_six_gigabytes(capsys, tmp_path):
    main(["--config", str(REPO / "train_config.yaml"), "--profile", "small-gpu", "--estimate",
          "--data_dir", str(tmp_path / "none")])  # fmt: skip
    out = capsys.readouterr().out
    assert "Using the small-gpu profile of the train config (micro-batch 1)" in out
    assert "strategy: DeepSpeed ZeRO-2 across 1 rank, optimizer offloaded to CPU memory" in out
    assert "with activation checkpointing" in out
    total = float(re.search(r"total +([0-9.]+) GiB", out)[1])
    assert 2 < total < 5.5  # bf16 weights and gradients, one checkpointed micro-batch: room for the runtime


def test_a_tilde_in_an_output_path_is_the_home_directory():
    """`out_dir: ~/runs/a` in a config file or `--out_dir=~/runs/a` reaches us unexpanded: checkpoints and logs
    must land in one place, the home directory's."""
    from pathlib import Path

    from litmoe.core.outputs import check_output

    assert check_output("~/runs/a", "--out_dir") == Path.home() / "runs" / "a"


def test_a_capacity_that_drops_most_tokens_is_said(capsys):
    from litmoe.core.args import MoEArgs
    from litmoe.training.settings import check_moe

    check_moe(MoEArgs(capacity_factor=1.25))
    assert capsys.readouterr().out == ""
    check_moe(MoEArgs(capacity_factor=1e-9))
    assert "--moe.capacity_factor 1e-09: most routed tokens will skip their experts" in capsys.readouterr().out
