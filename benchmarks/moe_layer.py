"""Forward+backward time of litmoe's MoE layer vs stock LitGPT LLaMAMoE vs a dense SwiGLU MLP with the
same active FLOPs, at MoE-200M layer sizes (n_embd 768, 8 experts of 2048, top-2).

    uv run python benchmarks/moe_layer.py                    # fp32 on CPU (bf16 on CUDA when present)
    uv run python benchmarks/moe_layer.py --tokens 512 2048 --rounds 15

The variants are timed interleaved (one call of each per round), so a slow patch of the machine hits all of
them alike. Each figure is the median over rounds after warm-up, and every ratio comes from the same run.
"""

import argparse
import statistics
import time

import torch

import litmoe  # noqa: F401  (registers MoE-200M)


def build_layers(device: torch.device, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    from litgpt import Config
    from litgpt.model import LLaMAMLP, LLaMAMoE

    from litmoe.moe import MoELayer

    config = Config.from_name("MoE-200M")
    torch.manual_seed(0)
    stock = LLaMAMoE(config)
    ours = MoELayer(config)
    ours.load_state_dict(stock.state_dict())
    layers = {"stock LLaMAMoE": stock, "litmoe MoELayer": ours}
    active_hidden = config.moe_intermediate_size * config.n_expert_per_token
    layers["dense, same active FLOPs"] = LLaMAMLP(config, intermediate_size=active_hidden)
    return {name: layer.to(device=device, dtype=dtype) for name, layer in layers.items()}


def step(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    layer(x).backward(grad)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(tokens: int, rounds: int, warmup: int, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    layers = build_layers(device, dtype)
    x = torch.randn(1, tokens, 768, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    times: dict[str, list[float]] = {name: [] for name in layers}
    for round_index in range(warmup + rounds):
        for name, layer in layers.items():
            seconds = step(layer, x, grad)
            if round_index >= warmup:
                times[name].append(seconds)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {name}, {dtype}, torch {torch.__version__}, median of {args.rounds} interleaved rounds")
    print("| tokens | variant | fwd+bwd ms | vs dense | vs stock |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for tokens in args.tokens:
        results = run(tokens, args.rounds, args.warmup, device, dtype)
        dense, stock = results["dense, same active FLOPs"], results["stock LLaMAMoE"]
        for variant, ms in results.items():
            print(f"| {tokens} | {variant} | {ms:.1f} | {ms / dense:.2f}x | {stock / ms:.2f}x faster |")


if __name__ == "__main__":
    main()
