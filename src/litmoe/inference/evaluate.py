"""Score checkpoints on held-out text: loss, perplexity, bits per byte, and how the experts were used.

Bits per byte divide the summed negative log-likelihood (in bits) by the UTF-8 bytes of the scored text, so
models with different tokenizers compare directly.
"""

import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from litmoe.core.checkpoint_io import verify as verify_checkpoints
from litmoe.core.errors import UserError
from litmoe.core.outputs import check_output_file, figure_written_by, write_file
from litmoe.data.prepared import MANIFEST, SPLITS, check_chunks, read_manifest
from litmoe.data.readers import read_jsonl, read_text_file
from litmoe.data.tokenizer import literal_special_tokens, tokenizer_fingerprint
from litmoe.inference.loading import load_model, resolve_checkpoint_dir
from litmoe.model.attention import compute_dtype, default_precision
from litmoe.model.moe import moe_layers, read_routing_stats


def prepared_windows(data_dir: Path, seq_length: int) -> Iterator[torch.Tensor]:
    """Consecutive windows of seq_length + 1 tokens from the validation split of prepared data."""
    from litdata.streaming import StreamingDataset, TokensLoader

    split_dir = data_dir / SPLITS[1]
    if not (split_dir / "index.json").is_file():
        raise UserError(f"{split_dir}: no prepared validation data; pass --data_dir made by prepare_data.py or --file")
    dataset = StreamingDataset(str(split_dir), item_loader=TokensLoader(block_size=seq_length + 1), shuffle=False)
    for index in range(len(dataset)):
        yield dataset[index].long()


def file_windows(path: Path, tokenizer, seq_length: int) -> Iterator[torch.Tensor]:
    """A .txt file (one document) or a .jsonl file (one per record), framed BOS ... EOS, cut into windows."""
    if path.is_dir():
        raise UserError(f"--file {path}: a directory; give one .txt or .jsonl file")
    if not path.is_file():
        raise UserError(f"--file {path}: no such file")
    documents = read_jsonl(path) if path.suffix in (".jsonl", ".json") else [read_text_file(path)]
    if tokenizer.backend == "huggingface":  # as prepare_data.py encodes documents
        literal_special_tokens(tokenizer.processor)
    stream = [
        token
        for document in documents
        if document.strip()
        for token in tokenizer.encode(document, bos=True, eos=True).tolist()
    ]
    if len(stream) < 2:
        raise UserError(f"--file {path}: no text to evaluate; give a non-empty .txt or .jsonl file")
    window = seq_length + 1
    for start in range(0, max(len(stream) - window, 0) + 1, window):
        yield torch.tensor(stream[start : start + window])


@torch.no_grad()
def score(model, tokenizer, windows: Iterator[torch.Tensor], batch_size: int, max_batches: int | None) -> dict:
    """Summed loss over every target token of the windows (the last window may be shorter)."""
    device = next(model.parameters()).device
    nll, tokens, utf8_bytes, batches = 0.0, 0, 0, 0
    pending: list[torch.Tensor] = []

    def flush() -> None:
        nonlocal nll, tokens, utf8_bytes, batches
        for length in sorted({len(w) for w in pending}):  # batch equal lengths together
            batch = torch.stack([w for w in pending if len(w) == length]).to(device)
            logits = model(batch[:, :-1])
            targets = batch[:, 1:]
            nll += float(
                torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
            )
            tokens += targets.numel()
            utf8_bytes += sum(len(tokenizer.decode(row).encode("utf-8")) for row in targets.cpu())
        batches += 1
        pending.clear()

    for window in windows:
        if max_batches is not None and batches >= max_batches:
            break
        pending.append(window)
        if len(pending) == batch_size:
            flush()
    if pending and (max_batches is None or batches < max_batches):
        flush()
    if tokens == 0:
        raise UserError("nothing to evaluate: the data has fewer tokens than one window; lower --seq_length")
    loss = nll / tokens
    return {
        "tokens": tokens,
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": nll / math.log(2) / max(utf8_bytes, 1),
    }


def training_data_dir(checkpoint_dir: Path) -> Path | None:
    """The data_dir a run_train.py checkpoint was trained on (from its hyperparameters.yaml); the first source of a
    mixture."""
    path = checkpoint_dir / "hyperparameters.yaml"
    if not path.is_file():
        return None
    from litmoe.data.training_data import data_sources  # imports LitGPT: not for `evaluate.py --help`

    data_dir = (yaml.safe_load(path.read_text()) or {}).get("data_dir")
    return data_sources(data_dir)[0].path if data_dir else None


def evaluate_checkpoint(
    checkpoint: Path,
    data_dir: Path | None,
    file: Path | None,
    seq_length: int | None,
    batch_size: int,
    max_batches: int | None,
    dtype: torch.dtype,
) -> dict[str, Any]:
    checkpoint_dir = resolve_checkpoint_dir(checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(checkpoint_dir, device, dtype)
    length = min(seq_length or model.config.block_size, model.config.block_size)
    if seq_length is not None and seq_length > length:
        print(f"--seq_length {seq_length} is above {checkpoint_dir}'s block size: scoring windows of {length} tokens")
    model.max_seq_length = length
    if file is not None:
        windows, source = file_windows(Path(file), tokenizer, length), str(file)
    else:
        data_dir = data_dir or training_data_dir(checkpoint_dir)
        if data_dir is None:
            raise UserError(f"{checkpoint_dir}: which data? pass --data_dir (prepared data) or --file (text)")
        check_same_tokenizer(Path(data_dir), checkpoint_dir)
        check_chunks(Path(data_dir))
        windows, source = prepared_windows(Path(data_dir), length), f"{data_dir} (val)"
    for layer in moe_layers(model):
        layer.record_routing = True
    result = {"checkpoint": str(checkpoint_dir), "data": source, "seq_length": length}
    result.update(score(model, tokenizer, windows, batch_size, max_batches))
    result["routing"] = read_routing_stats(model)
    return result


def check_evaluation(
    checkpoints: list[Path], seq_length: int | None, batch_size: int, max_batches: int | None, tasks_limit: int | None
) -> None:
    """Settings in range before any checkpoint is loaded."""
    if not checkpoints:
        raise UserError("--checkpoints is empty; give one or more checkpoint dirs, e.g. [out/moe-tiny/final]")
    resolved = [Path(checkpoint).resolve() for checkpoint in checkpoints]
    if len(set(resolved)) < len(resolved):
        twice = next(checkpoint for index, checkpoint in enumerate(checkpoints) if resolved[index] in resolved[:index])
        raise UserError(f"--checkpoints: {twice} is given twice; give each checkpoint once")
    counts = {"--seq_length": seq_length, "--batch_size": batch_size, "--max_batches": max_batches}
    for flag, value in (counts | {"--tasks_limit": tasks_limit}).items():
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")


def strict_json(value: Any) -> Any:
    """`value` with NaN and infinities as null: JSON has no such numbers (Python writes `NaN`, which jq and browsers
    refuse)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(item) for item in value]
    return value


def is_results_file(path: Path) -> bool:
    """Whether `path` holds results that evaluate.py wrote (which a new --out may replace)."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(results, list) and all(
        isinstance(row, dict) and {"checkpoint", "loss"} <= set(row) for row in results
    )


FIGURE_SOFTWARE = "litmoe evaluate.py"  # PNG metadata: a figure evaluate.py may replace


def is_results_figure(path: Path) -> bool:
    """Whether `path` is a figure that evaluate.py wrote (which a new --out may replace)."""
    return figure_written_by(path, FIGURE_SOFTWARE)


def write_comparison_figure(results: list[dict[str, Any]], path: Path) -> None:
    """Loss per checkpoint, and each checkpoint's expert load per layer (1 = a fair share), as one PNG written
    through a temporary file: all or nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [Path(result["checkpoint"]).name for result in results]
    rows = [(name, index, layer["load"]) for name, r in zip(names, results, strict=True) for index, layer in
            enumerate(r["routing"])]  # fmt: skip
    figure, (loss, load) = plt.subplots(1, 2, figsize=(13, 1 + max(4, 0.22 * len(rows))), constrained_layout=True)
    loss.plot(names, [result["loss"] for result in results], "o-")
    loss.set(title="Validation loss", xlabel="checkpoint", ylabel="cross-entropy (nats/token)")
    loss.tick_params(axis="x", labelrotation=30)
    load.set(title="Expert load (1 = a fair share of the routed tokens)", xlabel="expert", ylabel="checkpoint, layer")
    if rows:
        grid = np.array([shares for *_, shares in rows])
        grid = grid / grid.mean(axis=1, keepdims=True).clip(min=1e-12)  # shares of the routed tokens -> vs fair
        image = load.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=2)
        load.set_yticks(range(len(rows)), [f"{name} L{index}" for name, index, _ in rows], fontsize=7)
        figure.colorbar(image, ax=load, label="load / fair share")
    scratch = path.with_name(f".{path.name}.partial")
    try:
        figure.savefig(scratch, format="png", dpi=110, metadata={"Software": FIGURE_SOFTWARE})
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)
        plt.close(figure)


def check_same_tokenizer(data_dir: Path, checkpoint_dir: Path) -> None:
    """Scoring tokens from another tokenizer would give a number, and a meaningless one."""
    manifest = read_manifest(data_dir)
    if manifest is None:
        raise UserError(f"{data_dir}: no {MANIFEST}; pass data made by prepare_data.py, or a text file with --file")
    if manifest.tokenizer_fingerprint != tokenizer_fingerprint(checkpoint_dir):
        raise UserError(
            f"{data_dir}: prepared with another tokenizer than {checkpoint_dir} uses; score it with --file on raw"
            " text, or prepare the data with --tokenizer_dir pointing at the checkpoint"
        )


def require_lm_eval():
    try:
        import lm_eval
    except ImportError as err:
        raise UserError("--tasks needs lm-eval-harness: install it with `uv pip install lm-eval`") from err
    return lm_eval


def downstream_tasks(checkpoint: Path, tasks: str, limit: int | None) -> dict[str, Any]:
    """lm-eval-harness scores of a checkpoint (exported to Hugging Face format in a temporary directory)."""
    import tempfile

    from litmoe.inference.export import export_hf

    lm_eval = require_lm_eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = export_hf(checkpoint, Path(tmp) / "hf")
        try:
            results = lm_eval.simple_evaluate(
                model="hf", model_args=f"pretrained={hf_dir}", tasks=tasks.split(","), limit=limit
            )
        except (OSError, ConnectionError, ValueError) as err:
            raise UserError(
                f"--tasks {tasks}: lm-eval could not load the tasks or their data ({err}); task data must be"
                " downloadable or already in the Hugging Face datasets cache"
            ) from err
    return results["results"]


def comparison_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| checkpoint | tokens | loss | perplexity | bits/byte | expert imbalance (max/mean, worst layer) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in results:
        imbalance = max((layer["imbalance"] for layer in result["routing"]), default=float("nan"))
        lines.append(
            f"| {result['checkpoint']} | {result['tokens']:,} | {result['loss']:.4f} | {result['perplexity']:.2f}"
            f" | {result['bits_per_byte']:.4f} | {imbalance:.2f} |"
        )
    return "\n".join(lines)


def evaluate(
    checkpoints: list[Path] | Path,
    data_dir: Path | None = None,
    file: Path | None = None,
    seq_length: int | None = None,
    batch_size: int = 4,
    max_batches: int | None = None,
    precision: Literal["bf16-true", "16-true", "32-true"] | None = None,
    out: Path | None = None,
    tasks: str | None = None,
    tasks_limit: int | None = None,
    force: bool = False,
    verify: bool = False,
) -> list[dict[str, Any]]:
    """Score one or more checkpoints on the same text and print a comparison table.

    Args:
        checkpoints: Checkpoint dirs (final/, step-*/) or training output dirs (their newest checkpoint): one
            path, or several as [a,b].
        data_dir: Prepared data whose validation split is scored; default: the data each checkpoint trained on.
        file: Score this .txt or .jsonl file instead of prepared data.
        seq_length: Window length in tokens; default the model's block size.
        batch_size: Windows per forward pass.
        max_batches: Stop after this many batches (default: all the data).
        precision: Weights' precision; default bf16-true on a CUDA GPU, 32-true on CPU.
        out: Also write the results (including per-layer expert load) to this JSON file, and a figure of them
            (loss per checkpoint, expert load per layer) beside it as the same name with .png.
        tasks: Also run these lm-eval-harness tasks, comma-separated (e.g. 'hellaswag,arc_easy'); needs lm-eval
            installed and the task data downloadable or cached.
        tasks_limit: Evaluate at most this many examples per task.
        force: Let --out replace a file that is not an earlier results file of evaluate.py.
        verify: Only check each checkpoint against its SHA256SUMS and that it would load (a run's folder: each of its
            checkpoints), one line each, then exit (status 65 when one fails); nothing is loaded or written.
    """
    checkpoints = [checkpoints] if isinstance(checkpoints, str | Path) else checkpoints
    for checkpoint in checkpoints:
        listed = str(checkpoint).startswith("[") and str(checkpoint).endswith("]")
        if listed and not Path(checkpoint).exists():  # a list that did not parse
            raise UserError(
                f"--checkpoints {checkpoint}: not a list of paths (an empty member, or a space?); write [DIR1,DIR2]"
            )
    if verify:
        verify_checkpoints(checkpoints)
        return []
    check_evaluation(checkpoints, seq_length, batch_size, max_batches, tasks_limit)
    if out is not None:
        inputs = [("--checkpoints", checkpoint) for checkpoint in checkpoints] + [
            ("--data_dir", data_dir),
            ("--file", file),
        ]
        if Path(out).suffix.lower() == ".png":
            raise UserError(f"--out {out}: give the results' .json path; the figure goes beside it as .png")
        out = check_output_file(out, "--out", inputs, written_by_us=is_results_file, force=force)
        if not out.parent.is_dir():
            raise UserError(f"--out {out}: give a file path in an existing directory")
        figure = check_output_file(out.with_suffix(".png"), "--out", inputs, is_results_figure, force)
    if tasks is not None:
        require_lm_eval()  # fail before any scoring when it is missing
    dtype = compute_dtype(precision or default_precision(training=False))
    results = [
        evaluate_checkpoint(checkpoint, data_dir, file, seq_length, batch_size, max_batches, dtype)
        for checkpoint in checkpoints
    ]
    if tasks is not None:
        for result in results:
            result["tasks"] = downstream_tasks(Path(result["checkpoint"]), tasks, tasks_limit)
    print(comparison_table(results))
    for result in results:
        for index, layer in enumerate(result["routing"]):
            load = " ".join(f"{share:.2f}" for share in layer["load"])
            print(f"{result['checkpoint']} layer {index}: expert load [{load}] imbalance {layer['imbalance']:.2f}")
    if out is not None:
        write_file(out, json.dumps(strict_json(results), indent=2) + "\n")
        write_comparison_figure(results, figure)
        print(f"Results written to {out}, and as a figure to {figure}", file=sys.stderr)
    return results
