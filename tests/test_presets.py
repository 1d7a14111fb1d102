"""The model ladder, model fields changed from the command line, and a run's starting weights: another checkpoint,
or a dense model upcycled into the MoE."""

import re

import pytest
import torch
import yaml
from conftest import REPO, TINY_MODEL
from test_train import logged

from litmoe.core.args import UpcycleArgs
from litmoe.core.errors import UserError
from litmoe.inference.loading import load_model
from litmoe.model.configs import load_model_config
from litmoe.model.flops import active_parameters, total_parameters
from litmoe.training.cli import main
from litmoe.training.initial_weights import upcycled_weights

DENSE_MODEL = TINY_MODEL.replace("mlp_class_name: LLaMAMoE", "mlp_class_name: LLaMAMLP").replace(
    "n_expert: 4\nn_expert_per_token: 2\n", ""
)


def test_the_readme_preset_table_matches_models_built_on_the_meta_device():
    from litgpt import GPT

    rows = re.findall(
        r"^\| (MoE-[\w-]+) \|.*\| ([\d,]+) \| ([\d,]+) \| [\d.]+ \|", (REPO / "README.md").read_text(), re.M
    )
    assert {name for name, _, _ in rows} == {"MoE-tiny", "MoE-200M", "MoE-1B", "MoE-FG-2B", "MoE-4B", "MoE-8B"}
    for name, total, active in rows:
        config = load_model_config(name)
        with torch.device("meta"):
            model = GPT(config)
        head = config.padded_vocab_size * config.n_embd
        assert (total_parameters(model), active_parameters(model) - head) == (
            int(total.replace(",", "")), int(active.replace(",", "")),
        ), name  # fmt: skip
    fine_grained = load_model_config("MoE-FG-2B")
    assert (fine_grained.n_expert, fine_grained.n_expert_per_token, fine_grained.n_shared_expert) == (64, 8, 4)
    totals = {name: int(total.replace(",", "")) for name, total, _ in rows}
    assert 0.8e9 < totals["MoE-1B"] < 1.2e9 and 7e9 < totals["MoE-8B"] < 9e9  # the ladder: about 1B to about 8B


def test_model_fields_change_from_the_command_line_and_reach_the_checkpoint(train_args, tmp_path):
    out_dir = tmp_path / "out"
    changes = ("--model.n_expert", "8", "--model.n_expert_per_token", "3", "--model.n_layer", "1")
    main(train_args(out_dir, 256 * 2, extra=changes))
    saved = yaml.safe_load((out_dir / "final" / "model_config.yaml").read_text())
    assert (saved["n_expert"], saved["n_expert_per_token"], saved["n_layer"]) == (8, 3, 1)
    assert saved["n_embd"] == 64  # the rest is the file's
    changed = load_model_config({"from": "MoE-200M", "n_embd": 1024, "n_head": 16})
    assert changed.head_size == 64  # derived again from the changed fields


def test_starting_from_the_weights_of_a_checkpoint(train_args, trained, tmp_path):
    """Fresh optimizer and schedule, the checkpoint's weights: the first validation scores those weights. The
    checkpoint may be named by its lit_model.pth, as --resume and generate.py take it."""
    out_dir = tmp_path / "out"
    extra = ("--initial_checkpoint_dir", str(trained / "final" / "lit_model.pth"))
    run = main(train_args(out_dir, 256 * 2, extra=extra))
    assert run.summary.initial_val_loss == pytest.approx(logged(trained, "val_loss")[30], rel=1e-5)
    assert logged(out_dir, "learning_rate")[0] < logged(trained, "learning_rate")[2]  # warming up again
    assert not list(out_dir.glob(".*"))  # the scratch copy of the weights is gone


@pytest.fixture(scope="module")
def dense(prepared, tmp_path_factory):
    """A dense LLaMA-style tiny model (MoE-tiny's shape with one SwiGLU MLP of 128), trained briefly."""
    from conftest import tiny_run_args

    root = tmp_path_factory.mktemp("dense")
    (root / "dense.yaml").write_text(DENSE_MODEL)
    main(tiny_run_args(prepared, root / "dense.yaml", root / "out", 256 * 12, ("--eval.interval", "100")))
    return root / "out"


def moe_file(folder, name: str, **changes) -> str:
    text = TINY_MODEL
    for key, value in changes.items():
        text = re.sub(rf"^{key}: .*$", f"{key}: {value}", text, flags=re.M)
    (folder / f"{name}.yaml").write_text(text)
    return str(folder / f"{name}.yaml")


@pytest.mark.parametrize(
    "shape",
    [{"moe_intermediate_size": 128}, {"moe_intermediate_size": 32, "n_expert_per_token": 4}],
    ids=["coarse experts", "fine-grained experts"],
)
def test_an_upcycled_moe_computes_exactly_what_the_dense_model_computes(dense, tmp_path, shape):
    import litgpt.model
    from litgpt import GPT

    from litmoe.core.patching import swapped
    from litmoe.model.moe import MoELayer

    config = load_model_config(moe_file(tmp_path, "moe", **shape))
    dense_model, tokenizer = load_model(dense / "final", torch.device("cpu"), torch.float32)
    with swapped(litgpt.model, "LLaMAMoE", MoELayer):
        moe = GPT(config).eval()
    moe.load_state_dict(upcycled_weights(UpcycleArgs(dense / "final"), config, seed=3))
    ids = tokenizer.encode("The robot finds an apple by the river. A dog sees the blue sky.", bos=True)[None]
    with torch.no_grad():
        torch.testing.assert_close(moe(ids), dense_model(ids), rtol=1e-5, atol=1e-5)


def test_training_from_an_upcycled_model_starts_at_the_dense_models_loss(dense, train_args, tmp_path):
    upcycled = main(train_args(tmp_path / "upcycled", 256 * 2, extra=("--upcycle-from", str(dense / "final"))))
    fresh = main(train_args(tmp_path / "fresh", 256 * 2))
    dense_loss = logged(dense, "val_loss")[12]
    assert upcycled.summary.initial_val_loss == pytest.approx(dense_loss, rel=1e-4)
    assert fresh.summary.initial_val_loss > dense_loss + 1.0


def test_a_dense_model_of_another_shape_cannot_be_upcycled(dense, train_args, tmp_path):
    wider = moe_file(tmp_path, "wider", n_embd=128)
    with pytest.raises(UserError, match=r"cannot upcycle it into test-moe: n_embd 64 vs 128; they must be equal"):
        main(train_args(tmp_path / "out", extra=("--upcycle-from", str(dense / "final"), "--model", wider)))
    odd = moe_file(tmp_path, "odd", moe_intermediate_size=48)
    with pytest.raises(UserError, match=r"intermediate_size 128 vs moe_intermediate_size 48: use equal sizes"):
        main(train_args(tmp_path / "out", extra=("--upcycle-from", str(dense / "final"), "--model", odd)))
    assert not (tmp_path / "out").exists()


def test_integer_fields_take_scientific_notation_from_the_command_line():
    from litmoe.model.configs import load_model_config, model_setting

    config = load_model_config(model_setting("MoE-tiny", [("--model.rope_base", "5e5"), ("--model.n_layer", "2")]))
    assert config.rope_base == 500000 and isinstance(config.rope_base, int) and config.n_layer == 2


def test_an_unknown_rope_adjustment_is_named_and_litgpt_reads_the_known_ones(tmp_path):
    """`rope_adjustments: {factor: 8, bogus: 1}` built a model that ignored `bogus`; it is one line now. The keys
    we accept are the ones LitGPT's model reads (a LitGPT upgrade that reads others fails here)."""
    import inspect

    import litgpt.model

    from litmoe.model.configs import ROPE_ADJUSTMENTS

    path = tmp_path / "rope.yaml"
    adjustments = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 64}
    path.write_text(yaml.safe_dump({**yaml.safe_load(TINY_MODEL), "rope_adjustments": adjustments}))
    assert load_model_config(str(path)).rope_adjustments == adjustments
    path.write_text(yaml.safe_dump({**yaml.safe_load(TINY_MODEL), "rope_adjustments": {**adjustments, "bogus": 1}}))
    with pytest.raises(UserError, match=r"rope_adjustments has unknown key 'bogus'; LitGPT reads factor, low_freq_fac"):
        load_model_config(str(path))
    source = inspect.getsource(litgpt.model)
    read = set(re.findall(r"rope_adjustments(?:\[|\.get\()\"(\w+)\"", source))
    lists = r"(?:(?:adjusted_params_required|yarn_required_params) =|for param in) \[([^\]]*)\]"
    for names in re.findall(lists, source):
        read |= set(re.findall(r"\"(\w+)\"", names))
    assert read == set(ROPE_ADJUSTMENTS)
