"""The strategy decision, its errors, and the DeepSpeed configs the flags produce (no GPU needed)."""

import json
from functools import partial

import pytest
import torch

from litmoe.core.args import StrategyArgs
from litmoe.core.errors import UserError
from litmoe.distributed.estimate import TrainingEstimate, per_device_memory
from litmoe.distributed.plans import Hardware, StrategyChoice
from litmoe.distributed.strategy import DEEPSPEED_ON_CPU, adopt_launcher_node_rank, resolve_strategy
from litmoe.distributed.zero import deepspeed_config, user_deepspeed_config

GB = 10**9


def decide(gpus: int, gpu_gb: float | None, cpu_gb: float, billions: float, nodes: int = 1, deepspeed=True, nvme=None):
    """Auto's choice for a model of `billions` parameters, bf16-mixed, 1 GB of activations per GPU."""
    hardware = Hardware(gpus, nodes, gpu_gb and gpu_gb * GB, cpu_gb * GB, deepspeed)
    params = int(billions * 1e9)
    estimate = TrainingEstimate(
        params, params, params // 50, 6 * params, activations=1 * GB, activations_checkpointed=0, layers=50
    )
    memory_of = partial(
        per_device_memory, estimate, "bf16-mixed", world_size=hardware.world_size, devices_per_node=gpus
    )
    choice = resolve_strategy(StrategyArgs(nvme_path=nvme), hardware, memory_of)
    return (choice.name, choice.zero_stage, choice.offload_optimizer, choice.offload_params), choice.reason


@pytest.mark.parametrize(
    "gpus, gpu_gb, cpu_gb, billions, expected",
    [
        (1, 80, 512, 0.55, ("single", None, "none", "none")),  # MoE-200M: 8.8 GB + activations
        (1, 24, 512, 3, ("deepspeed", 2, "cpu", "none")),  # 48 GB of states: ZeRO-Offload keeps 12 GB on the GPU
        (1, 24, 512, 8, ("deepspeed", 3, "cpu", "cpu")),  # even 16-bit weights + gradients do not fit
        (8, 80, 1024, 1, ("ddp", None, "none", "none")),  # 16 GB replica
        (8, 80, 1024, 7, ("deepspeed", 2, "none", "none")),  # replica 112 GB; ZeRO-2: 14 + 98/8 GB
        (8, 80, 1024, 30, ("deepspeed", 3, "none", "none")),  # ZeRO-2: 60 + 52.5 GB; ZeRO-3: 60 GB + blocks
        (8, 80, 2048, 60, ("deepspeed", 3, "cpu", "cpu")),  # ZeRO-3: 120 GB; offloaded: 840 GB per node
        (8, 12, 1024, 0.5, ("ddp", None, "none", "none")),  # small GPUs, small model: a replica fits
        (8, 12, 1024, 2, ("deepspeed", 2, "cpu", "none")),  # GPUs under 16 GB offload the optimizer
    ],
)
def test_auto_decision(gpus, gpu_gb, cpu_gb, billions, expected):
    assert decide(gpus, gpu_gb, cpu_gb, billions)[0] == expected


def test_auto_splits_the_experts_where_a_replica_does_not_fit_but_a_split_one_does():
    """8 x 80 GB, 7B parameters of which 6B are experts: a DDP replica needs 112 GB of state, one with an eighth of
    the experts 28 GB. Auto then splits them over the node's 8 GPUs (and not where the model has none)."""
    hardware = Hardware(8, 1, 80 * GB, 1024 * GB, True)
    estimate = TrainingEstimate(7 * 10**9, 10**9, 10**8, 6 * 10**9, 1 * GB, 0, expert_parameters=6 * 10**9, layers=70)
    memory_of = partial(per_device_memory, estimate, "bf16-mixed", world_size=8, devices_per_node=8)
    choice = resolve_strategy(StrategyArgs(), hardware, memory_of, expert_split=8)
    assert (choice.name, choice.expert_parallel) == ("ddp", 8)
    assert "DDP across 8 ranks, experts split over 8 (expert parallel) needs 27.0 GiB" in choice.reason
    assert resolve_strategy(StrategyArgs(), hardware, memory_of, expert_split=1).name == "deepspeed"
    small = TrainingEstimate(10**9, 10**9, 10**7, 6 * 10**9, 1 * GB, 0, expert_parameters=8 * 10**8, layers=100)
    memory_of = partial(per_device_memory, small, "bf16-mixed", world_size=8, devices_per_node=8)
    assert resolve_strategy(StrategyArgs(), hardware, memory_of, expert_split=8).expert_parallel == 1  # DDP fits


def test_auto_shards_the_rest_with_fsdp_where_a_split_replica_does_not_fit():
    """8 x 80 GB, 30B parameters of which 28B are experts: with an eighth of the experts a replica still needs
    5.5B x 16 bytes = 88 GB; FSDP with the experts split holds 1/8 of everything (60 GB), gathers one block's
    dense part and an eighth of its experts (fp32, twice) and is chosen."""
    hardware = Hardware(8, 1, 80 * GB, 1024 * GB, True)
    estimate = TrainingEstimate(30 * 10**9, 10**9, 625 * 10**6, 6 * 10**9, 1 * GB, 0, expert_parameters=28 * 10**9,
                                layers=48)  # fmt: skip
    memory_of = partial(per_device_memory, estimate, "bf16-mixed", world_size=8, devices_per_node=8)
    choice = resolve_strategy(StrategyArgs(), hardware, memory_of, expert_split=8)
    assert (choice.name, choice.expert_parallel) == ("fsdp", 8)
    needs = 60 * GB + 2 * 4 * (625e6 - 28e9 * 7 / 8 / 48) + 1 * GB
    assert f"FSDP across 8 ranks, experts split over 8 (expert parallel) needs {needs / 2**30:.1f} GiB" in choice.reason
    fp16 = partial(per_device_memory, estimate, "16-mixed", world_size=8, devices_per_node=8)
    choice = resolve_strategy(StrategyArgs(), hardware, fp16, expert_split=8, precision="16-mixed")
    assert choice.name == "deepspeed"  # FSDP has no fp16 loss scaler: not among auto's plans then


def test_expert_parallel_runs_on_ddp_or_fsdp_and_fsdp_takes_no_fp16_scaling():
    from litmoe.distributed.strategy import check_expert_parallel_precision, with_expert_parallel

    hardware = Hardware(4, 1, 80 * GB, 1024 * GB, True)
    with pytest.raises(UserError, match="runs on DDP or FSDP, not on DeepSpeed ZeRO-2 across 4 ranks; use --strat"):
        with_expert_parallel(StrategyChoice("deepspeed", "", 2), 2, hardware)
    choice = with_expert_parallel(StrategyChoice("fsdp", "--strategy fsdp"), 2, hardware)
    check_expert_parallel_precision(choice, "bf16-mixed")
    with pytest.raises(UserError, match="--precision 16-mixed: FSDP with expert parallelism .* use --precision bf1"):
        check_expert_parallel_precision(choice, "16-mixed")


def test_auto_decision_nvme_cpu_only_and_without_deepspeed(tmp_path):
    # 8 x 80 GB, 1 TB of RAM, 100B parameters: 1.4 TB of offloaded state per node does not fit in RAM
    assert decide(8, 80, 1024, 100, nvme=tmp_path)[0] == ("deepspeed", 3, "nvme", "nvme")
    choice, reason = decide(8, 80, 1024, 100)
    assert choice == ("deepspeed", 3, "cpu", "cpu") and "--nvme-path would allow NVMe offload" in reason
    assert decide(8, 80, 1024, 7, deepspeed=False)[0][0] == "fsdp"
    choice, reason = decide(1, 24, 512, 3, deepspeed=False)
    assert choice[0] == "single" and "uv sync --extra deepspeed" in reason
    assert decide(2, None, 64, 1)[0][0] == "ddp"  # CPU processes: DDP over gloo
    assert decide(1, None, 64, 1)[0][0] == "single"
    _, reason = decide(8, 80, 1024, 7)
    replica, zero2 = (16 * 7e9 + GB) / 2**30, (2 * 7e9 + 14 * 7e9 / 8 + GB) / 2**30
    assert reason == (
        f"8 GPUs of 75 GiB; DDP across 8 ranks needs {replica:.1f} GiB per GPU;"
        f" DeepSpeed ZeRO-2 across 8 ranks needs {zero2:.1f} GiB"
    )


def test_explicit_choices():
    gpu = Hardware(4, 1, 80 * GB, 512 * GB, True)
    assert resolve_strategy(StrategyArgs(name="fsdp"), gpu) == StrategyChoice("fsdp", "--strategy fsdp")
    one = Hardware(1, 1, 80 * GB, 512 * GB, True)
    assert resolve_strategy(StrategyArgs(name="ddp"), one).name == "single"
    assert resolve_strategy(StrategyArgs(zero_stage=3), gpu) == StrategyChoice("deepspeed", "DeepSpeed requested", 3)
    choice = resolve_strategy(StrategyArgs(name="deepspeed", offload_optimizer="cpu"), gpu)
    assert (choice.zero_stage, choice.offload_optimizer, choice.offload_params) == (2, "cpu", "none")


DEEPSPEED = {"name": "deepspeed"}
GPU, NO_GPU, NOT_INSTALLED = (1, 80, True), (1, None, True), (1, 80, False)


@pytest.mark.parametrize(
    "args, hardware, message",
    [
        ({"name": "single"}, (4, None, True), r"--strategy single trains on one device, but --devices x --num_nodes"),
        ({"name": "ddp", "zero_stage": 2}, GPU, r"--strategy ddp: --zero-stage, --offload-optimizer, --offload-par"),
        (DEEPSPEED, NO_GPU, r"--strategy deepspeed needs a CUDA GPU \(Lightning runs DeepSpeed on CUDA only\)"),
        (DEEPSPEED, NOT_INSTALLED, r"DeepSpeed is not installed; install it with `uv sync --extra deepspeed`"),
        ({**DEEPSPEED, "offload_params": "cpu"}, GPU, r"--offload-params cpu needs --zero-stage 3"),
        ({**DEEPSPEED, "offload_optimizer": "nvme"}, GPU, r"NVMe offload needs --zero-stage 3"),
        ({"zero_stage": 3, "offload_params": "nvme"}, GPU, r"NVMe offload: pass --nvme-path DIR"),
        ({"zero_stage": 3, "offload_params": "nvme", "nvme_path": "/proc/nvme"}, GPU,
         r"--nvme-path /proc/nvme: not a writable directory"),
    ],
)  # fmt: skip
def test_errors_before_any_work(args, hardware, message, monkeypatch):
    monkeypatch.delenv(DEEPSPEED_ON_CPU, raising=False)
    gpus, gpu_gb, installed = hardware
    with pytest.raises(UserError, match=message):
        resolve_strategy(StrategyArgs(**args), Hardware(gpus, 1, gpu_gb and gpu_gb * GB, 512 * GB, installed))


def test_zero3_refuses_compile():
    hardware = Hardware(2, 1, 80 * GB, 512 * GB, True)
    with pytest.raises(UserError, match=r"ZeRO-3 with --compile: .* pass --no-compile, or use --zero-stage 2"):
        resolve_strategy(StrategyArgs(zero_stage=3), hardware, compile=True)
    assert resolve_strategy(StrategyArgs(zero_stage=2), hardware, compile=True).zero_stage == 2


def test_deepspeed_config_for_each_flag_combination(tmp_path):
    loop = {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 1.0, "managed_gradient_accumulation": False,
            "zero_allow_untested_optimizer": True}  # fmt: skip
    assert deepspeed_config(1, "none", "none", None, 8, 1.0) == {
        **loop, "zero_optimization": {"stage": 1, "contiguous_gradients": True, "overlap_comm": False},
    }  # fmt: skip
    assert deepspeed_config(2, "cpu", "none", None, 8, 1.0) == {
        **loop,
        "zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": True,
                              "offload_optimizer": {"device": "cpu", "pin_memory": True}},
    }  # fmt: skip
    assert deepspeed_config(3, "cpu", "cpu", None, 8, 1.0)["zero_optimization"] == {
        "stage": 3, "contiguous_gradients": True, "overlap_comm": True,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True},
    }  # fmt: skip
    nvme = deepspeed_config(3, "nvme", "nvme", tmp_path, 8, None)
    assert nvme["gradient_clipping"] == 0.0
    assert nvme["zero_optimization"]["offload_param"] == {
        "device": "nvme",
        "pin_memory": True,
        "nvme_path": str(tmp_path),
    }
    assert nvme["zero_optimization"]["offload_optimizer"]["nvme_path"] == str(tmp_path)


def test_user_deepspeed_config_is_passed_through_with_the_loop_keys(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_max_live_parameters": 1e8}}))
    config = user_deepspeed_config(path, micro_batch_size=4, max_norm=0.5)
    assert config == {
        "zero_optimization": {"stage": 3, "stage3_max_live_parameters": 1e8}, "train_micro_batch_size_per_gpu": 4,
        "gradient_clipping": 0.5, "managed_gradient_accumulation": False, "zero_allow_untested_optimizer": True,
    }  # fmt: skip
    hardware = Hardware(2, 1, 80 * GB, 512 * GB, True)
    choice = resolve_strategy(StrategyArgs(deepspeed_config=path), hardware)
    assert (choice.name, choice.zero_stage, choice.reason) == ("deepspeed", 3, f"--deepspeed-config {path}")
    with pytest.raises(UserError, match=r"set the ZeRO stage and offload in that file, not also with --zero-stage"):
        resolve_strategy(StrategyArgs(deepspeed_config=path, zero_stage=2), hardware)

    for content, message in [
        ({"gradient_accumulation_steps": 4}, r"ds.json: remove gradient_accumulation_steps; LitGPT's loop accumulates"),
        ({"gradient_clipping": 2.0}, r"ds.json: gradient_clipping is 2.0 but this run needs 0.5; remove the key"),
        ({"train_micro_batch_size_per_gpu": 2}, r"train_micro_batch_size_per_gpu is 2 but this run needs 4"),
        ([1, 2], r"--deepspeed-config .*ds.json: expected a JSON object"),
    ]:
        path.write_text(json.dumps(content))
        with pytest.raises(UserError, match=message):
            user_deepspeed_config(path, micro_batch_size=4, max_norm=0.5)
    path.write_text("{stage: 3")
    with pytest.raises(UserError, match=r"ds.json: not valid JSON"):
        user_deepspeed_config(path, 4, 0.5)
    with pytest.raises(UserError, match=r"--deepspeed-config .*missing.json: file not found"):
        resolve_strategy(StrategyArgs(deepspeed_config=tmp_path / "missing.json"), hardware)


def test_deepspeed_launcher_node_rank_reaches_lightning(monkeypatch):
    from lightning.fabric.plugins.environments import LightningEnvironment

    monkeypatch.setenv("NODE_RANK", "recorded")  # monkeypatch now restores the original, removing what is set below
    monkeypatch.delenv("NODE_RANK")
    monkeypatch.setenv("CROSS_RANK", "1")  # what the DeepSpeed launcher sets on the second node
    adopt_launcher_node_rank()
    assert LightningEnvironment().node_rank() == 1
    monkeypatch.setenv("NODE_RANK", "3")
    adopt_launcher_node_rank()
    assert LightningEnvironment().node_rank() == 3  # an explicit NODE_RANK wins


def test_strategy_section_and_flags_reach_the_run(tmp_path, capsys, monkeypatch):
    from conftest import REPO

    from litmoe.training.cli import main

    monkeypatch.delenv(DEEPSPEED_ON_CPU, raising=False)
    config = tmp_path / "train.yaml"
    config.write_text((REPO / "train_config.yaml").read_text().replace("  name: auto ", "  name: deepspeed "))
    common = ["--config", str(config), "--no-cpu-profile", "--data_dir", str(tmp_path / "none"), "--estimate"]
    main(common)
    assert "strategy: DeepSpeed ZeRO-2 across 1 rank (DeepSpeed requested)" in capsys.readouterr().out
    main([*common, "--strategy", "single"])  # the flag wins over the file
    assert "strategy: single device (--strategy single)" in capsys.readouterr().out
    config.write_text("strategy: fsdp\n")  # the short form of the section
    main([*common, "--devices", "4"])
    assert "strategy: FSDP, sharded within each node's 4 devices (--strategy fsdp)" in capsys.readouterr().out


def test_each_node_says_once_what_it_waits_for_before_training():
    from litmoe.distributed.strategy import rendezvous_line

    environ = {"MASTER_ADDR": "node-a", "MASTER_PORT": "29500", "LOCAL_RANK": "0"}
    assert rendezvous_line(2, 16, 30, environ) == (
        "Waiting for all 16 ranks on 2 nodes to meet at node-a:29500; a node that never arrives ends the run after"
        " --timeout-minutes (30)"
    )
    assert rendezvous_line(2, 16, 30, {**environ, "LOCAL_RANK": "3"}) is None  # one line per node
    assert rendezvous_line(1, 8, 30, environ) is None  # one node: nothing to wait for
    assert "meet; a node" in rendezvous_line(2, 16, 30, {"SLURM_NTASKS": "16"})  # SLURM: Lightning finds the address


def test_the_clip_norm_is_the_float64_norm_of_every_gradient():
    """What single-device and DDP runs clip by (the expert-parallel plans add their ranks' squares to the same sum):
    the exact norm of a 1.5M-element gradient, where a float32 sum is off in the sixth digit; gradients scaled to
    max_norm; a non-finite norm and another norm type refused."""
    from lightning.fabric.plugins import Precision

    from litmoe.distributed.clipping import Float64SingleDeviceStrategy, squared_norm

    torch.manual_seed(0)
    parameters = [torch.nn.Parameter(torch.zeros(size)) for size in (1_500_000, 7)]
    for parameter in parameters:
        parameter.grad = torch.rand_like(parameter) * 1e-3
    exact = sum(parameter.grad.double().square().sum() for parameter in parameters).sqrt()
    optimizer = torch.optim.SGD(parameters, lr=0.0)
    strategy = Float64SingleDeviceStrategy(torch.device("cpu"), precision=Precision())
    norm = strategy.clip_gradients_norm(None, optimizer, max_norm=0.5)
    assert norm.dtype == torch.float64 and norm.item() == pytest.approx(exact.item(), rel=1e-12)
    clipped = sum(parameter.grad.double().square().sum() for parameter in parameters).sqrt()
    assert clipped.item() == pytest.approx(0.5, rel=1e-5)  # max_norm / (norm + 1e-6), as torch clips

    assert squared_norm([], torch.device("cpu")).item() == 0.0  # a rank that holds no gradient adds nothing
    with pytest.raises(ValueError, match="clips by the 2-norm of the gradients, not the 1.0-norm"):
        strategy.clip_gradients_norm(None, optimizer, max_norm=0.5, norm_type=1.0)
    parameters[1].grad[0] = float("inf")
    with pytest.raises(RuntimeError, match="the total norm of the gradients is inf"):
        strategy.clip_gradients_norm(None, optimizer, max_norm=0.5)
