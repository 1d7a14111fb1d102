"""Reading the device's numbers on the host without making the GPU wait.

A kernel launch returns at once and the GPU works through its queue while Python goes on. A host read of a
device number (`.item()`, `float()`, `bool()`, `.tolist()`) stops Python until the queue has drained, and the
GPU then idles while Python launches the next kernels. So a training step reads nothing from the device; what
the run must know goes one of two ways:

  late      the gradient norm's non-finite check (litmoe.training.health): a non-blocking copy into pinned
            memory at each optimizer step, looked at one step later, when it has long arrived (`PendingCopy`)
  together  what a log step shows (loss, gradient norm, routing statistics): one copy of all of it, the first
            time any of it is asked for at that step (`LogReads`; LitGPT's running loss is `RunningLoss`)

Every host buffer these copies land in is made by `host_buffer`, which keeps a weak list of them, so that a
check of a run's host reads (tests/host_syncs.py) can tell reading one apart from reading the device.
"""

import weakref
from collections.abc import Callable
from typing import Any

import torch

_HOST_BUFFERS: "weakref.WeakSet[torch.Tensor]" = weakref.WeakSet()


def host_buffer(shape: tuple[int, ...], dtype: torch.dtype, pinned: bool = False) -> torch.Tensor:
    """A tensor in host memory for values copied from the device (page-locked when `pinned`, so that a
    non-blocking copy into it really does not block)."""
    buffer = torch.empty(shape, dtype=dtype, pin_memory=pinned)
    _HOST_BUFFERS.add(buffer)
    return buffer


def is_host_buffer(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is (a view of) a buffer made by `host_buffer`."""
    storage = tensor.untyped_storage().data_ptr()
    return any(buffer.untyped_storage().data_ptr() == storage for buffer in _HOST_BUFFERS)


class PendingCopy:
    """A device tensor's value on its way to the host: a non-blocking copy into pinned memory and an event that
    marks its arrival. Read a step later (`value`), it has arrived and nothing waits."""

    def __init__(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        self.host = host_buffer(tuple(tensor.shape), tensor.dtype, pinned=tensor.is_cuda)
        self.host.copy_(tensor, non_blocking=True)
        self.arrived = None
        if tensor.is_cuda:
            self.arrived = torch.cuda.Event()
            self.arrived.record()

    def value(self) -> torch.Tensor:
        if self.arrived is not None:
            self.arrived.synchronize()  # returns at once once the copy is done; waits only when read early
        return self.host


def read_together(values: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Host copies of `values` (tensors or numbers) in float64, shapes kept: one copy per device they are on."""
    tensors = {
        name: value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        for name, value in values.items()
    }
    flat = {name: tensor.reshape(-1).double() for name, tensor in tensors.items()}
    host = {}
    for device in {tensor.device for tensor in flat.values()}:
        names = [name for name, tensor in flat.items() if tensor.device == device]
        joined = torch.cat([flat[name] for name in names])
        buffer = host_buffer(tuple(joined.shape), joined.dtype, pinned=device.type == "cuda")
        buffer.copy_(joined)
        pieces = buffer.split([flat[name].numel() for name in names])
        host.update((name, piece.view(tensors[name].shape)) for name, piece in zip(names, pieces, strict=True))
    return host


class LogReads:
    """The device's numbers a log step shows, read in one copy the first time any of them is asked for at that
    step (`get`). Each source is called then, once per log step, and may return None (nothing to show)."""

    def __init__(self, state: dict) -> None:
        self.state = state  # LitGPT's loop state: iter_num tells one log step from the next
        self.sources: dict[str, Callable[[], Any]] = {}
        self.values: dict[str, torch.Tensor] = {}
        self.read_at: int | None = None

    def add(self, name: str, source: Callable[[], Any]) -> None:
        self.sources[name] = source

    def get(self, name: str) -> torch.Tensor | None:
        """The host copy of source `name` at this log step (float64), or None."""
        if self.read_at != self.state["iter_num"]:
            self.read_at = self.state["iter_num"]
            values = {key: value for key, source in self.sources.items() if (value := source()) is not None}
            self.values = read_together(values)
        return self.values.get(name)


class RunningLoss:
    """LitGPT's running mean of the training loss over the last `window` micro-batches (torchmetrics'
    `RunningMean` in its loop), kept on the device: updating it reads nothing, and `compute()` returns the mean
    on the host, read with the rest of the log step (`reads`)."""

    def __init__(self, reads: LogReads, window: int, **unused: Any) -> None:
        self.reads, self.window = reads, window
        self.values: torch.Tensor | None = None
        self.seen = 0
        reads.add("loss", self.mean)

    def to(self, device: Any) -> "RunningLoss":  # LitGPT moves the metric; the values follow the loss instead
        return self

    def update(self, loss: torch.Tensor) -> None:
        if self.values is None:
            self.values = loss.new_zeros(self.window, dtype=torch.float32)
        self.values[self.seen % self.window] = loss.detach()
        self.seen += 1

    def mean(self) -> torch.Tensor | None:
        return None if self.values is None else self.values[: min(self.seen, self.window)].mean()

    def compute(self) -> torch.Tensor:
        return self.reads.get("loss")
