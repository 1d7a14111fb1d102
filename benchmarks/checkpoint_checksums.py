"""What checkpoint checksums cost: saving a checkpoint of --gib GiB plain (torch.save to the file) and hashed while
written (litmoe's save), alternating for --rounds, then checking it against its SHA256SUMS as a load does.

    uv run python benchmarks/checkpoint_checksums.py --gib 1 --rounds 3 --folder /tmp/checksums
"""

import argparse
import os
import shutil
import time
from pathlib import Path

import torch

from litmoe.core.checksums import checksum_problem, digest_of, write_checksums
from litmoe.distributed.fabric import DirectCheckpointIO


def save_plain(state: dict, path: Path) -> None:
    with open(path, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())


def save_hashed(state: dict, path: Path) -> None:
    DirectCheckpointIO().save_checkpoint(state, path)
    with open(path, "rb") as file:
        os.fsync(file.fileno())
    write_checksums(path.parent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/checksums"))
    args = parser.parse_args()
    elements = int(args.gib * 2**30 / 4)
    state = {"model": {f"layer{i}.weight": torch.randn(elements // 8) for i in range(8)}, "iter_num": 1}
    times: dict[str, list[float]] = {"plain save": [], "save hashed while written": [], "verify (read + hash)": []}
    for _ in range(args.rounds):
        shutil.rmtree(args.folder, ignore_errors=True)
        args.folder.mkdir(parents=True)
        for name, save in (("plain save", save_plain), ("save hashed while written", save_hashed)):
            path = args.folder / name.replace(" ", "-") / "lit_model.pth"
            path.parent.mkdir()
            start = time.perf_counter()
            save(state, path)
            times[name].append(time.perf_counter() - start)
        digest_of.cache_clear()
        start = time.perf_counter()
        assert checksum_problem(path.parent) is None
        times["verify (read + hash)"].append(time.perf_counter() - start)
    size = path.stat().st_size / 2**30
    print(f"checkpoint of {size:.2f} GiB, {args.rounds} rounds (best, and each)")
    print("| step | seconds | GiB/s | each round |")
    print("| --- | ---: | ---: | --- |")
    for name, values in times.items():
        print(f"| {name} | {min(values):.2f} | {size / min(values):.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
    shutil.rmtree(args.folder, ignore_errors=True)


if __name__ == "__main__":
    main()
