"""The base weights into a model that FSDP2 shards: LitGPT's LoRA fine-tuning on several devices.

On several devices LitGPT's `finetune_lora` shards the model with FSDP2 (Lightning's ModelParallelStrategy) and
loads the checkpoint with `load_from_full_model_state_dict`, which guesses each parameter's name from the
checkpoint's key (`.weight` becomes `.linear.weight`): stacked experts have no such name. Here the checkpoint is
read the way a one-device load reads it, into a copy of the model on the meta device (LitGPT's and litmoe's load
hooks convert the keys), and each rank copies its shard of every parameter from that copy.
"""

import copy
from itertools import chain
from pathlib import Path
from typing import Any

import torch

from litmoe.core.errors import UserError

WRAPPED = "_checkpoint_wrapped_module."  # what activation checkpointing adds to the names of a Block's weights


def load_sharded(stock_load: Any, fabric: Any, model: torch.nn.Module, checkpoint_path: Path, strict: bool = True):
    """LitGPT's `load_checkpoint`, for a model sharded by Lightning's ModelParallelStrategy; other strategies go to
    `stock_load`. Weights the checkpoint does not hold (LoRA's) keep their initial values; any other weight
    missing, or one the model does not have, is one line."""
    from lightning.fabric.strategies import ModelParallelStrategy

    if not isinstance(fabric.strategy, ModelParallelStrategy):
        return stock_load(fabric, model, checkpoint_path, strict=strict)
    module = getattr(model, "module", model)  # inside Fabric's wrapper
    full = full_weights(module, checkpoint_path)
    with torch.no_grad():
        for name, tensor in chain(module.named_parameters(), module.named_buffers()):
            source = full[name.replace(WRAPPED, "")]
            if source.is_meta:  # not in the checkpoint (LoRA's weights, caches): as initialized
                continue
            source = source.to(device=tensor.device, dtype=tensor.dtype)
            if hasattr(tensor, "device_mesh"):  # a DTensor: this rank's shard of it
                from torch.distributed.tensor import distribute_tensor

                source = distribute_tensor(source, tensor.device_mesh, tensor.placements)
            tensor.copy_(source)
    return None


def full_weights(module: torch.nn.Module, checkpoint_path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the names `module`'s own parameters and buffers have (stacked experts,
    LoRA's `.linear.`), read into a copy of `module` built on the meta device."""
    state = torch.load(checkpoint_path, map_location="cpu", mmap=True, weights_only=True)
    state = state.get("model", state)
    with torch.device("meta"):
        # a copy of the config: the layer factory keeps the layers of the trained model's config only
        reference = type(module)(copy.copy(module.config))
    keys = reference.load_state_dict(state, strict=False, assign=True)
    missing = [key for key in keys.missing_keys if "lora_" not in key]
    if missing or keys.unexpected_keys:
        example = (missing or keys.unexpected_keys)[0]
        raise UserError(
            f"{checkpoint_path}: its weights do not fit the model ({len(missing)} missing and"
            f" {len(keys.unexpected_keys)} unexpected, e.g. {example}); fine-tune the checkpoint they were written from"
        )
    return dict(chain(reference.named_parameters(), reference.named_buffers()))
