"""DeepSpeed ZeRO under LitGPT's unchanged pretrain loop.

Lightning's `DeepSpeedStrategy` does the sharding. What is here bridges the few places where LitGPT's loop
and DeepSpeed disagree (checked against litgpt 0.5.13, lightning 2.6 and deepspeed 0.19):

  LitGPT's loop                           DeepSpeed                                 bridge
  fabric.setup(model), then               model and optimizer set up together       `ZeroFabric.setup` builds the
    fabric.setup_optimizers(optimizer)      (setup_optimizers raises)                 optimizer from the same config
  fabric.clip_gradients(max_norm)         clips inside step() (`gradient_clipping`) config; clip_gradients is a no-op
  N x backward(loss / N), then one step   its managed accumulation wants a step()   `managed_gradient_accumulation:
                                            per micro-batch and divides by N again    false`: the caller owns it
  optimizer.step()                        Fabric steps the ZeRO optimizer; the      the engine's step()
                                            engine's step() reduces and clips
  no_backward_sync(enabled=...)           warns: unsupported                        a no-op; unmanaged backward only
                                                                                      accumulates locally anyway
  optimizer.defaults["lr"]                ZeRO optimizers have no `defaults`        the client optimizer's
  weights initialised after construction  ZeRO-3 partitions at construction         `zero3_reset_parameters`

A DeepSpeed checkpoint is a directory (`step-*/lit_model.pth/` holding `checkpoint/*_states.pt` and
`latest`); litmoe.distributed.zero_checkpoints turns one into a single `lit_model.pth` with stock LitGPT keys, and
into DeepSpeed's universal checkpoint, which a resume on another number of ranks loads (`resuming`).
"""

import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn as nn
from lightning.fabric.strategies import DeepSpeedStrategy

from litmoe.core.checkpoint_io import UNIVERSAL, read_progress, weights_only_deepspeed_loads
from litmoe.core.checksums import save_hashed
from litmoe.core.errors import UserError
from litmoe.core.patching import swapped, user_optimizer
from litmoe.core.user_files import read_json_file
from litmoe.distributed.zero_checkpoints import universal


def loop_settings(micro_batch_size: int, max_norm: float | None) -> dict[str, Any]:
    """What LitGPT's loop needs from any DeepSpeed config (see the table above)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_clipping": max_norm or 0.0,
        "managed_gradient_accumulation": False,
    }


def deepspeed_config(
    zero_stage: int, offload_optimizer: str, offload_params: str, nvme_path: Path | None,
    micro_batch_size: int, max_norm: float | None,
) -> dict[str, Any]:  # fmt: skip
    """The DeepSpeed config for our flags (Lightning adds the precision section)."""
    zero: dict[str, Any] = {
        "stage": zero_stage,
        "contiguous_gradients": True,
        # ZeRO-1 with caller-owned accumulation reduces in step(); overlapping needs partitioned gradients
        "overlap_comm": zero_stage > 1,
    }
    for key, device in (("offload_optimizer", offload_optimizer), ("offload_param", offload_params)):
        if device != "none":
            zero[key] = {"device": device, "pin_memory": True}
            if device == "nvme":
                zero[key]["nvme_path"] = str(nvme_path)
    return {
        **loop_settings(micro_batch_size, max_norm),
        "zero_allow_untested_optimizer": True,  # LitGPT's torch.optim optimizers
        "zero_optimization": zero,
    }


def read_user_config(path: Path) -> dict[str, Any]:
    if not Path(path).exists():
        raise UserError(f"--deepspeed-config {path}: file not found")
    config = read_json_file(Path(path), "a DeepSpeed config", "fix it, or drop the flag", flag="--deepspeed-config")
    if not isinstance(config, dict):
        raise UserError(f"--deepspeed-config {path}: expected a JSON object of DeepSpeed settings")
    if "expert_parallel" in config:
        raise UserError(
            f"--deepspeed-config {path}: remove expert_parallel; DeepSpeed's AutoEP would replace litmoe's MoE layer"
            " and silently drop its load balancing, selection bias and routing statistics"
        )
    return config


def user_deepspeed_config(path: Path, micro_batch_size: int, max_norm: float | None) -> dict[str, Any]:
    """A user's JSON config, passed through with the keys LitGPT's loop needs filled in (or refused when they
    contradict the run)."""
    config = read_user_config(path)
    run = loop_settings(micro_batch_size, max_norm)
    for key in run:
        if config.get(key, run[key]) != run[key]:
            raise UserError(
                f"{path}: {key} is {config[key]!r} but this run needs {run[key]!r}; remove the key (litmoe sets it"
                " from train.micro_batch_size, train.max_norm and LitGPT's own gradient accumulation)"
            )
    for key in ("gradient_accumulation_steps", "train_batch_size"):
        if key in config:
            raise UserError(
                f"{path}: remove {key}; LitGPT's loop accumulates gradients itself (set train.global_batch_size)"
            )
    return {**config, **run, "zero_allow_untested_optimizer": True}


def resuming(config: dict[str, Any], resume: bool | Path, world_size: int) -> dict[str, Any]:
    """`config` for a run resuming `resume`: where its shards were written by another number of ranks, the engine
    loads DeepSpeed's universal checkpoint of them instead (`checkpoint.load_universal`; converted at load)."""
    progress = read_progress(Path(resume).parent) if resume else None
    if progress is None or progress["world_size"] == world_size:
        return config
    if offload_device(config, "offload_optimizer") == "nvme":
        raise UserError(
            f"--resume {resume}: written by {progress['world_size']} ranks; DeepSpeed restores NVMe-offloaded"
            f" optimizer state per rank only, so resume on {progress['world_size']} ranks, or offload to cpu"
        )
    return {**config, "checkpoint": {**config.get("checkpoint", {}), "load_universal": True}}


def offload_device(config: dict[str, Any], key: str) -> str:
    """Where a DeepSpeed config offloads `key` (offload_optimizer, offload_param): none, cpu or nvme."""
    return config.get("zero_optimization", {}).get(key, {}).get("device", "none")


class LoopDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy, adjusted to LitGPT's loop (see the module docstring)."""

    class LocalAccumulation:
        def no_backward_sync(self, module: nn.Module, enabled: bool):
            return nullcontext()

    def __init__(self, *args: Any, allow_cpu: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._backward_sync_control = self.LocalAccumulation()
        self.allow_cpu = allow_cpu
        self.step_observers: list[Callable[[Any], None]] = []  # called with each step's gradient norm

    def setup_environment(self) -> None:
        if self.allow_cpu and self.parallel_devices[0].type == "cpu":  # DeepSpeed's CPU accelerator, over gloo
            # Lightning checks each rank's device index against its local rank; CPU devices have none.
            self.parallel_devices = [torch.device("cpu", index) for index in range(len(self.parallel_devices))]
            super(DeepSpeedStrategy, self).setup_environment()
        else:
            super().setup_environment()

    def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        """Every file DeepSpeed's torch.save engine writes is hashed as it is written, on the rank that writes it
        (litmoe.core.checksums): the checkpoint's SHA256SUMS needs no second read of the shards."""
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

        with swapped(TorchCheckpointEngine, "save", hashed_engine_save):
            super().save_checkpoint(*args, **kwargs)

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> Any:
        if self.config.get("checkpoint", {}).get("load_universal"):
            path = self.universal_checkpoint(Path(path))
        with weights_only_deepspeed_loads():  # DeepSpeed itself would unpickle anything
            return super().load_checkpoint(path, *args, **kwargs)

    def universal_checkpoint(self, shards: Path) -> Path:
        """DeepSpeed's universal checkpoint of `shards`, converted by rank 0 while the others wait; a failed
        conversion is raised on every rank, so that none is left waiting."""
        failure = None
        if self.global_rank == 0:
            try:
                universal(shards)
            except Exception as err:  # noqa: BLE001 - raised below, on every rank
                failure = f"{type(err).__name__}: {err}"
        failure = self.broadcast(failure, src=0)
        if failure is not None:
            raise UserError(f"{shards}: converting to DeepSpeed's universal checkpoint failed ({failure})")
        return shards.parent / UNIVERSAL

    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        """The engine's step, not the ZeRO optimizer's: with caller-owned accumulation, the engine reduces the
        gradients, clips and steps there. Observers then get the gradient norm the engine measured."""
        result = self.model.step()
        for observe in self.step_observers:
            observe(self.model.get_global_grad_norm())
        return result

    def clip_gradients_norm(self, module, optimizer, max_norm, norm_type=2.0, error_if_nonfinite=True):
        """Clipping happens inside the engine's step (`gradient_clipping` in the config); this returns the
        gradient norm the engine measured at the last step (NaN before the first)."""
        norm = self.model.get_global_grad_norm()
        return torch.as_tensor(float("nan") if norm is None else float(norm))


def hashed_engine_save(engine: Any, state_dict: dict, path: str) -> None:
    """DeepSpeed's `TorchCheckpointEngine.save`, hashed while written."""
    save_hashed(state_dict, Path(path), _use_new_zipfile_serialization=engine.zipfile_serialization)


class ZeroFabric(L.Fabric):
    """Fabric that sets the model up together with its optimizer, as DeepSpeed requires, although LitGPT's loop
    sets up the model first and builds its optimizer afterwards."""

    def __init__(self, *args: Any, build_optimizer: Callable[[Iterable[nn.Parameter]], Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.build_optimizer = build_optimizer
        self.zero_optimizer = None

    def setup(self, module: nn.Module, *optimizers: Any, **kwargs: Any) -> Any:
        if optimizers:
            return super().setup(module, *optimizers, **kwargs)
        model, optimizer = super().setup(module, self.build_optimizer(module.parameters()), **kwargs)
        optimizer.defaults = client_optimizer(optimizer).defaults  # LitGPT reads the base learning rate here
        self.zero_optimizer = optimizer
        return model

    def setup_optimizers(self, *optimizers: Any) -> Any:
        """LitGPT's optimizer, built after `setup(model)` from the same config, is dropped: DeepSpeed already
        holds the one made in `setup`."""
        if self.zero_optimizer is None:
            raise RuntimeError("ZeroFabric: set the model up with fabric.setup(model) first")
        return self.zero_optimizer


def client_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside Fabric's and DeepSpeed's wrappers."""
    while not isinstance(optimizer, torch.optim.Optimizer) or hasattr(optimizer, "_strategy"):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_builder(optimizer: str | dict, config: dict[str, Any]) -> Callable[[Iterable[nn.Parameter]], Any]:
    """How LitGPT would build the optimizer; with optimizer offload, DeepSpeed's CPU Adam with the same settings
    (DeepSpeed refuses a torch optimizer there)."""
    from litgpt.utils import instantiate_torch_optimizer

    if offload_device(config, "offload_optimizer") == "none":
        return partial(user_optimizer, instantiate_torch_optimizer, optimizer, fused=torch.cuda.is_available())
    name = optimizer if isinstance(optimizer, str) else optimizer.get("class_path", "")
    if name.rsplit(".", 1)[-1] not in ("Adam", "AdamW"):
        raise UserError(f"optimizer {name}: optimizer offload runs DeepSpeed's CPU Adam; use Adam or AdamW")
    settings = {} if isinstance(optimizer, str) else dict(optimizer.get("init_args", {}))
    if "betas" in settings:
        settings["betas"] = tuple(settings["betas"])

    def cpu_adam(parameters: Iterable[nn.Parameter]):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        # Its C++ extension is compiled on first use (about a minute, with g++ and ninja): say so, and how long
        # it took, so that a slow first start is not mistaken for a hang.
        print("DeepSpeed CPU Adam: loading its C++ extension (compiled on first use: about a minute) ...", flush=True)
        start = time.perf_counter()
        adam = DeepSpeedCPUAdam(parameters, adamw_mode=name.endswith("AdamW"), **settings)
        print(f"DeepSpeed CPU Adam: ready in {time.perf_counter() - start:.0f} s", flush=True)
        return adam

    return cpu_adam


def zero3_reset_parameters(module: nn.Module, seed: int) -> None:
    """LitGPT's `reset_parameters(model)` for weights ZeRO-3 has already partitioned: each module's own
    parameters are gathered, re-initialised on rank 0 and scattered again.

    ZeRO-3 builds the model with its default init, which other strategies skip (`empty_init`); the generator
    is reseeded to where LitGPT's init finds it otherwise, so that every strategy starts from the same weights."""
    import deepspeed

    torch.manual_seed(seed)
    for submodule in module.modules():
        if callable(getattr(submodule, "reset_parameters", None)):
            with deepspeed.zero.GatheredParameters(list(submodule.parameters(recurse=False)), modifier_rank=0):
                submodule.reset_parameters()
