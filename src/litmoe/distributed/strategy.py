"""How training spreads over devices: the decision (`--strategy`) and its errors.

`--strategy auto` decides from the hardware and the memory estimate (litmoe.distributed.estimate), taking the first
plan that fits in 90% of a GPU (and whose offloaded state fits in 80% of a node's CPU memory):
  no CUDA GPU      one CPU process; several: DDP over gloo
  one GPU          single device; DeepSpeed ZeRO-2 with the optimizer in CPU memory (ZeRO-Offload);
                   ZeRO-3 with weights and optimizer in CPU memory; the same on NVMe (needs --nvme-path)
  several GPUs     DDP; DDP with the experts split over a node's GPUs (expert parallelism, litmoe's MoE layer);
                   the same on FSDP (the rest sharded over all ranks); ZeRO-2; ZeRO-3; ZeRO-3 offloading to CPU
                   memory; to NVMe. GPUs under 16 GB offload the optimizer to CPU memory from ZeRO-2 on. Without
                   DeepSpeed installed: DDP, else FSDP.
Giving any DeepSpeed option (--zero-stage, --offload-*, --deepspeed-config) means DeepSpeed.

The choice runs on the Fabric that litmoe.distributed.fabric builds for it.
"""

import os
import socket
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from litmoe.core.args import StrategyArgs
from litmoe.core.errors import UserError
from litmoe.core.run_lock import launching_process
from litmoe.distributed.estimate import DeviceMemory, GiB
from litmoe.distributed.plans import Hardware, StrategyChoice

# DeepSpeed on DeepSpeed's CPU accelerator (gloo): slow, but it runs the whole pipeline where there is no
# GPU, which is how the tests exercise it. Lightning itself allows DeepSpeed on CUDA only.
DEEPSPEED_ON_CPU = "LITMOE_DEEPSPEED_CPU"
SMALL_GPU = 16 * 10**9


def resolve_strategy(
    args: StrategyArgs, hardware: Hardware, memory_of: Callable[[StrategyChoice], DeviceMemory] | None = None,
    compile: bool = False, expert_split: int = 1, precision: str = "bf16-mixed",
) -> StrategyChoice:  # fmt: skip
    """The strategy to train with, and why; raises for contradictions, before any work starts.

    `memory_of` gives one rank's memory under a choice; `auto` with a GPU needs it. `expert_split` is the
    expert-parallel size `auto` may choose (1: none)."""
    if args.decided_by_auto:
        split = expert_split if args.expert_parallel == 1 else 1  # a size the user gave is theirs to keep
        choice = decide(hardware, memory_of, args.nvme_path, split, precision)
        return with_expert_parallel(choice, args.expert_parallel, hardware)
    choice = requested(args, hardware.world_size)
    if choice.name == "deepspeed":
        check_deepspeed(choice, args, hardware, compile)
    return with_expert_parallel(choice, args.expert_parallel, hardware)


def with_expert_parallel(choice: StrategyChoice, size: int, hardware: Hardware) -> StrategyChoice:
    """The choice with its experts split over `size` ranks (litmoe.distributed.expert_parallel), if it can be."""
    flag = f"--strategy.expert_parallel {size}"
    if size == 1:
        return choice
    if size < 1:
        raise UserError(f"{flag}: must be 1 (every rank holds every expert) or more")
    if hardware.world_size == 1:
        raise UserError(f"{flag}: expert parallelism needs several ranks; this run has one (--devices)")
    if choice.name not in ("ddp", "fsdp"):
        chosen = choice.label(hardware.world_size, hardware.devices_per_node)
        raise UserError(
            f"{flag}: expert parallelism runs on DDP or FSDP, not on {chosen}; use --strategy ddp, or --strategy fsdp"
            " to shard the rest"
        )
    if hardware.world_size % size:
        raise UserError(f"{flag}: must divide the number of ranks ({hardware.world_size})")
    return replace(choice, expert_parallel=size, reason=f"{choice.reason}, {flag}")


def check_expert_parallel_precision(choice: StrategyChoice, precision: str) -> None:
    """FSDP2 under Lightning's ModelParallelStrategy has no loss scaler, so no fp16 mixed precision."""
    if choice.shards_experts and precision == "16-mixed":
        raise UserError(
            f"--precision 16-mixed: FSDP with expert parallelism (--strategy.expert_parallel {choice.expert_parallel})"
            " has no fp16 loss scaling; use --precision bf16-mixed, or --strategy ddp"
        )


def requested(args: StrategyArgs, world_size: int) -> StrategyChoice:
    name = "deepspeed" if args.name == "auto" else args.name
    if args.asks_for_zero and name != "deepspeed":
        raise UserError(
            f"--strategy {name}: --zero-stage, --offload-optimizer, --offload-params and --deepspeed-config are"
            " DeepSpeed options; use --strategy deepspeed or drop them"
        )
    if name == "single" and world_size > 1:
        raise UserError(f"--strategy single trains on one device, but --devices x --num_nodes is {world_size}")
    if name in ("ddp", "fsdp") and world_size == 1:
        return StrategyChoice("single", f"one device (--strategy {name} needs more than one)")
    if name != "deepspeed":
        return StrategyChoice(name, f"--strategy {name}")
    if args.deepspeed_config is not None:
        if args.zero_stage is not None or {args.offload_optimizer, args.offload_params} - {None, "none"}:
            raise UserError(
                f"--deepspeed-config {args.deepspeed_config}: set the ZeRO stage and offload in that file, not"
                " also with --zero-stage / --offload-*"
            )
        from litmoe.distributed.zero import offload_device, read_user_config

        config = read_user_config(args.deepspeed_config)
        return StrategyChoice(
            "deepspeed", f"--deepspeed-config {args.deepspeed_config}",
            int(config.get("zero_optimization", {}).get("stage", 0)),
            offload_device(config, "offload_optimizer"), offload_device(config, "offload_param"),
        )  # fmt: skip
    return StrategyChoice(
        "deepspeed", "DeepSpeed requested", args.zero_stage or 2, args.offload_optimizer or "none",
        args.offload_params or "none",
    )  # fmt: skip


def check_deepspeed(choice: StrategyChoice, args: StrategyArgs, hardware: Hardware, compile: bool) -> None:
    if not hardware.deepspeed_installed:
        raise UserError("--strategy deepspeed: DeepSpeed is not installed; install it with `uv sync --extra deepspeed`")
    if hardware.gpu_memory is None and os.environ.get(DEEPSPEED_ON_CPU) != "1":
        raise UserError(
            "--strategy deepspeed needs a CUDA GPU (Lightning runs DeepSpeed on CUDA only); on this machine use"
            " --strategy ddp or single"
        )
    if choice.offload_params != "none" and choice.zero_stage != 3:
        raise UserError(
            f"--offload-params {choice.offload_params} needs --zero-stage 3 (ZeRO-{choice.zero_stage} keeps all"
            " weights on every GPU)"
        )
    if "nvme" in (choice.offload_optimizer, choice.offload_params):
        if choice.zero_stage != 3:
            raise UserError(f"NVMe offload needs --zero-stage 3 (ZeRO-Infinity), not {choice.zero_stage}")
        check_nvme_path(args.nvme_path)
    if choice.zero_stage == 3 and compile:
        raise UserError(
            "ZeRO-3 with --compile: torch.compile does not work with ZeRO-3's parameter gathering hooks"
            " (pytorch/pytorch#115484); pass --no-compile, or use --zero-stage 2"
        )


def check_nvme_path(path: Path | None) -> None:
    if path is None:
        raise UserError("NVMe offload: pass --nvme-path DIR, a directory on a fast local NVMe disk")
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".litmoe-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"--nvme-path {path}: not a writable directory ({err.strerror}); pass one on a local NVMe disk"
        ) from err


def decide(
    hardware: Hardware, memory_of: Callable[[StrategyChoice], DeviceMemory], nvme_path: Path | None,
    expert_split: int = 1, precision: str = "bf16-mixed",
) -> StrategyChoice:  # fmt: skip
    world = hardware.world_size
    if hardware.gpu_memory is None:
        if world == 1:
            return StrategyChoice("single", "no CUDA GPU: one CPU process")
        return StrategyChoice("ddp", f"{world} CPU processes: DDP over gloo (FSDP and DeepSpeed need CUDA)")
    plans = candidate_plans(hardware, nvme_path is not None, expert_split, precision)
    gpu = hardware.gpu_memory
    needs = {plan: memory_of(plan) for plan in plans}

    def fits(plan: StrategyChoice) -> bool:
        host = needs[plan].cpu_offload * hardware.devices_per_node
        return needs[plan].total <= 0.9 * gpu and host <= 0.8 * hardware.cpu_memory

    chosen = next((plan for plan in plans if fits(plan)), plans[-1])
    first = plans[0]
    why = f"{world} GPU{'s' if world > 1 else ''} of {gpu / GiB:.0f} GiB"
    why += f"; {first.label(world, hardware.devices_per_node)} needs {needs[first].total / GiB:.1f} GiB per GPU"
    if chosen != first:
        why += f"; {chosen.label(world, hardware.devices_per_node)} needs {needs[chosen].total / GiB:.1f} GiB"
    if not fits(chosen):
        why += "; nothing fits by the estimate, trying the smallest plan"
        if not hardware.deepspeed_installed:
            why += " (DeepSpeed offload could help: uv sync --extra deepspeed)"
        elif nvme_path is None:
            why += " (--nvme-path would allow NVMe offload)"
    return replace(chosen, reason=why)


def candidate_plans(
    hardware: Hardware, nvme: bool, expert_split: int = 1, precision: str = "bf16-mixed"
) -> list[StrategyChoice]:
    """What `auto` tries, in order; the reason is filled in by `decide`. Expert parallelism comes right after
    DDP: where a replica does not fit, splitting the experts keeps DDP's one all-reduce per step and moves only
    the routed tokens, where ZeRO gathers weights; then the same with the rest sharded by FSDP, which gathers
    only the dense weights and each rank's own experts."""
    if hardware.world_size == 1:
        plans = [StrategyChoice("single", ""), StrategyChoice("deepspeed", "", 2, "cpu")]
    else:
        offload = "cpu" if hardware.gpu_memory < SMALL_GPU else "none"
        plans = [StrategyChoice("ddp", "")]
        if expert_split > 1:
            plans.append(StrategyChoice("ddp", "", expert_parallel=expert_split))
            if precision != "16-mixed":  # no loss scaler there (check_expert_parallel_precision)
                plans.append(StrategyChoice("fsdp", "", expert_parallel=expert_split))
        plans.append(StrategyChoice("deepspeed", "", 2, offload))
        plans.append(StrategyChoice("deepspeed", "", 3, offload))
    plans.append(StrategyChoice("deepspeed", "", 3, "cpu", "cpu"))
    if nvme:
        plans.append(StrategyChoice("deepspeed", "", 3, "nvme", "nvme"))
    if not hardware.deepspeed_installed:
        plans = [plan for plan in plans if plan.name != "deepspeed"]
        if hardware.world_size > 1:
            plans.append(StrategyChoice("fsdp", ""))
    return plans


LAUNCHER_VARIABLES = ("WORLD_SIZE", "RANK", "GLOBAL_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "NNODES")
RANK_NAMES = ("RANK", "GLOBAL_RANK", "LOCAL_RANK", "NODE_RANK")
GLOBAL_RANKS = ("RANK", "GLOBAL_RANK")


CLUSTER_VARIABLES = ("MASTER_ADDR", "SLURM_NTASKS", "GROUP_RANK", "LSB_JOBID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def check_rendezvous(num_nodes: int, world_size: int, environ: dict[str, str] = os.environ) -> None:
    """Where the ranks meet, checked before any work: several nodes need MASTER_ADDR (a cluster launcher provides
    it; without one each node would wait alone until the collective timeout), MASTER_ADDR must resolve (else every
    rank retries it until the timeout), and rank 0 of a launch it hosts must find MASTER_PORT free (else its store
    fails after the other ranks were started, and they are left waiting)."""
    if num_nodes > 1 and not any(name in environ for name in CLUSTER_VARIABLES):
        raise UserError(
            f"--num_nodes {num_nodes}: the nodes meet at MASTER_ADDR, and nothing set it; launch with"
            " scripts/slurm_train.sbatch or scripts/torchrun_multinode.sh, or set MASTER_ADDR, MASTER_PORT and"
            " NODE_RANK on every node"
        )
    if world_size == 1:
        return
    address, port = environ.get("MASTER_ADDR", "").strip(), environ.get("MASTER_PORT", "").strip()
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise UserError(f"environment variable MASTER_PORT={port!r}: not a port (1 to 65535); unset it or fix it")
    if address:
        try:
            socket.getaddrinfo(address, None)
        except (socket.gaierror, UnicodeError) as err:
            raise UserError(
                f"environment variable MASTER_ADDR={address}: the host name does not resolve ({err.args[-1]}); set it"
                " to the address of the node that runs rank 0"
            ) from None
    hosted_here = address in ("", "localhost", "127.0.0.1", socket.gethostname())
    if port and hosted_here and launching_process() and "TORCHELASTIC_RUN_ID" not in environ:  # torchrun's agent
        check_port_free(int(port))  # holds the store itself


def check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's store binds
        try:
            probe.bind(("", port))
        except OSError:
            raise UserError(
                f"environment variable MASTER_PORT={port}: the port is in use on this host (another run?); choose a"
                " free one, or unset MASTER_PORT and a free port is picked"
            ) from None


def rendezvous_line(
    num_nodes: int, world_size: int, timeout_minutes: int, environ: dict[str, str] = os.environ
) -> str | None:
    """What a node waits for before training starts, said once per node: without it a node whose peers never
    arrive waits in silence until the collective timeout."""
    if num_nodes == 1 or environ.get("LOCAL_RANK", "0").strip() != "0":
        return None
    where = f" at {environ['MASTER_ADDR']}:{environ.get('MASTER_PORT', '?')}" if "MASTER_ADDR" in environ else ""
    return (
        f"Waiting for all {world_size} ranks on {num_nodes} nodes to meet{where}; a node that never arrives ends the"
        f" run after --timeout-minutes ({timeout_minutes})"
    )


def check_launcher_variables(world_size: int, num_nodes: int = 1, environ: dict[str, str] = os.environ) -> None:
    """What a launcher says about the ranks in the environment: whole numbers, and as many ranks and nodes as this
    run has. litdata splits the data by WORLD_SIZE itself, so a stale one (a shell left from torchrun) would
    silently train a single process on a fraction of the data; a NODE_RANK beyond the nodes would make two nodes'
    ranks take the same global ranks."""
    for name in LAUNCHER_VARIABLES:
        if name in environ and not environ[name].strip().isdigit():
            value = environ[name]
            raise UserError(f"environment variable {name}={value!r}: not a whole number; unset it (launchers set it)")
    if "WORLD_SIZE" in environ and int(environ["WORLD_SIZE"]) != world_size:
        raise UserError(
            f"environment variable WORLD_SIZE={environ['WORLD_SIZE'].strip()}, but this run has {world_size} rank(s)"
            " (--devices x --num_nodes): the data would be split for another number of ranks; unset WORLD_SIZE (left"
            " from a launcher?), or give --devices and --num_nodes that match it"
        )
    values = {name: int(environ[name]) for name in LAUNCHER_VARIABLES if name in environ}
    counts = {"NNODES": (num_nodes, "--num_nodes"), "LOCAL_WORLD_SIZE": (world_size // num_nodes, "--devices")}
    for name, (count, flag) in counts.items():
        if name in values and values[name] != count:
            raise UserError(
                f"environment variable {name}={values[name]}, but this run has {count} ({flag}): give {flag}"
                f" {values[name]}, or unset {name} (left from a launcher?)"
            )
    sizes = {
        "RANK": world_size, "GLOBAL_RANK": world_size, "LOCAL_RANK": values.get("LOCAL_WORLD_SIZE"),
        "NODE_RANK": num_nodes,
    }  # fmt: skip
    for rank, size in sizes.items():
        if rank in values and size is not None and values[rank] >= size:
            raise UserError(
                f"environment variable {rank}={values[rank]}, but the ranks are 0 to {size - 1}: unset it (left from"
                " a launcher?), or fix the launch"
            )
    launched = "MASTER_ADDR" in environ  # every launcher that sets a global rank also says where the ranks meet
    if world_size > 1 and not launched and (stale := next((name for name in GLOBAL_RANKS if name in values), None)):
        raise UserError(
            f"environment variable {stale}={values[stale]} without MASTER_ADDR: no launcher started this process"
            f" (run_train.py --devices {world_size} starts its own ranks), so it is left from another launch and"
            " would make this process skip the lock on --out_dir; unset it"
        )
    if world_size == 1 and (stale := next((name for name in RANK_NAMES if values.get(name, 0) != 0), None)):
        raise UserError(
            f"environment variable {stale}={values[stale]}, but this run has 1 rank: a rank other than 0 skips the"
            " lock on --out_dir (another run could write into it) and writes no checkpoint; unset it (left from a"
            " launcher?)"
        )


def adopt_launcher_node_rank(environ: dict[str, str] = os.environ) -> None:
    """The DeepSpeed launcher names the node rank CROSS_RANK; Lightning reads NODE_RANK (else every node would
    count itself node 0)."""
    if "CROSS_RANK" in environ and "NODE_RANK" not in environ:
        environ["NODE_RANK"] = environ["CROSS_RANK"]
