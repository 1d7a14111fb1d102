"""What a run reports: metrics to TensorBoard and CSV, a live progress bar, and a correct final summary."""

import resource
import shutil
import sys
import time
from argparse import Namespace
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import wraps
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.loggers import CSVLogger, Logger, TensorBoardLogger
from tqdm import tqdm

from litmoe.model.moe import routing_metrics, routing_stats, routing_summary

# The lines of LitGPT's closing "Performance" block (its Tok/sec divides by a timestamp); ours replaces it.
STOCK_SUMMARY_PREFIXES = ("| ", "-" * 40)
# LitGPT names the scratch directory it saves into; litmoe.training.saving says where the checkpoint landed.
STOCK_SAVE_LINE = "Saving checkpoint to "
STOCK_TRAINING_LINE = "Epoch "  # LitGPT's line at each log step; the gradient norm is appended to it


class RunLogger(Logger):
    """Fans metrics out to LitGPT's chosen logger and a CSV file, and feeds the progress bar.

    Once training runs, `reads` (litmoe.training.readback.LogReads) holds what each training log adds, read from
    the device with the loss in one copy: the gradient norm and, with MoE layers, the routing statistics (scalars,
    a layers x experts load heatmap in TensorBoard, and a one-line console summary).
    """

    def __init__(self, loggers: list[Logger], progress: "Progress | None" = None) -> None:
        self.loggers = loggers
        self.progress = progress
        self.last: dict[str, float] = {}
        self.reads = None  # litmoe.training.readback.LogReads, once training runs
        self.health = None  # litmoe.training.health.TrainingHealth, once training runs: skipped steps, spikes
        self.optimizer_step: Callable[[], int] | None = None  # once training runs: each row's optimizer step
        self.world_size = 1
        self.echo: Callable[[str], None] = print

    @property
    def name(self) -> str:
        return self.loggers[0].name

    @property
    def version(self) -> int | str:
        return self.loggers[0].version

    @property
    def log_dir(self) -> str | None:
        return getattr(self.loggers[0], "log_dir", None)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        training = "loss" in metrics and self.reads is not None  # LitGPT's training log, not validation
        rows = self.reads.get("routing") if training else None
        routing = routing_stats(rows.tolist()) if rows is not None else []
        routing_scalars = routing_metrics(routing) if routing else {}
        health = {}
        if training and self.health is not None:
            norm = self.reads.get("grad_norm")
            health = self.health.log_metrics(float(metrics["loss"]), float(norm) if norm is not None else None)
        if self.optimizer_step is not None and "optimizer_step" not in metrics:  # the CSV's `step` is the iteration
            metrics = {**metrics, "optimizer_step": float(self.optimizer_step())}
        metrics = {**metrics, **routing_scalars, **health, **tokens_per_second(metrics, self.world_size)}
        self.last.update({key: float(value) for key, value in metrics.items()})
        for logger in self.loggers:
            logger.log_metrics(metrics, step)
            if routing and isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("moe/load_heatmap", load_heatmap(routing), step, dataformats="HWC")
        if self.progress is not None:
            self.progress.update(metrics)
        if routing:
            self.echo(routing_summary(routing, routing_scalars))

    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        for logger in self.loggers:
            if not isinstance(logger, CSVLogger):  # it raises NotImplementedError
                logger.log_hyperparams(params, *args, **kwargs)

    def save(self) -> None:
        for logger in self.loggers:
            logger.save()

    def finalize(self, status: str) -> None:
        for logger in self.loggers:
            logger.finalize(status)
        if self.progress is not None:
            self.progress.close()


def tokens_per_second(metrics: dict[str, float], world_size: int) -> dict[str, float]:
    """All ranks' tokens/s, under a name one can find (LitGPT's monitor counts tokens as items per device)."""
    if "device/items_per_sec" not in metrics:
        return {}
    return {"tokens_per_sec": metrics["device/items_per_sec"] * world_size}


HEATMAP_MARGIN, HEATMAP_SCALE_HEIGHT = (40, 22), 40  # room for the labels, and for the shade scale below


def load_heatmap(routing: list[dict[str, Any]]) -> np.ndarray:
    """Layers (rows) x experts (columns), each cell shaded by its load relative to a fair share: black idle,
    mid-grey balanced, white twice its share or more. Labelled, with the shade scale below; RGB, (H, W, 3)."""
    from PIL import Image, ImageDraw

    load = np.array([layer["load"] for layer in routing])
    layers, experts = load.shape
    relative = np.clip(load * experts / 2, 0, 1)
    cell = max(8, min(28, 896 // experts))
    left, top = HEATMAP_MARGIN
    width, height = left + experts * cell + 12, top + layers * cell + HEATMAP_SCALE_HEIGHT
    image = Image.new("RGB", (width, height), (224, 232, 240))
    draw = ImageDraw.Draw(image)
    label_every = max(1, 24 // cell)
    for layer in range(layers):
        draw.text((4, top + layer * cell + cell // 2 - 6), f"L{layer}", fill="black")
        for expert in range(experts):
            shade = round(255 * float(relative[layer, expert]))
            x, y = left + expert * cell, top + layer * cell
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=(shade,) * 3, outline=(150, 160, 200))
    for expert in range(0, experts, label_every):
        draw.text((left + expert * cell + 2, 4), f"E{expert}", fill="black")
    bar_top, bar_width = top + layers * cell + 8, experts * cell
    for offset in range(bar_width):
        shade = round(255 * offset / max(bar_width - 1, 1))
        draw.line(((left + offset, bar_top), (left + offset, bar_top + 8)), fill=(shade,) * 3)
    for text, at in (("idle", 0), ("fair share", 0.5), ("2x", 1)):
        draw.text((left + at * (bar_width - 6 * len(text)), bar_top + 12), text, fill="black")
    return np.asarray(image)


class Progress:
    """A live bar of the tokens this run trains, with loss, tokens/s and ETA."""

    MIN_WIDTH = 40  # a terminal narrower than this (or of unknown width) gets a fixed-width bar

    def __init__(self, token_budget: int) -> None:
        self.token_budget = token_budget
        self.bar: tqdm | None = None
        self.training = ""  # the training part of the bar's postfix

    def start(self, tokens_done: int, tokens_total: int | None = None) -> None:
        """Open the bar where this run starts (a resumed run is part-way), so rate and ETA are this run's; its
        total is what the loop will train (whole iterations of the budget)."""
        width = shutil.get_terminal_size(fallback=(0, 0)).columns
        self.bar = tqdm(
            total=tokens_total or self.token_budget,
            initial=tokens_done,
            unit="tok",
            unit_scale=True,
            file=sys.stderr,
            dynamic_ncols=width >= self.MIN_WIDTH,
            ncols=None if width >= self.MIN_WIDTH else 100,
            desc="train",
        )

    def update(self, metrics: dict[str, float]) -> None:
        if self.bar is None:
            return
        if "total_tokens" not in metrics:  # validation-only entries
            if "val_loss" in metrics:
                validation = f"val {metrics['val_loss']:.3f}"
                self.bar.set_postfix_str(f"{self.training}, {validation}" if self.training else validation)
            return
        self.bar.update(int(metrics["total_tokens"]) - self.bar.n)
        self.training = f"loss {metrics['loss']:.3f}"
        if "tokens_per_sec" in metrics:
            self.training += f", {metrics['tokens_per_sec']:,.0f} tok/s"
        self.bar.set_postfix_str(self.training, refresh=True)

    def write(self, line: str) -> None:
        if self.bar is None:
            print(line)
        else:
            tqdm.write(line, file=sys.stdout)

    def close(self, tokens_done: int | None = None) -> None:
        if self.bar is not None:
            if tokens_done is not None:
                self.bar.update(tokens_done - self.bar.n)
            self.bar.close()
            self.bar = None


def make_run_logger(stock_logger: Logger, out_dir: Path, token_budget: int, progress: bool) -> RunLogger:
    loggers = [stock_logger]
    if not isinstance(stock_logger, CSVLogger):
        loggers.append(CSVLogger(root_dir=out_dir / "logs", name="csv", flush_logs_every_n_steps=1))
    return RunLogger(loggers, Progress(token_budget) if progress else None)


WARMUP_STEPS = 2  # optimizer steps left out of the steady rate: compilation and autotuning happen in them


class SteadyClock:
    """The train loader, unchanged, timing the rate a long run settles at: from the end of the warm-up steps
    to the end of training, less the time spent validating and saving checkpoints.

    A short benchmark's overall rate is mostly compilation (benchmarks/README.md has an H100 example). On a GPU
    the clock's marks are CUDA events in the stream, so queued kernels count where they belong and starting it
    waits for nothing; it waits for the GPU only around what it leaves out (rare events) and at the end.
    """

    def __init__(self, loader, state: dict, warmup_iters: int, device: torch.device) -> None:
        self.loader, self.state, self.device = loader, state, device
        self.start_iter = state["iter_num"] + warmup_iters
        self.started: float | torch.cuda.Event | None = None
        self.started_iter = 0
        self.left_out = 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        for batch in self.loader:
            if self.started is None and self.state["iter_num"] >= self.start_iter:
                self.started, self.started_iter = self.mark(), self.state["iter_num"]
            yield batch

    def mark(self) -> float | torch.cuda.Event:
        """Now: on a GPU an event in its stream (recording it waits for nothing), else the host's clock."""
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @staticmethod
    def seconds(begin: float | torch.cuda.Event, end: float | torch.cuda.Event) -> float:
        if isinstance(end, float):
            return end - begin
        end.synchronize()
        return begin.elapsed_time(end) / 1000

    def leaving_out(self, fn: Callable) -> Callable:
        """`fn`, with the time it takes not counted as training."""

        @wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.started is None:
                return fn(*args, **kwargs)
            begin = self.mark()
            try:
                return fn(*args, **kwargs)
            finally:
                self.left_out += self.seconds(begin, self.mark())

        return timed

    def measured(self) -> tuple[int, float] | None:
        """Micro-batches trained since the warm-up and the seconds they took; None if training ended first."""
        if self.started is None or self.state["iter_num"] <= self.started_iter:
            return None
        return self.state["iter_num"] - self.started_iter, self.seconds(self.started, self.mark()) - self.left_out


@dataclass
class Rate:
    tokens: int
    flops: float
    seconds: float

    def describe(self, peak_flops: float | None) -> str:
        tokens_per_sec = self.tokens / self.seconds if self.seconds > 0 else 0.0
        flops_per_sec = self.flops / self.seconds if self.seconds > 0 else 0.0
        mfu = f", MFU {flops_per_sec / peak_flops:.1%}" if peak_flops else ""
        return f"{tokens_per_sec:,.0f} tokens/s, {flops_per_sec / 1e12:.3f} TFLOP/s{mfu}"


@dataclass
class RunSummary:
    """Numbers of the training this process did (a resumed run counts only its own part)."""

    tokens: int
    seconds: float
    flops: float
    peak_flops: float | None = None
    steady: Rate | None = None  # after the warm-up steps, without validation and checkpoints (SteadyClock)
    initial_val_loss: float | None = None
    val_loss: float | None = None
    val_covers: str = ""  # which part of the validation split the validation losses score
    peak_memory_gb: float = field(default_factory=lambda: peak_memory_gb())

    @property
    def mfu(self) -> float | None:
        """Model FLOPs utilisation of the steady (else the overall) rate; None without a known peak (CPU)."""
        rate = self.steady or Rate(self.tokens, self.flops, self.seconds)
        return rate.flops / rate.seconds / self.peak_flops if self.peak_flops and rate.seconds > 0 else None

    @property
    def tokens_per_sec(self) -> float:
        """The steady rate when the run was long enough to have one, else the overall rate."""
        rate = self.steady or Rate(self.tokens, self.flops, self.seconds)
        return rate.tokens / rate.seconds if rate.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        memory_kind = "GPU" if torch.cuda.is_available() else "process RSS"
        overall = Rate(self.tokens, self.flops, self.seconds).describe(self.peak_flops)
        out = ["Training summary", f"  tokens trained : {self.tokens:,}", f"  training time  : {self.seconds:.1f} s"]
        if self.steady:
            out += [
                f"  throughput     : {self.steady.describe(self.peak_flops)}"
                f" (after {WARMUP_STEPS} warm-up steps, without validation and checkpoints)",
                f"  overall        : {overall} (the whole training time)",
            ]
        else:
            out.append(f"  throughput     : {overall}")
        out.append(f"  peak memory    : {self.peak_memory_gb:.2f} GB ({memory_kind})")
        if self.val_loss is not None:
            start = f" (initial {self.initial_val_loss:.4f})" if self.initial_val_loss is not None else ""
            out.append(f"  final val loss : {self.val_loss:.4f}{start}")
            if self.val_covers:
                out.append(f"                   {self.val_covers}")
        return out


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


class Console:
    """Replaces `fabric.print` during a run: goes around the progress bar and drops LitGPT's wrong summary."""

    def __init__(self, fabric, progress: Progress | None) -> None:
        self.fabric = fabric
        self.progress = progress
        self.reads = None  # litmoe.training.readback.LogReads: the gradient norm joins LitGPT's training line
        self.training_done = False

    def print(self, *args: Any, **kwargs: Any) -> None:
        if not self.fabric.is_global_zero:
            return
        line = " ".join(str(arg) for arg in args)
        if (self.training_done and line.startswith(STOCK_SUMMARY_PREFIXES)) or line.startswith(STOCK_SAVE_LINE):
            return
        norm = self.reads.get("grad_norm") if line.startswith(STOCK_TRAINING_LINE) and self.reads else None
        if norm is not None:
            line += f" | grad norm {float(norm):.3f}"
        if self.progress is not None:
            self.progress.write(line)
        else:
            print(line, **kwargs)
