"""A fast, dropless drop-in for LitGPT's `LLaMAMoE`, with load balancing and routing statistics.

It routes exactly as the stock layer does and keeps exactly its state-dict keys (`gate.weight`,
`experts.{i}.fc_1/fc_2/proj.weight`, `shared_experts.*`), so checkpoints move freely between the two. What
changes is the dispatch. Stock LitGPT loops over experts with `torch.where(mask)`: a host sync, a gather
and an accumulating scatter per expert, and graph breaks. Here each step happens once:

    route (top-k) -> sort the (token, expert) pairs by expert -> gather the tokens once
    -> all experts' SwiGLU as grouped GEMMs -> weight -> scatter-add back to tokens once

The experts' weights are stored stacked, and one grouped GEMM runs every expert at once (litmoe.model.experts),
so the layer compiles without graph breaks and runs on the meta device. State-dict hooks convert to and from
the stock keys, and `experts[i].fc_1.weight` reads as on stock's layer.

Load balancing (all optional, see `litmoe.core.args.MoEArgs`):
  * Switch auxiliary loss and router z-loss. LitGPT's loop only knows cross-entropy, so their gradient is
    injected in backward by `AuxLossGradient`, an identity on the layer's output (Megatron's trick). The
    gradient is scaled by `1 / gradient accumulation steps`, as the cross-entropy loss is.
  * DeepSeek-V3 auxiliary-loss-free balancing. A per-expert bias is added to the router scores for
    choosing experts only, not for the gate weights. It is updated from token counts after every
    optimizer step (`update_expert_bias`).
"""

import math
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from litmoe.core.args import MoEArgs
from litmoe.model.attention import autocast_dtype
from litmoe.model.dispatch import ExpertGroup, send_back, send_to_experts
from litmoe.model.experts import GroupedExperts, expert_size

# Running sums since the last read; counts are integers so that bf16 models keep them exact.
STATS = {
    "tokens_per_expert": torch.long,
    "entropy": torch.float,
    "aux_loss": torch.float,
    "z_loss": torch.float,
    "dropped": torch.float,  # share of the routed (token, expert) pairs over capacity
    "forwards": torch.long,
}


class AuxLossGradient(torch.autograd.Function):
    """Identity on `output`; in backward, gives `aux_loss` the gradient `scale` (as if added to the loss), times
    `loss_scale()` when given: fp16 training multiplies the loss by a scale before backward (GradScaler,
    DeepSpeed's loss scaler) and divides the gradients by it afterwards, so the injected gradient must carry it
    too. The scale is read in backward, after the scaler has set it for this step."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale: float, loss_scale=None) -> torch.Tensor:
        ctx.scale, ctx.loss_scale = scale, loss_scale
        ctx.aux_shape = aux_loss.shape
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        # filled on the device from a Python number: no host-to-device copy to wait for
        aux_grad = grad_output.new_full(ctx.aux_shape, ctx.scale, dtype=torch.float32)
        if ctx.loss_scale is not None:
            aux_grad = aux_grad * ctx.loss_scale()
        return grad_output, aux_grad, None, None


class PermutedRows(torch.autograd.Function):
    """`rows[permutation]`, whose gradient is a gather as well (`grad[inverse]`), where indexing's own backward
    would be an accumulating scatter."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, permutation: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return rows[permutation]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


class MoELayer(nn.Module):
    """Drop-in replacement for `litgpt.model.LLaMAMoE`, constructed from the same `Config`.

    `balance` switches on the auxiliary losses and the expert-bias updates; without it the layer computes
    exactly what the stock layer computes. `expert_bias` keeps a selection-bias buffer without training it,
    to load and route like a checkpoint that was trained with one.
    """

    def __init__(
        self, config, balance: MoEArgs | None = None, expert_bias: bool = False, expert_group: ExpertGroup | None = None
    ) -> None:
        from litgpt.model import GroupedTopkRouter, LLaMAMLP

        super().__init__()
        self.config = config
        self.balance = balance or MoEArgs(aux_loss_coef=0.0, z_loss_coef=0.0, bias_update_rate=0.0)
        self.loss_scale = 1.0  # 1 / gradient accumulation steps, set by the training patches
        self.fp16_loss_scale = None  # under fp16 mixed precision: the current loss scale (a callable), ditto
        self.record_routing = False  # record routing statistics outside training too (evaluation)
        if config.n_expert_groups:
            self.gate = GroupedTopkRouter(config)
            # LitGPT leaves this weight as `torch.empty` and nothing resets it. The init is attached to the
            # router itself, so that whoever resets modules one by one (ZeRO-3, gathering each) reaches it.
            std = math.sqrt(2.0 / 5 / config.n_embd)
            self.gate.reset_parameters = partial(nn.init.normal_, self.gate.weight, std=std)
            self.gate.reset_parameters()
        else:
            self.gate = nn.Linear(config.n_embd, config.n_expert, bias=False)
            if expert_bias or self.balance.bias_update_rate > 0:  # the grouped router has e_score_correction_bias
                self.register_buffer("expert_bias", torch.zeros(config.n_expert))
        hidden = expert_size(config)
        self.expert_group = expert_group  # expert parallelism: this rank holds only its share of the experts
        held = expert_group.experts(config.n_expert) if expert_group is not None else None
        self.experts = GroupedExperts(config.n_expert, config.n_embd, hidden, config.n_layer, config.bias, held)
        if config.n_shared_expert:
            self.shared_experts = LLaMAMLP(config, intermediate_size=hidden * config.n_shared_expert)
        # Statistics stay on the device (no host sync in forward) and out of the state dict.
        for name, dtype in STATS.items():
            shape = (config.n_expert,) if name == "tokens_per_expert" else ()
            self.register_buffer(name, torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("step_tokens_per_expert", torch.zeros(config.n_expert, dtype=torch.long), persistent=False)
        self.register_load_state_dict_post_hook(statistics_beside_weights)

    def reset_parameters(self) -> None:
        """The layer's own state at the start: nothing routed yet, no selection bias. What Lightning calls on a
        layer materialized from the meta device (FSDP2); the router and the experts reset their own weights."""
        for name in (*STATS, "step_tokens_per_expert", "expert_bias"):
            if name in self._buffers:
                self._buffers[name].zero_()

    @property
    def selection_bias(self) -> torch.Tensor | None:
        if self.config.n_expert_groups:
            return self.gate.e_score_correction_bias
        return getattr(self, "expert_bias", None)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weights, indices) of the chosen experts, each (tokens, k), plus the router logits and the
        probabilities over all experts (for the balancing losses). Weights and indices are stock LLaMAMoE's."""
        config = self.config
        if config.n_expert_groups:  # DeepSeek-style sigmoid router, as litgpt's GroupedTopkRouter computes it
            logits = F.linear(x.float(), self.gate.weight.float())
            scores = logits.sigmoid()
            indices = self.gate.get_topk_indices(scores)
            weights = scores.gather(1, indices)
            if config.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            probs = scores / scores.sum(dim=-1, keepdim=True)
        else:
            logits = self.gate(x)
            bias = self.selection_bias
            choice = logits if bias is None else logits + bias.to(logits.dtype)
            indices = torch.topk(choice, config.n_expert_per_token).indices
            weights = logits.gather(1, indices).softmax(dim=1, dtype=torch.float).to(dtype=x.dtype)
            probs = logits.softmax(dim=-1, dtype=torch.float)
        if config.routed_scaling_factor != 1.0:
            weights = weights * config.routed_scaling_factor
        return weights, indices, logits, probs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.experts, GroupedExperts):  # a subclass that built stock's experts (see below)
            return self.forward_per_expert(x)
        B, T, C = x.shape
        tokens = x.reshape(-1, C)
        weights, indices, logits, probs = self.route(tokens)
        k = indices.shape[1]
        # Sort the (token, expert) pairs by expert; a stable sort keeps token order within an expert.
        order = indices.view(-1).argsort(stable=True)
        token_of_slot = order // k
        # scatter_add, not bincount: bincount's output shape depends on the data and breaks the compiled graph
        slots = indices.view(-1)
        tokens_per_expert = slots.new_zeros(self.config.n_expert).scatter_add_(0, slots, torch.ones_like(slots))
        rows = tokens.to(autocast_dtype(tokens))[token_of_slot]  # cast once, then gather k copies (bf16 under autocast)
        if self.balance.capacity_factor is None:
            expert_out, dropped = self.run_experts(rows, tokens_per_expert), None
        else:
            expert_out, dropped = self.run_to_capacity(rows, slots[order], tokens_per_expert)
        # Back to (token, choice) order by the inverse permutation, then each token's k outputs weighted and summed
        # in fp32: gathers and a reduction, no accumulating scatter (atomics) in forward or backward.
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        by_token = PermutedRows.apply(expert_out, inverse, order).view(B * T, k, C)
        y = (by_token.float() * weights.float().unsqueeze(-1)).sum(1).to(tokens.dtype).view(B, T, C)
        if self.config.n_shared_expert:
            y = y + self.shared_experts(x)
        if self.training or self.record_routing:
            aux, z_loss = self.balancing_losses(tokens_per_expert, logits, probs)
            if self.training and torch.is_grad_enabled():
                y = self.add_balancing_gradient(y, aux, z_loss)
            self.record(tokens_per_expert, probs, aux, z_loss, dropped)
        return y

    def forward_per_expert(self, x: torch.Tensor) -> torch.Tensor:
        """The stock layer's computation, for a subclass that sets only `gate`, `experts` (an `nn.ModuleList` of
        LitGPT's `LLaMAMLP`) and `config` and calls this forward, as LitGPT's adapter_v2 `LLaMAMoE` does of the
        class it subclasses: each expert on its tokens in turn, without balancing or statistics."""
        B, T, C = x.shape
        tokens = x.reshape(-1, C)
        weights, indices, _, _ = self.route(tokens)
        y = torch.zeros_like(tokens)
        for expert_id, expert in enumerate(self.experts):
            token, slot = torch.where(indices == expert_id)
            y = y.index_add(0, token, weights[token, slot, None] * expert(tokens[token]))
        y = y.view(B, T, C)
        return y + self.shared_experts(x) if self.config.n_shared_expert else y

    def run_to_capacity(
        self, rows: torch.Tensor, expert_of_row: torch.Tensor, tokens_per_expert: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the experts' outputs for `rows` sorted by expert, zero for rows over capacity; the dropped share). Each
        expert runs exactly `capacity` rows, its first ones in token order then zero padding: static shapes."""
        n_expert = self.config.n_expert
        capacity = math.ceil(self.balance.capacity_factor * rows.shape[0] / n_expert)
        first_row = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert
        position = torch.arange(rows.shape[0], device=rows.device) - first_row[expert_of_row]
        kept = position < capacity
        # each kept row to its expert's block; the rows over capacity to one spare row, dropped afterwards
        target = torch.where(kept, expert_of_row * capacity + position, n_expert * capacity)
        padded = rows.new_zeros(n_expert * capacity + 1, rows.shape[1]).index_copy(0, target, rows)
        full = torch.full_like(tokens_per_expert, capacity)
        out = self.run_experts(padded[:-1], full, capacity)
        out = torch.cat([out, out.new_zeros(1, out.shape[1])])[target]
        return out, 1 - kept.float().mean()

    def run_experts(
        self, rows: torch.Tensor, tokens_per_expert: torch.Tensor, capacity: int | None = None
    ) -> torch.Tensor:
        """The experts' outputs for `rows` sorted by expert (`capacity` rows each, where given); under expert
        parallelism the rows travel to the ranks that hold their experts and back (litmoe.model.dispatch)."""
        if self.expert_group is None:
            return self.experts(rows, tokens_per_expert)
        if capacity is None:
            return self.exchange_dropless(rows, tokens_per_expert)
        return self.exchange(rows, tokens_per_expert, capacity)

    def exchange(self, rows: torch.Tensor, tokens_per_expert: torch.Tensor, capacity: int | None) -> torch.Tensor:
        arrived, per_local_expert, exchange = send_to_experts(rows, tokens_per_expert, self.expert_group, capacity)
        return send_back(self.experts(arrived, per_local_expert), exchange, self.expert_group)

    @torch.compiler.disable
    def exchange_dropless(self, rows: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Eager under torch.compile: the split sizes come from the data, and a compiled graph would be
        recompiled for each new size (until dynamo's recompile limit, then run eagerly anyway)."""
        return self.exchange(rows, tokens_per_expert, None)

    def balancing_losses(
        self, tokens_per_expert: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Switch aux loss, router z-loss) of this batch."""
        counts = tokens_per_expert.float()
        # Switch loss generalised to top-k: E * sum_e (share of routed slots to e) * (mean probability of e)
        aux = self.config.n_expert * (counts / counts.sum() * probs.mean(dim=0)).sum()
        z_loss = torch.logsumexp(logits.float(), dim=-1).square().mean()
        return aux, z_loss

    def add_balancing_gradient(self, y: torch.Tensor, aux: torch.Tensor, z_loss: torch.Tensor) -> torch.Tensor:
        coefs = self.balance
        if coefs.aux_loss_coef == 0 and coefs.z_loss_coef == 0:
            return y
        penalty = coefs.aux_loss_coef * aux + coefs.z_loss_coef * z_loss
        return AuxLossGradient.apply(y, penalty, self.loss_scale, self.fp16_loss_scale)

    @torch.no_grad()
    def record(
        self, tokens_per_expert: torch.Tensor, probs: torch.Tensor, aux: torch.Tensor, z_loss: torch.Tensor,
        dropped: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        entropy = -(probs * probs.clamp_min(1e-20).log()).sum(dim=-1).mean()
        values = (tokens_per_expert, entropy, aux, z_loss, 0.0 if dropped is None else dropped.detach(), 1)
        for name, value in zip(STATS, values, strict=True):
            getattr(self, name).add_(value)
        if self.training:
            self.step_tokens_per_expert.add_(tokens_per_expert)


def statistics_beside_weights(layer: MoELayer, incompatible_keys: Any) -> None:
    """After a load: a layer built on the meta device and loaded with `assign=True` (LitGPT's LoRA merge and
    conversions) has its weights from the checkpoint, and its statistics, which are not saved, still on meta;
    they are made zero where the weights are."""
    device = next(layer.parameters()).device
    if device.type == "meta":
        return
    for name in [*STATS, "step_tokens_per_expert"]:
        if getattr(layer, name).is_meta:
            setattr(layer, name, torch.zeros_like(getattr(layer, name), device=device))


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [module for module in model.modules() if isinstance(module, MoELayer)]


@torch.no_grad()
def update_expert_bias(model: nn.Module, rate: float, all_reduce=None) -> None:
    """DeepSeek-V3: nudge each expert's selection bias toward balance by `rate`, from the token counts of
    the optimizer step that just ended (summed across ranks with `all_reduce` when given)."""
    for layer in moe_layers(model):
        counts = layer.step_tokens_per_expert.float()
        if all_reduce is not None:
            counts = all_reduce(counts)
        bias = layer.selection_bias
        if bias is not None and rate > 0:
            bias.add_(rate * torch.sign(counts.mean() - counts))
        layer.step_tokens_per_expert.zero_()


@torch.no_grad()
def routing_rows(model: nn.Module) -> torch.Tensor | None:
    """Per-layer routing statistics averaged since the last read, on the device (one row per layer: forwards,
    entropy, aux loss, z-loss, dropped share, selection-bias norm, then each expert's load share), then reset.
    None without MoE layers."""
    layers = moe_layers(model)
    if not layers:
        return None
    rows = []
    for layer in layers:
        load = layer.tokens_per_expert.float() / layer.tokens_per_expert.sum().clamp_min(1)
        forwards = layer.forwards.float().clamp_min(1)
        bias = layer.selection_bias
        bias_norm = bias.float().norm() if bias is not None else load.new_zeros(())
        averages = torch.stack([layer.entropy, layer.aux_loss, layer.z_loss, layer.dropped]).float() / forwards
        rows.append(torch.cat([layer.forwards.float().reshape(1), averages, bias_norm.reshape(1), load]))
        for name in STATS:
            getattr(layer, name).zero_()
    return torch.stack(rows)


def routing_stats(rows: list[list[float]]) -> list[dict[str, Any]]:
    """`routing_rows`, read on the host, as one mapping per layer that routed since the last read."""
    stats = []
    for forwards, entropy, aux, z_loss, dropped, bias_norm, *load in rows:
        if forwards == 0:
            continue
        mean_load = sum(load) / len(load)
        stats.append(
            {
                "load": load,
                "imbalance": max(load) / mean_load,
                "entropy": entropy,
                "aux_loss": aux,
                "z_loss": z_loss,
                "dropped": dropped,
                "bias_norm": bias_norm,
            }
        )
    return stats


def read_routing_stats(model: nn.Module) -> list[dict[str, Any]]:
    """Per-layer routing statistics averaged since the last read (one host transfer for all layers), then reset."""
    rows = routing_rows(model)
    return [] if rows is None else routing_stats(rows.tolist())


def routing_metrics(routing: list[dict[str, Any]]) -> dict[str, float]:
    """Scalars per MoE layer (load share of each expert, imbalance, entropy, losses, bias norm) and means."""
    metrics = {}
    for index, layer in enumerate(routing):
        for expert, share in enumerate(layer["load"]):
            metrics[f"moe/layer{index}/load/expert{expert}"] = share
        for key in ("imbalance", "entropy", "aux_loss", "z_loss", "dropped", "bias_norm"):
            metrics[f"moe/layer{index}/{key}"] = layer[key]
    for key in ("imbalance", "entropy", "aux_loss", "z_loss", "dropped"):
        metrics[f"moe/{key}"] = sum(layer[key] for layer in routing) / len(routing)
    metrics["moe/imbalance_max"] = max(layer["imbalance"] for layer in routing)
    return metrics


def routing_summary(routing: list[dict[str, Any]], mean: dict[str, float]) -> str:
    """The console line; `mean` is `routing_metrics(routing)`."""
    worst = max(range(len(routing)), key=lambda index: routing[index]["imbalance"])
    dropped = f" | dropped {mean['moe/dropped']:.1%}" if mean["moe/dropped"] else ""  # over capacity
    return (
        f"MoE routing | imbalance max/mean {mean['moe/imbalance']:.2f} (worst layer {worst}:"
        f" {routing[worst]['imbalance']:.2f}) | entropy {mean['moe/entropy']:.3f}"
        f" | aux {mean['moe/aux_loss']:.4f} | z {mean['moe/z_loss']:.3f}{dropped}"
    )
