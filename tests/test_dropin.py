"""litmoe's MoE layer as a drop-in for stock `litgpt.model.LLaMAMoE`, held to every MoE config LitGPT registers:
the same outputs, gradients and state dicts; stock's sizes (an expert size taken from intermediate_size, sizes the
grouped GEMM cannot take); and stock's reading surface (`mlp.experts[i].fc_1.weight`, iteration, len)."""

import dataclasses

import pytest
import torch
from conftest import REPO, litgpt, tiny_run_args
from litgpt import Config
from litgpt.config import configs, name_to_config
from litgpt.model import LLaMAMoE

from litmoe.model.experts import grouped_gemm_blocker
from litmoe.model.moe import MoELayer

ROUTING_FIELDS = (
    "n_expert", "n_expert_per_token", "n_expert_groups", "n_topk_groups", "n_topk_scores_per_group",
    "n_shared_expert", "norm_topk_prob", "routed_scaling_factor",
)  # fmt: skip
# LitGPT's own DeepSeek-V3 test routes this way (sigmoid scores, expert groups, a shared expert, scaling); no
# registered config does yet, so it stands here for whatever an upgrade adds.
DEEPSEEK_ROUTING = dict(
    name="deepseek-v3-routing", mlp_class_name="LLaMAMoE", n_expert=16, n_expert_per_token=2, n_expert_groups=4,
    n_topk_groups=2, n_topk_scores_per_group=2, n_shared_expert=1, norm_topk_prob=True, routed_scaling_factor=2.5,
    moe_intermediate_size=20,
)  # fmt: skip
# (n_embd, expert size): sizes the grouped GEMM takes in fp32, and odd ones it cannot (LitGPT's Mixtral test uses 86)
SHAPES = {"aligned": (64, 96), "odd": (42, 86)}


def registered_moe_configs() -> list[dict]:
    """One config per routing behaviour among every LLaMAMoE config LitGPT registers (ours included)."""
    unique = {}
    for config in [*configs, DEEPSEEK_ROUTING]:
        if config.get("mlp_class_name") == "LLaMAMoE":
            key = tuple(config.get(field) for field in ROUTING_FIELDS) + ("moe_intermediate_size" in config,)
            unique.setdefault(key, config)
    return list(unique.values())


def shrunk(fields: dict, n_embd: int, hidden: int) -> Config:
    """The config at CPU scale with its routing kept; the expert size goes where the config puts it."""
    fields = {key: value for key, value in fields.items() if key not in ("hf_config", "head_size", "n_query_groups")}
    size_field = "moe_intermediate_size" if fields.get("moe_intermediate_size") else "intermediate_size"
    fields.update(n_layer=1, n_embd=n_embd, n_head=2, block_size=16, vocab_size=64, padded_vocab_size=64)
    fields[size_field] = hidden
    return Config(**fields)


def stock_layer(config: Config, seed: int) -> LLaMAMoE:
    torch.manual_seed(seed)
    stock = LLaMAMoE(config)
    with torch.no_grad():
        for tensor in [*stock.parameters(), *stock.buffers()]:  # the grouped router's weight starts as torch.empty
            tensor.normal_(std=0.2)
    return stock


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fields", registered_moe_configs(), ids=lambda fields: fields["name"])
def test_every_registered_moe_config_computes_as_stock(fields, shape):
    config = shrunk(fields, *SHAPES[shape])
    stock = stock_layer(config, seed=0)
    ours = MoELayer(config)
    ours.load_state_dict(stock.state_dict())  # strict: stock's keys and shapes
    x = torch.randn(2, 7, config.n_embd)
    x_stock, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_stock, out_ours = stock(x_stock), ours(x_ours)
    torch.testing.assert_close(out_ours, out_stock, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out_stock)
    out_stock.backward(grad)
    out_ours.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_stock.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.gate.weight.grad, stock.gate.weight.grad, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(ours.experts, stock.experts, strict=True):
        for name in ("fc_1", "fc_2", "proj"):
            torch.testing.assert_close(getattr(mine, name).weight.grad, getattr(theirs, name).weight.grad)
    back = LLaMAMoE(config)
    back.load_state_dict(ours.state_dict())  # strict, the other way
    assert all(torch.equal(back.state_dict()[key], value) for key, value in stock.state_dict().items())


def test_the_experts_read_and_write_as_stock_module_list():
    config = shrunk(name_to_config["Mixtral-8x7B-v0.1"], 64, 96)
    stock = stock_layer(config, seed=1)
    ours = MoELayer(config)
    ours.load_state_dict(stock.state_dict())
    assert len(ours.experts) == len(stock.experts) == config.n_expert
    assert ours.experts[-1].proj.weight.shape == stock.experts[-1].proj.weight.shape
    x = torch.randn(5, config.n_embd)
    for mine, theirs in zip(ours.experts, stock.experts, strict=True):
        assert torch.equal(mine.fc_2.weight, theirs.fc_2.weight)
        torch.testing.assert_close(mine(x), theirs(x))
    with pytest.raises(IndexError, match="expert index 8 out of range for 8 experts"):
        ours.experts[8]
    # writing through the views changes the layer, as writing stock's experts changes stock's
    new_fc_1, new_proj = torch.randn_like(stock.experts[3].fc_1.weight), torch.randn_like(stock.experts[3].proj.weight)
    with torch.no_grad():
        stock.experts[3].fc_1.weight.copy_(new_fc_1)
        ours.experts[3].fc_1.weight.copy_(new_fc_1)
        stock.experts[3].proj.weight.copy_(new_proj)
    ours.experts[3].proj.weight = new_proj
    tokens = torch.randn(1, 9, config.n_embd)
    torch.testing.assert_close(ours(tokens), stock(tokens), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"expert weight of shape \(96, 64\) cannot take a tensor of shape \(64, 96\)"):
        ours.experts[0].fc_1.weight = torch.zeros(64, 96)


def test_odd_sizes_name_the_slower_path_and_the_size_that_avoids_it():
    assert grouped_gemm_blocker(64, 96, torch.float32, "cpu") is None
    assert grouped_gemm_blocker(64, 96, torch.bfloat16, "cuda") is None
    message = grouped_gemm_blocker(42, 86, torch.float32, "cpu")
    assert "n_embd 42, expert size 86" in message and "n_embd 44, expert size 88 would avoid it" in message
    assert "multiples of 8 in bfloat16" in grouped_gemm_blocker(64, 86, torch.bfloat16, "cuda")
    assert "take bf16, not float32" in grouped_gemm_blocker(64, 96, torch.float32, "cuda")


def test_a_mixtral_config_without_moe_intermediate_size_builds_the_same_model_as_stock():
    config = shrunk(name_to_config["Mixtral-8x7B-v0.1"], 64, 96)  # experts of intermediate_size
    assert config.moe_intermediate_size is None
    assert MoELayer(config).experts[0].fc_1.weight.shape == LLaMAMoE(config).experts[0].fc_1.weight.shape == (96, 64)


@pytest.mark.parametrize(
    ("model", "sizes"),
    [
        ("Mixtral-8x7B-v0.1", ("--model.intermediate_size", "86")),
        ("Qwen3-30B-A3B", ("--model.moe_intermediate_size", "24", "--model.n_expert", "16")),
    ],
)
def test_registered_moe_models_train_and_load_in_litgpt_and_ours(model, sizes, prepared, tmp_path, capsys):
    from litmoe.inference.generate import generate
    from litmoe.training.cli import main

    out_dir = tmp_path / "out"
    cpu_size = ("--model", model, "--model.n_layer", "1", "--model.n_embd", "64", "--model.n_head", "4",
                "--model.n_query_groups", "2", "--model.head_size", "16", "--model.block_size", "64",
                *sizes)  # fmt: skip
    run_args = [*tiny_run_args(prepared, REPO / "model_config.yaml", out_dir, max_tokens=256 * 4), *cpu_size]
    main(run_args)
    out = capsys.readouterr().out
    if model.startswith("Mixtral"):  # expert size 86 in fp32: looped experts, said at start and by --estimate
        assert "expert size 86: grouped GEMMs need multiples of 4 in float32" in out
        main([*run_args, "--estimate"])
        assert "experts: expert size 86: grouped GEMMs need multiples of 4" in capsys.readouterr().out
    saved = dataclasses.asdict(Config.from_file(out_dir / "final" / "model_config.yaml"))
    assert saved["n_expert_per_token"] == Config.from_name(model).n_expert_per_token
    samples = generate(out_dir / "final", prompt="The cat", max_new_tokens=4, temperature=0.0)
    assert len(samples[0]) == 4
    litgpt("generate", str(out_dir / "final"), "--prompt", "The cat", "--max_new_tokens", "4", "--precision", "32-true")
    assert "\nThe cat" in capsys.readouterr().out  # after the settings it prints


def test_a_deepseek_v3_model_routes_as_transformers_does_through_stock_weight_surgery():
    """LitGPT's own DeepSeek-V3 check, on our layer: dense first block, then an MoE block whose experts are copied
    into transformers' model the way LitGPT's test copies them (`for expert in mlp.experts: expert.fc_1.weight`)."""
    transformers = pytest.importorskip("transformers")
    from litgpt.model import GPT, LLaMAMLP

    from litmoe.model.builder import moe_layer

    attention = {"q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16}
    routing = {key: value for key, value in DEEPSEEK_ROUTING.items() if key not in ("name", "mlp_class_name")}
    config = Config(
        padded_vocab_size=1000, vocab_size=1000, n_layer=2, n_embd=64, n_head=4, n_query_groups=4, head_size=16,
        norm_eps=1e-6, bias=False, latent_attention=attention, first_k_dense_replace=1, mlp_class_name="LLaMAMoE",
        **routing,
    )  # fmt: skip
    torch.manual_seed(0)
    with moe_layer(MoELayer):
        model = GPT(config)
    assert isinstance(model.transformer.h[0].mlp, LLaMAMLP) and isinstance(model.transformer.h[1].mlp, MoELayer)
    ours = model.transformer.h[1].mlp.eval()
    with torch.no_grad():
        ours.gate.e_score_correction_bias.normal_(std=0.1)  # so that the bias changes which experts are chosen
    hf_config = transformers.DeepseekV3Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, num_hidden_layers=2, first_k_dense_replace=1,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, moe_intermediate_size=20, vocab_size=1000,
    )  # fmt: skip
    theirs = transformers.DeepseekV3ForCausalLM(hf_config).model.layers[1].mlp.eval()
    with torch.no_grad():
        theirs.gate.weight.copy_(ours.gate.weight)
        theirs.gate.e_score_correction_bias.copy_(ours.gate.e_score_correction_bias)
        for mine, hf in zip(ours.experts, theirs.experts, strict=True):
            hf.gate_proj.weight.copy_(mine.fc_1.weight)
            hf.up_proj.weight.copy_(mine.fc_2.weight)
            hf.down_proj.weight.copy_(mine.proj.weight)
        for name, hf_name in (("fc_1", "gate_proj"), ("fc_2", "up_proj"), ("proj", "down_proj")):
            getattr(theirs.shared_experts, hf_name).weight.copy_(getattr(ours.shared_experts, name).weight)
        x = torch.randn(2, 16, 64)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", ["Mixtral-8x7B-v0.1", "Qwen3-30B-A3B"])
def test_whole_models_with_our_layer_give_transformers_logits(model):
    """LitGPT's own parity checks (its tests/test_model.py: Mixtral and Qwen3-MoE against transformers, weights
    through LitGPT's converter, an expert size of 86), with our layer in every block."""
    transformers = pytest.importorskip("transformers")
    from litgpt.model import GPT
    from litgpt.scripts.convert_hf_checkpoint import copy_weights_hf_llama, copy_weights_qwen_3

    from litmoe.model.builder import moe_layer

    sizes = {"moe_intermediate_size": 20, "n_expert_per_token": 2} if model.startswith("Qwen3") else {}
    ours_config = Config.from_name(model, padded_vocab_size=1000, n_layer=2, n_embd=32, n_head=8, n_query_groups=2,
                                   intermediate_size=86, n_expert=4, block_size=16, **sizes)  # fmt: skip
    common = dict(
        vocab_size=1000, hidden_size=32, num_attention_heads=8, num_hidden_layers=2, num_key_value_heads=2,
        intermediate_size=86, max_position_embeddings=16, rms_norm_eps=ours_config.norm_eps,
        rope_theta=ours_config.rope_base,
    )  # fmt: skip
    torch.manual_seed(0)
    if model.startswith("Mixtral"):
        theirs = transformers.MixtralForCausalLM(transformers.MixtralConfig(num_local_experts=4, **common))
        copy = copy_weights_hf_llama
    else:
        theirs = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            head_dim=ours_config.head_size, moe_intermediate_size=20, num_experts=4, num_experts_per_tok=2,
            norm_topk_prob=True, tie_word_embeddings=False, **common))  # fmt: skip
        copy = copy_weights_qwen_3
    state = {}
    copy(ours_config, {}, state, theirs.state_dict())
    with moe_layer(MoELayer):
        ours = GPT(ours_config)
    ours.load_state_dict(state)
    assert isinstance(ours.transformer.h[0].mlp, MoELayer)
    tokens = torch.randint(0, 1000, (2, 12))
    with torch.inference_mode():
        torch.testing.assert_close(ours(tokens), theirs.eval()(tokens).logits)
