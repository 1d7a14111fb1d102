"""Export a run_train.py checkpoint to Hugging Face format (the Mixtral architecture), with LitGPT's converter.

The output directory loads with `transformers.AutoModelForCausalLM.from_pretrained(dir)`:
config.json (MixtralConfig), model.safetensors, and the tokenizer files.
"""

import contextlib
import io
import json
import os
from pathlib import Path

import torch

from litmoe.core.checkpoint_io import load_model_weights
from litmoe.core.checkpoint_io import verify as verify_checkpoints
from litmoe.core.errors import UserError
from litmoe.core.outputs import check_output_dir
from litmoe.data.tokenizer import TOKENIZER_FILES, load_tokenizer
from litmoe.inference.loading import adapter_base, check_weights_match, resolve_checkpoint_dir
from litmoe.model.configs import checkpoint_model_config
from litmoe.model.experts import expert_size


def mixtral_config(config, bos_id: int | None, eos_id: int | None) -> dict:
    """The transformers MixtralConfig for a LitGPT LLaMAMoE config."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": config.padded_vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": expert_size(config),
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_query_groups,
        "head_dim": config.head_size,
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,
        "num_local_experts": config.n_expert,
        "num_experts_per_tok": config.n_expert_per_token,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
        "rope_scaling": rope_scaling(config.rope_adjustments),
    }


def rope_scaling(adjustments: dict | None) -> dict | None:
    """LitGPT's `rope_adjustments` as transformers' `rope_scaling` (Llama 3 or linear): the same rotary frequencies,
    so that the exported model gives the same logits at long lengths (YaRN is refused by `check_exportable`)."""
    if not adjustments:
        return None
    renamed = {"original_max_seq_len": "original_max_position_embeddings"}
    scaling = {renamed.get(key, key): value for key, value in adjustments.items()}
    return {"rope_type": "llama3" if "low_freq_factor" in adjustments else "linear", **scaling}


def is_yarn(adjustments: dict | None) -> bool:
    return bool(adjustments) and ("beta_fast" in adjustments or "beta_slow" in adjustments)


def check_exportable(config, state_dict: dict, checkpoint_dir: Path) -> None:
    unsupported = {
        "shared experts (n_shared_expert)": config.n_shared_expert,
        "the grouped router (n_expert_groups)": config.n_expert_groups,
        "a routed_scaling_factor": config.routed_scaling_factor != 1.0,
        "biases": config.bias,
        "partial rotary embeddings": config.rotary_percentage != 1.0,
        "a non-RMSNorm norm": config.norm_class_name != "RMSNorm",
        "parallel residuals": config.parallel_residual,
        # LitGPT 0.5.13 blends YaRN's two frequency sets the other way round from the YaRN paper and transformers
        # (interpolating the fast dimensions), and without its attention scaling: no rope_scaling reproduces it
        "LitGPT's YaRN rope_adjustments (use linear or Llama 3 RoPE scaling to export)": is_yarn(
            config.rope_adjustments
        ),
    }
    reasons = [name for name, present in unsupported.items() if present]
    if config.mlp_class_name != "LLaMAMoE":
        reasons.append(f"mlp_class_name {config.mlp_class_name}")
    if any(key.endswith("mlp.expert_bias") for key in state_dict):
        reasons.append("a trained expert_bias (bias_update_rate > 0 with a softmax router)")
    if reasons:
        raise UserError(
            f"{checkpoint_dir}: the Mixtral architecture cannot express {', '.join(reasons)}; export needs the"
            " standard LLaMAMoE config"
        )


def export_hf(checkpoint: Path, out_dir: Path | None = None, verify: bool = False) -> Path | None:
    """Convert a checkpoint to a Hugging Face Mixtral model directory.

    Args:
        checkpoint: A checkpoint dir (final/, step-*/) or a training output dir (its newest checkpoint).
        out_dir: Where config.json, model.safetensors and the tokenizer files go (created; must be empty).
        verify: Only check the checkpoint against its SHA256SUMS and that it would load (a run's folder: each of its
            checkpoints), one line each, then exit (status 65 when one fails); nothing is loaded or written.
    """
    if verify:
        verify_checkpoints([checkpoint])
        return None
    if out_dir is None:
        raise UserError("--out_dir: give the folder the Hugging Face model goes into (or --verify to check only)")
    from litgpt.scripts.convert_lit_checkpoint import convert_lit_checkpoint
    from safetensors.torch import save_file

    checkpoint_dir = resolve_checkpoint_dir(checkpoint)
    if (base := adapter_base(checkpoint_dir)) is not None:
        raise UserError(
            f"{checkpoint_dir}: an adapter fine-tune (LitGPT's learned prompts in the attention layers) has no"
            f" Hugging Face equivalent; export its base {base}, or fine-tune with finetune.py lora or full"
        )
    out_dir = check_output_dir(out_dir, "--out_dir", [("--checkpoint", checkpoint)])
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"--out_dir {out_dir} is not empty; choose a new directory")
    config = checkpoint_model_config(checkpoint_dir)
    tokenizer = load_tokenizer(checkpoint_dir)
    weights = load_model_weights(checkpoint_dir / "lit_model.pth")
    check_exportable(config, weights, checkpoint_dir)
    check_weights_match(checkpoint_dir, weights)

    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints its arguments as a raw dict
        convert_lit_checkpoint(checkpoint_dir, out_dir)  # writes out_dir/model.pth with Hugging Face names
    converted = out_dir / "model.pth"
    weights = {name: tensor.contiguous() for name, tensor in torch.load(converted, weights_only=True).items()}
    save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    converted.unlink()

    (out_dir / "config.json").write_text(
        json.dumps(mixtral_config(config, tokenizer.bos_id, tokenizer.eos_id), indent=2)
    )
    for name in TOKENIZER_FILES:
        if (checkpoint_dir / name).is_file():
            (out_dir / name).write_bytes((checkpoint_dir / name).read_bytes())
    if (out_dir / "tokenizer.json").is_file() and tokenizer.bos_id is not None:
        add_bos_when_encoding(out_dir / "tokenizer.json", tokenizer.bos_id)
    umask = os.umask(0)
    os.umask(umask)
    for path in out_dir.iterdir():  # safetensors writes 0600; every file gets the user's usual mode
        path.chmod(0o666 & ~umask)
    print(f"Exported {checkpoint_dir} to {out_dir} (Mixtral, {len(weights)} tensors)")
    return out_dir


def add_bos_when_encoding(tokenizer_json: Path, bos_id: int) -> None:
    """Make the Hugging Face tokenizer put BOS first, as LitGPT's `encode(bos=True)` does in training and in
    generate.py: `PreTrainedTokenizerFast` ignores `add_bos_token`, so without this every transformers user (and
    lm-eval) would score the model without the BOS it was trained with."""
    from tokenizers import Tokenizer, processors

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    if tokenizer.encode("a").ids[:1] == [bos_id]:
        return  # it adds BOS already (e.g. Llama's)
    bos = tokenizer.id_to_token(bos_id)
    template = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    existing = tokenizer.post_processor
    tokenizer.post_processor = template if existing is None else processors.Sequence([existing, template])
    tokenizer.save(str(tokenizer_json))
