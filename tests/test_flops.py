import pytest
import torch
from litgpt import GPT, Config

from litmoe.model.flops import TrainingFlops, active_parameters, total_parameters, training_flops_per_token


def meta_model(name: str, **overrides) -> GPT:
    with torch.device("meta"):
        return GPT(Config.from_name(name, **overrides))


def test_moe_200m_counts_match_stock_litgpt():
    model = meta_model("MoE-200M")
    assert model.config.padded_vocab_size == 50_688
    assert total_parameters(model) == 549_808_896
    lm_head = 50_688 * 768
    assert active_parameters(model) - lm_head == 132_213_504
    assert training_flops_per_token(model, seq_len=2048) == pytest.approx(1.2533e9, rel=1e-4)


def test_small_config_by_hand():
    # 1 layer, n_embd 8, 2 heads of 4, 1 query group, 4 experts of 16 (top-2), vocab 64, no biases
    model = meta_model(
        "MoE-tiny", n_layer=1, n_embd=8, n_head=2, n_query_groups=1, vocab_size=64, padding_multiple=64,
        moe_intermediate_size=16, n_expert=4, n_expert_per_token=2, block_size=32,
    )  # fmt: skip
    qkv = 8 * (2 + 2 * 1) * 4  # q for 2 heads, one k and one v group
    attention = qkv + 8 * 8
    norms = 8 + 8 + 8  # norm_1, norm_2, final norm
    gate = 8 * 4
    expert = 3 * 8 * 16
    lm_head = 64 * 8
    assert active_parameters(model) == attention + norms + gate + 2 * expert + lm_head
    per_token = 6 * (attention + norms + gate + 2 * expert + lm_head) + 12 * 1 * 8 * 32
    assert training_flops_per_token(model, seq_len=32) == per_token
    assert TrainingFlops(micro_batch_size=3, seq_len=32)(model) == per_token * 3 * 32


def test_tied_embeddings_count_lm_head_once():
    model = meta_model("MoE-tiny")
    untied = active_parameters(model)
    model.transformer.wte.weight = model.lm_head.weight
    assert active_parameters(model) == untied


def test_stock_meta_device_measure_fails_on_moe_and_ours_answers():
    """Why the patch exists: LitGPT's meta-device FLOP measurement cannot run LLaMAMoE."""
    from lightning.fabric.utilities.throughput import measure_flops
    from litgpt.utils import chunked_cross_entropy

    model = meta_model("MoE-tiny")
    with torch.device("meta"):
        x = torch.randint(0, 1, (2, 16))
    with pytest.raises(NotImplementedError):
        measure_flops(model, lambda: model(x), lambda y: chunked_cross_entropy(y, x, chunk_size=0))
    assert TrainingFlops(micro_batch_size=2, seq_len=16)(model, lambda: model(x)) > 0


def test_litmoe_layer_counts_like_stock():
    import litgpt.model

    from litmoe.core.patching import swapped
    from litmoe.model.moe import MoELayer

    stock = meta_model("MoE-200M")
    with swapped(litgpt.model, "LLaMAMoE", MoELayer):
        ours = meta_model("MoE-200M")
    assert isinstance(ours.transformer.h[0].mlp, MoELayer)
    assert total_parameters(ours) == total_parameters(stock)
    assert active_parameters(ours) == active_parameters(stock)


@pytest.mark.parametrize(
    ("name", "dtype", "peak"),
    [
        ("NVIDIA H200", torch.bfloat16, 989.4e12),  # what CUDA calls an H200 SXM; Lightning knows no such name
        ("NVIDIA H200 NVL", torch.bfloat16, 835.5e12),
        ("NVIDIA H200", torch.float32, 494.7e12),  # TF32, as training sets matmul precision "high"
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4e12),  # Lightning's table
        ("NVIDIA GeForce GTX 480", torch.bfloat16, None),
    ],
)
def test_mfu_has_the_dense_peak_of_the_gpu(name, dtype, peak, monkeypatch):
    from litmoe.model.flops import device_peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert device_peak_flops(torch.device("cuda", 0), dtype) == peak
    assert device_peak_flops(torch.device("cpu"), dtype) is None
