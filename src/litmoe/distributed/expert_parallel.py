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

import torch
import torch.distributed as dist

from litmoe.core.errors import UserError
from litmoe.model.dispatch import ExpertGroup


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
