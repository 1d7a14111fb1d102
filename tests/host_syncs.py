"""What would make the host wait for the GPU during training, counted on the CPU.

On a GPU, Python runs ahead of the kernels it launches. These calls stop it until the GPU has caught up:
  a device value read on the host   `.item()`, `float()`, `bool()` (all `_local_scalar_dense`), `.tolist()`,
                                    `.numpy()`, `.cpu()`, `.to("cpu")`
  an output whose size is data      `nonzero`, `masked_select`, `unique`; and `equal`, which returns a bool
  a device tensor from Python data  `torch.tensor(..., device=)`, `torch.as_tensor(..., device=)`, `new_tensor`
On the CPU nothing waits, but the code makes the same calls: `HostSyncs` records each one with the optimizer step
it happened in (0 before the first optimizer step, 1 after it, ...) and where it came from. Not counted, because
they live in host memory by design: the buffers litmoe.training.readback copies into (counted apart, as copies;
reading one in the step that copied it would wait for that copy), AdamW's step counters (host tensors unless
capturable, made at its first step), and the DataLoader's seed draws.
"""

import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from litmoe.training.readback import is_host_buffer

SYNC_OPS = {"_local_scalar_dense", "equal", "nonzero", "masked_select", "_unique", "_unique2", "unique_consecutive",
            "unique_dim"}  # fmt: skip
HOST_METHODS = {"tolist", "numpy", "cpu"}
FROM_PYTHON = {"tensor", "as_tensor", "new_tensor"}
# the flags of a watched run (with 4 x 64-token micro-batches): 4 optimizer steps of 2 micro-batches per rank,
# the log at the fourth only, no evaluation or checkpoint before the end
WATCHED = ("--train.log_interval", "4", "--eval.interval", "1000", "--eval.initial_validation", "false",
           "--eval.final_validation", "false", "--train.save_interval", "1000", "--num_workers", "0")  # fmt: skip


def watched_training(argv: list[str]) -> "HostSyncs":
    """run_train.py's main(argv) with LitGPT's training loop watched (its evaluations left out)."""
    import litgpt.pretrain as pretrain

    from litmoe.core.patching import swapped
    from litmoe.training.cli import main

    syncs, stock_fit = HostSyncs(), pretrain.fit

    def watched_fit(*args: Any, **kwargs: Any) -> None:
        with syncs.watching():
            stock_fit(*args, **kwargs)

    with swapped(pretrain, "fit", watched_fit), swapped(pretrain, "validate", syncs.paused(pretrain.validate)):
        main(argv)
    return syncs


def cuda_syncs(argv: list[str]) -> dict[int, list[str]]:
    """run_train.py's main(argv) on a CUDA GPU with LitGPT's training loop under CUDA's sync debug mode (its
    evaluations left out): where each synchronizing call came from, per optimizer step (0 before the first)."""
    import warnings

    import litgpt.pretrain as pretrain
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from litmoe.core.patching import swapped
    from litmoe.training.cli import main

    syncs: dict[int, list[str]] = defaultdict(list)
    step, stock_fit, stock_validate, show = [0], pretrain.fit, pretrain.validate, warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            return show(message, category, filename, lineno, file, line)
        stack = traceback.extract_stack()[:-1]
        ours = [f for f in stack if "/torch/" not in f.filename and not f.filename.endswith("warnings.py")][-3:][::-1]
        syncs[step[0]].append(" <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in ours))

    def watched_fit(*args: Any, **kwargs: Any) -> None:
        hook = register_optimizer_step_post_hook(lambda *_: step.__setitem__(0, step[0] + 1))
        torch.cuda.set_sync_debug_mode("warn")
        try:
            stock_fit(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            hook.remove()

    def unwatched_validate(*args: Any, **kwargs: Any) -> Any:
        torch.cuda.set_sync_debug_mode("default")
        try:
            return stock_validate(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("warn")

    with warnings.catch_warnings(), swapped(pretrain, "fit", watched_fit), \
            swapped(pretrain, "validate", unwatched_validate):  # fmt: skip
        warnings.simplefilter("always")
        warnings.showwarning = record
        main(argv)
    return syncs


class HostSyncs:
    """`watching()` counts what runs inside it; `paused(fn)` leaves a function out (evaluation)."""

    def __init__(self) -> None:
        self.step = 0
        self.syncs: dict[int, list[str]] = defaultdict(list)  # step -> what waited, and where
        self.copies: dict[int, int] = defaultdict(int)  # step -> copies into host buffers
        self.waited: dict[int, set[int]] = defaultdict(set)  # step -> host buffers read in the step that copied them
        self.copied_at: dict[int, int] = {}  # host buffer storage -> the step of its last copy
        self.optimizers: list[torch.optim.Optimizer] = []
        self.pause = 0

    @contextmanager
    def watching(self) -> Iterator["HostSyncs"]:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        before = register_optimizer_step_pre_hook(lambda optimizer, *_: self.optimizers.append(optimizer))
        after = register_optimizer_step_post_hook(lambda *_: setattr(self, "step", self.step + 1))
        try:
            with _Functions(self), _Dispatches(self):
                yield self
        finally:
            before.remove()
            after.remove()

    def paused(self, fn: Callable) -> Callable:
        @wraps(fn)
        def unwatched(*args: Any, **kwargs: Any) -> Any:
            self.pause += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.pause -= 1

        return unwatched

    def read(self, what: str, tensor: Any) -> None:
        """`what` read `tensor` (or made a device tensor from Python data, when `tensor` is None) on the host."""
        if self.pause:
            return
        if isinstance(tensor, torch.Tensor):
            if is_host_buffer(tensor):
                storage = tensor.untyped_storage().data_ptr()
                if self.copied_at.get(storage) == self.step:
                    self.waited[self.step].add(storage)
                return
            if self.is_step_counter(tensor):
                return
        stack = traceback.extract_stack()[:-2]  # less this method and the mode's
        if any("/torch/utils/data/" in frame.filename for frame in stack):
            return
        if tensor is None and any("/torch/optim/" in frame.filename for frame in stack):
            return  # AdamW making its step counters at its first step
        ours = [frame for frame in stack if "/torch/" not in frame.filename and frame.filename != __file__][-3:][::-1]
        self.syncs[self.step].append(f"{what} at " + " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in ours))

    def waits(self, step: int) -> int:
        """Copies to the host that step waited for: each read in the step that made it (read once or often)."""
        return len(self.waited[step])

    def record(self) -> dict[str, Any]:
        """What was seen, per optimizer step (0 to `steps`), as JSON data."""
        steps = range(self.step + 1)
        return {
            "steps": self.step,
            "syncs": [self.syncs[step] for step in steps],
            "copies": [self.copies[step] for step in steps],
            "waits": [self.waits(step) for step in steps],
        }

    def copied(self, buffer: torch.Tensor) -> None:
        if not self.pause:
            self.copies[self.step] += 1
            self.copied_at[buffer.untyped_storage().data_ptr()] = self.step

    def is_step_counter(self, tensor: torch.Tensor) -> bool:
        return any(state.get("step") is tensor for optimizer in self.optimizers for state in optimizer.state.values())


class _Functions(TorchFunctionMode):
    def __init__(self, counter: HostSyncs) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in HOST_METHODS:
            self.counter.read(name, args[0])
        elif name == "to" and _to_cpu(args[1:], kwargs):
            self.counter.read("to(cpu)", args[0])
        elif name in FROM_PYTHON and not isinstance(args[-1] if name == "new_tensor" else args[0], torch.Tensor):
            if name == "new_tensor" or kwargs.get("device") is not None:
                self.counter.read(f"{name}(Python data, device)", None)
        elif name == "copy_" and is_host_buffer(args[0]):
            self.counter.copied(args[0])
        return func(*args, **kwargs)


def _to_cpu(args: tuple, kwargs: dict) -> bool:
    """`.to("cpu")` spelled out (on this CPU run the device itself is the CPU, so `.to(device)` cannot tell)."""
    return any(isinstance(target, str) and target == "cpu" for target in (kwargs.get("device"), *args[:1]))


class _Dispatches(TorchDispatchMode):
    def __init__(self, counter: HostSyncs) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.counter.read(name, args[0])
        return func(*args, **(kwargs or {}))
