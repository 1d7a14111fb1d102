"""The MoE model configs this project trains, registered in LitGPT's config registry.

After `import litmoe`, `litgpt.Config.from_name("MoE-200M")` works, and so do LitGPT's own tools that look
a config up by name.
"""

from typing import Any

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
]


def register_configs() -> None:
    """Add our configs to LitGPT's registry (idempotent)."""
    from litgpt import config as litgpt_config

    for conf in MOE_CONFIGS:
        if conf["name"] not in litgpt_config.name_to_config:
            litgpt_config.configs.append(conf)
        litgpt_config.name_to_config[conf["name"]] = conf
