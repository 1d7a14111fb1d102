"""Expert parallelism in the MoE layer, on gloo CPU ranks: each rank holds n_expert / EP experts and the routed
rows travel by all-to-all. Held against one full layer that sees every rank's batch: outputs, input, router and
expert gradients (after the replica reduction) must be what data parallelism over the full layer gives.

Run on every rank of tests/test_distributed.py's launches (tests/ranks.py), in their process group: at EP 2 and 4
on 2 and 4 ranks, also when a shard gets no rows, and with a capacity (padded rows travel too)."""

from pathlib import Path

import torch
import torch.distributed as dist
from litgpt import Config

from litmoe.core.args import MoEArgs
from litmoe.distributed.expert_parallel import expert_groups, reduce_expert_gradients
from litmoe.model.configs import register_configs
from litmoe.model.moe import MoELayer

TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def layer_config() -> Config:
    register_configs()  # in each rank too
    return Config.from_name("MoE-tiny", n_embd=64, n_head=4, moe_intermediate_size=32, n_expert=8, n_expert_per_token=2)


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, the gradient the loss gives the output) of one rank's micro-batch."""
    generator = torch.Generator().manual_seed(100 + rank)
    return torch.randn(2, 5, 64, generator=generator), torch.randn(2, 5, 64, generator=generator)


# (EP size, whether the last shard's experts are never chosen, capacity factor) for each world size
LAYER_CASES = {
    2: [(2, False, None), (2, True, None), (2, False, 0.75)],
    4: [(2, False, None), (4, False, None), (4, True, None), (4, False, 0.5)],
}


def check_cases(cases: list[list], done: str) -> None:
    """Each case on this rank; a file in `done` for each one that held (one identical initialisation sliced across
    ranks, outputs and gradients, state-dict keys)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    for ep_size, starve, capacity in cases:
        check_case(rank, world, ep_size, starve, capacity)
        (Path(done) / f"rank{rank}-ep{ep_size}-{'starved' if starve else 'routed'}-{capacity}").touch()


def check_case(rank: int, world: int, ep_size: int, starve: bool, capacity: float | None) -> None:
    config = layer_config()
    balance = MoEArgs(aux_loss_coef=0.01, z_loss_coef=0.001, capacity_factor=capacity)
    experts, replicas = expert_groups(ep_size)
    local = experts.experts(config.n_expert)
    torch.manual_seed(0)
    reference = MoELayer(config, balance=balance)
    torch.manual_seed(0)
    ours = MoELayer(config, balance=balance, expert_group=experts)
    assert torch.equal(ours.experts.w_in, reference.experts.w_in[local.start : local.stop])  # one init, sliced
    assert torch.equal(ours.gate.weight, reference.gate.weight)
    if starve:  # the experts of the last shard are never chosen: their ranks receive no rows at all
        with torch.no_grad():
            reference.gate.weight[-config.n_expert // ep_size :] = -10.0
    ours.load_state_dict(reference.state_dict())  # stock keys of all experts: each rank keeps its own
    x, grad = batch(rank)
    x.requires_grad_()
    count_exchanges = []
    real_exchange = dist.all_to_all_single
    dist.all_to_all_single = lambda *args, **kwargs: count_exchanges.append(1) or real_exchange(*args, **kwargs)
    try:
        out = ours(x)
    finally:
        dist.all_to_all_single = real_exchange
    assert len(count_exchanges) == (0 if capacity else 1)  # with a capacity the sizes are known: no host sync
    (out * grad).sum().backward()
    reduce_expert_gradients(list(ours.experts.parameters()), replicas, world)
    dist.all_reduce(ours.gate.weight.grad)  # what DDP does for the replicated router
    ours.gate.weight.grad /= world

    reference.loss_scale = 1 / world  # the balancing gradients, like the loss, as DDP averages them
    inputs = [batch(source)[0].requires_grad_() for source in range(world)]
    outputs = [reference(inputs[source]) for source in range(world)]
    (sum((output * batch(source)[1]).sum() for source, output in enumerate(outputs)) / world).backward()
    torch.testing.assert_close(out, outputs[rank], **TOLERANCE)
    torch.testing.assert_close(x.grad, inputs[rank].grad * world, **TOLERANCE)
    torch.testing.assert_close(ours.gate.weight.grad, reference.gate.weight.grad, **TOLERANCE)
    for name in ("w_in", "w_out"):
        full = getattr(reference.experts, name).grad[local.start : local.stop]
        torch.testing.assert_close(getattr(ours.experts, name).grad, full, **TOLERANCE)
    assert ours.state_dict().keys() == {
        key for key in reference.state_dict() if ".experts." not in f".{key}" or int(key.split(".")[1]) in local
    }
