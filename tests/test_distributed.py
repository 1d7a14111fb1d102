"""Real 2-process data-parallel runs on CPU (DDP over gloo, and DeepSpeed ZeRO-3 on DeepSpeed's CPU
accelerator), launched as users launch them."""

import importlib.util
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, final_weights, run_train_process, tiny_run_args
from test_long_runs import signal_when, start_run
from test_train import logged

from litmoe.core.errors import EXIT_PREEMPTED
from litmoe.distributed.strategy import DEEPSPEED_ON_CPU
from litmoe.inference.generate import generate
from litmoe.training.saving import read_progress

BUDGET = 2 * 4 * 64 * 30  # 30 iterations of micro-batch 4 x 64 tokens on each of 2 ranks
EXTRA = ("--train.global_batch_size", "8", "--train.save_interval", "10", "--eval.interval", "100")


def run_two_ranks(args: list[str], strategy: tuple[str, ...] = ("--strategy", "ddp")) -> str:
    return run_train_process([*args, "--devices", "2", *strategy], **{DEEPSPEED_ON_CPU: "1"})


@pytest.fixture(scope="module")
def ddp_run(prepared, tiny_model_file, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    return out_dir, run_two_ranks(tiny_run_args(prepared, tiny_model_file, out_dir, BUDGET, EXTRA))


def test_two_ranks_train_on_different_data_stay_in_sync_and_stop_together(prepared, tiny_model_file, tmp_path, ddp_run):
    """SIGTERM to rank 0 only: both ranks stop at the same step boundary (the stop is agreed on), one checkpoint
    is written, and resuming on 2 ranks continues with the uninterrupted run's losses."""
    full, out = ddp_run
    assert "Strategy: DDP across 2 ranks (--strategy ddp)" in out
    assert "Data parallel: 2 ranks read different first batches" in out
    assert "Data parallel: parameters identical on all 2 ranks after training" in out
    assert (full / "final" / "lit_model.pth").is_file()

    stopped = tmp_path / "stopped"
    args = [*tiny_run_args(prepared, tiny_model_file, stopped, BUDGET, EXTRA), "--devices", "2", "--strategy", "ddp"]
    status, _, err = signal_when(start_run(args), "iter 3 step 3", signal.SIGTERM)
    assert status == EXIT_PREEMPTED, err[-3000:]
    step = int(next(line for line in err.splitlines() if line.startswith("Stopped by SIGTERM")).split()[6][:-1])
    assert 3 <= step < 30 and read_progress(stopped / f"step-{step:08d}")["world_size"] == 2

    out = run_two_ranks(tiny_run_args(prepared, tiny_model_file, stopped, BUDGET, (*EXTRA, "--resume", "auto")))
    assert f"Resuming from {stopped / f'step-{step:08d}' / 'lit_model.pth'}" in out
    expected, got = logged(full, "loss"), logged(stopped, "loss")
    assert sorted(got) == list(range(30))
    assert all(got[index] == pytest.approx(expected[index], rel=1e-4) for index in got)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (uv sync)")
def test_zero3_across_two_ranks_trains_as_ddp(prepared, tiny_model_file, tmp_path, ddp_run):
    """Each rank holds half of every weight, gradient and optimizer state; the result must not change."""
    ddp, _ = ddp_run
    out_dir = tmp_path / "zero3"
    strategy = ("--strategy", "deepspeed", "--zero-stage", "3")
    out = run_two_ranks(tiny_run_args(prepared, tiny_model_file, out_dir, BUDGET, EXTRA), strategy)
    assert "Strategy: DeepSpeed ZeRO-3 across 2 ranks" in out
    assert "Data parallel: 2 ranks read different first batches" in out
    expected, got = logged(ddp, "loss"), logged(out_dir, "loss")
    assert sorted(got) == sorted(expected) == list(range(30))
    assert all(got[step] == pytest.approx(expected[step], rel=1e-4) for step in got)

    shards = sorted(path.name for path in (out_dir / "final" / "lit_model.pth" / "checkpoint").iterdir())
    assert shards == [
        f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt" for rank in (0, 1) for kind in ("model", "optim")
    ]
    ours, reference = final_weights(out_dir), final_weights(ddp)
    assert ours.keys() == reference.keys()
    assert all(torch.allclose(ours[key], reference[key], rtol=1e-4, atol=1e-5) for key in reference)


EXPERT_PARALLEL = ("--strategy", "ddp", "--strategy.expert_parallel", "2")


def assert_trains_as(reference: Path, run: Path) -> dict[int, float]:
    """`run` logged the reference run's 30 losses (1e-5) and ended with its weights (1e-5 / 1e-6); returns the
    reference's losses."""
    expected, got = logged(reference, "loss"), logged(run, "loss")
    assert sorted(got) == sorted(expected) == list(range(30))
    assert all(got[step] == pytest.approx(expected[step], rel=1e-5) for step in got)
    ours, theirs = final_weights(run), final_weights(reference)
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[key], theirs[key], rtol=1e-5, atol=1e-6) for key in theirs)
    return expected


def test_expert_parallel_trains_as_ddp_and_checkpoints_what_ddp_does(prepared, tiny_model_file, tmp_path, ddp_run):
    """Each rank holds half of the experts and the tokens travel to them: the losses and final weights are the
    DDP run's, the checkpoint has every expert under stock keys (with the optimizer's moments), a run without
    expert parallelism resumes it where the uninterrupted run went on, and an expert-parallel run resumes DDP's."""
    ddp, _ = ddp_run
    split = tmp_path / "split"
    out = run_two_ranks(tiny_run_args(prepared, tiny_model_file, split, BUDGET, EXTRA), EXPERT_PARALLEL)
    assert "Strategy: DDP across 2 ranks, experts split over 2 (expert parallel)" in out
    assert "Data parallel: parameters identical on all 2 ranks after training" in out  # the replicated ones
    expected = assert_trains_as(ddp, split)

    for source, target, strategy in ((split, "unsplit", ("--strategy", "ddp")), (ddp, "resplit", EXPERT_PARALLEL)):
        extra = (*EXTRA, "--resume", str(source / "step-00000010" / "lit_model.pth"))  # each way round
        run_two_ranks(tiny_run_args(prepared, tiny_model_file, tmp_path / target, BUDGET, extra), strategy)
        got = logged(tmp_path / target, "loss")
        assert sorted(got) == list(range(10, 30))  # from the 11th optimizer step on
        assert all(got[step] == pytest.approx(expected[step], rel=1e-5) for step in got), target


SHARDED_EXPERT_PARALLEL = ("--strategy", "fsdp", "--strategy.expert_parallel", "2")


def test_expert_parallel_on_fsdp_trains_as_ddp_and_checkpoints_what_ddp_does(prepared, tiny_model_file, tmp_path,
                                                                            ddp_run):  # fmt: skip
    """FSDP2 shards the dense weights over both ranks and each rank holds half of the experts: the losses and
    final weights are DDP's, a checkpoint is the one DDP writes (every weight and optimizer moment, stock keys),
    and a DDP checkpoint resumes under it with the uninterrupted run's losses."""
    ddp, _ = ddp_run
    sharded = tmp_path / "sharded"
    out = run_two_ranks(tiny_run_args(prepared, tiny_model_file, sharded, BUDGET, EXTRA), SHARDED_EXPERT_PARALLEL)
    assert "Strategy: FSDP across 2 ranks, experts split over 2 (expert parallel)" in out
    expected = assert_trains_as(ddp, sharded)
    ours, reference = (torch.load(run / "step-00000010" / "lit_model.pth")["optimizer"] for run in (sharded, ddp))
    assert ours["param_groups"] == reference["param_groups"] and ours["state"].keys() == reference["state"].keys()
    for index, moments in reference["state"].items():
        assert all(torch.allclose(ours["state"][index][key], value, rtol=1e-4, atol=1e-7) for key, value in
                   moments.items()), index  # fmt: skip

    extra = (*EXTRA, "--resume", str(ddp / "step-00000010" / "lit_model.pth"))
    resumed = tmp_path / "resumed"
    run_two_ranks(tiny_run_args(prepared, tiny_model_file, resumed, BUDGET, extra), SHARDED_EXPERT_PARALLEL)
    got = logged(resumed, "loss")
    assert sorted(got) == list(range(10, 30))
    assert all(got[step] == pytest.approx(expected[step], rel=1e-5) for step in got)


def test_expert_parallel_accumulates_like_ddp(prepared, tiny_model_file, tmp_path):
    """Two micro-batches per optimizer step: on DDP the experts' gradients are reduced once per step, after both;
    on FSDP every micro-batch's are reduce-scattered and summed in the shards. The losses stay DDP's."""
    budget, extra = 2 * 4 * 64 * 16, ("--train.global_batch_size", "16", "--train.save_interval", "100")
    runs = {}
    for name, strategy in (("ddp", ("--strategy", "ddp")), ("split", EXPERT_PARALLEL),
                           ("sharded", SHARDED_EXPERT_PARALLEL)):  # fmt: skip
        runs[name] = tmp_path / name
        run_two_ranks(tiny_run_args(prepared, tiny_model_file, runs[name], budget, extra), strategy)
    expected = logged(runs["ddp"], "loss")
    for name in ("split", "sharded"):
        got = logged(runs[name], "loss")
        assert sorted(got) == sorted(expected) and len(got) == 8, name
        assert all(got[step] == pytest.approx(expected[step], rel=1e-5) for step in got), name


def test_a_torchrun_launch_with_expert_parallelism_writes_a_stock_checkpoint(prepared, tiny_model_file, tmp_path):
    """As on a cluster: torchrun starts the two processes, Lightning joins them, the experts are split."""
    out_dir = tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "run_train.py"]
    args = [*tiny_run_args(prepared, tiny_model_file, out_dir, BUDGET, EXTRA), "--devices", "2", *EXPERT_PARALLEL]
    result = subprocess.run([*launch, *args, "--num_workers", "0"], cwd=REPO, capture_output=True, text=True,
                            timeout=420)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    strategy = "Strategy: DDP across 2 ranks, experts split over 2 (expert parallel) (--strategy ddp,"
    assert strategy in result.stdout and "parameters identical on all 2 ranks" in result.stdout
    assert len(generate(out_dir / "final", prompt="The", max_new_tokens=3)[0]) >= 1


def test_four_ranks_with_experts_split_over_2_and_over_4_and_on_fsdp_train_as_ddp(prepared, tiny_model_file, tmp_path):
    """4 ranks: experts split over 2 (two replicas of each half), over 4 (one expert per rank, no replica), and over
    2 on FSDP (each half of the experts sharded once more over its two replicas) follow plain DDP's loss series
    and end with its weights (to a looser tolerance than the losses: AdamW divides by the root of the second
    moment, which turns summation-order noise in a near-zero gradient into a step of up to the learning rate)."""
    budget, extra = 4 * 4 * 64 * 10, ("--train.global_batch_size", "16", "--train.save_interval", "100")
    runs = {}
    for name, strategy in (("ddp", ("ddp", "1")), ("ep2", ("ddp", "2")), ("ep4", ("ddp", "4")),
                           ("fsdp-ep2", ("fsdp", "2"))):  # fmt: skip
        runs[name] = tmp_path / name
        args = [*tiny_run_args(prepared, tiny_model_file, runs[name], budget, extra), "--devices", "4"]
        out = run_train_process([*args, "--strategy", strategy[0], "--strategy.expert_parallel", strategy[1]])
        assert name == "fsdp-ep2" or "parameters identical on all 4 ranks after training" in out
    assert "FSDP across 4 ranks, experts split over 2 (expert parallel)" in out
    expected, reference = logged(runs["ddp"], "loss"), final_weights(runs["ddp"])
    for name in ("ep2", "ep4", "fsdp-ep2"):
        got, ours = logged(runs[name], "loss"), final_weights(runs[name])
        assert sorted(got) == sorted(expected) == list(range(10)), name
        assert all(got[step] == pytest.approx(expected[step], rel=1e-5) for step in got), name
        assert all(torch.allclose(ours[key], reference[key], rtol=1e-4, atol=1e-5) for key in reference), name


def test_expert_parallel_resumes_exactly_after_kill_9(prepared, tiny_model_file, tmp_path, ddp_run):
    """kill -9 of every rank (as a scheduler kills a job) after the step-10 checkpoint; `--resume auto` continues
    from it with the uninterrupted run's losses."""
    ddp, _ = ddp_run
    out_dir = tmp_path / "killed"
    args = [*tiny_run_args(prepared, tiny_model_file, out_dir, BUDGET, EXTRA), "--devices", "2", *EXPERT_PARALLEL]
    process = start_run(args, new_session=True)
    status, _, _ = signal_when(process, "iter 14 step 14", signal.SIGKILL, whole_group=True)
    assert status == -signal.SIGKILL and not (out_dir / "final").exists()

    run_two_ranks(tiny_run_args(prepared, tiny_model_file, out_dir, BUDGET, (*EXTRA, "--resume", "auto")),
                  EXPERT_PARALLEL)  # fmt: skip
    expected, got = logged(ddp, "loss"), logged(out_dir, "loss")
    assert set(range(10, 30)) <= set(got)
    assert all(got[step] == pytest.approx(expected[step], rel=1e-5) for step in range(10, 30))
