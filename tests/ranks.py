"""One rank of a multi-rank test session: torchrun starts one of these per rank, and each runs the same plan of
steps in order, in this one interpreter (LitGPT imported once per rank, one process group for every step).

    python -m torch.distributed.run --standalone --nproc_per_node N tests/ranks.py PLAN.json

The plan (written by tests/test_distributed.py) is a list of steps, each one of:
  {"name", "train": argv}           run_train.py's main(argv), as a user's run under torchrun; optionally
                                    "signal_rank0_at": a line of rank 0's output at which rank 0 (only) sends
                                    itself SIGTERM, as a scheduler would; "watch": true counts what would make
                                    the host wait for the GPU (tests/host_syncs.py) into NAME.rankR.syncs.json
  {"name", "call": "module:function", "args": [...]}
                                    a check that needs the ranks (tests/expert_parallel_layer.py)
  {"name", "alone": true}           from here on rank 0 alone, as a single process: the process group is taken
                                    down, the launcher's variables removed, and the other ranks are done
Each step leaves NAME.rankR.out (what it printed, stdout and stderr) and NAME.rankR.status (its exit status, as the
command line would give it) in the plan's folder. A step that fails otherwise writes its traceback there and ends
this rank with status 1, which makes torchrun stop the others.
"""

import contextlib
import importlib
import io
import json
import os
import signal
import socket
import sys
import traceback
from pathlib import Path

LAUNCHER_VARIABLES = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "ROLE_NAME", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_USE_AGENT_STORE", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
)  # fmt: skip


class SignalAtLine(io.TextIOBase):
    """A text stream into `file` that sends this process SIGTERM once `marker` is written (None: never)."""

    def __init__(self, file, marker: str | None) -> None:
        self.file, self.marker = file, marker

    def write(self, text: str) -> int:
        self.file.write(text)
        if self.marker is not None and self.marker in text:
            self.marker = None
            self.file.flush()
            os.kill(os.getpid(), signal.SIGTERM)
        return len(text)

    def flush(self) -> None:
        self.file.flush()


def run_step(step: dict, stem: str) -> int:
    from litmoe.core.errors import RunStopped, UserError

    if "call" in step:
        module, function = step["call"].split(":")
        getattr(importlib.import_module(module), function)(*step.get("args", []))
        return 0
    from litmoe.training.cli import main

    try:
        if step.get("watch"):
            from host_syncs import watched_training

            Path(f"{stem}.syncs.json").write_text(json.dumps(watched_training(step["train"]).record()))
        else:
            main(step["train"])
    except RunStopped as stop:
        if stop.message:
            print(stop.message, file=sys.stderr)
        return stop.exit_code
    except UserError as err:  # as the command line says it: one line, exit 2
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def run_alone() -> bool:
    """Take the process group down; True on rank 0, which goes on as a single process."""
    import torch.distributed as dist

    rank = dist.get_rank()
    dist.barrier()
    deepspeed = sys.modules.get("deepspeed.comm.comm")
    if deepspeed is not None and deepspeed.cdb is not None:
        deepspeed.destroy_process_group()  # DeepSpeed's too: it keeps a clone of the world group
    else:
        dist.destroy_process_group()
    if rank != 0:
        return False
    for variable in LAUNCHER_VARIABLES:
        os.environ.pop(variable, None)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
    return True


def main(plan_file: str) -> None:
    import torch.distributed as dist

    plan = json.loads(Path(plan_file).read_text())
    folder, rank = Path(plan["folder"]), int(os.environ["RANK"])
    dist.init_process_group("gloo")  # every step's Fabric joins it, instead of each making its own
    for step in plan["steps"]:
        if step.get("alone"):
            if not run_alone():
                return
            continue
        stem = folder / f"{step['name']}.rank{rank}"
        marker = step.get("signal_rank0_at") if rank == 0 else None
        with open(f"{stem}.out", "w") as log, contextlib.redirect_stdout(SignalAtLine(log, marker)), \
                contextlib.redirect_stderr(log):  # fmt: skip
            try:
                status = run_step(step, str(stem))
            except BaseException:
                traceback.print_exc()
                status = 1
        Path(f"{stem}.status").write_text(str(status))
        if status == 1:
            sys.stdout.flush()
            os._exit(1)


if __name__ == "__main__":
    main(sys.argv[1])
