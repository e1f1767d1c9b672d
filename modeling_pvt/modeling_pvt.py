"""PyTorch Pyramid Vision Transformer (PVT v1, arXiv 2102.12122).

State-dict keys and config fields are those of transformers' built-in `pvt` model type, so checkpoints move freely
between the two. Differences from the built-in port: the numerics of the original code (LayerNorm epsilons), any
input size (position embeddings are resized), attention through transformers' attention interface (SDPA by default),
fewer layout copies, a `PvtBackbone` for dense prediction and gradient checkpointing.

On CPU (eager mode) three things make it faster than the built-in port without changing what it computes:
the projections run through oneDNN's matrix products (`PvtLinear`; PyTorch's BLAS takes a slower code path on some
CPUs), inference runs each layer a cache-sized block of tokens at a time with bias, GELU and residual additions fused
into the products and, where the spatial reduction leaves few keys, the query and output projections folded into the
keys and values (`PvtLayer.forward_in_chunks`), and training runs the MLP by blocks (`TokenChunkedMLP`). Results
match the straightforward code to float32 rounding; `set_onednn_linear(False)` and `set_token_chunk_bytes(None)` give
the straightforward code back. Under torch.compile, tracing or on GPUs the model is the straightforward code.
"""

import math
import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN, GELUActivation
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput, BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import ModelOutput, logging

from .configuration_pvt import PvtConfig

logger = logging.get_logger(__name__)

# What a saved folder maps to this code for `trust_remote_code=True` (each name is `<file>.<class>`).
HUB_AUTO_MAP = {
    "AutoConfig": "configuration_pvt.PvtConfig",
    "AutoModel": "modeling_pvt.PvtModel",
    "AutoModelForImageClassification": "modeling_pvt.PvtForImageClassification",
    "AutoBackbone": "modeling_pvt.PvtBackbone",
    "AutoImageProcessor": "image_processing_pvt.PvtImageProcessor",
}


# Costs in multiply-add equivalents for choosing between attention routes (`folding_pays_off`), measured on
# PVT-small on 2 cores of an AMD EPYC: the fused attention kernel with a few dozen keys per query runs at about a
# quarter of the rate of a matrix product, and one more operator call costs about as much as 3M multiply-adds.
ATTENTION_KERNEL_COST = 4
CALL_COST = 3_000_000
# Folding materialises a block's attention scores (queries x heads*keys); with more keys than this the fused kernel is
# efficient again and the scores would cost memory (e.g. 950 keys per query in stage 1 at 800x1216: not folded).
MAX_FOLDED_KEYS = 256

# A block of tokens whose MLP activation is this large stays in the CPU's last-level cache between the two MLP
# products; measured fastest on 2 cores of an AMD EPYC (4 and 16 MiB were within 2-5%, 1 MiB 20% slower).
DEFAULT_TOKEN_CHUNK_BYTES = 8 * 2**20


def tokens_to_feature_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`(batch, height*width, channels)` tokens as a `(batch, channels, height, width)` map, without a copy.

    The result is a channels-last view, which convolutions consume directly.
    """
    return tokens.unflatten(1, (height, width)).permute(0, 3, 1, 2)


def feature_map_to_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """`(batch, channels, height, width)` as `(batch, height*width, channels)`; free for channels-last maps."""
    return feature_map.flatten(2).transpose(1, 2)


class PvtPatchEmbeddings(nn.Module):
    """Strided convolution + LayerNorm + learned position embeddings (resized to the input's grid when it differs)."""

    def __init__(self, config: PvtConfig, stage: int, use_class_token: bool = True):
        super().__init__()
        in_channels = config.num_channels if stage == 0 else config.hidden_sizes[stage - 1]
        hidden_size = config.hidden_sizes[stage]
        downsampling = math.prod(config.patch_sizes[: stage + 1])
        self.grid_size = tuple(side // downsampling for side in config.image_hw)
        is_last_stage = stage == config.num_encoder_blocks - 1
        # The last stage stores a position embedding for the class token first, even where it is not used.
        num_positions = self.grid_size[0] * self.grid_size[1] + int(is_last_stage)
        self.num_channels = in_channels
        self.projection = nn.Conv2d(
            in_channels, hidden_size, kernel_size=config.strides[stage], stride=config.patch_sizes[stage]
        )
        self.layer_norm = nn.LayerNorm(hidden_size, eps=config.conv_layer_norm_eps)
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_positions, hidden_size))
        self.has_class_position = is_last_stage
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size)) if is_last_stage and use_class_token else None
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings of the patch tokens for a `height` x `width` grid (bilinear, as the original code)."""
        position_embeddings = self.position_embeddings[:, 1:] if self.has_class_position else self.position_embeddings
        if (height, width) == self.grid_size:
            return position_embeddings
        grid = tokens_to_feature_map(position_embeddings, *self.grid_size)
        grid = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
        return feature_map_to_tokens(grid)

    def forward(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        if feature_map.shape[1] != self.num_channels:
            raise ValueError(
                f"Expected {self.num_channels} input channels, got {feature_map.shape[1]} "
                f"(input of shape {tuple(feature_map.shape)})."
            )
        feature_map = self.projection(feature_map)
        height, width = feature_map.shape[-2:]
        embeddings = self.layer_norm(feature_map_to_tokens(feature_map))
        position_embeddings = self.interpolate_pos_encoding(height, width)
        if self.cls_token is not None:
            embeddings = torch.cat((self.cls_token.expand(embeddings.shape[0], -1, -1), embeddings), dim=1)
            position_embeddings = torch.cat((self.position_embeddings[:, :1], position_embeddings), dim=1)
        return self.dropout(embeddings + position_embeddings), height, width


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention as written in the paper; returns `(batch, tokens, heads, head_dim)` and the attention maps."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probabilities = scores.softmax(dim=-1)
    attended = torch.matmul(F.dropout(probabilities, p=dropout, training=module.training), value)
    return attended.transpose(1, 2), probabilities


# ------------------------------------------------------------------------------------------ CPU matrix products
# PyTorch runs float32 `nn.Linear` on CPUs through its BLAS (MKL in the x86 wheels), which takes its AVX2 code path on
# AMD processors; oneDNN, which PyTorch already uses for convolutions, picks its kernels by instruction set and ran
# the same products 2-2.3x faster on an AMD EPYC with AVX-512 (float32 throughout, no reduced precision). PVT spends
# about three quarters of its time in these products, so on x86-64 CPUs `PvtLinear` runs them through oneDNN, in the
# forward and the backward pass. `PvtPreTrainedModel.set_onednn_linear(False)` switches back to `F.linear`.


def onednn_linear_available() -> bool:
    """Whether this PyTorch build has oneDNN's linear kernel (x86-64 builds with oneDNN)."""
    return (
        platform.machine().lower() in ("x86_64", "amd64")
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


_ONEDNN_LINEAR = onednn_linear_available()


def _tracing() -> bool:
    """torch.compile / torch.export or torch.jit.trace is recording the model: give it the standard operators."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _python_dispatch_mode_active() -> bool:
    """A Python dispatch mode (FLOP counter, fake tensors) is active; never asked while torch.compile traces."""
    return not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() > 0


def _onednn_applies(inputs: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN for float32/bfloat16 CPU tensors in eager mode. Under torch.compile the compiler picks its own kernels;
    under CPU autocast `F.linear` follows the autocast dtype; under a Python dispatch mode (FLOP counting, fake
    tensors) the standard operators are what the mode knows how to handle."""
    return (
        _ONEDNN_LINEAR
        and inputs.device.type == "cpu"
        and weight.device.type == "cpu"
        and inputs.dtype in (torch.float32, torch.bfloat16)
        and weight.dtype == inputs.dtype
        and not _tracing()
        and not torch.is_autocast_enabled("cpu")
        and not _python_dispatch_mode_active()
    )


def _onednn_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight as oneDNN takes it fast: contiguous or a transposed contiguous matrix. (A weight with padded rows,
    e.g. one head's columns of a projection, sends oneDNN down a path about a thousand times slower.)"""
    if weight.is_contiguous() or weight.t().is_contiguous():
        return weight
    return weight.contiguous()


def matmul_nt(
    inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, use_onednn: bool = True
) -> torch.Tensor:
    """`inputs @ weight^T + bias` (`F.linear`, no autograd)."""
    if use_onednn and _onednn_applies(inputs, weight):
        return torch.ops.mkldnn._linear_pointwise(inputs, _onednn_weight(weight), bias, "none", [], "")
    return F.linear(inputs, weight, bias)


def matmul_nn(inputs: torch.Tensor, matrix: torch.Tensor, use_onednn: bool = True) -> torch.Tensor:
    """`inputs @ matrix` (no autograd)."""
    return matmul_nt(inputs, matrix.t(), None, use_onednn)


def matmul_tn(left: torch.Tensor, right: torch.Tensor, use_onednn: bool = True) -> torch.Tensor:
    """`left^T @ right` for two `(rows, ·)` matrices: the weight gradient of a linear layer (no autograd)."""
    if not (use_onednn and _onednn_applies(left, right)):
        return left.t() @ right
    # oneDNN is fast when its input is the narrower matrix, read transposed, and its weight the wider one.
    if left.shape[1] <= right.shape[1]:
        return torch.ops.mkldnn._linear_pointwise(left.t(), _onednn_weight(right.t()), None, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise(right.t(), _onednn_weight(left.t()), None, "none", [], "").t()


def matmul_nt_add(
    inputs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    use_onednn: bool = True,
) -> torch.Tensor:
    """`residual + inputs @ weight^T + bias` (no autograd), the addition fused into oneDNN's product."""
    if use_onednn and _onednn_applies(inputs, weight) and residual.dtype == inputs.dtype:
        return torch.ops.mkldnn._linear_pointwise.binary(inputs, residual, _onednn_weight(weight), bias, "add")
    return F.linear(inputs, weight, bias).add_(residual)


class OneDnnLinear(torch.autograd.Function):
    """`F.linear` whose forward and backward products run through oneDNN (`matmul_nt`, `matmul_nn`, `matmul_tn`)."""

    @staticmethod
    def forward(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return matmul_nt(inputs, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[0], inputs[1])
        ctx.has_bias = inputs[2] is not None

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        inputs, weight = ctx.saved_tensors
        rows = grad_output.reshape(-1, grad_output.shape[-1])
        grad_inputs = matmul_nn(grad_output, weight) if ctx.needs_input_grad[0] else None
        grad_weight = matmul_tn(rows, inputs.reshape(-1, inputs.shape[-1])) if ctx.needs_input_grad[1] else None
        grad_bias = rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_inputs, grad_weight, grad_bias


class PvtLinear(nn.Linear):
    """`nn.Linear` (same parameters, same state-dict keys) whose CPU products go through oneDNN where available.

    `use_onednn = False` makes it a plain `nn.Linear`. `project` and `project_add` are the fused forms that the
    chunked inference path uses (bias and GELU, or bias and a residual, applied inside the product)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.use_onednn = True

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if not (self.use_onednn and _onednn_applies(inputs, self.weight)):
            return F.linear(inputs, self.weight, self.bias)
        parameters = (self.weight,) if self.bias is None else (self.weight, self.bias)
        if torch.is_grad_enabled() and (inputs.requires_grad or any(p.requires_grad for p in parameters)):
            return OneDnnLinear.apply(inputs, self.weight, self.bias)
        return matmul_nt(inputs, self.weight, self.bias)

    @torch.no_grad()
    def project(self, inputs: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """`activation(self(inputs))` for inference, the exact GELU fused into oneDNN's product."""
        if activation is not None and _is_exact_gelu(activation) and self.use_onednn:
            if _onednn_applies(inputs, self.weight):
                return torch.ops.mkldnn._linear_pointwise(inputs, self.weight, self.bias, "gelu", [], "none")
        projected = self(inputs)
        return projected if activation is None else activation(projected)

    @torch.no_grad()
    def project_add(self, inputs: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """`residual + self(inputs)` for inference, the addition fused into oneDNN's product."""
        return matmul_nt_add(inputs, self.weight, self.bias, residual, self.use_onednn)


class PvtEfficientSelfAttention(nn.Module):
    """Spatial-reduction attention: queries from every token, keys and values from the map shrunk R times."""

    def __init__(self, config: PvtConfig, hidden_size: int, num_attention_heads: int, sequences_reduction_ratio: int):
        super().__init__()
        self.config = config
        self.num_attention_heads = num_attention_heads
        self.attention_head_size = hidden_size // num_attention_heads
        self.scaling = self.attention_head_size**-0.5
        self.is_causal = False
        self.query = PvtLinear(hidden_size, hidden_size, bias=config.qkv_bias)
        self.key = PvtLinear(hidden_size, hidden_size, bias=config.qkv_bias)
        self.value = PvtLinear(hidden_size, hidden_size, bias=config.qkv_bias)
        self.sequences_reduction_ratio = sequences_reduction_ratio
        if sequences_reduction_ratio > 1:
            self.sequence_reduction = nn.Conv2d(
                hidden_size, hidden_size, kernel_size=sequences_reduction_ratio, stride=sequences_reduction_ratio
            )
            self.layer_norm = nn.LayerNorm(hidden_size, eps=config.conv_layer_norm_eps)

    def split_heads(self, projected: torch.Tensor) -> torch.Tensor:
        return projected.unflatten(-1, (self.num_attention_heads, self.attention_head_size)).transpose(1, 2)

    def keys_and_values(
        self, hidden_states: torch.Tensor, height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `(batch, heads, reduced tokens, head_dim)` from the (spatially reduced) token map."""
        if self.sequences_reduction_ratio > 1:
            reduced = self.sequence_reduction(tokens_to_feature_map(hidden_states, height, width))
            hidden_states = self.layer_norm(feature_map_to_tokens(reduced))
        return self.split_heads(self.key(hidden_states)), self.split_heads(self.value(hidden_states))

    def attend(
        self, hidden_states: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of the queries of `hidden_states` over `key`/`value`: `(batch, tokens, hidden)` and the maps."""
        query = self.split_heads(self.query(hidden_states))
        attention_interface: Callable = eager_attention_forward
        if self.config._attn_implementation not in (None, "eager") and not output_attentions:
            attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        attended, attention_maps = attention_interface(
            self,
            query,
            key,
            value,
            None,
            scaling=self.scaling,
            dropout=self.config.attention_probs_dropout_prob if self.training else 0.0,
            is_causal=False,
        )
        return attended.flatten(2), attention_maps

    def forward(
        self, hidden_states: torch.Tensor, height: int, width: int, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        key, value = self.keys_and_values(hidden_states, height, width)
        return self.attend(hidden_states, key, value, output_attentions)

    def folding_pays_off(
        self, batch_size: int, num_queries: int, num_keys: int, num_chunks: int, output_projection: nn.Module
    ) -> bool:
        """Whether `fold_projections` saves time in a layer run in `num_chunks` blocks (`PvtLayer.forward_in_chunks`).

        Per image the plain route does N C^2 + N C^2 multiply-adds (query and output projections) and 2 N M C in
        the attention kernel, which with so few keys per query runs at about a quarter of the matrix products' rate;
        the folded route does 2 N (hM) C in matrix products plus 2 M C^2 to fold. Calls are counted too: folding
        takes 2h+4 calls per layer and 3 per image instead of 3 per block. The constants were measured on PVT-small
        (2-core AMD EPYC); with them, the first two stages fold at 224x224 and the third only for larger batches.
        Only for exact softmax attention (eager or SDPA) through this module's own projections, and only with few
        keys (`MAX_FOLDED_KEYS`)."""
        batch, queries, keys, chunks = batch_size, num_queries, num_keys, num_chunks
        width, heads = self.num_attention_heads * self.attention_head_size, self.num_attention_heads
        plain = batch * (2 * queries * width * width + ATTENTION_KERNEL_COST * 2 * queries * keys * width)
        plain += 3 * chunks * CALL_COST
        folded = batch * (2 * queries * heads * keys * width + 2 * keys * width * width)
        folded += (2 * heads + 4 + 3 * batch) * CALL_COST
        return (
            self.config._attn_implementation in (None, "eager", "sdpa")
            and type(self.query) is PvtLinear
            and type(output_projection) is PvtLinear
            and heads * keys <= MAX_FOLDED_KEYS
            and folded < plain
        )

    @torch.no_grad()
    def fold_projections(
        self, key: torch.Tensor, value: torch.Tensor, output_projection: PvtLinear
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Per image, the query projection folded into the keys and the output projection into the values.

        Scores of head h: (x Wq_h^T + bq_h) K_h^T s = x (s K_h Wq_h)^T + s K_h bq_h, and the attended, projected
        output: sum_h P_h V_h Wo_h^T = P (V_h Wo_h^T stacked over heads). Returns `(batch, heads*keys, hidden)`
        score weights, `(batch, heads*keys)` score biases (or None) and `(batch, heads*keys, hidden)` value weights,
        so that a block of queries `x` of one image gets `softmax_per_head(x @ Ws^T + bs) @ Wv + bo + residual`:
        two matrix products instead of four. Same function, other rounding (products associated differently)."""
        batch_size, heads, num_keys, head_dim = key.shape
        use_onednn = self.query.use_onednn
        query_weight = self.query.weight.view(heads, head_dim, -1)
        output_weight = output_projection.weight.view(-1, heads, head_dim)
        score_weights, value_weights = [], []
        for head in range(heads):  # one product per head over every image's keys: (batch*keys, hidden)
            head_keys = key[:, head].reshape(-1, head_dim) * self.scaling
            head_values = value[:, head].reshape(-1, head_dim)
            score_weights.append(matmul_nn(head_keys, query_weight[head], use_onednn).view(batch_size, num_keys, -1))
            value_weights.append(
                matmul_nt(head_values, output_weight[:, head], None, use_onednn).view(batch_size, num_keys, -1)
            )
        score_weights = torch.stack(score_weights, 1).view(batch_size, heads * num_keys, -1)
        value_weights = torch.stack(value_weights, 1).view(batch_size, heads * num_keys, -1)
        score_biases = None
        if self.query.bias is not None:
            bias = self.query.bias.view(heads, 1, head_dim, 1)
            score_biases = (key.transpose(0, 1) @ bias).squeeze(-1).transpose(0, 1).reshape(batch_size, -1)
            score_biases = score_biases * self.scaling
        return score_weights, score_biases, value_weights


class PvtSelfOutput(nn.Module):
    def __init__(self, config: PvtConfig, hidden_size: int):
        super().__init__()
        self.dense = PvtLinear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(hidden_states))


class PvtAttention(nn.Module):
    def __init__(self, config: PvtConfig, hidden_size: int, num_attention_heads: int, sequences_reduction_ratio: int):
        super().__init__()
        self.self = PvtEfficientSelfAttention(config, hidden_size, num_attention_heads, sequences_reduction_ratio)
        self.output = PvtSelfOutput(config, hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, height: int, width: int, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, attention_maps = self.self(hidden_states, height, width, output_attentions)
        return self.output(attended), attention_maps


def _is_exact_gelu(activation: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    return isinstance(activation, GELUActivation) and activation.act is F.gelu


def _activation_backward(
    activation: Callable[[torch.Tensor], torch.Tensor], grad: torch.Tensor, pre_activation: torch.Tensor
) -> torch.Tensor:
    """Gradient through an elementwise `activation` at `pre_activation`: PyTorch's GELU derivative kernel for the
    exact GELU (PVT's), autograd on the recomputed activation for any other."""
    if _is_exact_gelu(activation):
        return torch.ops.aten.gelu_backward(grad, pre_activation)
    with torch.enable_grad():
        leaf = pre_activation.detach().requires_grad_()
        return torch.autograd.grad(activation(leaf), leaf, grad)[0]


class TokenChunkedMLP(torch.autograd.Function):
    """`activation(x @ W1^T + b1) @ W2^T + b2` on `(tokens, channels)` rows, for training.

    The plain MLP computes its 4-8x wider activation, and in the backward pass two wide gradients, as whole-batch
    tensors that go through main memory between every step (and, above 32 MiB, through freshly mapped pages with
    glibc's default allocator), and it keeps the activation for the backward pass. This one keeps only the input and
    the pre-activation; the activation, the second product and, in the backward pass, every wide gradient are
    computed a block of rows at a time, while the block is in cache, and the weight gradients are accumulated block by
    block. The matrix products are the plain MLP's (see `matmul_nt` and `matmul_tn` for how they are run).
    """

    @staticmethod
    def forward(
        hidden: torch.Tensor,
        weight1: torch.Tensor,
        bias1: torch.Tensor | None,
        weight2: torch.Tensor,
        bias2: torch.Tensor | None,
        activation: Callable[[torch.Tensor], torch.Tensor],
        rows_per_chunk: int,
        use_onednn: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The MLP output, and the pre-activation that the backward pass needs (not differentiable)."""
        pre_activation = matmul_nt(hidden, weight1, bias1, use_onednn)
        output = hidden.new_empty(hidden.shape[0], weight2.shape[0])
        for start in range(0, hidden.shape[0], rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            output[rows] = matmul_nt(activation(pre_activation[rows]), weight2, bias2, use_onednn)
        return output, pre_activation

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        hidden, weight1, bias1, weight2, bias2, activation, rows_per_chunk, use_onednn = inputs
        pre_activation = output[1]
        ctx.mark_non_differentiable(pre_activation)
        ctx.save_for_backward(hidden, pre_activation, weight1, weight2)
        ctx.activation, ctx.rows_per_chunk, ctx.use_onednn = activation, rows_per_chunk, use_onednn
        ctx.has_bias = (bias1 is not None, bias2 is not None)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor, _grad_pre_activation: None) -> tuple[torch.Tensor | None, ...]:
        hidden, pre_activation, weight1, weight2 = ctx.saved_tensors
        needs_hidden, needs_weight1, needs_bias1, needs_weight2, needs_bias2 = ctx.needs_input_grad[:5]
        use_onednn = ctx.use_onednn
        grad_output = grad_output.contiguous()
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight1 = torch.zeros_like(weight1) if needs_weight1 else None
        grad_weight2 = torch.zeros_like(weight2) if needs_weight2 else None
        grad_bias1 = weight1.new_zeros(weight1.shape[0]) if needs_bias1 and ctx.has_bias[0] else None
        grad_bias2 = grad_output.sum(0) if needs_bias2 and ctx.has_bias[1] else None
        for start in range(0, hidden.shape[0], ctx.rows_per_chunk):
            rows = slice(start, start + ctx.rows_per_chunk)
            block_grad_output, block_pre_activation = grad_output[rows], pre_activation[rows]
            if grad_weight2 is not None:
                # recomputing the activation of a block in cache costs less than keeping it for the whole batch
                grad_weight2 += matmul_tn(block_grad_output, ctx.activation(block_pre_activation), use_onednn)
            grad_activated = matmul_nn(block_grad_output, weight2, use_onednn)
            grad_pre_activation = _activation_backward(ctx.activation, grad_activated, block_pre_activation)
            if grad_weight1 is not None:
                grad_weight1 += matmul_tn(grad_pre_activation, hidden[rows], use_onednn)
            if grad_bias1 is not None:
                grad_bias1 += grad_pre_activation.sum(0)
            if grad_hidden is not None:
                grad_hidden[rows] = matmul_nn(grad_pre_activation, weight1, use_onednn)
        return grad_hidden, grad_weight1, grad_bias1, grad_weight2, grad_bias2, None, None, None


class PvtFFN(nn.Module):
    def __init__(self, config: PvtConfig, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.dense1 = PvtLinear(hidden_size, intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]
        self.dense2 = PvtLinear(intermediate_size, hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # Size of the wide activation of one block of tokens in the chunked code paths (`TokenChunkedMLP` and
        # `PvtLayer.forward_in_chunks`); 0 or None runs the straightforward whole-batch code.
        self.token_chunk_bytes = DEFAULT_TOKEN_CHUNK_BYTES

    def rows_per_chunk(self) -> int:
        bytes_per_row = self.dense1.out_features * self.dense1.weight.element_size()
        return max(1, self.token_chunk_bytes // bytes_per_row)

    def chunks_tokens(self, hidden_states: torch.Tensor) -> bool:
        """Whether the chunked code paths apply: chunking on, a CPU tensor (a GPU's cache is not the point there),
        eager execution (under torch.compile the straightforward code lets the compiler fuse what it likes), and
        the projections are this module's own (an adapter wrapped around them, e.g. LoRA, gets the plain code)."""
        return (
            bool(self.token_chunk_bytes)
            and hidden_states.device.type == "cpu"
            and not _tracing()
            and type(self.dense1) is PvtLinear
            and type(self.dense2) is PvtLinear
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # With autograd recording; without it, `PvtLayer.forward_in_chunks` handles the whole layer in eval mode.
        if self.chunks_tokens(hidden_states) and torch.is_grad_enabled() and not (self.training and self.dropout.p):
            rows = hidden_states.reshape(-1, hidden_states.shape[-1])
            output, _ = TokenChunkedMLP.apply(
                rows,
                self.dense1.weight,
                self.dense1.bias,
                self.dense2.weight,
                self.dense2.bias,
                self.intermediate_act_fn,
                self.rows_per_chunk(),
                self.dense1.use_onednn and self.dense2.use_onednn,
            )
            return output.view(*hidden_states.shape[:-1], output.shape[-1])
        hidden_states = self.dropout(self.intermediate_act_fn(self.dense1(hidden_states)))
        return self.dropout(self.dense2(hidden_states))


class PvtDropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample with probability `drop_prob` in training."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return hidden_states
        keep_prob = 1.0 - self.drop_prob
        mask_shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        keep = hidden_states.new_empty(mask_shape).bernoulli_(keep_prob)
        return hidden_states * keep.div_(keep_prob)

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class PvtLayer(GradientCheckpointingLayer):
    def __init__(
        self,
        config: PvtConfig,
        hidden_size: int,
        num_attention_heads: int,
        drop_path: float,
        sequences_reduction_ratio: int,
        mlp_ratio: float,
    ):
        super().__init__()
        self.layer_norm_1 = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.attention = PvtAttention(config, hidden_size, num_attention_heads, sequences_reduction_ratio)
        self.drop_path = PvtDropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.layer_norm_2 = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.mlp = PvtFFN(config, hidden_size, int(hidden_size * mlp_ratio))

    def forward(
        self, hidden_states: torch.Tensor, height: int, width: int, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Eval mode (dropout and drop-path are identities) and no autograd graph to record: one block at a time.
        chunked = not (self.training or torch.is_grad_enabled() or output_attentions or _python_dispatch_mode_active())
        if chunked and self.mlp.chunks_tokens(hidden_states) and type(self.attention.output.dense) is PvtLinear:
            return self.forward_in_chunks(hidden_states, height, width), None
        attended, attention_maps = self.attention(self.layer_norm_1(hidden_states), height, width, output_attentions)
        hidden_states = hidden_states + self.drop_path(attended)
        hidden_states = hidden_states + self.drop_path(self.mlp(self.layer_norm_2(hidden_states)))
        return hidden_states, attention_maps

    def token_chunks(self, batch_size: int, num_tokens: int) -> list[tuple[slice, slice]]:
        """`(images, tokens)` slices covering the batch, each a contiguous block whose MLP activation is about
        `mlp.token_chunk_bytes`: whole images grouped while they are small, token ranges of one image otherwise."""
        tokens_per_chunk = self.mlp.rows_per_chunk()
        if tokens_per_chunk >= num_tokens:
            images_per_chunk = tokens_per_chunk // num_tokens
            return [
                (slice(start, min(start + images_per_chunk, batch_size)), slice(None))
                for start in range(0, batch_size, images_per_chunk)
            ]
        num_pieces = math.ceil(num_tokens / tokens_per_chunk)
        # equal pieces rather than a full run and a small remainder
        tokens_per_chunk = math.ceil(num_tokens / num_pieces)
        return [
            (slice(image, image + 1), slice(start, min(start + tokens_per_chunk, num_tokens)))
            for image in range(batch_size)
            for start in range(0, num_tokens, tokens_per_chunk)
        ]

    @torch.no_grad()
    def forward_in_chunks(self, hidden_states: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The same layer, for inference, a cache-sized block of tokens at a time.

        Only the spatial reduction needs the whole token map; everything else in a layer (queries, attention over the
        reduced keys and values, output projection, residuals, MLP) works token by token. Running it on blocks of
        tokens keeps the MLP's wide hidden activation (8x the width in the first stages) in cache instead of writing
        and reading it through main memory, and keeps every temporary small enough that the memory allocator reuses
        it rather than mapping fresh pages. The biases, the GELU and the residual additions happen inside the matrix
        products where oneDNN runs them (`PvtLinear.project`, `PvtLinear.project_add`).
        """
        self_attention = self.attention.self
        normalized = self.layer_norm_1(hidden_states)
        key, value = self_attention.keys_and_values(normalized, height, width)
        output = torch.empty_like(hidden_states, memory_format=torch.contiguous_format)
        projection, mlp = self.attention.output.dense, self.mlp
        heads, num_keys = key.shape[1], key.shape[2]
        chunks = self.token_chunks(*hidden_states.shape[:2])
        batch_size, num_queries = hidden_states.shape[:2]
        folded = self_attention.folding_pays_off(batch_size, num_queries, num_keys, len(chunks), projection)
        if folded:
            score_weights, score_biases, value_weights = self_attention.fold_projections(key, value, projection)
        for images, tokens in chunks:
            if folded:
                block = output[images, tokens]  # filled image by image (the weights differ), then read by the MLP
                for index, image in enumerate(range(*images.indices(len(output)))):
                    scores = matmul_nt(
                        normalized[image, tokens],
                        score_weights[image],
                        None if score_biases is None else score_biases[image],
                        projection.use_onednn,
                    )
                    probabilities = scores.view(-1, heads, num_keys).softmax(-1).view(scores.shape)
                    attended = matmul_nt_add(
                        probabilities,
                        value_weights[image].t(),
                        projection.bias,
                        hidden_states[image, tokens],
                        projection.use_onednn,
                    )
                    if len(block) == 1:
                        block = attended.unsqueeze(0)  # a one-image block needs no copy
                    else:
                        block[index] = attended
            else:
                attended, _ = self_attention.attend(normalized[images, tokens], key[images], value[images])
                block = projection.project_add(attended, hidden_states[images, tokens])
            expanded = mlp.dense1.project(self.layer_norm_2(block), mlp.intermediate_act_fn)
            output[images, tokens] = mlp.dense2.project_add(expanded, block)
        return output


@dataclass
class PvtEncoderOutput(ModelOutput):
    """
    last_hidden_state: tokens of the last stage, class token first (normalised when the encoder has a final norm).
    hidden_states: the tokens after every layer, then the final normalised tokens (as transformers' PVT).
    attentions: attention maps of every layer (eager attention).
    feature_maps: each stage's output as a `(batch, channels, height, width)` map, class token excluded.
    """

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    feature_maps: tuple[torch.Tensor, ...] | None = None


class PvtEncoder(nn.Module):
    """The four-stage pyramid. The backbone variant has no class token and no final norm, as the detection code."""

    def __init__(self, config: PvtConfig, use_class_token: bool = True):
        super().__init__()
        self.config = config
        drop_path_rates = torch.linspace(0, config.drop_path_rate, sum(config.depths), device="cpu").tolist()
        self.patch_embeddings = nn.ModuleList(
            PvtPatchEmbeddings(config, stage, use_class_token) for stage in range(config.num_encoder_blocks)
        )
        self.block = nn.ModuleList()
        first_layer = 0
        for stage, depth in enumerate(config.depths):
            self.block.append(
                nn.ModuleList(
                    PvtLayer(
                        config,
                        hidden_size=config.hidden_sizes[stage],
                        num_attention_heads=config.num_attention_heads[stage],
                        drop_path=drop_path_rates[first_layer + index],
                        sequences_reduction_ratio=config.sequence_reduction_ratios[stage],
                        mlp_ratio=config.mlp_ratios[stage],
                    )
                    for index in range(depth)
                )
            )
            first_layer += depth
        self.layer_norm = nn.LayerNorm(config.hidden_sizes[-1], eps=config.layer_norm_eps) if use_class_token else None

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        output_feature_maps: bool = False,
    ) -> PvtEncoderOutput:
        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        feature_maps = () if output_feature_maps else None
        # Channels-last input lets every patch-embedding convolution hand out its tokens without a copy.
        feature_map = pixel_values.contiguous(memory_format=torch.channels_last)
        for embeddings, layers in zip(self.patch_embeddings, self.block):
            hidden_states, height, width = embeddings(feature_map)
            for layer in layers:
                hidden_states, attention_maps = layer(hidden_states, height, width, output_attentions)
                if output_attentions:
                    all_attentions += (attention_maps,)
                if output_hidden_states:
                    all_hidden_states += (hidden_states,)
            patch_tokens = hidden_states[:, -height * width :]
            feature_map = tokens_to_feature_map(patch_tokens, height, width)
            if output_feature_maps:
                feature_maps += (feature_map,)
        if self.layer_norm is not None:
            hidden_states = self.layer_norm(hidden_states)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        return PvtEncoderOutput(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            feature_maps=feature_maps,
        )


class PvtPreTrainedModel(PreTrainedModel):
    config_class = PvtConfig
    config: PvtConfig
    base_model_prefix = "pvt"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["PvtLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The original initialisation: truncated normal (std `initializer_range`) for linear layers and embeddings,
        zero biases, unit LayerNorms; convolutions keep PyTorch's default, as in the original code."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, PvtPatchEmbeddings):
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)
            if module.cls_token is not None:
                init.trunc_normal_(module.cls_token, mean=0.0, std=std)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, plus the whole `auto_map` and every Hub code file when the classes are
        registered for the Auto classes (as `import modeling_pvt` does), so the folder runs this code remotely."""
        if self._auto_class is not None:
            self.config.auto_map = dict(HUB_AUTO_MAP)
            os.makedirs(save_directory, exist_ok=True)
            processor_code = Path(__file__).with_name("image_processing_pvt.py")
            if processor_code.exists():
                shutil.copy(processor_code, save_directory)
        super().save_pretrained(save_directory, *args, **kwargs)

    def set_onednn_linear(self, enabled: bool) -> None:
        """Run the projections' CPU matrix products through oneDNN (the default where PyTorch has it, see
        `PvtLinear`) or through `F.linear` (PyTorch's BLAS), for every layer. Results agree to float32 rounding."""
        for module in self.modules():
            if isinstance(module, PvtLinear):
                module.use_onednn = enabled

    def set_token_chunk_bytes(self, chunk_bytes: int | None) -> None:
        """Size (bytes) of the wide MLP activation of one block of tokens in the chunked code paths, for every layer.

        The default keeps a block in a CPU's cache; a larger value means fewer, larger matrix products (a GPU gains
        nothing from chunks: `None` or 0 there). `None` or 0 runs the straightforward whole-batch code, which the
        chunked paths reproduce to floating-point rounding.
        """
        for module in self.modules():
            if isinstance(module, PvtFFN):
                module.token_chunk_bytes = chunk_bytes

    @property
    def feature_info(self) -> list[dict]:
        """timm-style description of the pyramid: channels, stride and module of each stage's output."""
        info, stride = [], 1
        for stage, (channels, patch_size) in enumerate(zip(self.config.hidden_sizes, self.config.patch_sizes)):
            stride *= patch_size
            info.append({"num_chs": channels, "reduction": stride, "module": f"encoder.block.{stage}"})
        return info


class PvtModel(PvtPreTrainedModel):
    """The PVT encoder; `pooler_output` is the normalised class token that the classification head reads."""

    def __init__(self, config: PvtConfig):
        super().__init__(config)
        self.encoder = PvtEncoder(config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPooling:
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        encoded = self.encoder(
            pixel_values, output_attentions=output_attentions, output_hidden_states=output_hidden_states
        )
        output = BaseModelOutputWithPooling(
            last_hidden_state=encoded.last_hidden_state,
            pooler_output=encoded.last_hidden_state[:, 0],
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
        )
        return output if return_dict else output.to_tuple()


class PvtForImageClassification(PvtPreTrainedModel):
    """PVT with a linear head on the normalised class token (ImageNet classification in the paper)."""

    def __init__(self, config: PvtConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.pvt = PvtModel(config)
        self.classifier = (
            nn.Linear(config.hidden_sizes[-1], config.num_labels) if config.num_labels > 0 else nn.Identity()
        )
        self.post_init()

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The normalised last-stage tokens, class token first (timm's `forward_features`)."""
        return self.pvt(pixel_values, return_dict=True).last_hidden_state

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits from `forward_features` output, or the pooled class token with `pre_logits=True`."""
        pooled = features[:, 0]
        return pooled if pre_logits else self.classifier(pooled)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | ImageClassifierOutput:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.pvt(
            pixel_values,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.classifier(outputs.pooler_output)
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        output = ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return output if return_dict else output.to_tuple()


class PvtBackbone(BackboneMixin, PvtPreTrainedModel):
    """PVT as a dense-prediction backbone: feature maps at strides 4, 8, 16 and 32 (for the default patch sizes).

    As in the authors' detection and segmentation code, the backbone has no class token and no final norm; the
    encoder weights of a classification checkpoint of the same size load into it (the rest is ignored).
    """

    has_attentions = True
    # What a classification checkpoint holds beyond the backbone: expected leftovers, not a loading problem.
    _keys_to_ignore_on_load_unexpected = [r"cls_token", r"^pvt\.encoder\.layer_norm\.", r"^classifier\."]

    def __init__(self, config: PvtConfig):
        super().__init__(config)
        self.encoder = PvtEncoder(config, use_class_token=False)
        self.num_features = list(config.hidden_sizes)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | BackboneOutput:
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        encoded = self.encoder(
            pixel_values,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_feature_maps=True,
        )
        feature_maps = tuple(
            encoded.feature_maps[self.stage_names.index(name)].contiguous() for name in self.out_features
        )
        output = BackboneOutput(
            feature_maps=feature_maps, hidden_states=encoded.hidden_states, attentions=encoded.attentions
        )
        return output if return_dict else output.to_tuple()


__all__ = ["PvtBackbone", "PvtForImageClassification", "PvtModel", "PvtPreTrainedModel"]
