"""Faster CPU execution of a `PvtLayer`, used only where it was measured faster on the machine at hand.

`modeling_pvt.py` is the reference implementation. A layer asks `fast_path_applies` (the one predicate) whether it
may run through this module; if so, `fastest_layer_forward` runs it by the route that a one-time measurement on this
machine found fastest for that layer shape and input size (cached per process):

- `reference`: the layer's own code, unchanged;
- `onednn_products`: the same code with the float32 matrix products of its `nn.Linear`s (forward and backward) run by
  oneDNN instead of PyTorch's BLAS. Which of the two GEMM libraries is faster depends on the CPU: on an AVX-512 AMD
  EPYC oneDNN ran about twice MKL's rate, on AVX2 CPUs MKL is usually ahead; the measurement decides;
- `token_blocks` (inference only): the layer a cache-sized block of tokens at a time (everything but the spatial
  reduction works token by token), with bias, GELU and residual additions fused into oneDNN's products. The MLP's
  wide activation then stays in cache, and temporaries stay small (a quarter of the peak memory at detection sizes).

Every route computes the same function as the reference code, to float32 rounding. The predicate steps aside, so the
reference code runs, for anything the routes were not measured for or would break: other dtypes or devices,
autocast, torch.compile / export / jit / fx tracing, Python dispatch and function modes (FLOP counters, fake
tensors), torch.func transforms, hooks on the layer's submodules, projections that are not plain `nn.Linear`
(quantized, LoRA-wrapped), attention maps requested, attention implementations other than eager/SDPA, and gradient
checkpointing. Backward passes stay differentiable: under `create_graph=True` they use PyTorch's own operators.
`model.set_cpu_acceleration(False)` gives the reference code everywhere.
"""

import math
import os
import platform
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.overrides import TorchFunctionMode
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


def _projections(layer: nn.Module) -> tuple[nn.Module, ...]:
    attention = layer.attention.self
    return (
        attention.query,
        attention.key,
        attention.value,
        layer.attention.output.dense,
        layer.mlp.dense1,
        layer.mlp.dense2,
    )


def fast_path_applies(layer: nn.Module, hidden_states: torch.Tensor) -> bool:
    """Whether `layer` (a `PvtLayer`) may run through `fastest_layer_forward` for this input (see the module doc)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    return (
        ONEDNN_LINEAR
        and layer.cpu_acceleration
        and not getattr(_state, "reference", False)
        and hidden_states.device.type == "cpu"
        and hidden_states.dtype == torch.float32
        and type(hidden_states) is torch.Tensor
        and not torch.is_autocast_enabled("cpu")
        and not torch.fx._symbolic_trace.is_fx_symbolic_tracing()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
        and torch._C._functorch.peek_interpreter_stack() is None
        and not (layer.gradient_checkpointing and torch.is_grad_enabled())
        and layer.attention.self.config._attn_implementation in ("eager", "sdpa")
        and all(type(projection) is nn.Linear for projection in _projections(layer))
        and all(type(p) is nn.Parameter and p.dtype == torch.float32 for p in layer.parameters())
        and not _global_hooks()
        and not any(_hooked(module) for module in layer.modules() if module is not layer)
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


def _weight_gradient(grad_rows: torch.Tensor, input_rows: torch.Tensor) -> torch.Tensor:
    """`grad_rows^T @ input_rows` by oneDNN, whose fast layout has the narrower matrix as the input read transposed."""
    if grad_rows.shape[1] <= input_rows.shape[1]:
        return linear(grad_rows.t(), input_rows.t())
    return linear(input_rows.t(), grad_rows.t()).t()


class OneDnnLinear(torch.autograd.Function):
    """`F.linear` whose products run through oneDNN. Under `create_graph=True` the backward pass uses PyTorch's
    differentiable operators, so gradients of gradients work."""

    @staticmethod
    def forward(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return linear(inputs, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[0], inputs[1])
        ctx.has_bias = inputs[2] is not None

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        inputs, weight = ctx.saved_tensors
        grad_rows = grad_output.reshape(-1, grad_output.shape[-1])
        input_rows = inputs.reshape(-1, inputs.shape[-1])
        differentiable = torch.is_grad_enabled()
        grad_inputs = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_inputs = grad_output @ weight if differentiable else linear(grad_output, weight.t())
        if ctx.needs_input_grad[1]:
            grad_weight = grad_rows.t() @ input_rows if differentiable else _weight_gradient(grad_rows, input_rows)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)
        return grad_inputs, grad_weight, grad_bias


class _OneDnnProducts(TorchFunctionMode):
    """Runs every float32 CPU `F.linear` called inside it through oneDNN (`OneDnnLinear`)."""

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        if func is F.linear and not kwargs:
            inputs, weight, bias = (*args, None)[:3]
            if inputs.dtype == weight.dtype == torch.float32 and inputs.device.type == "cpu":
                needs_grad = torch.is_grad_enabled() and any(
                    tensor is not None and tensor.requires_grad for tensor in (inputs, weight, bias)
                )
                return OneDnnLinear.apply(inputs, weight, bias) if needs_grad else linear(inputs, weight, bias)
        return func(*args, **kwargs)


# ------------------------------------------------------------------------------------------ the routes
def _reference(layer: nn.Module, hidden_states: torch.Tensor, height: int, width: int) -> torch.Tensor:
    _state.reference = True
    try:
        return layer.forward(hidden_states, height, width)[0]
    finally:
        _state.reference = False


def _onednn_products(layer: nn.Module, hidden_states: torch.Tensor, height: int, width: int) -> torch.Tensor:
    with _OneDnnProducts():
        return _reference(layer, hidden_states, height, width)


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


@torch.no_grad()
def _token_blocks(layer: nn.Module, hidden_states: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The layer for inference, a block of tokens at a time (eval mode: dropout and drop-path are identities)."""
    attention, projection, mlp = layer.attention.self, layer.attention.output.dense, layer.mlp
    normalized = layer.layer_norm_1(hidden_states)
    reduced = attention.reduce_sequence(normalized, height, width)
    key = attention.split_heads(linear(reduced, attention.key.weight, attention.key.bias))
    value = attention.split_heads(linear(reduced, attention.value.weight, attention.value.bias))
    exact_gelu = isinstance(mlp.intermediate_act_fn, GELUActivation) and mlp.intermediate_act_fn.act is F.gelu
    output = torch.empty_like(hidden_states, memory_format=torch.contiguous_format)
    tokens_per_block = max(1, TOKEN_BLOCK_BYTES // (mlp.dense1.out_features * hidden_states.element_size()))
    for images, tokens in token_blocks(*hidden_states.shape[:2], tokens_per_block):
        query = attention.split_heads(linear(normalized[images, tokens], attention.query.weight, attention.query.bias))
        attended = F.scaled_dot_product_attention(query, key[images], value[images], scale=attention.scaling)
        block = linear_add(
            attended.transpose(1, 2).flatten(2), projection.weight, projection.bias, hidden_states[images, tokens]
        )
        normalized_block = layer.layer_norm_2(block)
        if exact_gelu:
            expanded = linear_gelu(normalized_block, mlp.dense1.weight, mlp.dense1.bias)
        else:
            expanded = mlp.intermediate_act_fn(linear(normalized_block, mlp.dense1.weight, mlp.dense1.bias))
        output[images, tokens] = linear_add(expanded, mlp.dense2.weight, mlp.dense2.bias, block)
    return output


ROUTES: dict[str, Callable[[nn.Module, torch.Tensor, int, int], torch.Tensor]] = {
    "reference": _reference,
    "onednn_products": _onednn_products,
    "token_blocks": _token_blocks,
}
# A route other than the reference must be at least this much faster in the measurement to be chosen.
MIN_GAIN = 1.03
# route chosen per (layer shape, mode, input size), with the measured seconds of every candidate
measured_routes: dict[tuple, tuple[str, dict[str, float]]] = {}


def _candidates(layer: nn.Module) -> tuple[str, ...]:
    inference = not (layer.training or torch.is_grad_enabled())
    return ("reference", "onednn_products", "token_blocks") if inference else ("reference", "onednn_products")


def _route_key(layer: nn.Module, hidden_states: torch.Tensor) -> tuple:
    attention = layer.attention.self
    batch_size, num_tokens, hidden_size = hidden_states.shape
    return (
        hidden_size,
        attention.num_attention_heads,
        attention.sequences_reduction_ratio,
        layer.mlp.dense1.out_features,
        layer.training,
        torch.is_grad_enabled(),
        batch_size,
        round(math.log2(num_tokens)),  # inputs of similar size share one measurement
    )


def _time_route(name: str, layer: nn.Module, hidden_states: torch.Tensor, height: int, width: int) -> float:
    """Seconds for one run of a route: forward, plus backward when autograd records (into no `.grad`)."""
    start = time.perf_counter()
    if torch.is_grad_enabled():
        inputs = hidden_states.detach().requires_grad_()
        output = ROUTES[name](layer, inputs, height, width)
        wrt = [inputs, *(p for p in layer.parameters() if p.requires_grad)]
        torch.autograd.grad(output, wrt, torch.ones_like(output), allow_unused=True)
    else:
        ROUTES[name](layer, hidden_states, height, width)
    return time.perf_counter() - start


def _measure(layer: nn.Module, hidden_states: torch.Tensor, height: int, width: int) -> tuple[str, dict[str, float]]:
    """Time every candidate route on this input: a warm-up round (kernel set-up, allocations), then the best of three
    alternating rounds (the minimum discounts other processes' interference). Another route replaces the reference
    code only when it is clearly faster (`MIN_GAIN`), so measurement noise cannot make a layer slower. Random streams
    (dropout, drop-path) are left as they were."""
    candidates = _candidates(layer)
    seconds = dict.fromkeys(candidates, math.inf)
    with torch.random.fork_rng(devices=[]):
        for round_index in range(4):
            for name in candidates if round_index % 2 else reversed(candidates):
                elapsed = _time_route(name, layer, hidden_states, height, width)
                if round_index:
                    seconds[name] = min(seconds[name], elapsed)
    fastest = min(seconds, key=seconds.get)
    return (fastest if seconds[fastest] * MIN_GAIN < seconds["reference"] else "reference"), seconds


def fastest_layer_forward(layer: nn.Module, hidden_states: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`layer`'s output tokens by the route measured fastest for its shape and this input size on this machine."""
    key = _route_key(layer, hidden_states)
    if key not in measured_routes:
        measured_routes[key] = _measure(layer, hidden_states, height, width)
        logger.info("PVT layer %s on CPU: %s (seconds per route %s)", key, *measured_routes[key])
    return ROUTES[measured_routes[key][0]](layer, hidden_states, height, width)
