"""A real 2-process data-parallel run on CPU (DDP over gloo), launched as users launch it."""

import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, tiny_run_args
from test_train import logged


def run_two_ranks(args: list[str]) -> str:
    command = [sys.executable, "run_train.py", *args, "--devices", "2", "--strategy", "ddp", "--num_workers", "0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_two_ranks_train_on_different_data_stay_in_sync_and_resume(prepared, tiny_model_file, tmp_path):
    budget = 2 * 4 * 64 * 6  # 6 iterations of micro-batch 4 x 64 tokens on each of 2 ranks
    extra = ("--train.global_batch_size", "8", "--train.save_interval", "2", "--eval.interval", "100")
    full = tmp_path / "full"
    out = run_two_ranks(tiny_run_args(prepared, tiny_model_file, full, budget, extra))
    assert "Strategy: DDP across 2 ranks (--strategy ddp)" in out
    assert "Data parallel: 2 ranks read different first batches" in out
    assert "Data parallel: parameters identical on all 2 ranks after training" in out
    assert (full / "final" / "lit_model.pth").is_file()

    resumed = tmp_path / "resumed"  # interrupted after its second checkpoint
    shutil.copytree(full / "step-00000004", resumed / "step-00000004")
    out = run_two_ranks(tiny_run_args(prepared, tiny_model_file, resumed, budget, (*extra, "--resume", "auto")))
    assert "Resuming from" in out and "step-00000004" in out
    expected, got = logged(full, "loss"), logged(resumed, "loss")
    assert sorted(got) == [4, 5]
    assert all(got[step] == pytest.approx(expected[step], rel=1e-4) for step in got)
