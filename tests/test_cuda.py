"""What only a CUDA GPU can show: the bf16 grouped-GEMM layer, FlashAttention, a compiled bf16 training run.

Skipped without a GPU (CI has none), and nothing here runs on the CPU instead: until these ran on a GPU, none
of what they check is known. On a GPU machine: `python3 -m pytest tests/test_cuda.py`.
"""

import pytest
import torch
from litgpt import Config
from litgpt.model import LLaMAMoE
from test_moe import relative_error

from litmoe.model.experts import _to_stock_keys
from litmoe.model.moe import MoELayer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = torch.device("cuda")


def outputs_and_gradients(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> dict[str, torch.Tensor]:
    """The layer's output and every gradient, in fp32 and under stock LitGPT's parameter names."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    output = layer(x)
    output.backward(grad)
    results = {name: p.grad.float() for name, p in layer.named_parameters()}
    if isinstance(layer, MoELayer):
        _to_stock_keys(layer.experts, results, "experts.", {})
    return {"output": output.detach().float(), "input grad": x.grad.float(), **results}


def relative_errors(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> dict[str, float]:
    assert expected.keys() == actual.keys()
    return {name: relative_error(expected[name], actual[name]) for name in expected}


def moe_200m_layers(dtype: torch.dtype) -> tuple[LLaMAMoE, MoELayer]:
    torch.manual_seed(0)
    stock = LLaMAMoE(Config.from_name("MoE-200M")).to(DEVICE)
    ours = MoELayer(stock.config).to(DEVICE)
    ours.load_state_dict(stock.state_dict())
    return stock.to(dtype), ours.to(dtype)


def test_bf16_grouped_gemm_layer_is_as_close_to_fp32_as_stock_bf16():
    """bf16 rounds differently in each layer, so both are held against fp32: ours may not stray further."""
    x = torch.randn(2, 1024, 768, device=DEVICE)
    grad = torch.randn_like(x)
    reference = outputs_and_gradients(moe_200m_layers(torch.float32)[0], x, grad)
    stock, ours = moe_200m_layers(torch.bfloat16)
    stock_errors = relative_errors(reference, outputs_and_gradients(stock, x.bfloat16(), grad.bfloat16()))
    ours_errors = relative_errors(reference, outputs_and_gradients(ours, x.bfloat16(), grad.bfloat16()))
    for name, error in ours_errors.items():
        assert error < 1.5 * stock_errors[name] + 1e-3, (name, error, stock_errors[name])


def test_fp32_on_cuda_matches_stock():
    """fp32 on CUDA runs the experts one at a time (CUDA's grouped GEMMs are bf16-only). TF32 is off by default."""
    x = torch.randn(2, 256, 768, device=DEVICE)
    grad = torch.randn_like(x)
    stock, ours = moe_200m_layers(torch.float32)
    errors = relative_errors(outputs_and_gradients(stock, x, grad), outputs_and_gradients(ours, x, grad))
    assert max(errors.values()) < 1e-5, errors


def test_bf16_layer_compiles_without_graph_breaks():
    _, ours = moe_200m_layers(torch.bfloat16)
    ours.train()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(ours)(torch.randn(2, 512, 768, device=DEVICE, dtype=torch.bfloat16))
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 8, reason="FlashAttention needs sm80+"
)
def test_moe_200m_attention_runs_fused_flash_kernels_in_bf16():
    """PyTorch picks a FlashAttention kernel by itself (torch 2.11 on an H100 prefers cuDNN's), each of the two
    runs and agrees with fp32 attention, and so does the pair --flash-attention-force pins."""
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    from litmoe.model.attention import FLASH_KERNELS, attention_kernel_scope, chosen_backend, flash_blockers

    config = Config.from_name("MoE-200M")
    assert flash_blockers(DEVICE, torch.bfloat16, config.head_size) == []
    assert chosen_backend(DEVICE, torch.bfloat16, config.n_head, config.head_size) in FLASH_KERNELS
    q, k, v = torch.randn(3, 2, config.n_head, 1024, config.head_size, device=DEVICE)
    expected = scaled_dot_product_attention(q, k, v, is_causal=True)
    half = (q.bfloat16(), k.bfloat16(), v.bfloat16())
    for scope in [sdpa_kernel([kernel]) for kernel in FLASH_KERNELS] + [attention_kernel_scope(force_flash=True)]:
        with scope:
            actual = scaled_dot_product_attention(*half, is_causal=True)
        assert relative_error(expected, actual.float()) < 1e-2


def test_fused_loss_is_as_close_to_fp32_as_litgpts_bf16_loss():
    """--optimization.fused_loss: litmoe's fused head + cross-entropy against LitGPT's chunked_cross_entropy of the
    head's logits, both under bf16 autocast as training runs them, both held against fp32 (a 50k vocabulary)."""
    from litgpt.utils import chunked_cross_entropy

    from litmoe.model.fused_loss import FusedLinearCrossEntropy

    torch.manual_seed(0)
    head = torch.nn.Linear(768, 50304, bias=False, device=DEVICE)
    hidden = torch.randn(2, 1024, 768, device=DEVICE)
    targets = torch.randint(0, 50304, (2, 1024), device=DEVICE)
    targets[0, :100] = -100
    fused, holder = FusedLinearCrossEntropy(), torch.nn.Module()
    holder.lm_head = head
    fused.attach(holder)  # the loss applies head's own weight

    def loss_and_gradients(compute, autocast: bool) -> dict[str, torch.Tensor]:
        head.zero_grad(set_to_none=True)
        x = hidden.detach().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = compute(x)
        loss.backward()
        return {"loss": loss.detach().float(), "hidden grad": x.grad.float(), "weight grad": head.weight.grad.float()}

    def stock(x):
        return chunked_cross_entropy(head(x), targets)

    def ours(x):
        return fused(x, targets)

    reference = loss_and_gradients(stock, autocast=False)
    stock_errors = relative_errors(reference, loss_and_gradients(stock, autocast=True))
    ours_errors = relative_errors(reference, loss_and_gradients(ours, autocast=True))
    for name, error in ours_errors.items():
        assert error < 1.5 * stock_errors[name] + 1e-3, (name, error, stock_errors[name])


@pytest.mark.parametrize(
    "levers",
    [
        (),
        ("--optimization.fused_loss", "true", "--optimization.compile_scope", "blocks"),
        ("--compile-mode", "reduce-overhead", "--train.global_batch_size", "8"),  # CUDA graphs, 2 micro-batches
    ],
    ids=["recipe", "fused-loss-blocks", "cuda-graphs-accumulating"],
)
def test_compiled_bf16_training_run_learns_and_reports_mfu(train_args, tmp_path, levers):
    from litmoe.training.cli import main

    out_dir = tmp_path / "run"
    extra = ("--compile", "--flash-attention-force", "--eval.interval", "100", *levers)
    run = main(train_args(out_dir, max_tokens=256 * 24, extra=extra))
    assert run.summary.val_loss < 0.75 * run.summary.initial_val_loss
    assert run.summary.peak_flops, "no MFU: Lightning does not know this GPU's peak FLOP/s"
    assert 0 < run.summary.flops / run.summary.seconds < run.summary.peak_flops
    assert (out_dir / "final" / "lit_model.pth").is_file()


def test_a_compiled_cuda_step_waits_for_nothing_and_a_log_step_once(train_args, tmp_path):
    """CUDA's own sync debug mode over four optimizer steps of two micro-batches, compiled, the log at the fourth:
    no synchronizing call in a step, one at the log step (its one copy of loss, norm and routing statistics)."""
    from host_syncs import WATCHED, cuda_syncs

    flags = (*WATCHED, "--train.global_batch_size", "8", "--compile")
    syncs = cuda_syncs(train_args(tmp_path / "run", 4 * 2 * 4 * 64, flags))
    assert [syncs[step] for step in range(4)] == [[]] * 4
    assert len(syncs[4]) <= 1, syncs[4]
