"""Finding and loading the checkpoints run_train.py writes, with one-line errors for what can go wrong.

A checkpoint is a step-*/ or final/ directory holding `lit_model.pth` and the model and tokenizer configs.
Under DeepSpeed, `lit_model.pth` is itself a directory of shards; generate, evaluate and export read it
through a consolidated copy, `consolidated/` next to it, made on first use.
"""

import pickle
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

from litmoe.errors import UserError

CHECKPOINT_FILES = ("lit_model.pth", "model_config.yaml", "tokenizer.json", "tokenizer_config.json")
CONSOLIDATED = "consolidated"
EXPERT_BIAS_KEY = "mlp.expert_bias"  # litmoe's selection bias for a softmax router (litmoe.moe)
# The only classes DeepSpeed pickles into its shards besides tensors and plain values.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
)


def is_zero_checkpoint(path: Path) -> bool:
    """A DeepSpeed checkpoint directory as `fabric.save` writes it (`latest` names the tag, written last)."""
    return Path(path).is_dir() and (Path(path) / "latest").is_file()


def is_complete(weights: Path) -> bool:
    return weights.is_file() or is_zero_checkpoint(weights)


def checkpoints_newest_first(out_dir: Path) -> list[Path]:
    """The complete training checkpoints (step-*/ or final/) in out_dir, newest first: their lit_model.pth."""
    candidates = [*out_dir.glob("step-*/lit_model.pth"), *out_dir.glob("final/lit_model.pth")]
    candidates = [path for path in candidates if is_complete(path)]
    return sorted(candidates, key=lambda path: path.stat().st_mtime_ns, reverse=True)


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
    its tensors: truncated or corrupt, or pickling objects that loading would construct (code a crafted file
    runs). None when it is sound."""
    weights = Path(weights)
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
    return None


def first_line(err: BaseException, limit: int = 160) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:limit]


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


@contextmanager
def weights_only_deepspeed_loads() -> Iterator[None]:
    """DeepSpeed loads its shards with `weights_only=False`; within this scope it loads them with weights_only,
    allowing the few DeepSpeed classes its shards hold, so that a crafted shard cannot run code."""
    import importlib

    from litmoe.patches import swapped

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


def resolve_checkpoint_dir(path: Path) -> Path:
    """A checkpoint directory (final/, step-*/) or a training output dir (its newest checkpoint); DeepSpeed
    shards are consolidated first."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint directory")
    if path.is_file() or (path.name == "lit_model.pth" and is_zero_checkpoint(path)):
        path = path.parent
    if not (path / "lit_model.pth").exists() and (newest := latest_checkpoint(path)) is not None:
        path = newest.parent
    missing = [name for name in CHECKPOINT_FILES if not is_complete(path / name)]
    if missing:
        raise UserError(
            f"{path}: not a complete checkpoint (missing {', '.join(missing)}); pass a final/ or step-*/ dir"
            " written by run_train.py"
        )
    return consolidated(path) if is_zero_checkpoint(path / "lit_model.pth") else path


def consolidated(checkpoint_dir: Path) -> Path:
    """`checkpoint_dir/consolidated/`: the DeepSpeed shards in `lit_model.pth/` as one file, with the configs.

    Made once (again when the shards are newer); the shards stay as they are, for resuming."""
    shards, target = checkpoint_dir / "lit_model.pth", checkpoint_dir / CONSOLIDATED
    single_file = target / "lit_model.pth"
    if single_file.is_file() and single_file.stat().st_mtime_ns >= (shards / "latest").stat().st_mtime_ns:
        return target
    from litmoe.zero import consolidate, fp32_weights

    if (problem := checkpoint_problem(shards)) is not None:
        raise UserError(f"{shards}: {problem}")
    print(f"Consolidating the DeepSpeed checkpoint {shards} into {target} ...")
    weights = fp32_weights(shards)
    state = consolidate(shards, weights, build_model(checkpoint_dir, has_expert_bias(weights)))
    target.mkdir(exist_ok=True)
    for config_file in checkpoint_dir.iterdir():
        if config_file.is_file():
            shutil.copy2(config_file, target / config_file.name)
    scratch = single_file.with_suffix(".partial")
    torch.save({"model": state}, scratch)
    scratch.replace(single_file)
    return target


def has_expert_bias(state: dict) -> bool:
    """Whether a checkpoint was trained with aux-loss-free balancing on a softmax router (`mlp.expert_bias`)."""
    return any(key.endswith(EXPERT_BIAS_KEY) for key in state)


def build_model(checkpoint_dir: Path, expert_bias: bool = False):
    """The checkpoint's model on the CPU, in fp32, built with litmoe's MoE layer (with the experts' selection
    bias when the checkpoint has one, so that it routes exactly as training did)."""
    import litgpt.model
    from litgpt import GPT, Config

    from litmoe.moe import MoELayer
    from litmoe.patches import swapped

    with swapped(litgpt.model, "LLaMAMoE", partial(MoELayer, expert_bias=expert_bias)):
        return GPT(Config.from_file(checkpoint_dir / "model_config.yaml"))


def tokenizer_vocab_size(tokenizer) -> int:
    """Every id the tokenizer can produce, added special tokens included."""
    if tokenizer.backend == "huggingface":
        return tokenizer.processor.get_vocab_size(with_added_tokens=True)
    return tokenizer.vocab_size


def load_model(checkpoint_dir: Path, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer) from a checkpoint dir, built with litmoe's MoE layer (reads stock checkpoints too)."""
    from litgpt import Config, Tokenizer

    config = Config.from_file(checkpoint_dir / "model_config.yaml")
    tokenizer = Tokenizer(checkpoint_dir)
    vocab = tokenizer_vocab_size(tokenizer)
    if vocab > config.padded_vocab_size:
        raise UserError(
            f"{checkpoint_dir}: the tokenizer has {vocab:,} tokens but the model only {config.padded_vocab_size:,}"
            " embeddings; use the tokenizer the model was trained with"
        )
    state = load_state(checkpoint_dir / "lit_model.pth")
    weights = state.get("model", state)
    model = build_model(checkpoint_dir, has_expert_bias(weights))
    model.load_state_dict(weights)
    model = model.to(device=device, dtype=dtype).eval()
    return model, tokenizer
