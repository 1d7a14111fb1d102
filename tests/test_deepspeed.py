"""LitGPT's pretrain loop under DeepSpeed ZeRO, run for real on DeepSpeed's CPU accelerator (gloo).

Lightning allows DeepSpeed on CUDA only; LITMOE_DEEPSPEED_CPU=1 lifts that, so everything between LitGPT's
loop and the DeepSpeed engine (joint setup, caller-owned accumulation, clipping, ZeRO-3 init, shard
checkpoints, resume, consolidation) runs here. Each run is its own process: DeepSpeed initialises
torch.distributed, which must not leak into the other tests.
"""

import shutil

import pytest
import torch
from conftest import final_weights, run_train_process, tiny_run_args
from test_train import logged

from litmoe.distributed.strategy import DEEPSPEED_ON_CPU
from litmoe.training.cli import main

pytest.importorskip("deepspeed")

# 8 optimizer steps of 2 accumulated micro-batches (4 x 64 tokens), clipped at 1.0, checkpoints every 4 steps;
# aux-loss-free balancing on, so that the experts' selection bias is trained, saved and consolidated too
BUDGET = 16 * 4 * 64
EXTRA = (
    "--train.global_batch_size", "8", "--train.max_norm", "1.0", "--eval.interval", "100",
    "--moe.bias_update_rate", "0.001",
)  # fmt: skip


def run_deepspeed(args: list[str]) -> str:
    return run_train_process([*args, "--strategy", "deepspeed"], **{DEEPSPEED_ON_CPU: "1"})


@pytest.fixture(scope="module")
def single_device(prepared, tiny_model_file, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("single")
    main(tiny_run_args(prepared, tiny_model_file, out_dir, BUDGET, (*EXTRA, "--strategy", "single")))
    return out_dir


def test_zero3_trains_as_one_device_resumes_and_consolidates(prepared, tiny_model_file, tmp_path, single_device):
    out_dir = tmp_path / "zero3"
    out = run_deepspeed(tiny_run_args(prepared, tiny_model_file, out_dir, BUDGET, (*EXTRA, "--zero-stage", "3")))
    assert "Strategy: DeepSpeed ZeRO-3 across 1 rank (DeepSpeed requested)" in out
    expected = logged(single_device, "loss")
    got = logged(out_dir, "loss")
    assert sorted(got) == sorted(expected) and len(got) == 8  # logged at each optimizer step
    assert all(got[step] == pytest.approx(expected[step], rel=1e-4) for step in got)
    # the gradient norm the engine measured inside its step is the one clip_gradients reports on one device
    norms, expected_norms = logged(out_dir, "grad_norm"), logged(single_device, "grad_norm")
    assert sorted(norms) == sorted(expected_norms) and len(norms) == 8
    assert all(norms[step] == pytest.approx(expected_norms[step], rel=1e-3) for step in norms)
    shards = out_dir / "step-00000004" / "lit_model.pth"
    assert (shards / "latest").is_file() and list((shards / "checkpoint").glob("*optim_states.pt"))

    # the shards consolidate to the single-device run's weights, under stock LitGPT keys
    ours, reference = final_weights(out_dir), final_weights(single_device)
    assert ours.keys() == reference.keys() and "transformer.h.0.mlp.experts.3.fc_2.weight" in ours
    assert reference["transformer.h.0.mlp.expert_bias"].abs().sum() > 0
    assert all(torch.allclose(ours[key], reference[key], rtol=1e-4, atol=1e-5) for key in ours)

    # the conversion the refusal of another world size names: a new run from the shards' weights (lr 0 keeps them;
    # the selection bias moves without the lr)
    started, weights = tmp_path / "started", out_dir / "step-00000004"
    extra = ("--initial_checkpoint_dir", str(weights), "--optimizer.init_args.lr", "0", "--train.min_lr", "0")
    main(tiny_run_args(prepared, tiny_model_file, started, 8 * 64, (*EXTRA, "--strategy", "single", *extra)))
    weights = torch.load(weights / "consolidated" / "lit_model.pth", weights_only=True)["model"]
    assert all(torch.equal(final_weights(started)[key], weights[key]) for key in weights if "bias" not in key)

    resumed = tmp_path / "resumed"  # interrupted after its fourth optimizer step
    shutil.copytree(out_dir / "step-00000004", resumed / "step-00000004")
    extra = (*EXTRA, "--zero-stage", "3", "--resume", "auto")
    out = run_deepspeed(tiny_run_args(prepared, tiny_model_file, resumed, BUDGET, extra))
    assert "Resuming from" in out and "step-00000004" in out
    got = logged(resumed, "loss")
    assert sorted(got) == [9, 11, 13, 15]
    assert all(got[step] == pytest.approx(expected[step], rel=1e-4) for step in got)


def test_zero2_with_optimizer_offload_trains_as_one_device(prepared, tiny_model_file, tmp_path, single_device):
    out_dir = tmp_path / "zero2"
    extra = (*EXTRA, "--zero-stage", "2", "--offload-optimizer", "cpu")
    out = run_deepspeed(tiny_run_args(prepared, tiny_model_file, out_dir, BUDGET, extra))
    assert "DeepSpeed ZeRO-2 across 1 rank, optimizer offloaded to CPU memory" in out
    expected, got = logged(single_device, "loss"), logged(out_dir, "loss")
    assert sorted(got) == sorted(expected) and len(got) == 8
    assert all(got[step] == pytest.approx(expected[step], rel=1e-4) for step in got)
