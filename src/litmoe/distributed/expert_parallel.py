"""The process groups of expert parallelism, and the reduction of the experts' gradients.

With W ranks and expert-parallel size EP, consecutive ranks form the expert groups that share out the experts
(`[0 .. EP-1]`, `[EP .. 2 EP-1]`, ...), and ranks EP apart hold the same experts (the replica groups `[0, EP,
2 EP, ...]`, ...): DeepSpeed's and torchtitan's layout. The dense weights are replicated on every rank, as under
DDP.

Gradients. Under DDP each rank's loss is the mean over its own tokens and gradients are averaged over the W
ranks. An expert's gradient on the rank that holds it already sums what every rank of its expert group routed
to it (the all-to-all's backward brings those gradients back), so summing over its replicas covers all W ranks;
dividing by W then gives exactly DDP's average (DeepSpeed divides by the same global size).
"""

import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from litmoe.core.errors import UserError
from litmoe.core.patching import swapped
from litmoe.model.dispatch import ExpertGroup
from litmoe.model.experts import GroupedExperts, stock_expert_entries
from litmoe.model.moe import MoELayer


def expert_groups(size: int) -> tuple[ExpertGroup, object]:
    """(this rank's expert group, the group of ranks that hold the same experts). Every rank creates every group,
    in the same order, as torch.distributed requires."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if size < 1 or world % size:
        raise UserError(f"--strategy.expert_parallel {size}: must divide the number of ranks ({world})")
    shares = [dist.new_group(list(range(start, start + size))) for start in range(0, world, size)]
    replicas = [dist.new_group(list(range(offset, world, size))) for offset in range(size)]
    return ExpertGroup(size, rank % size, shares[rank // size]), replicas[rank % size]


def reduce_expert_gradients(parameters: list[torch.nn.Parameter], replicas: object, world_size: int) -> None:
    """Sum the experts' gradients over the ranks that hold the same experts and divide by the world size (see the
    module docstring): one flat all-reduce for all of them."""
    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    if not grads:
        return
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    dist.all_reduce(flat, group=replicas)
    flat.div_(world_size)
    for grad, reduced in zip(grads, flat.split([grad.numel() for grad in grads]), strict=True):
        grad.copy_(reduced.view_as(grad))


@dataclass
class ExpertParallelism:
    """The expert-parallel size a run asked for, and once the ranks are up (`connect`, from the strategy's
    environment setup), its process groups: the MoE layers built afterwards take `group`."""

    size: int
    group: ExpertGroup | None = None
    replicas: Any = None

    def connect(self) -> None:
        self.group, self.replicas = expert_groups(self.size)


def check_expert_parallel(config, layer: str, size: int) -> None:
    """One line for a model that cannot be split `size` ways (the strategy checked the ranks)."""
    if size == 1:
        return
    flag = f"--strategy.expert_parallel {size}"
    if config.mlp_class_name != "LLaMAMoE":
        raise UserError(f"{flag}: the model has no experts to split (mlp_class_name {config.mlp_class_name})")
    if layer != "litmoe":
        raise UserError(f"{flag}: LitGPT's MoE layer (--moe.layer {layer}) holds every expert; use --moe.layer litmoe")
    if config.n_expert % size:
        sizes = ", ".join(str(n) for n in range(2, config.n_expert + 1) if config.n_expert % n == 0)
        raise UserError(
            f"{flag}: must divide the model's {config.n_expert} experts; use one of {sizes} (and a divisor of the"
            " number of ranks), or 1: every rank holds every expert"
        )


def auto_expert_split(config, layer: str, devices_per_node: int) -> int:
    """The expert-parallel size `--strategy auto` may choose: the most ranks of one node that divide the experts
    (an all-to-all across nodes is slow), or 1 where the model or its layer cannot be split."""
    if config.mlp_class_name != "LLaMAMoE" or layer != "litmoe":
        return 1
    return math.gcd(devices_per_node, config.n_expert)


def split_experts(module: nn.Module) -> dict[int, tuple[GroupedExperts, Any]]:
    """id(parameter) -> (its experts, their expert group) for every parameter of an expert-parallel layer."""
    split = {}
    for layer in module.modules():
        if isinstance(layer, MoELayer) and layer.expert_group is not None:
            for parameter in layer.experts.parameters():
                split[id(parameter)] = (layer.experts, layer.expert_group)
    return split


def gathered(tensor: torch.Tensor, group: ExpertGroup) -> torch.Tensor:
    """The expert group's shards of `tensor` (one per rank, along dim 0), concatenated in expert order."""
    shards = [torch.empty_like(tensor) for _ in range(group.size)]
    dist.all_gather(shards, tensor.detach().contiguous(), group=group.group)
    return torch.cat(shards)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor sharded by FSDP (no communication); any other tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def whole(tensor: Any) -> Any:
    """A tensor sharded by FSDP gathered whole (a collective over its shards' ranks); any other value as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def collected(tensor: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """A tensor just gathered for a checkpoint: in CPU memory on the rank that writes the file, dropped on the
    others (the whole model's state on every device would not fit where the model had to be sharded)."""
    return tensor.cpu() if keep else None


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict with every expert of every layer, under stock LitGPT keys, and every FSDP shard
    gathered, as one process without expert parallelism would save it. A collective: every rank calls it, and
    only rank 0, which writes the file, keeps what was gathered."""
    keep = dist.get_rank() == 0
    state = module.state_dict()
    for name, layer in module.named_modules():
        experts = getattr(layer, "experts", None)
        if not isinstance(experts, GroupedExperts) or getattr(layer, "expert_group", None) is None:
            continue
        prefix = f"{name}.experts." if name else "experts."
        for key in [key for key in state if key.startswith(prefix)]:
            del state[key]
        group = layer.expert_group
        stacked = {f"{prefix}{n}": collected(gathered(whole(p), group), keep) for n, p in experts.named_parameters()}
        if keep:
            state.update(stock_expert_entries(stacked, prefix, range(experts.n_expert), experts.hidden))
    return {key: collected(whole(value), keep) if isinstance(value, DTensor) else value for key, value in state.items()}


def split_moments(optimizer: torch.optim.Optimizer, state: dict, split: dict[int, tuple]) -> Iterator[tuple]:
    """(index in `state`, its experts, their group) of each split expert parameter that has optimizer state."""
    for index, parameter in enumerate(p for group in optimizer.param_groups for p in group["params"]):
        if id(parameter) in split and index in state["state"]:
            yield index, *split[id(parameter)]


def full_optimizer_state(optimizer: torch.optim.Optimizer, split: dict[int, tuple]) -> dict[str, Any]:
    """The optimizer's state dict with the moments of split experts gathered to all experts, and every FSDP shard
    gathered (a collective; only rank 0 keeps what was gathered, as in `full_state_dict`)."""
    keep = dist.get_rank() == 0
    state = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: replaced, not changed
    for index, _, group in split_moments(optimizer, state, split):
        state["state"][index] = {
            key: collected(gathered(whole(value), group), keep) if torch.is_tensor(value) and value.dim() > 0 else value
            for key, value in state["state"][index].items()
        }
    state["state"] = {
        index: {
            key: collected(whole(value), keep) if isinstance(value, DTensor) else value
            for key, value in moments.items()
        }
        for index, moments in state["state"].items()
    }
    return state


@contextmanager
def optimizers_loading(state: Any, convert: Callable[[torch.optim.Optimizer, dict], dict]) -> Iterator[None]:
    """Within: each optimizer in a Fabric state loads `convert(optimizer, full state dict)` instead of the full
    state dict that a checkpoint holds (Lightning's loading calls `optimizer.load_state_dict` itself)."""
    objects = state.values() if isinstance(state, dict) else []
    with ExitStack() as stack:
        for optimizer in [obj for obj in objects if isinstance(obj, torch.optim.Optimizer)]:
            stack.enter_context(swapped(optimizer, "load_state_dict", converting_load(optimizer, convert)))
        yield


def converting_load(optimizer: torch.optim.Optimizer, convert: Callable) -> Callable[[dict], None]:
    load = optimizer.load_state_dict

    def load_converted(full: dict) -> None:
        load(convert(optimizer, full))

    return load_converted


def sliced_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, split: dict[int, tuple]) -> dict:
    """A full optimizer state dict (all experts) cut to the experts this rank holds."""
    state = {**state, "state": dict(state["state"])}
    for index, experts, _ in split_moments(optimizer, state, split):
        held = experts.held
        state["state"][index] = {
            key: value[held.start : held.stop] if torch.is_tensor(value) and value.dim() > 0 else value
            for key, value in state["state"][index].items()
        }
    return state
