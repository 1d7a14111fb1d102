"""run_train.py: read the configs, check everything a user can get wrong, then run LitGPT's pretrain loop
with our patches (litmoe.patches).

Settings come from train_config.yaml (LitGPT's pretrain arguments plus `optimization:`), overridden on the
command line in LitGPT's jsonargparse style (`--train.max_tokens 2e6`) or with the short flags below. On a
machine without a CUDA GPU, the file's `cpu_profile:` section is applied first (a small model and budget
that finish in minutes); `--no-cpu-profile` turns that off.
"""

import dataclasses
import sys
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from litgpt.args import EvalArgs, LogArgs, TrainArgs

from litmoe.args import CheckpointArgs, HealthArgs, MoEArgs, OptimizationArgs, StrategyArgs
from litmoe.attention import attention_kernel_scope, check_attention, default_precision
from litmoe.checkpoints import (
    tokenizer_vocab_size,
)
from litmoe.cli import flag_types, function_parser, normalize_flags, normalize_settings, parse_arguments, read_yaml
from litmoe.configs import load_model_config
from litmoe.data import MANIFEST, SPLITS, prepare, read_manifest
from litmoe.errors import UserError
from litmoe.patches import PatchSettings, patched_pretrain
from litmoe.resume import RunShape, check_continuation, finished_run, model_fields, resolve_resume
from litmoe.run_lock import launching_process, run_lock
from litmoe.saving import recover_interrupted_saves
from litmoe.settings import (
    check_devices,
    check_training,
    device_count,
    learning_rate,
    resolve_optimizer,
    sequence_length,
    take_optimizer_flags,
)
from litmoe.strategy import Hardware, StrategyChoice, adopt_launcher_node_rank, resolve_strategy
from litmoe.tokenizer import load_tokenizer

DEFAULT_TRAIN_CONFIG = Path("train_config.yaml")
DEFAULT_DATA_DIR = Path("data/default")
CPU_PROFILE = "cpu_profile"

# Noise from pinned dependencies: litdata asks PyPI for a newer version of itself (we pin it deliberately),
# LitData pins memory even when there is no accelerator to pin it for, and LitGPT's TrainArgs warns about
# max_steps, which its pretrain loop ignores (and litmoe.settings refuses).
KNOWN_WARNINGS = (
    "A newer version of litdata is available",
    "'pin_memory' argument is set as true",
    "`--train.lr_warmup_steps` should be less than `--train.max_steps`",
)

# Short flags users know, rewritten to the jsonargparse keys they stand for.
SWITCHES = {
    "--compile": "--optimization.compile=true",
    "--no-compile": "--optimization.compile=false",
    "--compile-dynamic": "--optimization.compile_dynamic=true",
    "--flash-attention": "--optimization.flash_attention=true",
    "--no-flash-attention": "--optimization.flash_attention=false",
    "--flash-attention-force": "--optimization.flash_attention_force=true",
    "--gradient-checkpointing": "--optimization.gradient_checkpointing=true",
    "--progress": "--progress=true",
    "--stock-moe": "--moe.layer=stock",
}
RENAMED = {
    "--compile-mode": "--optimization.compile_mode",
    "--strategy": "--strategy.name",
    "--zero-stage": "--strategy.zero_stage",
    "--offload-optimizer": "--strategy.offload_optimizer",
    "--offload-params": "--strategy.offload_params",
    "--nvme-path": "--strategy.nvme_path",
    "--deepspeed-config": "--strategy.deepspeed_config",
    "--num-nodes": "--num_nodes",
    "--timeout-minutes": "--strategy.timeout_minutes",
    "--keep-last": "--checkpoint.keep_last",
    "--train.keep_last": "--checkpoint.keep_last",
}


def setup(
    model: str = "model_config.yaml",
    data_dir: Path = DEFAULT_DATA_DIR,
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
    devices: int | str = "auto",
    num_nodes: int = 1,
    num_workers: int = 2,
    logger_name: Literal["tensorboard", "csv", "wandb", "mlflow"] = "tensorboard",
    seed: int = 42,
    progress: bool = False,
) -> PatchSettings | None:
    """Pretrain an MoE model with LitGPT's pretrain loop (returns None when --resume finds the run finished).

    Args:
        model: A model config YAML file (a LitGPT Config) or the name of a registered config (MoE-200M, MoE-tiny).
        data_dir: Data prepared by prepare_data.py. The default corpus is prepared on first use.
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
    data_dir = ensure_prepared(Path(data_dir))
    config = fit_vocabulary(config, load_tokenizer(data_dir / "tokenizer"))
    check_data_size(data_dir, train.micro_batch_size, seq_len)
    adopt_launcher_node_rank()
    hardware = Hardware.here(devices_per_node, num_nodes)
    choice = choose_strategy(strategy, hardware, config, precision, train, seq_len, optimization)
    print(f"Strategy: {choice.label(hardware.world_size, hardware.devices_per_node)} ({choice.reason})")
    check_run_care(checkpoint, health, strategy, choice)
    out_dir = Path(out_dir)
    shape = RunShape(
        model_fields(config), hardware.world_size, train.micro_batch_size, train.global_batch_size, seq_len,
        str(data_dir), seed, num_workers,
    )  # fmt: skip
    with run_lock(out_dir):
        point = resume_point(resume, out_dir, choice, shape, int(train.max_tokens))
        if point is None:
            return None
        resume, resume_tokens = point
        check_attention(
            torch.device("cuda" if cuda else "cpu"), precision, config.n_head, config.head_size,
            optimization.flash_attention, optimization.flash_attention_force,
        )  # fmt: skip
        if not cuda and optimization.keep_host_memory:
            from litmoe.host_memory import keep_freed_host_memory

            keep_freed_host_memory()

        from litgpt import pretrain
        from litgpt.data import LitData

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
        )
        data = LitData(data_path=data_dir, split_names=SPLITS, num_workers=num_workers, seed=seed)
        with patched_pretrain(settings), attention_kernel_scope(optimization.flash_attention_force):
            pretrain.setup(
                model_name=config.name, model_config=config, out_dir=out_dir, precision=precision, resume=resume,
                data=data, train=train, eval=eval, log=log, optimizer=optimizer, devices=devices,
                num_nodes=num_nodes, tokenizer_dir=data_dir / "tokenizer", logger_name=logger_name, seed=seed,
            )  # fmt: skip
    return settings


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


def check_data_size(data_dir: Path, micro_batch_size: int, seq_len: int) -> None:
    manifest = read_manifest(data_dir)
    needed = micro_batch_size * (seq_len + 1)
    for split in SPLITS:
        if manifest.tokens[split] < needed:
            raise UserError(
                f"{data_dir / MANIFEST}: the {split} split has {manifest.tokens[split]:,} tokens, fewer than one"
                f" micro-batch ({micro_batch_size} x {seq_len + 1}); lower --train.micro_batch_size or"
                " --train.max_seq_length, or prepare more data"
            )


# ------------------------------------------------------------------------------------------ command line


def expand_short_flags(argv: list[str]) -> list[str]:
    expanded = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        if arg in SWITCHES:
            expanded.append(SWITCHES[arg])
        elif name in RENAMED:
            expanded.append(RENAMED[name] + sep + value)
        else:
            expanded.append(arg)
    return expanded


def take_flag(argv: list[str], flag: str, with_value: bool = False) -> tuple[list[str], str | bool | None]:
    """Remove `flag` (and its value) from argv; returns the rest and the value (True for a bare flag)."""
    rest, found = [], None
    args = iter(argv)
    for arg in args:
        if arg == flag:
            found = next(args, None) if with_value else True
            if with_value and found is None:
                raise UserError(f"{flag} needs a value")
        elif with_value and arg.startswith(flag + "="):
            found = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return rest, found


def load_train_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: train config not found; pass --config FILE or restore train_config.yaml")
    try:
        config = read_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a mapping of settings at the top level")
    if isinstance(config.get("strategy"), str):  # `strategy: deepspeed` for `strategy: {name: deepspeed}`
        config["strategy"] = {"name": config["strategy"]}
    return config


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = deep_merge(merged[key], value) if both_dicts else value
    return merged


def describe_cpu_profile(profile: dict[str, Any]) -> str:
    train = profile.get("train", {})
    parts = [f"model {profile.get('model', '?')}", f"{float(train.get('max_tokens', 0)):,.0f} tokens"]
    if "max_seq_length" in train:
        parts.append(f"sequences of {train['max_seq_length']}")
    return ", ".join(parts)


def build_parser():
    return function_parser(
        setup,
        prog="run_train.py",
        description="Pretrain an MoE model with LitGPT. Short flags: "
        + ", ".join([*SWITCHES, *RENAMED])
        + ", --no-cpu-profile, --check-environment, --estimate, --config FILE.",
    )


def main(argv: list[str] | None = None) -> PatchSettings | None:
    """Train; or only report: what this machine can do (--check-environment), or what the run needs (--estimate)."""
    for message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    argv = expand_short_flags(sys.argv[1:] if argv is None else argv)
    argv, config_file = take_flag(argv, "--config", with_value=True)
    argv, no_cpu_profile = take_flag(argv, "--no-cpu-profile")
    argv, environment_only = take_flag(argv, "--check-environment")
    argv, estimate_only = take_flag(argv, "--estimate")
    argv, optimizer_flags = take_optimizer_flags(argv)
    settings = load_train_config(Path(config_file or DEFAULT_TRAIN_CONFIG))
    cpu_profile = settings.pop(CPU_PROFILE, None)
    use_cpu_profile = cpu_profile and not no_cpu_profile and not torch.cuda.is_available()
    if use_cpu_profile:
        settings = deep_merge(settings, cpu_profile)
    settings["optimizer"] = resolve_optimizer(settings.get("optimizer"), optimizer_flags)
    types = flag_types(setup)
    arguments = ["--config", yaml.safe_dump(normalize_settings(settings, types)), *normalize_flags(argv, types)]
    namespace = parse_arguments(build_parser(), arguments, types)
    kwargs = {key: value for key, value in vars(namespace).items() if key != "config"}
    if use_cpu_profile:
        print(
            f"No CUDA GPU: using the CPU profile of the train config ({describe_cpu_profile(cpu_profile)})."
            " Command-line settings still apply; --no-cpu-profile runs the full recipe on the CPU."
        )
    if environment_only:
        from litmoe.environment import check_environment

        check_environment(Path(kwargs["out_dir"]))
        return None
    if estimate_only:
        print_estimate(**kwargs)
        return None
    return setup(**kwargs)


def print_estimate(model: str, data_dir: Path, precision: str | None, train: TrainArgs, optimization: OptimizationArgs,
                   strategy: StrategyArgs, devices: int | str, num_nodes: int, **unused: Any) -> None:  # fmt: skip
    """Parameters, FLOPs, per-device memory and speed of this run's settings, without allocating the model.

    An explicit --strategy (with --devices and --num_nodes) is estimated even where it could not run, so that a
    run can be planned on another machine; `auto` decides for this machine's hardware."""
    from litmoe.estimate import describe, estimate_training
    from litmoe.strategy import requested

    config = load_model_config(model)
    if (Path(data_dir) / MANIFEST).is_file():  # size the vocabulary as training would
        config = fit_vocabulary(config, load_tokenizer(Path(data_dir) / "tokenizer"))
    precision = precision or default_precision(training=True)
    hardware = Hardware.here(device_count(devices), num_nodes)
    seq_len = sequence_length(train, config.block_size)
    estimate = estimate_training(config, precision, train.micro_batch_size, seq_len)
    memory_of = memory_per_device(estimate, precision, hardware, optimization)
    if strategy.decided_by_auto:
        choice = resolve_strategy(strategy, hardware, memory_of, compile=optimization.compile)
    else:
        choice = requested(strategy, hardware.world_size)
    print(describe(estimate, config, precision, choice, memory_of(choice), optimization.gradient_checkpointing,
                   hardware.world_size, hardware.devices_per_node,
                   max_tokens=train.max_tokens and float(train.max_tokens)))  # fmt: skip
