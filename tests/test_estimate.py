import re

import pytest
import torch
from litgpt import GPT, Config
from litgpt.utils import chunked_cross_entropy

from litmoe.core.patching import swapped
from litmoe.distributed.estimate import TrainingEstimate, bytes_per_parameter, estimate_training, per_device_memory
from litmoe.distributed.plans import StrategyChoice
from litmoe.model.moe import MoELayer
from litmoe.training.cli import main
from litmoe.training.patches import checkpoint_blocks

SINGLE = StrategyChoice("single", "")


def saved_bytes(run, exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves for backward while `run()` executes its forward."""
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in exclude:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return sum(saved.values()), result


def measured_training_bytes(config: Config, batch: int, seq_len: int, checkpointing: bool) -> dict[str, int]:
    """Weights, gradients and AdamW state after a step, and the activations kept for backward.

    With checkpointing, the peak is what the forward kept (block inputs, logits) plus one block's activations
    while it is recomputed in backward."""
    import litgpt.model

    torch.manual_seed(0)
    with swapped(litgpt.model, "LLaMAMoE", MoELayer):
        model = GPT(config)
    if checkpointing:
        checkpoint_blocks(model)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    x = torch.randint(0, config.padded_vocab_size, (batch, seq_len))
    activations, loss = saved_bytes(lambda: chunked_cross_entropy(model(x), x), parameters)
    if checkpointing:
        block = model.transformer.h[0]
        cos, sin = model.cos[:seq_len].unsqueeze(0), model.sin[:seq_len].unsqueeze(0)
        hidden = torch.randn(batch, seq_len, config.n_embd, requires_grad=True)
        # the block's own forward, not the checkpointed wrapper: what recomputation saves
        activations += saved_bytes(lambda: type(block).forward(block, hidden, cos, sin), parameters)[0]
    loss.backward()
    optimizer = torch.optim.AdamW(model.parameters())
    optimizer.step()
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    return {
        "weights": nbytes(model.parameters()),
        "gradients": nbytes(p.grad for p in model.parameters()),
        "optimizer": nbytes(v for state in optimizer.state.values() for v in state.values() if v.dim() > 0),
        "activations": activations,
    }


@pytest.mark.parametrize("checkpointing", [False, True], ids=["stored", "checkpointed"])
def test_memory_estimate_within_15_percent_of_measured(checkpointing):
    config = Config.from_name("MoE-tiny", vocab_size=512, padding_multiple=64)
    measured = measured_training_bytes(config, batch=4, seq_len=128, checkpointing=checkpointing)
    estimate = estimate_training(config, "32-true", micro_batch_size=4, seq_len=128)
    memory = per_device_memory(estimate, "32-true", SINGLE, checkpointing=checkpointing)
    assert memory.weights == measured["weights"]
    assert memory.gradients == measured["gradients"]
    assert memory.optimizer == measured["optimizer"]
    assert memory.activations == pytest.approx(measured["activations"], rel=0.15)
    assert memory.total == pytest.approx(sum(measured.values()), rel=0.15)


def test_bytes_per_parameter():
    assert bytes_per_parameter("32-true") == (4, 4, 8)
    assert bytes_per_parameter("bf16-mixed") == (4, 4, 8)
    assert bytes_per_parameter("bf16-true") == (2, 2, 4)
    assert bytes_per_parameter("bf16-mixed", deepspeed=True) == (2, 2, 12)  # fp32 master + 2 AdamW states
    assert bytes_per_parameter("32-true", deepspeed=True) == (4, 4, 8)


def test_memory_per_device_under_each_strategy():
    """Hand-computed: 1,000 parameters (block of 100), 64 bytes of activations, bf16-mixed, 2 nodes x 4 GPUs."""
    estimate = TrainingEstimate(1000, 500, 100, 6000, activations=64.0, activations_checkpointed=16.0, layers=10)
    placement = {"world_size": 8, "devices_per_node": 4}

    def memory(choice, **kwargs):
        got = per_device_memory(estimate, "bf16-mixed", choice, **placement, **kwargs)
        return (got.weights, got.gradients, got.optimizer, got.gathered, got.activations, got.cpu_offload,
                got.nvme_offload)  # fmt: skip

    assert memory(SINGLE) == (4000, 4000, 8000, 0, 64, 0, 0)
    assert memory(StrategyChoice("ddp", "")) == (4000, 4000, 8000, 0, 64, 0, 0)
    assert memory(StrategyChoice("ddp", ""), checkpointing=True)[4] == 16
    assert memory(StrategyChoice("fsdp", "")) == (1000, 1000, 2000, 2 * 100 * 4, 64, 0, 0)  # within a node
    assert memory(StrategyChoice("deepspeed", "", 1)) == (2000, 2000, 1500, 0, 64, 0, 0)
    assert memory(StrategyChoice("deepspeed", "", 2)) == (2000, 250, 1500, 0, 64, 0, 0)
    assert memory(StrategyChoice("deepspeed", "", 3)) == (250, 250, 1500, 2 * 100 * 2, 64, 0, 0)
    assert memory(StrategyChoice("deepspeed", "", 2, "cpu")) == (2000, 250, 0, 0, 64, 1500, 0)
    assert memory(StrategyChoice("deepspeed", "", 3, "cpu", "cpu")) == (0, 250, 0, 400, 64, 1750, 0)
    assert memory(StrategyChoice("deepspeed", "", 3, "nvme", "nvme")) == (0, 250, 0, 400, 64, 0, 1750)


def test_expert_parallel_holds_its_share_of_the_experts():
    """Hand-computed: 1,000 parameters of which 800 are routed experts, split 4 ways: 200 + 800 / 4 per rank."""
    estimate = TrainingEstimate(1000, 500, 100, 6000, 64.0, 16.0, expert_parameters=800, layers=2)
    got = per_device_memory(estimate, "bf16-mixed", StrategyChoice("ddp", "", expert_parallel=4), world_size=8)
    assert (got.weights, got.gradients, got.optimizer) == (400 * 4, 400 * 4, 400 * 8)


def test_expert_parallel_on_fsdp_shards_everything_over_the_world():
    """Hand-computed, 8 ranks, EP 4, 2 layers: the 200 dense parameters over 8 ranks and each rank's 200 experts
    over their 2 replicas: 125 per rank; one block gathered holds its 50 dense parameters and a quarter of its 400
    experts (fp32 weights under bf16-mixed, gathered for the forward and again for the backward)."""
    estimate = TrainingEstimate(1000, 500, 450, 6000, 64.0, 16.0, expert_parameters=800, layers=2)
    got = per_device_memory(estimate, "bf16-mixed", StrategyChoice("fsdp", "", expert_parallel=4), world_size=8,
                            devices_per_node=8)  # fmt: skip
    assert (got.weights, got.gradients, got.optimizer, got.gathered) == (125 * 4, 125 * 4, 125 * 8, 2 * 150 * 4)


def test_estimate_command_for_moe_200m(capsys, tmp_path):
    from conftest import REPO

    result = main(["--config", str(REPO / "train_config.yaml"), "--no-cpu-profile", "--estimate",
                   "--data_dir", str(tmp_path / "none"), "--precision", "bf16-mixed"])  # fmt: skip
    out = capsys.readouterr().out
    assert result is None
    assert "549,808,896 parameters in total, 132,213,504 active non-embedding parameters per token" in out
    assert "training FLOPs per token: 1.2533 GFLOP" in out
    assert "optimizer state      4.10 GiB" in out and "tokens/s" in out
    runtime = re.search(r"not counted: the runtime\. This process holds ([0-9.]+) GiB before any training", out)
    assert runtime and 0.05 < float(runtime.group(1)) < 8  # what the process holds, measured, not a constant

    main(["--config", str(REPO / "train_config.yaml"), "--no-cpu-profile", "--estimate", "--data_dir",
          str(tmp_path / "none"), "--precision", "bf16-mixed", "--strategy", "deepspeed", "--zero-stage", "3",
          "--offload-optimizer", "cpu", "--devices", "8", "--num-nodes", "2"])  # fmt: skip
    out = capsys.readouterr().out
    assert "strategy: DeepSpeed ZeRO-3 across 16 ranks, optimizer offloaded to CPU memory" in out
    per_rank = 549_808_896 * 12 / 16 / 2**30
    assert f"offloaded to CPU memory: {per_rank:.2f} GiB per rank, {8 * per_rank:.2f} GiB per node" in out

    main(["--config", str(REPO / "train_config.yaml"), "--no-cpu-profile", "--estimate", "--data_dir",
          str(tmp_path / "none"), "--precision", "bf16-mixed", "--strategy", "ddp", "--devices", "8",
          "--strategy.expert_parallel", "8"])  # fmt: skip
    out = capsys.readouterr().out
    assert "strategy: DDP across 8 ranks, experts split over 8 (expert parallel)" in out
    experts = 12 * 8 * 3 * 768 * 2048  # layers x experts x (fc_1, fc_2, proj)
    held = 549_808_896 - experts + experts // 8
    assert f"optimizer state  {held * 8 / 2**30:8.2f} GiB" in out
    rows = 8 * 2048 * 2  # micro-batch 8 x 2048 tokens, each to 2 experts
    sent = 4 * 12 * rows * 768 * 2 * 7 / 8  # to the expert and back, forward and backward, 12 layers, bf16
    gathered = 2 * 549_808_896 * 2 * 7 / 8  # ZeRO-3: every bf16 weight, forward and backward, less one's shard
    assert f"sends {sent / 2**30:.3f} GiB per micro-batch" in out
    assert f"would gather {gathered / 2**30:.3f} GiB per micro-batch instead" in out
    worst = 8 * rows * 768 * 2  # every row of the 8 ranks' micro-batches to one rank's experts, bf16
    assert f"up to 8x its share of rows, at worst {worst / 2**30:.3f} GiB received per layer" in out

    main(["--config", str(REPO / "train_config.yaml"), "--no-cpu-profile", "--estimate", "--data_dir",
          str(tmp_path / "none"), "--precision", "bf16-mixed", "--strategy", "fsdp", "--devices", "8",
          "--strategy.expert_parallel", "4"])  # fmt: skip
    out = capsys.readouterr().out
    assert "strategy: FSDP across 8 ranks, experts split over 4 (expert parallel)" in out
    assert f"optimizer state  {549_808_896 * 8 / 8 / 2**30:8.2f} GiB" in out  # all of it over the 8 ranks
    dense = 549_808_896 - experts
    gathered = 2 * 4 * (dense * 7 / 8 + experts / 4 / 2)  # fp32 weights: the dense part, and one's experts' half
    assert f"FSDP gathers {gathered / 2**30:.3f} GiB of weights" in out


def test_durations_and_budgets_read_as_people_write_them():
    from litmoe.distributed.estimate import duration, token_count

    assert [duration(s) for s in (0.5, 90, 600, 36_000, 10 * 86400, 1e12)] == [
        "under a second", "90 s", "10 min", "10.0 h", "10 days", "3.17e+04 years",
    ]  # fmt: skip
    assert token_count(200_000_000) == "200,000,000" and token_count(1e30) == "1e+30"  # a typo'd budget
