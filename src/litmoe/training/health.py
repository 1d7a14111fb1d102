"""Training health: the global gradient norm of every step, a policy for non-finite numbers, loss spikes.

The gradient norm before clipping is the first number to look at when a run goes wrong. It is logged at every
log step (TensorBoard and CSV as `grad_norm`, and on the console line) under every strategy:
  single, DDP, FSDP   `fabric.clip_gradients` returns it, before the optimizer steps
  DeepSpeed           the engine clips inside its step; `get_global_grad_norm()` is read right after it

A non-finite loss gives non-finite gradients, so checking the norm covers both. `health.nonfinite`:
  stop  (default) stop, naming that step. The norm goes to the host without a wait (litmoe.training.readback)
        and is looked at one step later, or before a checkpoint or an evaluation, whichever comes first: a
        checkpoint is never written after a non-finite step, so the newest is the last good one; the message
        names it and what to try.
  skip  drop that step's gradients (the schedule moves on) and stop after `max_skips` such steps in a row.
        Deciding before the optimizer steps reads the norm at every step (a host sync, as GradScaler's overflow
        check is). Not under DeepSpeed, whose engine has stepped before the norm is known.
  off   no check; the norm is still logged.

A logged loss more than `spike_sigmas` standard deviations above the mean of the last `spike_window` logged
losses is a loss spike. Spikes, skipped steps and stops are events: a console line, a scalar in TensorBoard and
the CSV (`health/loss_spike`, `health/skipped_steps`), and a JSON line in `logs/events.jsonl`.
"""

import json
import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from litmoe.core.args import HealthArgs
from litmoe.training.readback import PendingCopy

MIN_SPIKE_WINDOW = 10
RELATIVE_STD_FLOOR = 0.05  # a flat loss curve still needs a 6 x 5% = 30% jump to count as a spike


class Diverged(Exception):
    """Training met non-finite numbers it must not go on with (at optimizer step `step`, when known)."""

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


class EventLog:
    """Events as JSON lines in `path` (rank 0 writes; other ranks pass None) and one console line each."""

    def __init__(self, path: Path | None, echo: Callable[[str], None]) -> None:
        self.path = path
        self.echo = echo

    def record(self, event: str, step: int, **fields: Any) -> None:
        details = ", ".join(
            f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}" for key, value in fields.items()
        )
        self.echo(f"Event at step {step}: {event.replace('_', ' ')}{' (' + details + ')' if details else ''}")
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "step": step, "event": event, **fields}
            with open(self.path, "a", encoding="utf-8") as file:
                file.write(json.dumps(line) + "\n")


class TrainingHealth:
    """Watches the gradient norm of each optimizer step and the logged losses; see the module docstring."""

    def __init__(self, args: HealthArgs, events: EventLog, state: dict) -> None:
        self.args = args
        self.events = events
        self.state = state  # LitGPT's loop state: step_count is the number of optimizer steps taken
        self.last_norm: torch.Tensor | None = None
        self.pending: tuple[PendingCopy, int] | None = None  # policy stop: the last norm, on its way to the host
        self.skipped = 0
        self.skipped_in_a_row = 0
        self.recent_losses: deque[float] = deque(maxlen=args.spike_window)

    def clip_gradients(self, stock_clip: Callable[..., torch.Tensor], module, optimizer, *args, **kwargs):
        """`fabric.clip_gradients`, returning the norm before clipping and applying the non-finite policy to it
        (stock raises at a non-finite norm only when clipping by norm, with a traceback)."""
        norm = stock_clip(module, optimizer, *args, **{**kwargs, "error_if_nonfinite": False})
        self.observe(norm, optimizer)
        return norm

    def observe(self, norm: torch.Tensor | float | None, optimizer=None) -> None:
        """The norm of the step about to be taken (or, under DeepSpeed, just taken; optimizer None)."""
        if norm is None:
            return
        self.last_norm = torch.as_tensor(norm).detach()
        step = self.state["step_count"] + (1 if optimizer is not None else 0)
        if self.args.nonfinite == "stop":
            self.settle()  # the previous step's norm has arrived by now
            self.pending = PendingCopy(self.last_norm), step
        elif self.args.nonfinite == "skip":
            self.skip_if_nonfinite(float(self.last_norm), step, optimizer)

    def settle(self) -> None:
        """Under policy stop: check the norm sent last, if not checked yet (before a checkpoint, an evaluation and
        the end of training this waits for it; at the next step it has arrived)."""
        if self.pending is None:
            return
        copy, step = self.pending
        self.pending = None
        norm = float(copy.value())
        if not math.isfinite(norm):
            raise Diverged(f"non-finite gradient norm ({norm}) at step {step}", step)

    def skip_if_nonfinite(self, norm: float, step: int, optimizer) -> None:
        if math.isfinite(norm):
            self.skipped_in_a_row = 0
            return
        self.skipped += 1
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row > self.args.max_skips:
            raise Diverged(
                f"{self.skipped_in_a_row} optimizer steps in a row had non-finite gradients (last: {step})", step
            )
        optimizer.zero_grad(set_to_none=True)  # the optimizer then steps no parameter
        self.events.record("skipped_step", step, grad_norm=norm, in_a_row=self.skipped_in_a_row)

    def log_metrics(self, loss: float, norm: float | None) -> dict[str, float]:
        """What goes into the training log at a log step (`norm`: the last gradient norm, read with the loss): the
        norm, skipped steps, and a spike when there is one."""
        metrics: dict[str, float] = {"health/skipped_steps": float(self.skipped)}
        if norm is not None:
            metrics["grad_norm"] = norm
        if not math.isfinite(loss):
            return metrics
        if len(self.recent_losses) >= MIN_SPIKE_WINDOW:
            mean = statistics.fmean(self.recent_losses)
            spread = max(statistics.pstdev(self.recent_losses), RELATIVE_STD_FLOOR * abs(mean))
            if loss > mean + self.args.spike_sigmas * spread:
                metrics["health/loss_spike"] = loss - mean
                self.events.record("loss_spike", self.state["step_count"], loss=loss, recent_mean=mean)
        self.recent_losses.append(loss)
        return metrics
