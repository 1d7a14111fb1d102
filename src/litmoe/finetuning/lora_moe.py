"""LoRA on litmoe's MoE layer, for LitGPT's LoRA fine-tuning.

LitGPT's LoRA model builds each MoE block from `litgpt.lora.LLaMAMoE`: the stock loop over experts, with LoRA on
the router and on each expert's fc_1, fc_2 and proj when `lora_mlp` is set. `LoRAMoELayer` is litmoe's layer with
the same LoRA. The router is LitGPT's own `LoRALinear` (`gate.linear.weight`, `gate.lora_A`, `gate.lora_B`, as
LitGPT names them). The experts' update is rank r on the stacked weights (`LoRAGroupedExperts`): W + B A x alpha / r
per expert, added to the weights before the grouped GEMMs, which is exactly the sum the merge writes. It has no
dropout: it changes the weights, not the inputs.
"""

import math

import torch
import torch.nn as nn

from litmoe.core.args import MoEArgs
from litmoe.model.experts import GroupedExperts, expert_size
from litmoe.model.moe import MoELayer


class LoRAGroupedExperts(GroupedExperts):
    """Stacked experts with a trainable rank-`r` update of each expert's `w_in` ([fc_1; fc_2]) and `w_out` (proj).
    Saved under `lora_*` names beside the stock keys, so that LitGPT's LoRA checkpoint holds them and its merge
    drops them."""

    def __init__(self, n_expert: int, n_embd: int, hidden: int, n_layer: int, r: int, alpha: float, bias: bool) -> None:
        super().__init__(n_expert, n_embd, hidden, n_layer, bias)
        self.scaling = alpha / r
        self.merged = False
        self.lora_A_in = nn.Parameter(torch.empty(n_expert, r, n_embd))
        self.lora_B_in = nn.Parameter(torch.empty(n_expert, 2 * hidden, r))
        self.lora_A_out = nn.Parameter(torch.empty(n_expert, r, hidden))
        self.lora_B_out = nn.Parameter(torch.empty(n_expert, n_embd, r))
        self.reset_lora_parameters()

    def reset_parameters(self) -> None:
        """The base weights' init, then LoRA's (Lightning calls this on experts materialized from the meta device)."""
        super().reset_parameters()
        if hasattr(self, "lora_A_in"):  # not yet while GroupedExperts' __init__ resets the base weights
            self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """As LitGPT's `LoRALinear`: A from Kaiming's uniform, B zero, so that training starts at the base model."""
        for a, b in ((self.lora_A_in, self.lora_B_in), (self.lora_A_out, self.lora_B_out)):
            kaiming_per_expert_(a)
            nn.init.zeros_(b)

    def updates(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_B_in @ self.lora_A_in * self.scaling, self.lora_B_out @ self.lora_A_out * self.scaling

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.merged:
            return self.w_in, self.w_out
        update_in, update_out = self.updates()
        return self.w_in + update_in.to(self.w_in.dtype), self.w_out + update_out.to(self.w_out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W = W + B A x alpha / r, once (LitGPT's `LoRALinear.merge`)."""
        if not self.merged:
            w_in, w_out = self.weights()
            self.w_in.copy_(w_in)
            self.w_out.copy_(w_out)
            self.merged = True


@torch.no_grad()
def kaiming_per_expert_(weight: torch.Tensor) -> None:
    """Each expert's matrix from Kaiming's uniform, as LoRALinear's A. Drawn whole and then, when FSDP2 shards the
    weight (a DTensor), this rank's shard taken: the same values as on one device, for the same seed."""
    full = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    for matrix in full:
        nn.init.kaiming_uniform_(matrix, a=math.sqrt(5))
    if hasattr(weight, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full, weight.device_mesh, weight.placements)
    weight.copy_(full)


class LoRAMoELayer(MoELayer):
    """litmoe's MoE layer with LitGPT's LoRA (`litgpt.lora.Config`'s lora_r, lora_alpha, lora_dropout, lora_mlp):
    the router and the experts get LoRA where `lora_mlp` gives LitGPT's experts and router theirs."""

    def __init__(self, config, balance: MoEArgs | None = None, expert_bias: bool = False) -> None:
        from litgpt.lora import create_lora_linear

        super().__init__(config, balance=balance, expert_bias=expert_bias)
        if not config.n_expert_groups:  # LitGPT's grouped router has no LoRA either
            self.gate = create_lora_linear(config, config.n_embd, config.n_expert, bias=False)
        if config.lora_mlp and config.lora_r > 0:
            self.experts = LoRAGroupedExperts(
                config.n_expert, config.n_embd, expert_size(config), config.n_layer, config.lora_r,
                config.lora_alpha, config.bias,
            )  # fmt: skip
        self.register_load_state_dict_pre_hook(base_router_key)


def base_router_key(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """A base checkpoint's `gate.weight` is the LoRA router's `gate.linear.weight` (as LitGPT maps it)."""
    if prefix + "gate.weight" in state_dict and hasattr(module.gate, "linear"):
        state_dict[prefix + "gate.linear.weight"] = state_dict.pop(prefix + "gate.weight")


def merge_lora_weights(model: nn.Module) -> None:
    """LitGPT's merge of every `LoRALinear`, and of the experts' LoRA."""
    from litgpt.lora import merge_lora_weights as merge_lora_linears

    merge_lora_linears(model)
    for module in model.modules():
        if isinstance(module, LoRAGroupedExperts):
            module.merge()
