"""Finding and loading the checkpoints run_train.py writes, with one-line errors for what can go wrong.

A checkpoint is a step-*/ or final/ directory holding `lit_model.pth` and the model and tokenizer configs.
Under DeepSpeed, `lit_model.pth` is itself a directory of shards; generate, evaluate and export read it
through a consolidated copy, `consolidated/` next to it, made on first use.
"""

import shutil
from pathlib import Path

import torch

from litmoe.errors import UserError

CHECKPOINT_FILES = ("lit_model.pth", "model_config.yaml", "tokenizer.json", "tokenizer_config.json")


CONSOLIDATED = "consolidated"


def is_zero_checkpoint(path: Path) -> bool:
    """A DeepSpeed checkpoint directory as `fabric.save` writes it (`latest` names the tag, written last)."""
    return Path(path).is_dir() and (Path(path) / "latest").is_file()


def is_complete(weights: Path) -> bool:
    return weights.is_file() or is_zero_checkpoint(weights)


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete training checkpoint (step-*/ or final/) in out_dir: its lit_model.pth."""
    candidates = [*out_dir.glob("step-*/lit_model.pth"), *out_dir.glob("final/lit_model.pth")]
    candidates = [path for path in candidates if is_complete(path)]
    return max(candidates, key=lambda path: path.stat().st_mtime_ns, default=None)


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
    weights = target / "lit_model.pth"
    if weights.is_file() and weights.stat().st_mtime_ns >= (shards / "latest").stat().st_mtime_ns:
        return target
    from litmoe.zero import consolidate

    print(f"Consolidating the DeepSpeed checkpoint {shards} into {target} ...")
    state = consolidate(shards, build_model(checkpoint_dir))
    target.mkdir(exist_ok=True)
    for config_file in checkpoint_dir.iterdir():
        if config_file.is_file():
            shutil.copy2(config_file, target / config_file.name)
    partial = weights.with_suffix(".partial")
    torch.save({"model": state}, partial)
    partial.replace(weights)
    return target


def build_model(checkpoint_dir: Path):
    """The checkpoint's model on the CPU, in fp32, built with litmoe's MoE layer."""
    import litgpt.model
    from litgpt import GPT, Config

    from litmoe.moe import MoELayer
    from litmoe.patches import swapped

    with swapped(litgpt.model, "LLaMAMoE", MoELayer):
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
    try:
        state = torch.load(checkpoint_dir / "lit_model.pth", map_location="cpu", weights_only=False, mmap=True)
    except (RuntimeError, EOFError, OSError) as err:
        raise UserError(f"{checkpoint_dir / 'lit_model.pth'}: incomplete or corrupt ({err})") from err
    model = build_model(checkpoint_dir)
    model.load_state_dict(state.get("model", state))
    model = model.to(device=device, dtype=dtype).eval()
    return model, tokenizer
