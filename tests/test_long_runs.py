"""What a multi-day run meets, and survives: signals, kill -9 during a save, a full disk, divergence, a second run
in the same directory, a resume with other settings, a finished run resumed again."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import REPO
from test_train import logged

import litmoe.training.saving
from litmoe.core.checkpoint_io import latest_sound_checkpoint, load_state, read_progress
from litmoe.core.errors import EXIT_DIVERGED, EXIT_OUT_OF_MEMORY, EXIT_PREEMPTED, RunStopped, UserError
from litmoe.core.run_lock import LOCK_FILE, run_lock
from litmoe.training.cli import main
from litmoe.training.saving import AtomicSave, publish, recover_interrupted_saves

# ------------------------------------------------------------------------------------------ preemption


def start_run(args: list[str], new_session: bool = False) -> subprocess.Popen:
    """run_train.py in the background; `new_session` gives it (and the ranks it spawns) a process group of its own."""
    command = [sys.executable, "run_train.py", *args, "--num_workers", "0"]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=new_session,
    )  # fmt: skip


def signal_when(
    process: subprocess.Popen, marker: str, signum: int, whole_group: bool = False, rank: int = 0
) -> tuple[int, str, str]:
    """Send `signum` to the process (or its whole process group, or the `rank` it launched) once its output shows
    `marker`; returns (status, stdout, stderr)."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if marker in line:
            if whole_group:
                os.killpg(process.pid, signum)
            elif rank:
                os.kill(launched_ranks(process.pid)[rank - 1], signum)
            else:
                process.send_signal(signum)
            break
    out, err = process.communicate(timeout=420)
    return process.returncode, "".join(seen) + out, err


def launched_ranks(pid: int) -> list[int]:
    """The processes of ranks 1, 2, ... that run_train.py (rank 0, `pid`) launched, in order."""
    children = [int(child) for task in Path(f"/proc/{pid}/task").glob("*")
                for child in (task / "children").read_text().split()]  # fmt: skip
    return sorted(child for child in children if "run_train.py" in Path(f"/proc/{child}/cmdline").read_text())


def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint_and_resumes_exactly(train_args, tmp_path):
    budget = 256 * 60
    full = tmp_path / "full"
    main(train_args(full, budget, extra=("--train.save_interval", "100")))
    stopped = tmp_path / "stopped"
    process = start_run(train_args(stopped, budget, extra=("--train.save_interval", "100")))
    status, out, err = signal_when(process, "iter 5 step 5", signal.SIGTERM)
    assert status == EXIT_PREEMPTED, err[-3000:]
    line = next(line for line in err.splitlines() if line.startswith("Stopped by SIGTERM after optimizer step"))
    step = int(line.split("optimizer step ")[1].split(":")[0])
    assert 5 <= step < 60 and f"saved {stopped / f'step-{step:08d}'}; continue with --resume auto" in line
    assert read_progress(stopped / f"step-{step:08d}")["step_count"] == step

    run = main(train_args(stopped, budget, extra=("--train.save_interval", "100", "--resume", "auto")))
    expected, got = logged(full, "loss"), logged(stopped, "loss")
    assert sorted(got) == list(range(60))  # the stopped run logged 0 .. step-1, the resumed one the rest
    assert all(got[index] == pytest.approx(expected[index], rel=1e-5) for index in got)
    assert run.summary.tokens == (60 - step) * 256


def test_a_second_signal_exits_at_once_without_a_checkpoint(train_args, tmp_path):
    out_dir = tmp_path / "out"
    # 16 micro-batches per optimizer step: the second Ctrl-C comes long before the next step boundary
    extra = ("--train.global_batch_size", "64", "--train.save_interval", "1000")
    process = start_run(train_args(out_dir, 256 * 64 * 20, extra=extra))
    for line in process.stdout:
        if "iter 16 step 1" in line:
            process.send_signal(signal.SIGINT)
            break
    first = next(line for line in process.stderr if line.startswith("SIGINT"))
    process.send_signal(signal.SIGINT)  # once the first was handled: the two would merge into one
    _, err = process.communicate(timeout=420)
    assert process.returncode == 128 + signal.SIGINT, err[-2000:]
    assert first == "SIGINT: stopping after this optimizer step, with a checkpoint (again: exit now)\n"
    assert err.splitlines()[-1] == "SIGINT again: exiting now, without a checkpoint"
    assert not list(out_dir.glob("step-*")) and not (out_dir / "final").exists()


# ------------------------------------------------------------------------------------ kill -9 mid-save


class KillPoint:
    """Where a forked save kills itself: before or after one of the save's stages, or part-way through writing
    `lit_model.pth`."""

    def __init__(self, name: str, target: str, when: str) -> None:
        self.name, self.target, self.when = name, target, when

    def arm(self) -> None:  # runs in the forked child only
        if self.target == "torch.save":
            real_save = torch.save

            def half_then_die(obj, file, *args, **kwargs):
                real_save(obj, file, *args, **kwargs)
                file.truncate(file.tell() // 2)
                file.flush()
                os.kill(os.getpid(), signal.SIGKILL)

            litmoe.training.saving.torch.save = half_then_die
            return
        real = getattr(litmoe.training.saving, self.target)

        def dying(*args, **kwargs):
            if self.when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            result = real(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
            return result

        setattr(litmoe.training.saving, self.target, dying)


KILL_POINTS = [
    KillPoint("before anything", "require_finite_weights", "before"),
    KillPoint("writing lit_model.pth", "torch.save", "during"),
    KillPoint("before the progress record", "record_progress", "before"),
    KillPoint("before fsync", "fsync_tree", "before"),
    KillPoint("after fsync", "fsync_tree", "after"),
    KillPoint("before the rename", "publish", "before"),
    KillPoint("after the rename", "publish", "after"),
    KillPoint("before retention", "remove_old_checkpoints", "before"),
]
KILL_DELAYS = (0.0005, 0.002, 0.005, 0.01)  # seconds into the save; where that lands varies, the rules do not


@pytest.fixture
def fork_safe_threads():
    """One intra-op thread: a forked child must not wait on the parent's OpenMP worker threads, which fork does
    not copy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def killed_save(save: Callable[[], None], point: KillPoint | float) -> None:
    """Run `save` in a forked child and kill it at `point` (a KillPoint, or a delay in seconds)."""
    child = os.fork()
    if child == 0:
        try:
            if isinstance(point, KillPoint):
                point.arm()
            save()
        finally:
            os._exit(0)
    if not isinstance(point, KillPoint):
        time.sleep(point)
        os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)


def assert_only_complete_checkpoints(out_dir: Path, tmp_dir: Path) -> Path:
    """Every visible checkpoint loads and records its own step; no temporary file anywhere else."""
    visible = sorted(out_dir.glob("step-*")) + sorted(out_dir.glob("final"))
    for checkpoint in visible:
        state = load_state(checkpoint / "lit_model.pth")
        assert read_progress(checkpoint)["iter_num"] == state["iter_num"]
        assert {"model_config.yaml", "tokenizer.json", "hyperparameters.yaml"} <= {p.name for p in checkpoint.iterdir()}
    assert list(tmp_dir.iterdir()) == []
    newest = latest_sound_checkpoint(out_dir)
    assert newest is not None
    return newest


@pytest.mark.parametrize("tmp_on", ["same filesystem", "another filesystem"])
def test_kill_9_at_any_moment_of_a_save_leaves_a_resumable_run(
    train_args, tmp_path, monkeypatch, tmp_on, fork_safe_threads
):
    """Saves at every step of a real run; before each real save, a forked copy of the process runs the same save
    and is killed at a different moment. Afterwards only complete checkpoints are visible, nothing is left in
    $TMPDIR, and --resume auto continues from the newest complete one."""
    shared_memory = Path("/dev/shm")
    if tmp_on == "another filesystem" and not shared_memory.is_dir():
        pytest.skip("no /dev/shm: no second filesystem to put $TMPDIR on")
    base = shared_memory if tmp_on == "another filesystem" else tmp_path
    tmp_dir = Path(tempfile.mkdtemp(dir=base))
    monkeypatch.setenv("TMPDIR", str(tmp_dir))
    monkeypatch.setattr("tempfile.tempdir", None)
    assert (os.stat(tmp_dir).st_dev == os.stat(tmp_path).st_dev) == (tmp_on == "same filesystem")

    points = [*KILL_POINTS, *KILL_DELAYS]
    out_dir = tmp_path / "out"
    real_call = AtomicSave.__call__
    newest_seen = []

    def save_after_a_killed_one(self, fabric, state, tokenizer_dir, checkpoint_file):
        if points:
            killed_save(partial(real_call, self, fabric, state, tokenizer_dir, checkpoint_file), points.pop(0))
            if newest_seen:  # from the second save on, a complete checkpoint exists
                newest_seen.append(assert_only_complete_checkpoints(out_dir, tmp_dir))
            if not points:  # the last kill stands for the crash: the run ends here, unsaved
                raise KeyboardInterrupt
        real_call(self, fabric, state, tokenizer_dir, checkpoint_file)
        newest_seen.append(assert_only_complete_checkpoints(out_dir, tmp_dir))

    budget = 256 * 20
    args = ("--train.save_interval", "1", "--checkpoint.keep_last", "3", "--eval.interval", "1000")
    monkeypatch.setattr(AtomicSave, "__call__", save_after_a_killed_one)
    with pytest.raises(KeyboardInterrupt):
        main(train_args(out_dir, budget, extra=args))
    monkeypatch.setattr(AtomicSave, "__call__", real_call)
    assert len(newest_seen) > len(KILL_POINTS) + len(KILL_DELAYS) - 2
    newest = assert_only_complete_checkpoints(out_dir, tmp_dir)
    assert len(list(out_dir.glob("step-*"))) == 3  # keep_last 3

    trained = read_progress(newest.parent)["tokens"]
    run = main(train_args(out_dir, budget, extra=(*args, "--resume", "auto")))
    assert run.summary.tokens == budget - trained
    assert (out_dir / "final" / "lit_model.pth").is_file()
    assert not list(out_dir.glob(".*"))  # what the killed saves left was cleaned up when the run started again
    assert list(tmp_dir.iterdir()) == []
    shutil.rmtree(tmp_dir)


def test_a_checkpoint_moved_aside_for_its_replacement_is_restored(tmp_path):
    """Killed between publish's two renames: the old checkpoint is moved back on the next start."""
    old, new = tmp_path / "final", tmp_path / ".final.partial"
    for directory, text in ((old, "old"), (new, "new")):
        directory.mkdir()
        (directory / "lit_model.pth").write_text(text)
    child = os.fork()
    if child == 0:
        Path.rename = lambda self, target, real=Path.rename: (real(self, target), os.kill(os.getpid(), 9))
        publish(new, old)
        os._exit(0)
    os.waitpid(child, 0)
    assert not old.exists() and (tmp_path / ".final.old").is_dir()
    recover_interrupted_saves(tmp_path)
    assert (old / "lit_model.pth").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["final"]


# ---------------------------------------------------------------------------------------------- disk full


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB tmpfs (mounting needs root, or CAP_SYS_ADMIN)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount_point)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip() or 'not permitted'})")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_a_full_disk_stops_with_one_line_and_keeps_the_previous_checkpoint(train_args, small_disk, capsys):
    # a checkpoint of the tiny model is about 3.2 MB: the first fits in 6 MB, the second does not
    out_dir = small_disk / "out"
    with pytest.raises(UserError) as error:
        main(train_args(out_dir, 256 * 8, extra=("--train.save_interval", "2", "--eval.interval", "1000")))
    message = str(error.value)
    assert (
        f"{out_dir}: no space left to save step-00000004/ (" in message and "free, a checkpoint needs about" in message
    )
    assert "the previous checkpoints are intact" in message
    assert "less than two checkpoints" in capsys.readouterr().out  # warned before the first save
    assert load_state(out_dir / "step-00000002" / "lit_model.pth")["step_count"] == 2
    assert sorted(path.name for path in out_dir.iterdir()) == ["logs", "step-00000002"]


# ------------------------------------------------------------------------------------------------ health


def test_a_huge_learning_rate_stops_cleanly_with_a_finite_last_checkpoint(train_args, tmp_path):
    out_dir = tmp_path / "out"
    args = ("--optimizer.init_args.lr", "1e30", "--train.save_interval", "2", "--eval.interval", "1000")
    with pytest.raises(RunStopped) as stop:
        main(train_args(out_dir, 256 * 12, extra=args))
    assert stop.value.exit_code == EXIT_DIVERGED
    message = stop.value.message
    assert message.startswith("error: training stopped: non-finite gradient norm (nan) at step 3.")
    assert f"The last good checkpoint is {out_dir / 'step-00000002'}; try a lower --optimizer.lr" in message
    weights = load_state(out_dir / "step-00000002" / "lit_model.pth")["model"]
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert sorted(path.name for path in out_dir.iterdir()) == ["logs", "step-00000002"]
    events = [json.loads(line) for line in (out_dir / "logs" / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "stopped" and events[-1]["step"] == 3


def fault_in_training_batch(monkeypatch, number: int, fault: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """LitGPT's loss, with `fault` applied to the loss of the `number`-th training micro-batch (not validation's)."""
    import litgpt.pretrain

    real_loss, calls = litgpt.pretrain.chunked_cross_entropy, []

    def faulty(logits, targets, *args, **kwargs):
        loss = real_loss(logits, targets, *args, **kwargs)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == number:
                return fault(loss)
        return loss

    monkeypatch.setattr(litgpt.pretrain, "chunked_cross_entropy", faulty)


def test_out_of_gpu_memory_is_one_line_naming_the_last_checkpoint(train_args, tmp_path, monkeypatch):
    """CUDA's out-of-memory error (a page of allocator statistics) mid-run: one line, exit 4, the checkpoint kept."""

    def out_of_memory(loss: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB ...")

    fault_in_training_batch(monkeypatch, 3, out_of_memory)
    out_dir = tmp_path / "out"
    args = ("--train.save_interval", "2", "--eval.interval", "1000", "--eval.initial_validation", "false")
    with pytest.raises(RunStopped) as stop:
        main(train_args(out_dir, 256 * 12, extra=args))
    assert stop.value.exit_code == EXIT_OUT_OF_MEMORY
    message = stop.value.message
    assert message.startswith("error: out of GPU memory at optimizer step ") and "\n" not in message
    assert f"The last checkpoint is {out_dir / 'step-00000002'}; lower --train.micro_batch_size" in message
    assert (out_dir / "step-00000002" / "lit_model.pth").is_file()


def test_skip_survives_one_bad_batch_and_logs_the_gradient_norm(train_args, tmp_path, monkeypatch, capsys):
    fault_in_training_batch(monkeypatch, 5, lambda loss: loss * float("nan"))
    out_dir = tmp_path / "out"
    run = main(train_args(out_dir, 256 * 10, extra=("--health.nonfinite", "skip", "--eval.interval", "1000")))
    norms = logged(out_dir, "grad_norm")
    assert len(norms) == 10 and sorted(step for step, norm in norms.items() if norm != norm) == [4]  # NaN at step 5
    assert logged(out_dir, "health/skipped_steps")[9] == 1
    losses = logged(out_dir, "loss")  # the bad batch's loss is in the log, not dropped (running_loss_nan_check off)
    assert [step for step, loss in losses.items() if loss != loss] == [4]
    assert run.summary.val_loss < run.summary.initial_val_loss
    assert "Event at step 5: skipped step (grad_norm nan, in_a_row 1)" in capsys.readouterr().out
    assert all(torch.isfinite(t).all() for t in load_state(out_dir / "final" / "lit_model.pth")["model"].values())


# --------------------------------------------------------------------------------- checkpoints and resume


def test_keep_last_removes_older_steps_only_after_a_newer_one_is_complete(train_args, tmp_path):
    """Only checkpoints the run wrote are removed: a file, a folder of notes or a link that is merely named step-*
    is the user's and stays; so does a logs/report.png that no run drew (the report goes beside it)."""
    out_dir = tmp_path / "out"
    (out_dir / "logs").mkdir(parents=True)
    (out_dir / "logs" / "report.png").write_bytes(b"the user's own figure")
    (out_dir / "step-00000003").mkdir(parents=True)
    (out_dir / "step-00000003" / "notes.txt").write_text("mine")
    (out_dir / "step-00000001").write_text("mine too")
    (tmp_path / "elsewhere").mkdir()
    (out_dir / "step-00000005").symlink_to(tmp_path / "elsewhere")
    main(train_args(out_dir, 256 * 10, extra=("--train.save_interval", "2", "--keep-last", "2")))
    assert sorted(path.name for path in out_dir.iterdir() if not path.name.startswith(".")) == [
        "final", "logs", "step-00000001", "step-00000003", "step-00000005", "step-00000008", "step-00000010",
    ]  # fmt: skip
    assert (out_dir / "step-00000003" / "notes.txt").read_text() == "mine" and (tmp_path / "elsewhere").is_dir()
    assert (out_dir / "logs" / "report.png").read_bytes() == b"the user's own figure"
    assert (out_dir / "logs" / "report-2.png").stat().st_size > 10_000


def test_one_run_per_directory(train_args, tmp_path, capsys):
    out_dir = tmp_path / "out"
    with run_lock(out_dir):  # another run holds the directory
        with pytest.raises(UserError, match=rf"{out_dir} is in use by pid {os.getpid()} on .*; wait for that run"):
            main(train_args(out_dir))
    assert not out_dir.exists()  # made for the lock only, removed with it
    out_dir.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = {"host": os.uname().nodename, "pid": int(dead.stdout), "process_start": "1", "started": "yesterday"}
    (out_dir / LOCK_FILE).write_text(json.dumps(holder))
    main(train_args(out_dir, 256 * 2))
    assert f"taking over the lock of pid {holder['pid']}" in capsys.readouterr().out
    assert not (out_dir / LOCK_FILE).exists()


def test_resume_checks_what_changed_against_the_checkpoint(train_args, tmp_path, tiny_model_file, capsys):
    out_dir = tmp_path / "out"
    budget = 256 * 8
    main(train_args(out_dir, budget, extra=("--train.save_interval", "4")))
    for later in ("step-00000008", "final"):  # as if stopped after step 4 of 8
        shutil.rmtree(out_dir / later)

    other_model = tmp_path / "topk1.yaml"
    other_model.write_text(tiny_model_file.read_text().replace("n_expert_per_token: 2", "n_expert_per_token: 1"))
    refused = {
        ("--model", str(other_model)): "the model differs from the checkpoint's (n_expert_per_token 2 -> 1): not",
        ("--train.max_seq_length", "32"): "train.max_seq_length 64 -> 32: not allowed",
        ("--seed", "7"): "seed 42 -> 7: not allowed, the checkpoint's data position depends on it",
        ("--moe.layer", "stock"): "--moe.layer litmoe -> stock: not allowed, the optimizer state holds the",
    }
    for change, message in refused.items():
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            main(train_args(out_dir, budget, extra=("--resume", "auto", *change)))

    progress = read_progress(out_dir / "step-00000004")
    files = sorted((path, path.stat().st_mtime_ns) for path in out_dir.rglob("*"))
    capsys.readouterr()
    two_ranks = ("--devices", "2", "--strategy", "ddp", "--train.global_batch_size", "8")
    main(train_args(out_dir, budget, extra=("--resume", "auto", "--estimate", *two_ranks)))
    out = capsys.readouterr().out
    assert "Resuming on 2 ranks (written by 1): allowed; the data continues from global position 16" in out
    assert f"Resume: {out_dir / 'step-00000004' / 'lit_model.pth'} on 2 ranks, 1,024 tokens trained, 2 optimizer" in out
    assert sorted((path, path.stat().st_mtime_ns) for path in out_dir.rglob("*")) == files  # --estimate writes nothing
    elsewhere = tmp_path / "elsewhere"  # as if written by 2 ranks (tests/test_distributed.py resumes real ones)
    shutil.copytree(out_dir, elsewhere)
    hyperparameters = elsewhere / "step-00000004" / "hyperparameters.yaml"
    saved = hyperparameters.read_text().replace("world_size: 1", "world_size: 2")
    hyperparameters.write_text(saved.replace("global_batch_size: 4", "global_batch_size: 8"))
    capsys.readouterr()
    main(
        train_args(
            elsewhere, budget, extra=("--resume", "auto", "--num_workers", "2", "--train.global_batch_size", "8")
        )
    )
    assert (
        "Resuming on 1 rank (written by 2): allowed; the data continues from global position 16 (1,024 tokens"
        " trained), 8 sequences per optimizer step (gradient accumulation 1 -> 2), 2 optimizer steps left; model"
        " and optimizer state loaded whole"
    ) in capsys.readouterr().out
    assert read_progress(elsewhere / "final")["tokens"] == budget

    capsys.readouterr()
    run = main(train_args(out_dir, budget, extra=("--resume", "auto", "--train.micro_batch_size", "2")))
    assert "train.micro_batch_size 4 -> 2: allowed; iteration 4 continues as 8" in capsys.readouterr().out
    assert run.summary.tokens == budget - progress["tokens"]  # the budget stays exact
    assert read_progress(out_dir / "final")["tokens"] == budget


def test_resume_takes_the_highest_step_whatever_the_file_times_and_never_writes_over_a_later_one(
    train_args, tmp_path, capsys
):
    """A run copied with a plain `cp -r` (file times in the order of the copy) resumes from its highest step; an
    explicit older checkpoint is refused while a later one is in --out_dir, and nothing there changes."""
    out_dir = tmp_path / "out"
    main(train_args(out_dir, 256 * 8, extra=("--train.save_interval", "2", "--eval.interval", "100")))
    shutil.rmtree(out_dir / "final")
    shutil.rmtree(out_dir / "step-00000008")
    later = time.time() + 60
    for path in (out_dir / "step-00000002").rglob("*"):  # the oldest checkpoint, copied last
        os.utime(path, (later, later))
    os.utime(out_dir / "step-00000002", (later, later))
    before = {path: path.stat().st_mtime_ns for path in out_dir.rglob("*")}
    with pytest.raises(UserError) as refused:
        main(train_args(out_dir, 256 * 8, extra=("--resume", str(out_dir / "step-00000004"))))
    assert str(refused.value) == (
        f"--resume {out_dir / 'step-00000004'}: {out_dir} already holds step-00000006/, a later step than"
        " step-00000004/, which training on would write over; continue it (--resume auto), or choose another"
        " --out_dir"
    )
    assert {path: path.stat().st_mtime_ns for path in out_dir.rglob("*")} == before
    capsys.readouterr()
    main(train_args(out_dir, 256 * 8, extra=("--resume", "auto", "--train.save_interval", "2")))
    assert f"Resuming from {out_dir / 'step-00000006' / 'lit_model.pth'}" in capsys.readouterr().out
    assert read_progress(out_dir / "final")["tokens"] == 256 * 8


def test_a_checkpoint_whose_bytes_changed_is_never_loaded(train_args, tmp_path, capsys):
    """Every checkpoint lists its files' SHA-256 in SHA256SUMS (sha256sum's format). A byte flipped inside the
    newest checkpoint (same size, still a valid zip, loaded silently before) is one line in generate.py, and
    `--resume auto` skips to the previous checkpoint with one line."""
    import hashlib

    from litmoe.core.errors import EXIT_CORRUPT, RunStopped, UserError
    from litmoe.inference.generate import generate

    out_dir = tmp_path / "out"
    main(train_args(out_dir, 256 * 4, extra=("--train.save_interval", "2", "--eval.interval", "100")))
    final = out_dir / "final"
    listed = dict(line.split("  ")[::-1] for line in (final / "SHA256SUMS").read_text().splitlines())
    files = {path.relative_to(final).as_posix(): path for path in final.rglob("*") if path.name != "SHA256SUMS"}
    assert listed == {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in files.items()}
    capsys.readouterr()
    assert generate(out_dir, verify=True) == []  # --verify: every checkpoint of the run, nothing loaded
    assert capsys.readouterr().out.splitlines() == [
        f"ok      {out_dir / name}: 5 files match SHA256SUMS" for name in ("step-00000002", "step-00000004", "final")
    ]
    weights = bytearray((final / "lit_model.pth").read_bytes())
    weights[len(weights) // 2] ^= 0x01  # inside a tensor's bytes
    (final / "lit_model.pth").write_bytes(weights)
    with pytest.raises(RunStopped) as failed:
        generate(final, verify=True)
    assert failed.value.exit_code == EXIT_CORRUPT
    assert f"FAILED  {final}: lit_model.pth does not match its checksum in SHA256SUMS" in capsys.readouterr().out

    with pytest.raises(UserError, match="lit_model.pth does not match its checksum in SHA256SUMS"):
        generate(final, prompt="The cat", max_new_tokens=2)
    capsys.readouterr()
    main(train_args(out_dir, 256 * 6, extra=("--resume", "auto", "--train.save_interval", "2")))
    out = capsys.readouterr().out
    assert f"Skipping {final}: lit_model.pth does not match its checksum in SHA256SUMS" in out
    assert f"Resuming from {out_dir / 'step-00000004' / 'lit_model.pth'}" in out
    assert read_progress(final)["tokens"] == 256 * 6


def test_deepspeed_shards_are_hashed_while_written_on_the_rank_that_writes_them(tmp_path, monkeypatch):
    """DeepSpeed writes each rank's shards through its checkpoint engine's `save`; during the strategy's save
    litmoe's swap of it hashes what goes to disk, the digests travel to rank 0 through the folder, and SHA256SUMS
    needs no second read of a shard (in either of DeepSpeed's serializations)."""
    import hashlib
    from types import SimpleNamespace

    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from lightning.fabric.strategies import DeepSpeedStrategy

    from litmoe.core import checksums
    from litmoe.distributed.zero import LoopDeepSpeedStrategy, hashed_engine_save

    shards = tmp_path / "lit_model.pth" / "checkpoint"
    shards.mkdir(parents=True)
    state = {"module": torch.arange(6.0).reshape(2, 3), "step": 4}

    def engine_writes(strategy, path: str, state: dict) -> None:  # Lightning's save: DeepSpeed's engine writes
        TorchCheckpointEngine().save(state, path)  # its own serialization setting: the legacy format

    monkeypatch.setattr(DeepSpeedStrategy, "save_checkpoint", engine_writes)
    strategy = LoopDeepSpeedStrategy.__new__(LoopDeepSpeedStrategy)  # its save alone: no engine is set up
    strategy.save_checkpoint(str(shards / "zero_pp_rank_0_model_states.pt"), state)
    assert TorchCheckpointEngine.save is not hashed_engine_save  # swapped for the save only
    engine = SimpleNamespace(zipfile_serialization=True)  # DeepSpeed's default config: the zip format
    hashed_engine_save(engine, state, str(shards / "zero_pp_rank_1_model_states.pt"))
    checksums.hand_over_digests(tmp_path, rank=1)  # what a rank other than 0 does after its save
    monkeypatch.setattr(checksums, "file_digest", lambda path: pytest.fail(f"{path} was read again"))
    checksums.write_checksums(tmp_path)  # on rank 0
    listed = dict(line.split("  ")[::-1] for line in (tmp_path / "SHA256SUMS").read_text().splitlines())
    assert listed == {
        f"lit_model.pth/checkpoint/{path.name}": hashlib.sha256(path.read_bytes()).hexdigest()
        for path in shards.iterdir()
    }  # and no handed-over digests left in the folder
    loaded = torch.load(shards / "zero_pp_rank_1_model_states.pt", weights_only=True)
    assert torch.equal(loaded["module"], state["module"]) and loaded["step"] == 4


def test_a_finished_run_is_left_alone_until_its_budget_is_raised(train_args, tmp_path, capsys):
    out_dir = tmp_path / "out"
    main(train_args(out_dir, 256 * 4))
    before = {path: path.stat().st_mtime_ns for path in out_dir.rglob("*")}
    assert main(train_args(out_dir, 256 * 4, extra=("--resume", "auto"))) is None
    assert "already trained its budget (1,024 tokens, final/); nothing to do. Raise --train.max_tokens" in (
        capsys.readouterr().out
    )
    assert {path: path.stat().st_mtime_ns for path in out_dir.rglob("*")} == before
    run = main(train_args(out_dir, 256 * 6, extra=("--resume", "auto")))
    assert run.summary.tokens == 256 * 2 and read_progress(out_dir / "final")["tokens"] == 256 * 6


def test_the_default_cpu_run_trains_whole_optimizer_steps_and_is_then_finished(tmp_path, capsys):
    """The CPU profile's budget is not whole optimizer steps: the run trains the whole steps in it (LitGPT's loop
    would also compute the micro-batches of a last partial step, count them as trained and throw them away), says
    so, and is then finished."""
    import yaml
    from litgpt.args import TrainArgs

    from litmoe.training.resume import RunShape, finished_run
    from litmoe.training.saving import record_progress
    from litmoe.training.settings import whole_steps

    train = yaml.safe_load((REPO / "train_config.yaml").read_text())["profiles"]["cpu"]["train"]
    args = TrainArgs(**{key: train[key] for key in ("max_tokens", "global_batch_size", "micro_batch_size")})
    step_tokens = train["global_batch_size"] * train["max_seq_length"]
    assert train["max_tokens"] % step_tokens  # the case that matters: a budget that is not whole steps
    budget = whole_steps(args, train["max_seq_length"])
    assert budget == train["max_tokens"] // step_tokens * step_tokens == 696_320
    assert capsys.readouterr().out == (
        "Budget: 696,320 tokens, the 170 whole optimizer steps of --train.max_tokens 700,000 (a last partial step"
        " would be computed and thrown away)\n"
    )
    shape = RunShape({}, 1, train["micro_batch_size"], train["global_batch_size"], train["max_seq_length"], "", 0)
    final = tmp_path / "out" / "final"
    final.mkdir(parents=True)
    (final / "lit_model.pth").touch()
    record_progress(final / "hyperparameters.yaml", {"tokens": budget - step_tokens})
    assert finished_run(final / "lit_model.pth", budget, shape) is None  # one optimizer step left to train
    record_progress(final / "hyperparameters.yaml", {"tokens": budget})
    assert "already trained its budget (696,320 tokens, final/)" in finished_run(final / "lit_model.pth", budget, shape)


def test_a_run_whose_budget_does_not_divide_into_micro_batches_stays_finished(train_args, tmp_path, capsys):
    out_dir = tmp_path / "out"
    budget = 256 * 4 + 100  # 4 micro-batches of 4 x 64 tokens, and 100 tokens that LitGPT's loop never trains
    main(train_args(out_dir, budget))
    assert read_progress(out_dir / "final")["tokens"] == 256 * 4
    before = {path: path.stat().st_mtime_ns for path in out_dir.rglob("*")}
    assert main(train_args(out_dir, budget, extra=("--resume", "auto"))) is None
    assert "already trained its budget (1,024 tokens, final/); nothing to do" in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in out_dir.rglob("*")} == before


def test_collective_timeout_reaches_every_strategy(monkeypatch):
    from datetime import timedelta

    from lightning.fabric.strategies import FSDPStrategy

    from litmoe.distributed.fabric import fabric_builder
    from litmoe.distributed.plans import StrategyChoice
    from litmoe.distributed.strategy import DEEPSPEED_ON_CPU
    from litmoe.distributed.zero import deepspeed_config

    cpu = {"strategy": "auto", "accelerator": "cpu", "devices": 2}
    ddp = fabric_builder(StrategyChoice("ddp", ""), timeout_minutes=7)(**cpu)
    assert ddp.strategy._timeout == timedelta(minutes=7)
    monkeypatch.setenv(DEEPSPEED_ON_CPU, "1")
    zero = fabric_builder(
        StrategyChoice("deepspeed", "", 2), deepspeed_config(2, "none", "none", None, 4, 1.0), "AdamW", 11
    )
    assert zero(**cpu).strategy._timeout == timedelta(minutes=11)
    fsdp = FSDPStrategy()  # LitGPT's own, handed to the builder; Lightning builds FSDP on GPUs only
    with pytest.raises(ValueError, match="FSDP is only available on GPU"):
        fabric_builder(StrategyChoice("fsdp", ""), timeout_minutes=9)(**{**cpu, "strategy": fsdp})
    assert fsdp._timeout == timedelta(minutes=9)


def test_slurm_script_forwards_the_warning_signal_and_requeues_a_stopped_run(tmp_path):
    """scripts/slurm_train.sbatch under stand-ins for srun and scontrol: SIGUSR1 to the batch script reaches the
    task; a task that stops with a checkpoint (status 75) gets the job requeued."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$@" > {tmp_path}/srun-args\n'
        f"trap 'echo USR1 >> {tmp_path}/task-signals; exit 75' USR1\n"
        f"touch {tmp_path}/started\n"
        "while true; do sleep 0.05; done\n"
    )
    (bin_dir / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$@" > {tmp_path}/scontrol-args\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    environment = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NUM_NODES": "2",
                   "SLURM_NTASKS_PER_NODE": "8", "SLURM_JOB_ID": "4242"}  # fmt: skip
    script = subprocess.Popen(["bash", "scripts/slurm_train.sbatch", "--train.max_tokens", "2e9"], cwd=REPO,
                              env=environment, stdout=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 30
    while not (tmp_path / "started").exists() and time.time() < deadline:
        time.sleep(0.05)
    script.send_signal(signal.SIGUSR1)
    out, _ = script.communicate(timeout=30)
    assert script.returncode == EXIT_PREEMPTED
    assert (tmp_path / "task-signals").read_text() == "USR1\n"
    assert (tmp_path / "scontrol-args").read_text() == "requeue 4242\n"
    assert "requeueing job 4242" in out
    srun_args = (tmp_path / "srun-args").read_text()
    assert "run_train.py --devices 8 --num_nodes 2 --resume auto --train.max_tokens 2e9" in srun_args
    directives = [
        line for line in (REPO / "scripts/slurm_train.sbatch").read_text().splitlines() if line.startswith("#SBATCH")
    ]
    assert {"#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@180"} <= set(directives)
