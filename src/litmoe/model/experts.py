"""The routed experts of litmoe's MoE layer: bias-free SwiGLU experts in stacked storage.

`w_in` (E, 2F, D) holds fc_1 and fc_2 of each expert one above the other, and `w_out` (E, D, F) holds proj
(with `bias: true`, `b_in` (E, 2F) and `b_out` (E, D) hold their biases, added per row after each GEMM).
One grouped GEMM (`torch._grouped_mm`) then runs every expert's fc_1 and fc_2 together, with no host sync and
no data-dependent shapes. Grouped GEMMs need 16-byte-aligned strides (and bf16 on CUDA); sizes that give
neither run the same computation one expert at a time (`looped_swiglu`), which is slower but exact.

What stock LitGPT exposes stays readable: the state dict has stock's keys (`{i}.fc_1.weight`, ...), and
`experts[i].fc_1.weight`, iteration and `len()` work as on stock's `nn.ModuleList` of `LLaMAMLP`, each weight
a view of the stacked storage (see `ExpertView`).
"""

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from litmoe.model.attention import autocast_dtype, compute_dtype

STOCK_EXPERT_LINEARS = ("fc_1", "fc_2", "proj")
ALIGNMENT_BYTES = 16  # torch._grouped_mm's requirement on every stride


def expert_size(config) -> int:
    """Each routed expert's hidden size: `moe_intermediate_size`, else `intermediate_size`, as stock LitGPT's
    `LLaMAMLP` falls back (Mixtral's configs set only the latter)."""
    return config.moe_intermediate_size or config.intermediate_size


def grouped_gemm_blocker(n_embd: int, hidden: int, dtype: torch.dtype, device_type: str) -> str | None:
    """Why these experts cannot run as grouped GEMMs (they then loop over experts), or None when they can."""
    if device_type == "cuda" and dtype != torch.bfloat16:
        return f"CUDA grouped GEMMs take bf16, not {str(dtype).removeprefix('torch.')}"
    multiple = ALIGNMENT_BYTES // dtype.itemsize
    odd = {name: size for name, size in (("n_embd", n_embd), ("expert size", hidden)) if size % multiple}
    if not odd:
        return None
    sizes = ", ".join(f"{name} {size}" for name, size in odd.items())
    nearest = ", ".join(f"{name} {math.ceil(size / multiple) * multiple}" for name, size in odd.items())
    return (
        f"{sizes}: grouped GEMMs need multiples of {multiple} in {str(dtype).removeprefix('torch.')}, so the experts"
        f" run one at a time (slower); {nearest} would avoid it"
    )


def looped_experts_reason(config, precision: str) -> str | None:
    """For the start-up line and --estimate: why this model's experts will loop instead of running as grouped
    GEMMs on this machine at this precision, or None when they run grouped."""
    if config.mlp_class_name != "LLaMAMoE":
        return None
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return grouped_gemm_blocker(config.n_embd, expert_size(config), compute_dtype(precision), device_type)


class GroupedExperts(nn.Module):
    """`n_expert` SwiGLU experts in stacked storage, saved and loaded under stock LitGPT keys. Under expert
    parallelism a rank holds only the experts `held` (global ids), and its state dict only their keys."""

    def __init__(
        self, n_expert: int, n_embd: int, hidden: int, n_layer: int, bias: bool = False, held: range | None = None
    ) -> None:
        super().__init__()
        self.n_expert = n_expert  # ZeRO-3 empties the parameters between uses: their shapes do not tell
        self.held = held if held is not None else range(n_expert)
        self.hidden = hidden
        self.n_layer = n_layer
        count = len(self.held)
        self.w_in = nn.Parameter(torch.empty(count, 2 * hidden, n_embd))  # [fc_1; fc_2]
        self.w_out = nn.Parameter(torch.empty(count, n_embd, hidden))  # proj
        self.b_in = nn.Parameter(torch.empty(count, 2 * hidden)) if bias else None
        self.b_out = nn.Parameter(torch.empty(count, n_embd)) if bias else None
        self.register_state_dict_post_hook(_to_stock_keys)
        self.register_load_state_dict_pre_hook(_from_stock_keys)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LitGPT's pretraining init (GPT-NeoX), what `litgpt.pretrain.initialize_weights` gives stock experts, drawn
        in stock's order (each expert's fc_1, fc_2, then proj) so that the same seed gives the same weights. Experts
        held by other ranks are drawn too, and dropped, so that every rank's experts are the ones a single process
        would have."""
        n_embd = self.w_in.shape[-1]
        # scratch for other ranks' experts (shaped from the parameters' trailing sizes: a rank may hold none)
        others = self.w_in.new_empty(self.w_in.shape[1:]), self.w_out.new_empty(self.w_out.shape[1:])
        for expert in range(self.n_expert):  # contiguous views: the same draws as stock's own tensors get
            if expert in self.held:
                w_in, w_out = self.w_in[expert - self.held.start], self.w_out[expert - self.held.start]
            else:  # another rank's expert: drawn into scratch, so that the random stream stays stock's
                w_in, w_out = others
            nn.init.normal_(w_in[: self.hidden], std=math.sqrt(2.0 / 5 / n_embd))  # fc_1
            nn.init.normal_(w_in[self.hidden :], std=math.sqrt(2.0 / 5 / n_embd))  # fc_2
            nn.init.normal_(w_out, std=1 / math.sqrt(n_embd) / self.n_layer)  # proj
        for bias in (self.b_in, self.b_out):
            if bias is not None:
                nn.init.zeros_(bias)

    @torch.no_grad()
    def keep_hidden(self, units: slice) -> None:
        """Keep only the hidden units `units` of every expert (a rank's share under tensor parallelism): the
        experts' outputs become partial sums, which add up over the shares to the whole. `b_out` is left whole,
        for the caller to keep on one share."""

        def rows(stacked: torch.Tensor) -> torch.Tensor:  # fc_1's and fc_2's rows `units`, still stacked
            fc_1, fc_2 = stacked.split(self.hidden, dim=1)
            return torch.cat([fc_1[:, units], fc_2[:, units]], dim=1)

        self.w_in = nn.Parameter(rows(self.w_in), requires_grad=False)
        self.w_out = nn.Parameter(self.w_out[:, :, units].contiguous(), requires_grad=False)
        if self.b_in is not None:
            self.b_in = nn.Parameter(rows(self.b_in), requires_grad=False)
        self.hidden = units.stop - units.start

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_in, w_out) as forward multiplies by them (fine-tuning adds LoRA's update here)."""
        return self.w_in, self.w_out

    def forward(self, xs: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """SwiGLU of each expert on its contiguous slice of the expert-sorted tokens `xs`."""
        device, dtype = xs.device.type, autocast_dtype(xs)
        w_in, w_out = self.weights()
        xs, w_in, w_out = xs.to(dtype), w_in.to(dtype), w_out.to(dtype)
        b_in, b_out = (None, None) if self.b_in is None else (self.b_in.to(dtype), self.b_out.to(dtype))
        if grouped_gemm_blocker(xs.shape[-1], self.hidden, dtype, device) is not None:
            return looped_swiglu(xs, tokens_per_expert, w_in, w_out, b_in, b_out)
        offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
        hidden = torch._grouped_mm(xs, w_in.transpose(1, 2), offs=offsets)
        if b_in is not None:  # each row's expert, without a host sync (output_size is known)
            expert_of_row = torch.arange(len(self), device=xs.device).repeat_interleave(
                tokens_per_expert, output_size=xs.shape[0]
            )
            hidden = hidden + b_in[expert_of_row]
        gate, up = hidden.chunk(2, dim=-1)
        out = torch._grouped_mm(F.silu(gate) * up, w_out.transpose(1, 2), offs=offsets)
        return out if b_out is None else out + b_out[expert_of_row]

    # Stock's reading surface: an nn.ModuleList of LLaMAMLP experts.

    def __len__(self) -> int:
        return len(self.held)

    def __getitem__(self, index: int) -> "ExpertView":
        if not isinstance(index, int):
            raise TypeError(f"experts[{index!r}]: index the experts with an int, as stock's nn.ModuleList")
        if not -len(self) <= index < len(self):
            raise IndexError(f"expert index {index} out of range for {len(self)} experts")
        return ExpertView(self, index % len(self))

    def __iter__(self) -> Iterator["ExpertView"]:
        return (ExpertView(self, index) for index in range(len(self)))


def looped_swiglu(
    xs: torch.Tensor, tokens_per_expert: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor,
    b_in: torch.Tensor | None = None, b_out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """The same computation one expert at a time (one host sync), for sizes, devices and dtypes without grouped
    GEMMs."""
    outputs = []
    n_expert = w_in.shape[0]
    # unbind once: its backward stacks the experts' gradients in one op (indexing per expert would not)
    biases_in = b_in.unbind() if b_in is not None else [None] * n_expert
    biases_out = b_out.unbind() if b_out is not None else [None] * n_expert
    chunks = xs.split(tokens_per_expert.tolist())
    experts = zip(chunks, w_in.unbind(), w_out.unbind(), biases_in, biases_out, strict=True)
    for chunk, expert_in, expert_out, bias_in, bias_out in experts:
        gate, up = F.linear(chunk, expert_in, bias_in).chunk(2, dim=-1)
        outputs.append(F.linear(F.silu(gate) * up, expert_out, bias_out))
    return torch.cat(outputs)


class ExpertLinear:
    """fc_1, fc_2 or proj of one expert, as stock's `nn.Linear`: `weight` (and `bias`) are views of the stacked
    storage, with the matching slice of its gradient as `.grad`, so in-place writes (`weight.copy_(...)`) change
    the model. Assigning `weight = tensor` copies the values in. Rebinding `weight.data` would only change the
    view, so write with `copy_` instead."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, index: int, rows: slice) -> None:
        self._storage = {"weight": weight, "bias": bias}
        self._index, self._rows = index, rows

    def _view(self, name: str) -> torch.Tensor | None:
        storage = self._storage[name]
        if storage is None:
            return None
        view = storage.detach()[self._index, self._rows]
        if storage.grad is not None:
            view.grad = storage.grad[self._index, self._rows]
        return view

    def _write(self, name: str, value: torch.Tensor) -> None:
        target = self._view(name)
        if target is None or tuple(value.shape) != tuple(target.shape):
            shape = "no" if target is None else f"shape {tuple(target.shape)}"
            raise ValueError(f"expert {name} of {shape} cannot take a tensor of shape {tuple(value.shape)}")
        target.copy_(value.detach())

    @property
    def weight(self) -> torch.Tensor:
        return self._view("weight")

    @weight.setter
    def weight(self, value: torch.Tensor) -> None:
        self._write("weight", value)

    @property
    def bias(self) -> torch.Tensor | None:
        return self._view("bias")

    @bias.setter
    def bias(self, value: torch.Tensor) -> None:
        self._write("bias", value)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._storage["weight"], self._storage["bias"]
        return F.linear(x, weight[self._index, self._rows], None if bias is None else bias[self._index, self._rows])


class ExpertView:
    """One routed expert as stock's `LLaMAMLP` shows it: `fc_1`, `fc_2`, `proj` and a callable SwiGLU."""

    def __init__(self, experts: GroupedExperts, index: int) -> None:
        hidden = experts.hidden
        self.intermediate_size = hidden
        self.fc_1 = ExpertLinear(experts.w_in, experts.b_in, index, slice(0, hidden))
        self.fc_2 = ExpertLinear(experts.w_in, experts.b_in, index, slice(hidden, 2 * hidden))
        self.proj = ExpertLinear(experts.w_out, experts.b_out, index, slice(None))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))


def stock_expert_entries(stacked: dict[str, torch.Tensor], prefix: str, held: range, hidden: int) -> dict:
    """Stacked expert tensors (`prefix` + w_in, w_out, and b_in, b_out if present) as stock LitGPT's entries
    `prefix{expert}.fc_1.weight`, ... for the experts `held`."""
    entries = {}
    for kind, (name_in, name_out) in (("weight", ("w_in", "w_out")), ("bias", ("b_in", "b_out"))):
        if prefix + name_in not in stacked:
            continue
        tensor_in, tensor_out = stacked[prefix + name_in], stacked[prefix + name_out]
        for index, expert in enumerate(held):
            fc_1, fc_2 = tensor_in[index].split(hidden)
            for name, value in zip(STOCK_EXPERT_LINEARS, (fc_1, fc_2, tensor_out[index]), strict=True):
                entries[f"{prefix}{expert}.{name}.{kind}"] = value
    return entries


def stacked_from_stock_keys(model: nn.Module, state_dict: dict) -> dict:
    """`state_dict` with stock's expert entries turned into the stacked tensors of `model`'s experts (those it
    holds), as loading does: for a strategy that must cut each tensor to its shard before loading it."""
    state_dict = dict(state_dict)
    for name, module in model.named_modules():
        if isinstance(module, GroupedExperts):
            _from_stock_keys(module, state_dict, f"{name}." if name else "")
    return state_dict


def _to_stock_keys(module: GroupedExperts, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    stacked = state_dict[prefix + "w_in"]
    if stacked.dim() != 3 or isinstance(stacked, DTensor):  # ZeRO-3's placeholder or an FSDP shard: the
        return  # strategy writes the stock entries itself (litmoe.distributed.expert_parallel.full_state_dict)
    names = [prefix + name for name in ("w_in", "w_out", "b_in", "b_out") if prefix + name in state_dict]
    stacked = {name: state_dict.pop(name) for name in names}
    state_dict.update(stock_expert_entries(stacked, prefix, module.held, module.hidden))


def _from_stock_keys(module: GroupedExperts, state_dict: dict, prefix: str, *args: Any) -> None:
    for kind, stacked in (("weight", ("w_in", "w_out")), ("bias", ("b_in", "b_out"))):
        keys = [[f"{prefix}{expert}.{name}.{kind}" for name in STOCK_EXPERT_LINEARS] for expert in module.held]
        if not all(key in state_dict for row in keys for key in row):
            continue  # let load_state_dict report what is missing
        for expert in set(range(module.n_expert)) - set(module.held):  # other ranks' experts (expert parallelism)
            for name in STOCK_EXPERT_LINEARS:
                state_dict.pop(f"{prefix}{expert}.{name}.{kind}", None)
        stock = [[loaded(state_dict.pop(key)) for key in row] for row in keys]
        state_dict[prefix + stacked[0]] = torch.stack([torch.cat((fc_1, fc_2)) for fc_1, fc_2, _ in stock])
        state_dict[prefix + stacked[1]] = torch.stack([proj for _, _, proj in stock])


def loaded(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor of Lightning's `lazy_load` (how LitGPT's fine-tuning and generation read checkpoints) read in:
    its lazy tensors cannot go into `torch.cat` within a tuple."""
    load = getattr(tensor, "_load_tensor", None)
    return load() if load is not None else tensor
