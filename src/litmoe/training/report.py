"""A run report a person can look at: `logs/report.png`, drawn from the run's CSV log at the end of a run.

Four panels, each with labelled axes: the training loss with the validation loss, throughput (tokens/s, all
ranks), the gradient norm, and each MoE layer's expert load over time (the share of routed tokens per expert,
relative to a fair share). A resumed run opens a new CSV version; the report reads them all, in order, so it
covers the whole run. TensorBoard keeps the same numbers; this is the page one attaches to a message. A
`report.png` that no run wrote (its metadata says so) is the user's: the report goes to `report-2.png` instead.
"""

import csv
import math
import re
from pathlib import Path

import numpy as np

from litmoe.core.outputs import figure_written_by

LOAD_COLUMN = re.compile(r"moe/layer(\d+)/load/expert(\d+)")
REPORT_SOFTWARE = "litmoe run report"  # PNG metadata: a report a later run may replace


def read_log(out_dir: Path) -> list[dict[str, float]]:
    """Every logged row of the run (all CSV versions, oldest first), as numbers; empty cells left out."""
    versions = sorted((out_dir / "logs" / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    rows = []
    for path in versions:
        with path.open(newline="", encoding="utf-8") as file:
            for row in csv.DictReader(file):
                rows.append({key: float(value) for key, value in row.items() if key and value not in ("", None)})
    return rows


def optimizer_step(row: dict[str, float]) -> float | None:
    """The optimizer step a row was logged at. The CSV's `step` column is the iteration LitGPT passes the logger
    (micro-batches per rank, which overwrites LitGPT's own `step` key); RunLogger adds `optimizer_step`. Logs from
    before it have only the iteration."""
    return row.get("optimizer_step", row.get("step"))


def series(rows: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    """(optimizer steps, values) of the rows that have `key`, in step order (the initial validation is logged
    last, at the step the run started from)."""
    steps = [(optimizer_step(row), row) for row in rows if key in row and math.isfinite(row[key])]
    points = sorted((step, row[key]) for step, row in steps if step is not None)
    return [step for step, _ in points], [value for _, value in points]


def load_over_time(rows: list[dict[str, float]]) -> tuple[np.ndarray, list[float], list[str]]:
    """(experts' load relative to a fair share, one row per (layer, expert) and one column per log step; the steps;
    the row labels)."""
    columns = sorted({(int(m[1]), int(m[2])) for row in rows for key in row if (m := LOAD_COLUMN.fullmatch(key))})
    logged = [row for row in rows if any(f"moe/layer{layer}/load/expert{expert}" in row for layer, expert in columns)]
    experts_per_layer = {layer: sum(1 for other, _ in columns if other == layer) for layer, _ in columns}
    grid = np.full((len(columns), len(logged)), np.nan)
    for column, row in enumerate(logged):
        for index, (layer, expert) in enumerate(columns):
            share = row.get(f"moe/layer{layer}/load/expert{expert}")
            if share is not None:
                grid[index, column] = share * experts_per_layer[layer]
    steps = [step if (step := optimizer_step(row)) is not None else math.nan for row in logged]
    return grid, steps, [f"L{layer} E{expert}" for layer, expert in columns]


def report_figure(rows: list[dict[str, float]]):
    """The report's figure (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ((loss, speed), (norm, load)) = plt.subplots(2, 2, figsize=(13, 8), constrained_layout=True)
    loss.plot(*series(rows, "loss"), label="training loss")
    loss.plot(*series(rows, "val_loss"), "o-", label="validation loss")
    loss.set(title="Loss", xlabel="optimizer step", ylabel="cross-entropy (nats/token)")
    loss.legend()
    speed.plot(*series(rows, "tokens_per_sec"))
    speed.set(title="Throughput", xlabel="optimizer step", ylabel="tokens/s (all ranks)")
    norm.plot(*series(rows, "grad_norm"))
    norm.set(title="Gradient norm", xlabel="optimizer step", ylabel="global L2 norm (before clipping)")
    grid, steps, labels = load_over_time(rows)
    load.set(
        title="Expert load (1 = a fair share of the routed tokens)", xlabel="optimizer step", ylabel="layer, expert"
    )
    if not any("loss" in row for row in rows):
        figure.suptitle("No training log yet: the run was shorter than --train.log_interval optimizer steps")
    if grid.size:
        first, last = min(steps), max(steps)
        first, last = (first - 0.5, last + 0.5) if first == last else (first, last)  # a run of one log step
        image = load.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=2, interpolation="nearest",
                            extent=(first, last, len(labels) - 0.5, -0.5))  # fmt: skip
        load.set_yticks(range(len(labels)), labels, fontsize=max(4, min(9, 300 // max(len(labels), 1))))
        figure.colorbar(image, ax=load, label="load / fair share")
    return figure


def write_report(out_dir: Path) -> Path:
    """`out_dir/logs/report.png` from the run's CSV log (every run gets one, a short one with what it logged)."""
    figure = report_figure(read_log(out_dir))
    path = out_dir / "logs" / "report.png"
    number = 1
    while path.exists() and not figure_written_by(path, REPORT_SOFTWARE):  # the user's own file stays
        number += 1
        path = out_dir / "logs" / f"report-{number}.png"
    figure.savefig(path, dpi=110, metadata={"Software": REPORT_SOFTWARE})
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path
