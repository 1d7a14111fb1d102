"""Every way training spreads over CPU ranks (gloo), held to one reference: DDP, DDP and FSDP with the experts split
(expert parallelism), DeepSpeed ZeRO-3 and ZeRO-2 with offload (DeepSpeed's CPU accelerator), with gradient
accumulation and with clipping active at every step.

Two launches of two ranks and one of four check everything that needs that many ranks:
  kill -9      run_train.py --devices 2, as users launch it (Lightning starts the second rank), experts split;
               the second rank killed after the step-10 checkpoint, and rank 0 exits in one line
  2 ranks      torchrun, tests/ranks.py: DDP (the reference), a SIGTERM to rank 0 only and its resume, experts split
               on DDP and on FSDP, resumes across those plans, the kill -9 run resumed, ZeRO-3, the expert-parallel
               layer; then rank 0 alone: one device against ZeRO-3 (resume, consolidation) and ZeRO-2 with offload
  4 ranks      torchrun: DDP against experts split over 2 and over 4 and over 2 on FSDP; the layer at EP 2 and 4
The tests below read what the launches left (logs, checkpoints, output); each asserts one property.
"""

import hashlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, final_weights, tiny_run_args
from expert_parallel_layer import LAYER_CASES
from host_syncs import WATCHED
from test_long_runs import signal_when, start_run
from test_train import logged

from litmoe.core.checkpoint_io import read_progress
from litmoe.core.errors import EXIT_PEER_LOST, EXIT_PREEMPTED
from litmoe.distributed.strategy import DEEPSPEED_ON_CPU
from litmoe.inference.generate import generate
from litmoe.training.cli import main

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
MAX_NORM = 0.25  # below every step's gradient norm in these runs: clipping bites at each step (checked)
# 20 optimizer steps of 2 accumulated micro-batches (4 x 64 tokens) on each of 2 ranks, checkpoints every 10
BUDGET = 20 * 2 * 2 * 4 * 64
EXTRA = (
    "--train.global_batch_size", "16", "--train.save_interval", "10", "--eval.interval", "100",
    "--train.max_norm", str(MAX_NORM),
)  # fmt: skip
DDP = ("--strategy", "ddp")
EXPERT_PARALLEL = ("--strategy", "ddp", "--strategy.expert_parallel", "2")
SHARDED_EXPERT_PARALLEL = ("--strategy", "fsdp", "--strategy.expert_parallel", "2")
ZERO3 = ("--strategy", "deepspeed", "--zero-stage", "3")
STEPS = [2 * step + 1 for step in range(20)]  # the iteration each optimizer step is logged at
# One device against ZeRO (rank 0 alone): 8 optimizer steps of 2 accumulated micro-batches, clipped, checkpoints
# every 4 steps; aux-loss-free balancing on, so that the experts' selection bias is trained, saved and consolidated
ALONE_BUDGET = 16 * 4 * 64
ALONE = (
    "--train.global_batch_size", "8", "--train.max_norm", str(MAX_NORM), "--eval.interval", "100",
    "--moe.bias_update_rate", "0.001",
)  # fmt: skip
# Four ranks: 10 optimizer steps of one micro-batch per rank
FOUR_BUDGET = 4 * 4 * 64 * 10
FOUR = ("--train.global_batch_size", "16", "--train.save_interval", "100", "--train.max_norm", str(MAX_NORM))


def torchrun(ranks: int, folder: Path, steps: list[dict]) -> Path:
    """Run the plan's steps on `ranks` gloo ranks started by torchrun (tests/ranks.py); returns the folder of
    their outputs, failing with the failed step's output."""
    folder.mkdir(parents=True, exist_ok=True)
    plan = folder / "plan.json"
    plan.write_text(json.dumps({"folder": str(folder), "steps": steps}))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", DEEPSPEED_ON_CPU: "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launch, "tests/ranks.py", str(plan)], cwd=REPO, env=environment, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    if result.returncode != 0:
        failed = [path for path in folder.glob("*.status") if path.read_text() == "1"]
        outputs = "".join(path.with_suffix(".out").read_text()[-3000:] for path in failed)
        pytest.fail(f"torchrun exited {result.returncode}:\n{outputs}\n{result.stderr[-3000:]}")
    return folder


class Launch:
    """The folder of a torchrun launch: each step's output, exit status and run directory."""

    def __init__(self, folder: Path, ranks: int) -> None:
        self.folder, self.ranks = folder, ranks

    def out(self, name: str, rank: int = 0) -> str:
        return (self.folder / f"{name}.rank{rank}.out").read_text()

    def status(self, name: str, rank: int = 0) -> int:
        return int((self.folder / f"{name}.rank{rank}.status").read_text())

    def run(self, name: str) -> Path:
        return self.folder / "runs" / name


@pytest.fixture(scope="module")
def train_step(prepared, tiny_model_file):
    """A plan step that trains the tiny model on the session's prepared data into `out_dir`."""

    def step(name: str, out_dir: Path, budget: int, extra: tuple[str, ...], **options) -> dict:
        args = tiny_run_args(prepared, tiny_model_file, out_dir, budget, extra)
        return {"name": name, "train": [*args, "--num_workers", "0"], **options}

    return step


def session_processes(session: int) -> list[int]:
    """The processes still running in a session (a run started with `start_run(..., new_session=True)`)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":  # the session id, and not a zombie
            alive.append(int(stat.parent.name))
    return alive


@pytest.fixture(scope="module")
def killed(prepared, tiny_model_file, tmp_path_factory) -> Path:
    """An expert-parallel run launched as users launch it, its second rank killed with SIGKILL (a node lost) after
    the step-10 checkpoint: rank 0 says so in one line, exits with EXIT_PEER_LOST and leaves no process behind."""
    out_dir = tmp_path_factory.mktemp("killed") / "run"
    args = [*tiny_run_args(prepared, tiny_model_file, out_dir, BUDGET, EXTRA), "--devices", "2", *EXPERT_PARALLEL]
    process = start_run(args, new_session=True)
    status, out, err = signal_when(process, "iter 28 step 14", signal.SIGKILL, rank=1)
    assert status == EXIT_PEER_LOST and not (out_dir / "final").exists(), err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("error: rank 0 on ") or lines[0].startswith("error: rank 1 (pid ")
    assert "every rank stops (a training run keeps its last checkpoint: --resume auto" in lines[0]
    for _ in range(50):  # every rank is gone within a bounded grace (the session's processes, loader workers too)
        if not session_processes(process.pid):
            break
        time.sleep(0.1)
    assert session_processes(process.pid) == []
    assert "Strategy: DDP across 2 ranks, experts split over 2 (expert parallel) (--strategy ddp," in out
    assert read_progress(out_dir / "step-00000010")["world_size"] == 2
    return out_dir


@pytest.fixture(scope="module")
def two_ranks(train_step, killed, prepared, tiny_model_file, tmp_path_factory) -> Launch:
    folder = tmp_path_factory.mktemp("two-ranks")
    runs = folder / "runs"

    def two(name: str, strategy: tuple[str, ...], *extra: str, out_dir: Path | None = None, **options) -> dict:
        return train_step(name, out_dir or runs / name, BUDGET, (*EXTRA, *extra, "--devices", "2", *strategy),
                          **options)  # fmt: skip

    # the run on one device, whose step-10 checkpoint the launch continues on 2 ranks ("grown")
    main([*tiny_run_args(prepared, tiny_model_file, runs / "one-device", BUDGET, EXTRA), "--devices", "1",
          "--strategy", "single", "--num_workers", "0"])  # fmt: skip

    def from_step_10(name: str, source: str, strategy: tuple[str, ...]) -> dict:
        return two(name, strategy, "--resume", str(runs / source / "step-00000010" / "lit_model.pth"))

    def watched(name: str, *strategy: str) -> dict:  # 4 steps of 2 micro-batches a rank (tests/host_syncs.py)
        flags = (*WATCHED, "--train.global_batch_size", "16", "--devices", "2", *strategy)
        return train_step(name, runs / name, 4 * 2 * 2 * 4 * 64, flags, watch=True)

    def alone(name: str, *extra: str, budget: int = ALONE_BUDGET) -> dict:  # rank 0, as a single process
        return train_step(name, runs / name, budget, (*ALONE, *extra))

    steps = [
        two("ddp", DDP),
        two("stopped", DDP, signal_rank0_at=" step 3 |"),
        two("stopped-resumed", DDP, "--resume", "auto", out_dir=runs / "stopped"),
        two("split", EXPERT_PARALLEL),
        from_step_10("unsplit", "split", DDP),
        from_step_10("resplit", "ddp", EXPERT_PARALLEL),
        two("sharded", SHARDED_EXPERT_PARALLEL),
        from_step_10("sharded-resumed", "ddp", SHARDED_EXPERT_PARALLEL),
        two("killed-resumed", EXPERT_PARALLEL, "--resume", "auto", out_dir=killed),
        {"name": "layer", "call": "expert_parallel_layer:check_cases", "args": [LAYER_CASES[2], str(folder)]},
        two("grown", DDP, "--resume", str(runs / "one-device" / "step-00000010" / "lit_model.pth")),
        watched("watched-dropless", *EXPERT_PARALLEL),
        watched("watched-capacity", *EXPERT_PARALLEL, "--moe.capacity_factor", "1.25"),
    ]
    if HAS_DEEPSPEED:
        single, shards = ("--strategy", "single", "--devices", "1"), runs / "zero3-alone" / "step-00000004"
        ddp_step_10 = runs / "ddp" / "step-00000010" / "lit_model.pth"
        zero3_step_10 = runs / "zero3" / "step-00000010" / "lit_model.pth"  # shards of 2 ranks
        interrupted = runs / "zero3-resumed" / shards.name  # a run stopped after its fourth optimizer step
        steps += [
            two("zero3", ZERO3),
            {"name": "alone", "alone": True},
            alone("single", *single),
            train_step("shrunk", runs / "shrunk", BUDGET, (*EXTRA, *single, "--resume", str(ddp_step_10))),
            train_step("zero3-shrunk", runs / "zero3-shrunk", BUDGET, (*EXTRA, *ZERO3, "--resume", str(zero3_step_10))),
            alone("zero3-alone", *ZERO3),
            alone("started", *single, "--initial_checkpoint_dir", str(shards), "--optimizer.init_args.lr", "0",
                  "--train.min_lr", "0", budget=8 * 64),
            {"name": "copy", "call": "shutil:copytree", "args": [str(shards), str(interrupted)]},
            alone("zero3-resumed", *ZERO3, "--resume", "auto"),
            alone("zero2-offload", "--strategy", "deepspeed", "--zero-stage", "2", "--offload-optimizer", "cpu"),
        ]  # fmt: skip
    return Launch(torchrun(2, folder, steps), 2)


@pytest.fixture(scope="module")
def four_ranks(train_step, two_ranks, tmp_path_factory) -> Launch:
    folder = tmp_path_factory.mktemp("four-ranks")
    plans = (("ddp", "ddp", "1"), ("ep2", "ddp", "2"), ("ep4", "ddp", "4"), ("fsdp-ep2", "fsdp", "2"))
    steps = [
        train_step(name, folder / "runs" / name, FOUR_BUDGET, (*FOUR, "--devices", "4", "--strategy", plan,
                                                                "--strategy.expert_parallel", size))
        for name, plan, size in plans
    ]  # fmt: skip
    split_step_10 = two_ranks.run("split") / "step-00000010" / "lit_model.pth"  # experts split over 2 of 2 ranks
    steps += [
        train_step(f"widened-{name}", folder / "runs" / f"widened-{name}", BUDGET,
                   (*EXTRA, "--devices", "4", "--strategy", "ddp", "--strategy.expert_parallel", size, "--resume",
                    str(split_step_10)))
        for name, size in (("ep4", "4"), ("ddp", "1"))
    ]  # fmt: skip
    steps.append({"name": "layer", "call": "expert_parallel_layer:check_cases", "args": [LAYER_CASES[4], str(folder)]})
    return Launch(torchrun(4, folder, steps), 4)


def assert_losses(got: dict[int, float], expected: dict[int, float], steps: list[int], rel: float, name: str = ""):
    assert sorted(got) == steps, name
    assert all(got[step] == pytest.approx(expected[step], rel=rel) for step in steps), name


def assert_trains_as(reference: Path, run: Path) -> None:
    """`run` logged the reference run's losses (1e-5) and ended with its weights (1e-4, atol 1e-5: AdamW divides by
    the root of the second moment, which turns summation-order noise in a near-zero gradient into a step of up to
    the learning rate; with accumulation such differences reach 2.4e-6 in a few expert weights)."""
    expected = logged(reference, "loss")
    assert_losses(logged(run, "loss"), expected, sorted(expected), 1e-5, run.name)
    ours, theirs = final_weights(run), final_weights(reference)
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[key], theirs[key], rtol=1e-4, atol=1e-5) for key in theirs), run.name


def test_expert_parallel_steps_wait_for_the_device_only_where_sizes_are_data(two_ranks):
    """What would make the host wait for a GPU (tests/host_syncs.py), per optimizer step, on each rank. The first
    micro-batch of a multi-rank run reads one all-gather (the ranks' check that they read different data). With a
    capacity factor nothing else; dropless, each layer's count exchange at each micro-batch (the split sizes of the
    all-to-all are data: torchtitan and DeepSpeed pay the same). The stop vote is host-side and read a step late;
    the log step reads once."""
    data_check, exchange = "tolist at fit.py", "tolist at dispatch.py"
    for rank in range(2):
        capacity, dropless = (json.loads((two_ranks.folder / f"watched-{kind}.rank{rank}.syncs.json").read_text())
                              for kind in ("capacity", "dropless"))  # fmt: skip
        for syncs in capacity, dropless:
            assert syncs["steps"] == 4 and syncs["waits"] == [0, 0, 0, 0, 1] and syncs["copies"] == [1] * 5
        where = [[read.split(":")[0] for read in step] for step in capacity["syncs"]]
        assert where == [[data_check], [], [], [], []]
        where = [sorted(read.split(":")[0] for read in step) for step in dropless["syncs"]]
        per_step = [exchange] * 2 * 2  # 2 MoE layers, 2 micro-batches
        assert where == [sorted([data_check, *per_step]), per_step, per_step, per_step, []]


def test_two_ranks_train_on_different_data_stay_in_sync_and_stop_together(two_ranks):
    """SIGTERM to rank 0 only: both ranks stop at the same step boundary (the stop is agreed on), one checkpoint
    is written, and resuming on 2 ranks continues with the uninterrupted run's losses."""
    out = two_ranks.out("ddp")
    assert "Strategy: DDP across 2 ranks (--strategy ddp)" in out
    assert "Data parallel: 2 ranks read different first batches" in out
    assert "Data parallel: parameters identical on all 2 ranks after training" in out
    full, stopped = two_ranks.run("ddp"), two_ranks.run("stopped")
    assert (full / "final" / "lit_model.pth").is_file()

    assert (two_ranks.status("stopped", 0), two_ranks.status("stopped", 1)) == (EXIT_PREEMPTED, 0)
    line = re.search(r"Stopped by SIGTERM after optimizer step (\d+): saved (\S+);", two_ranks.out("stopped"))
    step = int(line[1])
    assert 3 <= step < 20 and line[2] == str(stopped / f"step-{step:08d}")
    assert read_progress(stopped / f"step-{step:08d}")["world_size"] == 2

    assert f"Resuming from {stopped / f'step-{step:08d}' / 'lit_model.pth'}" in two_ranks.out("stopped-resumed")
    assert_losses(logged(stopped, "loss"), logged(full, "loss"), STEPS, 1e-5)


def assert_weights_as(reference: Path, run: Path) -> None:
    ours, theirs = final_weights(run), final_weights(reference)
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[key], theirs[key], rtol=1e-4, atol=1e-5) for key in theirs), run.name


def test_a_run_continues_on_more_ranks_and_on_fewer_as_the_uninterrupted_run(two_ranks, four_ranks):
    """The global batch stays 16 sequences and the data continues from its global position, so a run resumed on
    another number of ranks takes the uninterrupted 2-rank run's optimizer steps (as a whole run on one device
    does): 1 -> 2 ranks (its losses from the 11th step are that run's), 2 -> 1, and experts split over 2 of 2 ranks
    -> over 4 of 4, and -> plain DDP on 4. Each ends with the uninterrupted run's weights."""
    ddp = two_ranks.run("ddp")
    assert (
        "Resuming on 2 ranks (written by 1): allowed; the data continues from global position 160 (10,240 tokens"
        " trained), 16 sequences per optimizer step (gradient accumulation 4 -> 2), 10 optimizer steps left; model"
    ) in two_ranks.out("grown")
    grown = {step: loss for step, loss in logged(two_ranks.run("grown"), "loss").items() if step >= STEPS[10]}
    assert_losses(grown, logged(ddp, "loss"), STEPS[10:], 1e-5)
    for name in ("one-device", "grown"):
        assert_weights_as(ddp, two_ranks.run(name))
    if HAS_DEEPSPEED:  # rank 0 alone runs only after the DeepSpeed runs
        assert "Resuming on 1 rank (written by 2): allowed;" in two_ranks.out("shrunk")
        assert read_progress(two_ranks.run("shrunk") / "final")["tokens"] == BUDGET
        assert_weights_as(ddp, two_ranks.run("shrunk"))
    for name in ("widened-ep4", "widened-ddp"):
        assert "Resuming on 4 ranks (written by 2): allowed;" in four_ranks.out(name)
        assert_weights_as(ddp, four_ranks.run(name))


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="needs deepspeed (uv sync)")
def test_zero3_shards_of_two_ranks_continue_on_one_through_deepspeeds_universal_checkpoint(two_ranks):
    """The step-10 shards of the 2-rank ZeRO-3 run, resumed on rank 0 alone: DeepSpeed's own conversion writes the
    universal checkpoint beside the shards (which stay as they were), and the run ends with the uninterrupted 2-rank
    run's weights: every Adam moment came back (10 more Adam steps from lost moments land far from them)."""
    out, step_10 = two_ranks.out("zero3-shrunk"), two_ranks.run("zero3") / "step-00000010"
    assert (
        "Resuming on 1 rank (written by 2): allowed; the data continues from global position 160 (10,240 tokens"
        " trained), 16 sequences per optimizer step (gradient accumulation 2 -> 4), 10 optimizer steps left; model"
        f" and optimizer state through DeepSpeed's universal checkpoint ({step_10 / 'universal'})"
    ) in out
    shards = sorted(path.name for path in (step_10 / "lit_model.pth" / "checkpoint").iterdir())
    assert shards == [
        f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt" for rank in (0, 1) for kind in ("model", "optim")
    ]
    assert (step_10 / "universal" / "latest_universal").read_text() == "checkpoint"
    assert read_progress(two_ranks.run("zero3-shrunk") / "final")["tokens"] == BUDGET
    ours, theirs = final_weights(two_ranks.run("zero3-shrunk")), final_weights(two_ranks.run("zero3"))
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[key], theirs[key], rtol=1e-5, atol=1e-6) for key in theirs)


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="needs deepspeed (uv sync)")
def test_zero3_across_two_ranks_trains_as_ddp(two_ranks):
    """Each rank holds half of every weight, gradient and optimizer state; the result must not change."""
    ddp, zero3 = two_ranks.run("ddp"), two_ranks.run("zero3")
    out = two_ranks.out("zero3")
    assert "Strategy: DeepSpeed ZeRO-3 across 2 ranks" in out
    assert "Data parallel: 2 ranks read different first batches" in out
    assert_losses(logged(zero3, "loss"), logged(ddp, "loss"), STEPS, 1e-4)
    norms, expected_norms = logged(zero3, "grad_norm"), logged(ddp, "grad_norm")  # the engine's, inside its step
    assert_losses(norms, expected_norms, STEPS, 1e-3)

    shards = sorted(path.name for path in (zero3 / "final" / "lit_model.pth" / "checkpoint").iterdir())
    assert shards == [
        f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt" for rank in (0, 1) for kind in ("model", "optim")
    ]
    # every rank's shards in SHA256SUMS, hashed as written on their rank (the digests handed to rank 0)
    listed = dict(line.split("  ")[::-1] for line in (zero3 / "final" / "SHA256SUMS").read_text().splitlines())
    assert {name.rsplit("/", 1)[-1] for name in listed if name.startswith("lit_model.pth/checkpoint/")} == set(shards)
    for name, digest in listed.items():
        assert hashlib.sha256((zero3 / "final" / name).read_bytes()).hexdigest() == digest, name
    assert not list((zero3 / "final").rglob(".sha256-rank*"))
    ours, reference = final_weights(zero3), final_weights(ddp)
    assert ours.keys() == reference.keys()
    assert all(torch.allclose(ours[key], reference[key], rtol=1e-4, atol=1e-5) for key in reference)


def test_expert_parallel_trains_as_ddp_and_checkpoints_what_ddp_does(two_ranks):
    """Each rank holds half of the experts and the tokens travel to them: the losses and final weights are the
    DDP run's, the checkpoint has every expert under stock keys (with the optimizer's moments), a run without
    expert parallelism resumes it where the uninterrupted run went on, and an expert-parallel run resumes DDP's."""
    ddp, split = two_ranks.run("ddp"), two_ranks.run("split")
    out = two_ranks.out("split")
    assert "Strategy: DDP across 2 ranks, experts split over 2 (expert parallel) (--strategy ddp," in out
    assert "Data parallel: parameters identical on all 2 ranks after training" in out  # the replicated ones
    assert_trains_as(ddp, split)
    expected = logged(ddp, "loss")
    for target in ("unsplit", "resplit"):  # each way round, from the 11th optimizer step on
        assert_losses(logged(two_ranks.run(target), "loss"), expected, STEPS[10:], 1e-5, target)


def test_expert_parallel_on_fsdp_trains_as_ddp_and_checkpoints_what_ddp_does(two_ranks):
    """FSDP2 shards the dense weights over both ranks and each rank holds half of the experts: the losses and
    final weights are DDP's, a checkpoint is the one DDP writes (every weight and optimizer moment, stock keys),
    and a DDP checkpoint resumes under it with the uninterrupted run's losses."""
    ddp, sharded = two_ranks.run("ddp"), two_ranks.run("sharded")
    assert "Strategy: FSDP across 2 ranks, experts split over 2 (expert parallel)" in two_ranks.out("sharded")
    assert_trains_as(ddp, sharded)
    ours, reference = (torch.load(run / "step-00000010" / "lit_model.pth")["optimizer"] for run in (sharded, ddp))
    assert ours["param_groups"] == reference["param_groups"] and ours["state"].keys() == reference["state"].keys()
    for index, moments in reference["state"].items():
        assert all(torch.allclose(ours["state"][index][key], value, rtol=1e-4, atol=1e-7) for key, value in
                   moments.items()), index  # fmt: skip
    assert_losses(logged(two_ranks.run("sharded-resumed"), "loss"), logged(ddp, "loss"), STEPS[10:], 1e-5)


def test_a_torchrun_launch_with_expert_parallelism_writes_a_stock_checkpoint(two_ranks):
    """As on a cluster: torchrun starts the two processes and Lightning joins them (every run of the launch); the
    checkpoint of the split experts samples as any other."""
    assert len(generate(two_ranks.run("split") / "final", prompt="The", max_new_tokens=3)[0]) >= 1


def test_expert_parallel_resumes_exactly_after_kill_9(two_ranks, killed):
    """kill -9 of every rank after the step-10 checkpoint; `--resume auto` continues from it with the uninterrupted
    run's losses."""
    assert f"Resuming from {killed / 'step-00000010' / 'lit_model.pth'}" in two_ranks.out("killed-resumed")
    got = {step: loss for step, loss in logged(killed, "loss").items() if step >= STEPS[10]}
    assert_losses(got, logged(two_ranks.run("ddp"), "loss"), STEPS[10:], 1e-5)


def test_expert_parallel_layer_computes_what_data_parallel_does_on_two_and_four_ranks(two_ranks, four_ranks):
    """tests/expert_parallel_layer.py: each case held on every rank."""
    for launch in (two_ranks, four_ranks):
        assert all(launch.status("layer", rank) == 0 for rank in range(launch.ranks))
        assert len(list(launch.folder.glob("rank*-ep*"))) == launch.ranks * len(LAYER_CASES[launch.ranks])


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="needs deepspeed (uv sync)")
def test_zero3_on_one_device_trains_as_one_device_resumes_and_consolidates(two_ranks):
    single, zero3 = two_ranks.run("single"), two_ranks.run("zero3-alone")
    assert "Strategy: DeepSpeed ZeRO-3 across 1 rank (DeepSpeed requested)" in two_ranks.out("zero3-alone")
    expected, steps = logged(single, "loss"), [2 * step + 1 for step in range(8)]
    assert_losses(logged(zero3, "loss"), expected, steps, 1e-4)
    # the gradient norm the engine measured inside its step is the one clip_gradients reports on one device
    norms = logged(single, "grad_norm")
    assert all(norm > MAX_NORM for norm in norms.values())
    assert_losses(logged(zero3, "grad_norm"), norms, steps, 1e-3)
    shards = zero3 / "step-00000004" / "lit_model.pth"
    assert (shards / "latest").is_file() and list((shards / "checkpoint").glob("*optim_states.pt"))

    # the shards consolidate to the single-device run's weights, under stock LitGPT keys
    ours, reference = final_weights(zero3), final_weights(single)
    assert ours.keys() == reference.keys() and "transformer.h.0.mlp.experts.3.fc_2.weight" in ours
    assert reference["transformer.h.0.mlp.expert_bias"].abs().sum() > 0
    assert all(torch.allclose(ours[key], reference[key], rtol=1e-4, atol=1e-5) for key in ours)

    # the conversion the refusal of another world size names: a new run from the shards' weights (lr 0 keeps them;
    # the selection bias moves without the lr)
    weights = torch.load(zero3 / "step-00000004" / "consolidated" / "lit_model.pth", weights_only=True)["model"]
    started = final_weights(two_ranks.run("started"))
    assert all(torch.equal(started[key], weights[key]) for key in weights if "bias" not in key)

    resumed = two_ranks.run("zero3-resumed")  # interrupted after its fourth optimizer step
    assert "Resuming from" in two_ranks.out("zero3-resumed") and "step-00000004" in two_ranks.out("zero3-resumed")
    assert_losses(logged(resumed, "loss"), expected, [9, 11, 13, 15], 1e-4)


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="needs deepspeed (uv sync)")
def test_zero2_with_optimizer_offload_trains_as_one_device(two_ranks):
    out = two_ranks.out("zero2-offload")
    assert "DeepSpeed ZeRO-2 across 1 rank, optimizer offloaded to CPU memory" in out
    expected, steps = logged(two_ranks.run("single"), "loss"), [2 * step + 1 for step in range(8)]
    assert_losses(logged(two_ranks.run("zero2-offload"), "loss"), expected, steps, 1e-4)


def test_every_plan_clips_at_every_step_and_measures_the_norm_ddp_measures(two_ranks, four_ranks):
    """Clipping bites at each optimizer step, and the norm it clips by (the whole model's, taken in float64 in every
    plan) is DDP's, whether the experts and the rest are split over ranks or not."""
    for launch, plans in ((two_ranks, ("split", "sharded")), (four_ranks, ("ep2", "ep4", "fsdp-ep2"))):
        reference = logged(launch.run("ddp"), "grad_norm")
        assert len(reference) in (10, 20) and all(norm > MAX_NORM for norm in reference.values())
        for name in plans:
            assert_losses(logged(launch.run(name), "grad_norm"), reference, sorted(reference), 1e-5, name)


def test_four_ranks_with_experts_split_over_2_and_over_4_and_on_fsdp_train_as_ddp(four_ranks):
    """4 ranks: experts split over 2 (two replicas of each half), over 4 (one expert per rank, no replica), and over
    2 on FSDP (each half of the experts sharded once more over its two replicas) follow plain DDP's loss series
    and end with its weights."""
    for name in ("ddp", "ep2", "ep4"):
        assert "parameters identical on all 4 ranks after training" in four_ranks.out(name)
    assert "FSDP across 4 ranks, experts split over 2 (expert parallel)" in four_ranks.out("fsdp-ep2")
    for name in ("ep2", "ep4", "fsdp-ep2"):
        assert_trains_as(four_ranks.run("ddp"), four_ranks.run(name))
