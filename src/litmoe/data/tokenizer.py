"""Byte-level BPE tokenizers that `litgpt.Tokenizer(dir)` loads, and checks on tokenizer directories."""

import hashlib
import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from litmoe.core.errors import UserError
from litmoe.core.user_files import read_json_file

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
    if (learned := tokenizer.get_vocab_size()) < vocab_size:
        print(f"The tokenizer has {learned:,} tokens, not --vocab_size {vocab_size:,}: the text holds no more merges")
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

    if tokenizer_dir.is_file():
        raise UserError(f"tokenizer dir {tokenizer_dir} is a file: pass its directory, {tokenizer_dir.parent}")
    if not tokenizer_dir.is_dir():
        raise UserError(f"tokenizer dir {tokenizer_dir} does not exist: pass a directory with tokenizer.json")
    if not any((tokenizer_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise UserError(f"{tokenizer_dir} has no tokenizer.json or tokenizer.model: pass a LitGPT tokenizer dir")
    check_tokenizer_files(tokenizer_dir)
    try:
        tokenizer = Tokenizer(tokenizer_dir)
    except (KeyError, ValueError, OSError) as err:
        raise UserError(f"{tokenizer_dir}: LitGPT cannot load this tokenizer ({err})") from err
    if tokenizer.eos_id is None or tokenizer.bos_id is None:
        config = tokenizer_dir / "tokenizer_config.json"
        missing = "" if config.is_file() else " (the file is missing: copy it from where tokenizer.json came from)"
        raise UserError(
            f"{config}: the tokenizer needs both bos_token and eos_token (documents start with BOS and end with"
            f" EOS){missing}"
        )
    return tokenizer


def check_tokenizer_files(tokenizer_dir: Path) -> None:
    """The tokenizer's JSON files parse, and tokenizer.json is a tokenizer (one line naming the file otherwise)."""
    fix = "copy the tokenizer files again from where they came from"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (tokenizer_dir / name).is_file():
            content = read_json_file(tokenizer_dir / name, f"a tokenizer's {name}", fix)
            expected = {"model"} if name == "tokenizer.json" else set()
            if not isinstance(content, dict) or not expected <= set(content):
                raise UserError(f"{tokenizer_dir / name}: not a tokenizer's {name} (a JSON object expected); {fix}")


def document_markers(tokenizer_dir: Path) -> tuple[int, int]:
    """(BOS id, EOS id) as `litgpt.Tokenizer` reads them, with `load_tokenizer`'s one-line errors.

    For a tokenizer.json they are read here, as LitGPT reads them (tokenizer_config.json's bos_token and
    eos_token, a string or {"content": ...}, then generation_config.json's ids), so that preparing data does not
    import LitGPT (12 s on two cores). Anything else, and any problem, goes through `load_tokenizer` itself.
    tests/test_data.py holds both to the same ids on the pinned LitGPT."""
    try:
        markers = read_markers(tokenizer_dir)
    except Exception:  # noqa: BLE001  (tokenizers raises a bare Exception; load_tokenizer says what is wrong)
        markers = None
    if markers is None or None in markers:
        tokenizer = load_tokenizer(tokenizer_dir)
        return tokenizer.bos_id, tokenizer.eos_id
    return markers


def read_markers(tokenizer_dir: Path) -> tuple[int | None, int | None] | None:
    if not (tokenizer_dir / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    processor = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ids: dict[str, int | None] = {"bos": None, "eos": None}
    if (config_file := tokenizer_dir / "tokenizer_config.json").is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if "tokenizer_class" not in config:
            return None  # LitGPT's Tokenizer fails on this (KeyError): load_tokenizer reports it
        for name in ids:
            token = config.get(f"{name}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if token is not None:
                ids[name] = processor.token_to_id(token)
                if ids[name] is None:
                    return None  # LitGPT raises here: load_tokenizer reports it
    if (generation_file := tokenizer_dir / "generation_config.json").is_file():
        generation = json.loads(generation_file.read_text(encoding="utf-8"))
        for name in ids:
            ids[name] = generation.get(f"{name}_token_id") if ids[name] is None else ids[name]
    return ids["bos"], ids["eos"]


def literal_special_tokens(processor):
    """A `tokenizers.Tokenizer` that encodes `<|endoftext|>` written in a document as the text it is: only the
    framing adds BOS and EOS (a corpus about tokenizers, or code, holds such strings; nanoGPT's `encode_ordinary`)."""
    processor.encode_special_tokens = True
    return processor


def tokenizer_fingerprint(tokenizer_dir: Path) -> str:
    """A hash of the files that define the tokenizer: equal fingerprints encode text identically."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            digest.update(name.encode())
            digest.update((tokenizer_dir / name).read_bytes())
    return digest.hexdigest()[:16]


def tokenizer_vocab_size(tokenizer) -> int:
    """Every id the tokenizer can produce, added special tokens included."""
    if tokenizer.backend == "huggingface":
        return tokenizer.processor.get_vocab_size(with_added_tokens=True)
    return tokenizer.vocab_size
