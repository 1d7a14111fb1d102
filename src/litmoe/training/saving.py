"""Saving checkpoints that survive kill -9 and full disks: a checkpoint directory appears only when complete.

LitGPT's `save_checkpoint` writes `step-N/lit_model.pth` and its configs in place, and Lightning writes the
file through a temporary file in $TMPDIR that it then moves, which is a copy, not a rename, when --out_dir
is on another filesystem: a kill or a full disk mid-save leaves a truncated `lit_model.pth` that looks like
a checkpoint, and the temporary file behind. Here, around LitGPT's own save:

  1. every rank writes into `.step-N.partial/` beside the target (the same filesystem); Lightning's file save
     goes straight to its file in there (litmoe.distributed.fabric), with no temporary file elsewhere;
  2. every rank fsyncs what it wrote; rank 0 renames the directory to `step-N/` (atomic) and fsyncs the
     parent. A checkpoint being replaced (the same step saved again, `final/` of a continued run) is moved
     aside first and removed only once the new one is in place;
  3. with `keep_last`, older `step-*` directories are removed after that, never `final/`.

Before the rename rank 0 writes `SHA256SUMS` (litmoe.core.checksums), which every load checks.

Weights are checked to be finite before a save: no checkpoint holds NaN or inf. A save that runs out of
space stops with one line naming the directory and the free and needed bytes; the partial directory is
removed and the previous checkpoint is untouched.
"""

import errno
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from litmoe.core.checksums import SUMS, hand_over_digests, write_checksums
from litmoe.core.errors import UserError
from litmoe.distributed.expert_parallel import local, split_experts

PARTIAL, REPLACED = ".partial", ".old"
STEP_DIR_PREFIX = "step-"


def scratch_dir(target: Path) -> Path:
    return target.with_name(f".{target.name}{PARTIAL}")


def replaced_dir(target: Path) -> Path:
    return target.with_name(f".{target.name}{REPLACED}")


@dataclass
class AtomicSave:
    """A drop-in for `litgpt.pretrain.save_checkpoint(fabric, state, tokenizer_dir, checkpoint_file)`.

    `progress(fabric, state)` is written into the checkpoint's hyperparameters.yaml (what resuming checks), and
    `needed_bytes` is the expected checkpoint size, for the message when the disk is full."""

    stock_save: Callable[..., None]
    progress: Callable[[Any, dict], dict[str, Any]]
    keep_last: int | None = None
    needed_bytes: int = 0

    def __call__(self, fabric, state: dict, tokenizer_dir: Path | None, checkpoint_file: Path) -> None:
        checkpoint_file = Path(checkpoint_file)
        target = checkpoint_file.parent
        scratch = scratch_dir(target)
        require_finite_weights(fabric, state["model"], target)
        if fabric.global_rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)  # left by a save that was killed
        fabric.barrier()
        try:
            self.stock_save(fabric, state, tokenizer_dir, scratch / checkpoint_file.name)
            if fabric.global_rank == 0:
                record_progress(scratch / "hyperparameters.yaml", self.progress(fabric, state))
            else:  # DeepSpeed's shards of this rank, hashed as written, for rank 0's SHA256SUMS
                hand_over_digests(scratch, fabric.global_rank)
            fsync_tree(scratch)
        except (OSError, RuntimeError) as err:
            if fabric.global_rank == 0:
                shutil.rmtree(scratch, ignore_errors=True)
            if out_of_space(err):
                raise disk_full(target, self.needed_bytes) from None
            raise
        fabric.barrier()
        if fabric.global_rank == 0:
            write_checksums(scratch)  # last: it lists every file every rank wrote
            fsync_path(scratch / SUMS)
            publish(scratch, target)
            if self.keep_last:
                remove_old_checkpoints(target.parent, self.keep_last)
        fabric.barrier()
        fabric.print(f"Saved checkpoint {target}")


def require_finite_weights(fabric, model: torch.nn.Module, target: Path) -> None:
    """Refuse to write NaN or inf weights (each rank checks what it holds; the answer is agreed)."""
    with torch.no_grad():
        held = [local(param) for param in model.parameters()]
        finite = [torch.isfinite(param).all() for param in held if param.numel()]
        all_finite = torch.stack(finite).all().float() if finite else torch.ones((), device=fabric.device)
    if fabric.world_size > 1:
        all_finite = fabric.all_reduce(all_finite.to(fabric.device), reduce_op="min")
    if not bool(all_finite):
        from litmoe.training.health import Diverged

        raise Diverged(f"the weights are not finite, so {target.name}/ was not written")


def record_progress(hyperparameters: Path, progress: dict[str, Any]) -> None:
    settings = yaml.safe_load(hyperparameters.read_text(encoding="utf-8")) if hyperparameters.is_file() else {}
    settings = {**(settings or {}), "progress": progress}
    hyperparameters.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root` to disk (each rank flushes what it can see, its own too)."""
    for directory, _, names in os.walk(root):
        for name in names:
            fsync_path(Path(directory) / name)
        fsync_path(Path(directory))


def fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def publish(scratch: Path, target: Path) -> None:
    """Make `scratch` visible as `target` in one rename; a `target` already there is removed only afterwards."""
    replaced = replaced_dir(target)
    if target.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        target.rename(replaced)
    scratch.rename(target)
    fsync_path(target.parent)
    shutil.rmtree(replaced, ignore_errors=True)


def recover_interrupted_saves(out_dir: Path) -> None:
    """Undo what a killed save left: a partial directory is removed; a checkpoint moved aside for its
    replacement, which never arrived, is moved back."""
    for leftover in sorted(Path(out_dir).glob(f".*{PARTIAL}")):
        shutil.rmtree(leftover, ignore_errors=True)
    for replaced in sorted(Path(out_dir).glob(f".*{REPLACED}")):
        target = replaced.with_name(replaced.name.removeprefix(".").removesuffix(REPLACED))
        if target.exists():
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            replaced.rename(target)


def step_number(path: Path) -> int | None:
    digits = path.name.removeprefix(STEP_DIR_PREFIX)
    return int(digits) if path.name.startswith(STEP_DIR_PREFIX) and digits.isdigit() else None


def remove_old_checkpoints(out_dir: Path, keep_last: int) -> list[Path]:
    """Remove all but the newest `keep_last` step-* checkpoints (final/ is never touched); returns the removed.
    Only checkpoint directories a run wrote count: a link, a file or a folder without weights that happens to be
    named step-* is the user's, and stays."""
    steps = sorted((path for path in Path(out_dir).iterdir() if step_number(path) is not None and written_here(path)),
                   key=step_number)  # fmt: skip
    removed = steps[:-keep_last] if keep_last > 0 else []
    for path in removed:
        shutil.rmtree(path)
    return removed


def written_here(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and (path / "lit_model.pth").exists()


def out_of_space(err: BaseException | None) -> bool:
    """torch.save reports a full disk as OSError(ENOSPC), or as its zip writer's error raised while handling it."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(err) or "file write failed" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full(target: Path, needed_bytes: int) -> UserError:
    free = shutil.disk_usage(target.parent).free
    return UserError(
        f"{target.parent}: no space left to save {target.name}/ ({gigabytes(free)} free, a checkpoint needs about"
        f" {gigabytes(needed_bytes)}); the previous checkpoints are intact: free space, lower --checkpoint.keep_last,"
        " or resume into more space with --resume auto"
    )


def gigabytes(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e8 else f"{count / 1e6:.1f} MB"


def checkpoint_bytes(model: torch.nn.Module, world_size: int, sharded: bool) -> int:
    """About what one checkpoint takes: fp32 weights and AdamW's two fp32 moments, 12 bytes per parameter.
    Parameters are counted whole (ZeRO-3's placeholders by `ds_numel`, FSDP's flat shards times the ranks, FSDP2's
    by their global shape, experts split over ranks times the split)."""
    split = {key: experts.n_expert // len(experts) for key, (experts, _) in split_experts(model).items()}
    count = sum(getattr(p, "ds_numel", p.numel()) * split.get(id(p), 1) for p in model.parameters())
    return 12 * count * (world_size if sharded else 1)


def warn_if_little_space(out_dir: Path, needed_bytes: int, report: Callable[[str], None]) -> None:
    """Before the first save: warn when the disk cannot hold two checkpoints (the new one is written before the
    old one is removed)."""
    existing = Path(out_dir)
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < 2 * needed_bytes:
        report(
            f"Warning: {out_dir} has {gigabytes(free)} free, less than two checkpoints ({gigabytes(2 * needed_bytes)});"
            " a save may fail for lack of space"
        )
