"""run_train's settings checked as a whole before anything is built: the optimizer, batch arithmetic, the
token budget, intervals, devices and precision. Each mistake is one line naming the flag, the value and the fix.

The optimizer is resolved here rather than by jsonargparse, which merges `--optimizer.init_args.lr 1e-3` into
a stray `optimizer.lr` key that nothing reads. Every spelling LitGPT users know reaches the run:
`--optimizer SGD`, `--optimizer '{"class_path": ..., "init_args": {...}}'`, `--optimizer.class_path ...`,
`--optimizer.init_args.lr 1e-3` and its short form `--optimizer.lr 1e-3`.

`PatchSettings` is the outcome: what the patched pretrain loop (litmoe.training.patches) reads of the run.
"""

import importlib
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from litgpt.args import EvalArgs, TrainArgs

from litmoe.core.args import CheckpointArgs, HealthArgs, MoEArgs, OptimizationArgs
from litmoe.core.errors import UserError
from litmoe.core.user_files import read_flag_value
from litmoe.distributed.plans import StrategyChoice
from litmoe.model.experts import expert_size, looped_experts_reason
from litmoe.training.monitoring import RunSummary
from litmoe.training.preemption import StopSignal

OPTIMIZER_FLAG = "--optimizer"
OPTIMIZER_EXAMPLE = "AdamW, or {class_path: torch.optim.AdamW, init_args: {lr: 3.0e-4}}"
UNUSED_BY_LITGPT = {"epochs": "train", "max_steps": "train", "max_time": "train", "max_new_tokens": "eval"}

# --------------------------------------------------------------------------------------------- optimizer


def resolve_optimizer(configured: str | dict | None, flags: list[tuple[str, str]]) -> dict[str, Any]:
    """The optimizer as `{class_path, init_args}`: the train config's, changed by the command-line flags, checked
    by building it once on a dummy parameter (so that torch's own range checks speak before training)."""
    optimizer = as_optimizer(configured or "AdamW", "the train config's optimizer")
    for flag, text in flags:
        value = read_flag_value(flag, text)
        key = flag.removeprefix(OPTIMIZER_FLAG).removeprefix(".")
        if not key:
            optimizer = as_optimizer(value, f"{flag} {text}")
        elif key == "class_path":
            optimizer = as_optimizer(value, f"{flag} {text}")
        else:
            name = key.removeprefix("init_args.")
            if "." in name:
                raise UserError(f"{flag}: optimizer settings are flat; use --optimizer.init_args.NAME VALUE")
            optimizer["init_args"][name] = value
    check_optimizer(optimizer)
    return optimizer


def as_optimizer(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        return {"class_path": full_class_path(value), "init_args": {}}
    if isinstance(value, dict) and isinstance(value.get("class_path"), str):
        init_args = value.get("init_args") or {}
        if not isinstance(init_args, dict) or set(value) - {"class_path", "init_args"}:
            raise UserError(f"{where}: expected class_path and an init_args mapping, e.g. {OPTIMIZER_EXAMPLE}")
        return {"class_path": full_class_path(value["class_path"]), "init_args": dict(init_args)}
    raise UserError(f"{where}: expected an optimizer name or mapping, e.g. {OPTIMIZER_EXAMPLE}")


def full_class_path(name: str) -> str:
    return name if "." in name else f"torch.optim.{name}"


def optimizer_class(class_path: str) -> type:
    module_name, _, class_name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        found = None
    if not (isinstance(found, type) and issubclass(found, torch.optim.Optimizer)):
        raise UserError(
            f"--optimizer {class_path}: no such torch optimizer; use a torch.optim name (AdamW, Adam, SGD) or the"
            " import path of a torch.optim.Optimizer subclass"
        )
    return found


def check_optimizer(optimizer: dict[str, Any]) -> None:
    cls = optimizer_class(optimizer["class_path"])
    parameters = inspect.signature(cls).parameters
    accepted = set(parameters) - {"params"}
    for name, value in optimizer["init_args"].items():
        if name not in accepted:
            takes = ", ".join(sorted(accepted))
            raise UserError(f"--optimizer.init_args.{name}: {cls.__name__} has no such argument; it takes {takes}")
        default = parameters[name].default
        if is_number(default) and not (is_number(value) and math.isfinite(value)):
            raise UserError(f"--optimizer.init_args.{name} {value}: expected a finite number (default {default})")
    try:
        cls([torch.zeros(1, requires_grad=True)], **optimizer["init_args"])
    except (ValueError, TypeError, RuntimeError) as err:
        settings = optimizer["init_args"]
        raise UserError(f"--optimizer.init_args {settings}: {cls.__name__} refuses them ({err})") from None


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def learning_rate(optimizer: dict[str, Any]) -> float:
    """The base learning rate LitGPT's schedule starts from (the optimizer's `lr`, or its class default)."""
    cls = optimizer_class(optimizer["class_path"])
    return float(optimizer["init_args"].get("lr", inspect.signature(cls).parameters["lr"].default))


# ------------------------------------------------------------------------------------------- the loop


def check_training(train: TrainArgs, eval: EvalArgs, world_size: int, seq_len: int, lr: float) -> None:
    """Batch arithmetic, budget, intervals and schedule: what LitGPT's loop would assert on, misread or ignore."""
    counts = {
        "--train.micro_batch_size": train.micro_batch_size,
        "--train.global_batch_size": train.global_batch_size,
        "--train.log_interval": train.log_interval,
        "--eval.interval": eval.interval,
        "--eval.max_iters": eval.max_iters,
    }
    for flag, value in counts.items():
        if value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")
    if train.save_interval is not None and train.save_interval < 1:
        raise UserError(f"--train.save_interval {train.save_interval}: must be at least 1 (null saves only final/)")
    for name, section in UNUSED_BY_LITGPT.items():
        if getattr(train if section == "train" else eval, name) is not None:
            raise UserError(
                f"--{section}.{name}: LitGPT's pretrain loop does not use it; the budget is --train.max_tokens"
                " (remove the setting)"
            )
    check_batch(train, world_size)
    check_budget(train, seq_len)
    if train.max_norm is None or not train.max_norm > 0:
        raise UserError(
            f"--train.max_norm {train.max_norm}: LitGPT's loop clips gradients at every step; give a positive norm"
            " (1.0 is usual)"
        )
    if train.lr_warmup_steps is not None and train.lr_warmup_steps < 0:
        raise UserError(f"--train.lr_warmup_steps {train.lr_warmup_steps}: must be 0 or more")
    if not 0 <= train.min_lr <= lr:
        raise UserError(f"--train.min_lr {train.min_lr}: must be between 0 and the optimizer's lr ({lr})")


def sequence_length(train: TrainArgs, block_size: int) -> int:
    """The length the run trains on: train.max_seq_length (1 to the model's block_size), or the block size."""
    length = block_size if train.max_seq_length is None else train.max_seq_length
    if not 1 <= length <= block_size:
        raise UserError(
            f"--train.max_seq_length {length}: must be between 1 and the model's block_size {block_size}"
            " (null trains on whole blocks)"
        )
    return length


def check_moe(moe: MoEArgs) -> None:
    """The `moe:` settings: non-negative balancing, a positive capacity, on the layer that has them."""
    for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
        if getattr(moe, name) < 0:
            raise UserError(f"--moe.{name} {getattr(moe, name)}: must be 0 (off) or more")
    factor = moe.capacity_factor
    if factor is not None and not 0 < factor < math.inf:
        raise UserError(f"--moe.capacity_factor {factor}: must be above 0 (1.0 = a fair share; null: dropless)")
    if factor is not None and moe.layer != "litmoe":
        raise UserError(f"--moe.capacity_factor: LitGPT's MoE layer (--moe.layer {moe.layer}) is dropless only")
    if factor is not None and factor < 0.5:
        print(f"--moe.capacity_factor {factor}: most routed tokens will skip their experts (1.0 to 1.25 is usual)")
    if moe.layer != "litmoe" and moe.bias_update_rate:
        raise UserError(f"--moe.bias_update_rate: LitGPT's MoE layer (--moe.layer {moe.layer}) has no selection bias")
    if moe.layer != "litmoe" and (moe.aux_loss_coef or moe.z_loss_coef):
        print(f"--moe.layer {moe.layer}: LitGPT's layer has no balancing losses; aux_loss_coef and z_loss_coef unused")


def check_batch(train: TrainArgs, world_size: int) -> None:
    per_pass = train.micro_batch_size * world_size
    if train.global_batch_size % per_pass:
        below = train.global_batch_size // per_pass * per_pass
        choices = f"{below} or {below + per_pass}" if below else str(per_pass)
        devices = f" x {world_size} devices = {per_pass}" if world_size > 1 else ""
        raise UserError(
            f"--train.global_batch_size {train.global_batch_size} is not a multiple of --train.micro_batch_size"
            f" {train.micro_batch_size}{devices}; use {choices} (gradient accumulation makes up the rest)"
        )


def check_budget(train: TrainArgs, seq_len: int) -> None:
    step_tokens = train.global_batch_size * seq_len
    if train.max_tokens is None or train.max_tokens < step_tokens:
        raise UserError(
            f"--train.max_tokens {train.max_tokens}: less than one optimizer step ({train.global_batch_size}"
            f" sequences x {seq_len} tokens = {step_tokens:,}); give a budget such as 2e6"
        )


def whole_steps(train: TrainArgs, seq_len: int) -> int:
    """The budget a run trains: the whole optimizer steps in --train.max_tokens. LitGPT's loop runs micro-batches up
    to the budget, and a last partial step's micro-batches were computed, counted as trained, and thrown away."""
    step_tokens = train.global_batch_size * seq_len
    budget = int(train.max_tokens) // step_tokens * step_tokens
    if budget != int(train.max_tokens):
        print(
            f"Budget: {budget:,} tokens, the {budget // step_tokens:,} whole optimizer steps of --train.max_tokens"
            f" {int(train.max_tokens):,} (a last partial step would be computed and thrown away)"
        )
    return budget


# ----------------------------------------------------------------------------------------- hardware


def device_count(devices: int | str) -> int:
    """Devices per node as LitGPT counts them ('auto': every CUDA GPU, or one CPU process)."""
    from litgpt.utils import parse_devices

    if not (devices == "auto" or (isinstance(devices, int) and devices >= 1)):
        raise UserError(f"--devices {devices}: give a positive number of devices per node, or auto")
    return parse_devices(devices)


def check_nodes(num_nodes: int) -> None:
    if num_nodes < 1:
        raise UserError(f"--num_nodes {num_nodes}: must be at least 1")


def check_devices(devices: int | str, num_nodes: int, num_workers: int, precision: str) -> int:
    """Devices per node, after checking devices, nodes, data workers and precision against this machine."""
    count, gpus = device_count(devices), torch.cuda.device_count()
    if gpus and count > gpus:
        raise UserError(f"--devices {devices}: this node has {gpus} CUDA GPU{'s' if gpus > 1 else ''}")
    check_nodes(num_nodes)
    if num_workers < 0:
        raise UserError(f"--num_workers {num_workers}: must be 0 (load in the training process) or more")
    if not gpus and precision.startswith("16"):
        raise UserError(f"--precision {precision}: fp16 needs a CUDA GPU; on the CPU use 32-true or bf16-mixed")
    return count


# ----------------------------------------------------------------------------------------- the overview


def run_overview(
    config, data: str, tokens: dict[str, int], train: TrainArgs, eval: EvalArgs, optimizer: dict[str, Any],
    precision: str, strategy: str, world_size: int, seq_len: int, compile: bool, checkpointing: bool,
    keep_last: int | None, out_dir: str, start: str,
) -> str:  # fmt: skip
    """What this run does, as it will do it (printed where LitGPT prints its raw arguments, whose sequence length
    and batch sizes are the class defaults rather than the run's)."""
    steps = int(train.max_tokens) // (train.global_batch_size * seq_len)
    accumulation = train.global_batch_size // (train.micro_batch_size * world_size)
    experts = f"{config.n_expert} experts of {expert_size(config)}, top-{config.n_expert_per_token}"
    mlp = experts if config.mlp_class_name == "LLaMAMoE" else f"{config.mlp_class_name} of {config.intermediate_size}"
    arguments = ", ".join(f"{key}={value}" for key, value in optimizer["init_args"].items())
    lines = [
        "Run settings (as this run uses them):",
        f"  model        {config.name}: {config.n_layer} layers, n_embd {config.n_embd}, {config.n_head} heads"
        f" ({config.n_query_groups} query groups), {mlp}; vocabulary {config.vocab_size:,}"
        f" (padded to {config.padded_vocab_size:,}), block size {config.block_size}",
        *([f"  experts      {reason}"] if (reason := looped_experts_reason(config, precision)) else []),
        f"  data         {data}: {tokens['train']:,} train / {tokens['val']:,} val tokens",
        f"  budget       {int(train.max_tokens):,} tokens: {steps:,} optimizer steps of {train.global_batch_size}"
        f" sequences x {seq_len} tokens (micro-batch {train.micro_batch_size} x {world_size} device(s)"
        f" x {accumulation} accumulated)",
        f"  optimizer    {optimizer['class_path']}({arguments}); warmup {train.lr_warmup_steps} steps, cosine to"
        f" min_lr {train.min_lr}, gradients clipped at norm {train.max_norm}",
        f"  precision    {precision}; torch.compile {'on' if compile else 'off'}; activation checkpointing"
        f" {'on' if checkpointing else 'off'}",
        f"  strategy     {strategy}",
        f"  checkpoints  every {train.save_interval} steps and at the end, in {out_dir}"
        f" ({f'the newest {keep_last} step-* kept' if keep_last else 'all kept'}); validation every"
        f" {eval.interval} steps on {eval.max_iters} batches",
        f"  start        {start}",
    ]
    return "\n".join(lines)


@dataclass
class PatchSettings:
    optimization: OptimizationArgs
    moe: MoEArgs
    strategy: StrategyChoice
    precision: str
    micro_batch_size: int
    seq_len: int
    token_budget: int
    progress: bool
    run_config: dict[str, Any]
    deepspeed_config: dict[str, Any] | None = None
    out_dir: Path = Path("out")
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    health: HealthArgs = field(default_factory=HealthArgs)
    timeout_minutes: int = 30
    resume_tokens: int | None = None  # what the resumed checkpoint had trained (None: a fresh run, or unrecorded)
    initial_weights: Path | None = None  # the scratch dir of starting weights LitGPT loads (removed once loaded)
    val_tokens: int = 0  # in the validation split, to say what the summary's validation loss covers
    overview: str = ""  # the run's effective settings, printed where LitGPT prints its raw arguments
    stop: StopSignal = field(default_factory=StopSignal, init=False)
    summary: RunSummary | None = field(default=None, init=False)  # filled in when training ends

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch_size * self.seq_len
