"""Finding the checkpoints run_train.py writes and loading them safely, with one-line errors for what can go wrong.

A checkpoint is a step-*/ or final/ directory holding `lit_model.pth` and the model and tokenizer configs.
Under DeepSpeed, `lit_model.pth` is itself a directory of shards (litmoe.distributed.zero_checkpoints turns
it into one file). Every load here is weights_only: a crafted file cannot run code.
"""

import importlib
import pickle
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

from litmoe.core.checksums import checksum_problem, verify_line
from litmoe.core.errors import EXIT_CORRUPT, RunStopped, UserError
from litmoe.core.patching import swapped

CHECKPOINT_FILES = ("lit_model.pth", "model_config.yaml", "tokenizer.json", "tokenizer_config.json")
CONSOLIDATED = "consolidated"
UNIVERSAL = "universal"  # DeepSpeed's universal checkpoint of a step's shards
EXPERT_BIAS_KEY = "mlp.expert_bias"  # litmoe's selection bias for a softmax router (litmoe.model.moe)
# The only classes DeepSpeed pickles into its shards besides tensors and plain values.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",  # ZeRO-1/2's map of each rank's slice (two integers)
)


def is_zero_checkpoint(path: Path) -> bool:
    """A DeepSpeed checkpoint directory as `fabric.save` writes it (`latest` names the tag, written last)."""
    return Path(path).is_dir() and (Path(path) / "latest").is_file()


def is_complete(weights: Path) -> bool:
    return weights.is_file() or is_zero_checkpoint(weights)


def run_settings(checkpoint_dir: Path) -> dict[str, Any]:
    """The settings the run that wrote a checkpoint recorded (its hyperparameters.yaml; empty when missing or
    unreadable)."""
    path = Path(checkpoint_dir) / "hyperparameters.yaml"
    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return {}
    return settings if isinstance(settings, dict) else {}


def read_progress(checkpoint_dir: Path) -> dict[str, Any] | None:
    """What a checkpoint had trained when it was written (None for checkpoints without the record)."""
    return run_settings(checkpoint_dir).get("progress")


def checkpoint_step(weights: Path) -> int:
    """The optimizer step a checkpoint (its lit_model.pth) was written at: as its run recorded it, else as its name
    says (step-00000010); a final/ without a record counts as the last."""
    progress = read_progress(weights.parent)
    if isinstance(progress, dict) and isinstance(progress.get("step_count"), int):
        return progress["step_count"]
    number = weights.parent.name.removeprefix("step-")
    return int(number) if weights.parent.name.startswith("step-") and number.isdigit() else sys.maxsize


def checkpoints_newest_first(out_dir: Path) -> list[Path]:
    """The complete training checkpoints (step-*/ or final/) in out_dir, newest first: their lit_model.pth. Newest
    is the highest step the run recorded (final/ before a step-*/ of the same step), never the newest file time,
    which a plain `cp -r` of a run sets to the order of the copy."""
    candidates = [*out_dir.glob("step-*/lit_model.pth"), *out_dir.glob("final/lit_model.pth")]
    candidates = [path for path in candidates if is_complete(path)]
    return sorted(candidates, key=lambda path: (checkpoint_step(path), path.parent.name == "final"), reverse=True)


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete training checkpoint (step-*/ or final/) in out_dir: its lit_model.pth."""
    return next(iter(checkpoints_newest_first(out_dir)), None)


def latest_sound_checkpoint(out_dir: Path) -> Path | None:
    """The newest checkpoint in out_dir that loads safely; each newer one that does not is reported and skipped."""
    for weights in checkpoints_newest_first(out_dir):
        if (problem := checkpoint_problem(weights)) is None:
            return weights
        print(f"Skipping {weights.parent}: {problem}")
    return None


def checkpoint_problem(weights: Path) -> str | None:
    """Why `lit_model.pth` (a file, or DeepSpeed's shard directory) cannot be loaded safely, found without reading
    its tensors: truncated or corrupt, pickling objects that loading would construct (code a crafted file runs),
    or bytes that no longer match the folder's SHA256SUMS. None when it is sound."""
    weights = Path(weights)
    if is_zero_checkpoint(weights) and (problem := zero_tag_problem(weights)) is not None:
        return problem
    files, allowed = (
        ([weights], set()) if weights.is_file() else (sorted(weights.rglob("*.pt")), set(DEEPSPEED_GLOBALS))
    )
    if not files:
        return "no checkpoint file"
    for path in files:
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - allowed
        except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as err:
            return f"{path.name} is incomplete or corrupt ({first_line(err)})"
        if unsafe:
            return (
                f"{path.name} is refused: loading it would construct {', '.join(sorted(unsafe)[:2])}, which a crafted"
                " file uses to run code; load only checkpoints that run_train.py or LitGPT wrote"
            )
    return checksum_problem(weights.parent, only=weights.name)


def zero_tag_problem(shards: Path) -> str | None:
    """A DeepSpeed checkpoint's `latest` must name a folder of its own (DeepSpeed would follow `../..` anywhere)."""
    try:
        tag = (shards / "latest").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        return f"its latest file cannot be read ({first_line(err)})"
    if not tag or tag in (".", "..") or "/" in tag or "\\" in tag or not (shards / tag).is_dir():
        return f"its latest file names {tag[:60]!r}, not a folder inside {shards.name}/; the checkpoint is damaged"
    return None


def first_line(err: BaseException, limit: int = 160) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:limit]


def checkpoint_dir_of(path: Path) -> Path:
    """A checkpoint directory, given as itself or as its lit_model.pth file."""
    path = Path(path)
    return path.parent if path.name == "lit_model.pth" and path.is_file() else path


def load_state(weights: Path) -> dict:
    """The contents of a `lit_model.pth` file, loaded with weights_only (no code in it can run); problems are
    one-line errors."""
    if (problem := checkpoint_problem(weights)) is not None:
        raise UserError(f"{weights}: {problem}")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
        raise UserError(f"{weights}: incomplete or corrupt ({first_line(err)})") from None
    if not isinstance(state, dict):
        raise UserError(f"{weights}: not a LitGPT checkpoint (expected a dict of weights or with a 'model' entry)")
    return state


def load_model_weights(weights: Path) -> dict[str, torch.Tensor]:
    """The model's weights in a `lit_model.pth` (its 'model' entry, or the whole file for a plain state dict): names
    to finite floating-point tensors, or one line saying what is wrong, before anything is built or written."""
    state = load_state(weights)
    model = state.get("model", state)
    if not isinstance(model, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in model.items()):
        raise UserError(f"{weights}: not a LitGPT checkpoint (its weights must map parameter names to tensors)")
    if name := next((name for name, tensor in model.items() if not tensor.is_floating_point()), None):
        raise UserError(
            f"{weights}: {name} holds {model[name].dtype} values, not floating-point weights; this is not a model"
            " checkpoint, or it was converted wrongly"
        )
    if name := next((name for name, tensor in model.items() if not torch.isfinite(tensor).all()), None):
        raise UserError(
            f"{weights}: {name} holds NaN or infinite values (a diverged or damaged checkpoint); use an earlier"
            " step-*/ checkpoint"
        )
    return model


@contextmanager
def weights_only_deepspeed_loads() -> Iterator[None]:
    """DeepSpeed loads its shards with `weights_only=False`; within this scope it loads them with weights_only,
    allowing the few DeepSpeed classes its shards hold, so that a crafted shard cannot run code."""
    allowed = []
    for name in DEEPSPEED_GLOBALS:
        module, _, attribute = name.rpartition(".")
        allowed.append(getattr(importlib.import_module(module), attribute))
    stock_load = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return stock_load(*args, **kwargs)

    with swapped(torch, "load", load):
        yield


def verify(paths: list[Path]) -> None:
    """`--verify`: each checkpoint folder in `paths` (a run's folder: all its checkpoints; prepared data: its files)
    checked whole against its SHA256SUMS, and checkpoints for what would stop them loading, one line each, without
    loading a model. Raises RunStopped (exit status EXIT_CORRUPT) when one fails."""
    lines, failed = [], 0
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise UserError(f"--verify {path}: no such folder")
        if (path / "lit_model.pth").exists():
            folders = [path]
        else:
            folders = [weights.parent for weights in reversed(checkpoints_newest_first(path))] or [path]
        for folder in folders:
            weights = folder / "lit_model.pth"
            checkpoint = weights.exists()
            problem = (checkpoint_problem(weights) if checkpoint else None) or checksum_problem(folder)
            lines.append(verify_line(folder, problem, checkpoint))
            failed += problem is not None
    print("\n".join(lines))
    if failed:
        raise RunStopped(f"error: --verify: {failed} of {len(lines)} checked folders failed (see above)", EXIT_CORRUPT)
