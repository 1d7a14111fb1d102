"""DeepSpeed checkpoints in the two other forms litmoe reads them in; the shards in `lit_model.pth/` stay as
they are.

- `consolidated/`: one `lit_model.pth` with stock LitGPT keys, which generate, evaluate and export read (made on
  first use, again when the shards are newer).
- `universal/`: DeepSpeed's universal checkpoint (`ds_to_universal`), which a resume on another number of ranks
  loads: every parameter's fp32 weights and Adam moments whole, re-split by the engine for the new rank count.

DeepSpeed's own readers run with weights_only loads (litmoe.core.checkpoint_io), so a crafted shard cannot run code.
"""

import io
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from litmoe.core.checkpoint_io import CONSOLIDATED, UNIVERSAL, checkpoint_problem, weights_only_deepspeed_loads
from litmoe.core.checksums import SUMS
from litmoe.core.errors import UserError
from litmoe.model.builder import build_model, has_expert_bias


def consolidated(checkpoint_dir: Path) -> Path:
    """`checkpoint_dir/consolidated/`: the DeepSpeed shards in `lit_model.pth/` as one file, with the configs.

    Made once (again when the shards are newer); the shards stay as they are, for resuming."""
    shards, target = checkpoint_dir / "lit_model.pth", checkpoint_dir / CONSOLIDATED
    single_file = target / "lit_model.pth"
    if single_file.is_file() and single_file.stat().st_mtime_ns >= (shards / "latest").stat().st_mtime_ns:
        return target
    if (problem := checkpoint_problem(shards)) is not None:
        raise UserError(f"{shards}: {problem}")
    print(f"Consolidating the DeepSpeed checkpoint {shards} into {target} ...")
    weights = fp32_weights(shards)
    state = consolidate(shards, weights, build_model(checkpoint_dir, has_expert_bias(weights)))
    target.mkdir(exist_ok=True)
    for config_file in checkpoint_dir.iterdir():
        if config_file.is_file() and config_file.name != SUMS:  # the shards' list, not this folder's
            shutil.copy2(config_file, target / config_file.name)
    scratch = single_file.with_suffix(".partial")
    torch.save({"model": state}, scratch)
    scratch.replace(single_file)
    return target


def fp32_weights(shards: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights and persistent buffers of a DeepSpeed checkpoint, under the names the engine saw
    (stacked experts; torch.compile's `_orig_mod.` prefix removed)."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise UserError(
            f"{shards}: a DeepSpeed checkpoint; consolidating it needs DeepSpeed: `uv sync --extra deepspeed`"
        ) from None
    tag = (shards / "latest").read_text().strip()
    with weights_only_deepspeed_loads():
        weights = get_fp32_state_dict_from_zero_checkpoint(str(shards), tag=tag)
    return {name.removeprefix("_orig_mod."): tensor for name, tensor in weights.items()}


def consolidate(shards: Path, weights: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """`weights` (from `fp32_weights`) loaded into `model` by name, every parameter and buffer of both sides
    accounted for; returns the model's own state dict (stock LitGPT keys)."""
    named = dict(model.named_parameters()) | dict(model.named_buffers())
    saved = set(dict(model.named_parameters())) | {name for name in named if name in model.state_dict()}
    unused, missing = sorted(set(weights) - set(named)), sorted(saved - set(weights))
    if unused or missing:
        raise UserError(
            f"{shards}: the DeepSpeed checkpoint does not match its model_config.yaml (in the checkpoint only:"
            f" {unused[:3]}; in the model only: {missing[:3]})"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            named[name].copy_(tensor)
    return model.state_dict()


def universal(shards: Path) -> Path:
    """`shards` (a `lit_model.pth/` of DeepSpeed shards) as DeepSpeed's universal checkpoint in `universal/`
    beside it, laid out as the engine loads one (`universal/checkpoint/`, `universal/latest_universal`); made once,
    into a scratch folder renamed when complete, so that an interrupted conversion is never loaded."""
    target = shards.parent / UNIVERSAL
    if (target / "latest_universal").is_file():
        return target
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    scratch = target.with_name(f"{UNIVERSAL}.partial")
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"Converting the DeepSpeed checkpoint {shards} into a universal checkpoint in {target} ...")
    options = SimpleNamespace(
        input_folder=str(shards / "checkpoint"), output_folder=str(scratch / "checkpoint"), num_extract_workers=1,
        num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True,
    )  # fmt: skip
    with weights_only_deepspeed_loads(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        ds_to_universal(options)  # its prints and progress bars, in the run's output once per resume, are dropped
    scratch.rename(target)
    return target
