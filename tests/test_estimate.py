import pytest
import torch
from litgpt import GPT, Config
from litgpt.utils import chunked_cross_entropy

from litmoe.estimate import bytes_per_parameter, estimate_training
from litmoe.moe import MoELayer
from litmoe.patches import checkpoint_blocks, swapped
from litmoe.train import main


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
    assert estimate.weights == measured["weights"]
    assert estimate.gradients == measured["gradients"]
    assert estimate.optimizer == measured["optimizer"]
    activations = estimate.activations_checkpointed if checkpointing else estimate.activations
    assert activations == pytest.approx(measured["activations"], rel=0.15)
    total = sum(measured.values())
    assert estimate.memory(checkpointing) == pytest.approx(total, rel=0.15)


def test_bytes_per_parameter():
    assert bytes_per_parameter("32-true") == (4, 4, 8)
    assert bytes_per_parameter("bf16-mixed") == (4, 4, 8)
    assert bytes_per_parameter("bf16-true") == (2, 2, 4)


def test_sharding_divides_the_states():
    config = Config.from_name("MoE-200M")
    single = estimate_training(config, "bf16-mixed", 8, 2048)
    sharded = estimate_training(config, "bf16-mixed", 8, 2048, shard_degree=8)
    assert sharded.optimizer == single.optimizer / 8 and sharded.activations == single.activations
    assert single.weights == 549_808_896 * 4


def test_estimate_command_for_moe_200m(capsys, tmp_path):
    from conftest import REPO

    result = main(["--config", str(REPO / "train_config.yaml"), "--no-cpu-profile", "--estimate",
                   "--data_dir", str(tmp_path / "none"), "--precision", "bf16-mixed"])  # fmt: skip
    out = capsys.readouterr().out
    assert result is None
    assert "549,808,896 parameters in total, 132,213,504 active non-embedding parameters per token" in out
    assert "training FLOPs per token: 1.2533 GFLOP" in out
    assert "optimizer state      4.10 GiB" in out and "tokens/s" in out
