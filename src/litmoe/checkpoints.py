"""Finding and loading the checkpoints run_train.py writes, with one-line errors for what can go wrong."""

from pathlib import Path

import torch

from litmoe.errors import UserError

CHECKPOINT_FILES = ("lit_model.pth", "model_config.yaml", "tokenizer.json", "tokenizer_config.json")


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest full training checkpoint (step-*/ or final/) in out_dir."""
    candidates = [*out_dir.glob("step-*/lit_model.pth"), *out_dir.glob("final/lit_model.pth")]
    return max(candidates, key=lambda path: path.stat().st_mtime_ns, default=None)


def resolve_checkpoint_dir(path: Path) -> Path:
    """A checkpoint directory (final/, step-*/) or a training output dir (its newest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint directory")
    if path.is_file():
        path = path.parent
    if not (path / "lit_model.pth").exists() and (newest := latest_checkpoint(path)) is not None:
        path = newest.parent
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    if missing:
        raise UserError(
            f"{path}: not a complete checkpoint (missing {', '.join(missing)}); pass a final/ or step-*/ dir"
            " written by run_train.py"
        )
    return path


def tokenizer_vocab_size(tokenizer) -> int:
    """Every id the tokenizer can produce, added special tokens included."""
    if tokenizer.backend == "huggingface":
        return tokenizer.processor.get_vocab_size(with_added_tokens=True)
    return tokenizer.vocab_size


def load_model(checkpoint_dir: Path, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer) from a checkpoint dir, built with litmoe's MoE layer (reads stock checkpoints too)."""
    import litgpt.model
    from litgpt import GPT, Config, Tokenizer

    from litmoe.moe import MoELayer
    from litmoe.patches import swapped

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
    with swapped(litgpt.model, "LLaMAMoE", MoELayer):
        model = GPT(config)
    model.load_state_dict(state.get("model", state))
    model = model.to(device=device, dtype=dtype).eval()
    return model, tokenizer
