"""run_train.py's command line: short flags, the train config and its named profiles, --help showing the values a
run would use, and the report-only modes (--estimate, --check-environment).

Settings come from train_config.yaml (LitGPT's pretrain arguments plus our sections), then a profile, then the
command line in LitGPT's jsonargparse style (`--train.max_tokens 2e6`) or the short flags below. A profile is a
named set of overrides in the file's `profiles:` section, chosen with `--profile NAME`; without a CUDA GPU the
`cpu` profile applies unless another is named or `--no-cpu-profile` is given.
"""

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from jsonargparse import DefaultHelpFormatter
from litgpt.args import TrainArgs

from litmoe.core.args import CheckpointArgs, HealthArgs, MoEArgs, OptimizationArgs, StrategyArgs, check_seed
from litmoe.core.cli import (
    flag_types,
    function_parser,
    normalize_flags,
    normalize_settings,
    parse_arguments,
    quiet_known_warnings,
    take_section_flags,
)
from litmoe.core.errors import UserError
from litmoe.core.user_files import read_yaml_file
from litmoe.model.configs import model_setting
from litmoe.training.run import setup
from litmoe.training.settings import resolve_optimizer

DEFAULT_TRAIN_CONFIG = Path("train_config.yaml")
DEFAULT_MODEL = "model_config.yaml"
PROFILES, CPU_PROFILE = "profiles", "cpu"

# Short flags users know: what each stands for, and what it does.
SWITCHES = {
    "--compile": ("--optimization.compile=true", "compile the model with torch.compile"),
    "--no-compile": ("--optimization.compile=false", "train the model as it is, without torch.compile"),
    "--compile-dynamic": ("--optimization.compile_dynamic=true", "compile for dynamic shapes"),
    "--flash-attention": ("--optimization.flash_attention=true", "report the attention kernel; warn without flash"),
    "--no-flash-attention": ("--optimization.flash_attention=false", "skip the FlashAttention check"),
    "--flash-attention-force": ("--optimization.flash_attention_force=true", "refuse to train without FlashAttention"),
    "--gradient-checkpointing": ("--optimization.gradient_checkpointing=true", "recompute activations: less memory"),
    "--progress": ("--progress=true", "show a live progress bar"),
    "--stock-moe": ("--moe.layer=stock", "train with LitGPT's stock LLaMAMoE, for comparison"),
}
RENAMED = {
    "--compile-mode": ("--optimization.compile_mode", "torch.compile mode (default, max-autotune, ...)"),
    "--strategy": ("--strategy.name", "auto, single, ddp, fsdp or deepspeed"),
    "--zero-stage": ("--strategy.zero_stage", "DeepSpeed ZeRO stage 1, 2 or 3 (means --strategy deepspeed)"),
    "--offload-optimizer": ("--strategy.offload_optimizer", "DeepSpeed: optimizer state to cpu or nvme"),
    "--offload-params": ("--strategy.offload_params", "DeepSpeed ZeRO-3: weights to cpu or nvme"),
    "--nvme-path": ("--strategy.nvme_path", "a directory on a local NVMe disk, for nvme offload"),
    "--deepspeed-config": ("--strategy.deepspeed_config", "your own DeepSpeed JSON config"),
    "--num-nodes": ("--num_nodes", "how many nodes"),
    "--initial-checkpoint-dir": ("--initial_checkpoint_dir", "start from these weights: fresh optimizer and schedule"),
    "--upcycle-from": ("--upcycle.dense_checkpoint", "start the MoE from a dense checkpoint (sparse upcycling)"),
    "--timeout-minutes": ("--strategy.timeout_minutes", "how long a collective waits for the other ranks"),
    "--keep-last": ("--checkpoint.keep_last", "keep only the newest N step-* checkpoints"),
    "--train.keep_last": ("--checkpoint.keep_last", "the same"),
}
MODES = {
    "--model.FIELD VALUE": "change one field of the model config (--model.n_expert 16, --model.n_layer 6)",
    "--config FILE": "another train config instead of train_config.yaml",
    "--profile NAME": "apply the train config's profile NAME (cpu, small-gpu)",
    "--no-cpu-profile": "without a CUDA GPU, run the file's own settings instead of the cpu profile",
    "--estimate": "print parameters, FLOPs, memory per device and speed, then exit",
    "--check-environment": "print what this machine can do for training, then exit",
    "--verify": "check out_dir's checkpoints and the data against their SHA256SUMS, one line each, then exit",
}


def expand_short_flags(argv: list[str]) -> list[str]:
    expanded = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        if arg in SWITCHES:
            expanded.append(SWITCHES[arg][0])
        elif name in RENAMED:
            expanded.append(RENAMED[name][0] + sep + value)
        else:
            expanded.append(arg)
    return expanded


def take_flag(argv: list[str], flag: str, with_value: bool = False) -> tuple[list[str], str | bool | None]:
    """Remove `flag` (and its value) from argv; returns the rest and the value (True for a bare flag). A value given
    twice, or empty, is refused: keeping one of them would drop the other without a word."""
    rest, found = [], None
    args = iter(argv)
    for arg in args:
        if arg != flag and not (with_value and arg.startswith(flag + "=")):
            rest.append(arg)
            continue
        if not with_value:
            found = True
            continue
        value = next(args, None) if arg == flag else arg.split("=", 1)[1]
        if value is None or not value.strip():
            raise UserError(f"{flag} needs a value")
        if found is not None:
            raise UserError(f"{flag} given twice ({found}, {value}); give one, and override its settings with flags")
        found = value
    return rest, found


def load_train_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: train config not found; pass --config FILE or restore train_config.yaml")
    config = read_yaml_file(path, "a train config", "fix the file (train_config.yaml shows every section)") or {}
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a mapping of settings at the top level")
    if isinstance(config.get("strategy"), str):  # `strategy: deepspeed` for `strategy: {name: deepspeed}`
        config["strategy"] = {"name": config["strategy"]}
    for key in config:
        if "." in str(key) and given_nested(config, str(key).split(".")):
            section = str(key).split(".")[0]
            raise UserError(f"{path}: {key} is set twice, as `{key}:` and under `{section}:`; keep one")
    return config


def given_nested(config: dict[str, Any], parts: list[str]) -> bool:
    """Whether the mapping holds the dotted key `parts` as nested sections (`train: {max_tokens: ...}`)."""
    for part in parts:
        if not isinstance(config, dict) or part not in config:
            return False
        config = config[part]
    return True


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = deep_merge(merged[key], value) if both_dicts else value
    return merged


def chosen_profile(profiles: dict[str, Any], named: str | None, no_cpu_profile: bool, path: Path) -> str | None:
    if named is not None:
        if named not in profiles:
            raise UserError(f"--profile {named}: {path} has no such profile; it has {', '.join(profiles) or 'none'}")
        return named
    if CPU_PROFILE in profiles and not no_cpu_profile and not torch.cuda.is_available():
        return CPU_PROFILE
    return None


def describe_profile(profile: dict[str, Any]) -> str:
    train = profile.get("train", {})
    parts = [f"model {profile['model']}"] if "model" in profile else []
    if "max_tokens" in train:
        parts.append(f"{float(train['max_tokens']):,.0f} tokens")
    if "max_seq_length" in train:
        parts.append(f"sequences of {train['max_seq_length']}")
    if "micro_batch_size" in train:
        parts.append(f"micro-batch {train['micro_batch_size']}")
    return ", ".join(parts)


def flat_settings(settings: dict[str, Any], types_of: dict[str, Any]) -> dict[str, Any]:
    """Config sections as the parser's dotted keys (`train: {max_tokens: 1}` -> `train.max_tokens`)."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and any(flag.startswith(f"--{key}.") for flag in types_of):
            flat.update({f"{key}.{name}": item for name, item in value.items()})
        else:
            flat[key] = value
    return flat


class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help formatter, keeping the description's line breaks (the short-flag table)."""


def help_description() -> str:
    rows = [(flag, f"{text} ({target})") for flag, (target, text) in {**SWITCHES, **RENAMED}.items()]
    rows += list(MODES.items())
    width = max(len(flag) for flag, _ in rows)
    table = "\n".join(f"  {flag:<{width}}  {text}" for flag, text in rows)
    return (
        "Pretrain an MoE model with LitGPT's pretrain loop. The defaults shown below are this run's: the train"
        "\nconfig with its profile applied. Short flags:\n" + table
    )


# LitGPT's argument classes serve all its scripts; what pretraining does not read says so in --help.
LIGHTNING_LOGGER_ONLY = "not used here: only LitGPT's Lightning logger reads it, which --logger_name does not offer"
NOT_READ_HERE = {
    "train.epochs": "refused here: the budget is --train.max_tokens",
    "train.max_steps": "refused here: the budget is --train.max_tokens",
    "eval.evaluate_example": "not used here: LitGPT's fine-tuning scripts read it",
    "eval.max_new_tokens": "refused here: LitGPT's fine-tuning scripts read it",
    **{
        f"log.{name}": LIGHTNING_LOGGER_ONLY
        for name in ("teamspace", "metadata", "log_model", "save_logs", "checkpoint_name")
    },
    **{f"log.{name}": "--logger_name wandb only" for name in ("project", "run", "group")},
}


def build_parser(settings: dict[str, Any], types_of: dict[str, Any], config_path: Path):
    parser = function_parser(setup, prog="run_train.py", description=help_description(), formatter_class=HelpFormatter)
    for action in parser._actions:  # jsonargparse builds the help from these; no public way to amend one
        if action.dest in NOT_READ_HERE:
            action.help = f"({NOT_READ_HERE[action.dest]}) {action.help}"
    sections = {key for key in settings if any(flag.startswith(f"--{key}.") for flag in types_of)}
    for section in sections:
        if settings[section] is not None and not isinstance(settings[section], dict):
            raise UserError(
                f"{config_path}: `{section}:` is {settings[section]!r}, not a mapping of settings; write `{section}:`"
                " with its keys indented below it (train_config.yaml shows them)"
            )
    settings = {key: value for key, value in settings.items() if key not in sections or value is not None}
    try:
        parser.set_defaults(flat_settings(normalize_settings(settings, types_of), types_of))
    except KeyError as err:
        key = str(err).split('"')[1] if '"' in str(err) else str(err)
        raise UserError(f"{config_path}: unknown setting {key!r}; see run_train.py --help for the keys") from None
    return parser


def main(argv: list[str] | None = None):
    """Train; or only report: what this machine can do (--check-environment), what the run needs (--estimate), or
    whether its checkpoints and data are intact (--verify)."""
    quiet_known_warnings()
    argv = expand_short_flags(sys.argv[1:] if argv is None else argv)
    argv, config_file = take_flag(argv, "--config", with_value=True)
    argv, profile_name = take_flag(argv, "--profile", with_value=True)
    argv, no_cpu_profile = take_flag(argv, "--no-cpu-profile")
    argv, environment_only = take_flag(argv, "--check-environment")
    argv, estimate_only = take_flag(argv, "--estimate")
    argv, verify_only = take_flag(argv, "--verify")
    argv, optimizer_flags = take_section_flags(argv, "--optimizer")
    argv, model_flags = take_section_flags(argv, "--model")
    path = Path(config_file or DEFAULT_TRAIN_CONFIG)
    settings = load_train_config(path)
    profiles = settings.pop(PROFILES, None) or {}
    if not isinstance(profiles, dict) or not all(isinstance(value, dict) for value in profiles.values()):
        raise UserError(f"{path}: `{PROFILES}:` must map profile names to settings")
    profile = chosen_profile(profiles, profile_name, bool(no_cpu_profile), path)
    if profile is not None:
        settings = deep_merge(settings, profiles[profile])
    settings["optimizer"] = resolve_optimizer(settings.get("optimizer"), optimizer_flags)
    settings["model"] = model_setting(settings.get("model", DEFAULT_MODEL), model_flags)
    types = flag_types(setup)
    namespace = parse_arguments(build_parser(settings, types, path), normalize_flags(argv, types), types)
    kwargs = {key: value for key, value in vars(namespace).items() if key != "config"}
    if profile == CPU_PROFILE and profile_name is None:
        print(
            f"No CUDA GPU: using the CPU profile of the train config ({describe_profile(profiles[profile])})."
            " Command-line settings still apply; --no-cpu-profile runs the full recipe on the CPU."
        )
    elif profile is not None:
        print(f"Using the {profile} profile of the train config ({describe_profile(profiles[profile])}).")
    if environment_only:
        from litmoe.distributed.environment import check_environment

        check_environment(Path(kwargs["out_dir"]))
        return None
    if estimate_only:
        print_estimate(**kwargs)
        return None
    if verify_only:
        from litmoe.core.checkpoint_io import verify
        from litmoe.data.training_data import data_sources

        verify([Path(kwargs["out_dir"]), *(source.path for source in data_sources(kwargs["data_dir"]))])
        return None
    return setup(**kwargs)


def print_estimate(
    model: str | dict, data_dir: str | list, precision: str | None, train: TrainArgs, optimization: OptimizationArgs,
    strategy: StrategyArgs, devices: int | str, num_nodes: int, moe: MoEArgs, checkpoint: CheckpointArgs,
    health: HealthArgs, seed: int, resume: bool | str | Path, out_dir: Path, **unused: Any,
) -> None:  # fmt: skip
    """Parameters, FLOPs, per-device memory and speed of this run's settings, without allocating the model.

    An explicit --strategy (with --devices and --num_nodes) is estimated even where it could not run, so that a
    run can be planned on another machine; `auto` decides for this machine's hardware. The settings a run checks
    that do not depend on this machine or the data are checked here too: an estimate is no promise otherwise. With
    --resume: what the resume would continue on this hardware (ranks old -> new, global batch, steps left)."""
    from litmoe.data.prepared import MANIFEST
    from litmoe.data.tokenizer import load_tokenizer
    from litmoe.data.training_data import data_sources
    from litmoe.distributed.estimate import describe, estimate_training
    from litmoe.distributed.expert_parallel import auto_expert_split
    from litmoe.distributed.plans import Hardware
    from litmoe.distributed.strategy import (
        check_expert_parallel_precision,
        requested,
        resolve_strategy,
        with_expert_parallel,
    )
    from litmoe.model.attention import default_precision
    from litmoe.model.configs import load_model_config
    from litmoe.training.resume import RunShape, resume_summary
    from litmoe.training.run import check_run_care, fit_vocabulary, memory_per_device
    from litmoe.training.settings import check_moe, check_nodes, device_count, sequence_length, whole_steps

    check_seed(seed)
    check_moe(moe)
    check_nodes(num_nodes)
    config = load_model_config(model)
    first = data_sources(data_dir)[0].path
    if (first / MANIFEST).is_file():  # size the vocabulary as training would
        config = fit_vocabulary(config, load_tokenizer(first / "tokenizer"))
    precision = precision or default_precision(training=True)
    hardware = Hardware.here(device_count(devices), num_nodes)
    seq_len = sequence_length(train, config.block_size)
    estimate = estimate_training(config, precision, train.micro_batch_size, seq_len)
    memory_of = memory_per_device(estimate, precision, hardware, optimization)
    if strategy.decided_by_auto:
        split = auto_expert_split(config, moe.layer, hardware.devices_per_node)
        choice = resolve_strategy(strategy, hardware, memory_of, optimization.compile, split, precision)
    else:
        choice = with_expert_parallel(requested(strategy, hardware.world_size), strategy.expert_parallel, hardware)
    check_expert_parallel_precision(choice, precision)
    check_run_care(checkpoint, health, strategy, choice)
    print(describe(estimate, config, precision, choice, memory_of(choice), optimization.gradient_checkpointing,
                   hardware.world_size, hardware.devices_per_node,
                   max_tokens=train.max_tokens and float(train.max_tokens)))  # fmt: skip
    if resume:
        shape = RunShape.of(config, hardware.world_size, train, seq_len, data_dir, seed, moe.layer)
        budget = whole_steps(train, seq_len)
        print(resume_summary(resume, Path(out_dir), shape, budget, choice.name == "deepspeed"))
