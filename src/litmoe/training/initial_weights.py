"""Where a fresh run's weights come from, when not from LitGPT's random init: another checkpoint of the same model
(`--initial_checkpoint_dir`: its weights, with a fresh optimizer and schedule), or a dense checkpoint upcycled
into the MoE (`--upcycle-from`, sparse upcycling, Komatsuzaki et al. 2022).

Upcycling copies everything but the MLPs (embeddings, attention, norms, the output head), and turns each dense
MLP into the experts:
  coarse        moe_intermediate_size equals the dense intermediate_size: every expert is a copy of the dense
                MLP. The chosen experts' gate weights sum to 1, so the MoE computes exactly the dense MLP, whatever
                the router's (small, random) initial weights: before its first step the upcycled model's logits
                are the dense model's.
  fine-grained  the dense intermediate size is G x moe_intermediate_size, top-k is G and n_expert a multiple of G:
                expert e takes slice e mod G of the dense intermediate units (as Qwen1.5-MoE's upcycling slices
                its FFN), its output projection scaled by G. The router starts at zero, so each token's G experts
                get weight 1/G each; with n_expert == G every expert is chosen and the start is again exactly
                dense. With replicas (n_expert > G), ties between replicas are broken by torch.topk, so the start
                is close to dense rather than equal.
`noise` adds relative Gaussian noise to each expert's copy, to break the experts' symmetry (0 keeps the start
exact).

Either way the weights become one plain state dict, written into a scratch directory of the output directory for
LitGPT's own `initial_checkpoint_dir` loading (which every strategy supports), and removed once loaded.
"""

import shutil
from pathlib import Path

import torch

from litmoe.core.args import UpcycleArgs
from litmoe.core.checkpoint_io import checkpoint_problem, is_zero_checkpoint, load_model_weights
from litmoe.core.errors import UserError
from litmoe.data.tokenizer import TOKENIZER_FILES, tokenizer_fingerprint
from litmoe.distributed.zero_checkpoints import consolidated
from litmoe.model.builder import has_expert_bias
from litmoe.model.configs import checkpoint_model_config, model_fields
from litmoe.model.experts import expert_size

CONTEXT_FIELDS = ("block_size", "rope_adjustments")  # a continued run may change them: weights do not depend on them
SCRATCH = ".initial_weights.partial"  # under out_dir; left over by a killed run, it is removed at the next start
# What the dense and the MoE model must share for the copied weights to mean the same thing.
SHARED_FIELDS = (
    "n_layer", "n_embd", "n_head", "n_query_groups", "head_size", "padded_vocab_size", "norm_class_name", "norm_eps",
    "bias", "attn_bias", "rotary_percentage", "rope_base", "parallel_residual", "shared_attention_norm", "norm_qk",
    "post_attention_norm", "post_mlp_norm", "lm_head_bias", "scale_embeddings",
)  # fmt: skip


def checkpoint_weights(checkpoint_dir: Path, flag: str) -> dict[str, torch.Tensor]:
    weights = checkpoint_dir / "lit_model.pth"
    if is_zero_checkpoint(weights):  # DeepSpeed's shards: their consolidated copy (made once, the shards kept)
        weights = consolidated(checkpoint_dir) / "lit_model.pth"
    if not weights.is_file():
        raise UserError(f"{flag} {checkpoint_dir}: no lit_model.pth there; give a final/ or step-*/ dir")
    if (problem := checkpoint_problem(weights)) is not None:
        raise UserError(f"{flag} {weights}: {problem}")
    return load_model_weights(weights)


def same_model_weights(checkpoint_dir: Path, config) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint of this very model (`--initial_checkpoint_dir`); the context length and the
    RoPE scaling may change (a long-context stage: the weights do not depend on them)."""
    saved = model_fields(checkpoint_model_config(checkpoint_dir, "--initial_checkpoint_dir"))
    ours = model_fields(config)
    free = {"name", "hf_config", *CONTEXT_FIELDS}
    changed = [f"{key} {saved.get(key)} -> {ours.get(key)}" for key in sorted(ours) if key not in free
               and saved.get(key) != ours.get(key)]  # fmt: skip
    if changed:
        raise UserError(
            f"--initial_checkpoint_dir {checkpoint_dir}: another model ({'; '.join(changed[:3])}); its weights need"
            " the same model config (a dense checkpoint can be upcycled with --upcycle-from)"
        )
    return checkpoint_weights(checkpoint_dir, "--initial_checkpoint_dir")


def check_same_tokenizer(source: Path | None, flag: str, tokenizer_dir: Path) -> None:
    """Starting weights learned their embeddings for one tokenizer: with another one (even of the same size) every
    token id would mean another token. A checkpoint without tokenizer files cannot be checked, and is taken as is."""
    if source is None or not any((Path(source) / name).is_file() for name in TOKENIZER_FILES):
        return
    if tokenizer_fingerprint(Path(source)) != tokenizer_fingerprint(tokenizer_dir):
        raise UserError(
            f"{flag} {source}: its tokenizer is not the one the data was prepared with ({tokenizer_dir}); its token"
            f" ids would mean other tokens: prepare the data with --tokenizer_dir {source}"
        )


def check_upcyclable(dense, config, where: str) -> int:
    """The number of slices G each dense MLP is cut into (1: coarse experts); raises when it cannot be upcycled."""

    def refuse(reason: str) -> UserError:
        return UserError(f"--upcycle-from {where}: cannot upcycle it into {config.name}: {reason}")

    if dense.mlp_class_name != "LLaMAMLP":
        raise refuse(f"it is {dense.mlp_class_name}, not a dense LLaMA-style model (LLaMAMLP)")
    if config.mlp_class_name != "LLaMAMoE":
        raise refuse(f"the model to train is {config.mlp_class_name}, not LLaMAMoE")
    for field in SHARED_FIELDS:
        if getattr(dense, field) != getattr(config, field):
            raise refuse(f"{field} {getattr(dense, field)} vs {getattr(config, field)}; they must be equal")
    if config.n_expert_groups or config.n_shared_expert or config.routed_scaling_factor != 1.0:
        raise refuse("grouped routers, shared experts and routed_scaling_factor are not upcycled (gates must sum to 1)")
    slices, remainder = divmod(dense.intermediate_size, expert_size(config))
    fits = remainder == 0 and (slices == 1 or (config.n_expert_per_token == slices and config.n_expert % slices == 0))
    if not fits:
        raise refuse(
            f"intermediate_size {dense.intermediate_size} vs moe_intermediate_size {expert_size(config)}:"
            " use equal sizes (coarse experts), or a size G times smaller with n_expert_per_token G and n_expert a"
            " multiple of G (fine-grained)"
        )
    return slices


def upcycled_weights(args: UpcycleArgs, config, seed: int) -> dict[str, torch.Tensor]:
    """The MoE's state dict (stock LitGPT keys) from the dense checkpoint; see the module docstring."""
    dense_dir = Path(args.dense_checkpoint)
    slices = check_upcyclable(checkpoint_model_config(dense_dir, "--upcycle-from"), config, str(dense_dir))
    dense = checkpoint_weights(dense_dir, "--upcycle-from")
    generator = torch.Generator().manual_seed(seed)

    def noisy(tensor: torch.Tensor) -> torch.Tensor:
        if not args.noise:
            return tensor.clone()
        noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
        return tensor + args.noise * tensor.std() * noise

    state = {key: tensor for key, tensor in dense.items() if ".mlp." not in key}
    width = expert_size(config)
    for layer in range(config.n_layer):
        prefix = f"transformer.h.{layer}.mlp."
        fc_1, fc_2, proj = (dense[f"{prefix}{name}.weight"] for name in ("fc_1", "fc_2", "proj"))
        for expert in range(config.n_expert):
            units = slice(expert % slices * width, (expert % slices + 1) * width)
            state[f"{prefix}experts.{expert}.fc_1.weight"] = noisy(fc_1[units])
            state[f"{prefix}experts.{expert}.fc_2.weight"] = noisy(fc_2[units])
            state[f"{prefix}experts.{expert}.proj.weight"] = noisy(proj[:, units] * slices)
        router = torch.zeros(config.n_expert, config.n_embd, dtype=fc_1.dtype)
        if slices == 1:
            router.normal_(std=args.router_std, generator=generator)
        state[f"{prefix}gate.weight"] = router
    return state


def write_initial_weights(
    out_dir: Path, config, initial_checkpoint_dir: Path | None, upcycle: UpcycleArgs, expected: dict, seed: int
) -> Path:
    """The starting weights as the plain state dict LitGPT's `initial_checkpoint_dir` loads, in a scratch dir of
    `out_dir`. `expected` is the run's model state dict (on the meta device): buffers the run adds (the experts'
    selection bias) start at zero; anything else missing or extra is an error."""
    if initial_checkpoint_dir is not None:
        weights = same_model_weights(Path(initial_checkpoint_dir), config)
        flag = f"--initial_checkpoint_dir {initial_checkpoint_dir}"
    else:
        weights = upcycled_weights(upcycle, config, seed)
        flag = f"--upcycle-from {upcycle.dense_checkpoint}"
    for key in expected.keys() - weights.keys():
        if not has_expert_bias([key]):
            raise UserError(f"{flag}: the weights lack {key}; they are not this model's")
        weights[key] = torch.zeros(expected[key].shape)
    if unexpected := sorted(weights.keys() - expected.keys()):
        raise UserError(f"{flag}: the weights hold {unexpected[:3]}, which this model has not")
    scratch = Path(out_dir) / SCRATCH
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    torch.save(weights, scratch / "lit_model.pth")
    return scratch
