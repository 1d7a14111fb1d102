"""Forward+backward time of causal attention at MoE-200M training shapes under each SDPA kernel PyTorch offers:
which one `--flash-attention` leaves PyTorch to pick, and what `--flash-attention-force` (FlashAttention pinned)
costs or gains against it. CUDA only.

    python3 benchmarks/attention_kernels.py                      # micro-batch 8 x 2048 tokens, 12 heads of 64
    python3 benchmarks/attention_kernels.py --batch 4 --seq-len 4096

LitGPT passes SDPA the query groups already expanded to every head, so all heads are timed. Kernels are timed
interleaved (one call of each per round); each figure is the median over rounds after warm-up.
"""

import argparse
import statistics

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

from litmoe.model.attention import chosen_backend

KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def step_ms(backend: SDPBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    with sdpa_kernel([backend]):
        scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda")
    shape = (args.batch, args.heads, args.seq_len, args.head_size)
    q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device=device, dtype=torch.bfloat16)
    usable = []
    for backend in KERNELS:
        try:
            step_ms(backend, q, k, v, grad)
            usable.append(backend)
        except RuntimeError as err:
            print(f"# {backend.name}: not usable here ({str(err).splitlines()[0]})")
    times = {backend: [] for backend in usable}
    for round_index in range(args.warmup + args.rounds):
        for backend in usable:
            ms = step_ms(backend, q, k, v, grad)
            if round_index >= args.warmup:
                times[backend].append(ms)
    picked = chosen_backend(device, torch.bfloat16, args.heads, args.head_size)
    flops = 4 * args.batch * args.heads * args.seq_len**2 * args.head_size * 3.5 / 2  # causal: half; bwd 2.5x fwd
    print(f"# {torch.cuda.get_device_name()}, bf16, torch {torch.__version__}, batch {args.batch} x {args.seq_len},"
          f" {args.heads} heads of {args.head_size}, causal; PyTorch picks {picked.name}")  # fmt: skip
    print("| kernel | fwd+bwd ms | TFLOP/s | vs PyTorch's pick |")
    print("| --- | ---: | ---: | ---: |")
    medians = {backend: statistics.median(ms) for backend, ms in times.items()}
    for backend, ms in medians.items():
        versus = f"{medians[picked] / ms:.2f}x faster" if picked in medians else "-"
        print(f"| {backend.name} | {ms:.2f} | {flops / ms / 1e9:.0f} | {versus} |")


if __name__ == "__main__":
    main()
