"""After pretraining, the path LitGPT documents, on a litmoe checkpoint: convert it, LoRA fine-tune and merge with
LitGPT's own commands, then sample the merged model with generate.py (docs/fine-tuning.md)."""

import json
import shutil

import pytest
import torch
from conftest import litgpt

from litmoe.core.errors import UserError
from litmoe.inference.generate import generate


def test_convert_lora_finetune_merge_and_generate(trained, tmp_path, capsys):
    converted, tuned = tmp_path / "converted", tmp_path / "lora"
    litgpt("convert_pretrained_checkpoint", str(trained / "final"), str(converted))
    weights = torch.load(converted / "lit_model.pth", weights_only=True)
    pretrained = torch.load(trained / "final" / "lit_model.pth", weights_only=False)["model"]
    assert weights.keys() == pretrained.keys()  # the weights alone, stock LitGPT keys, no optimizer state

    examples = [
        {"instruction": f"Say the number {i}.", "input": "", "output": f"The number is {i}."} for i in range(20)
    ]
    (tmp_path / "data.json").write_text(json.dumps(examples))
    litgpt(
        "finetune_lora", str(converted), "--data", "JSON", "--data.json_path", str(tmp_path / "data.json"),
        "--data.val_split_fraction", "0.1", "--train.max_steps", "3", "--train.micro_batch_size", "2",
        "--train.global_batch_size", "2", "--train.save_interval", "100", "--eval.interval", "100",
        "--eval.initial_validation", "false", "--eval.final_validation", "false", "--precision", "32-true",
        "--devices", "1", "--out_dir", str(tuned), "--train.max_seq_length", "48", "--eval.max_new_tokens", "4",
    )  # fmt: skip
    merged = torch.load(tuned / "final" / "lit_model.pth", weights_only=True)
    assert merged.keys() == weights.keys()
    changed = {key for key in weights if not torch.equal(merged[key], weights[key])}
    assert changed and all(".attn." in key for key in changed)  # LoRA's default targets: query and value

    samples = generate(tuned / "final", prompt="Say the number 3.", max_new_tokens=4, temperature=0.0)
    assert len(samples) == 1 and 1 <= len(samples[0]) <= 4
    assert "Say the number 3." in capsys.readouterr().out

    # LitGPT merges LoRA into the base it was given; an unconverted pretraining checkpoint makes that merge fail
    # after training. The LoRA weights survive, and the one line says how to merge them.
    unmerged = tmp_path / "unmerged"
    shutil.copytree(tuned / "final", unmerged, ignore=shutil.ignore_patterns("lit_model.pth"))
    with pytest.raises(UserError, match="LoRA weights that were never merged") as refusal:
        generate(unmerged, prompt="Say", max_new_tokens=2)
    assert f"litgpt merge_lora {unmerged} --pretrained_checkpoint_dir CONVERTED" in str(refusal.value)
    litgpt("merge_lora", str(unmerged), "--pretrained_checkpoint_dir", str(converted))
    assert torch.load(unmerged / "lit_model.pth", weights_only=True).keys() == merged.keys()
