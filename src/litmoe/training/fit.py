"""LitGPT's `fit`, run unchanged, with what happens around it and around each of its steps.

`timed_fit` replaces `litgpt.pretrain.fit` for the duration of `patched_pretrain` (litmoe.training.patches):
  start      the console and progress bar, the resumed position, the starting weights' scratch removed, the
             disk space checked, the health monitor (litmoe.training.health)
  each step  the train loader stops at a step boundary on a signal (litmoe.training.preemption) and times the
             steady rate without validation and saves (SteadyClock); an optimizer step hook updates the experts'
             selection bias; every step's gradient norm goes through the health monitor; nothing is read from
             the device (litmoe.training.readback): a log step reads the loss, the gradient norm and the routing
             statistics in one copy; data-parallel ranks check that they read different batches
  a stop     a signal saves a checkpoint at the step boundary (exit 75); divergence keeps the last good one (exit 3)
  the end    data-parallel replicas compared, the initial validation loss logged, the summary printed and the
             report drawn (litmoe.training.report)
"""

import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial, wraps
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from litmoe.core.args import CUDA_GRAPH_MODES, MoEArgs
from litmoe.core.checkpoint_io import latest_checkpoint
from litmoe.core.errors import EXIT_DIVERGED, EXIT_OUT_OF_MEMORY, EXIT_PREEMPTED, RunStopped
from litmoe.core.patching import swapped
from litmoe.distributed.expert_parallel import split_experts
from litmoe.distributed.plans import StrategyChoice
from litmoe.distributed.zero import LoopDeepSpeedStrategy, client_optimizer
from litmoe.model.attention import compute_dtype
from litmoe.model.flops import TrainingFlops, device_peak_flops
from litmoe.model.moe import moe_layers, routing_rows, update_expert_bias
from litmoe.training.cuda_graphs import CudaGraphSteps, gradients_outside_graph_outputs
from litmoe.training.health import Diverged, EventLog, TrainingHealth
from litmoe.training.monitoring import WARMUP_STEPS, Console, Rate, RunLogger, RunSummary, SteadyClock
from litmoe.training.preemption import Preempted, StopAtStepBoundary
from litmoe.training.readback import LogReads, RunningLoss
from litmoe.training.report import write_report
from litmoe.training.saving import AtomicSave, checkpoint_bytes, warn_if_little_space
from litmoe.training.settings import PatchSettings


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
    """Whether every rank holds the same replicated parameters (data parallelism keeps them equal; experts split
    over ranks by expert parallelism differ by design)."""
    split = split_experts(model)
    with torch.no_grad():
        checksum = torch.stack([p.double().sum() for p in model.parameters() if id(p) not in split]).sum().reshape(1)
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


def stop_out_of_memory(fabric, settings: PatchSettings, events: EventLog, step: int) -> None:
    """CUDA's out-of-memory error, a page of allocator statistics, as one line with what to change."""
    events.record("stopped", step, reason="out of GPU memory")
    newest = latest_checkpoint(settings.out_dir)
    split, skew = settings.strategy.expert_parallel, ""
    if split > 1:
        skew = f"; with experts split over {split} ranks, a skewed router can send one up to {split}x its share"
    message = (
        f"error: out of GPU memory at optimizer step {step + 1}{skew}. The last checkpoint is"
        f" {newest.parent if newest is not None else 'none yet'}; lower --train.micro_batch_size (the global batch"
        " stays), add --gradient-checkpointing, or shard more (--estimate shows the memory of each plan)"
    )
    raise RunStopped(message if fabric.is_global_zero else None, EXIT_OUT_OF_MEMORY)


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


def step_learning_rate(
    stock_get_lr: Callable, accumulation: int, learning_rate: float, it: int, warmup_iters: int, max_iters: int,
    min_lr: float,
) -> float:  # fmt: skip
    """LitGPT's schedule, read at the first micro-batch of each optimizer step. LitGPT reads it at every
    micro-batch, so the rate a step applied depended on how many micro-batches it accumulates, that is on the
    number of ranks for one global batch; read this way, a step gets the same rate on any number of ranks (and
    the one a run without accumulation gives), so a run resumed on other hardware takes the same steps."""
    return stock_get_lr(learning_rate, it - it % accumulation, warmup_iters, max_iters, min_lr)


def checked_first(health: TrainingHealth, fn: Callable) -> Callable:
    """`fn` (a save or an evaluation), after the health check of the last optimizer step: no checkpoint is written
    after a non-finite step."""

    @wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        health.settle()
        return fn(*args, **kwargs)

    return checked


def log_reads(state: dict, health: TrainingHealth) -> LogReads:
    """What a log step reads from the device in one copy: the gradient norm and the routing statistics here, the
    running loss once LitGPT's loop makes it (`RunningLoss`)."""
    reads = LogReads(state)
    reads.add("grad_norm", lambda: health.last_norm)
    if moe_layers(state["model"]):
        reads.add("routing", partial(routing_rows, state["model"]))
    return reads


def recorded_validate(stock_validate: Callable, losses: list[float], *args: Any, **kwargs: Any) -> torch.Tensor:
    loss = stock_validate(*args, **kwargs)
    if kwargs.get("verbose", True):  # verbose=False is LitGPT's 2-batch sanity check, not an evaluation
        losses.append(float(loss))
    return loss


@dataclass
class FitRun:
    """What one call of LitGPT's fit shares between its steps below."""

    fabric: Any
    state: dict
    console: Console
    progress: Any
    events: EventLog
    health: TrainingHealth
    first_iter: int
    first_step: int
    val_losses: list[float] = field(default_factory=list)


def timed_fit(
    stock_fit: Callable, flops: TrainingFlops, settings: PatchSettings, saver: AtomicSave, **kwargs: Any
) -> None:
    """LitGPT's fit, unchanged, between our start of a run and its summary."""
    run = start_run(settings, saver, kwargs["fabric"], kwargs["state"])
    start = time.perf_counter()
    clock = run_stock_fit(stock_fit, run, settings, kwargs)
    finish_run(run, settings, flops, kwargs, time.perf_counter() - start, clock.measured())


def start_run(settings: PatchSettings, saver: AtomicSave, fabric, state: dict) -> FitRun:
    """The console, the resumed position, the starting weights cleaned up, the disk checked, health and progress."""
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
    flat_shards = settings.strategy.name == "fsdp" and not settings.strategy.shards_experts  # LitGPT's FSDP
    saver.needed_bytes = checkpoint_bytes(state["model"], fabric.world_size, flat_shards)
    if fabric.is_global_zero:
        warn_if_little_space(settings.out_dir, saver.needed_bytes, console.print)
    events = EventLog(settings.out_dir / "logs" / "events.jsonl" if fabric.is_global_zero else None, console.print)
    health = TrainingHealth(settings.health, events, state)
    if progress and fabric.is_global_zero:  # the loop trains whole iterations of the budget, per rank
        iterations = settings.token_budget // fabric.world_size // settings.tokens_per_micro_batch
        progress.start(state["iter_num"] * tokens_per_iter, iterations * tokens_per_iter)
    return FitRun(fabric, state, console, progress, events, health, state["iter_num"], state["step_count"])


def run_stock_fit(stock_fit: Callable, run: FitRun, settings: PatchSettings, kwargs: dict[str, Any]) -> SteadyClock:
    """LitGPT's fit with our hooks around each step; a stop signal or divergence ends it with a checkpoint."""
    import litgpt.pretrain as pretrain

    fabric, state = run.fabric, run.state
    accumulation = kwargs["train"].gradient_accumulation_iters(kwargs["devices"], kwargs.get("num_nodes", 1))
    reads = log_reads(state, run.health)
    with ExitStack() as stack:
        loader = StopAtStepBoundary(kwargs["train_dataloader"], fabric, state, accumulation, settings.stop)
        clock = SteadyClock(loader, state, WARMUP_STEPS * accumulation, fabric.device)
        validate = partial(recorded_validate, pretrain.validate, run.val_losses)
        for name, fn in (("validate", validate), ("save_checkpoint", pretrain.save_checkpoint)):
            stack.enter_context(swapped(pretrain, name, clock.leaving_out(checked_first(run.health, fn))))
        stack.enter_context(swapped(pretrain, "get_lr", partial(step_learning_rate, pretrain.get_lr, accumulation)))
        if not settings.optimization.running_loss_nan_check:  # torchmetrics' checks read the device twice a batch
            stack.enter_context(swapped(pretrain, "RunningMean", partial(RunningLoss, reads)))
        stack.enter_context(balanced_routing(fabric, state, settings.moe, accumulation))
        stack.enter_context(watched_gradients(fabric, run.health))
        run.console.reads = reads
        if isinstance(fabric.logger, RunLogger):
            logger = fabric.logger
            logger.reads, logger.health, logger.echo = reads, run.health, run.console.print
            logger.world_size, logger.optimizer_step = fabric.world_size, lambda: state["step_count"]
        train_loader = DistinctDataCheck(clock, fabric, run.console.print) if fabric.world_size > 1 else clock
        if settings.optimization.compile and settings.optimization.compile_mode in CUDA_GRAPH_MODES:
            stack.enter_context(gradients_outside_graph_outputs(state))
            train_loader = CudaGraphSteps(train_loader)
        kwargs["train_dataloader"] = train_loader
        try:
            try:
                stock_fit(**kwargs)
            except Preempted as stop:
                run.health.settle()  # a checkpoint at the stop only after a finite step
                stop_with_checkpoint(fabric, state, kwargs, stop.signal_name, run.first_step)
            run.health.settle()
        except Diverged as err:
            stop_diverged(fabric, err, settings.out_dir, run.events, err.step or state["step_count"])
        except torch.OutOfMemoryError:
            stop_out_of_memory(fabric, settings, run.events, state["step_count"])
    return clock


def finish_run(
    run: FitRun, settings: PatchSettings, flops: TrainingFlops, kwargs: dict[str, Any], seconds: float,
    steady: tuple[int, float] | None,
) -> None:  # fmt: skip
    """The replicas compared, the progress bar closed, the initial validation logged, and the summary printed."""
    fabric, state = run.fabric, run.state
    if fabric.world_size > 1 and replicated(settings.strategy):
        in_sync = replicas_in_sync(fabric, state["model"])
        run.console.print(f"Data parallel: parameters {'identical' if in_sync else 'DIFFERENT'} on all"
                          f" {fabric.world_size} ranks after training")  # fmt: skip
    if run.progress:
        run.progress.close(state["iter_num"] * settings.tokens_per_micro_batch * fabric.world_size)
    val_losses = run.val_losses
    initial_val_loss = val_losses[0] if kwargs["eval"].initial_validation and val_losses else None
    if initial_val_loss is not None:  # LitGPT only prints it; logged now at its step (the bar is closed)
        metrics = {
            "val_loss": initial_val_loss,
            "val_ppl": math.exp(initial_val_loss),
            "optimizer_step": run.first_step,
        }
        fabric.log_dict(metrics, step=run.first_iter)
    settings.summary = summarize(
        fabric, settings, flops, state["iter_num"] - run.first_iter, seconds, steady, initial_val_loss, val_losses,
        kwargs["eval"].max_iters,
    )  # fmt: skip
    for line in settings.summary.lines():
        run.console.print(line)
    if fabric.is_global_zero and isinstance(fabric.logger, RunLogger):
        fabric.logger.save()  # the CSV rows so far, for the report
        report = write_report(settings.out_dir)
        run.console.print(f"  report         : {report} (loss, throughput, gradient norm, expert load)")
    run.console.training_done = True


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
    peak = device_peak_flops(fabric.device, compute_dtype(settings.precision))

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
