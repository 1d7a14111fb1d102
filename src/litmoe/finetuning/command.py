"""finetune.py: LitGPT's own fine-tuning with litmoe's MoE layer, on a checkpoint run_train.py wrote, as it is.

    uv run python finetune.py lora out/moe-200m/final --data JSON --data.json_path data.json --out_dir out/lora

MODE is full, lora or adapter: `litgpt finetune_full`, `finetune_lora` or `finetune_adapter`, their loops, data
modules and flags (`finetune.py MODE --help` lists them). Around LitGPT's setup:
- the checkpoint is taken as run_train.py wrote it (a step-*/ or final/ folder, or a run folder for its newest):
  its weights alone go into OUT_DIR/base/ with its configs (LitGPT's LoRA merge reads bare weights; DeepSpeed's
  shards are consolidated first), and LitGPT starts from there;
- every MoE block is litmoe's layer (with LoRA: `LoRAMoELayer`), routing as the checkpoint was trained (its
  selection bias kept, frozen) with the balancing losses its run used, scaled by the gradient accumulation as
  LitGPT scales its loss; the routing statistics of the fine-tuning end the run in one line;
- bad input is one line before anything is written: an unknown mode, a LoRA rank below 1, a dataset that does
  not parse, an output folder that holds a finished fine-tune.
"""

import functools
import importlib
import inspect
import os
import shutil
import sys
import time
from argparse import ArgumentError
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from litmoe.core.args import MoEArgs
from litmoe.core.checkpoint_io import (
    CHECKPOINT_FILES,
    is_zero_checkpoint,
    latest_checkpoint,
    load_state,
    run_settings,
)
from litmoe.core.checksums import save_hashed, write_checksums
from litmoe.core.errors import UserError
from litmoe.core.outputs import check_output_dir
from litmoe.core.patching import swapped
from litmoe.data.tokenizer import load_tokenizer, tokenizer_vocab_size
from litmoe.finetuning.sharded import load_sharded
from litmoe.model.builder import has_expert_bias, moe_layer
from litmoe.model.configs import checkpoint_model_config
from litmoe.model.moe import MoELayer, read_routing_stats, routing_metrics, routing_summary

MODES = {"full": "litgpt.finetune.full", "lora": "litgpt.finetune.lora", "adapter": "litgpt.finetune.adapter"}
BASE = "base"  # OUT_DIR/base/: the checkpoint's weights alone, LitGPT's starting point
SOURCE = "litmoe_source.txt"  # in base/: the checkpoint it was written from


def main(argv: list[str] | None = None) -> Any:
    """`finetune.py MODE CHECKPOINT [LitGPT's flags for that mode]`."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in MODES:
        given = f"got {argv[0]!r}" if argv else "none given"
        raise UserError(
            f"finetune.py MODE CHECKPOINT [flags]: MODE is {', '.join(MODES)} ({given}); `finetune.py lora --help`"
            " lists LitGPT's flags for a mode"
        )
    mode, setup = argv[0], importlib.import_module(MODES[argv[0]]).setup
    parser = ArgumentParser(prog=f"finetune.py {mode}", description=setup.__doc__, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these flags")
    parser.add_function_arguments(setup, as_positional=True)
    try:
        parsed = parser.parse_args(argv[1:])
        if (json_path := parsed.get("data.init_args.json_path")) is not None:  # before LitGPT's JSON module sees it
            check_json_data(Path(json_path))
        given = parser.instantiate_classes(parsed)
    except (ArgumentError, ValueError) as err:
        raise UserError(f"finetune.py {mode}: {' '.join(str(err).split())}; see finetune.py {mode} --help") from None
    options = {name: given[name] for name in inspect.signature(setup).parameters}
    return run_with_litmoe(mode, setup, argv[1:], options)


def run_with_litmoe(mode: str, setup: Callable[..., Any], flags: list[str], options: dict[str, Any]) -> Any:
    """LitGPT's `setup` for `mode`, called with `options` (every parameter), on the checkpoint's base weights with
    litmoe's layer. The command line stays the user's (on several devices Lightning starts the other ranks with
    it); LitGPT records its hyperparameters by parsing the command line again, and there it sees `flags` with the
    base folder for the checkpoint, which is what a later `litgpt merge_lora` must read."""
    given = str(options["checkpoint_dir"])
    checkpoint = checkpoint_folder(Path(given))
    out_dir = check_output_dir(options["out_dir"], "--out_dir", [("CHECKPOINT", checkpoint)])
    if (out_dir / "final").exists():
        raise UserError(f"--out_dir {out_dir} already holds a fine-tune (final/); choose another --out_dir")
    check_options(mode, options, checkpoint)
    base = options["checkpoint_dir"] = write_base(checkpoint, out_dir / BASE)
    accumulation = options["train"].gradient_accumulation_iters(options["devices"], options["num_nodes"])
    layers = LayerFactory(mode, balance_of(checkpoint, base), 1 / accumulation)
    recorded = [sys.argv[0], *(str(base) if flag == given else flag for flag in flags)]
    module = sys.modules[setup.__module__]
    record = recording(module.save_hyperparameters, recorded)
    load = functools.partial(load_sharded, module.load_checkpoint)
    with (
        layers.in_place(),
        swapped(module, "save_hyperparameters", record),
        swapped(module, "load_checkpoint", load),
    ):
        result = setup(**options)
    if first_rank():
        finish(out_dir / "final", layers)
    return result


def finish(final: Path, layers: "LayerFactory") -> None:
    """Rank 0's last words: final/'s SHA256SUMS (LitGPT wrote the files: hashed after, for every later load to
    check), and the routing statistics of the fine-tuning in one line (of rank 0's batches on several devices)."""
    if final.is_dir():
        write_checksums(final)
    if routing := read_routing_stats(nn.ModuleList(layers.routed())):
        several = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        print(f"{routing_summary(routing, routing_metrics(routing))} (over the fine-tuning"
              f"{', rank 0' if several else ''})")  # fmt: skip


def recording(save_hyperparameters: Callable[..., None], argv: list[str]) -> Callable[..., None]:
    """LitGPT's `save_hyperparameters`, reading `argv` as the command line."""

    def record(*args: Any, **kwargs: Any) -> None:
        with swapped(sys, "argv", list(argv)):
            save_hyperparameters(*args, **kwargs)

    return record


def first_rank() -> bool:
    """Whether this process is rank 0 of LitGPT's run (or the only one)."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def checkpoint_folder(path: Path) -> Path:
    """The checkpoint folder `path` names: itself, or a run folder's newest checkpoint."""
    if (path / "lit_model.pth").exists():
        return path
    if path.is_dir() and (newest := latest_checkpoint(path)) is not None:
        return newest.parent
    raise UserError(f"CHECKPOINT {path}: no checkpoint there (a step-*/ or final/ folder of run_train.py, or its run)")


def check_options(mode: str, options: dict[str, Any], checkpoint: Path) -> None:
    """What LitGPT would only find after loading the model, or as a traceback: no devices, a tokenizer the model
    has too few embeddings for, a LoRA rank below 1 or
    an adapter on a model too shallow for LitGPT's adapter layers (nothing would train), a sequence length beyond
    the model's block (LitGPT's default, the longest example, may be longer: it is capped at the block), and a
    dataset that cannot be fetched."""
    for flag in ("devices", "num_nodes"):
        if isinstance(options[flag], int) and options[flag] < 1:
            raise UserError(f"--{flag} {options[flag]}: must be at least 1")
    if mode == "lora" and options["lora_r"] < 1:
        raise UserError(f"--lora_r {options['lora_r']}: LoRA's rank must be at least 1 (8 is LitGPT's default)")
    config = checkpoint_model_config(checkpoint)
    vocab = tokenizer_vocab_size(load_tokenizer(checkpoint))
    if vocab > config.padded_vocab_size:
        raise UserError(
            f"CHECKPOINT {checkpoint}: its tokenizer has {vocab:,} tokens but the model only"
            f" {config.padded_vocab_size:,} embeddings (another tokenizer's files?); use the one it was trained with"
        )
    if mode == "adapter":
        from litgpt.adapter import Config

        if config.n_layer <= Config.adapter_start_layer:
            raise UserError(
                f"finetune.py adapter: {checkpoint} has {config.n_layer} layers and LitGPT's adapter starts at layer"
                f" {Config.adapter_start_layer}, so nothing would train; use lora or full"
            )
    train = options["train"]
    if train.max_seq_length is not None and not 0 < train.max_seq_length <= config.block_size:
        raise UserError(
            f"--train.max_seq_length {train.max_seq_length}: must be between 1 and the model's block size"
            f" {config.block_size} (longer examples are cut there)"
        )
    train.max_seq_length = train.max_seq_length or config.block_size
    fetch_data(options)


def fetch_data(options: dict[str, Any]) -> None:
    """LitGPT's data module's download (its default, Alpaca, downloads), before anything is written."""
    from litgpt.data import Alpaca

    options["data"] = options["data"] if options["data"] is not None else Alpaca()
    try:
        options["data"].prepare_data()
    except OSError as err:  # requests' errors are OSErrors too
        name = type(options["data"]).__name__
        raise UserError(
            f"--data {name}: its download failed ({' '.join(str(err).split())[:160]}); check the network, or give"
            " local data: --data JSON --data.json_path FILE"
        ) from None


def check_json_data(path: Path) -> None:
    """LitGPT's JSON data module reads a .json list or a folder of train.json/val.json (or .jsonl) files."""
    import json

    files = sorted(path.glob("*.json*")) if path.is_dir() else [path]
    if not files or not all(file.is_file() for file in files):
        raise UserError(f"--data.json_path {path}: no such file (a .json or .jsonl file, or a folder of them)")
    for file in files:
        text = file.read_text(encoding="utf-8", errors="replace")
        lines = text.splitlines() if file.suffix == ".jsonl" else [text]
        records = []
        for number, line in enumerate(lines, start=1):
            try:
                records.append(json.loads(line) if line.strip() else None)
            except json.JSONDecodeError as err:
                line_number = number if file.suffix == ".jsonl" else err.lineno
                raise UserError(
                    f"--data.json_path {file}: not JSON ({err.msg}, line {line_number}); fix the file"
                ) from None
        records = [record for record in records if record is not None]
        records = records if file.suffix == ".jsonl" else records[0] if records else None
        if not isinstance(records, list) or not all(isinstance(record, dict) for record in records):
            raise UserError(f"--data.json_path {file}: expected a list of objects with instruction and output keys")


def write_base(checkpoint: Path, base: Path) -> Path:
    """`base/`: the checkpoint's weights alone (stock LitGPT keys) and its configs, made once per checkpoint. It
    appears whole (written beside it, then renamed); where a launcher starts every rank at once (torchrun, srun),
    each node's first rank writes it and the others wait for it."""
    if not (base / SOURCE).is_file() and launched_local_rank() > 0:
        wait_for(base / SOURCE)
    if (base / SOURCE).is_file():
        if (base / SOURCE).read_text().strip() == str(checkpoint.resolve()):
            return base
        raise UserError(f"{base} holds the base weights of another checkpoint; choose another --out_dir")
    weights = checkpoint / "lit_model.pth"
    if is_zero_checkpoint(weights):  # DeepSpeed's shards: their consolidated copy, made beside them once
        from litmoe.distributed.zero_checkpoints import consolidated

        weights = consolidated(checkpoint) / "lit_model.pth"
    state = load_state(weights)
    state = state.get("model", state)
    print(f"Writing the weights of {checkpoint} into {base} (LitGPT fine-tunes and merges from there) ...")
    scratch = base.with_name(f".{base.name}.partial-{os.getpid()}")
    scratch.mkdir(parents=True)
    save_hashed(state, scratch / "lit_model.pth")
    for name in CHECKPOINT_FILES[1:]:
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, scratch / name)
    write_checksums(scratch)
    (scratch / SOURCE).write_text(f"{checkpoint.resolve()}\n")
    try:
        scratch.rename(base)
    except OSError:  # another node's first rank renamed its copy first (a shared file system)
        shutil.rmtree(scratch)
        if not (base / SOURCE).is_file():
            raise
    return base


def launched_local_rank() -> int:
    """This process's rank on its node, as a launcher that starts every rank at once sets it (0 when alone)."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))


def wait_for(path: Path, timeout_seconds: float = 1800) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not path.is_file():
        if time.monotonic() > deadline:
            raise UserError(f"{path.parent}: not written by this node's first rank in {timeout_seconds:.0f} s")
        time.sleep(0.5)


def balance_of(checkpoint: Path, base: Path) -> dict[str, Any]:
    """The checkpoint run's balancing losses, and whether its experts route with a selection bias (read from the
    base weights: a DeepSpeed checkpoint's consolidated ones too)."""
    moe = run_settings(checkpoint).get("moe") or {}
    weights = torch.load(base / "lit_model.pth", map_location="cpu", mmap=True, weights_only=True)
    return {
        "balance": MoEArgs(
            aux_loss_coef=moe.get("aux_loss_coef", 0.0), z_loss_coef=moe.get("z_loss_coef", 0.0), bias_update_rate=0.0
        ),
        "expert_bias": has_expert_bias(weights),
    }


class LayerFactory:
    """Builds litmoe's layer wherever LitGPT's fine-tuning model builds an MoE block, and keeps the layers of the
    model built first, the one trained (LoRA's merge builds another), for the routing line."""

    def __init__(self, mode: str, settings: dict[str, Any], loss_scale: float) -> None:
        self.mode, self.settings, self.loss_scale = mode, settings, loss_scale
        self.trained: list[MoELayer] = []

    def layer(self, config) -> MoELayer:
        from litmoe.finetuning.lora_moe import LoRAMoELayer

        kind = LoRAMoELayer if self.mode == "lora" else MoELayer
        layer = kind(config, **self.settings)
        layer.loss_scale = self.loss_scale
        if not self.trained or layer.config is self.trained[0].config:
            self.trained.append(layer)
        return layer

    def routed(self) -> list[MoELayer]:
        """The trained model's layers: those that routed tokens (LitGPT's LoRA block builds its parent's MLP first,
        then replaces it with its own)."""
        return [layer for layer in self.trained if not layer.forwards.is_meta and layer.forwards.item() > 0]

    @contextmanager
    def in_place(self) -> Iterator[None]:
        if self.mode != "lora":
            with moe_layer(self.layer):
                yield
            return
        import litgpt.lora
        import litgpt.scripts.merge_lora

        from litmoe.finetuning.lora_moe import merge_lora_weights

        with (
            swapped(litgpt.lora, "LLaMAMoE", self.layer),
            swapped(litgpt.scripts.merge_lora, "merge_lora_weights", merge_lora_weights),
        ):
            yield
