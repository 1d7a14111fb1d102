"""A training step never makes the host wait for the GPU: counted on the CPU (tests/host_syncs.py says how)."""

import math

import pytest
import torch
from host_syncs import WATCHED, watched_training
from test_train import logged

from litmoe.training.readback import LogReads, RunningLoss, is_host_buffer

STEPS = 4  # optimizer steps of two micro-batches of 4 x 64 tokens; the log at the fourth only (WATCHED)


def watched_run(train_args, out_dir, extra: tuple[str, ...] = ()):
    flags = (*WATCHED, "--train.global_batch_size", "8", *extra)
    return watched_training(train_args(out_dir, STEPS * 2 * 4 * 64, flags))


@pytest.mark.parametrize(
    "variant",
    [
        (),
        ("--precision", "bf16-mixed"),
        ("--moe.capacity_factor", "1.25", "--moe.bias_update_rate", "0.001"),
        ("--optimization.fused_loss", "true", "--precision", "bf16-mixed"),
    ],
    ids=["fp32", "bf16-autocast", "capacity-and-bias", "fused-loss"],
)
def test_no_step_waits_for_the_device_and_a_log_step_reads_once(train_args, tmp_path, variant):
    out_dir = tmp_path / "out"
    syncs = watched_run(train_args, out_dir, variant).record()
    assert syncs["steps"] == STEPS and syncs["syncs"] == [[]] * (STEPS + 1)
    # each step sends its gradient norm on (read a step later, by the next step's health check); after the
    # fourth step, the log step's one copy, read at once: the one wait
    assert syncs["copies"] == [1, 1, 1, 1, 1] and syncs["waits"] == [0, 0, 0, 0, 1]
    # what that one read brought is in the log: the loss, the gradient norm and the routing statistics
    for key in ("loss", "grad_norm", "moe/imbalance", "moe/layer1/load/expert3"):
        (value,) = logged(out_dir, key).values()
        assert math.isfinite(value)


@pytest.mark.parametrize(
    "flags, reads",
    [
        (("--health.nonfinite", "skip"), ["_local_scalar_dense at health.py"]),
        (("--optimization.running_loss_nan_check", "true"), ["_local_scalar_dense at aggregation.py"] * 2 * 2),
    ],
    ids=["skip-policy", "running-loss-nan-check"],
)
def test_the_switches_that_read_the_device_at_each_step_are_seen_to(train_args, tmp_path, flags, reads):
    """The skip policy must decide before the optimizer steps: it reads the norm at every step. torchmetrics' NaN
    check in LitGPT's running loss reads twice per micro-batch. The count sees them, and where they come from."""
    syncs = watched_run(train_args, tmp_path / "out", flags).record()
    assert [[read.split(":")[0] for read in step] for step in syncs["syncs"]][:STEPS] == [reads] * STEPS


def test_the_running_loss_stays_on_the_device_until_the_log_step_reads_it():
    """LitGPT's running loss without torchmetrics' NaN check (two host reads per micro-batch): a NaN stays in
    the mean, for the health check to see; the mean of the last `window` losses, read with the log step's rest."""
    state = {"iter_num": 1}
    reads = LogReads(state)
    reads.add("twice", lambda: torch.tensor([2.0, 4.0]))
    running = RunningLoss(reads, window=2, sync_on_compute=False)
    running.update(torch.tensor(float("nan")))
    assert math.isnan(running.compute().item())
    for loss in (5.0, 1.0, 3.0):
        running.update(torch.tensor(loss))
    assert running.compute().item() != 2.0  # read once per log step: still step 1's values
    state["iter_num"] = 2
    loss = running.compute()
    assert loss.item() == 2.0 and reads.get("twice").tolist() == [2.0, 4.0]
    assert is_host_buffer(loss) and is_host_buffer(reads.get("twice"))
