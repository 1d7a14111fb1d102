"""After pretraining: finetune.py runs LitGPT's own fine-tuning loops with litmoe's MoE layer, on a checkpoint as
run_train.py wrote it (docs/fine-tuning.md)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from litmoe.core.errors import UserError
from litmoe.finetuning.command import main
from litmoe.inference.export import export_hf
from litmoe.inference.generate import generate
from litmoe.inference.loading import load_model, resolve_checkpoint_dir


def litgpt_flags(out_dir: Path, data: Path, steps: int = 3) -> list[str]:
    return [
        "--data", "JSON", "--data.json_path", str(data), "--data.val_split_fraction", "0.1",
        "--train.max_steps", str(steps), "--train.micro_batch_size", "2", "--train.global_batch_size", "4",
        "--train.lr_warmup_steps", "1", "--train.save_interval", "100", "--eval.interval", "100",
        "--eval.initial_validation", "false", "--eval.final_validation", "false", "--precision", "32-true",
        "--devices", "1", "--out_dir", str(out_dir), "--train.max_seq_length", "48", "--eval.max_new_tokens", "4",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def instructions(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("finetune-data") / "data.json"
    examples = [
        {"instruction": f"Say the number {i}.", "input": "", "output": f"The number is {i}."} for i in range(20)
    ]
    path.write_text(json.dumps(examples))
    return path


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(tokens)


def test_lora_on_router_and_experts_trains_litmoe_layer_and_merges_to_stock_litgpt(
    trained, instructions, tmp_path, capsys
):  # fmt: skip
    """LoRA with `--lora_mlp true` (LitGPT's switch for the MLP, here the router and the stacked experts), on the
    pretraining checkpoint as it is: the merged weights are stock LitGPT's keys, the experts' and router's weights
    moved, and stock LitGPT's model on them computes what litmoe's LoRA layer computed before the merge."""
    out_dir = tmp_path / "lora"
    main(["lora", str(trained / "final"), *litgpt_flags(out_dir, instructions), "--lora_mlp", "true"])
    out = capsys.readouterr().out
    assert "MoE routing | imbalance max/mean" in out and "(over the fine-tuning)" in out
    base = torch.load(out_dir / "base" / "lit_model.pth", weights_only=True)
    pretrained = torch.load(trained / "final" / "lit_model.pth", weights_only=False)["model"]
    assert base.keys() == pretrained.keys()  # the weights alone, no optimizer state
    assert_merged_as_trained(out_dir, base)

    # generate.py writes the prompt in the template the fine-tune learned (LitGPT's prompt_style.yaml; Alpaca's
    # is longer than this tiny model's block, so a shorter one of LitGPT's here), or as given with --raw_prompt
    assert (out_dir / "final" / "prompt_style.yaml").read_text() == "class_path: litgpt.prompts.Alpaca\n"
    styled = tmp_path / "styled"
    shutil.copytree(out_dir / "final", styled)
    (styled / "prompt_style.yaml").write_text("class_path: litgpt.prompts.Phi1\n")
    capsys.readouterr()
    samples = generate(styled, prompt="Say 3.", max_new_tokens=4, temperature=0.0)
    assert len(samples) == 1 and 1 <= len(samples[0]) <= 4
    assert capsys.readouterr().out.startswith("Say 3.\n\nAnswer:")
    generate(styled, prompt="Say 3.", max_new_tokens=1, temperature=0.0, raw_prompt=True)
    assert "Answer:" not in capsys.readouterr().out
    (styled / "prompt_style.yaml").write_text("class_path: os.system\n")  # a class to import: code to run
    with pytest.raises(UserError, match="class_path 'os.system' is not one of LitGPT's prompt styles"):
        generate(styled, prompt="Say 3.", max_new_tokens=1)
    assert (export_hf(out_dir / "final", tmp_path / "hf") / "model.safetensors").is_file()  # opens in transformers

    # LoRA weights that were never merged (a merge interrupted) are one line in generate.py, saying how to merge
    unmerged_dir = tmp_path / "unmerged"
    shutil.copytree(out_dir / "final", unmerged_dir, ignore=shutil.ignore_patterns("lit_model.pth"))
    with pytest.raises(UserError, match="LoRA weights that were never merged") as refusal:
        generate(unmerged_dir, prompt="Say", max_new_tokens=2)
    assert f"litgpt merge_lora {unmerged_dir} --pretrained_checkpoint_dir CONVERTED" in str(refusal.value)


def assert_merged_as_trained(out_dir: Path, base: dict) -> None:
    """The merged `final/lit_model.pth` has the base's stock keys, the experts and the router moved, and stock
    LitGPT's model on it computes what litmoe's LoRA model (the base and `lit_model.pth.lora`) computed."""
    from litgpt import GPT, Config
    from litgpt.lora import GPT as LoRAGPT
    from litgpt.lora import Config as LoRAConfig

    from litmoe.core.patching import swapped
    from litmoe.finetuning.lora_moe import LoRAGroupedExperts, LoRAMoELayer

    merged = torch.load(out_dir / "final" / "lit_model.pth", weights_only=True)
    assert merged.keys() == base.keys()
    changed = {key for key in base if not torch.equal(merged[key], base[key])}
    assert any(".mlp.experts.0.fc_1." in key for key in changed) and any(".mlp.gate." in key for key in changed)
    lora = torch.load(out_dir / "final" / "lit_model.pth.lora", weights_only=True)["model"]
    config = LoRAConfig.from_file(out_dir / "final" / "model_config.yaml", lora_r=8, lora_alpha=16,
                                  lora_query=True, lora_value=True, lora_mlp=True)  # fmt: skip
    with swapped(__import__("litgpt.lora").lora, "LLaMAMoE", LoRAMoELayer):
        unmerged = LoRAGPT(config)
    unmerged.load_state_dict({**base, **lora}, strict=True)
    assert isinstance(unmerged.transformer.h[0].mlp.experts, LoRAGroupedExperts)
    stock = GPT(Config.from_file(out_dir / "final" / "model_config.yaml"))
    stock.load_state_dict(merged)
    tokens = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(stock, tokens), logits(unmerged, tokens), rtol=1e-4, atol=1e-5)


def test_full_and_adapter_fine_tune_a_bias_balanced_checkpoint_with_litmoe_layer(
    trained, train_args, instructions, tmp_path, capsys
):  # fmt: skip
    """A checkpoint trained with the experts' selection bias (stock LitGPT refuses its `expert_bias`): full
    fine-tuning keeps the bias frozen (routing as trained) and changes the weights; the adapter trains its own."""
    from litmoe.training.cli import main as train

    run = tmp_path / "run"
    with pytest.raises(UserError, match="has 2 layers and LitGPT's adapter starts at layer 2, so nothing would train"):
        main(["adapter", str(trained / "final"), *litgpt_flags(tmp_path / "shallow", instructions)])
    assert not (tmp_path / "shallow").exists()
    bias = ("--moe.bias_update_rate", "0.01", "--eval.interval", "100", "--model.n_layer", "3")  # one adapter layer
    train(train_args(run, 4 * 256, extra=bias))
    pretrained = torch.load(run / "final" / "lit_model.pth", weights_only=True)["model"]
    assert any(key.endswith("mlp.expert_bias") and tensor.abs().sum() > 0 for key, tensor in pretrained.items())

    main(["full", str(run), *litgpt_flags(tmp_path / "full", instructions, steps=2)])  # the run: its newest
    tuned = torch.load(tmp_path / "full" / "final" / "lit_model.pth", weights_only=True)["model"]
    assert tuned.keys() == pretrained.keys()
    assert all(torch.equal(tuned[key], pretrained[key]) for key in tuned if key.endswith("expert_bias"))
    assert not torch.equal(tuned["transformer.h.0.mlp.experts.0.fc_1.weight"],
                           pretrained["transformer.h.0.mlp.experts.0.fc_1.weight"])  # fmt: skip
    assert "(over the fine-tuning)" in capsys.readouterr().out
    assert len(generate(tmp_path / "full" / "final", prompt="Say 1.", max_new_tokens=2, raw_prompt=True)) == 1

    main(["adapter", str(run / "final"), *litgpt_flags(tmp_path / "adapter", instructions, steps=2)])
    adapter = torch.load(tmp_path / "adapter" / "final" / "lit_model.pth.adapter", weights_only=True)["model"]
    assert adapter and all("adapter" in key or "gating_factor" in key for key in adapter)
    check_adapter_output(tmp_path, pretrained, adapter)

    with pytest.raises(UserError, match="already holds a fine-tune"):  # nothing a user has is written over
        main(["full", str(run), *litgpt_flags(tmp_path / "full", instructions, steps=2)])


def check_adapter_output(tmp_path: Path, pretrained: dict, adapter: dict) -> None:
    """An adapter fine-tune (LitGPT saves the adapter's weights alone) opens in generate.py and evaluate.py as its
    base weights with the adapter's, in LitGPT's adapter model with litmoe's layer, also when moved whole; it has no
    Hugging Face form; without its base it is one line."""
    final = tmp_path / "adapter" / "final"
    model, _ = load_model(resolve_checkpoint_dir(final), torch.device("cpu"), torch.float32)
    state = model.state_dict()
    assert state.keys() == pretrained.keys() | adapter.keys()
    assert all(torch.equal(state[key], value) for key, value in (pretrained | adapter).items())  # bias included
    assert len(generate(final, prompt="Say 1.", max_new_tokens=2, raw_prompt=True)) == 1
    with pytest.raises(UserError, match=f"{final}: an adapter fine-tune .* has no Hugging Face equivalent; export"):
        export_hf(final, tmp_path / "hf-adapter")
    assert not (tmp_path / "hf-adapter").exists()

    shutil.move(tmp_path / "adapter", tmp_path / "moved")  # its base/ beside final/, not where it was recorded
    assert len(generate(tmp_path / "moved" / "final", prompt="Say 1.", max_new_tokens=2, raw_prompt=True)) == 1
    alone = tmp_path / "alone" / "final"
    shutil.copytree(tmp_path / "moved" / "final", alone)
    with pytest.raises(UserError, match="the adapter's base weights are neither in .* keep finetune.py's base/ folder"):
        generate(alone, prompt="Say 1.", max_new_tokens=2, raw_prompt=True)


def test_lora_on_two_devices_loads_the_base_into_each_rank_and_merges_what_it_trained(
    trained, instructions, tmp_path
):  # fmt: skip
    """On several devices LitGPT's LoRA shards the model with FSDP2 and guesses each weight's name from the
    checkpoint's keys, which stacked experts do not have: litmoe loads each rank's shards itself. Two CPU ranks of
    finetune.py (litmoe's layer, LoRA on the router and the experts): while the weights are the base's (the first
    two steps: the warm-up starts at a learning rate of 0), they log the losses `litgpt finetune_lora` logs on the
    same weights with LitGPT's own layer; then LoRA trains, and the merge holds what it trained."""
    base = tmp_path / "stock-base"
    base.mkdir()
    weights = torch.load(trained / "final" / "lit_model.pth", weights_only=True)["model"]
    torch.save(weights, base / "lit_model.pth")
    for name in ("model_config.yaml", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(trained / "final" / name, base / name)
    litgpt = Path(sys.executable).with_name("litgpt")
    runs = {  # (command, optimizer steps)
        "litmoe": ([sys.executable, "finetune.py", "lora", str(trained / "final")], 4),
        "stock": ([str(litgpt), "finetune_lora", str(base)], 2),
    }
    started = {}
    for name, (command, steps) in runs.items():
        flags = [*litgpt_flags(tmp_path / name, instructions, steps), "--lora_mlp", "true"]
        flags[flags.index("--devices") + 1] = "2"
        started[name] = subprocess.Popen([*command, *flags], cwd=Path(__file__).parents[1], text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    outputs = {name: process.communicate(timeout=300)[0] for name, process in started.items()}
    assert [process.returncode for process in started.values()] == [0, 0], outputs["litmoe"][-3000:]
    losses = {name: re.findall(r"loss train: ([0-9.]+)", out) for name, out in outputs.items()}
    assert len(losses["litmoe"]) == 4 and losses["litmoe"][:2] == losses["stock"]
    assert outputs["litmoe"].count("(over the fine-tuning, rank 0)") == 1  # one line, from rank 0
    final = tmp_path / "litmoe" / "final"
    assert {"lit_model.pth", "lit_model.pth.lora", "SHA256SUMS"} <= {path.name for path in final.iterdir()}
    assert_merged_as_trained(tmp_path / "litmoe", weights)


def test_base_weights_that_do_not_fit_the_sharded_model_are_one_line(trained, tmp_path):
    """The loader for FSDP2-sharded fine-tuning maps every weight of the model to the checkpoint: one missing
    (other than LoRA's) or one the model does not have is one line, not a model trained from its initial values."""
    from litgpt import GPT, Config

    from litmoe.finetuning.sharded import full_weights

    model = GPT(Config.from_file(trained / "final" / "model_config.yaml"))
    weights = torch.load(trained / "final" / "lit_model.pth", weights_only=True)["model"]
    assert full_weights(model, trained / "final" / "lit_model.pth").keys() >= weights.keys()
    broken = {
        "missing": {key: value for key, value in weights.items() if key != "lm_head.weight"},
        "unexpected": {**weights, "transformer.h.9.attn.qkv.weight": weights["lm_head.weight"]},
    }
    for name, state in broken.items():
        torch.save(state, tmp_path / f"{name}.pth")
        with pytest.raises(UserError, match=f"{name}.pth: its weights do not fit the model .* e.g. "):
            full_weights(model, tmp_path / f"{name}.pth")


def test_litgpts_default_dataset_that_cannot_download_is_one_line_before_anything_is_written(
    trained, tmp_path, monkeypatch
):  # fmt: skip
    """Without --data LitGPT fine-tunes on Alpaca, which downloads; with no network that was a requests traceback
    after the base weights were written."""
    import requests
    from litgpt.data import Alpaca

    def offline(self) -> None:
        raise requests.exceptions.ConnectionError("Max retries exceeded (NameResolutionError)")

    monkeypatch.setattr(Alpaca, "prepare_data", offline)
    with pytest.raises(UserError, match="--data Alpaca: its download failed .* or give local data: --data JSON"):
        main(["lora", str(trained / "final"), "--out_dir", str(tmp_path / "lora")])
    assert not (tmp_path / "lora").exists()
