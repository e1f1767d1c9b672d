"""The facts the model cards publish, checked against the paper and against independent hand-derived formulas."""

import pytest
import torch

from modeling_pvt import PvtBackbone, PvtConfig, PvtForImageClassification
from modeling_pvt.hub.model_facts import (
    PAPER_REPORTED,
    attention_multiply_adds,
    count_multiply_adds,
    count_parameters,
    feature_maps,
    format_giga,
    format_millions,
    model_facts,
    multiply_adds_by_operator,
)

SIZES = ["tiny", "small", "medium", "large"]


def small_config(**overrides) -> PvtConfig:
    fields = dict(image_size=32, hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 1, 1, 2], depths=[1, 1, 1, 1])
    return PvtConfig(**{**fields, "num_labels": 3, **overrides})


def _stage_grids(config: PvtConfig, height: int, width: int) -> list[tuple[int, int]]:
    grids = []
    for stride, kernel in zip(config.patch_sizes, config.strides, strict=True):
        height, width = (height - kernel) // stride + 1, (width - kernel) // stride + 1
        grids.append((height, width))
    return grids


def hand_counted_parameters(config: PvtConfig) -> int:
    """Parameters of PVT written out from the architecture of the paper (Table 1), layer by layer."""
    total, in_channels = 0, config.num_channels
    grids = _stage_grids(config, *config.image_hw)
    last = config.num_encoder_blocks - 1
    for stage, (width, depth, ratio, mlp_ratio) in enumerate(
        zip(config.hidden_sizes, config.depths, config.sequence_reduction_ratios, config.mlp_ratios, strict=True)
    ):
        kernel = config.strides[stage]
        tokens = grids[stage][0] * grids[stage][1] + (1 if stage == last else 0)
        total += width * in_channels * kernel * kernel + width  # patch-embedding convolution
        total += 2 * width  # its LayerNorm
        total += tokens * width  # position embeddings (one more row for the class token in the last stage)
        per_layer = 4 * width  # two LayerNorms
        per_layer += 3 * (width * width + width)  # query, key, value
        if ratio > 1:
            per_layer += width * width * ratio * ratio + width + 2 * width  # reduction convolution + LayerNorm
        per_layer += width * width + width  # attention output
        hidden = width * mlp_ratio
        per_layer += width * hidden + hidden + hidden * width + width  # MLP
        total += depth * per_layer
        in_channels = width
    total += config.hidden_sizes[-1]  # class token
    total += 2 * config.hidden_sizes[-1]  # final LayerNorm
    total += config.hidden_sizes[-1] * config.num_labels + config.num_labels  # classifier
    return total


def hand_counted_multiply_adds(config: PvtConfig, height: int, width: int) -> int:
    """Multiply-adds of convolutions, linear layers and the two attention products, written out by hand."""
    total, in_channels = 0, config.num_channels
    grids = _stage_grids(config, height, width)
    last = config.num_encoder_blocks - 1
    for stage, (channels, depth, ratio, mlp_ratio) in enumerate(
        zip(config.hidden_sizes, config.depths, config.sequence_reduction_ratios, config.mlp_ratios, strict=True)
    ):
        kernel = config.strides[stage]
        grid_h, grid_w = grids[stage]
        total += grid_h * grid_w * channels * in_channels * kernel * kernel
        queries = grid_h * grid_w + (1 if stage == last else 0)
        if ratio > 1:
            keys = ((grid_h - ratio) // ratio + 1) * ((grid_w - ratio) // ratio + 1)
            reduction = keys * channels * channels * ratio * ratio
        else:
            keys, reduction = queries, 0
        per_layer = queries * channels * channels  # query
        per_layer += reduction + 2 * keys * channels * channels  # reduction, key, value
        per_layer += 2 * queries * keys * channels  # Q K^T and attention x V, all heads together
        per_layer += queries * channels * channels  # attention output
        per_layer += 2 * queries * channels * channels * mlp_ratio  # MLP
        total += depth * per_layer
        in_channels = channels
    return total + config.hidden_sizes[-1] * config.num_labels


@pytest.mark.parametrize("size", SIZES)
def test_presets_match_the_paper(size):
    facts = model_facts(size)
    assert facts.image_size == (224, 224)
    assert format_millions(facts.num_parameters) == f"{PAPER_REPORTED[size].parameters_millions:.1f}M"
    assert format_giga(facts.multiply_adds) == f"{PAPER_REPORTED[size].gmacs_at_224:.1f}G"
    assert round(facts.num_parameters / 1e6, 1) == PAPER_REPORTED[size].parameters_millions
    assert round(facts.multiply_adds / 1e9, 1) == PAPER_REPORTED[size].gmacs_at_224


@pytest.mark.parametrize("size", SIZES)
def test_counts_equal_the_hand_derived_formulas(size):
    config = PvtConfig.from_preset(size)
    assert count_parameters(config) == hand_counted_parameters(config)
    assert count_parameters(size) == hand_counted_parameters(config)
    assert count_multiply_adds(config, 224) == hand_counted_multiply_adds(config, 224, 224)
    # Non-square and not a multiple of 32: the reduction convolutions and the grids round down.
    assert count_multiply_adds(config, (200, 310)) == hand_counted_multiply_adds(config, 200, 310)


def hand_counted_attention_products(config: PvtConfig, height: int, width: int) -> int:
    """Multiply-adds of Q K^T and attention x V alone."""
    total = 0
    grids = _stage_grids(config, height, width)
    for stage, (channels, depth, ratio) in enumerate(
        zip(config.hidden_sizes, config.depths, config.sequence_reduction_ratios, strict=True)
    ):
        grid_h, grid_w = grids[stage]
        queries = grid_h * grid_w + (1 if stage == config.num_encoder_blocks - 1 else 0)
        keys = ((grid_h - ratio) // ratio + 1) * ((grid_w - ratio) // ratio + 1) if ratio > 1 else queries
        total += depth * 2 * queries * keys * channels
    return total


@pytest.mark.parametrize("image_size", [224, (480, 640)])
def test_attention_products_are_told_apart(image_size):
    config = PvtConfig.from_preset("tiny")
    by_operator = multiply_adds_by_operator(config, image_size)
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    assert attention_multiply_adds(by_operator) == hand_counted_attention_products(config, height, width)
    assert by_operator["aten.convolution"] > 0


def test_counting_a_real_cpu_model_counts_fused_attention():
    # On CPU tensors the sdpa path is one fused kernel that FlopCounterMode does not know by itself.
    torch.manual_seed(0)
    config = small_config()
    sdpa_model = PvtForImageClassification(small_config(attn_implementation="sdpa"))
    eager_model = PvtForImageClassification(small_config(attn_implementation="eager"))
    expected = hand_counted_multiply_adds(config, 40, 56)
    assert count_multiply_adds(sdpa_model, (40, 56)) == expected
    assert count_multiply_adds(eager_model, (40, 56)) == expected
    assert count_parameters(sdpa_model) == hand_counted_parameters(config) == count_parameters(config)
    # Counting runs in eval mode (where inference fast paths may kick in) but hands the model back as it came.
    for mode in (True, False):
        eager_model.train(mode)
        count_multiply_adds(eager_model, 32)
        assert eager_model.training is mode


@pytest.mark.parametrize("image_size", [32, (45, 61), (64, 33)])
def test_feature_maps_match_the_backbone(image_size):
    config = small_config()
    backbone = PvtBackbone(config).eval()
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    with torch.no_grad():
        outputs = backbone(torch.randn(1, 3, height, width))
    facts = feature_maps(config, image_size)
    assert [fact.stage for fact in facts] == ["stage1", "stage2", "stage3", "stage4"]
    assert [fact.stride for fact in facts] == [4, 8, 16, 32]
    for fact, feature_map in zip(facts, outputs.feature_maps, strict=True):
        assert tuple(feature_map.shape[1:]) == (fact.channels, fact.height, fact.width)


def test_feature_maps_of_the_presets():
    facts = feature_maps("small", 224)
    assert [(fact.stride, fact.channels, fact.height) for fact in facts] == [
        (4, 64, 56),
        (8, 128, 28),
        (16, 320, 14),
        (32, 512, 7),
    ]
