"""Resuming a run: which checkpoint, whether this run's settings can continue it, and whether it is already done.

The checkpoint's hyperparameters.yaml holds the settings it was trained with and its progress (litmoe.training.saving):
optimizer steps, micro-batches, tokens, ranks, micro-batch size and sequence length. Against those, a resumed
run may change:
  allowed      the token budget (raising it continues a finished run), the global batch size (gradient
               accumulation follows), the micro-batch size (the iteration count is converted, so the token
               budget stays exact), the number of ranks and of loader workers (the data continues from its
               global position, litmoe.data.global_order; the model and optimizer state load whole), optimizer
               and schedule settings, logging
  not allowed  the model (its weights belong to the checkpoint's model) and its MoE layer (the optimizer state
               holds that layer's parameters), the sequence length, the data directory, the seed (the data order
               follows both), and the number of ranks of DeepSpeed's shards (one file per rank; the refusal names
               the way on: a new run from the checkpoint's weights with --initial_checkpoint_dir)
Each change is one line saying so, before anything is built.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from litmoe.core.checkpoint_io import (
    UNIVERSAL,
    checkpoint_problem,
    checkpoint_step,
    is_complete,
    is_zero_checkpoint,
    latest_checkpoint,
    latest_sound_checkpoint,
    load_state,
    read_progress,
)
from litmoe.core.errors import UserError
from litmoe.data.training_data import sources_key
from litmoe.model.configs import model_fields

IGNORED_MODEL_FIELDS = {"name", "hf_config"}
TRAINING_STATE = {"model", "optimizer", "iter_num"}  # what LitGPT's pretrain loop saves and resumes


def resolve_resume(resume: bool | str | Path, out_dir: Path, deepspeed: bool = False) -> bool | Path:
    """What to pass LitGPT as `resume`; refuses to start a fresh run over existing checkpoints, and to resume
    DeepSpeed shards without DeepSpeed (or a single-file checkpoint with it)."""
    if resume == "auto" or resume is True:
        found = latest_sound_checkpoint(out_dir)
        if found is None and latest_checkpoint(out_dir) is not None:
            raise UserError(
                f"--resume {resume}: no checkpoint in {out_dir} can be loaded (see above); move them aside to start"
                " fresh, or choose another --out_dir"
            )
        if found is None and resume is True:
            raise UserError(
                f"--resume: no checkpoint in {out_dir}; use --resume auto to start fresh when there is none"
            )
        if found is not None:
            check_resumable(found, deepspeed)
            print(f"Resuming from {found}")
        return found or False
    if resume:
        path = Path(resume)
        if path.is_dir() and not is_zero_checkpoint(path):
            path = path / "lit_model.pth"
        if not is_complete(path):
            raise UserError(
                f"--resume {resume}: no checkpoint there (expected a step-*/ or final/ dir with lit_model.pth)"
            )
        if (problem := checkpoint_problem(path)) is not None:
            raise UserError(f"--resume {path}: {problem}")
        check_resumable(path, deepspeed)
        newest = latest_checkpoint(out_dir)
        if newest is not None and checkpoint_step(newest) > checkpoint_step(path):
            raise UserError(
                f"--resume {resume}: {out_dir} already holds {newest.parent.name}/, a later step than"
                f" {path.parent.name}/, which training on would write over; continue it (--resume auto), or choose"
                " another --out_dir"
            )
        return path
    if (existing := latest_checkpoint(out_dir)) is not None:
        raise UserError(
            f"{out_dir} already holds checkpoints ({existing.parent.name}/); pass --resume auto to continue that run"
            " or choose another --out_dir"
        )
    return False


def check_resumable(checkpoint: Path, deepspeed: bool) -> None:
    if is_zero_checkpoint(checkpoint) and not deepspeed:
        raise UserError(
            f"{checkpoint}: DeepSpeed shards; resume with the --strategy deepspeed settings that wrote them"
            " (generate.py and evaluate.py read them as they are)"
        )
    if deepspeed and not is_zero_checkpoint(checkpoint):
        raise UserError(
            f"{checkpoint}: a single-file checkpoint; DeepSpeed resumes only its own shard directories, so resume"
            " with the strategy that wrote it"
        )
    if not is_zero_checkpoint(checkpoint) and not TRAINING_STATE <= load_state(checkpoint).keys():
        raise UserError(
            f"--resume {checkpoint}: weights only, without the optimizer and progress a run resumes (as LitGPT's"
            f" conversions write them); start a new run from them with --initial_checkpoint_dir {checkpoint.parent}"
        )


@dataclass(frozen=True)
class RunShape:
    """What a checkpoint's run and the resuming run are compared on."""

    model: dict[str, Any]
    world_size: int
    micro_batch_size: int
    global_batch_size: int
    seq_len: int
    data_dir: str
    seed: int
    moe_layer: str = "litmoe"

    @classmethod
    def of(cls, config, world_size: int, train, seq_len: int, data_dir: str | list, seed: int, moe_layer: str):
        """The shape of a run with these settings (`config` a litgpt.Config, `train` LitGPT's TrainArgs)."""
        return cls(
            model_fields(config), world_size, train.micro_batch_size, train.global_batch_size, seq_len,
            sources_key(data_dir), seed, moe_layer,
        )  # fmt: skip


def saved_shape(checkpoint_dir: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """(model config, run settings, progress) as the checkpoint recorded them."""
    model, settings = {}, {}
    for name in ("model_config.yaml", "hyperparameters.yaml"):
        path = checkpoint_dir / name
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, yaml.YAMLError) as err:
            raise UserError(
                f"{path}: unreadable ({' '.join(str(err).split())}); this checkpoint cannot be resumed"
            ) from None
        if name == "model_config.yaml":
            model = loaded or {}
        else:
            settings = loaded or {}
    return model, settings, read_progress(checkpoint_dir)


def check_continuation(weights: Path, run: RunShape, budget: int) -> int | None:
    """Compare the checkpoint with this run; raises for a change that is not allowed, prints the allowed ones.
    Returns the tokens the checkpoint had trained (None when it did not record them)."""
    checkpoint_dir = Path(weights).parent
    model, settings, progress = saved_shape(checkpoint_dir)
    where = f"--resume {checkpoint_dir}"
    changed = [
        f"{key} {model.get(key)} -> {run.model.get(key)}"
        for key in sorted(set(model) | set(run.model))
        if key not in IGNORED_MODEL_FIELDS and model.get(key) != run.model.get(key)
    ]
    if model and changed:
        raise UserError(
            f"{where}: the model differs from the checkpoint's ({'; '.join(changed[:3])}): not allowed, the weights"
            " belong to the checkpoint's model; resume with its model_config.yaml, or choose another --out_dir"
        )
    saved_layer = (settings.get("moe") or {}).get("layer")
    if saved_layer not in (None, run.moe_layer):
        raise UserError(
            f"{where}: --moe.layer {saved_layer} -> {run.moe_layer}: not allowed, the optimizer state holds the"
            f" parameters of {saved_layer}'s layer; resume with --moe.layer {saved_layer}, or start a new run from"
            f" its weights with --initial_checkpoint_dir {checkpoint_dir}"
        )
    if settings.get("data_dir") is not None:
        refuse_changed(where, "data_dir", sources_key(settings["data_dir"]), run.data_dir)
    refuse_changed(where, "seed", settings.get("seed"), run.seed)
    if progress is None:
        return None
    refuse_changed(where, "train.max_seq_length", progress["seq_len"], run.seq_len)
    tokens = int(progress["tokens"])
    if progress["world_size"] != run.world_size:
        check_new_world_size(weights, progress, run, tokens, settings, budget)
    per_iteration = run.micro_batch_size * run.seq_len * run.world_size
    if progress["micro_batch_size"] != run.micro_batch_size:
        if tokens % per_iteration:
            raise UserError(
                f"{where}: train.micro_batch_size {progress['micro_batch_size']} -> {run.micro_batch_size}: not"
                f" allowed here, {tokens:,} tokens trained is not a whole number of the new micro-batches"
            )
        print(
            f"Resuming with train.micro_batch_size {progress['micro_batch_size']} -> {run.micro_batch_size}: allowed;"
            f" iteration {progress['iter_num']} continues as {tokens // per_iteration}, so the budget stays exact"
        )
    previous_global = (settings.get("train") or {}).get("global_batch_size")
    if previous_global not in (None, run.global_batch_size):
        print(
            f"Resuming with train.global_batch_size {previous_global} -> {run.global_batch_size}: allowed; gradient"
            " accumulation follows"
        )
    return tokens


def check_new_world_size(
    weights: Path, progress: dict, run: RunShape, tokens: int, settings: dict, budget: int
) -> None:
    """A resume on another number of ranks: one line saying what continues how."""
    checkpoint_dir, old = Path(weights).parent, progress["world_size"]
    state = "model and optimizer state loaded whole"
    if is_zero_checkpoint(Path(weights)):
        state = f"model and optimizer state through DeepSpeed's universal checkpoint ({checkpoint_dir / UNIVERSAL})"
    previous_global = (settings.get("train") or {}).get("global_batch_size") or run.global_batch_size
    accumulation = f"{previous_global // (old * progress['micro_batch_size'])} -> "
    accumulation += f"{run.global_batch_size // (run.world_size * run.micro_batch_size)}"
    steps_left = max(0, budget - tokens) // (run.global_batch_size * run.seq_len)
    print(
        f"Resuming on {ranks(run.world_size)} (written by {old}): allowed; the data continues from global position"
        f" {tokens // run.seq_len:,} ({tokens:,} tokens trained), {run.global_batch_size} sequences per optimizer"
        f" step (gradient accumulation {accumulation}), {steps_left:,} optimizer steps left; {state}"
    )


def refuse_changed(where: str, key: str, saved: Any, now: Any) -> None:
    if saved is None:
        return
    if saved != now:
        raise UserError(
            f"{where}: {key} {saved} -> {now}: not allowed, the checkpoint's data position depends on it; resume"
            f" with --{key} {saved}"
        )


def finished_run(weights: Path, budget: int, run: RunShape) -> str | None:
    """When the checkpoint is a run's final/ and LitGPT's loop would train no further step with this budget: what
    to tell the user. The loop stops at `max_tokens // world_size // (micro_batch_size x seq_len)` micro-batches
    per rank, so a budget that is not a multiple of the tokens per step ends a little below it."""
    progress = read_progress(Path(weights).parent)
    if Path(weights).parent.name != "final" or progress is None:
        return None
    tokens_per_iter = run.micro_batch_size * run.seq_len
    max_iters = budget // run.world_size // tokens_per_iter
    if int(progress["tokens"]) // (tokens_per_iter * run.world_size) < max_iters:
        return None
    return (
        f"{Path(weights).parent.parent} already trained its budget ({int(progress['tokens']):,} tokens, final/);"
        " nothing to do. Raise --train.max_tokens to continue it"
    )


def resume_summary(resume: bool | str | Path, out_dir: Path, run: RunShape, budget: int, deepspeed: bool) -> str:
    """What `--resume` would continue, and how, for --estimate: a run's own checks and start lines (a resume on
    another number of ranks says what changes), with nothing written."""
    checkpoint = resolve_resume(resume, out_dir, deepspeed)
    if not checkpoint:
        return f"Resume: no checkpoint in {out_dir} yet, so the run starts fresh"
    tokens = check_continuation(checkpoint, run, budget) or 0
    if (done := finished_run(checkpoint, budget, run)) is not None:
        return done
    steps_left = max(0, budget - tokens) // (run.global_batch_size * run.seq_len)
    return (
        f"Resume: {checkpoint} on {ranks(run.world_size)}, {tokens:,} tokens trained, {steps_left:,} optimizer"
        " steps left"
    )


def ranks(count: int) -> str:
    return f"{count} rank{'s' * (count != 1)}"
