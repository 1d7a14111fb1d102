"""A prepared data directory of random tokens, as large as a speed measurement needs, written in seconds and with
no download: run_train.py reads it as it reads any prepared data (prepare_data.py's layout: manifest.json, a
tokenizer, litdata chunks). The model's vocabulary follows the tokenizer's, so one corpus per vocabulary size:
8,192 (the default corpus's) or 50,257 (GPT-2's, the recipe's model).

Token ids follow a Zipf law over the vocabulary, as text's do (so the head's gradients and the router's inputs look
like text's, not uniform noise); documents are 1k-8k tokens, each BOS ... EOS. The tokenizer is a word level one
whose tokens are `t2` ... `t{vocab_size - 1}` beside the two document markers.

    uv run python benchmarks/synthetic_corpus.py OUT_DIR --vocab-size 50257 --tokens 20e6
"""

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from litmoe.data.prepared import MANIFEST, Manifest
from litmoe.data.tokenizer import BOS_TOKEN, EOS_TOKEN, tokenizer_fingerprint

VAL_TOKENS = 400_000  # validation's share: enough for 20 batches of 8 x 2048
DOCUMENT_TOKENS = (1024, 8192)


def write_tokenizer(out_dir: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {BOS_TOKEN: 0, EOS_TOKEN: 1, **{f"t{index}": index for index in range(2, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([BOS_TOKEN, EOS_TOKEN])
    out_dir.mkdir(parents=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN,
              "add_bos_token": True}  # fmt: skip
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_split(out_dir: Path, tokens: int, vocab_size: int, rng: np.random.Generator) -> tuple[int, int]:
    """Documents of Zipf-distributed ids until `tokens` are written; returns (documents, tokens) written."""
    import torch
    from litdata.streaming import TokensLoader
    from litdata.streaming.writer import BinaryWriter

    ranks = np.arange(1, vocab_size - 1, dtype=np.float64)
    probabilities = 1 / (ranks + 2.7)  # Zipf-Mandelbrot, roughly English's
    probabilities /= probabilities.sum()
    ids = (rng.choice(vocab_size - 2, size=tokens, p=probabilities) + 2).astype(np.int32)
    writer = BinaryWriter(str(out_dir), chunk_bytes="64MB", item_loader=TokensLoader())
    documents, start = 0, 0
    while start < tokens:
        length = int(rng.integers(*DOCUMENT_TOKENS))
        body = ids[start : start + length - 2]
        writer.add_item(documents, torch.from_numpy(np.concatenate([[0], body, [1]]).astype(np.int32)))
        documents, start = documents + 1, start + len(body)
    writer.done()
    writer.merge()
    return documents, tokens + 2 * documents


def write_corpus(out_dir: Path, vocab_size: int, tokens: int, seed: int = 0) -> Path:
    """`out_dir` as prepared data of about `tokens` training tokens (plus VAL_TOKENS for validation)."""
    rng = np.random.default_rng(seed)
    write_tokenizer(out_dir / "tokenizer", vocab_size)
    counts = {split: write_split(out_dir / split, size, vocab_size, rng)
              for split, size in (("train", tokens), ("val", VAL_TOKENS))}  # fmt: skip
    manifest = Manifest(
        source=f"synthetic:zipf:{vocab_size}",
        source_fingerprint=f"{vocab_size}-{tokens}-{seed}",
        tokenizer_fingerprint=tokenizer_fingerprint(out_dir / "tokenizer"),
        val_fraction=VAL_TOKENS / (tokens + VAL_TOKENS),
        documents={split: documents for split, (documents, _) in counts.items()},
        tokens={split: written for split, (_, written) in counts.items()},
    )
    (out_dir / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2) + "\n")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--vocab-size", type=int, default=50257)
    parser.add_argument("--tokens", type=float, default=20e6, help="training tokens")
    args = parser.parse_args()
    start = time.perf_counter()
    write_corpus(args.out_dir, args.vocab_size, int(args.tokens))
    print(f"Wrote {args.out_dir}: {int(args.tokens):,} tokens of a {args.vocab_size:,}-token vocabulary in"
          f" {time.perf_counter() - start:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
