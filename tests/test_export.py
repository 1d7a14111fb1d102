import json
import shutil

import pytest
import torch
import yaml

from litmoe.core.errors import UserError
from litmoe.inference.export import export_hf
from litmoe.inference.loading import load_model


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    return export_hf(trained / "final", tmp_path_factory.mktemp("hf") / "model")


def test_export_writes_a_mixtral_directory(exported, trained):
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4
    assert config["num_experts_per_tok"] == 2 and config["num_key_value_heads"] == 2
    assert {p.name for p in exported.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    from safetensors.torch import load_file

    weights = load_file(exported / "model.safetensors")
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in weights
    assert "model.layers.0.block_sparse_moe.gate.weight" in weights


def test_transformers_gives_the_same_logits(exported, trained):
    transformers = pytest.importorskip("transformers")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(exported, torch_dtype=torch.float32).eval()
    ours, tokenizer = load_model(trained / "final", torch.device("cpu"), torch.float32)
    ids = tokenizer.encode("The teacher paints a tiny boat by the river.", bos=True).long()[None]
    with torch.no_grad():
        expected = ours(ids)
        actual = hf_model(ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_configs_mixtral_cannot_express_are_refused(trained, tmp_path):
    checkpoint = tmp_path / "shared"
    shutil.copytree(trained / "final", checkpoint)
    config = yaml.safe_load((checkpoint / "model_config.yaml").read_text())
    config["n_shared_expert"] = 1
    (checkpoint / "model_config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match=r"cannot express shared experts \(n_shared_expert\)"):
        export_hf(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_exported_tokenizer_adds_bos_like_litgpt_and_greedy_text_matches(exported, trained):
    transformers = pytest.importorskip("transformers")
    from litgpt import Tokenizer

    from litmoe.inference.generate import generate_tokens

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    ours = Tokenizer(trained / "final")
    texts = ["The cat sees a red ball today.", "  two  spaces\nand a line", "ünïcödé, émoji 🙂", "a"]
    for text in texts:
        assert hf_tokenizer(text)["input_ids"] == ours.encode(text, bos=True).tolist()

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(exported, torch_dtype=torch.float32).eval()
    prompt = hf_tokenizer("The old man", return_tensors="pt")["input_ids"]
    hf_greedy = hf_model.generate(prompt, do_sample=False, max_new_tokens=12, eos_token_id=None)
    model, _ = load_model(trained / "final", torch.device("cpu"), torch.float32)
    encoded = ours.encode("The old man", bos=True)
    our_greedy = list(generate_tokens(model, encoded, 12, temperature=0.0, top_k=None, top_p=1.0, eos_id=-1))
    assert hf_greedy[0, encoded.numel() :].tolist() == our_greedy


def test_exported_files_have_the_usual_permissions(exported):
    modes = {path.name: path.stat().st_mode & 0o777 for path in exported.iterdir()}
    assert len(set(modes.values())) == 1, modes


def test_a_long_context_stage_trains_samples_and_exports(trained, train_args, tmp_path, capsys):
    """The last pretraining stage: the same weights at twice the context. --initial_checkpoint_dir takes them (only
    block_size and rope_adjustments changed) and generate.py samples past the old length, with YaRN or linear RoPE
    scaling. The Hugging Face export carries linear (and Llama 3) scaling, and transformers then gives the same
    logits over 120 tokens; LitGPT's YaRN it refuses in one line, since no transformers setting reproduces it."""
    transformers = pytest.importorskip("transformers")
    from litmoe.inference.generate import generate
    from litmoe.training.cli import main

    scalings = {"yarn": "{factor: 2.0, beta_fast: 32.0, beta_slow: 1.0, original_max_seq_len: 64}",
                "linear": "{factor: 2.0}"}  # fmt: skip
    for name, scaling in scalings.items():
        longer = ("--initial_checkpoint_dir", str(trained / "final"), "--model.block_size", "128",
                  "--model.rope_adjustments", scaling, "--train.max_seq_length", "128")  # fmt: skip
        main(train_args(tmp_path / name, 512 * 2, extra=longer))
        config = yaml.safe_load((tmp_path / name / "final" / "model_config.yaml").read_text())
        assert config["block_size"] == 128 and config["rope_adjustments"]["factor"] == 2.0
        samples = generate(tmp_path / name, prompt="The cat", max_new_tokens=100, temperature=0.0)
        assert len(samples[0]) == 100  # past the 64 tokens the starting weights were trained at
    with pytest.raises(UserError, match=r"cannot express LitGPT's YaRN rope_adjustments \(use linear or Llama 3"):
        export_hf(tmp_path / "yarn" / "final", tmp_path / "hf-yarn")
    exported = export_hf(tmp_path / "linear" / "final", tmp_path / "hf")
    assert json.loads((exported / "config.json").read_text())["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(exported, torch_dtype=torch.float32).eval()
    ours, _ = load_model(tmp_path / "linear" / "final", torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 300, (1, 120))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
