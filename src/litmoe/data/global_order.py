"""The training windows in one order shared by every rank, so that a run continues on any number of ranks.

litdata's streaming loader splits the data among ranks and workers, and the position it saves is per rank and per
worker: on another number of either it cannot say which windows were read. Here the order is global, as
Megatron's is, and a global position is all a run needs to go on: the samples all ranks have consumed, which a
checkpoint records (tokens trained / sequence length).

  sources  each position's source is drawn by weight from a generator of its own block of positions (seeded by
           the seed and the block), so a mixture's share holds at every scale and any position can be found
           without replaying the ones before it
  windows  the n-th window a source gives is window n mod N of the permutation of its N windows for epoch
           n // N (seeded by the seed, the source and the epoch): every epoch reshuffled, nothing read twice or
           skipped within one
  ranks    of the optimizer step that starts at global position p, with W ranks of micro-batch B, rank r reads
           positions p + rB ... p + rB + B - 1 of each micro-batch's W x B: whatever W and B were before, the
           run continues at the next position

Worker k of K of a rank's loader reads its batches k, k + K, ...; PyTorch's loader hands them out in that order,
so the loop sees the rank's batches in sequence (as with litdata, which also splits among workers), and the
number of workers can change between runs.
"""

import json
from pathlib import Path
from typing import Any

import litdata.streaming
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

BLOCK = 1 << 16  # positions whose sources are drawn together


class TokensLoader(litdata.streaming.TokensLoader):
    """litdata's TokensLoader, handing out copies instead of views of a memory map that may be closed: litdata's
    reader closes a chunk's map when reading moves on to the next chunk, while items read from it (views into the
    map) may still wait in a batch to be collated; copying a window of a few KB costs nothing next to a training
    step. It keeps litdata's class name, which litdata checks against the loader named in each index.json."""

    def load_item_from_chunk(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().load_item_from_chunk(*args, **kwargs).clone()


class GlobalOrder:
    """Which source and which of its windows each global position holds."""

    def __init__(self, windows: list[int], weights: list[float], seed: int) -> None:
        self.windows, self.seed = windows, seed
        self.bounds = np.cumsum(np.asarray(weights, dtype=np.float64) / sum(weights))[:-1]
        self.permutations: dict[tuple[int, int], np.ndarray] = {}

    def block_sources(self, block: int) -> np.ndarray:
        if len(self.windows) == 1:
            return np.zeros(BLOCK, dtype=np.int64)
        draws = np.random.default_rng([self.seed, block]).random(BLOCK)
        return np.searchsorted(self.bounds, draws, side="right")

    def window(self, source: int, ordinal: int) -> int:
        """The `ordinal`-th window source `source` gives (counting from 0 over all epochs)."""
        epoch, index = divmod(ordinal, self.windows[source])
        key = (source, epoch)
        if key not in self.permutations:
            if len(self.permutations) > 2 * len(self.windows):  # an epoch boundary keeps two per source alive
                self.permutations = {k: v for k, v in self.permutations.items() if k[1] >= epoch - 1}
            self.permutations[key] = np.random.default_rng([self.seed, source, epoch]).permutation(self.windows[source])
        return int(self.permutations[key][index])


class Cursor:
    """Walks positions forward (in increasing order), knowing how many windows each source gave before each."""

    def __init__(self, order: GlobalOrder) -> None:
        self.order = order
        self.block = -1
        self.before = np.zeros(len(order.windows), dtype=np.int64)  # windows each source gave before this block
        self.sources = np.zeros(0, dtype=np.int64)
        self.ordinals = np.zeros(0, dtype=np.int64)
        self.ordinals_block = -1  # the block `ordinals` (each position's count within its source) belongs to

    def item(self, position: int) -> tuple[int, int]:
        block, offset = divmod(position, BLOCK)
        if block < self.block:
            raise ValueError(f"position {position} is behind the cursor (block {self.block})")
        while self.block < block:
            if self.block >= 0:
                self.before += np.bincount(self.sources, minlength=len(self.before))
            self.block += 1
            self.sources = self.order.block_sources(self.block)
        if self.ordinals_block != block:
            self.ordinals, self.ordinals_block = np.empty(BLOCK, dtype=np.int64), block
            for source in range(len(self.before)):
                chosen = self.sources == source
                self.ordinals[chosen] = np.arange(int(chosen.sum()))
        source = int(self.sources[offset])
        return source, self.order.window(source, int(self.before[source] + self.ordinals[offset]))


def windows_in(split_dir: Path, block_size: int) -> int:
    """How many windows of `block_size` tokens litdata's TokensLoader cuts a prepared split into (per chunk)."""
    chunks = json.loads((split_dir / "index.json").read_text())["chunks"]
    return sum(int(chunk["dim"]) // block_size for chunk in chunks)


class GlobalBatches(IterableDataset):
    """One rank's micro-batches of the global order from global position `start`, `len()` per epoch: the
    dataset of a `DataLoader(batch_size=None)`. Each worker process keeps its own copy and counts the epochs."""

    def __init__(
        self, split_dirs: list[Path], weights: list[float], seed: int, block_size: int, batch_size: int,
        rank: int, world_size: int, start: int,
    ) -> None:  # fmt: skip
        self.split_dirs, self.block_size, self.batch_size = split_dirs, block_size, batch_size
        self.rank, self.world_size, self.start = rank, world_size, start
        self.order = GlobalOrder([windows_in(path, block_size) for path in split_dirs], weights, seed)
        self.epochs = 0
        self.cursor: Cursor | None = None  # per worker process, moving forward over the epochs
        self.datasets = None

    def __len__(self) -> int:
        return sum(self.order.windows) // (self.world_size * self.batch_size)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.world_size * self.batch_size
        first = self.start + self.epochs * len(self) * step + self.rank * self.batch_size
        self.epochs += 1
        self.cursor = self.cursor or Cursor(self.order)
        for batch in range(worker, len(self), workers):
            begin = first + batch * step
            positions = range(begin, begin + self.batch_size)
            yield torch.stack([self.read(*self.cursor.item(position)) for position in positions])

    def read(self, source: int, window: int) -> torch.Tensor:
        if self.datasets is None:  # opened in the process that reads: litdata's readers hold open files
            from litdata.streaming import StreamingDataset

            self.datasets = [StreamingDataset(str(path), item_loader=TokensLoader(block_size=self.block_size))
                             for path in self.split_dirs]  # fmt: skip
        return self.datasets[source][window]


class GlobalOrderLoader(DataLoader):
    """The train loader of `GlobalBatches`. LitGPT saves the loader's state in every checkpoint and loads it on
    resume; the position a resumed run starts from is the checkpoint's tokens trained (the dataset's `start`), so
    the state records what the order was made of, and loading it (or litdata's state, from before) changes
    nothing."""

    def state_dict(self) -> dict[str, Any]:
        order = self.dataset.order
        return {"global_order": {"windows": order.windows, "seed": order.seed, "start": self.dataset.start}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
