"""The MoE model configs this project trains, registered in LitGPT's config registry, and model configs read
from files, checked as a whole before any model is built.

After `register_configs()`, `litgpt.Config.from_name("MoE-200M")` works, and so do LitGPT's own tools that
look a config up by name in the same process.
"""

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from litmoe.core.cli import allows, describe_type
from litmoe.core.errors import UserError
from litmoe.core.user_files import read_flag_value, read_yaml_file

# Shared by every config here: a LLaMA-style decoder (pre-norm RMSNorm, full RoPE, SwiGLU experts).
_LLAMA_MOE = dict(
    norm_class_name="RMSNorm",
    norm_eps=1e-5,
    bias=False,
    parallel_residual=False,
    rotary_percentage=1.0,
    rope_base=10000,
    mlp_class_name="LLaMAMoE",
    padding_multiple=512,
)

MOE_CONFIGS: list[dict[str, Any]] = [
    # The recipe: 550M parameters in total, 132M active per token (8 experts, top-2).
    dict(
        name="MoE-200M",
        hf_config=dict(org="litmoe", name="MoE-200M"),
        block_size=2048,
        vocab_size=50257,
        n_layer=12,
        n_embd=768,
        n_head=12,
        n_query_groups=4,
        intermediate_size=2048,
        moe_intermediate_size=2048,
        n_expert=8,
        n_expert_per_token=2,
        **_LLAMA_MOE,
    ),
    # A ladder for scaling runs, from about 1B to about 8B parameters in total (docs/training.md: "Presets").
    # Coarse experts (8, top-2, Mixtral-style) and one fine-grained model in the DeepSeekMoE/OLMoE style: many
    # small experts, a higher top-k and a shared expert always on.
    dict(
        name="MoE-1B",
        hf_config=dict(org="litmoe", name="MoE-1B"),
        block_size=2048,
        vocab_size=50257,
        n_layer=16,
        n_embd=1024,
        n_head=16,
        n_query_groups=4,
        intermediate_size=2048,
        moe_intermediate_size=2048,
        n_expert=8,
        n_expert_per_token=2,
        **_LLAMA_MOE,
    ),
    dict(
        name="MoE-FG-2B",
        hf_config=dict(org="litmoe", name="MoE-FG-2B"),
        block_size=2048,
        vocab_size=50257,
        n_layer=16,
        n_embd=1536,
        n_head=12,
        n_query_groups=4,
        intermediate_size=1536,
        moe_intermediate_size=384,
        n_expert=64,
        n_expert_per_token=8,
        n_shared_expert=4,  # one shared expert of 4 x 384
        **_LLAMA_MOE,
    ),
    dict(
        name="MoE-4B",
        hf_config=dict(org="litmoe", name="MoE-4B"),
        block_size=4096,
        vocab_size=50257,
        n_layer=24,
        n_embd=1536,
        n_head=12,
        n_query_groups=4,
        intermediate_size=4096,
        moe_intermediate_size=4096,
        n_expert=8,
        n_expert_per_token=2,
        **_LLAMA_MOE,
    ),
    dict(
        name="MoE-8B",
        hf_config=dict(org="litmoe", name="MoE-8B"),
        block_size=4096,
        vocab_size=50257,
        n_layer=32,
        n_embd=2048,
        n_head=16,
        n_query_groups=8,
        intermediate_size=4608,
        moe_intermediate_size=4608,
        n_expert=8,
        n_expert_per_token=2,
        **_LLAMA_MOE,
    ),
    # Sized for CPU runs and tests: trains at several thousand tokens/s on two cores.
    dict(
        name="MoE-tiny",
        hf_config=dict(org="litmoe", name="MoE-tiny"),
        block_size=256,
        vocab_size=8192,
        n_layer=4,
        n_embd=192,
        n_head=6,
        n_query_groups=2,
        intermediate_size=512,
        moe_intermediate_size=512,
        n_expert=4,
        n_expert_per_token=2,
        **_LLAMA_MOE,
    ),
    # MoE-tiny's dense sibling (one SwiGLU MLP of the experts' size), to upcycle into MoE-tiny.
    dict(
        name="Dense-tiny",
        hf_config=dict(org="litmoe", name="Dense-tiny"),
        block_size=256,
        vocab_size=8192,
        n_layer=4,
        n_embd=192,
        n_head=6,
        n_query_groups=2,
        intermediate_size=512,
        **{**_LLAMA_MOE, "mlp_class_name": "LLaMAMLP"},
    ),
]


def register_configs() -> None:
    """Add our configs to LitGPT's registry (idempotent)."""
    from litgpt import config as litgpt_config

    for conf in MOE_CONFIGS:
        if conf["name"] not in litgpt_config.name_to_config:
            litgpt_config.configs.append(conf)
        litgpt_config.name_to_config[conf["name"]] = conf


# ------------------------------------------------------------------------------------- loading and checks

POSITIVE_FIELDS = ("block_size", "n_layer", "n_embd", "vocab_size", "padding_multiple", "n_head")
POSITIVE_IF_SET = ("n_query_groups", "head_size", "intermediate_size", "moe_intermediate_size", "padded_vocab_size")


MAX_ROPE_CACHE = 4 * 2**30  # bytes; a 1M-token context with head size 128 needs 1 GiB

# Fields LitGPT derives from others: a changed n_embd must not keep the file's head size, and so on.
DERIVED_FIELDS = {"head_size": ("n_embd", "n_head"), "padded_vocab_size": ("vocab_size", "padding_multiple")}


def model_setting(configured: str | dict[str, Any], flags: list[tuple[str, str]]) -> str | dict[str, Any]:
    """The `model` setting with `--model FILE_OR_NAME` and `--model.FIELD VALUE` applied: a name or file, or a
    mapping `{from: FILE_OR_NAME, FIELD: VALUE, ...}` when fields are changed."""
    setting = dict(configured) if isinstance(configured, dict) else {"from": configured}
    for flag, text in flags:
        field = flag.removeprefix("--model").removeprefix(".")
        setting[field or "from"] = read_flag_value(flag, text) if field else text
    return setting if set(setting) != {"from"} else setting["from"]


def load_model_config(model: str | dict[str, Any]):
    """A LitGPT `Config` from a YAML file or a registered name, with the fields a mapping changes, checked as a
    whole before anything is built."""
    from litgpt import Config

    changes = dict(model) if isinstance(model, dict) else {"from": model}
    base = str(changes.pop("from", "model_config.yaml"))
    fields, where = base_model_fields(base)
    if changes:
        types = {field.name: field.type for field in dataclasses.fields(Config)}
        for key, value in changes.items():
            if key not in types:
                raise UserError(f"--model.{key}: not a field of litgpt.Config; see model_config.yaml for the fields")
            if isinstance(value, float) and value.is_integer() and allows(types[key], int):  # --model.rope_base 5e5
                changes[key] = int(value)
        for derived, sources in DERIVED_FIELDS.items():
            if derived not in changes and set(sources) & set(changes):
                fields.pop(derived, None)
        fields = {**fields, **changes}
        where += " with " + ", ".join(f"{key} {value}" for key, value in changes.items())
    check_model_fields(fields, where)
    return Config(**fields)


def base_model_fields(model: str) -> tuple[dict[str, Any], str]:
    from litgpt.config import name_to_config

    register_configs()
    path = Path(model)
    if path.is_file():
        return read_config_file(path), str(path)
    if model in name_to_config:
        return dict(name_to_config[model]), f"--model {model}"
    raise UserError(
        f"--model {model}: neither a config file nor a registered config; try model_config.yaml or one of"
        f" {', '.join(conf['name'] for conf in MOE_CONFIGS)}"
    )


def read_config_file(path: Path) -> dict[str, Any]:
    fields = read_yaml_file(path, "a model config", "fix the file, or pass a registered name such as MoE-200M")
    if not isinstance(fields, dict):
        raise UserError(f"{path}: expected a mapping of litgpt.Config fields (name: MoE-200M, n_layer: 12, ...)")
    return fields


def checkpoint_model_config(checkpoint_dir: Path, flag: str = "--checkpoint"):
    """A checkpoint's model_config.yaml as a `litgpt.Config`, checked as a --model file is: a missing, empty,
    unparsable or impossible config is one line naming the file."""
    from litgpt import Config

    path = Path(checkpoint_dir) / "model_config.yaml"
    if not path.is_file():
        raise UserError(f"{flag} {checkpoint_dir}: no model_config.yaml; give a checkpoint dir written by LitGPT")
    fields = read_config_file(path)
    check_model_fields(fields, str(path))
    return Config(**fields)


# The keys of `rope_adjustments` LitGPT's model reads (litgpt.model.GPT.rope_cache and its attention's mscale);
# tests/test_patches.py fails if a LitGPT upgrade reads others.
ROPE_ADJUSTMENTS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len", "beta_fast", "beta_slow",
                    "mscale", "mscale_all_dim")  # fmt: skip


MAX_EXPERTS = 4096  # per layer: 16x the most any published MoE routes over


def check_model_fields(fields: dict[str, Any], where: str) -> None:
    """Every key a Config field of the right type, and a shape the model can be built with."""
    from litgpt import Config

    types = {field.name: field.type for field in dataclasses.fields(Config)}
    for key, value in fields.items():
        if key not in types:
            raise UserError(f"{where}: unknown key {key!r}; keys must be fields of litgpt.Config")
        if not conforms(value, types[key]):
            raise UserError(f"{where}: {key} is {value!r}, expected {describe_type(types[key])}")
    unknown = sorted(set(fields.get("rope_adjustments") or {}) - set(ROPE_ADJUSTMENTS))
    if unknown:
        raise UserError(
            f"{where}: rope_adjustments has unknown key {unknown[0]!r}; LitGPT reads factor, low_freq_factor,"
            " high_freq_factor, original_max_seq_len (Llama 3) or factor, beta_fast, beta_slow, original_max_seq_len,"
            " mscale, mscale_all_dim (YaRN)"
        )
    config = {field.name: field.default for field in dataclasses.fields(Config)} | fields
    for key in POSITIVE_FIELDS + POSITIVE_IF_SET:
        if config.get(key) is not None and config[key] < 1:
            raise UserError(f"{where}: {key} is {config[key]}; it must be a positive integer")
    check_shape(config, where)


def check_shape(config: dict[str, Any], where: str) -> None:
    n_embd, n_head = config["n_embd"], config["n_head"]
    if config["head_size"] is None and n_embd % n_head:
        divisors = [n for n in range(1, min(n_embd, 64) + 1) if n_embd % n == 0]
        raise UserError(f"{where}: n_head {n_head} does not divide n_embd {n_embd}; use one of {divisors[-6:]}")
    if config["n_query_groups"] is not None and n_head % config["n_query_groups"]:
        raise UserError(
            f"{where}: n_query_groups {config['n_query_groups']} does not divide n_head {n_head}; each query"
            " group must hold the same number of heads"
        )
    head_size = config["head_size"] or n_embd // n_head
    if not 0 < config["rotary_percentage"] <= 1 or int(config["rotary_percentage"] * head_size) % 2:
        raise UserError(
            f"{where}: rotary_percentage {config['rotary_percentage']} of head size {head_size} must give an even"
            " number of rotary dimensions (1.0 with an even head size always does)"
        )
    rope_cache = 2 * 4 * config["block_size"] * int(config["rotary_percentage"] * head_size)  # cos and sin, fp32
    if rope_cache > MAX_ROPE_CACHE:
        raise UserError(
            f"{where}: block_size {config['block_size']:,} would allocate a {rope_cache / 2**30:.0f} GiB rotary cache"
            " when the model is built (cos and sin of every position); it is the longest context the model"
            " supports, e.g. 2048 for MoE-200M: check it for a typo"
        )
    if config["mlp_class_name"] == "LLaMAMoE":
        check_experts(config, where)


def check_experts(config: dict[str, Any], where: str) -> None:
    n_expert, top_k = config["n_expert"], config["n_expert_per_token"]
    if n_expert < 1 or not 1 <= top_k <= n_expert:
        raise UserError(
            f"{where}: n_expert_per_token {top_k} with n_expert {n_expert}; an MoE layer routes each token to"
            " between 1 and n_expert experts"
        )
    if n_expert > MAX_EXPERTS:
        raise UserError(
            f"{where}: {n_expert:,} experts per layer is more than {MAX_EXPERTS:,}, which no MoE has (DeepSeek-V3 has"
            " 256, Kimi K2 384) and whose per-expert bookkeeping would run for minutes; choose fewer"
        )
    groups = config["n_expert_groups"]
    if groups is not None and (n_expert % groups or not 1 <= (config["n_topk_groups"] or 0) <= groups):
        raise UserError(
            f"{where}: n_expert_groups {groups} must divide n_expert {n_expert}, and n_topk_groups"
            f" ({config['n_topk_groups']}) must be between 1 and n_expert_groups"
        )


def conforms(value: Any, annotation: Any) -> bool:
    """Whether a YAML value fits a Config field's annotation (int, float, bool, str, Literal, list, dict, X | None)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or annotation)


def model_fields(config) -> dict[str, Any]:
    """A Config as its saved model_config.yaml reads back (LitGPT saves `asdict`)."""
    return yaml.safe_load(yaml.safe_dump(dataclasses.asdict(config)))
