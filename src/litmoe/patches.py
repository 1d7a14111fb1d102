"""Our changes to LitGPT's pretrain loop, applied in one scoped place: `patched_pretrain(...)`.

`litgpt.pretrain.setup()` runs unchanged inside the context; these names are swapped for its duration and
restored afterwards (tests/test_patches.py fails if a LitGPT upgrade moves any of them):

  litgpt.model.LLaMAMoE          -> `litmoe.moe.MoELayer` (unless moe.layer is 'stock'): Block builds its MLP
                                    with `getattr(litgpt.model, config.mlp_class_name)`
  pretrain.L                     -> a namespace whose `Fabric` builds the chosen strategy's Fabric
                                    (litmoe.strategy.fabric_builder; LitGPT hard-codes FSDP for >1 device)
  pretrain.reset_parameters      -> under ZeRO-3 only: re-initialise weights that DeepSpeed has already
                                    partitioned, gathering each module's (litmoe.zero)
  torch.compile                  -> `prepare_model`: activation checkpointing, then compile only as configured
                                    (LitGPT compiles unconditionally right before `fabric.setup(model)`)
  pretrain.measure_flops         -> `TrainingFlops`: active-expert FLOPs (the meta-device trace fails on MoE)
  pretrain.save_hyperparameters  -> writes our resolved run config (the stock one re-parses sys.argv with
                                    LitGPT's parser and dies on any flag of ours)
  pretrain.choose_logger         -> LitGPT's logger plus CSV and the live progress bar
  pretrain.fit                   -> the stock loop, timed, followed by a correct summary; inside it,
  pretrain.validate              -> records the validation losses (the initial one is otherwise only printed)
and, for the duration of `fit`, an optimizer step hook updates the experts' selection bias (aux-loss-free
balancing) and the logger reads the routing statistics at each log step.
"""

import math
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn
import yaml
from torch.utils.checkpoint import checkpoint

from litmoe.args import MoEArgs, OptimizationArgs
from litmoe.attention import compute_dtype
from litmoe.flops import TrainingFlops
from litmoe.moe import MoELayer, moe_layers, read_routing_stats, update_expert_bias
from litmoe.monitoring import Console, RunLogger, RunSummary, make_run_logger
from litmoe.strategy import StrategyChoice, fabric_builder
from litmoe.zero import client_optimizer, zero3_reset_parameters


@dataclass
class PatchSettings:
    optimization: OptimizationArgs
    moe: MoEArgs
    strategy: StrategyChoice
    precision: str
    micro_batch_size: int
    seq_len: int
    token_budget: int
    progress: bool
    run_config: dict[str, Any]
    deepspeed_config: dict[str, Any] | None = None
    summary: RunSummary | None = field(default=None, init=False)  # filled in when training ends

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch_size * self.seq_len


@contextmanager
def swapped(owner: object, name: str, replacement: Any) -> Iterator[None]:
    """Replace `owner.name` for the duration of the context; fail loudly if it does not exist."""
    if not hasattr(owner, name):
        raise AttributeError(f"{getattr(owner, '__name__', owner)} has no attribute {name!r}: LitGPT changed")
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextmanager
def patched_pretrain(settings: PatchSettings) -> Iterator[PatchSettings]:
    import litgpt.model
    import litgpt.pretrain as pretrain

    flops = TrainingFlops(settings.micro_batch_size, settings.seq_len)
    with ExitStack() as stack:
        if settings.moe.layer == "litmoe":
            stack.enter_context(swapped(litgpt.model, "LLaMAMoE", partial(MoELayer, balance=settings.moe)))
        stack.enter_context(
            swapped(torch, "compile", partial(prepare_model, compile_fn=torch.compile, options=settings.optimization))
        )
        optimizer = settings.run_config.get("optimizer", "AdamW")
        build_fabric = fabric_builder(settings.strategy, settings.deepspeed_config, optimizer)
        stack.enter_context(swapped(pretrain, "L", SimpleNamespace(Fabric=build_fabric)))
        if settings.strategy.name == "deepspeed" and settings.strategy.zero_stage == 3:
            reset = partial(zero3_reset_parameters, seed=settings.run_config["seed"])
            stack.enter_context(swapped(pretrain, "reset_parameters", reset))
        stack.enter_context(swapped(pretrain, "measure_flops", flops))
        stack.enter_context(
            swapped(pretrain, "save_hyperparameters", partial(save_run_config, run_config=settings.run_config))
        )
        stack.enter_context(
            swapped(pretrain, "choose_logger", partial(choose_logger, pretrain.choose_logger, settings))
        )
        stack.enter_context(swapped(pretrain, "fit", partial(timed_fit, pretrain.fit, flops, settings)))
        yield settings


def checkpoint_blocks(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every transformer block (state-dict keys unchanged)."""
    for block in model.transformer.h:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)


def prepare_model(model: nn.Module, *args: Any, compile_fn: Callable, options: OptimizationArgs, **kwargs: Any):
    from litgpt.model import GPT

    if not isinstance(model, GPT):  # someone else's torch.compile call: leave it alone
        return compile_fn(model, *args, **kwargs)
    if options.gradient_checkpointing:
        checkpoint_blocks(model)
    if not options.compile:
        return model
    return compile_fn(model, mode=options.compile_mode, dynamic=options.compile_dynamic)


def save_run_config(function: Callable, checkpoint_dir: Path, run_config: dict[str, Any]) -> None:
    with open(Path(checkpoint_dir) / "hyperparameters.yaml", "w", encoding="utf-8") as file:
        yaml.safe_dump(run_config, file, sort_keys=False)


def choose_logger(stock_choose_logger: Callable, settings: PatchSettings, logger_name, out_dir, *args, **kwargs):
    stock = stock_choose_logger(logger_name, out_dir, *args, **kwargs)
    return make_run_logger(stock, Path(out_dir), settings.token_budget, settings.progress)


class DistinctDataCheck:
    """The train loader, unchanged, except that after the first batch all ranks compare what they got:
    data-parallel ranks reading the same batches would only repeat each other's work."""

    def __init__(self, loader, fabric, report: Callable[[str], None]) -> None:
        self.loader, self.fabric, self.report = loader, fabric, report
        self.checked = False

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if not self.checked:
                self.checked = True
                fingerprints = self.fabric.all_gather(batch.flatten()[:4096].double().sum().reshape(1)).flatten()
                distinct = len(set(fingerprints.tolist())) == len(fingerprints)
                self.report(f"Data parallel: {len(fingerprints)} ranks read {'different' if distinct else 'THE SAME'}"
                            f" first batches{'' if distinct else ' (check the data sharding)'}")  # fmt: skip
            yield batch


def replicated(choice: StrategyChoice) -> bool:
    """Whether every rank holds all parameters (FSDP and ZeRO-3 hold shards)."""
    return choice.name == "ddp" or (choice.name == "deepspeed" and choice.zero_stage < 3)


def replicas_in_sync(fabric, model: nn.Module) -> bool:
    """Whether every rank holds the same parameters (data parallelism keeps them equal)."""
    with torch.no_grad():
        checksum = torch.stack([p.double().sum() for p in model.parameters()]).sum().reshape(1)
    checksums = fabric.all_gather(checksum).flatten()
    return bool(torch.allclose(checksums, checksums[0].expand_as(checksums), rtol=1e-12, atol=0))


@contextmanager
def balanced_routing(fabric, state: dict, moe: MoEArgs, train, devices: int, num_nodes: int) -> Iterator[None]:
    """Scale the injected balancing-loss gradients like the cross-entropy loss (1 / accumulation steps), and
    update the experts' selection bias after every optimizer step."""
    model, optimizer = state["model"], state["optimizer"]
    for layer in moe_layers(model):
        layer.loss_scale = 1.0 / train.gradient_accumulation_iters(devices, num_nodes)

    def after_step(*args: Any) -> None:
        update_expert_bias(model, moe.bias_update_rate, partial(fabric.all_reduce, reduce_op="sum"))

    handle = client_optimizer(optimizer).register_step_post_hook(after_step)
    try:
        yield
    finally:
        handle.remove()


def recorded_validate(stock_validate: Callable, losses: list[float], *args: Any, **kwargs: Any) -> torch.Tensor:
    loss = stock_validate(*args, **kwargs)
    if kwargs.get("verbose", True):  # verbose=False is LitGPT's 2-batch sanity check, not an evaluation
        losses.append(float(loss))
    return loss


def timed_fit(stock_fit: Callable, flops: TrainingFlops, settings: PatchSettings, **kwargs: Any) -> None:
    import litgpt.pretrain as pretrain

    fabric, state = kwargs["fabric"], kwargs["state"]
    run_logger = fabric.logger if isinstance(fabric.logger, RunLogger) else None
    progress = run_logger.progress if run_logger else None
    console = Console(fabric, progress)
    fabric.print = console.print  # this Fabric object lives for this run only
    tokens_per_iter = settings.tokens_per_micro_batch * fabric.world_size
    first_iter, start = state["iter_num"], time.perf_counter()
    if progress and fabric.is_global_zero:
        progress.start(first_iter * tokens_per_iter)
    val_losses = []
    with ExitStack() as stack:
        stack.enter_context(swapped(pretrain, "validate", partial(recorded_validate, pretrain.validate, val_losses)))
        stack.enter_context(
            balanced_routing(
                fabric, state, settings.moe, kwargs["train"], kwargs["devices"], kwargs.get("num_nodes", 1)
            )
        )
        if run_logger and moe_layers(state["model"]):
            run_logger.routing, run_logger.echo = partial(read_routing_stats, state["model"]), console.print
        if fabric.world_size > 1:
            kwargs["train_dataloader"] = DistinctDataCheck(kwargs["train_dataloader"], fabric, console.print)
        stock_fit(**kwargs)
    seconds = time.perf_counter() - start
    if fabric.world_size > 1 and replicated(settings.strategy):
        in_sync = replicas_in_sync(fabric, state["model"])
        console.print(f"Data parallel: parameters {'identical' if in_sync else 'DIFFERENT'} on all"
                      f" {fabric.world_size} ranks after training")  # fmt: skip
    initial_val_loss = val_losses[0] if kwargs["eval"].initial_validation and val_losses else None
    if initial_val_loss is not None:
        fabric.log_dict({"val_loss": initial_val_loss, "val_ppl": math.exp(initial_val_loss)}, step=first_iter)
    if progress:
        progress.close(state["iter_num"] * tokens_per_iter)
    settings.summary = summarize(
        fabric, settings, flops, state["iter_num"] - first_iter, seconds, initial_val_loss, val_losses
    )
    for line in settings.summary.lines():
        console.print(line)
    console.training_done = True


def summarize(
    fabric, settings: PatchSettings, flops: TrainingFlops, iters: int, seconds: float,
    initial_val_loss: float | None, val_losses: list[float],
) -> RunSummary:  # fmt: skip
    """What this process's part of the run did; `iters` are micro-batches per rank."""
    from lightning.fabric.utilities.throughput import get_available_flops

    peak = None
    if fabric.device.type == "cuda":
        peak = get_available_flops(fabric.device, compute_dtype(settings.precision))
    return RunSummary(
        tokens=iters * fabric.world_size * settings.tokens_per_micro_batch,
        seconds=seconds,
        flops=iters * fabric.world_size * flops.per_micro_batch,
        peak_flops=peak * fabric.world_size if peak else None,
        initial_val_loss=initial_val_loss,
        val_loss=val_losses[-1] if val_losses else None,
    )
