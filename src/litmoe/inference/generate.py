"""Sample text from a checkpoint with LitGPT's KV-cache generation loop, streaming tokens as they come."""

import io
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Literal, TextIO

import torch

from litmoe.core.args import check_seed
from litmoe.core.checkpoint_io import verify as verify_checkpoints
from litmoe.core.errors import EXIT_PEER_LOST, UserError
from litmoe.core.peers import leave, peer_failure
from litmoe.core.user_files import read_text, read_yaml_file
from litmoe.inference.loading import adapter_base, load_model, resolve_checkpoint_dir
from litmoe.inference.tensor_parallel import check_split, launch, split_in_turn, split_model
from litmoe.model.attention import compute_dtype, default_precision
from litmoe.model.configs import checkpoint_model_config


def generate_tokens(
    model, prompt: torch.Tensor, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float, eos_id: int
) -> Iterator[int]:
    """New token ids after `prompt`, one at a time, stopping after EOS (not yielded) or max_new_tokens."""
    from litgpt.generate.base import generate_fn

    total = prompt.numel() + max_new_tokens
    model.max_seq_length = total
    model.set_kv_cache(batch_size=1, device=prompt.device)
    top_k = None if top_k is None else min(top_k, model.config.padded_vocab_size)
    tokens = generate_fn(
        model, prompt, total, temperature=temperature, top_k=top_k, top_p=top_p,
        stop_tokens=([eos_id],), include_prompt=False, include_eos=False,
    )  # fmt: skip
    for token in tokens:
        yield int(token)
    model.clear_kv_cache()


def stream_text(tokenizer, token_ids: Iterator[int], out: TextIO) -> list[int]:
    """Decode incrementally and write each new piece of text as soon as it is complete UTF-8."""
    ids: list[int] = []
    written = ""
    for token in token_ids:
        ids.append(token)
        text = tokenizer.decode(torch.tensor(ids))
        if not text.endswith("\ufffd"):  # a multi-byte character still incomplete: wait for its next token
            out.write(text[len(written) :])
            out.flush()
            written = text
    return ids


def check_sampling(num_samples: int, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float) -> None:
    """Sampling settings in range, before the model is loaded or anything is printed."""
    if num_samples < 1:
        raise UserError(f"--num_samples {num_samples}: must be at least 1")
    if max_new_tokens < 1:
        raise UserError(f"--max_new_tokens {max_new_tokens}: must be at least 1")
    if not temperature >= 0:
        raise UserError(f"--temperature {temperature}: must be 0 (greedy decoding) or more; 0.8 is usual")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top_k {top_k}: must be at least 1 (null samples from every token)")
    if not 0 < top_p <= 1:
        raise UserError(f"--top_p {top_p}: must be above 0 and at most 1 (1 keeps every token)")


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise UserError("give either --prompt or --prompt_file, not both")
    if prompt_file is not None:
        return read_text(Path(prompt_file), "a prompt", flag="--prompt_file")
    if prompt is None or prompt == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise UserError("no prompt: pass --prompt TEXT, --prompt_file FILE, or pipe text to stdin")
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise UserError(f"the prompt on stdin is not UTF-8 text (byte {err.start}); pipe UTF-8 text") from None
        if not text:
            raise UserError("the prompt on stdin is empty; pipe some text, or pass --prompt '' to sample from nothing")
        return text
    return prompt


def generate(
    checkpoint: Path,
    prompt: str | None = None,
    prompt_file: Path | None = None,
    num_samples: int = 1,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float = 1.0,
    seed: int = 1234,
    precision: Literal["bf16-true", "16-true", "32-true"] | None = None,
    devices: int = 1,
    raw_prompt: bool = False,
    verify: bool = False,
) -> list[list[int]]:
    """Sample from a checkpoint written by run_train.py; text goes to stdout, statistics to stderr.

    Args:
        checkpoint: A checkpoint dir (final/, step-*/) or a training output dir (its newest checkpoint is used).
        prompt: The prompt text; '-' (or no prompt and no prompt_file) reads it from stdin.
        prompt_file: A file holding the prompt.
        num_samples: How many samples to draw.
        max_new_tokens: The most tokens to generate per sample; generation also stops at EOS.
        temperature: Sampling temperature; 0 is greedy (deterministic) decoding.
        top_k: Sample only among the k most likely tokens.
        top_p: Sample only among the most likely tokens whose probabilities add up to top_p.
        seed: Random seed for sampling.
        precision: Weights' precision; default bf16-true on a CUDA GPU, 32-true on CPU.
        devices: Split the model across this many GPUs (tensor parallelism, as LitGPT's generate_tp; CPU processes
            without a GPU), for a model too large for one.
        raw_prompt: Sample from the prompt as given, also from a fine-tune (by default, a checkpoint with a
            prompt_style.yaml, as LitGPT's fine-tuning writes, gets its prompt in that template, as LitGPT's
            generate does).
        verify: Only check the checkpoint against its SHA256SUMS and that it would load (a run's folder: each of its
            checkpoints), one line each, then exit (status 65 when one fails); nothing is loaded or written.
    """
    if verify:
        verify_checkpoints([checkpoint])
        return []
    check_sampling(num_samples, max_new_tokens, temperature, top_k, top_p)
    check_seed(seed)
    if devices < 1:
        raise UserError(f"--devices {devices}: must be at least 1")
    checkpoint_dir = resolve_checkpoint_dir(checkpoint)
    fabric = ranks_for(checkpoint_dir, devices)
    writer = fabric is None or fabric.global_rank == 0  # the rank that reads the prompt and writes the samples
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = compute_dtype(precision or default_precision(training=False))
    text = model = tokenizer = None
    if writer:  # across devices, rank 0 loads, checks and splits before the others start: one line from one process
        text = read_prompt(prompt, prompt_file)
        text = text if raw_prompt else apply_prompt_style(checkpoint_dir, text)
        model, tokenizer = load_model(checkpoint_dir, device if fabric is None else torch.device("cpu"), dtype)
        check_length(tokenizer.encode(text, bos=True).numel(), max_new_tokens, model.config.block_size)
    if fabric is not None:
        model = split_model(fabric, model) if writer else None
        fabric.launch()  # the other ranks start here, with this command line
        text = fabric.broadcast(text, src=0)
        share = split_in_turn(fabric, partial(load_model, checkpoint_dir, torch.device("cpu"), dtype))
        model, tokenizer = (model, tokenizer) if writer else share
        device = fabric.device
    encoded = tokenizer.encode(text, bos=True, device=device)
    torch.manual_seed(seed)  # every rank alike: each samples the same token from the same logits
    where = f"{checkpoint_dir}, {device.type}" + (f" x {devices}, tensor parallel" if fabric else "")
    out, log = (sys.stdout, sys.stderr) if writer else (io.StringIO(), io.StringIO())
    samples = []
    with quiet_unless_writer(writer):
        for index in range(num_samples):
            start = time.perf_counter()
            tokens = generate_tokens(model, encoded, max_new_tokens, temperature, top_k, top_p, tokenizer.eos_id)
            out.write(text)
            ids = stream_text(tokenizer, tokens, out)
            out.write("\n")
            seconds = time.perf_counter() - start
            print(
                f"sample {index + 1}/{num_samples}: {len(ids)} tokens in {seconds:.2f} s, {len(ids) / seconds:.1f}"
                f" tokens/s ({where})",
                file=log,
            )
            if ids and not tokenizer.decode(torch.tensor(ids)).strip():  # e.g. greedy decoding of a small model
                print(
                    f"sample {index + 1}: only whitespace: after this prompt the model's most likely tokens are blanks"
                    " and line breaks; sample with --temperature 0.8, or a longer prompt",
                    file=log,
                )
            samples.append(ids)
    if fabric is not None:
        torch.distributed.destroy_process_group()
    return samples


def ranks_for(checkpoint_dir: Path, devices: int) -> Any:
    """None for one device; for several, the Fabric that splits the model across them (not launched yet)."""
    if devices == 1:
        return None
    if adapter_base(checkpoint_dir) is not None:
        raise UserError(
            f"--devices {devices}: an adapter fine-tune's learned prompts are not split across devices; use"
            " --devices 1, or fine-tune with finetune.py lora or full"
        )
    check_split(checkpoint_model_config(checkpoint_dir), devices)
    return launch(devices)


def apply_prompt_style(checkpoint_dir: Path, prompt: str) -> str:
    """The prompt in the template a fine-tune was trained with (the prompt_style.yaml LitGPT's fine-tuning writes
    beside its weights), as LitGPT's generate applies it; without that file, the prompt as it is. Only LitGPT's
    own styles are taken: the file names a class to import, which a crafted file would use to run code."""
    import litgpt.prompts

    path = checkpoint_dir / "prompt_style.yaml"
    if not path.is_file():
        return prompt
    fields = read_yaml_file(path, "a prompt style", "write it as LitGPT does (class_path: litgpt.prompts.Alpaca)")
    name = str(fields.get("class_path", "")) if isinstance(fields, dict) else ""
    ours = name.startswith("litgpt.prompts.")
    style = getattr(litgpt.prompts, name.removeprefix("litgpt.prompts."), None) if ours else None
    if not (isinstance(style, type) and issubclass(style, litgpt.prompts.PromptStyle)):
        raise UserError(
            f"{path}: class_path {name!r} is not one of LitGPT's prompt styles (litgpt.prompts.*); fix it, or pass"
            " --raw_prompt to sample from the prompt as given"
        )
    return style().apply(prompt)


@contextmanager
def quiet_unless_writer(writer: bool) -> Iterator[None]:
    """On the ranks other than rank 0, a collective that fails because rank 0 has gone ends the rank quietly:
    rank 0 said why (or its reader closed the pipe, `generate.py ... | head`)."""
    try:
        yield
    except Exception as err:
        if writer or peer_failure(err) is None:
            raise
        leave(EXIT_PEER_LOST)


def check_length(prompt_tokens: int, max_new_tokens: int, block_size: int) -> None:
    if prompt_tokens + max_new_tokens > block_size:
        raise UserError(
            f"the prompt ({prompt_tokens} tokens) plus --max_new_tokens {max_new_tokens} exceeds the model's"
            f" block size of {block_size}; shorten the prompt or lower --max_new_tokens"
        )
