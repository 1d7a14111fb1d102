"""Forward+backward time of litmoe's MoE layer vs stock LitGPT LLaMAMoE vs a dense SwiGLU MLP with the
same active FLOPs, at MoE-200M layer sizes (n_embd 768, 8 experts of 2048, top-2).

    uv run python benchmarks/moe_layer.py                    # fp32 on CPU (bf16 on CUDA when present)
    uv run python benchmarks/moe_layer.py --tokens 512 2048 --rounds 15
    python3 benchmarks/moe_layer.py --compile               # each layer under torch.compile, as training runs it

The variants are timed interleaved (one call of each per round), so a slow patch of the machine hits all of
them alike. Each figure is the median over rounds after warm-up, and every ratio comes from the same run.

"expert GEMMs alone" is the floor for any MoE layer: only the six matrix products per expert that forward
and backward need (tokens split evenly over the experts), without routing, permutation or activations.
"""

import argparse
import statistics
import time

import torch

from litmoe.model.configs import register_configs


def build_layers(device: torch.device, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    from litgpt import Config
    from litgpt.model import LLaMAMLP, LLaMAMoE

    from litmoe.model.moe import MoELayer

    register_configs()
    config = Config.from_name("MoE-200M")
    torch.manual_seed(0)
    stock = LLaMAMoE(config)
    ours = MoELayer(config)
    ours.load_state_dict(stock.state_dict())
    layers = {"stock LLaMAMoE": stock, "litmoe MoELayer": ours}
    active_hidden = config.moe_intermediate_size * config.n_expert_per_token
    layers["dense, same active FLOPs"] = LLaMAMLP(config, intermediate_size=active_hidden)
    return {name: layer.to(device=device, dtype=dtype) for name, layer in layers.items()}


def layer_step(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    layer.zero_grad(set_to_none=True)
    layer(x.detach().requires_grad_()).backward(grad)


def expert_gemms(config, tokens: int, device: torch.device, dtype: torch.dtype):
    """The forward and backward matrix products of the experts, and nothing else."""
    E, D, F = config.n_expert, config.n_embd, config.moe_intermediate_size
    rows = tokens * config.n_expert_per_token // E
    w_in, w_out = torch.randn(E, 2 * F, D, device=device, dtype=dtype), torch.randn(E, D, F, device=device, dtype=dtype)
    x, h = torch.randn(rows, D, device=device, dtype=dtype), torch.randn(rows, F, device=device, dtype=dtype)
    grad_h, grad_y = torch.randn(rows, 2 * F, device=device, dtype=dtype), torch.randn_like(x)

    def run() -> None:
        for expert in range(E):
            x @ w_in[expert].T, h @ w_out[expert].T  # forward
            grad_h @ w_in[expert], grad_y @ w_out[expert]  # gradients of the inputs
            grad_h.T @ x, grad_y.T @ h  # gradients of the weights

    return run


def timed(function) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(
    tokens: int, rounds: int, warmup: int, device: torch.device, dtype: torch.dtype, compiled: bool
) -> dict[str, float]:
    from functools import partial

    from litgpt import Config

    x = torch.randn(1, tokens, 768, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    layers = build_layers(device, dtype)
    if compiled:
        layers = {name: torch.compile(layer) for name, layer in layers.items()}
    variants = {name: partial(layer_step, layer, x, grad) for name, layer in layers.items()}
    variants["expert GEMMs alone (floor)"] = expert_gemms(Config.from_name("MoE-200M"), tokens, device, dtype)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(warmup + rounds):
        for name, function in variants.items():
            seconds = timed(function)
            if round_index >= warmup:
                times[name].append(seconds)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--system-malloc", action="store_true", help="CPU: leave glibc's defaults, as before")
    parser.add_argument("--compile", action="store_true", help="torch.compile each layer (warm-up rounds compile)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    kept = False
    if not cuda and not args.system_malloc:  # as run_train.py trains on the CPU (litmoe.training.host_memory)
        from litmoe.training.host_memory import keep_freed_host_memory

        kept = keep_freed_host_memory()
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    memory = ", freed host memory kept" if kept else ""
    mode = ", compiled" if args.compile else ""
    print(f"# {name}, {dtype}{mode}, torch {torch.__version__}{memory}, median of {args.rounds} interleaved rounds")
    print("| tokens | variant | fwd+bwd ms | vs dense | vs stock |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for tokens in args.tokens:
        results = run(tokens, args.rounds, args.warmup, device, dtype, args.compile)
        dense, stock = results["dense, same active FLOPs"], results["stock LLaMAMoE"]
        for variant, ms in results.items():
            print(f"| {tokens} | {variant} | {ms:.1f} | {ms / dense:.2f}x | {stock / ms:.2f}x faster |")


if __name__ == "__main__":
    main()
