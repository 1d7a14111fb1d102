"""Our changes to LitGPT's pretrain loop, applied in one scoped place: `patched_pretrain(...)`.

`litgpt.pretrain.setup()` runs unchanged inside the context; these names are swapped for its duration and
restored afterwards (tests/test_patches.py fails if a LitGPT upgrade moves any of them):

  litgpt.model.LLaMAMoE          -> `litmoe.model.moe.MoELayer` (unless moe.layer is 'stock'), through
                                    litmoe.model.builder: Block builds its MLP with
                                    `getattr(litgpt.model, config.mlp_class_name)`; under expert parallelism
                                    each layer holds this rank's experts (the strategy makes the groups first)
  pretrain.L                     -> a namespace whose `Fabric` builds the chosen strategy's Fabric
                                    (litmoe.distributed.fabric; LitGPT hard-codes FSDP for >1 device)
  pretrain.reset_parameters      -> under ZeRO-3 only: re-initialise weights that DeepSpeed has already
                                    partitioned, gathering each module's (litmoe.distributed.zero)
  torch.compile                  -> `prepare_model`: the fused loss's head, activation checkpointing, then compile
                                    the model or each block, only as configured (LitGPT compiles unconditionally
                                    right before `fabric.setup(model)`)
  pretrain.chunked_cross_entropy -> compiled (`litmoe.model.loss`: one graph, not 128 chunks of eager ops) when
                                    the model is; with --optimization.fused_loss: `litmoe.model.fused_loss`, the
                                    head and the loss in one chunked kernel (training and validation alike)
  pretrain.instantiate_torch_optimizer -> the stock one, except that init_args the user set win over its
                                    defaults (it forces fused=True on CUDA, so --optimizer.fused false was lost)
  pretrain.measure_flops         -> `TrainingFlops`: active-expert FLOPs (the meta-device trace fails on MoE)
  pretrain.save_hyperparameters  -> writes our resolved run config (the stock one re-parses sys.argv with
                                    LitGPT's parser and dies on any flag of ours)
  pretrain.save_checkpoint       -> the stock save inside `litmoe.training.saving.AtomicSave`: a checkpoint
                                    directory appears only when complete, with the run's progress recorded
  pretrain.capture_hparams,      -> our run config (for TensorBoard's hyperparameters), and the run's effective
  pretrain.pprint                   settings where LitGPT prints its raw arguments (class-default batch sizes)
  pretrain.choose_logger         -> LitGPT's logger plus CSV and the live progress bar
  pretrain.fit                   -> the stock loop with our hooks around it and its steps (litmoe.training.fit):
                                    balancing, health, preemption, routing statistics, a correct summary; for
                                    its duration pretrain.validate and save_checkpoint are timed apart and
                                    come after the health check, pretrain.get_lr is read per optimizer
                                    step (the same rate on any number of ranks), and pretrain.RunningMean is
                                    `litmoe.training.readback.RunningLoss` (no host sync; unless
                                    running_loss_nan_check: torchmetrics' NaN check reads the device twice a batch)
The stop signals (SIGTERM, SIGINT, SIGUSR1) are handled for the whole of `setup` (litmoe.training.preemption).
"""

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn
import yaml
from torch.utils.checkpoint import checkpoint

from litmoe.core.args import OptimizationArgs
from litmoe.core.patching import swapped, user_optimizer
from litmoe.distributed.expert_parallel import ExpertParallelism
from litmoe.distributed.fabric import fabric_builder, rank_watch
from litmoe.distributed.zero import zero3_reset_parameters
from litmoe.model.builder import layer_for, moe_layer
from litmoe.model.flops import TrainingFlops
from litmoe.model.fused_loss import FusedLinearCrossEntropy
from litmoe.model.loss import compiled_loss
from litmoe.training.fit import timed_fit
from litmoe.training.monitoring import make_run_logger
from litmoe.training.saving import AtomicSave
from litmoe.training.settings import PatchSettings


@contextmanager
def patched_pretrain(settings: PatchSettings) -> Iterator[PatchSettings]:
    import litgpt.pretrain as pretrain

    flops = TrainingFlops(settings.micro_batch_size, settings.seq_len)
    saver = AtomicSave(pretrain.save_checkpoint, partial(progress_record, settings), settings.checkpoint.keep_last)
    with ExitStack() as stack:
        stack.enter_context(settings.stop.installed())
        split = settings.strategy.expert_parallel
        parallelism = ExpertParallelism(split) if split > 1 else None
        stack.enter_context(moe_layer(layer_for(settings.moe, lambda: parallelism and parallelism.group)))
        options = settings.optimization
        fused_loss = FusedLinearCrossEntropy() if options.fused_loss else None
        if fused_loss is not None:
            stack.enter_context(swapped(pretrain, "chunked_cross_entropy", fused_loss))
        elif options.compile:
            loss = compiled_loss(torch.compile, pretrain.chunked_cross_entropy, **compile_options(options))
            stack.enter_context(swapped(pretrain, "chunked_cross_entropy", loss))
        prepare = partial(prepare_model, compile_fn=torch.compile, options=settings.optimization, fused_loss=fused_loss)
        stack.enter_context(swapped(torch, "compile", prepare))
        build_optimizer = partial(user_optimizer, pretrain.instantiate_torch_optimizer)
        stack.enter_context(swapped(pretrain, "instantiate_torch_optimizer", build_optimizer))
        optimizer = settings.run_config.get("optimizer", "AdamW")
        build_fabric = fabric_builder(
            settings.strategy, settings.deepspeed_config, optimizer, settings.timeout_minutes, parallelism
        )
        stack.enter_context(swapped(pretrain, "L", SimpleNamespace(Fabric=build_fabric)))
        stack.enter_context(rank_watch())
        if settings.strategy.name == "deepspeed" and settings.strategy.zero_stage == 3:
            reset = partial(zero3_reset_parameters, seed=settings.run_config["seed"])
            stack.enter_context(swapped(pretrain, "reset_parameters", reset))
        stack.enter_context(swapped(pretrain, "measure_flops", flops))
        stack.enter_context(
            swapped(pretrain, "save_hyperparameters", partial(save_run_config, run_config=settings.run_config))
        )
        stack.enter_context(swapped(pretrain, "save_checkpoint", saver))
        stack.enter_context(swapped(pretrain, "capture_hparams", lambda: settings.run_config))
        stack.enter_context(swapped(pretrain, "pprint", SimpleNamespace(pformat=lambda hparams: settings.overview)))
        stack.enter_context(
            swapped(pretrain, "choose_logger", partial(choose_logger, pretrain.choose_logger, settings))
        )
        stack.enter_context(swapped(pretrain, "fit", partial(timed_fit, pretrain.fit, flops, settings, saver)))
        yield settings


def checkpoint_blocks(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every transformer block (state-dict keys unchanged)."""
    for block in model.transformer.h:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)


def prepare_model(
    model: nn.Module, *args: Any, compile_fn: Callable, options: OptimizationArgs,
    fused_loss: FusedLinearCrossEntropy | None = None, **kwargs: Any,
):  # fmt: skip
    from litgpt.model import GPT

    if not isinstance(model, GPT):  # someone else's torch.compile call: leave it alone
        return compile_fn(model, *args, **kwargs)
    if fused_loss is not None:
        fused_loss.attach(model)
    if options.gradient_checkpointing:
        checkpoint_blocks(model)
    if not options.compile:
        return model
    how = compile_options(options)
    if options.compile_scope == "blocks":
        for block in model.transformer.h:
            block.compile(**how)  # in place: parameter names and state-dict keys stay as they were
        return model
    return compile_fn(model, **how)


def compile_options(options: OptimizationArgs) -> dict[str, Any]:
    return {"mode": options.compile_mode, "dynamic": options.compile_dynamic, "fullgraph": options.compile_fullgraph}


def progress_record(settings: PatchSettings, fabric, state: dict) -> dict[str, Any]:
    """What a checkpoint records of the run that wrote it (litmoe.training.resume checks a resumed run against it)."""
    return {
        "iter_num": state["iter_num"],
        "step_count": state["step_count"],
        "tokens": state["iter_num"] * settings.tokens_per_micro_batch * fabric.world_size,
        "world_size": fabric.world_size,
        "micro_batch_size": settings.micro_batch_size,
        "seq_len": settings.seq_len,
    }


def save_run_config(function: Callable, checkpoint_dir: Path, run_config: dict[str, Any]) -> None:
    with open(Path(checkpoint_dir) / "hyperparameters.yaml", "w", encoding="utf-8") as file:
        yaml.safe_dump(run_config, file, sort_keys=False)


def choose_logger(stock_choose_logger: Callable, settings: PatchSettings, logger_name, out_dir, *args, **kwargs):
    stock = stock_choose_logger(logger_name, out_dir, *args, **kwargs)
    return make_run_logger(stock, Path(out_dir), settings.token_budget, settings.progress)
