"""Facts about a PVT configuration computed from the code: parameters, multiply-adds, feature-map geometry.

The model cards and the tests read their numbers from here, so nothing published is typed in by hand except what
the paper itself reports (`PAPER_REPORTED`, kept apart and labelled as such).

Multiply-add convention (the one that reproduces the paper's 1.9 / 3.8 / 6.7 / 9.8 G at 224x224):
one multiply-add per multiplication in every convolution (the patch embeddings and the spatial-reduction
convolutions), every linear layer (query, key, value, attention output, MLP, classifier) and the two attention
matrix products (Q K^T and softmax(.) V). Bias additions, LayerNorms, GELUs, softmaxes, position-embedding
additions and residual additions are not counted. We measure it with `torch.utils.flop_counter.FlopCounterMode` on a
forward pass of `PvtForImageClassification` built on the `meta` device (no memory, no initialisation) and divide
its FLOPs by two (it counts a multiply-add as two FLOPs). FlopCounterMode misses the CPU fused attention kernel, so a
formula for it is added.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..configuration_pvt import PvtConfig

ImageSize = int | Sequence[int]


@dataclass(frozen=True)
class PaperReported:
    """Numbers printed in the PVT paper (arXiv 2102.12122, Table 2) for the authors' own ImageNet-1k weights."""

    parameters_millions: float
    gmacs_at_224: float
    imagenet_top1: float


# Reported by the paper, not measured here. The first two columns are checked against the code in the tests; the
# top-1 accuracies belong to the original weights and are quoted in the model cards as the paper's numbers.
PAPER_REPORTED: dict[str, PaperReported] = {
    "tiny": PaperReported(parameters_millions=13.2, gmacs_at_224=1.9, imagenet_top1=75.1),
    "small": PaperReported(parameters_millions=24.5, gmacs_at_224=3.8, imagenet_top1=79.8),
    "medium": PaperReported(parameters_millions=44.2, gmacs_at_224=6.7, imagenet_top1=81.2),
    "large": PaperReported(parameters_millions=61.4, gmacs_at_224=9.8, imagenet_top1=81.7),
}


@dataclass(frozen=True)
class FeatureMapFacts:
    """Geometry of one stage's output feature map for a given input size."""

    stage: str
    stride: int
    channels: int
    height: int
    width: int


@dataclass(frozen=True)
class ModelFacts:
    """Everything a model card states about a configuration, computed from the code."""

    num_parameters: int
    multiply_adds: int
    image_size: tuple[int, int]
    feature_maps: tuple[FeatureMapFacts, ...]


def _as_config(size_or_config: str | PvtConfig) -> PvtConfig:
    if isinstance(size_or_config, str):
        return PvtConfig.from_preset(size_or_config)
    return size_or_config


def _as_hw(image_size: ImageSize) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


def build_on_meta(config: PvtConfig) -> nn.Module:
    """`PvtForImageClassification(config)` on the `meta` device: shapes only, no memory and no initialisation cost."""
    from ..modeling_pvt import PvtForImageClassification  # late import: the model module imports the whole stack

    with torch.device("meta"):
        model = PvtForImageClassification(config)
    return model.eval()


def count_parameters(model_or_config: nn.Module | PvtConfig | str) -> int:
    """Number of parameters of a model, or of `PvtForImageClassification` built from a config or a preset name."""
    if isinstance(model_or_config, nn.Module):
        model = model_or_config
    else:
        model = build_on_meta(_as_config(model_or_config))
    return sum(parameter.numel() for parameter in model.parameters())


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # FlopCounterMode knows the CUDA fused attention kernels but not the CPU one; on CPU tensors a forward through
    # `scaled_dot_product_attention` would otherwise count no attention at all.
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
}

# Operators that compute the attention products (Q K^T, attention x V) rather than a linear layer or a convolution.
ATTENTION_OPERATORS = frozenset(
    {
        "aten.bmm",
        "aten.baddbmm",
        "aten._scaled_dot_product_flash_attention_for_cpu",
        "aten._scaled_dot_product_flash_attention",
        "aten._scaled_dot_product_efficient_attention",
        "aten._scaled_dot_product_cudnn_attention",
    }
)


def multiply_adds_by_operator(
    model_or_config: nn.Module | PvtConfig | str, image_size: ImageSize | None = None
) -> dict[str, int]:
    """Multiply-adds of one forward pass of one image, per aten operator (convolution, addmm, bmm, ...).

    A config or preset name is built as `PvtForImageClassification` on the `meta` device; a model is run where its
    parameters live. `image_size` defaults to the config's `image_size`.
    """
    if isinstance(model_or_config, nn.Module):
        model = model_or_config
        config = model.config
    else:
        config = _as_config(model_or_config)
        model = build_on_meta(config)
    height, width = _as_hw(image_size if image_size is not None else config.image_size)
    first_parameter = next(model.parameters())
    pixel_values = torch.empty(
        1, config.num_channels, height, width, device=first_parameter.device, dtype=first_parameter.dtype
    )
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    # On `meta` tensors autograd costs nothing, and with it on the model takes its plain path: inference-only fast
    # paths compute the same products in many small pieces, which is the same count but far slower to trace.
    grad_enabled = first_parameter.is_meta
    was_training = model.training
    model.eval()
    try:
        with counter, torch.set_grad_enabled(grad_enabled):
            model(pixel_values=pixel_values)
    finally:
        model.train(was_training)
    flops = counter.get_flop_counts()["Global"]
    return {str(operator): count // 2 for operator, count in flops.items()}


def count_multiply_adds(model_or_config: nn.Module | PvtConfig | str, image_size: ImageSize = 224) -> int:
    """Multiply-adds of one forward pass of one `image_size` image (see the module docstring for what counts)."""
    return sum(multiply_adds_by_operator(model_or_config, image_size).values())


def attention_multiply_adds(by_operator: dict[str, int]) -> int:
    """The part of a `multiply_adds_by_operator` result spent in the attention products."""
    return sum(count for operator, count in by_operator.items() if operator in ATTENTION_OPERATORS)


def feature_maps(config: PvtConfig | str, image_size: ImageSize = 224) -> tuple[FeatureMapFacts, ...]:
    """Stride (relative to the input), channels and size of each stage's output for an `image_size` input.

    Each stage's patch embedding is a convolution without padding whose stride is `patch_sizes[i]` and whose kernel
    is `strides[i]` (transformers' field names), so the map shrinks by `floor((size - kernel) / stride) + 1`.
    """
    config = _as_config(config)
    height, width = _as_hw(image_size)
    facts = []
    cumulative_stride = 1
    for index in range(config.num_encoder_blocks):
        conv_stride, kernel = config.patch_sizes[index], config.strides[index]
        height = (height - kernel) // conv_stride + 1
        width = (width - kernel) // conv_stride + 1
        cumulative_stride *= conv_stride
        facts.append(
            FeatureMapFacts(
                stage=config.stage_names[index],
                stride=cumulative_stride,
                channels=config.hidden_sizes[index],
                height=height,
                width=width,
            )
        )
    return tuple(facts)


def model_facts(size_or_config: str | PvtConfig, image_size: ImageSize | None = None) -> ModelFacts:
    """Parameters, multiply-adds and feature maps at `image_size` (default: the config's own image size)."""
    config = _as_config(size_or_config)
    hw = _as_hw(image_size if image_size is not None else config.image_size)
    model = build_on_meta(config)
    return ModelFacts(
        num_parameters=count_parameters(model),
        multiply_adds=count_multiply_adds(model, hw),
        image_size=hw,
        feature_maps=feature_maps(config, hw),
    )


def format_millions(count: int) -> str:
    """`13229288` -> `"13.2M"`: the paper's precision."""
    return f"{count / 1e6:.1f}M"


def format_giga(count: int) -> str:
    """`1932911616` -> `"1.9G"`: the paper's precision."""
    return f"{count / 1e9:.1f}G"


__all__ = [
    "ATTENTION_OPERATORS",
    "PAPER_REPORTED",
    "FeatureMapFacts",
    "ModelFacts",
    "PaperReported",
    "attention_multiply_adds",
    "build_on_meta",
    "count_multiply_adds",
    "count_parameters",
    "feature_maps",
    "format_giga",
    "format_millions",
    "model_facts",
    "multiply_adds_by_operator",
]
