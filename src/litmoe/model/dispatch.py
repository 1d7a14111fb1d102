"""Expert parallelism inside the MoE layer: each rank of an expert group holds `n_expert / size` experts, and the
routed rows travel to the rank that holds their expert and back, by all-to-all.

One layer's forward, on every rank of the group at once (rows arrive sorted by global expert, as the layer
sorts them):

    counts per expert (E)  --all-to-all-->  rows each source sends to each of my local experts (size x E/size)
    rows by destination    --all-to-all-->  rows from every source, source-major
    regroup by local expert, run the local experts (grouped GEMM), undo the regrouping
    results                --all-to-all-->  back to the rank and row they came from

Routing, the routing weights and the balancing losses stay on the rank that owns the tokens, so only rows move.
The split sizes must be Python integers: one host sync per layer and forward when dropless (DeepSpeed and
torchtitan pay the same), none with a capacity factor (every expert gets exactly its capacity). Gradients flow
back through the same all-to-alls (`all_to_all_single_autograd`); the expert weights' gradients are then summed
over the ranks that hold the same experts (litmoe.distributed.expert_parallel).
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ExpertGroup:
    """This rank's place in expert parallelism: `size` consecutive ranks share out the experts, and `rank` is
    this one's index among them (it holds experts `rank * E/size` to `(rank + 1) * E/size - 1`)."""

    size: int
    rank: int
    group: Any  # torch.distributed ProcessGroup of the `size` ranks

    def experts(self, n_expert: int) -> range:
        local = n_expert // self.size
        return range(self.rank * local, (self.rank + 1) * local)


@dataclass(frozen=True)
class Exchange:
    """How one forward's rows were sent, to send the results back the same way."""

    order: torch.Tensor  # received rows, source-major, taken in local-expert-major order
    sent: list[int]  # rows sent to each rank of the group
    received: list[int]  # rows received from each rank of the group


def all_to_all(rows: torch.Tensor, output_splits: list[int], input_splits: list[int], group: Any) -> torch.Tensor:
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    return all_to_all_single_autograd(rows, output_splits, input_splits, group)


def send_to_experts(
    rows: torch.Tensor, tokens_per_expert: torch.Tensor, experts: ExpertGroup, capacity: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, Exchange]:
    """(the rows this rank's experts must process, grouped by local expert; tokens per local expert; how to send
    the results back). `rows` are sorted by global expert, `tokens_per_expert` counts them (E).

    With a `capacity` every rank sends every expert exactly that many rows (padded), so the sizes are known without
    asking: no count exchange and no host sync. Every rank's micro-batch must then have the same shape, as the
    training and validation loaders' have (they drop a last partial batch)."""
    local = tokens_per_expert.numel() // experts.size
    to_each = tokens_per_expert.view(experts.size, local)
    if capacity is None:
        from_each = torch.empty_like(to_each)  # [source rank, local expert]: rows that source sends to that expert
        dist.all_to_all_single(from_each.view(-1), to_each.reshape(-1).contiguous(), group=experts.group)
        sent, received = torch.stack([to_each.sum(1), from_each.sum(1)]).tolist()  # the one host sync
    else:
        from_each = torch.full_like(to_each, capacity)
        sent = received = [capacity * local] * experts.size
    arrived = all_to_all(rows, received, sent, experts.group)
    order = local_expert_major(from_each, sum(received))
    return arrived[order], from_each.sum(0), Exchange(order, sent, received)


def send_back(results: torch.Tensor, exchange: Exchange, experts: ExpertGroup) -> torch.Tensor:
    """The experts' results, returned to the ranks and rows they came from (the inverse of `send_to_experts`)."""
    source_major = torch.empty_like(exchange.order)
    source_major[exchange.order] = torch.arange(exchange.order.numel(), device=exchange.order.device)
    return all_to_all(results[source_major], exchange.sent, exchange.received, experts.group)


def local_expert_major(counts: torch.Tensor, total: int) -> torch.Tensor:
    """Indices that take `total` rows laid out source-major (blocks `counts[source, expert]` in row order) in
    local-expert-major order (every source's rows for expert 0, then for expert 1, ...)."""
    sizes = counts.reshape(-1)
    starts = (torch.cumsum(sizes, 0) - sizes).view_as(counts)
    block_sizes, block_starts = counts.t().reshape(-1), starts.t().reshape(-1)
    offsets = torch.arange(total, device=counts.device) - torch.repeat_interleave(
        torch.cumsum(block_sizes, 0) - block_sizes, block_sizes, output_size=total
    )
    return torch.repeat_interleave(block_starts, block_sizes, output_size=total) + offsets
