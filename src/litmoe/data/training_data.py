"""What a training run reads: one prepared directory, or a weighted mixture of several.

Training reads the windows in one global order (litmoe.data.global_order): each position's source drawn by
weight (`--data_dir a:0.7,b:0.3`, or a `data_dir:` list of `{path, weight}` in the train config), each source's
windows reshuffled every epoch, and each rank reading its share of each step. A run's data position is the
number of samples all ranks consumed, which a checkpoint records, so `--resume` continues exactly where it stopped
on any number of ranks and loader workers. Validation streams each split with litdata, in order. A mixture's
sources must share one tokenizer; the model's vocabulary follows it.

The loader's worker processes persist across epochs: LitGPT's CycleIterator starts each epoch with a new
`iter(loader)`, which otherwise forks the workers anew (300 ms for the first batch of an epoch against 2-4 ms, on
the CPU). Each worker's copy of the dataset counts its own epochs, so every epoch is still reshuffled. `close()`
stops them when the run ends.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from litgpt.data import DataModule

from litmoe.core.errors import UserError
from litmoe.data.files import data_kind
from litmoe.data.global_order import GlobalBatches, GlobalOrderLoader, TokensLoader
from litmoe.data.prepare import prepare
from litmoe.data.prepared import MANIFEST, SPLITS, Manifest, check_chunks, read_manifest


@dataclass(frozen=True)
class DataSource:
    path: Path
    weight: float = 1.0


def data_sources(data_dir: str | Path | list) -> list[DataSource]:
    """`data/a`, `data/a:0.7,data/b:0.3`, or a list of paths or `{path, weight}` mappings. A path that exists is
    that path, even with a colon or comma in its name (`data/run:2`)."""
    if isinstance(data_dir, list):
        sources = [source_from(item, data_dir) for item in data_dir]
    elif Path(str(data_dir)).exists() or not str(data_dir).strip():
        sources = [DataSource(Path(str(data_dir)))]
    else:
        sources = [source_from(part.strip(), data_dir) for part in str(data_dir).split(",")]
    check_sources(sources, data_dir)
    return sources


def source_from(item: Any, data_dir: str | Path | list) -> DataSource:
    """One `DIR`, `DIR:WEIGHT` or `{path, weight}` of `--data_dir`; a bad one is named as the user wrote it."""
    where = f"--data_dir {shown(data_dir)}"
    if isinstance(item, dict) and "path" in item and set(item) <= {"path", "weight"}:
        path, weight = str(item["path"]), item.get("weight", 1.0)
    elif isinstance(item, str | Path):
        path, weight = str(item), 1.0
        if ":" in path and not Path(path).exists():
            path, _, weight = path.rpartition(":")
    else:
        raise UserError(f"{where}: entry {item!r}: give a path, or a mapping with path and weight")
    if not path.strip():
        raise UserError(f"{where}: an empty entry (a stray comma?); write DIR or DIR:WEIGHT,DIR:WEIGHT")
    try:
        if isinstance(weight, bool):  # YAML's `weight: true`
            raise TypeError
        weight = float(weight)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {weight!r} is not a weight; write DIR:WEIGHT,DIR:WEIGHT (a:0.7,b:0.3)") from None
    if not math.isfinite(weight) or weight <= 0:
        raise UserError(f"{where}: weight {weight:g} of {path}: weights must be positive numbers")
    return DataSource(Path(path), weight)


def shown(data_dir: str | Path | list) -> str:
    """`--data_dir` as the user wrote it: a path or `DIR:WEIGHT,...`; a config list as `[a, b]`."""
    if isinstance(data_dir, list):
        return "[" + ", ".join(str(item.get("path") if isinstance(item, dict) else item) for item in data_dir) + "]"
    return str(data_dir)


def check_sources(sources: list[DataSource], data_dir: str | Path | list) -> None:
    if not sources or any(not str(source.path).strip() for source in sources):
        raise UserError(f"--data_dir {shown(data_dir)!r}: give one or more prepared data directories")
    if not math.isfinite(sum(source.weight for source in sources)):
        raise UserError(f"--data_dir {shown(data_dir)}: the weights add up past a float's range; give proportions")
    paths = [source.path.resolve() for source in sources]
    if len(set(paths)) != len(paths):
        raise UserError(f"--data_dir {shown(data_dir)}: a directory appears twice; give each source once")


def describe_sources(sources: list[DataSource]) -> str:
    if len(sources) == 1:
        return str(sources[0].path)
    total = sum(source.weight for source in sources)
    return ", ".join(f"{source.path} ({source.weight / total:.0%})" for source in sources)


def sources_key(data_dir: str | list) -> str:
    """The data a run reads, comparable across runs (resolved paths and normalised weights)."""
    sources = data_sources(data_dir)
    total = sum(source.weight for source in sources)
    return ",".join(f"{source.path.resolve()}:{source.weight / total:.6g}" for source in sources)


@dataclass
class PreparedData(DataModule):
    """Prepared directories (litmoe.data.prepare) as a LitGPT data module; several are sampled by weight. Training
    starts at global position `start` (samples consumed before, by all ranks)."""

    sources: list[DataSource]
    num_workers: int = 2
    seed: int = 42
    start: int = 0
    batch_size: int = field(init=False, repr=False, default=1)
    seq_length: int = field(init=False, repr=False, default=2048)
    loaders: list = field(init=False, repr=False, default_factory=list)

    def connect(self, tokenizer=None, batch_size: int = 1, max_seq_length: int | None = None) -> None:
        self.batch_size = batch_size
        self.seq_length = max_seq_length + 1  # each window also holds the next token of its last position

    def train_dataloader(self):
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        batches = GlobalBatches([source.path / "train" for source in self.sources],
                                [source.weight for source in self.sources], self.seed, self.seq_length,
                                self.batch_size, rank, world_size, self.start)  # fmt: skip
        loader = GlobalOrderLoader(batches, batch_size=None, num_workers=self.num_workers, pin_memory=True,
                            persistent_workers=self.num_workers > 0)  # fmt: skip
        self.loaders.append(loader)
        return loader

    def val_dataloader(self):
        from litdata.streaming import CombinedStreamingDataset, StreamingDataLoader, StreamingDataset

        datasets = [StreamingDataset(str(source.path / "val"), item_loader=TokensLoader(block_size=self.seq_length))
                    for source in self.sources]  # fmt: skip
        dataset = datasets[0]
        if len(datasets) > 1:
            weights = [source.weight for source in self.sources]
            dataset = CombinedStreamingDataset(datasets, seed=self.seed, weights=weights, iterate_over_all=False)
        loader = StreamingDataLoader(dataset, batch_size=self.batch_size, pin_memory=True,
                                     num_workers=self.num_workers, drop_last=True,
                                     persistent_workers=self.num_workers > 0)  # fmt: skip
        self.loaders.append(loader)
        return loader

    def close(self) -> None:
        """Stop the loaders' persistent workers, which would otherwise outlive the run in the calling process."""
        for loader in self.loaders:
            if loader._iterator is not None:  # PyTorch's DataLoader has no public way to end persistent workers
                loader._iterator._shutdown_workers()
                loader._iterator = None
        self.loaders.clear()


@dataclass(frozen=True)
class TrainingData:
    """The prepared data a run reads, checked: its sources, their tokens per split, and their one tokenizer."""

    sources: list[DataSource]
    tokens: dict[str, int]
    tokenizer_dir: Path


def training_data(data_dir: str | list, micro_batch_size: int, seq_len: int, default_dir: Path) -> TrainingData:
    """`--data_dir` checked: every source prepared (the default corpus is prepared on first use), each split of
    each source holding at least one micro-batch, one tokenizer for all."""
    sources = data_sources(data_dir)
    manifests = []
    for source in sources:
        chunk_tokens = check_chunks(ensure_prepared(source.path, default_dir))
        manifests.append(check_data_size(source.path, micro_batch_size, seq_len, chunk_tokens))
    check_one_tokenizer(sources, manifests)
    tokens = {split: sum(manifest.tokens[split] for manifest in manifests) for split in SPLITS}
    return TrainingData(sources, tokens, sources[0].path / "tokenizer")


def ensure_prepared(data_dir: Path, default_dir: Path) -> Path:
    if (data_dir / MANIFEST).is_file():
        return data_dir
    if data_dir == default_dir:
        print(f"No prepared data in {data_dir}: preparing the default corpus (Python's own documentation) ...")
        prepare(out_dir=data_dir)
        return data_dir
    if holds_raw_data(data_dir):  # the user's own text: prepared data goes next to it, never into it
        target = Path("data") / data_dir.name.split(".")[0]
        raise UserError(
            f"--data_dir {data_dir}: this is text, not prepared data; prepare it once with `uv run python"
            f" prepare_data.py --source {data_dir} --out_dir {target}`, then train with --data_dir {target}"
        )
    raise UserError(
        f"{data_dir / MANIFEST} not found: prepare the data first with"
        f" `python prepare_data.py --source YOUR_TEXT --out_dir {data_dir}`"
    )


def holds_raw_data(path: Path) -> bool:
    """Whether `path` is a data file prepare_data.py reads, or a folder with such files at its top."""
    if path.is_file():
        return data_kind(path) is not None
    return path.is_dir() and any(data_kind(child) is not None for child in path.iterdir() if child.is_file())


def check_one_tokenizer(sources: list[DataSource], manifests: list[Manifest]) -> None:
    """A mixture's token ids must mean the same things in every source."""
    for source, manifest in zip(sources[1:], manifests[1:], strict=True):
        if manifest.tokenizer_fingerprint != manifests[0].tokenizer_fingerprint:
            raise UserError(
                f"--data_dir: {source.path} was prepared with another tokenizer than {sources[0].path}; prepare it"
                f" again with --tokenizer_dir {sources[0].path / 'tokenizer'}"
            )


def check_data_size(
    data_dir: Path, micro_batch_size: int, seq_len: int, chunk_tokens: dict[str, list[int]]
) -> Manifest:
    """The data's manifest, once each split is known to hold at least one micro-batch (`chunk_tokens`: each
    split's tokens per litdata chunk, from `check_chunks`)."""
    manifest = read_manifest(data_dir)
    needed = micro_batch_size * (seq_len + 1)
    for split in SPLITS:
        if manifest.tokens[split] < needed:
            raise UserError(
                f"{data_dir / MANIFEST}: the {split} split has {manifest.tokens[split]:,} tokens, fewer than one"
                f" micro-batch ({micro_batch_size} x {seq_len + 1}); lower --train.micro_batch_size or"
                " --train.max_seq_length, or prepare more data"
            )
        chunks = chunk_tokens[split]
        if chunks and sum(tokens // (seq_len + 1) for tokens in chunks) < micro_batch_size:  # windows within chunks
            raise UserError(
                f"{data_dir / split}: its {len(chunks)} chunks hold at most {max(chunks, default=0):,} tokens each,"
                f" too few for one micro-batch of {micro_batch_size} windows of {seq_len + 1} tokens (windows do not"
                " span chunks, and each source file becomes chunks of its own); lower --train.max_seq_length, or"
                " prepare the data from fewer, larger files"
            )
    return manifest
