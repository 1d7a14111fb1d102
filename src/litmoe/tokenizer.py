"""Byte-level BPE tokenizers that `litgpt.Tokenizer(dir)` loads, and checks on tokenizer directories."""

import hashlib
import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from litmoe.errors import UserError

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|endoftext|>"
# What LitGPT copies into each checkpoint from a tokenizer directory (litgpt.utils.copy_config_files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path) -> None:
    """Train a byte-level BPE tokenizer on `texts` and save it to `out_dir` in the format LitGPT loads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # Byte-level: every string is encodable, nothing maps to an unknown token.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "add_bos_token": True,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def copy_tokenizer(source_dir: Path, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file():
            shutil.copy(source_dir / name, out_dir / name)


def load_tokenizer(tokenizer_dir: Path):
    """Load a LitGPT tokenizer, with a one-line error when the directory cannot serve pretraining data."""
    from litgpt import Tokenizer

    if not tokenizer_dir.is_dir():
        raise UserError(f"tokenizer dir {tokenizer_dir} does not exist: pass a directory with tokenizer.json")
    if not any((tokenizer_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise UserError(f"{tokenizer_dir} has no tokenizer.json or tokenizer.model: pass a LitGPT tokenizer dir")
    try:
        tokenizer = Tokenizer(tokenizer_dir)
    except (KeyError, ValueError, OSError) as err:
        raise UserError(f"{tokenizer_dir}: LitGPT cannot load this tokenizer ({err})") from err
    if tokenizer.eos_id is None or tokenizer.bos_id is None:
        raise UserError(
            f"{tokenizer_dir / 'tokenizer_config.json'}: the tokenizer needs both bos_token and eos_token"
            " (documents start with BOS and end with EOS)"
        )
    return tokenizer


def tokenizer_fingerprint(tokenizer_dir: Path) -> str:
    """A hash of the files that define the tokenizer: equal fingerprints encode text identically."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            digest.update(name.encode())
            digest.update((tokenizer_dir / name).read_bytes())
    return digest.hexdigest()[:16]
