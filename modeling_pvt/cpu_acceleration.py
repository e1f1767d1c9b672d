"""Faster CPU inference for a `PvtLayer`, used only where it was measured faster on the machine at hand.

`modeling_pvt.py` is the reference implementation. A layer asks `fast_path_applies` (the one predicate) whether it
may run through this module; if so, `fastest_layer_forward` runs it by the route measured fastest on this machine for
that layer shape and input size (measured once per process):

- `reference`: the layer's own code, unchanged;
- `fused`: the layer with its matrix products run by oneDNN, bias, exact GELU and residual additions fused into them
  (one pass over memory instead of three);
- `fused_token_blocks`: the same, a cache-sized block of tokens at a time (everything but the spatial reduction works
  token by token). The MLP's wide activation then stays in cache, and temporaries stay small (a fraction of the peak
  memory at detection sizes).

Whether oneDNN's products beat PyTorch's BLAS, and whether blocking pays, depends on the CPU (its ISA, its caches,
which GEMM library is faster there), so nothing is assumed: the first call of each layer shape and input size times
every route on its input, in alternating rounds (`_measure`), and another route than the reference is kept only when
it was faster in every round and clearly faster in the median one (`choose_route`).

Only inference is accelerated: a layer in eval mode with autograd off (`torch.no_grad()`, `torch.inference_mode()`).
Training runs the reference code: a route for the backward pass did not pay on both CPU families (see the README's
Performance section). Every route computes the same function as the reference code, to float32 rounding. The predicate
also steps aside, so the reference code runs, for anything the routes were not measured for or would change: other
dtypes or devices, autocast, torch.compile / export / jit / fx tracing, Python dispatch and function modes (FLOP
counters, fake tensors), torch.func transforms, hooks on the layer's submodules, projections that are not plain
`nn.Linear` (quantized, LoRA-wrapped), attention maps requested and attention implementations other than eager/SDPA.
`model.set_cpu_acceleration(False)` gives the reference code everywhere.
"""

import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_hooks
from transformers.activations import GELUActivation
from transformers.utils import logging

logger = logging.get_logger(__name__)


def onednn_linear_available() -> bool:
    """Whether this PyTorch build has oneDNN's linear kernel (x86-64 builds with oneDNN)."""
    return (
        platform.machine().lower() in ("x86_64", "amd64")
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


ONEDNN_LINEAR = onednn_linear_available()
_state = threading.local()  # `reference`: True while a route runs the layer's own code


def _last_level_cache_bytes() -> int | None:
    """The largest CPU cache the OS reports for CPU 0 (Linux sysfs), in bytes."""
    sizes = []
    folder = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(folder):
            with open(os.path.join(folder, entry, "size")) as file:
                text = file.read().strip().upper()
            sizes.append(int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1))
    except (OSError, ValueError):
        return None
    return max(sizes, default=None)


# One block's MLP activation takes a quarter of the last-level cache, leaving room for the weights and the block's
# other tensors (8 MiB with a 32 MiB L3; where the OS does not say, that same 8 MiB).
TOKEN_BLOCK_BYTES = (_last_level_cache_bytes() or 32 * 2**20) // 4


def _hooked(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    )


def _global_hooks() -> bool:
    return bool(
        module_hooks._global_forward_hooks
        or module_hooks._global_forward_pre_hooks
        or module_hooks._global_backward_hooks
        or module_hooks._global_backward_pre_hooks
    )


def _submodules(module: nn.Module) -> list[nn.Module]:
    """Every module below `module`. `module.modules()` does the same at several times the cost (a generator that
    tracks duplicates); the predicate runs on every layer call, so its cost is paid on every forward."""
    found, pending = [], list(module._modules.values())
    while pending:
        child = pending.pop()
        if child is not None:
            found.append(child)
            pending.extend(child._modules.values())
    return found


def _plain_float32_linear(module: nn.Module) -> bool:
    """A plain `nn.Linear` with float32 parameters: the routes read its weight and bias directly (not a quantized,
    adapter-wrapped or tensor-subclass projection)."""
    return type(module) is nn.Linear and all(
        parameter is None or (type(parameter) is nn.Parameter and parameter.dtype == torch.float32)
        for parameter in module._parameters.values()
    )


def _projections(layer: nn.Module) -> tuple[nn.Module, ...]:
    """The layer's six projections, looked up in the module dictionaries (attribute access to a submodule goes
    through `nn.Module.__getattr__`, which costs several times more on every forward)."""
    attention, mlp = layer._modules["attention"], layer._modules["mlp"]
    self_attention = attention._modules["self"]
    return (
        self_attention._modules["query"],
        self_attention._modules["key"],
        self_attention._modules["value"],
        attention._modules["output"]._modules["dense"],
        mlp._modules["dense1"],
        mlp._modules["dense2"],
    )


def fast_path_applies(layer: nn.Module, hidden_states: torch.Tensor) -> bool:
    """Whether `layer` (a `PvtLayer`) may run through `fastest_layer_forward` for this input (see the module doc).
    Cheapest checks first: this runs on every layer call."""
    if torch.is_grad_enabled() or layer.training or not layer.cpu_acceleration or not ONEDNN_LINEAR:
        return False
    if not (
        hidden_states.device.type == "cpu"
        and hidden_states.dtype == torch.float32
        and type(hidden_states) is torch.Tensor
    ):
        return False
    if (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.is_autocast_enabled("cpu")
        or torch.fx._symbolic_trace.is_fx_symbolic_tracing()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._functorch.peek_interpreter_stack() is not None
        or getattr(_state, "reference", False)
    ):
        return False
    if not all(_plain_float32_linear(projection) for projection in _projections(layer)):
        return False
    kept = measured_routes.get(_route_key(layer, hidden_states))
    if kept is not None and kept[0] == "reference":
        return False  # measured: no route pays for this shape here, so the layer's own code runs, as it is
    return (
        layer.attention.self.config._attn_implementation in ("eager", "sdpa")
        and not _global_hooks()
        and not any(_hooked(module) for module in _submodules(layer))
    )


# ------------------------------------------------------------------------------------------ oneDNN products
def _onednn_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight as oneDNN takes it fast: contiguous or a transposed contiguous matrix (a weight with padded rows
    sends oneDNN down a path about a thousand times slower)."""
    if weight.is_contiguous() or weight.t().is_contiguous():
        return weight
    return weight.contiguous()


def linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` by oneDNN (no autograd)."""
    return torch.ops.mkldnn._linear_pointwise(inputs, _onednn_weight(weight), bias, "none", [], "")


def linear_gelu(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.gelu(F.linear(...))` (exact GELU) by oneDNN, the activation applied inside the product (no autograd)."""
    return torch.ops.mkldnn._linear_pointwise(inputs, _onednn_weight(weight), bias, "gelu", [], "none")


def linear_add(
    inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    """`residual + F.linear(...)` by oneDNN, the addition applied inside the product (no autograd)."""
    return torch.ops.mkldnn._linear_pointwise.binary(inputs, residual, _onednn_weight(weight), bias, "add")


# ------------------------------------------------------------------------------------------ the routes
def _reference(layer: nn.Module, hidden_states: torch.Tensor, height: int, width: int) -> torch.Tensor:
    _state.reference = True
    try:
        return layer.forward(hidden_states, height, width)[0]
    finally:
        _state.reference = False


def token_blocks(batch_size: int, num_tokens: int, tokens_per_block: int) -> list[tuple[slice, slice]]:
    """`(images, tokens)` slices covering a batch, each a block of about `tokens_per_block` tokens: whole images
    grouped while they are small, equal token ranges of one image otherwise."""
    if tokens_per_block >= num_tokens:
        images_per_block = tokens_per_block // num_tokens
        return [
            (slice(start, min(start + images_per_block, batch_size)), slice(None))
            for start in range(0, batch_size, images_per_block)
        ]
    tokens_per_block = math.ceil(num_tokens / math.ceil(num_tokens / tokens_per_block))
    return [
        (slice(image, image + 1), slice(start, min(start + tokens_per_block, num_tokens)))
        for image in range(batch_size)
        for start in range(0, num_tokens, tokens_per_block)
    ]


def _fused(
    layer: nn.Module, hidden_states: torch.Tensor, height: int, width: int, tokens_per_block: int
) -> torch.Tensor:
    """The layer in eval mode (dropout and drop-path are identities) by oneDNN's fused products, `tokens_per_block`
    tokens at a time. Keys and values come from the spatially reduced sequence of each whole image, computed first."""
    attention, projection, mlp = layer.attention.self, layer.attention.output.dense, layer.mlp
    normalized = layer.layer_norm_1(hidden_states)
    reduced = attention.reduce_sequence(normalized, height, width)
    key = attention.split_heads(linear(reduced, attention.key.weight, attention.key.bias))
    value = attention.split_heads(linear(reduced, attention.value.weight, attention.value.bias))
    exact_gelu = isinstance(mlp.intermediate_act_fn, GELUActivation) and mlp.intermediate_act_fn.act is F.gelu

    # Each step is its own function so that its temporaries (queries, attention output, normalised tokens) are freed
    # when it returns: at detection sizes they are tens of megabytes each.
    def attend(images: slice, tokens: slice) -> torch.Tensor:
        query = attention.split_heads(linear(normalized[images, tokens], attention.query.weight, attention.query.bias))
        attended = F.scaled_dot_product_attention(query, key[images], value[images], scale=attention.scaling)
        return attended.transpose(1, 2).flatten(2)

    def expand(block: torch.Tensor) -> torch.Tensor:
        if exact_gelu:
            return linear_gelu(layer.layer_norm_2(block), mlp.dense1.weight, mlp.dense1.bias)
        return mlp.intermediate_act_fn(linear(layer.layer_norm_2(block), mlp.dense1.weight, mlp.dense1.bias))

    def block_output(images: slice, tokens: slice) -> torch.Tensor:
        block = linear_add(attend(images, tokens), projection.weight, projection.bias, hidden_states[images, tokens])
        return linear_add(expand(block), mlp.dense2.weight, mlp.dense2.bias, block)

    blocks = token_blocks(*hidden_states.shape[:2], tokens_per_block)
    if len(blocks) == 1:
        return block_output(*blocks[0])
    output = torch.empty_like(hidden_states, memory_format=torch.contiguous_format)
    for images, tokens in blocks:
        output[images, tokens] = block_output(images, tokens)
    return output


def _fused_whole(layer: nn.Module, hidden_states: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return _fused(layer, hidden_states, height, width, hidden_states.shape[0] * hidden_states.shape[1])


def _fused_token_blocks(layer: nn.Module, hidden_states: torch.Tensor, height: int, width: int) -> torch.Tensor:
    # One block's MLP activation takes `TOKEN_BLOCK_BYTES`.
    tokens_per_block = TOKEN_BLOCK_BYTES // (layer.mlp.dense1.out_features * hidden_states.element_size())
    return _fused(layer, hidden_states, height, width, max(1, tokens_per_block))


ROUTES: dict[str, Callable[[nn.Module, torch.Tensor, int, int], torch.Tensor]] = {
    "reference": _reference,
    "fused": _fused_whole,
    "fused_token_blocks": _fused_token_blocks,
}
# Another route replaces the reference code only when it was faster in every timed round, and by this factor in the
# median round.
MIN_GAIN = 1.03
# Rounds of the measurement: each runs every route once, the order reversed every round; the first only warms up
# (kernel set-up, allocations).
MEASUREMENT_ROUNDS = 7


def choose_route(seconds: dict[str, list[float]]) -> str:
    """The route to keep, from per-round timings (`seconds[route][round]`): another route than the reference only if
    it was faster than the reference in every round and by `MIN_GAIN` in the median round, so that noise or another
    process's burst does not make a layer slower; among such routes, the fastest by median."""
    reference = seconds["reference"]

    def clearly_faster(times: list[float]) -> bool:
        gains = [baseline / taken for taken, baseline in zip(times, reference)]
        return bool(gains) and min(gains) > 1.0 and statistics.median(gains) >= MIN_GAIN

    winners = [name for name, times in seconds.items() if name != "reference" and clearly_faster(times)]
    return min(winners, key=lambda name: statistics.median(seconds[name]), default="reference")


# per (layer shape, input size): the route kept, with the median seconds of every route
measured_routes: dict[tuple, tuple[str, dict[str, float]]] = {}


def _route_key(layer: nn.Module, hidden_states: torch.Tensor) -> tuple:
    # module dictionaries rather than attributes: this runs on every layer call (see `_projections`)
    attention = layer._modules["attention"]._modules["self"]
    batch_size, num_tokens, hidden_size = hidden_states.shape
    return (
        hidden_size,
        attention.num_attention_heads,
        attention.sequences_reduction_ratio,
        layer._modules["mlp"]._modules["dense1"].out_features,
        batch_size,
        round(math.log2(num_tokens)),  # inputs of similar size share one measurement
    )


def _measure(layer: nn.Module, hidden_states: torch.Tensor, height: int, width: int) -> dict[str, list[float]]:
    """Seconds of every route on this input, per round after the warm-up round (`seconds[route][round]`)."""
    seconds = {name: [] for name in ROUTES}
    for round_index in range(MEASUREMENT_ROUNDS):
        for name in list(ROUTES) if round_index % 2 == 0 else list(reversed(ROUTES)):
            start = time.perf_counter()
            ROUTES[name](layer, hidden_states, height, width)
            if round_index:
                seconds[name].append(time.perf_counter() - start)
    return seconds


def fastest_layer_forward(layer: nn.Module, hidden_states: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`layer`'s output tokens by the route measured fastest for its shape and this input size on this machine. The
    first call of a shape and size measures the routes on its input before answering, so every call, the first one
    included, gives the output of the route kept: repeated calls give identical results."""
    key = _route_key(layer, hidden_states)
    if key not in measured_routes:
        seconds = _measure(layer, hidden_states, height, width)
        medians = {name: statistics.median(times) for name, times in seconds.items()}
        measured_routes[key] = (choose_route(seconds), medians)
        logger.debug("PVT layer %s on CPU: %s (median seconds per route %s)", key, *measured_routes[key])
    return ROUTES[measured_routes[key][0]](layer, hidden_states, height, width)
