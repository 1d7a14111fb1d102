import json
import math
import os
import stat

import pytest
import torch

from litmoe.core.errors import UserError
from litmoe.inference.evaluate import evaluate
from litmoe.inference.loading import load_model


def test_scores_validation_data_and_compares_checkpoints(trained, prepared, tmp_path, capsys):
    out = tmp_path / "results.json"
    early, final = trained / "step-00000004", trained / "final"
    results = evaluate([early, final], data_dir=prepared, seq_length=64, out=out)
    table = capsys.readouterr().out
    assert str(early) in table and str(final) in table and "bits/byte" in table
    assert json.loads(out.read_text()) == results
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # as any new file, not the owner's alone
    first, last = results
    assert first["tokens"] == last["tokens"] > 1000
    assert last["loss"] < first["loss"]  # more training, lower held-out loss
    for result in results:
        assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
        assert len(result["routing"]) == 2  # two MoE layers
        for layer in result["routing"]:
            assert sum(layer["load"]) == pytest.approx(1.0) and layer["imbalance"] >= 1.0

    # the figure beside the results: a PNG of its own, replaced by the next run, while a user's PNG there is not
    from PIL import Image

    figure = tmp_path / "results.png"
    with Image.open(figure) as image:
        assert image.format == "PNG" and image.info["Software"] == "litmoe evaluate.py" and image.size[0] > 1000
    evaluate([final], data_dir=prepared, seq_length=64, max_batches=1, out=out)
    Image.new("RGB", (4, 4)).save(figure)  # now the user's own picture
    with pytest.raises(UserError, match="results.png exists and this command did not write it"):
        evaluate([final], data_dir=prepared, seq_length=64, max_batches=1, out=out)
    assert Image.open(figure).size == (4, 4) and len(json.loads(out.read_text())) == 1


def test_text_file_bits_per_byte_by_hand(trained, tmp_path):
    text = "The cat sees a red ball today. A dog likes the blue sky again."
    path = tmp_path / "held_out.txt"
    path.write_text(text)
    (result,) = evaluate([trained / "final"], file=path, seq_length=64)
    model, tokenizer = load_model(trained / "final", torch.device("cpu"), torch.float32)
    ids = tokenizer.encode(text, bos=True, eos=True).long()
    with torch.no_grad():
        logits = model(ids[None, :-1])
    nll = torch.nn.functional.cross_entropy(logits[0], ids[1:], reduction="sum").item()
    assert result["tokens"] == len(ids) - 1
    assert result["loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-5)


def test_defaults_to_the_data_the_checkpoint_trained_on(trained, prepared, capsys):
    (result,) = evaluate([trained], seq_length=1000, max_batches=1)  # above the block size: said, and cut to it
    assert result["seq_length"] == 64 and "--seq_length 1000 is above" in capsys.readouterr().out
    assert result["data"] == f"{prepared} (val)" and result["tokens"] == 4 * 64


def test_empty_file_is_a_clear_error(trained, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(UserError, match=r"empty\.txt: no text to evaluate"):
        evaluate([trained], file=empty)


def test_downstream_tasks_without_lm_eval_say_how_to_install(trained, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(UserError, match=r"--tasks needs lm-eval-harness: install it with `uv pip install lm-eval`"):
        evaluate([trained], tasks="hellaswag")


def test_one_checkpoint_may_be_given_as_a_bare_path(trained, prepared):
    from litmoe.core.cli import run_function

    results = run_function(evaluate, ["--checkpoints", str(trained / "final"), "--data_dir", str(prepared),
                                      "--max_batches", "1"])  # fmt: skip
    assert len(results) == 1 and results[0]["checkpoint"] == str(trained / "final")


def test_results_files_are_strict_json():
    """Python writes NaN for a loss that overflowed; jq and browsers refuse it: null instead."""
    from litmoe.inference.evaluate import strict_json

    text = json.dumps(strict_json([{"loss": float("nan"), "load": [0.5, float("inf")], "name": "a"}]))
    assert json.loads(text, parse_constant=lambda name: pytest.fail(name)) == [
        {"loss": None, "load": [0.5, None], "name": "a"}
    ]
