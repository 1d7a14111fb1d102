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
  pretrain.save_checkpoint       -> the stock save inside `litmoe.saving.AtomicSave`: a checkpoint directory
                                    appears only when complete, with the run's progress recorded
  pretrain.capture_hparams,      -> our run config (for TensorBoard's hyperparameters), and the run's effective
  pretrain.pprint                   settings where LitGPT prints its raw arguments (class-default batch sizes)
  pretrain.choose_logger         -> LitGPT's logger plus CSV and the live progress bar
  pretrain.fit                   -> the stock loop, timed, followed by a correct summary; inside it,
  pretrain.validate              -> records the validation losses (the initial one is otherwise only printed);
                                    its time and the saves' are left out of the steady throughput (SteadyClock)
and, for the duration of `fit`: an optimizer step hook updates the experts' selection bias (aux-loss-free
balancing); the logger reads the routing statistics and the gradient norm at each log step; every step's
gradient norm goes through `litmoe.health` (non-finite policy); the train loader stops at a step boundary
after SIGTERM, SIGINT or SIGUSR1, and a checkpoint is written there (`litmoe.preemption`). Those signals are
handled for the whole of `setup`.
"""

import math
import shutil
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

from litmoe.args import CheckpointArgs, HealthArgs, MoEArgs, OptimizationArgs
from litmoe.attention import compute_dtype
from litmoe.checkpoints import latest_checkpoint
from litmoe.errors import EXIT_DIVERGED, EXIT_PREEMPTED, RunStopped
from litmoe.flops import TrainingFlops
from litmoe.health import Diverged, EventLog, TrainingHealth
from litmoe.moe import MoELayer, moe_layers, read_routing_stats, update_expert_bias
from litmoe.monitoring import WARMUP_STEPS, Console, Rate, RunLogger, RunSummary, SteadyClock, make_run_logger
from litmoe.preemption import Preempted, StopAtStepBoundary, StopSignal
from litmoe.saving import AtomicSave, checkpoint_bytes, warn_if_little_space
from litmoe.strategy import StrategyChoice, fabric_builder
from litmoe.zero import LoopDeepSpeedStrategy, client_optimizer, zero3_reset_parameters


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
    out_dir: Path = Path("out")
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    health: HealthArgs = field(default_factory=HealthArgs)
    timeout_minutes: int = 30
    resume_tokens: int | None = None  # what the resumed checkpoint had trained (None: a fresh run, or unrecorded)
    initial_weights: Path | None = None  # the scratch dir of starting weights LitGPT loads (removed once loaded)
    val_tokens: int = 0  # in the validation split, to say what the summary's validation loss covers
    overview: str = ""  # the run's effective settings, printed where LitGPT prints its raw arguments
    stop: StopSignal = field(default_factory=StopSignal, init=False)
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
    saver = AtomicSave(pretrain.save_checkpoint, partial(progress_record, settings), settings.checkpoint.keep_last)
    with ExitStack() as stack:
        stack.enter_context(settings.stop.installed())
        if settings.moe.layer == "litmoe":
            stack.enter_context(swapped(litgpt.model, "LLaMAMoE", partial(MoELayer, balance=settings.moe)))
        stack.enter_context(
            swapped(torch, "compile", partial(prepare_model, compile_fn=torch.compile, options=settings.optimization))
        )
        optimizer = settings.run_config.get("optimizer", "AdamW")
        build_fabric = fabric_builder(settings.strategy, settings.deepspeed_config, optimizer, settings.timeout_minutes)
        stack.enter_context(swapped(pretrain, "L", SimpleNamespace(Fabric=build_fabric)))
        if settings.strategy.name == "deepspeed" and settings.strategy.zero_stage == 3:
            reset = partial(zero3_reset_parameters, seed=settings.run_config["seed"])
            stack.enter_context(swapped(pretrain, "reset_parameters", reset))
        stack.enter_context(swapped(pretrain, "measure_flops", flops))
        stack.enter_context(
            swapped(pretrain, "save_hyperparameters", partial(save_run_config, run_config=settings.run_config))
        )
        stack.enter_context(swapped(pretrain, "save_checkpoint", saver))
        stack.enter_context(swapped(pretrain, "capture_hparams", lambda: settings.run_config))
        stack.enter_context(swapped(pretrain, "pprint", SimpleNamespace(pformat=lambda hparams: settings.overview)))
        stack.enter_context(
            swapped(pretrain, "choose_logger", partial(choose_logger, pretrain.choose_logger, settings))
        )
        stack.enter_context(swapped(pretrain, "fit", partial(timed_fit, pretrain.fit, flops, settings, saver)))
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
    return compile_fn(
        model, mode=options.compile_mode, dynamic=options.compile_dynamic, fullgraph=options.compile_fullgraph
    )


def progress_record(settings: PatchSettings, fabric, state: dict) -> dict[str, Any]:
    """What a checkpoint records of the run that wrote it (litmoe.resume checks a resumed run against it)."""
    return {
        "iter_num": state["iter_num"],
        "step_count": state["step_count"],
        "tokens": state["iter_num"] * settings.tokens_per_micro_batch * fabric.world_size,
        "world_size": fabric.world_size,
        "micro_batch_size": settings.micro_batch_size,
        "seq_len": settings.seq_len,
    }


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
def balanced_routing(fabric, state: dict, moe: MoEArgs, accumulation: int) -> Iterator[None]:
    """Scale the injected balancing-loss gradients like the cross-entropy loss (1 / accumulation steps), and
    update the experts' selection bias after every optimizer step."""
    model, optimizer = state["model"], state["optimizer"]
    fp16_loss_scale = fp16_loss_scale_of(fabric)
    for layer in moe_layers(model):
        layer.loss_scale = 1.0 / accumulation
        layer.fp16_loss_scale = fp16_loss_scale

    def after_step(*args: Any) -> None:
        update_expert_bias(model, moe.bias_update_rate, partial(fabric.all_reduce, reduce_op="sum"))

    handle = client_optimizer(optimizer).register_step_post_hook(after_step)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def watched_gradients(fabric, health: TrainingHealth) -> Iterator[None]:
    """Every optimizer step's gradient norm goes to `health`: from `fabric.clip_gradients` before the step, or,
    under DeepSpeed, whose engine clips inside its step, right after it."""
    if isinstance(fabric.strategy, LoopDeepSpeedStrategy):
        fabric.strategy.step_observers.append(health.observe)
        try:
            yield
        finally:
            fabric.strategy.step_observers.remove(health.observe)
        return
    fabric.clip_gradients = partial(health.clip_gradients, fabric.clip_gradients)  # this run's Fabric only
    try:
        yield
    finally:
        del fabric.clip_gradients


def stop_with_checkpoint(fabric, state: dict, kwargs: dict[str, Any], signal_name: str, first_step: int) -> None:
    """After a stop signal, at a step boundary: the checkpoint of this step (unless LitGPT just wrote it), one line
    saying where, and the exit status of a preempted run."""
    import litgpt.pretrain as pretrain

    step, save_interval = state["step_count"], kwargs["train"].save_interval
    target = Path(kwargs["out_dir"]) / f"step-{step:08d}"
    if step == first_step:
        message = f"Stopped by {signal_name} before this run's first optimizer step: nothing new to save"
    else:
        if not (save_interval and step % save_interval == 0):
            pretrain.save_checkpoint(fabric, state, kwargs["tokenizer_dir"], target / "lit_model.pth")
        message = f"Stopped by {signal_name} after optimizer step {step}: saved {target}; continue with --resume auto"
    if fabric.logger is not None:
        fabric.logger.finalize("preempted")
    raise RunStopped(message if fabric.is_global_zero else None, EXIT_PREEMPTED if fabric.is_global_zero else 0)


def stop_diverged(fabric, err: Diverged, out_dir: Path, events: EventLog, step: int) -> None:
    events.record("stopped", step, reason=str(err))
    newest = latest_checkpoint(out_dir)
    good = f"{newest.parent}" if newest is not None else "none yet"
    if fabric.logger is not None:
        fabric.logger.finalize("diverged")
    message = (
        f"error: training stopped: {err}. The last good checkpoint is {good}; try a lower --optimizer.lr, a longer"
        " --train.lr_warmup_steps or a lower --train.max_norm, or --health.nonfinite skip, resuming from it"
    )
    raise RunStopped(message if fabric.is_global_zero else None, EXIT_DIVERGED)


def fp16_loss_scale_of(fabric) -> Callable[[], Any] | None:
    """The current loss scale of fp16 mixed precision, which multiplies the loss before backward: Lightning's
    GradScaler (`16-mixed`) or DeepSpeed's loss scaler. None when nothing scales the loss (bf16, fp32)."""
    scaler = getattr(fabric._precision, "scaler", None)
    if scaler is not None:
        return lambda: scaler._scale if scaler._scale is not None else scaler.get_scale()  # set by then: no sync
    engine = fabric.strategy.model if isinstance(fabric.strategy, LoopDeepSpeedStrategy) else None
    if engine is not None and engine.fp16_enabled():
        return lambda: engine.optimizer.loss_scale
    return None


def recorded_validate(stock_validate: Callable, losses: list[float], *args: Any, **kwargs: Any) -> torch.Tensor:
    loss = stock_validate(*args, **kwargs)
    if kwargs.get("verbose", True):  # verbose=False is LitGPT's 2-batch sanity check, not an evaluation
        losses.append(float(loss))
    return loss


def timed_fit(
    stock_fit: Callable, flops: TrainingFlops, settings: PatchSettings, saver: AtomicSave, **kwargs: Any
) -> None:
    import litgpt.pretrain as pretrain

    fabric, state, train = kwargs["fabric"], kwargs["state"], kwargs["train"]
    run_logger = fabric.logger if isinstance(fabric.logger, RunLogger) else None
    progress = run_logger.progress if run_logger else None
    console = Console(fabric, progress)
    fabric.print = console.print  # this Fabric object lives for this run only
    tokens_per_iter = settings.tokens_per_micro_batch * fabric.world_size
    if settings.resume_tokens is not None:  # the checkpoint's count, unless the micro-batch size changed
        state["iter_num"] = settings.resume_tokens // tokens_per_iter
    if settings.initial_weights is not None:  # LitGPT has loaded them on every rank
        fabric.barrier()
        if fabric.is_global_zero:
            shutil.rmtree(settings.initial_weights, ignore_errors=True)
    first_iter, first_step, start = state["iter_num"], state["step_count"], time.perf_counter()
    saver.needed_bytes = checkpoint_bytes(state["model"], fabric.world_size, settings.strategy.name == "fsdp")
    if fabric.is_global_zero:
        warn_if_little_space(settings.out_dir, saver.needed_bytes, console.print)
    events = EventLog(settings.out_dir / "logs" / "events.jsonl" if fabric.is_global_zero else None, console.print)
    health = TrainingHealth(settings.health, events, state)
    console.health = health
    if progress and fabric.is_global_zero:  # the loop trains whole iterations of the budget, per rank
        iterations = settings.token_budget // fabric.world_size // settings.tokens_per_micro_batch
        progress.start(first_iter * tokens_per_iter, iterations * tokens_per_iter)
    val_losses = []
    accumulation = train.gradient_accumulation_iters(kwargs["devices"], kwargs.get("num_nodes", 1))
    with ExitStack() as stack:
        loader = StopAtStepBoundary(kwargs["train_dataloader"], fabric, state, accumulation, settings.stop)
        clock = SteadyClock(loader, state, WARMUP_STEPS * accumulation, fabric.device)
        validate = partial(recorded_validate, pretrain.validate, val_losses)
        stack.enter_context(swapped(pretrain, "validate", clock.leaving_out(validate)))
        stack.enter_context(swapped(pretrain, "save_checkpoint", clock.leaving_out(pretrain.save_checkpoint)))
        stack.enter_context(balanced_routing(fabric, state, settings.moe, accumulation))
        stack.enter_context(watched_gradients(fabric, health))
        if run_logger:
            run_logger.health, run_logger.echo, run_logger.world_size = health, console.print, fabric.world_size
            if moe_layers(state["model"]):
                run_logger.routing = partial(read_routing_stats, state["model"])
        kwargs["train_dataloader"] = DistinctDataCheck(clock, fabric, console.print) if fabric.world_size > 1 else clock
        try:
            stock_fit(**kwargs)
        except Preempted as stop:
            stop_with_checkpoint(fabric, state, kwargs, stop.signal_name, first_step)
        except Diverged as err:
            stop_diverged(fabric, err, settings.out_dir, events, err.step or state["step_count"])
    seconds, steady = time.perf_counter() - start, clock.measured()
    if fabric.world_size > 1 and replicated(settings.strategy):
        in_sync = replicas_in_sync(fabric, state["model"])
        console.print(f"Data parallel: parameters {'identical' if in_sync else 'DIFFERENT'} on all"
                      f" {fabric.world_size} ranks after training")  # fmt: skip
    if progress:
        progress.close(state["iter_num"] * tokens_per_iter)
    initial_val_loss = val_losses[0] if kwargs["eval"].initial_validation and val_losses else None
    if initial_val_loss is not None:  # LitGPT only prints it; logged now at its step (the bar is closed)
        fabric.log_dict({"val_loss": initial_val_loss, "val_ppl": math.exp(initial_val_loss)}, step=first_iter)
    settings.summary = summarize(
        fabric, settings, flops, state["iter_num"] - first_iter, seconds, steady, initial_val_loss, val_losses,
        kwargs["eval"].max_iters,
    )  # fmt: skip
    for line in settings.summary.lines():
        console.print(line)
    console.training_done = True


def validation_coverage(settings: PatchSettings, world_size: int, max_iters: int) -> str:
    """LitGPT validates on the first `eval.max_iters` batches of each rank's share of the validation split."""
    windows = settings.val_tokens // (settings.seq_len + 1)
    batches = min(max_iters, windows // world_size // settings.micro_batch_size)
    scored = batches * settings.micro_batch_size * world_size * settings.seq_len
    return (
        f"(scored on {batches} batch{'es' if batches != 1 else ''} per rank: {scored:,} of the"
        f" {settings.val_tokens:,} validation tokens; evaluate.py scores all of them)"
    )


def summarize(
    fabric, settings: PatchSettings, flops: TrainingFlops, iters: int, seconds: float,
    steady: tuple[int, float] | None, initial_val_loss: float | None, val_losses: list[float], val_max_iters: int,
) -> RunSummary:  # fmt: skip
    """What this process's part of the run did; `iters` are micro-batches per rank, `steady` the micro-batches
    and seconds after the warm-up (SteadyClock)."""
    from lightning.fabric.utilities.throughput import get_available_flops

    peak = None
    if fabric.device.type == "cuda":
        peak = get_available_flops(fabric.device, compute_dtype(settings.precision))

    def rate(iters: int, seconds: float) -> Rate:
        return Rate(
            tokens=iters * fabric.world_size * settings.tokens_per_micro_batch,
            flops=iters * fabric.world_size * flops.per_micro_batch,
            seconds=seconds,
        )

    overall = rate(iters, seconds)
    return RunSummary(
        tokens=overall.tokens,
        seconds=seconds,
        flops=overall.flops,
        peak_flops=peak * fabric.world_size if peak else None,
        steady=rate(*steady) if steady else None,
        initial_val_loss=initial_val_loss,
        val_loss=val_losses[-1] if val_losses else None,
        val_covers=validation_coverage(settings, fabric.world_size, val_max_iters) if settings.val_tokens else "",
    )
