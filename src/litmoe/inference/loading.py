"""A checkpoint directory to a model and its tokenizer, for generate, evaluate and export.

Takes a final/ or step-*/ directory, or a training output directory (its newest checkpoint); a DeepSpeed
checkpoint is read through its consolidated copy (litmoe.distributed.zero_checkpoints). The model is built
with litmoe's MoE layer, so stock LitGPT checkpoints load too. An adapter fine-tune (LitGPT saves the adapter's
weights alone) is its base weights with the adapter's, in LitGPT's adapter model.
"""

from pathlib import Path

import torch

from litmoe.core.checkpoint_io import (
    CHECKPOINT_FILES,
    is_complete,
    is_zero_checkpoint,
    latest_checkpoint,
    load_model_weights,
    run_settings,
)
from litmoe.core.errors import UserError
from litmoe.data.tokenizer import load_tokenizer, tokenizer_vocab_size
from litmoe.distributed.zero_checkpoints import consolidated
from litmoe.model.builder import build_model, has_expert_bias
from litmoe.model.configs import checkpoint_model_config

ADAPTER_WEIGHTS = "lit_model.pth.adapter"  # what LitGPT's finetune_adapter saves: the adapter's weights alone


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
    if missing == ["lit_model.pth"] and (path / "lit_model.pth.lora").is_file():
        raise UserError(
            f"{path}: LoRA weights that were never merged (LitGPT's merge fails on an unconverted pretraining"
            " checkpoint); run `litgpt convert_pretrained_checkpoint BASE CONVERTED`, then `litgpt merge_lora"
            f" {path} --pretrained_checkpoint_dir CONVERTED`"
        )
    if missing == ["lit_model.pth"] and adapter_base(path) is not None:
        return path
    if missing:
        raise UserError(
            f"{path}: not a complete checkpoint (missing {', '.join(missing)}); pass a final/ or step-*/ dir"
            " written by run_train.py"
        )
    return consolidated(path) if is_zero_checkpoint(path / "lit_model.pth") else path


def load_model(checkpoint_dir: Path, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer) from a checkpoint dir, built with litmoe's MoE layer (reads stock checkpoints too)."""
    config = checkpoint_model_config(checkpoint_dir)
    tokenizer = load_tokenizer(checkpoint_dir)
    vocab = tokenizer_vocab_size(tokenizer)
    if vocab > config.padded_vocab_size:
        raise UserError(
            f"{checkpoint_dir}: the tokenizer has {vocab:,} tokens but the model only {config.padded_vocab_size:,}"
            " embeddings; use the tokenizer the model was trained with"
        )
    base = adapter_base(checkpoint_dir)
    if base is None:
        weights = load_model_weights(checkpoint_dir / "lit_model.pth")
    else:
        weights = load_model_weights(base / "lit_model.pth") | load_model_weights(checkpoint_dir / ADAPTER_WEIGHTS)
    check_weights_match(checkpoint_dir, weights, adapter=base is not None)
    model = build_model(checkpoint_dir, has_expert_bias(weights), adapter=base is not None)
    model.load_state_dict(weights)
    model = model.to(device=device, dtype=dtype).eval()
    return model, tokenizer


def adapter_base(checkpoint_dir: Path) -> Path | None:
    """For an adapter fine-tune's folder, the folder of the weights it adapts: the folder beside it named as its
    hyperparameters.yaml records (finetune.py's OUT_DIR/base, found also when the output moved whole), else the
    recorded path itself. None for any other folder."""
    if (checkpoint_dir / "lit_model.pth").exists() or not (checkpoint_dir / ADAPTER_WEIGHTS).is_file():
        return None
    recorded = run_settings(checkpoint_dir).get("checkpoint_dir")
    if not isinstance(recorded, str):
        raise UserError(
            f"{checkpoint_dir}: adapter weights without the record of the model they adapt (hyperparameters.yaml's"
            " checkpoint_dir); pass the final/ folder finetune.py wrote, with its hyperparameters.yaml"
        )
    moved = checkpoint_dir.parent / Path(recorded).name
    base = next((folder for folder in (moved, Path(recorded)) if (folder / "lit_model.pth").is_file()), None)
    if base is None:
        raise UserError(
            f"{checkpoint_dir}: the adapter's base weights are neither in {moved} nor in {recorded}"
            " (hyperparameters.yaml's checkpoint_dir); keep finetune.py's base/ folder beside final/"
        )
    return base


def check_weights_match(checkpoint_dir: Path, weights: dict[str, torch.Tensor], adapter: bool = False) -> None:
    """The weights are the ones the checkpoint's model_config.yaml builds: the same names and shapes (a config
    edited or copied from another model would otherwise load with errors, or export a model without some of them)."""
    with torch.device("meta"):
        model = build_model(checkpoint_dir, has_expert_bias(weights), adapter)
    built = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    saved = {name: tuple(tensor.shape) for name, tensor in weights.items()}
    if built == saved:
        return
    differences = [f"{name} only in the weights" for name in sorted(set(saved) - set(built))]
    differences += [f"{name} only in the config" for name in sorted(set(built) - set(saved))]
    differences += [f"{name} {saved[name]} vs {built[name]}" for name in sorted(set(saved) & set(built))
                    if saved[name] != built[name]]  # fmt: skip
    raise UserError(
        f"{checkpoint_dir}: the weights do not match its model_config.yaml ({len(differences)} differences, e.g."
        f" {differences[0]}); use the config the checkpoint was written with"
    )
