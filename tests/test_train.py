"""End-to-end: real (tiny) training runs through run_train's command line and LitGPT's loop."""

import csv
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from litmoe.core.errors import UserError
from litmoe.model.flops import training_flops_per_token
from litmoe.training.cli import main


def logged(out_dir: Path, key: str) -> dict[int, float]:
    """{step: value} of one metric from the run's CSV logs (a resumed run writes the next version)."""
    values = {}
    for log in sorted((out_dir / "logs" / "csv").glob("version_*/metrics.csv")):
        values.update({int(row["step"]): float(row[key]) for row in csv.DictReader(log.open()) if row.get(key)})
    return values


def test_training_run_learns_and_writes_a_loadable_checkpoint(train_args, tmp_path):
    from litgpt import GPT, Config, Tokenizer

    out_dir = tmp_path / "run"
    run = main(train_args(out_dir, max_tokens=256 * 24, extra=("--eval.interval", "100")))

    losses = list(logged(out_dir, "loss").values())
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5
    val = logged(out_dir, "val_loss")
    assert sorted(val) == [0, 24]  # the initial validation, and the final one after 24 iterations
    assert (run.summary.initial_val_loss, run.summary.val_loss) == pytest.approx((val[0], val[24]), abs=1e-4)
    assert val[24] < 0.75 * val[0]  # final validation well below the initial one
    assert run.summary.tokens == 24 * 4 * 64 and run.summary.seconds > 0
    assert list((out_dir / "logs" / "tensorboard").rglob("events.out.tfevents.*"))

    final = out_dir / "final"
    assert {"lit_model.pth", "model_config.yaml", "hyperparameters.yaml", "tokenizer.json"} <= {
        p.name for p in final.iterdir()
    }
    config = Config.from_file(final / "model_config.yaml")
    with torch.device("meta"):
        assert run.summary.flops == 24 * 4 * 64 * training_flops_per_token(GPT(config), seq_len=64)
    model = GPT(config)
    model.load_state_dict(torch.load(final / "lit_model.pth", weights_only=False)["model"])
    tokenizer = Tokenizer(final)
    ids = tokenizer.encode("The cat sees a red ball today.", bos=True)
    assert model(ids[None]).shape == (1, len(ids), config.padded_vocab_size)


def test_resume_auto_continues_like_an_uninterrupted_run(train_args, tmp_path):
    """With loader workers, which persist across validations (and epochs: tests/test_data.py)."""
    budget, workers = 256 * 12, ("--num_workers", "2")
    full = tmp_path / "full"
    main(train_args(full, budget, extra=workers))
    # a run that stopped after its first checkpoint: only step-4 exists
    resumed = tmp_path / "resumed"
    (resumed / "step-00000004").mkdir(parents=True)
    shutil.copytree(full / "step-00000004", resumed / "step-00000004", dirs_exist_ok=True)
    run = main(train_args(resumed, budget, extra=(*workers, "--resume", "auto")))

    expected, got = logged(full, "loss"), logged(resumed, "loss")
    assert sorted(got) == list(range(4, 12))  # continues at iteration 5 (step index 4)
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
    lr_full, lr_resumed = logged(full, "learning_rate"), logged(resumed, "learning_rate")
    assert all(lr_resumed[step] == pytest.approx(lr_full[step]) for step in lr_resumed)
    assert run.summary.tokens == 8 * 4 * 64  # only what this run trained


def test_fresh_run_refuses_to_overwrite_checkpoints(train_args, tmp_path):
    out_dir = tmp_path / "out"
    (out_dir / "final").mkdir(parents=True)
    (out_dir / "final" / "lit_model.pth").write_bytes(b"precious")
    with pytest.raises(UserError, match=r"already holds checkpoints \(final/\); pass --resume auto"):
        main(train_args(out_dir))
    assert (out_dir / "final" / "lit_model.pth").read_bytes() == b"precious"


def test_missing_data_dir_is_a_clear_error(train_args, tmp_path):
    args = train_args() + ["--data_dir", str(tmp_path / "nowhere")]
    with pytest.raises(UserError, match=r"nowhere/manifest\.json not found: prepare the data first with"):
        main(args)


def test_flash_force_refuses_before_any_work(train_args, tmp_path):
    out_dir = tmp_path / "out"
    with pytest.raises(UserError, match="--flash-attention-force: FlashAttention cannot run here"):
        main(train_args(out_dir, extra=("--flash-attention-force",)))
    assert not out_dir.exists()


def test_default_command_prepares_the_default_corpus_and_trains(tmp_path, monkeypatch, capsys):
    """`run_train.py` with no arguments, on a machine without a GPU (budget cut to keep the test short)."""
    from conftest import REPO

    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "train_config.yaml", tmp_path)
    shutil.copy(REPO / "model_config.yaml", tmp_path)
    run = main(["--train.max_tokens", "40960", "--eval.max_iters", "2"])
    out = capsys.readouterr().out
    assert "No CUDA GPU: using the CPU profile of the train config (model MoE-tiny" in out
    assert "preparing the default corpus" in out
    assert (tmp_path / "data" / "default" / "manifest.json").is_file()
    assert (tmp_path / "out" / "moe-tiny" / "final" / "lit_model.pth").is_file()
    assert run.summary.val_loss < run.summary.initial_val_loss - 1.0


def test_progress_bar_shows_tokens_of_budget_loss_and_rate(train_args, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "0")  # a terminal of no known width still gets a bar
    # 2,200 tokens is 8 whole iterations of 256 and a remainder the loop does not train: the bar ends at 100%
    main(train_args(tmp_path / "out", max_tokens=2200, extra=("--progress", "--eval.interval", "4")))
    captured = capsys.readouterr()
    frames = captured.err.replace("\r", "\n").splitlines()
    bar = [frame for frame in frames if frame.startswith("train:")]
    assert "train: 100%" in bar[-1] and "2.05k/2.05k" in bar[-1]
    assert all("None" not in frame for frame in bar)
    assert any("loss " in frame and "tok/s" in frame and ", val " in frame for frame in bar)
    assert bar[-1].rstrip().endswith(f"val {logged(tmp_path / 'out', 'val_loss')[8]:.3f}]")  # the final validation
    assert "Training summary" in captured.out


def test_the_run_says_what_it_does_and_what_its_numbers_cover(train_args, tmp_path, capsys):
    """Its effective settings instead of LitGPT's raw arguments; what the summary's validation loss covers;
    the routing console line and every moe/* column; tokens/s under its own name."""
    out_dir = tmp_path / "out"
    run = main(train_args(out_dir, max_tokens=256 * 6, extra=("--eval.interval", "100")))
    out = capsys.readouterr().out
    assert "Run settings (as this run uses them):" in out and "'max_seq_length'" not in out
    assert "budget       1,536 tokens: 6 optimizer steps of 4 sequences x 64 tokens" in out
    coverage = re.search(r"\(scored on (\d+) batches per rank: ([\d,]+) of the ([\d,]+) validation tokens", out)
    assert coverage and int(coverage[1]) == 4 and int(coverage[2].replace(",", "")) == 4 * 4 * 64
    assert run.summary.val_covers.startswith("(scored on 4 batches")
    assert re.search(r"MoE routing \| imbalance max/mean \d\.\d\d \(worst layer \d: \d\.\d\d\) \| entropy", out)
    columns = next(csv.reader((out_dir / "logs" / "csv" / "version_0" / "metrics.csv").open()))
    routing = {f"moe/layer{layer}/{key}" for layer in (0, 1) for key in ("imbalance", "entropy", "aux_loss", "z_loss")}
    routing |= {f"moe/layer{layer}/load/expert{expert}" for layer in (0, 1) for expert in range(4)}
    assert routing | {"moe/imbalance", "moe/imbalance_max", "grad_norm"} <= set(columns)
    assert len(logged(out_dir, "tokens_per_sec")) == 2  # LitGPT's monitor reports from its fifth log on
    assert run.summary.steady.tokens == (6 - 2) * 256  # the two warm-up steps left out
    assert 0 < run.summary.steady.seconds < run.summary.seconds
    steady = run.summary.steady.tokens / run.summary.steady.seconds
    line = re.search(r"throughput     : ([\d,]+) tokens/s, .* \(after 2 warm-up steps, without validation", out)
    assert line and int(line[1].replace(",", "")) == round(steady)
    shares = [logged(out_dir, f"moe/layer0/load/expert{expert}")[3] for expert in range(4)]
    assert sum(shares) == pytest.approx(1.0)


def test_load_heatmap_is_labelled_and_shaded_by_load():
    from litmoe.training.monitoring import HEATMAP_MARGIN, load_heatmap

    loads = [[0.25, 0.25, 0.25, 0.25], [0.5, 0.0, 0.25, 0.25]]
    image = load_heatmap([{"load": load} for load in loads])
    height, width, channels = image.shape
    assert channels == 3 and width > 4 * 28 and height > 2 * 28
    left, top = HEATMAP_MARGIN
    cell = (width - left - 12) // 4
    centre = lambda layer, expert: image[top + layer * cell + cell // 2, left + expert * cell + cell // 2]  # noqa: E731
    assert tuple(centre(0, 0)) == (128, 128, 128)  # a fair share: mid-grey
    assert tuple(centre(1, 0)) == (255, 255, 255) and tuple(centre(1, 1)) == (0, 0, 0)  # twice its share; idle
    labels = image[:top, left:]  # the expert labels above the cells: dark text on the light background
    assert (labels < 100).any()


def test_stock_and_litmoe_layers_train_alike_from_the_same_seed(train_args, tmp_path):
    """Same seed, same init draws, no balancing losses: the two layers' loss series agree step by step."""
    off = ("--moe.aux_loss_coef", "0", "--moe.z_loss_coef", "0", "--eval.interval", "100")
    for layer in ("stock", "litmoe"):
        main(train_args(tmp_path / layer, 256 * 10, extra=(*off, "--moe.layer", layer)))
    stock, ours = logged(tmp_path / "stock", "loss"), logged(tmp_path / "litmoe", "loss")
    assert sorted(ours) == sorted(stock) == list(range(10))
    assert all(ours[step] == pytest.approx(stock[step], rel=1e-4) for step in stock)


def test_steady_throughput_leaves_out_warm_up_validation_and_saving():
    """Time spent in the warm-up micro-batches and in validate/save calls is not training time."""
    from litmoe.training.monitoring import SteadyClock

    state = {"iter_num": 0}
    clock = SteadyClock(list(range(8)), state, warmup_iters=2, device=torch.device("cpu"))
    slow = clock.leaving_out(time.sleep)
    started = time.perf_counter()
    for _ in clock:
        if state["iter_num"] < 2:
            time.sleep(0.2)  # warm-up: compilation
        else:
            slow(0.2)  # validation or a checkpoint
        state["iter_num"] += 1
    iters, seconds = clock.measured()
    assert iters == 6 and seconds < 0.1 < time.perf_counter() - started


def test_a_run_ends_with_a_report_a_person_can_look_at(trained):
    from litmoe.training.report import read_log, report_figure

    report = trained / "logs" / "report.png"
    assert report.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and report.stat().st_size > 20_000
    figure = report_figure(read_log(trained))
    titles = {axes.get_title(): (axes.get_xlabel(), axes.get_ylabel()) for axes in figure.axes if axes.get_title()}
    assert titles == {
        "Loss": ("optimizer step", "cross-entropy (nats/token)"),
        "Throughput": ("optimizer step", "tokens/s (all ranks)"),
        "Gradient norm": ("optimizer step", "global L2 norm (before clipping)"),
        "Expert load (1 = a fair share of the routed tokens)": ("optimizer step", "layer, expert"),
    }
    load = next(axes for axes in figure.axes if axes.get_title().startswith("Expert load"))
    rows = [f"L{layer} E{expert}" for layer in (0, 1) for expert in range(4)]  # the tiny model: 2 layers, 4 experts
    assert [label.get_text() for label in load.get_yticklabels()] == rows
    loss = next(axes for axes in figure.axes if axes.get_title() == "Loss")
    assert [line.get_label() for line in loss.get_lines()] == ["training loss", "validation loss"]
    training, validation = (list(line.get_xdata()) for line in loss.get_lines())
    assert training == list(range(1, 31))  # every optimizer step of the run, by its number (not the iteration)
    assert validation == [0, 30]  # the initial validation (logged last) first: the curve does not run back to 0


def test_a_run_shorter_than_its_log_interval_still_has_a_report(train_args, tmp_path):
    out_dir = tmp_path / "out"
    run = main(train_args(out_dir, 256 * 2, extra=("--train.log_interval", "10", "--eval.final_validation", "false")))
    report = out_dir / "logs" / "report.png"
    assert run.summary is not None and report.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_speed_sweep_runs_each_variant_in_its_own_process_on_a_synthetic_corpus():
    """benchmarks/speed_sweep.py --dry-run, as the GPU session will run it (one variant and the profile here, not
    compiled, to stay fast): the 50k-vocabulary corpus written, the variant's row of numbers, the table, and the
    profile with its count of host syncs, each in a process of its own."""
    import subprocess
    import sys

    from conftest import REPO

    command = [sys.executable, "benchmarks/speed_sweep.py", "--dry-run", "--only", "no loader workers", "--profile",
               "--", "--no-compile"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "Synthetic corpus: 200,000 tokens, vocabulary 50,257" in out
    table = out[out.index("Speed sweep on CPU (dry run: not speeds)") :].splitlines()
    assert table[0].endswith("each variant in its own process")
    assert table[1].startswith("| variant | steady tokens/s | TFLOP/s | MFU | peak memory (GB) |")
    row = table[3].split(" | ")
    assert row[0] == "| no loader workers" and float(row[1].replace(",", "")) > 0 and row[3] == "n/a (no GPU)"
    assert 10 < float(row[5]) < 12  # a first step's loss on a 50,257-token vocabulary: about ln(50,257) = 10.8
    assert "Profile of the recipe, 1 optimizer steps after 1" in out and "host-device synchronisations" in out


def test_a_capacity_factor_trains_and_logs_the_dropped_share(train_args, tmp_path, capsys):
    out_dir = tmp_path / "out"
    main(train_args(out_dir, 256 * 8, extra=("--moe.capacity_factor", "0.5", "--eval.interval", "100")))
    dropped = logged(out_dir, "moe/dropped")
    assert dropped and all(0.4 <= share < 1 for share in dropped.values())  # half a fair share: over half dropped
    assert "| dropped " in capsys.readouterr().out
