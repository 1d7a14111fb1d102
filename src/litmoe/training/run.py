"""A training run: check everything a user can get wrong, take the output directory, find the resume point, then
run LitGPT's pretrain loop with our patches (litmoe.training.patches). The command line is litmoe.training.cli.
"""

import dataclasses
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from litgpt.args import EvalArgs, LogArgs, TrainArgs

from litmoe.core.args import (
    CheckpointArgs,
    HealthArgs,
    MoEArgs,
    OptimizationArgs,
    StrategyArgs,
    UpcycleArgs,
    check_seed,
)
from litmoe.core.checkpoint_io import checkpoint_dir_of
from litmoe.core.errors import UserError
from litmoe.core.outputs import check_output_dir
from litmoe.core.run_lock import launching_process, run_lock
from litmoe.data.tokenizer import load_tokenizer, tokenizer_vocab_size
from litmoe.data.training_data import PreparedData, TrainingData, describe_sources, training_data
from litmoe.distributed.expert_parallel import auto_expert_split, check_expert_parallel
from litmoe.distributed.plans import Hardware, StrategyChoice
from litmoe.distributed.strategy import (
    adopt_launcher_node_rank,
    check_expert_parallel_precision,
    check_launcher_variables,
    check_rendezvous,
    rendezvous_line,
    resolve_strategy,
)
from litmoe.model.attention import attention_kernel_scope, check_attention, default_precision, tf32_matmuls
from litmoe.model.builder import expected_state
from litmoe.model.configs import load_model_config
from litmoe.model.fused_loss import fused_loss_blocker
from litmoe.training.initial_weights import SCRATCH, check_same_tokenizer, write_initial_weights
from litmoe.training.patches import patched_pretrain
from litmoe.training.resume import RunShape, check_continuation, finished_run, resolve_resume
from litmoe.training.saving import recover_interrupted_saves
from litmoe.training.settings import (
    PatchSettings,
    check_devices,
    check_moe,
    check_training,
    learning_rate,
    resolve_optimizer,
    run_overview,
    sequence_length,
    whole_steps,
)

DEFAULT_DATA_DIR = Path("data/default")


def setup(
    model: str | dict = "model_config.yaml",
    data_dir: str | list = str(DEFAULT_DATA_DIR),
    out_dir: Path = Path("out/moe-200m"),
    precision: Literal["bf16-true", "bf16-mixed", "16-mixed", "32-true"] | None = None,
    resume: bool | Literal["auto"] | Path = False,
    train: TrainArgs = TrainArgs(),
    eval: EvalArgs = EvalArgs(),
    log: LogArgs = LogArgs(),
    optimizer: str | dict = "AdamW",
    optimization: OptimizationArgs = OptimizationArgs(),
    moe: MoEArgs = MoEArgs(),
    strategy: StrategyArgs = StrategyArgs(),
    checkpoint: CheckpointArgs = CheckpointArgs(),
    health: HealthArgs = HealthArgs(),
    initial_checkpoint_dir: Path | None = None,
    upcycle: UpcycleArgs = UpcycleArgs(),
    devices: int | str = "auto",
    num_nodes: int = 1,
    num_workers: int = 2,
    logger_name: Literal["tensorboard", "csv", "wandb", "mlflow"] = "tensorboard",
    seed: int = 42,
    progress: bool = False,
) -> PatchSettings | None:
    """Pretrain an MoE model with LitGPT's pretrain loop.

    Args:
        model: A model config YAML file (a LitGPT Config) or the name of a registered config (MoE-200M, MoE-1B, ...),
            or a mapping `{from: FILE_OR_NAME, FIELD: VALUE}` that changes fields (`--model.n_expert 16`).
        data_dir: Data prepared by prepare_data.py (the default corpus is prepared on first use); several, sampled by
            weight, as `DIR:WEIGHT,DIR:WEIGHT` or a list of {path, weight} in the train config.
        out_dir: Where checkpoints (step-*/, final/) and logs (logs/tensorboard, logs/csv) go.
        precision: Lightning precision; default bf16-mixed on a CUDA GPU, 32-true on CPU.
        resume: 'auto' continues from the newest checkpoint in out_dir (or starts fresh when there is none);
            a path continues from that checkpoint.
        train: LitGPT's training arguments (budget, batch sizes, learning-rate schedule, save interval).
        eval: LitGPT's evaluation arguments.
        log: LitGPT's logging arguments.
        optimizer: A torch optimizer name or config, as in LitGPT.
        optimization: torch.compile, FlashAttention and activation checkpointing switches.
        moe: The MoE layer (litmoe's fast layer or LitGPT's stock one) and its load balancing.
        strategy: single, ddp, fsdp or deepspeed (ZeRO stage, offload), or auto: decided from the hardware and
            the memory estimate, and printed with the reason.
        checkpoint: Which checkpoints are kept (keep_last).
        health: What happens at a non-finite loss or gradient norm (stop, skip, off), and loss-spike events.
        initial_checkpoint_dir: Start from the weights of this checkpoint of the same model (a fresh optimizer and
            schedule). Ignored when --resume finds a checkpoint of this run.
        upcycle: Start from a dense checkpoint instead, every expert made from its MLP (sparse upcycling).
        devices: How many devices to train on ('auto': all GPUs, or one CPU process).
        num_nodes: How many nodes.
        num_workers: Data loader worker processes.
        logger_name: Where metrics go besides the CSV log.
        seed: Random seed for initialization and data order.
        progress: Show a live progress bar (tokens of the budget, loss, tokens/s, ETA).
    """
    run_config = {name: plain(value) for name, value in locals().items()}
    check_seed(seed)
    if initial_checkpoint_dir is not None:
        initial_checkpoint_dir = checkpoint_dir_of(initial_checkpoint_dir)
    if upcycle.dense_checkpoint is not None:
        upcycle = dataclasses.replace(upcycle, dense_checkpoint=checkpoint_dir_of(upcycle.dense_checkpoint))
    plan = plan_run(
        model, data_dir, precision, train, eval, optimizer, optimization, strategy, checkpoint, health,
        initial_checkpoint_dir, upcycle, devices, num_nodes, num_workers, moe,
    )  # fmt: skip
    check_moe(moe)
    train.max_tokens = whole_steps(train, plan.seq_len)
    check_expert_parallel(plan.config, moe.layer, plan.choice.expert_parallel)
    inputs = [("--data_dir", source.path) for source in plan.data.sources]
    inputs += [("--initial_checkpoint_dir", initial_checkpoint_dir), ("--upcycle-from", upcycle.dense_checkpoint)]
    out_dir = check_output_dir(out_dir, "--out_dir", inputs)
    shape = RunShape.of(plan.config, plan.hardware.world_size, train, plan.seq_len, data_dir, seed, moe.layer)
    with run_lock(out_dir):
        point = resume_point(resume, out_dir, plan.choice, shape, int(train.max_tokens))
        if point is None:
            return None
        resume, resume_tokens = point
        initial = starting_weights(resume, out_dir, plan.config, initial_checkpoint_dir, upcycle, moe, seed)
        prepare_device(plan, optimization)
        overview = run_overview(
            plan.config, describe_sources(plan.data.sources), plan.data.tokens, train, eval, plan.optimizer,
            plan.precision, plan.label, plan.hardware.world_size, plan.seq_len, optimization.compile,
            optimization.gradient_checkpointing, checkpoint.keep_last, str(out_dir),
            start_description(resume, initial_checkpoint_dir, upcycle),
        )  # fmt: skip
        settings = PatchSettings(
            optimization=optimization,
            moe=moe,
            strategy=plan.choice,
            deepspeed_config=deepspeed_config(plan.choice, strategy, train, resume, plan.hardware.world_size),
            precision=plan.precision,
            micro_batch_size=train.micro_batch_size,
            seq_len=plan.seq_len,
            token_budget=int(train.max_tokens),
            progress=progress,
            run_config=run_config,
            out_dir=out_dir,
            checkpoint=checkpoint,
            health=health,
            timeout_minutes=strategy.timeout_minutes,
            resume_tokens=resume_tokens,
            initial_weights=initial,
            val_tokens=plan.data.tokens["val"],
            overview=overview,
        )
        if line := rendezvous_line(num_nodes, plan.hardware.world_size, strategy.timeout_minutes):
            print(line)
        with patched_pretrain(settings), attention_kernel_scope(optimization.flash_attention_force):
            data = PreparedData(plan.data.sources, num_workers, seed, start=(resume_tokens or 0) // plan.seq_len)
            run_pretrain(plan, data, out_dir, resume, initial, train, eval, log, devices, num_nodes, logger_name,
                         seed)  # fmt: skip
    return settings


@dataclass
class RunPlan:
    """What the checks settle before the output directory is touched."""

    config: Any  # litgpt.Config, its vocabulary fitted to the data's tokenizer
    precision: str
    seq_len: int
    optimizer: dict[str, Any]
    data: TrainingData
    hardware: Hardware
    choice: StrategyChoice

    @property
    def label(self) -> str:
        return self.choice.label(self.hardware.world_size, self.hardware.devices_per_node)


def plan_run(
    model: str | dict, data_dir: str | list, precision: str | None, train: TrainArgs, eval: EvalArgs,
    optimizer: str | dict, optimization: OptimizationArgs, strategy: StrategyArgs, checkpoint: CheckpointArgs,
    health: HealthArgs, initial_checkpoint_dir: Path | None, upcycle: UpcycleArgs, devices: int | str,
    num_nodes: int, num_workers: int, moe: MoEArgs,
) -> RunPlan:  # fmt: skip
    """Everything a user can get wrong, checked in order: the model, the batch arithmetic and devices, the
    optimizer and schedule, the data, the strategy, and the checkpoint, health and starting-weight settings."""
    config = load_model_config(model)
    seq_len = sequence_length(train, config.block_size)
    precision = precision or default_precision(training=True)
    devices_per_node = check_devices(devices, num_nodes, num_workers, precision)
    check_launcher_variables(devices_per_node * num_nodes, num_nodes)
    check_rendezvous(num_nodes, devices_per_node * num_nodes)
    optimizer = resolve_optimizer(optimizer, [])
    check_training(train, eval, devices_per_node * num_nodes, seq_len, learning_rate(optimizer))
    data = training_data(data_dir, train.micro_batch_size, seq_len, DEFAULT_DATA_DIR)
    config = fit_vocabulary(config, load_tokenizer(data.tokenizer_dir))
    adopt_launcher_node_rank()
    hardware = Hardware.here(devices_per_node, num_nodes)
    choice = choose_strategy(strategy, hardware, config, precision, train, seq_len, optimization, moe.layer)
    plan = RunPlan(config, precision, seq_len, optimizer, data, hardware, choice)
    print(f"Strategy: {plan.label} ({choice.reason})")
    check_fused_loss(optimization, config, choice)
    check_run_care(checkpoint, health, strategy, choice)
    check_starting_weights(initial_checkpoint_dir, upcycle, data.tokenizer_dir)
    return plan


def check_fused_loss(optimization: OptimizationArgs, config: Any, choice: StrategyChoice) -> None:
    if not optimization.fused_loss:
        return
    sharded = choice.name == "fsdp" or (choice.name == "deepspeed" and choice.zero_stage == 3)
    reason = fused_loss_blocker(config, sharded)
    if reason:
        raise UserError(f"--optimization.fused_loss true: {reason}; leave it false (the default)")


def prepare_device(plan: RunPlan, optimization: OptimizationArgs) -> None:
    """The attention kernel checked, and on the CPU freed host memory kept for reuse."""
    cuda = torch.cuda.is_available()
    check_attention(
        torch.device("cuda" if cuda else "cpu"), plan.precision, plan.config.n_head, plan.config.head_size,
        optimization.flash_attention, optimization.flash_attention_force,
    )  # fmt: skip
    if not cuda and optimization.keep_host_memory:
        from litmoe.training.host_memory import keep_freed_host_memory

        keep_freed_host_memory()


def run_pretrain(
    plan: RunPlan, data: PreparedData, out_dir: Path, resume: bool | Path, initial: Path | None, train: TrainArgs,
    eval: EvalArgs, log: LogArgs, devices: int | str, num_nodes: int, logger_name: str, seed: int,
) -> None:  # fmt: skip
    """LitGPT's own pretrain entry point, as `litgpt pretrain` calls it, on our data (from the resumed position)
    and settings."""
    from litgpt import pretrain

    with tf32_matmuls(torch.cuda.is_available()), closing(data):
        pretrain.setup(
            model_name=plan.config.name, model_config=plan.config, out_dir=out_dir, precision=plan.precision,
            resume=resume, initial_checkpoint_dir=initial, data=data, train=train, eval=eval, log=log,
            optimizer=plan.optimizer, devices=devices, num_nodes=num_nodes, tokenizer_dir=plan.data.tokenizer_dir,
            logger_name=logger_name, seed=seed,
        )  # fmt: skip


def start_description(resume: bool | Path, initial_checkpoint_dir: Path | None, upcycle: UpcycleArgs) -> str:
    if resume:
        return f"resume from {resume}"
    if initial_checkpoint_dir is not None:
        return f"the weights of {initial_checkpoint_dir} (a fresh optimizer and schedule)"
    if upcycle.dense_checkpoint is not None:
        return f"upcycled from {upcycle.dense_checkpoint} (router std {upcycle.router_std}, noise {upcycle.noise})"
    return "fresh, from LitGPT's initialization"


def check_starting_weights(initial_checkpoint_dir: Path | None, upcycle: UpcycleArgs, tokenizer_dir: Path) -> None:
    if initial_checkpoint_dir is not None and upcycle.dense_checkpoint is not None:
        raise UserError("--initial_checkpoint_dir and --upcycle-from both give starting weights; choose one")
    if upcycle.noise < 0 or upcycle.router_std < 0:
        raise UserError(f"--upcycle.noise {upcycle.noise}, --upcycle.router_std {upcycle.router_std}: must be >= 0")
    check_same_tokenizer(initial_checkpoint_dir, "--initial_checkpoint_dir", tokenizer_dir)
    check_same_tokenizer(upcycle.dense_checkpoint, "--upcycle-from", tokenizer_dir)


def starting_weights(
    resume: bool | Path, out_dir: Path, config, initial_checkpoint_dir: Path | None, upcycle: UpcycleArgs,
    moe: MoEArgs, seed: int,
) -> Path | None:  # fmt: skip
    """The directory LitGPT loads a fresh run's weights from (`initial_checkpoint_dir`), or None: LitGPT's init."""
    if initial_checkpoint_dir is None and upcycle.dense_checkpoint is None:
        return None
    if resume:
        print(f"Resuming {resume}: this run's own checkpoint, not the starting weights given")
        return None
    if not launching_process():  # rank 0 writes them before the ranks meet in Fabric's setup
        return out_dir / SCRATCH
    expected = expected_state(config, moe)
    return write_initial_weights(out_dir, config, initial_checkpoint_dir, upcycle, expected, seed)


def resume_point(
    resume: bool | str | Path, out_dir: Path, choice: StrategyChoice, shape: RunShape, budget: int
) -> tuple[bool | Path, int | None] | None:
    """(what LitGPT resumes from, the tokens it had trained), or None when that run has finished its budget.
    Called holding out_dir's lock, so that leftovers of a killed save can be cleaned up first."""
    if launching_process():
        recover_interrupted_saves(out_dir)
    resume = resolve_resume(resume, out_dir, deepspeed=choice.name == "deepspeed")
    if not resume:
        return resume, None
    tokens = check_continuation(resume, shape, budget)
    if (done := finished_run(resume, budget, shape)) is not None:
        print(done)
        return None
    return resume, tokens


def check_run_care(
    checkpoint: CheckpointArgs, health: HealthArgs, strategy: StrategyArgs, choice: StrategyChoice
) -> None:
    """The checkpoint, health and collective-timeout settings."""
    if strategy.timeout_minutes < 1:
        raise UserError(f"--timeout-minutes {strategy.timeout_minutes}: must be at least 1 (30 is the default)")
    if checkpoint.keep_last is not None and checkpoint.keep_last < 1:
        raise UserError(f"--checkpoint.keep_last {checkpoint.keep_last}: keep at least 1 (null keeps every one)")
    for name in ("max_skips", "spike_window", "spike_sigmas"):
        if getattr(health, name) <= 0:
            raise UserError(f"--health.{name} {getattr(health, name)}: must be positive")
    if health.nonfinite == "skip" and choice.name == "deepspeed":
        raise UserError(
            "--health.nonfinite skip: DeepSpeed's engine steps before the gradient norm is known, so a step"
            " cannot be skipped; use stop (the default) under DeepSpeed"
        )


def choose_strategy(
    args: StrategyArgs, hardware: Hardware, config, precision: str, train: TrainArgs, seq_len: int,
    optimization: OptimizationArgs, moe_layer: str,
) -> StrategyChoice:  # fmt: skip
    memory_of = None
    if hardware.gpu_memory is not None and args.decided_by_auto:  # only auto, on GPUs, weighs memory
        from litmoe.distributed.estimate import estimate_training

        estimate = estimate_training(config, precision, train.micro_batch_size, seq_len)
        memory_of = memory_per_device(estimate, precision, hardware, optimization)
    split = auto_expert_split(config, moe_layer, hardware.devices_per_node)
    choice = resolve_strategy(args, hardware, memory_of, optimization.compile, split, precision)
    check_expert_parallel_precision(choice, precision)
    return choice


def memory_per_device(estimate, precision: str, hardware: Hardware, optimization: OptimizationArgs):
    """One rank's memory under a strategy choice, for this hardware and these settings."""
    from litmoe.distributed.estimate import per_device_memory

    return partial(
        per_device_memory, estimate, precision, world_size=hardware.world_size,
        devices_per_node=hardware.devices_per_node, checkpointing=optimization.gradient_checkpointing,
    )  # fmt: skip


def deepspeed_config(
    choice: StrategyChoice, args: StrategyArgs, train: TrainArgs, resume: bool | Path, world_size: int
) -> dict[str, Any] | None:
    """The DeepSpeed config of a DeepSpeed run resuming `resume` on `world_size` ranks (None for any other
    strategy)."""
    if choice.name != "deepspeed":
        return None
    from litmoe.distributed import zero

    if args.deepspeed_config is not None:
        config = zero.user_deepspeed_config(args.deepspeed_config, train.micro_batch_size, train.max_norm)
    else:
        config = zero.deepspeed_config(
            choice.zero_stage, choice.offload_optimizer, choice.offload_params, args.nvme_path,
            train.micro_batch_size, train.max_norm,
        )  # fmt: skip
    return zero.resuming(config, resume, world_size)


def plain(value: Any) -> Any:
    """A YAML-safe copy of a setting (dataclasses to dicts, paths to strings)."""
    if dataclasses.is_dataclass(value):
        return {key: plain(item) for key, item in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return str(value) if isinstance(value, Path) else value


def fit_vocabulary(config, tokenizer):
    """Size the embedding for the tokenizer the data was made with, padded as LitGPT pads."""
    vocab_size = tokenizer_vocab_size(tokenizer)
    if vocab_size != config.vocab_size:
        given = config.vocab_size
        config = dataclasses.replace(config, vocab_size=vocab_size, padded_vocab_size=None)
        print(
            f"Vocabulary: {vocab_size:,} tokens from the data's tokenizer (padded to {config.padded_vocab_size:,}),"
            f" not the model config's vocab_size {given:,}: the embedding follows the data"
        )
    return config
