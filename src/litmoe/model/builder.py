"""Building LitGPT's GPT with litmoe's MoE layer in place of `LLaMAMoE`.

LitGPT's Block builds its MLP as `getattr(litgpt.model, config.mlp_class_name)(config)`, so a model built
while that name is swapped has our layer in every MoE block, with stock LitGPT's state-dict keys.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from functools import partial
from pathlib import Path

import torch

from litmoe.core.args import MoEArgs
from litmoe.core.patching import swapped
from litmoe.model.configs import checkpoint_model_config
from litmoe.model.dispatch import ExpertGroup
from litmoe.model.moe import MoELayer

EXPERT_BIAS_KEY = "mlp.expert_bias"  # litmoe's selection bias for a softmax router (litmoe.model.moe)


@contextmanager
def moe_layer(layer: Callable[..., torch.nn.Module]) -> Iterator[None]:
    """Within this scope, a GPT built from an `LLaMAMoE` config builds `layer` in each MoE block."""
    import litgpt.model

    with swapped(litgpt.model, "LLaMAMoE", layer):
        yield


def layer_for(
    moe: MoEArgs, expert_group: Callable[[], ExpertGroup | None] = lambda: None
) -> Callable[..., torch.nn.Module]:
    """The MoE layer a run trains with: ours with its balancing settings, or LitGPT's own. `expert_group` gives,
    when a layer is built, this rank's share of the experts under expert parallelism (None: all of them)."""
    import litgpt.model

    if moe.layer != "litmoe":
        return litgpt.model.LLaMAMoE
    return lambda config: MoELayer(config, balance=moe, expert_group=expert_group())


def has_expert_bias(state: dict) -> bool:
    """Whether a checkpoint was trained with aux-loss-free balancing on a softmax router (`mlp.expert_bias`)."""
    return any(key.endswith(EXPERT_BIAS_KEY) for key in state)


def build_model(checkpoint_dir: Path, expert_bias: bool = False, adapter: bool = False):
    """The checkpoint's model on the CPU, in fp32, built with litmoe's MoE layer (with the experts' selection
    bias when the checkpoint has one, so that it routes exactly as training did); with `adapter`, LitGPT's
    adapter model with the adapter settings LitGPT's finetune_adapter trains with (its Config's defaults)."""
    from litgpt import GPT

    config = checkpoint_model_config(checkpoint_dir)
    if adapter:
        from litgpt.adapter import GPT
        from litgpt.adapter import Config as AdapterConfig

        config = AdapterConfig(**{field.name: getattr(config, field.name) for field in fields(config) if field.init})
    with moe_layer(partial(MoELayer, expert_bias=expert_bias)):
        return GPT(config)


def expected_state(config, moe: MoEArgs) -> dict:
    """The state dict (on the meta device) of the model a run with these settings builds."""
    from litgpt import GPT

    with moe_layer(layer_for(moe)), torch.device("meta"):
        return GPT(config).state_dict()
