import pytest
import torch
from litgpt import GPT, Config
from litgpt.model import LLaMAMoE

from litmoe.core.args import MoEArgs
from litmoe.model.experts import _to_stock_keys
from litmoe.model.moe import MoELayer, read_routing_stats, update_expert_bias

CONFIGS = {
    "softmax top-2": {},
    "shared experts": {"n_shared_expert": 1},
    "grouped sigmoid router": {
        "n_expert": 8, "n_expert_groups": 4, "n_topk_groups": 2, "n_topk_scores_per_group": 2,
        "norm_topk_prob": True, "routed_scaling_factor": 2.5,
    },
}  # fmt: skip


def pair(overrides: dict, seed: int = 0) -> tuple[LLaMAMoE, MoELayer]:
    torch.manual_seed(seed)
    config = Config.from_name("MoE-tiny", n_embd=64, n_head=4, moe_intermediate_size=96, **overrides)
    stock = LLaMAMoE(config)
    if config.n_expert_groups:  # LitGPT leaves this router's weight uninitialized (torch.empty)
        torch.nn.init.normal_(stock.gate.weight, std=0.1)
        stock.gate.e_score_correction_bias.uniform_(-0.1, 0.1)  # give the correction bias something to do
    ours = MoELayer(config)
    ours.load_state_dict(stock.state_dict())
    return stock, ours


def relative_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    """|expected - actual| / |expected|; the plain difference when `expected` is zero (an unused expert)."""
    difference, scale = (expected - actual).detach().norm(), expected.detach().norm()
    return float(difference / scale) if scale > 0 else float(difference)


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_same_outputs_and_gradients_as_stock(overrides):
    stock, ours = pair(overrides)
    x = torch.randn(3, 29, 64)
    grad = torch.randn_like(x)
    inputs = [x.clone().requires_grad_() for _ in range(2)]
    outputs = [layer(inp) for layer, inp in zip((stock, ours), inputs, strict=True)]
    for output in outputs:
        output.backward(grad)
    assert relative_error(*outputs) < 1e-5
    assert relative_error(inputs[0].grad, inputs[1].grad) < 1e-5
    ours_grads = {name: p.grad for name, p in ours.named_parameters()}
    _to_stock_keys(ours.experts, ours_grads, "experts.", {})
    stock_grads = {name: p.grad for name, p in stock.named_parameters()}
    assert ours_grads.keys() == stock_grads.keys()
    for name, expected in stock_grads.items():
        assert relative_error(expected, ours_grads[name]) < 1e-5, name


def test_state_dict_has_stock_keys_and_shapes_both_ways():
    stock, ours = pair(CONFIGS["shared experts"])
    ours_state, stock_state = ours.state_dict(), stock.state_dict()
    assert list(ours_state) == list(stock_state)
    assert all(ours_state[key].shape == stock_state[key].shape for key in stock_state)
    back = LLaMAMoE(stock.config)
    back.load_state_dict(ours_state)  # strict
    x = torch.randn(2, 7, 64)
    torch.testing.assert_close(back(x), stock(x))


def test_whole_model_checkpoint_loads_into_stock_litgpt(tmp_path):
    import litgpt.model

    config = Config.from_name("MoE-tiny", n_layer=2, n_embd=64, n_head=4, moe_intermediate_size=96, vocab_size=128)
    original = litgpt.model.LLaMAMoE
    litgpt.model.LLaMAMoE = MoELayer
    try:
        ours = GPT(config)
    finally:
        litgpt.model.LLaMAMoE = original
    assert isinstance(ours.transformer.h[0].mlp, MoELayer)
    torch.save(ours.state_dict(), tmp_path / "lit_model.pth")
    stock = GPT(config)
    stock.load_state_dict(torch.load(tmp_path / "lit_model.pth"))
    idx = torch.randint(0, 128, (2, 12))
    torch.testing.assert_close(stock(idx), ours(idx))


def test_compiles_without_graph_breaks_in_training():
    _, ours = pair(CONFIGS["softmax top-2"])
    layer = MoELayer(ours.config, MoEArgs(aux_loss_coef=0.01, z_loss_coef=0.001, bias_update_rate=1e-3))
    layer.train()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(layer)(torch.randn(2, 16, 64, requires_grad=True))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_runs_on_the_meta_device():
    config = Config.from_name("MoE-tiny", n_layer=1)
    with torch.device("meta"):
        layer = MoELayer(config)
        y = layer(torch.randn(2, 16, config.n_embd))
    assert y.shape == (2, 16, config.n_embd) and y.device.type == "meta"


def test_a_model_built_on_meta_and_loaded_by_assignment_runs_where_its_weights_are():
    """LitGPT's LoRA merge and conversions build on the meta device and load with `assign=True`: the weights come
    from the checkpoint, and the routing statistics (not saved) are made beside them."""
    config = Config.from_name("MoE-tiny", n_layer=1)
    state = MoELayer(config).state_dict()
    with torch.device("meta"):
        layer = MoELayer(config)
    layer.load_state_dict(state, assign=True)
    layer.to(device="cpu")  # would fail on a buffer left on meta
    assert layer(torch.randn(2, 16, config.n_embd)).shape == (2, 16, config.n_embd)
    assert read_routing_stats(layer)[0]["load"] and not layer.tokens_per_expert.is_meta


def test_a_litgpt_subclass_that_reuses_the_forward_computes_as_stock():
    """LitGPT's adapter_v2 `LLaMAMoE` subclasses the MoE class of its import, sets only gate, experts and config,
    and calls the parent's forward: with litmoe's layer as that parent, it computes what stock's layer does."""
    from litgpt.model import LLaMAMLP

    class Subclass(MoELayer):  # as litgpt.adapter_v2.LLaMAMoE builds itself
        def __init__(self, config) -> None:
            torch.nn.Module.__init__(self)
            self.gate = torch.nn.Linear(config.n_embd, config.n_expert, bias=False)
            self.experts = torch.nn.ModuleList(
                LLaMAMLP(config, intermediate_size=config.moe_intermediate_size) for _ in range(config.n_expert)
            )
            self.config = config

    config = Config.from_name("MoE-tiny", n_layer=1)
    torch.manual_seed(0)
    stock, subclass = LLaMAMoE(config), Subclass(config)
    subclass.load_state_dict(stock.state_dict())
    x = torch.randn(2, 16, config.n_embd)
    torch.testing.assert_close(subclass(x), stock(x))


def test_builds_where_litgpt_builds_an_moe_class_with_no_experts():
    """LitGPT builds the MoE class from a config with `n_expert: 0` before putting a dense MLP in its place."""
    layer = MoELayer(Config.from_name("MoE-tiny", n_layer=1, n_expert=0, n_expert_per_token=0))
    assert len(layer.experts) == 0 and layer.gate.weight.shape[0] == 0


def test_bf16_on_cpu_is_close_to_fp32():
    _, ours = pair(CONFIGS["softmax top-2"])
    x = torch.randn(2, 16, 64)
    expected = ours(x)
    actual = ours.to(torch.bfloat16)(x.bfloat16())
    assert actual.dtype == torch.bfloat16
    assert relative_error(expected, actual.float()) < 3e-2


def outputs_and_gradients(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, autocast: bool) -> dict:
    """The layer's output and every gradient (under stock's parameter names), in fp32."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        output = layer(x)
    output.float().backward(grad)
    grads = {name: p.grad.float() for name, p in layer.named_parameters()}
    if isinstance(layer, MoELayer):
        _to_stock_keys(layer.experts, grads, "experts.", {})
    return {"output": output.detach().float(), "input": x.grad, **grads}


@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity"])
def test_bf16_autocast_is_as_close_to_fp32_as_stocks(capacity_factor):
    """Under bf16 autocast the rows travel and the experts compute in bf16, and the k outputs of a token are
    weighted and summed in fp32: the output and every gradient stay as close to the fp32 layer as stock's
    bf16 autocast is to stock's fp32 (at capacity 1.0 some rows are dropped, alike at both precisions)."""
    stock, ours = pair(CONFIGS["softmax top-2"])
    ours.balance = MoEArgs(aux_loss_coef=0.0, z_loss_coef=0.0, capacity_factor=capacity_factor)
    x, grad = torch.randn(4, 32, 64), torch.randn(4, 32, 64)

    def bf16_errors(layer: torch.nn.Module) -> dict[str, float]:
        exact, bf16 = (outputs_and_gradients(layer, x, grad, autocast) for autocast in (False, True))
        return {name: relative_error(exact[name], value) for name, value in bf16.items()}

    errors, stock_errors = bf16_errors(ours), bf16_errors(stock)
    assert 1e-4 < errors["output"] < 2e-2, errors
    if capacity_factor is None:
        assert all(errors[name] < 1.5 * stock_errors[name] + 1e-3 for name in errors), (errors, stock_errors)
    else:
        assert max(errors.values()) < 2e-2, errors


def gate_gradient(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(torch.zeros_like(y))  # the model's own loss contributes nothing: only the injected gradient
    return layer.gate.weight.grad


def test_router_gets_aux_gradient_only_when_coefficient_positive():
    _, ours = pair(CONFIGS["softmax top-2"])
    x = torch.randn(2, 32, 64)
    off = MoELayer(ours.config, MoEArgs(aux_loss_coef=0.0, z_loss_coef=0.0))
    off.load_state_dict(ours.state_dict())
    off.train()
    grad = gate_gradient(off, x)
    assert grad is None or not grad.any()

    on = MoELayer(ours.config, MoEArgs(aux_loss_coef=0.01, z_loss_coef=0.001))
    on.load_state_dict(ours.state_dict())
    on.train()
    on.loss_scale = 0.25  # gradient accumulation over 4 micro-batches
    injected = gate_gradient(on, x)

    # the same gradient by hand: 0.25 * d(0.01 * aux + 0.001 * z) / d(gate)
    weight = on.gate.weight.detach().clone().requires_grad_()
    logits = x.reshape(-1, 64) @ weight.t()
    counts = torch.zeros(4).scatter_add_(0, logits.topk(2).indices.view(-1), torch.ones(64 * 2))
    aux = 4 * (counts / counts.sum() * logits.softmax(-1).mean(0)).sum()
    z_loss = torch.logsumexp(logits, -1).square().mean()
    (0.25 * (0.01 * aux + 0.001 * z_loss)).backward()
    torch.testing.assert_close(injected, weight.grad)


def test_balancing_gradient_follows_the_fp16_loss_scale():
    """Under 16-mixed, GradScaler multiplies the loss by 2^16 before backward and divides the gradients by it
    before the step: after unscaling, the router must get the same gradient as without fp16 scaling."""
    from types import SimpleNamespace

    from lightning.fabric.plugins.precision import MixedPrecision

    from litmoe.training.fit import fp16_loss_scale_of

    _, ours = pair(CONFIGS["softmax top-2"])
    layer = MoELayer(ours.config, MoEArgs(aux_loss_coef=0.01, z_loss_coef=0.001))
    layer.load_state_dict(ours.state_dict())
    layer.train()
    x = torch.randn(2, 32, 64)
    unscaled = layer(x).square().mean()
    unscaled.backward()
    expected = layer.gate.weight.grad.clone()

    precision = MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16))
    layer.fp16_loss_scale = fp16_loss_scale_of(SimpleNamespace(_precision=precision, strategy=None))
    layer.zero_grad(set_to_none=True)
    precision.scaler.scale(layer(x).square().mean()).backward()
    torch.testing.assert_close(layer.gate.weight.grad / 2.0**16, expected)

    layer.fp16_loss_scale = None  # what happened before: the injected part was 2^16 too weak after unscaling
    layer.zero_grad(set_to_none=True)
    precision.scaler.scale(layer(x).square().mean()).backward()
    assert not torch.allclose(layer.gate.weight.grad / 2.0**16, expected, rtol=1e-2)


def test_expert_bias_moves_load_toward_balance():
    torch.manual_seed(0)
    config = Config.from_name("MoE-tiny", n_embd=64, n_head=4, moe_intermediate_size=32)
    layer = MoELayer(config, MoEArgs(aux_loss_coef=0.0, z_loss_coef=0.0, bias_update_rate=0.1))
    with torch.no_grad():
        layer.gate.weight.normal_(std=0.1)
        layer.gate.weight[0, 0] = 2.0  # tokens with a positive first feature prefer expert 0
    layer.train()
    x = torch.randn(1, 256, 64)
    x[..., 0] = x[..., 0].abs() + 1.0  # a skewed batch
    imbalance = []
    for _ in range(40):
        with torch.no_grad():
            _, indices, _, _ = layer.route(x.view(-1, 64))
        load = torch.bincount(indices.view(-1), minlength=4).float()
        imbalance.append(float(load.max() / load.mean()))
        layer(x)  # records this step's counts
        update_expert_bias(layer, rate=layer.balance.bias_update_rate)
    assert imbalance[0] > 1.9 and imbalance[-1] < 1.3
    assert "expert_bias" in layer.state_dict()
    # the bias picks experts but does not enter the gate weights: they stay the softmax of unbiased logits
    weights, indices, logits, _ = layer.route(x.view(-1, 64))
    torch.testing.assert_close(weights, logits.gather(1, indices).softmax(-1))


def test_routing_stats_are_read_once_then_reset():
    _, ours = pair(CONFIGS["softmax top-2"])
    ours.train()
    for _ in range(3):
        ours(torch.randn(2, 16, 64))
    (stats,) = read_routing_stats(ours)
    assert sum(stats["load"]) == pytest.approx(1.0)
    assert stats["imbalance"] == pytest.approx(max(stats["load"]) * 4)
    assert 0 < stats["entropy"] <= torch.log(torch.tensor(4.0)) + 1e-6
    assert stats["aux_loss"] >= 1.0 - 1e-6  # the Switch loss is at least 1, reached at perfect balance
    assert read_routing_stats(ours) == []  # nothing since the last read


@pytest.mark.parametrize("overrides", [{}, {"n_shared_expert": 1}], ids=["routed", "shared expert"])
def test_litgpt_init_with_the_same_seed_gives_stock_weights(overrides):
    """LitGPT's pretraining init (`initialize_weights`) on a model built with litmoe's layer draws exactly what
    it draws for stock LLaMAMoE, so the two layers can be compared run against run."""
    import lightning as L
    import litgpt.model
    from litgpt.pretrain import initialize_weights

    from litmoe.core.patching import swapped

    config = Config.from_name("MoE-tiny", n_layer=2, n_embd=64, n_head=4, moe_intermediate_size=96, **overrides)
    fabric = L.Fabric(accelerator="cpu", devices=1)

    def initialized(layer_class) -> dict:
        fabric.seed_everything(7)
        with swapped(litgpt.model, "LLaMAMoE", layer_class), fabric.init_module(empty_init=True):
            model = GPT(config)
        initialize_weights(fabric, model, n_layer=config.n_layer, n_embd=config.n_embd)
        return model.state_dict()

    stock, ours = initialized(LLaMAMoE), initialized(MoELayer)
    assert stock.keys() == ours.keys()
    assert all(torch.equal(stock[key], ours[key]) for key in stock)


def with_capacity(layer: MoELayer, factor: float | None) -> MoELayer:
    capped = MoELayer(layer.config, MoEArgs(aux_loss_coef=0.0, z_loss_coef=0.0, capacity_factor=factor))
    capped.load_state_dict(layer.state_dict())
    return capped


def test_a_capacity_no_expert_reaches_is_dropless():
    _, ours = pair(CONFIGS["softmax top-2"])
    x = torch.randn(2, 16, 64)
    capped = with_capacity(ours, float(ours.config.n_expert))  # room for every routed pair in any one expert
    torch.testing.assert_close(capped(x), ours(x))


@pytest.mark.parametrize("overrides", list(CONFIGS.values()), ids=list(CONFIGS))
def test_over_capacity_pairs_skip_their_expert_in_token_order(overrides):
    """Each expert takes its first `capacity` routed tokens (in token order); the rest get nothing from it. Held
    against the dropless layer with the dropped pairs' routing weights zeroed: outputs and every gradient."""
    _, ours = pair(overrides)
    factor, x = 0.5, torch.randn(2, 16, 64)
    capped = with_capacity(ours, factor)
    tokens = x.reshape(-1, 64)
    weights, indices, _, _ = ours.route(tokens)
    capacity = -(-int(factor * indices.numel()) // ours.config.n_expert)  # ceil
    seen = [0] * ours.config.n_expert
    kept = torch.zeros_like(indices, dtype=torch.bool)
    for token, choices in enumerate(indices.tolist()):  # token order, each token's choices
        for slot, expert in enumerate(choices):
            kept[token, slot] = seen[expert] < capacity
            seen[expert] += 1
    assert 0 < (~kept).sum() < kept.numel()  # some pairs dropped, not all

    original_route = ours.route  # the dropless layer, with the dropped pairs' routing weights zeroed
    ours.route = lambda t: (lambda w, i, lg, p: (w * kept, i, lg, p))(*original_route(t))
    expected_x, actual_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, actual = ours(expected_x), capped(actual_x)
    torch.testing.assert_close(actual, expected)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    actual.backward(grad)
    torch.testing.assert_close(actual_x.grad, expected_x.grad)
    for (name, p), q in zip(ours.named_parameters(), capped.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    capped.record_routing = True
    capped.eval()
    capped(x)
    (stats,) = read_routing_stats(capped)
    assert stats["dropped"] == pytest.approx((~kept).float().mean().item())


def test_capacity_keeps_the_layer_in_one_graph():
    _, ours = pair(CONFIGS["softmax top-2"])
    capped = MoELayer(ours.config, MoEArgs(capacity_factor=1.25)).train()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(capped)(torch.randn(2, 16, 64, requires_grad=True))
    assert explanation.graph_break_count == 0, explanation.break_reasons
