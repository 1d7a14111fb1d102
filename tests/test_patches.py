import os
import re
import subprocess
import sys
from collections.abc import Callable
from functools import partial

import litgpt.pretrain as pretrain
import pytest
import torch
import yaml
from conftest import REPO
from litgpt import GPT, Config

from litmoe.core.args import MoEArgs, OptimizationArgs
from litmoe.core.cli import run_cli
from litmoe.core.errors import UserError
from litmoe.distributed.plans import StrategyChoice
from litmoe.model.attention import check_attention, compute_dtype, flash_blockers
from litmoe.model.flops import TrainingFlops
from litmoe.model.loss import compiled_loss
from litmoe.model.moe import MoELayer
from litmoe.training.cli import deep_merge, expand_short_flags, take_flag
from litmoe.training.patches import patched_pretrain, prepare_model
from litmoe.training.resume import resolve_resume
from litmoe.training.settings import PatchSettings

PATCHED = ("L", "measure_flops", "save_hyperparameters", "choose_logger", "fit", "instantiate_torch_optimizer")


def settings(**optimization) -> PatchSettings:
    return PatchSettings(
        optimization=OptimizationArgs(**optimization), moe=MoEArgs(), strategy=StrategyChoice("single", "test"),
        precision="32-true",
        micro_batch_size=2,
        seq_len=16, token_budget=1000, progress=False, run_config={"model": "MoE-tiny", "train": {"max_tokens": 1000}},
    )  # fmt: skip


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(
        Config.from_name(
            "MoE-tiny",
            n_layer=2,
            n_embd=32,
            n_head=2,
            n_query_groups=1,
            vocab_size=64,
            moe_intermediate_size=32,
            block_size=16,
        )
    )


def test_patches_apply_inside_the_context_and_restore_after():
    import litgpt.model

    originals = {name: getattr(pretrain, name) for name in PATCHED}
    compile_fn, stock_moe = torch.compile, litgpt.model.LLaMAMoE
    with patched_pretrain(settings()):
        assert isinstance(pretrain.measure_flops, TrainingFlops)
        assert all(getattr(pretrain, name) is not originals[name] for name in PATCHED)
        assert torch.compile is not compile_fn
        assert isinstance(tiny_gpt().transformer.h[0].mlp, MoELayer)  # Blocks now build our layer
    assert {name: getattr(pretrain, name) for name in PATCHED} == originals
    assert torch.compile is compile_fn and litgpt.model.LLaMAMoE is stock_moe
    stock = settings()
    stock.moe.layer = "stock"
    with patched_pretrain(stock):
        assert type(tiny_gpt().transformer.h[0].mlp) is stock_moe


def test_pretrain_still_calls_what_we_patch():
    """A LitGPT upgrade that stops calling these (or calls them differently) must fail here."""
    import inspect

    source = inspect.getsource(pretrain)
    assert "model = torch.compile(model)\n    model = fabric.setup(model)" in source
    assert "measured_flops = measure_flops(meta_model, model_fwd, model_loss)" in source
    assert "save_hyperparameters(setup, checkpoint_file.parent)" in source
    assert "logger = choose_logger(" in source
    assert "fabric = L.Fabric(devices=devices, num_nodes=num_nodes, strategy=strategy," in source
    assert set(re.findall(r"\bL\.(\w+)", source)) == {"Fabric"}  # pretrain.L is swapped for a Fabric namespace
    assert "reset_parameters(model)" in inspect.getsource(pretrain.initialize_weights)
    assert "    fit(\n        fabric=fabric," in source
    # the fused loss stands in for chunked_cross_entropy where the loop and validation compute the loss
    fit, validate = inspect.getsource(pretrain.fit), inspect.getsource(pretrain.validate)
    assert "logits = model(input_ids)\n            loss = chunked_cross_entropy(logits, targets)" in fit
    assert "logits = model(input_ids)\n        loss = chunked_cross_entropy(logits, targets)" in validate
    # the schedule read per optimizer step, and the running loss kept on the device, inside fit
    assert 'lr = get_lr(optimizer.defaults["lr"], state["iter_num"], warmup_iters, max_iters, train.min_lr)' in fit
    assert "running_loss = RunningMean(window=" in fit and "running_loss.compute().item()" in fit
    assert "optimizer = instantiate_torch_optimizer(optimizer, model.parameters(), **extra_kwargs)" in source


def test_a_step_gets_the_same_learning_rate_however_many_micro_batches_it_accumulates():
    """12 optimizer steps, warm-up 3 steps, on 1, 2 and 4 micro-batches per step (LitGPT counts both in
    micro-batches): the rate each step applies (read at its last micro-batch, where it steps) is the same, and is
    the one a run without accumulation gives; stock LitGPT's differs between the three."""
    from functools import partial

    from litmoe.training.fit import step_learning_rate

    def applied(get_lr, accumulation: int) -> list[float]:
        return [get_lr(0.01, step * accumulation - 1, 3 * accumulation, 12 * accumulation, 0.001)
                for step in range(1, 13)]  # fmt: skip

    ours = [applied(partial(step_learning_rate, pretrain.get_lr, a), a) for a in (1, 2, 4)]
    stock = [applied(pretrain.get_lr, a) for a in (1, 2, 4)]
    assert ours[0] == ours[1] == ours[2] == stock[0] and stock[1] != stock[0] != stock[2]


def test_compile_off_returns_the_model_uncompiled():
    model = tiny_gpt()
    with patched_pretrain(settings(compile=False)):
        assert torch.compile(model) is model


def test_compile_mode_and_dynamic_reach_torch_compile():
    calls = []

    def fake_compile(model, **kwargs):
        calls.append(kwargs)
        return model

    options = OptimizationArgs(compile=True, compile_mode="max-autotune", compile_dynamic=True, compile_fullgraph=True)
    prepare_model(tiny_gpt(), compile_fn=fake_compile, options=options)
    assert calls == [{"mode": "max-autotune", "dynamic": True, "fullgraph": True}]
    other = torch.nn.Linear(2, 2)
    prepare_model(other, fullgraph=True, compile_fn=fake_compile, options=options)  # not ours: untouched
    assert calls[-1] == {"fullgraph": True}


def test_compile_blocks_compiles_each_block_in_place():
    """--optimization.compile_scope blocks: the GPT stays itself (same state-dict keys, no _orig_mod), each block
    runs compiled (one graph, shared by the blocks), and the logits are the eager model's. Dynamo's graphs run on
    its eager backend here: the scope is under test, not inductor's kernels (test_compile_on_really_compiles)."""
    model, reference = tiny_gpt().eval(), tiny_gpt().eval()
    options = OptimizationArgs(compile=True, compile_scope="blocks", compile_fullgraph=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert prepare_model(model, compile_fn=partial(torch.compile, backend="eager"), options=options) is model
    assert model.state_dict().keys() == reference.state_dict().keys()
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_fused_loss_gives_the_stock_loss_and_gradients_with_the_same_keys(monkeypatch):
    """With the fused loss the model returns hidden states and the loss applies the head, chunk by chunk (here 8
    rows a chunk: 4 chunks); loss and every gradient are LitGPT's, ignored targets and tied embeddings included."""
    from litgpt.utils import chunked_cross_entropy

    import litmoe.model.fused_loss
    from litmoe.model.fused_loss import FusedLinearCrossEntropy

    monkeypatch.setattr(litmoe.model.fused_loss, "CHUNK_ROWS", 8)
    stock, fused = tiny_gpt(), tiny_gpt()
    fused.transformer.wte.weight = fused.lm_head.weight  # tied, as --train.tie_embeddings true makes them
    stock.transformer.wte.weight = stock.lm_head.weight
    loss = FusedLinearCrossEntropy()
    prepare_model(fused, compile_fn=torch.compile, options=OptimizationArgs(compile=False), fused_loss=loss)
    assert fused.state_dict().keys() == stock.state_dict().keys()
    assert fused.transformer.wte.weight is fused.lm_head.weight
    x, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    targets[0, :3] = -100  # ignored positions count as in LitGPT's loss
    expected, actual = chunked_cross_entropy(stock(x), targets), loss(fused(x), targets)
    torch.testing.assert_close(actual, expected)
    expected.backward()
    actual.backward()
    for (name, p), q in zip(stock.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_the_fused_loss_in_bf16_is_as_close_to_fp32_as_litgpts_and_reads_nothing_from_the_device(monkeypatch):
    """Under bf16 autocast the fused head runs in bf16 (as the unfused head would) with fp32 softmax statistics:
    loss and gradients (hidden states, weight, bias) stay as close to fp32 as LitGPT's bf16 loss does; and its
    forward and backward read nothing on the host (tests/host_syncs.py)."""
    from host_syncs import HostSyncs
    from litgpt.utils import chunked_cross_entropy
    from test_moe import relative_error

    import litmoe.model.fused_loss
    from litmoe.model.fused_loss import FusedLinearCrossEntropy

    monkeypatch.setattr(litmoe.model.fused_loss, "CHUNK_ROWS", 256)  # 5 chunks, the last one short
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.lm_head = head = torch.nn.Linear(64, 1000)
    fused = FusedLinearCrossEntropy()
    fused.attach(model)
    hidden, targets = torch.randn(4, 300, 64), torch.randint(0, 1000, (4, 300))
    targets[1, :50] = -100

    def loss_and_gradients(loss_of, autocast: bool) -> dict[str, torch.Tensor]:
        head.zero_grad(set_to_none=True)
        x = hidden.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss = loss_of(x)
        loss.backward()
        return {"loss": loss.detach().float(), "hidden": x.grad, "weight": head.weight.grad, "bias": head.bias.grad}

    def stock(x: torch.Tensor) -> torch.Tensor:
        return chunked_cross_entropy(torch.nn.functional.linear(x, head.weight, head.bias), targets)

    def ours(x: torch.Tensor) -> torch.Tensor:
        return fused(x, targets)

    exact = loss_and_gradients(stock, autocast=False)
    for name, value in loss_and_gradients(ours, autocast=False).items():
        torch.testing.assert_close(value, exact[name], rtol=1e-5, atol=1e-6, msg=name)
    stock_bf16, ours_bf16 = (loss_and_gradients(loss_of, autocast=True) for loss_of in (stock, ours))
    for name, value in ours_bf16.items():
        error, stock_error = relative_error(exact[name], value), relative_error(exact[name], stock_bf16[name])
        assert 0 < error < 1.5 * stock_error + 1e-3, (name, error, stock_error)
    syncs = HostSyncs()
    with syncs.watching():
        loss_and_gradients(ours, autocast=True)
    assert syncs.record()["syncs"] == [[]]


def test_the_users_optimizer_settings_win_over_litgpts_defaults():
    """LitGPT passes fused=True on CUDA over whatever the config says; an explicit --optimizer.fused false stays."""
    from litgpt.utils import instantiate_torch_optimizer

    from litmoe.core.patching import user_optimizer

    parameters = [torch.nn.Parameter(torch.zeros(2))]
    explicit = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.1, "fused": False}}
    assert user_optimizer(instantiate_torch_optimizer, explicit, parameters, fused=True).defaults["fused"] is False
    unset = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.1}}
    assert user_optimizer(instantiate_torch_optimizer, unset, parameters, fused=None).defaults["fused"] is None
    assert user_optimizer(instantiate_torch_optimizer, "SGD", parameters, lr=0.1, fused=False).defaults["lr"] == 0.1


def test_compile_on_really_compiles():
    """The model LitGPT's loop gets is compiled, and runs compiled: dynamo captures its forward in one graph and
    the compiled forward gives the eager model's logits."""
    model = tiny_gpt().eval()
    with patched_pretrain(settings(compile=True, compile_fullgraph=True)):
        compiled = torch.compile(model)
    assert type(compiled).__name__ == "OptimizedModule" and compiled._orig_mod is model
    torch._dynamo.reset()
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        expected, actual = model(x), compiled(x)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def ops_outside_compiled_code(step: Callable[[], None]) -> int:
    """The ops `step` dispatches one by one, from Python or from autograd, not from inside a compiled graph: the
    profiler's top-level aten ops that no compiled region (forward or backward) encloses."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step()
    count = 0
    for event in profiler.events():
        enclosing, parent = [], event.cpu_parent
        while parent is not None:
            enclosing.append(parent.name)
            parent = parent.cpu_parent
        if event.name.startswith("aten::") and not any(name.startswith("aten::") for name in enclosing):
            count += not any("Compiled" in name for name in enclosing)
    return count


def trained_micro_batch(compiled: bool, precision: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """A micro-batch of 256 x 16 tokens through the tiny GPT and LitGPT's loss call as a run builds them (compiled
    by AOTAutograd's eager backend, which receives the graphs inductor would, fast): (loss, gradients, ops outside
    compiled code), measured on the second micro-batch (the first compiles)."""
    compile_fn = partial(torch.compile, backend="aot_eager")
    torch.manual_seed(1)
    x, targets = torch.randint(0, 64, (256, 16)), torch.randint(0, 64, (256, 16))
    torch._dynamo.reset()
    with patched_pretrain(settings(compile=compiled)):  # litmoe's MoE layer
        model = tiny_gpt()
    loss_fn = compiled_loss(compile_fn, pretrain.chunked_cross_entropy) if compiled else pretrain.chunked_cross_entropy
    if compiled:
        model = prepare_model(model, compile_fn=compile_fn, options=OptimizationArgs(compile=True))
    losses = []

    def micro_batch() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", precision, enabled=precision != torch.float32):
            losses.append(loss_fn(model(x), targets))
        losses[-1].backward()

    micro_batch()
    count = ops_outside_compiled_code(micro_batch)
    return losses[-1].detach(), [p.grad for p in model.parameters()], count


def test_the_loss_is_compiled_with_the_model_and_gives_litgpts_loss_and_gradients():
    """LitGPT's chunked loss (here 32 chunks of 128 rows) dispatches hundreds of ops one by one per micro-batch;
    compiled with the model, as --compile does, a micro-batch's forward, loss and backward leave a handful outside
    compiled code. The loss and every gradient are LitGPT's: to fp32 rounding in fp32, to bf16's precision under
    bf16 autocast."""
    for precision, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        (loss, grads, compiled_count), (expected_loss, expected_grads, eager_count) = (
            trained_micro_batch(compiled, precision) for compiled in (True, False)
        )
        assert eager_count > 400 and compiled_count <= 30
        torch.testing.assert_close(loss, expected_loss, rtol=tolerance, atol=tolerance)
        for grad, expected in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(grad, expected, rtol=tolerance, atol=tolerance)


SYNC_TARGETS = {"_local_scalar_dense", "item", "nonzero", "masked_select", "equal", "_unique2", "unique_consecutive",
                "unique_dim", "bincount"}  # fmt: skip


@pytest.mark.parametrize(
    "moe", [MoEArgs(), MoEArgs(capacity_factor=1.25, bias_update_rate=1e-3)], ids=["dropless", "capacity-and-bias"]
)
def test_the_compiled_graphs_hold_no_op_that_waits_for_the_device(moe):
    """What CUDA graphs (--compile-mode reduce-overhead) capture and replay: the model's forward and backward and
    the loss's, each one whole graph (fullgraph), with no op that would make the host wait for the device (a
    capture would fail on it), balancing losses, selection bias and capacity included."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    graphs: list[torch.fx.GraphModule] = []

    def keep(graph: torch.fx.GraphModule, example_inputs):
        graphs.append(graph)
        return make_boxed_func(graph.forward)

    compile_fn = partial(torch.compile, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
    options = OptimizationArgs(compile=True, compile_fullgraph=True)
    torch._dynamo.reset()
    run = settings(compile=True, compile_fullgraph=True)
    run.moe = moe
    with patched_pretrain(run):
        model = prepare_model(tiny_gpt(), compile_fn=compile_fn, options=options)
    loss = compiled_loss(compile_fn, pretrain.chunked_cross_entropy, fullgraph=True)
    loss(model(torch.randint(0, 64, (4, 16))), torch.randint(0, 64, (4, 16))).backward()
    assert len(graphs) == 4  # forward and backward, of the model and of the loss
    called = {str(node.target).split(".")[1] for graph in graphs for node in graph.graph.nodes
              if node.op == "call_function" and str(node.target).startswith("aten.")}  # fmt: skip
    assert {"_grouped_mm", "mm"} <= called and not called & SYNC_TARGETS


def test_gradient_checkpointing_same_numbers_same_keys():
    x = torch.randint(0, 64, (2, 16))
    reference, checkpointed = tiny_gpt(), tiny_gpt()
    prepare_model(
        checkpointed, compile_fn=torch.compile, options=OptimizationArgs(compile=False, gradient_checkpointing=True)
    )
    assert checkpointed.state_dict().keys() == reference.state_dict().keys()
    for model in (reference, checkpointed):
        model(x).logsumexp(-1).mean().backward()
    torch.testing.assert_close(checkpointed(x), reference(x))
    for (name, p), q in zip(reference.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_hyperparameters_are_ours_whatever_sys_argv_holds(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["run_train.py", "--compile-mode", "max-autotune", "--progress"])
    run = settings()
    with patched_pretrain(run):
        pretrain.save_hyperparameters(pretrain.setup, tmp_path)
    assert yaml.safe_load((tmp_path / "hyperparameters.yaml").read_text()) == run.run_config


def test_attention_report_on_cpu(capsys):
    report = check_attention(torch.device("cpu"), "32-true", n_head=4, head_size=64, want_flash=True, force_flash=False)
    out = capsys.readouterr().out
    assert "Attention: float32, head size 64 -> the CPU fused attention kernel" in out
    assert "Warning: FlashAttention unavailable: no CUDA GPU (training on cpu); dtype float32" in out
    assert report.blockers and report.backend.name == "FLASH_ATTENTION"  # the CPU flash kernel, what the line names


def test_flash_force_refuses_on_cpu():
    with pytest.raises(UserError, match=r"--flash-attention-force: FlashAttention cannot run here: no CUDA GPU"):
        check_attention(torch.device("cpu"), "bf16-mixed", n_head=4, head_size=64, want_flash=True, force_flash=True)


def test_flash_rules():
    assert compute_dtype("bf16-mixed") == torch.bfloat16 and compute_dtype("32-true") == torch.float32
    reasons = flash_blockers(torch.device("cpu"), torch.float32, head_size=260)
    assert [r.split(" (")[0] for r in reasons] == ["no CUDA GPU", "dtype float32", "head size 260"]


def test_short_flags():
    argv = [
        "--compile",
        "--compile-mode",
        "reduce-overhead",
        "--no-flash-attention",
        "--progress",
        "--flash-attention-force",
        "--compile-mode=max-autotune",
        "--train.max_tokens",
        "2e6",
    ]
    assert expand_short_flags(argv) == [
        "--optimization.compile=true", "--optimization.compile_mode", "reduce-overhead",
        "--optimization.flash_attention=false", "--progress=true", "--optimization.flash_attention_force=true",
        "--optimization.compile_mode=max-autotune", "--train.max_tokens", "2e6",
    ]  # fmt: skip
    assert take_flag(["--config", "a.yaml", "--x"], "--config", with_value=True) == (["--x"], "a.yaml")
    assert take_flag(["--no-cpu-profile"], "--no-cpu-profile") == ([], True)
    assert deep_merge({"train": {"a": 1, "b": 2}, "c": 3}, {"train": {"b": 5}}) == {"train": {"a": 1, "b": 5}, "c": 3}


def test_resume_rules(tmp_path):
    out = tmp_path / "out"
    assert resolve_resume(False, out) is False
    assert resolve_resume("auto", out) is False
    with pytest.raises(UserError, match=r"--resume out/nope: no checkpoint there"):
        resolve_resume("out/nope", out)
    for name in ("step-00000004", "step-00000008"):
        (out / name).mkdir(parents=True)
        torch.save({"model": {}, "optimizer": {}, "iter_num": 4}, out / name / "lit_model.pth")
    assert resolve_resume("auto", out) == out / "step-00000008" / "lit_model.pth"
    with pytest.raises(UserError, match=r"already holds step-00000008/, a later step than step-00000004/, which"):
        resolve_resume(out / "step-00000004", out)  # training on would write over step 8
    assert resolve_resume(out / "step-00000004", tmp_path / "new") == out / "step-00000004" / "lit_model.pth"
    with pytest.raises(UserError, match=r"already holds checkpoints \(step-00000008/\); pass --resume auto"):
        resolve_resume(False, out)

    shards = out / "step-00000012" / "lit_model.pth"  # DeepSpeed writes a directory of shards
    (shards / "checkpoint").mkdir(parents=True)
    torch.save({"module": {}}, shards / "checkpoint" / "mp_rank_00_model_states.pt")
    assert resolve_resume("auto", out) == out / "step-00000008" / "lit_model.pth"  # no `latest` yet: incomplete
    (shards / "latest").write_text("checkpoint")
    assert resolve_resume("auto", out, deepspeed=True) == shards
    with pytest.raises(UserError, match=r"step-00000012/lit_model.pth: DeepSpeed shards; resume with the --strategy"):
        resolve_resume("auto", out)
    with pytest.raises(UserError, match=r"a single-file checkpoint; DeepSpeed resumes only its own shard directories"):
        resolve_resume(out / "step-00000004", out, deepspeed=True)


def test_cli_prints_one_line_and_exits_2(capsys):
    def fails():
        raise UserError("data/x/manifest.json not found: prepare the data first")

    with pytest.raises(SystemExit) as exit_info:
        run_cli(fails)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: data/x/manifest.json not found: prepare the data first\n"


CLASH = "tokenizers>=0.22.0,<=0.23.0 is required for a normal functioning of this module, but found tokenizers==0.23.2."


def test_a_dependency_that_does_not_import_is_one_line(tmp_path):
    """As on a machine whose tokenizers is newer than its transformers accepts: every command says so in one
    line, exit 2; an ImportError of our own is a bug and keeps its traceback."""
    (tmp_path / "litgpt").mkdir()
    (tmp_path / "litgpt" / "__init__.py").write_text(f"raise ImportError({CLASH!r} + '\\nTry: pip install -U')")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}  # this litgpt shadows the installed one
    command = [sys.executable, "run_train.py", "--help"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 2
    fix = "install the versions uv.lock pins (`uv sync`)"
    assert result.stderr == f"error: a dependency does not import: {CLASH}; {fix}\n"

    def bug():
        raise ImportError("cannot import name 'nothing' from 'litmoe.data.prepare'", name="litmoe.data.prepare")

    with pytest.raises(ImportError, match="nothing"):
        run_cli(bug)


def test_cuda_graph_training_keeps_gradients_out_of_the_graphs_output_memory(monkeypatch):
    """Under reduce-overhead a replay reuses its output memory; gradients are therefore allocated up front and
    zeroed in place (the same tensors step after step), and each micro-batch marks a new CUDA-graph step."""
    from litmoe.training.cuda_graphs import CudaGraphSteps, gradients_outside_graph_outputs

    model = tiny_gpt()
    optimizer = torch.optim.AdamW(model.parameters())
    with gradients_outside_graph_outputs({"model": model, "optimizer": optimizer}):
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and not g.any() for g in grads)
        model(torch.randint(0, 64, (2, 16))).sum().backward()
        assert all(p.grad is g for p, g in zip(model.parameters(), grads, strict=True))  # added into, not replaced
        optimizer.zero_grad(set_to_none=True)  # as LitGPT and the health check ask
        assert all(p.grad is g and not g.any() for p, g in zip(model.parameters(), grads, strict=True))
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())  # outside: the stock behaviour again

    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    assert list(CudaGraphSteps([1, 2, 3])) == [1, 2, 3] and len(marks) == 3
