"""prepare_data.py's tokens/s against the ceiling, the raw rate of the same tokenizer's `encode_batch` on the same
text and machine (all its threads), with every core and with one worker; and its peak memory for corpora of
different sizes (it must not grow with the corpus).

    uv run python benchmarks/prepare_throughput.py                         # 60 MB of parquet; memory at 1x-100x
    uv run python benchmarks/prepare_throughput.py --megabytes 300 --files 32

The corpus is generated (a toy English-like grammar) into parquet files; the tokenizer is a byte-level BPE of 8192
tokens trained on part of it. Each preparation runs in its own process, timed from outside (the whole command:
Python, imports, reading, tokenizing, writing, merging) and by its own report of the tokenizing phase (reading,
tokenizing and writing every shard, worker start-up included).
"""

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "the a cat dog bird teacher robot river garden night boat apple bread door sky ball sees likes follows draws "
    "finds paints carries today again with joy under over small red green blue warm tiny old young"
).split()


def write_corpus(folder: Path, megabytes: float, files: int, seed: int = 0) -> int:
    """Parquet files of documents of 100-2000 words; returns the number of characters."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    per_file, total = megabytes * 1e6 / files, 0
    for index in range(files):
        documents, size = [], 0
        while size < per_file:
            document = " ".join(rng.choice(WORDS) for _ in range(rng.randint(100, 2000))) + "."
            documents.append(document)
            size += len(document)
        pq.write_table(pa.table({"text": documents}), folder / f"part-{index:03d}.parquet")
        total += size
    return total


def train_tokenizer(corpus: Path, out_dir: Path) -> None:
    from litmoe.data.sources import read_table
    from litmoe.data.tokenizer import train_bpe_tokenizer

    sample = [text for index, text in enumerate(read_table(next(corpus.glob("*.parquet")), "text")) if index < 2000]
    train_bpe_tokenizer(sample, 8192, out_dir)


def raw_rate(corpus: Path, tokenizer_dir: Path) -> float:
    """Tokens/s of `encode_batch` alone (all its threads), over the whole corpus already in memory."""
    from tokenizers import Tokenizer

    from litmoe.data.sources import read_table

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    documents = [text for path in sorted(corpus.glob("*.parquet")) for text in read_table(path, "text")]
    start, tokens = time.perf_counter(), 0
    for begin in range(0, len(documents), 256):
        tokens += sum(len(encoding.ids) for encoding in tokenizer.encode_batch(documents[begin : begin + 256]))
    return tokens / (time.perf_counter() - start)


def prepare_timed(corpus: Path, out_dir: Path, tokenizer_dir: Path, workers: int) -> tuple[float, int, float]:
    """(seconds, tokens written, the tokenizing phase's tokens/s as prepare_data.py reports it), run as a user
    runs it: the seconds include starting Python and importing LitGPT."""
    from litmoe.data.prepared import read_manifest

    command = [sys.executable, "prepare_data.py", "--source", str(corpus), "--out_dir", str(out_dir),
               "--workers", str(workers), "--tokenizer_dir", str(tokenizer_dir)]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    manifest = read_manifest(out_dir)
    phase = re.search(r"Tokenized [\d,]+ tokens in [\d.]+ s: ([\d,]+) tokens/s", result.stdout)
    return seconds, manifest.tokens["train"] + manifest.tokens["val"], float(phase[1].replace(",", ""))


def peak_memory(source: str, out_dir: Path, workers: int) -> int:
    """Peak RSS, in bytes, of the largest process of a preparation (the main one or a worker)."""
    script = (
        "import resource, runpy, sys; sys.argv = ['prepare_data.py', *sys.argv[1:]];"
        " runpy.run_path('prepare_data.py', run_name='__main__');"
        " print(max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))"
    )
    command = [sys.executable, "-c", script, "--source", source, "--out_dir", str(out_dir), "--workers", str(workers)]
    result = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO)
    return int(result.stdout.split()[-1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=60)
    parser.add_argument("--files", type=int, default=16)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        characters = write_corpus(root / "corpus", args.megabytes, args.files)
        train_tokenizer(root / "corpus", root / "tokenizer")
        ceiling = raw_rate(root / "corpus", root / "tokenizer")
        rows = []
        for workers in (cores, 1):
            out_dir = root / f"out-{workers}"
            seconds, tokens, phase = prepare_timed(root / "corpus", out_dir, root / "tokenizer", workers)
            rows.append((f"--workers {workers}", phase, tokens / seconds, seconds))
        print(f"{characters / 1e6:.0f}M characters in {args.files} parquet files, {cores} cores;"
              f" encode_batch alone (the ceiling): {ceiling:,.0f} tokens/s")  # fmt: skip
        print("| prepare_data.py | tokenizing phase, tokens/s | vs the ceiling | whole command, tokens/s"
              " | vs the ceiling | wall s |")  # fmt: skip
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, phase, whole, seconds in rows:
            cells = f"{phase:,.0f} | {phase / ceiling:.2f} | {whole:,.0f} | {whole / ceiling:.2f} | {seconds:.1f}"
            print(f"| {name} | {cells} |")

    print("\n| corpus | characters | peak RSS (largest process) |")
    print("| --- | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = [("python-docs (the default)", 1.6e6, peak_memory("python-docs", root / "default", cores))]
        for scale in (10, 100):  # 10x and 100x the default's 1.6M characters, in files of 2 MB (one row group)
            corpus = root / f"x{scale}"
            characters = write_corpus(corpus, 1.6 * scale, 8 * scale // 10, seed=scale)
            peak = peak_memory(str(corpus), root / f"out{scale}", cores)
            rows.append((f"{scale}x the default, generated", characters, peak))
        for name, characters, peak in rows:
            print(f"| {name} | {characters / 1e6:.1f}M | {peak / 2**20:,.0f} MiB |")


if __name__ == "__main__":
    main()
