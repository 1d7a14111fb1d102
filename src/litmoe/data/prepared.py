"""What a prepared data directory holds, and the checks that keep prepare_data.py from replacing anything else.

out_dir/
  tokenizer/        tokenizer.json + tokenizer_config.json (loads with litgpt.Tokenizer)
  train/ val/       litdata chunks of token ids; each document is BOS ... EOS
  manifest.json     what was prepared from what, with token counts
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from litmoe.core.checksums import SUMS, checksum_problem
from litmoe.core.errors import UserError
from litmoe.core.outputs import check_output
from litmoe.core.user_files import read_json_file

MANIFEST = "manifest.json"
SPLITS = ("train", "val")
PREPARED_ENTRIES = {MANIFEST, SUMS, "tokenizer", *SPLITS}  # all a prepared directory holds; --force replaces only these


@dataclass
class Manifest:
    source: str
    source_fingerprint: str
    tokenizer_fingerprint: str
    val_fraction: float
    documents: dict[str, int]
    tokens: dict[str, int]
    val_source: str | None = None  # a given validation set, kept as it is (None: held out by content hash)
    val_source_fingerprint: str | None = None
    text_field: str = "text"


def read_manifest(out_dir: Path) -> Manifest | None:
    path = out_dir / MANIFEST
    if not path.is_file():
        return None
    fix = "prepare the data again (prepare_data.py --force)"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise UserError(f"{path}: not a manifest prepare_data.py can read ({err}); {fix}") from None
    fields = {field.name for field in dataclasses.fields(Manifest)}
    required = {field.name for field in dataclasses.fields(Manifest) if field.default is dataclasses.MISSING}
    if not isinstance(record, dict) or not required <= set(record) <= fields:
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise UserError(f"{path}: not a manifest prepare_data.py wrote (it holds {found}); {fix}")
    return Manifest(**record)


def check_output_dir(out_dir: Path, sources: list[str]) -> None:
    """Refuse an --out_dir whose replacement could delete what the user owns, with or without --force: only a
    directory holding nothing but prepared data is ever replaced."""
    check_output(out_dir, "--out_dir", replaces="prepared-data")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out_dir {out_dir} is a file; give a directory for the prepared data")
    for source in sources:
        if not Path(source).exists():
            continue
        source_path, out_path = Path(source).resolve(), out_dir.resolve()
        if out_path == source_path or source_path in out_path.parents:
            raise UserError(
                f"--out_dir {out_dir} is inside --source {source}; it would be read as input: choose a directory"
                " outside the source"
            )
        if out_path in source_path.parents:
            raise UserError(
                f"--source {source} is inside --out_dir {out_dir}; replacing the output would delete it: choose"
                " another --out_dir"
            )
    if out_dir.is_dir() and any(out_dir.iterdir()):
        foreign = sorted(entry.name for entry in out_dir.iterdir() if entry.name not in PREPARED_ENTRIES)
        if foreign or read_manifest(out_dir) is None:
            what = ", ".join(foreign[:3]) if foreign else f"no {MANIFEST}"
            raise UserError(
                f"--out_dir {out_dir} holds files that are not prepared data ({what}); prepare_data.py replaces only"
                " what it made, even with --force: move them or choose another --out_dir"
            )


def check_existing(out_dir: Path, wanted: Manifest, wanted_tokenizer: str | None) -> bool:
    """True when `out_dir` already holds exactly this preparation; raises when it holds other prepared data."""
    existing = read_manifest(out_dir)
    if existing is None:
        return False
    if wanted_tokenizer is not None and existing.tokenizer_fingerprint != wanted_tokenizer:
        raise UserError(
            f"{out_dir / MANIFEST}: this data was made with another tokenizer"
            f" ({existing.tokenizer_fingerprint}); pass --force to replace it, or choose another --out_dir"
        )
    inputs = ("source_fingerprint", "val_fraction", "val_source_fingerprint", "text_field")
    if any(getattr(existing, key) != getattr(wanted, key) for key in inputs):
        raise UserError(
            f"{out_dir / MANIFEST}: this data was prepared from {existing.source} (val_fraction"
            f" {existing.val_fraction}, val_source {existing.val_source}); pass --force to replace it, or choose"
            " another --out_dir"
        )
    return True


def check_chunks(data_dir: Path) -> dict[str, list[int]]:
    """Every chunk that a split's index.json lists is there, at its recorded size, and every file as it was
    prepared (SHA256SUMS, where the folder has one): litdata would otherwise fail in the middle of a run
    (IndexError, FileNotFoundError) on a truncated, deleted or replaced chunk, or train on changed tokens without a
    word. Returns each split's tokens per chunk, as the index records them (empty when it does not)."""
    manifest = read_manifest(data_dir)
    again = f"prepare it again: `prepare_data.py --source {manifest.source if manifest else 'SOURCE'}"
    again += f" --out_dir {data_dir} --force`"
    tokens = {}
    for split in SPLITS:
        index = read_json_file(data_dir / split / "index.json", "litdata's index of prepared data", again)
        chunks = index.get("chunks", []) if isinstance(index, dict) else []
        uncompressed = not (index.get("config") or {}).get("compression")
        tokens[split] = [int(chunk["dim"]) for chunk in chunks] if all("dim" in chunk for chunk in chunks) else []
        for chunk in chunks:
            path = data_dir / split / chunk["filename"]
            if not path.is_file():
                raise UserError(f"{path}: missing from the prepared data; {again}")
            if uncompressed and path.stat().st_size != chunk["chunk_bytes"]:
                raise UserError(
                    f"{path}: {path.stat().st_size:,} bytes where the index records {chunk['chunk_bytes']:,} (truncated"
                    f" or replaced); {again}"
                )
    if (problem := checksum_problem(data_dir)) is not None:  # every byte as prepared (its SHA256SUMS)
        raise UserError(f"{data_dir}: {problem}; {again}")
    return tokens
