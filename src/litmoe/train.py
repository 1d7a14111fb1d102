"""A training run: check everything a user can get wrong, take the output directory, find the resume point, then
run LitGPT's pretrain loop with our patches (litmoe.patches). The command line is litmoe.train_cli.
"""

import dataclasses
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from litgpt.args import EvalArgs, LogArgs, TrainArgs

from litmoe.args import CheckpointArgs, HealthArgs, MoEArgs, OptimizationArgs, StrategyArgs, UpcycleArgs
from litmoe.attention import attention_kernel_scope, check_attention, default_precision, tf32_matmuls
from litmoe.checkpoints import (
    tokenizer_vocab_size,
)
from litmoe.configs import load_model_config
from litmoe.data import MANIFEST, SPLITS, prepare, read_manifest
from litmoe.errors import UserError
from litmoe.initial_weights import SCRATCH, write_initial_weights
from litmoe.patches import PatchSettings, patched_pretrain
from litmoe.resume import RunShape, check_continuation, finished_run, model_fields, resolve_resume
from litmoe.run_lock import launching_process, run_lock
from litmoe.saving import recover_interrupted_saves
from litmoe.settings import (
    check_devices,
    check_training,
    learning_rate,
    resolve_optimizer,
    run_overview,
    sequence_length,
)
from litmoe.strategy import Hardware, StrategyChoice, adopt_launcher_node_rank, resolve_strategy
from litmoe.tokenizer import load_tokenizer
from litmoe.training_data import (
    DataSource,
    PreparedData,
    check_sources,
    data_sources,
    describe_sources,
    sources_key,
)

DEFAULT_DATA_DIR = Path("data/default")

# Noise from pinned dependencies: litdata asks PyPI for a newer version of itself (we pin it deliberately),
# LitData pins memory even when there is no accelerator to pin it for, and LitGPT's TrainArgs warns about
# max_steps, which its pretrain loop ignores (and litmoe.settings refuses).
KNOWN_WARNINGS = (
    "A newer version of litdata is available",
    "'pin_memory' argument is set as true",
    "`--train.lr_warmup_steps` should be less than `--train.max_steps`",
)


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
    """Pretrain an MoE model with LitGPT's pretrain loop (returns None when --resume finds the run finished).

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
    cuda = torch.cuda.is_available()
    config = load_model_config(model)
    seq_len = sequence_length(train, config.block_size)
    precision = precision or default_precision(training=True)
    devices_per_node = check_devices(devices, num_nodes, num_workers, precision)
    optimizer = resolve_optimizer(optimizer, [])
    check_training(train, eval, devices_per_node * num_nodes, seq_len, learning_rate(optimizer))
    sources = data_sources(data_dir)
    check_sources(sources)
    manifests = [check_data_size(ensure_prepared(source.path), train.micro_batch_size, seq_len) for source in sources]
    check_one_tokenizer(sources, manifests)
    tokenizer_dir = sources[0].path / "tokenizer"
    config = fit_vocabulary(config, load_tokenizer(tokenizer_dir))
    tokens = {split: sum(manifest.tokens[split] for manifest in manifests) for split in SPLITS}
    adopt_launcher_node_rank()
    hardware = Hardware.here(devices_per_node, num_nodes)
    choice = choose_strategy(strategy, hardware, config, precision, train, seq_len, optimization)
    print(f"Strategy: {choice.label(hardware.world_size, hardware.devices_per_node)} ({choice.reason})")
    check_run_care(checkpoint, health, strategy, choice)
    check_starting_weights(initial_checkpoint_dir, upcycle)
    out_dir = Path(out_dir)
    shape = RunShape(
        model_fields(config), hardware.world_size, train.micro_batch_size, train.global_batch_size, seq_len,
        sources_key(data_dir), seed, num_workers,
    )  # fmt: skip
    with run_lock(out_dir):
        point = resume_point(resume, out_dir, choice, shape, int(train.max_tokens))
        if point is None:
            return None
        resume, resume_tokens = point
        initial = starting_weights(resume, out_dir, config, initial_checkpoint_dir, upcycle, moe, seed)
        check_attention(
            torch.device("cuda" if cuda else "cpu"), precision, config.n_head, config.head_size,
            optimization.flash_attention, optimization.flash_attention_force,
        )  # fmt: skip
        if not cuda and optimization.keep_host_memory:
            from litmoe.host_memory import keep_freed_host_memory

            keep_freed_host_memory()

        from litgpt import pretrain

        start = start_description(resume, initial_checkpoint_dir, upcycle)
        overview = run_overview(
            config, describe_sources(sources), tokens, train, eval, optimizer, precision,
            choice.label(hardware.world_size, hardware.devices_per_node), hardware.world_size, seq_len,
            optimization.compile, optimization.gradient_checkpointing, checkpoint.keep_last, str(out_dir), start,
        )  # fmt: skip
        settings = PatchSettings(
            optimization=optimization,
            moe=moe,
            strategy=choice,
            deepspeed_config=deepspeed_config(choice, strategy, train) if choice.name == "deepspeed" else None,
            precision=precision,
            micro_batch_size=train.micro_batch_size,
            seq_len=seq_len,
            token_budget=int(train.max_tokens),
            progress=progress,
            run_config=run_config,
            out_dir=out_dir,
            checkpoint=checkpoint,
            health=health,
            timeout_minutes=strategy.timeout_minutes,
            resume_tokens=resume_tokens,
            initial_weights=initial,
            val_tokens=tokens["val"],
            overview=overview,
        )
        data = PreparedData(sources, num_workers=num_workers, seed=seed)
        kernels = attention_kernel_scope(optimization.flash_attention_force)
        with patched_pretrain(settings), kernels, tf32_matmuls(cuda):
            pretrain.setup(
                model_name=config.name, model_config=config, out_dir=out_dir, precision=precision, resume=resume,
                initial_checkpoint_dir=initial,
                data=data, train=train, eval=eval, log=log, optimizer=optimizer, devices=devices,
                num_nodes=num_nodes, tokenizer_dir=tokenizer_dir, logger_name=logger_name, seed=seed,
            )  # fmt: skip
    return settings


def start_description(resume: bool | Path, initial_checkpoint_dir: Path | None, upcycle: UpcycleArgs) -> str:
    if resume:
        return f"resume from {resume}"
    if initial_checkpoint_dir is not None:
        return f"the weights of {initial_checkpoint_dir} (a fresh optimizer and schedule)"
    if upcycle.dense_checkpoint is not None:
        return f"upcycled from {upcycle.dense_checkpoint} (router std {upcycle.router_std}, noise {upcycle.noise})"
    return "fresh, from LitGPT's initialization"


def check_starting_weights(initial_checkpoint_dir: Path | None, upcycle: UpcycleArgs) -> None:
    if initial_checkpoint_dir is not None and upcycle.dense_checkpoint is not None:
        raise UserError("--initial_checkpoint_dir and --upcycle-from both give starting weights; choose one")
    if upcycle.noise < 0 or upcycle.router_std < 0:
        raise UserError(f"--upcycle.noise {upcycle.noise}, --upcycle.router_std {upcycle.router_std}: must be >= 0")


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


def expected_state(config, moe: MoEArgs) -> dict:
    """The state dict (on the meta device) of the model this run builds."""
    import litgpt.model
    from litgpt import GPT

    from litmoe.moe import MoELayer
    from litmoe.patches import swapped

    layer = partial(MoELayer, balance=moe) if moe.layer == "litmoe" else litgpt.model.LLaMAMoE
    with swapped(litgpt.model, "LLaMAMoE", layer), torch.device("meta"):
        return GPT(config).state_dict()


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
    tokens = check_continuation(resume, shape)
    if (done := finished_run(resume, budget)) is not None:
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
    if health.max_skips < 1 or health.spike_window < 1 or health.spike_sigmas <= 0:
        raise UserError("--health.max_skips, --health.spike_window and --health.spike_sigmas must be positive")
    if health.nonfinite == "skip" and choice.name == "deepspeed":
        raise UserError(
            "--health.nonfinite skip: DeepSpeed's engine steps before the gradient norm is known, so a step"
            " cannot be skipped; use stop (the default) under DeepSpeed"
        )


def choose_strategy(
    args: StrategyArgs, hardware: Hardware, config, precision: str, train: TrainArgs, seq_len: int,
    optimization: OptimizationArgs,
) -> StrategyChoice:  # fmt: skip
    memory_of = None
    if hardware.gpu_memory is not None and args.decided_by_auto:  # only auto, on GPUs, weighs memory
        from litmoe.estimate import estimate_training

        estimate = estimate_training(config, precision, train.micro_batch_size, seq_len)
        memory_of = memory_per_device(estimate, precision, hardware, optimization)
    return resolve_strategy(args, hardware, memory_of, compile=optimization.compile)


def memory_per_device(estimate, precision: str, hardware: Hardware, optimization: OptimizationArgs):
    """One rank's memory under a strategy choice, for this hardware and these settings."""
    from litmoe.estimate import per_device_memory

    return partial(
        per_device_memory, estimate, precision, world_size=hardware.world_size,
        devices_per_node=hardware.devices_per_node, checkpointing=optimization.gradient_checkpointing,
    )  # fmt: skip


def deepspeed_config(choice: StrategyChoice, args: StrategyArgs, train: TrainArgs) -> dict[str, Any]:
    from litmoe import zero

    if args.deepspeed_config is not None:
        return zero.user_deepspeed_config(args.deepspeed_config, train.micro_batch_size, train.max_norm)
    return zero.deepspeed_config(
        choice.zero_stage, choice.offload_optimizer, choice.offload_params, args.nvme_path, train.micro_batch_size,
        train.max_norm,
    )  # fmt: skip


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
        config = dataclasses.replace(config, vocab_size=vocab_size, padded_vocab_size=None)
        print(f"Vocabulary: {vocab_size:,} tokens from the data's tokenizer (padded to {config.padded_vocab_size:,})")
    return config


def ensure_prepared(data_dir: Path) -> Path:
    if (data_dir / MANIFEST).is_file():
        return data_dir
    if data_dir == DEFAULT_DATA_DIR:
        print(f"No prepared data in {data_dir}: preparing the default corpus (Python's own documentation) ...")
        prepare(out_dir=data_dir)
        return data_dir
    raise UserError(
        f"{data_dir / MANIFEST} not found: prepare the data first with"
        f" `python prepare_data.py --source YOUR_TEXT --out_dir {data_dir}`"
    )


def check_one_tokenizer(sources: list[DataSource], manifests: list) -> None:
    """A mixture's token ids must mean the same things in every source."""
    for source, manifest in zip(sources[1:], manifests[1:], strict=True):
        if manifest.tokenizer_fingerprint != manifests[0].tokenizer_fingerprint:
            raise UserError(
                f"--data_dir: {source.path} was prepared with another tokenizer than {sources[0].path}; prepare it"
                f" again with --tokenizer_dir {sources[0].path / 'tokenizer'}"
            )


def check_data_size(data_dir: Path, micro_batch_size: int, seq_len: int):
    """The data's manifest, once each split is known to hold at least one micro-batch."""
    manifest = read_manifest(data_dir)
    needed = micro_batch_size * (seq_len + 1)
    for split in SPLITS:
        if manifest.tokens[split] < needed:
            raise UserError(
                f"{data_dir / MANIFEST}: the {split} split has {manifest.tokens[split]:,} tokens, fewer than one"
                f" micro-batch ({micro_batch_size} x {seq_len + 1}); lower --train.micro_batch_size or"
                " --train.max_seq_length, or prepare more data"
            )
    return manifest
