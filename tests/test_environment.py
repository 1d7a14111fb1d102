import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import REPO

from litmoe.distributed.environment import Check, check_environment
from litmoe.training.cli import main


def test_check_environment_reports_without_training(tmp_path, capsys):
    out_dir = tmp_path / "runs" / "new"
    result = main(["--config", str(REPO / "train_config.yaml"), "--out_dir", str(out_dir), "--check-environment"])
    assert result is None and not out_dir.exists()  # nothing trained, nothing written
    out = capsys.readouterr().out
    for name in ("torch", "litgpt", "DeepSpeed", "CPU", f"disk at {out_dir}"):
        assert f"] {name}" in out
    assert torch.__version__ in out
    for line in ("cpu_adam: {} be built (for optimizer offload)", "async_io: {} be built (for NVMe offload)"):
        assert line.format("can") in out or line.format("cannot") in out  # a C++ compiler, libaio: per machine


def test_verdicts_come_with_fixes_where_something_is_missing(tmp_path):
    checks = {check.name: check for check in check_environment(tmp_path)}
    assert checks["litgpt"].verdict == "ok" and checks["litgpt"].detail == "0.5.13"
    if not torch.cuda.is_available():
        assert checks["CUDA GPUs"].verdict == "warn" and "CUDA_VISIBLE_DEVICES" in checks["CUDA GPUs"].fix
    missing = [check for check in checks.values() if check.verdict == "missing"]
    assert all(check.fix for check in missing)
    ops = [check for check in check_environment(tmp_path) if check.name == "DeepSpeed op"]
    assert len(ops) == 2 and all(check.fix for check in ops if check.verdict != "ok")
    from deepspeed.accelerator import get_accelerator

    for check, builder in zip(ops, ("CPUAdamBuilder", "AsyncIOBuilder"), strict=True):
        buildable = get_accelerator().create_op_builder(builder).is_compatible(verbose=False)
        assert (check.verdict == "ok") == buildable, check  # the verdict is DeepSpeed's own, on this machine
    assert Check("x", "missing", "gone", "install it").line() == "[missing] x                  gone  -> install it"


def test_the_report_is_ours_alone_in_a_real_process(tmp_path):
    """No dependency's log line (DeepSpeed's guess of the accelerator) among the report's lines."""
    command = [sys.executable, "run_train.py", "--check-environment", "--out_dir", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "] DeepSpeed" in result.stdout
    assert "real_accelerator" not in result.stdout + result.stderr and "[WARNING]" not in result.stdout + result.stderr


def test_a_stalled_rank_is_one_line_past_the_timeout_and_is_not_left_behind():
    """A rank stopped with SIGSTOP (alive, connected, silent) while the other waits in a collective: once the
    timeout passes, the waiting rank prints one line saying so, exits with EXIT_PEER_LOST and kills the rank it
    started (a stopped process would otherwise stay forever)."""
    from litmoe.core.errors import EXIT_PEER_LOST

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MASTER_PORT": str(port), "TIMEOUT_SECONDS": "3"}
    env.pop("RANK", None)
    start = time.monotonic()
    result = subprocess.run([sys.executable, "tests/stalled_rank.py"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    stopped = int(re.search(r"rank 1 pid (\d+)", result.stdout).group(1))
    try:
        assert result.returncode == EXIT_PEER_LOST, result.stderr[-2000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: rank 0 on "), result.stderr[-2000:]
        assert "a collective with the other ranks failed (Timed out waiting 3000ms" in lines[0]
        assert "stalled past --timeout-minutes" in lines[0]
        deadline = time.monotonic() + 10
        while "stopped" in process_state(stopped) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "stopped" not in process_state(stopped), "the stopped rank was left behind"
        assert time.monotonic() - start < 60
    finally:  # never leave it to the machine (and never signal a process that took its pid since)
        if "stopped" in process_state(stopped):
            os.kill(stopped, signal.SIGKILL)


def process_state(pid: int) -> str:
    """/proc's state line of `pid` ('State:\tT (stopped)'), or 'gone'."""
    try:
        return next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State"))
    except (OSError, StopIteration):
        return "gone"


def test_only_a_collective_that_lost_a_peer_is_one_line_about_the_peers():
    """gloo's own words when a peer's process is gone (kill -9 of a rank), and errors that are not about peers."""
    from litmoe.core.peers import peer_failure

    gloo = RuntimeError(
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:5552:"
        " Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the application."
        " Check the logs of the remote worker before reporting an error. GLHF!"
    )
    line = peer_failure(gloo)
    assert line.startswith("rank 0 on ") and "failed (Read error [127.0.0.1]:5552: Connection reset by peer);" in line
    assert "(a training run keeps its last checkpoint: --resume auto once every rank can run)" in line
    assert peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 2x2)")) is None
    assert peer_failure(ValueError("NCCL")) is None
