"""`generate.py --devices N`: the model split across N devices (tensor parallelism), as LitGPT's `generate_tp`.

Each rank holds 1/N of every attention layer's heads and of every expert's hidden units; the output of each
attention and MoE layer is summed across the ranks (LitGPT's `tensor_parallel` walks the blocks). Two of its
per-layer functions are swapped here:
- MoE: LitGPT shards each `mlp.experts[i]` as an `LLaMAMLP`, which stacked experts are not. litmoe's layer is
  sharded whole: the stacked experts' hidden units (fc_1 and fc_2 rows, proj columns) and the shared experts'
  alike, so that every rank computes a partial sum of the layer's output, summed once. The router is whole on
  every rank, so every rank routes every token alike.
- Attention: LitGPT 0.5.13 cuts the fused qkv weight into N contiguous pieces, but stores it as [every query
  head; every key head; every value head], so a piece mixes queries with keys and values and the split model
  computes something else. Here q, k and v are each split by heads (whole query groups per rank).
"""

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from litmoe.core.errors import UserError
from litmoe.core.patching import swapped
from litmoe.model.experts import expert_size
from litmoe.model.moe import MoELayer


def check_split(config, devices: int) -> None:
    """A model tensor parallelism can split, and every size it splits divisible by `devices`, before any rank
    starts."""
    if config.latent_attention is not None:
        raise UserError(f"--devices {devices}: latent attention (DeepSeek's) is not split across devices; use 1")
    if config.norm_qk and config.norm_qk_type == "olmo2":
        raise UserError(f"--devices {devices}: this model normalizes all query heads together; use --devices 1")
    sizes = {"n_head": config.n_head, "n_query_groups": config.n_query_groups, "n_embd": config.n_embd}
    if config.mlp_class_name == "LLaMAMoE":
        sizes["moe_intermediate_size"] = expert_size(config)
        if config.n_shared_expert:
            sizes["shared experts' hidden size"] = expert_size(config) * config.n_shared_expert
    if config.mlp_class_name != "LLaMAMoE" or config.first_k_dense_replace:  # dense MLPs
        sizes["intermediate_size"] = config.intermediate_size
    for name, size in sizes.items():
        if size % devices:
            fits = [count for count in range(1, 9) if all(value % count == 0 for value in sizes.values())]
            raise UserError(
                f"--devices {devices}: tensor parallelism splits the model's {name} ({size}) evenly across the"
                f" devices; use --devices {' or '.join(map(str, fits))}"
            )
    if torch.cuda.is_available() and devices > torch.cuda.device_count():
        raise UserError(f"--devices {devices}: this machine has {torch.cuda.device_count()} GPUs")


def launch(devices: int) -> Any:
    """The Fabric of `devices` ranks on this machine's GPUs (else CPU processes over gloo), not yet launched: this
    process becomes rank 0 at `fabric.launch()`, which starts the others with the same command line."""
    import lightning as L

    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    return L.Fabric(devices=devices, accelerator=accelerator, strategy="ddp", precision="32-true")


def split_in_turn(fabric: Any, load: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any] | None:
    """(this rank's share of the model on its device, the tokenizer) for ranks 1 to N-1, None on rank 0 (which
    split its share before the others started). The ranks take turns: each loads the whole model on the CPU,
    keeps its share and frees the rest while the others wait, so that the host holds one whole model at a time
    (as LitGPT's generate_tp)."""
    share = None
    for turn in range(1, fabric.world_size):
        if turn == fabric.global_rank:
            model, tokenizer = load()
            share = split_model(fabric, model), tokenizer
        fabric.barrier()
    return share


def split_model(fabric: Any, model: torch.nn.Module) -> torch.nn.Module:
    """This rank's share of `model` (built and loaded whole on the CPU), moved to its device."""
    import litgpt.generate.tp as tp

    n_embd = model.config.n_embd
    with (
        swapped(tp, "tensor_parallel_mlp", partial(split_mlp, tp.tensor_parallel_mlp)),
        swapped(tp, "tensor_parallel_attn", split_attention),
    ):
        model = tp.tensor_parallel(fabric, model)
    # LitGPT divides n_embd with the head counts, but the residual stream stays whole on every rank; nothing split
    # reads it, and the embedding scale (Gemma's) must see the whole width.
    model.config.n_embd = n_embd
    return model.to(fabric.device)


def split_attention(fabric: Any, attn: torch.nn.Module) -> None:
    """This rank's heads of an attention layer: its share of the query heads and of the key and value groups
    (qkv's rows), the matching columns of proj, and the output summed across ranks."""
    import litgpt.generate.tp as tp

    config, rank, world_size = attn.config, fabric.global_rank, fabric.world_size
    sizes = (config.n_head * config.head_size, *(2 * [config.n_query_groups * config.head_size]))
    for name in ("weight", "bias"):
        if (fused := getattr(attn.qkv, name)) is not None:
            shares = [part.tensor_split(world_size)[rank] for part in fused.split(sizes)]
            setattr(attn.qkv, name, torch.nn.Parameter(torch.cat(shares), requires_grad=False))
    attn.qkv.out_features = attn.qkv.weight.shape[0]
    tp.tensor_parallel_linear(fabric, attn.proj, "rowwise")
    add_once(attn.proj.bias, rank)
    attn.register_forward_hook(sum_across_ranks)


def add_once(bias: torch.Tensor | None, rank: int) -> None:
    """A bias added after a split layer, whose partial outputs are summed across the ranks, is added once: rank 0
    keeps it, the others zero theirs."""
    if bias is not None and rank > 0:
        bias.data.zero_()


def sum_across_ranks(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    """A layer's partial output summed over the ranks: the whole layer's output, on every rank (a functional
    collective, as LitGPT's, here over the default group)."""
    from torch.distributed import group
    from torch.distributed._functional_collectives import all_reduce

    return all_reduce(output, "sum", group.WORLD)


def split_mlp(stock: Any, fabric: Any, mlp: torch.nn.Module) -> None:
    """LitGPT's `tensor_parallel_mlp`, for litmoe's MoE layer too, each layer's output summed once."""
    from litgpt.model import GptNeoxMLP, LLaMAMLP

    if isinstance(mlp, MoELayer):
        experts, rank = mlp.experts, fabric.global_rank
        share = experts.hidden // fabric.world_size
        experts.keep_hidden(slice(rank * share, (rank + 1) * share))
        add_once(experts.b_out, rank)
        if mlp.config.n_shared_expert:
            split_dense(fabric, mlp.shared_experts)
    elif isinstance(mlp, (LLaMAMLP, GptNeoxMLP)):
        split_dense(fabric, mlp)
    else:  # LitGPT's refusal
        return stock(fabric, mlp)
    mlp.register_forward_hook(sum_across_ranks)
    return None


def split_dense(fabric: Any, mlp: torch.nn.Module) -> None:
    """A dense MLP's share, as LitGPT splits it (the input projections by output, proj by input), its proj's bias
    added once (LitGPT's added it on every rank)."""
    import litgpt.generate.tp as tp

    for name in ("fc", "fc_1", "fc_2"):
        if hasattr(mlp, name):
            tp.tensor_parallel_linear(fabric, getattr(mlp, name), "colwise")
    tp.tensor_parallel_linear(fabric, mlp.proj, "rowwise")
    add_once(mlp.proj.bias, fabric.global_rank)
