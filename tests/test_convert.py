"""Conversion of original PVT v1 checkpoints, checked against an independent re-implementation of the original forward.

The original-format checkpoints are built here from the original code's layout (`classification/pvt.py` of
github.com/whai362/PVT) with random weights, saved with `torch.save` and converted like a downloaded file.
"""

import argparse
import math
import os
import pathlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from script_launch import load_script
from transformers import AutoModelForImageClassification
from transformers.models.pvt import PvtConfig as StockPvtConfig
from transformers.models.pvt import PvtForImageClassification as StockPvtForImageClassification

from modeling_pvt import PVT_PRESETS, PvtConfig, PvtForImageClassification
from modeling_pvt.hub.convert import (
    CheckpointConversionError,
    UnsafeCheckpointError,
    convert_checkpoint,
    convert_original_state_dict,
    expected_original_shapes,
    load_original_checkpoint,
)

# The architecture hyper-parameters of the original code's `pvt_tiny` ... `pvt_large`, written out independently of
# the package's presets: patch size 4 then 2, widths 64/128/320/512, heads 1/2/5/8, MLP ratios 8/8/4/4, reduction
# ratios 8/4/2/1, qkv_bias=True, block norms eps 1e-6.
ORIGINAL_ARCHITECTURE = dict(
    patch_sizes=(4, 2, 2, 2),
    embed_dims=(64, 128, 320, 512),
    num_heads=(1, 2, 5, 8),
    mlp_ratios=(8, 8, 4, 4),
    sr_ratios=(8, 4, 2, 1),
)
ORIGINAL_DEPTHS = {"tiny": (2, 2, 2, 2), "small": (3, 4, 6, 3), "medium": (3, 4, 18, 3), "large": (3, 8, 27, 3)}

# A toy architecture with every feature of the real ones: several layers per stage, several heads, all four
# reduction ratios, the class token.
TOY_ARCHITECTURE = dict(
    patch_sizes=(4, 2, 2, 2),
    embed_dims=(8, 16, 24, 32),
    num_heads=(1, 2, 3, 2),
    mlp_ratios=(8, 8, 4, 4),
    sr_ratios=(8, 4, 2, 1),
)
TOY_DEPTHS = (2, 1, 1, 2)
TOY_IMAGE_SIZE = 32


def toy_config(**overrides) -> PvtConfig:
    return PvtConfig(
        image_size=TOY_IMAGE_SIZE,
        hidden_sizes=list(TOY_ARCHITECTURE["embed_dims"]),
        num_attention_heads=list(TOY_ARCHITECTURE["num_heads"]),
        depths=list(TOY_DEPTHS),
        **{"num_labels": 10, **overrides},
    )


# --------------------------------------------------------------------------------------------------------------------
# The original model, from the original code's semantics


def original_layout(
    image_size: int, depths, patch_sizes, embed_dims, num_heads, mlp_ratios, sr_ratios, num_classes: int = 1000
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the original `PyramidVisionTransformer.state_dict()` (registration order as in its
    `__init__`: per stage patch_embed, pos_embed, blocks; then norm, cls_token, head)."""
    layout: dict[str, tuple[int, ...]] = {}
    in_channels, grid = 3, image_size
    for stage in range(4):
        width, patch, ratio = embed_dims[stage], patch_sizes[stage], sr_ratios[stage]
        grid //= patch
        layout[f"pos_embed{stage + 1}"] = (1, grid * grid + (1 if stage == 3 else 0), width)
        layout[f"patch_embed{stage + 1}.proj.weight"] = (width, in_channels, patch, patch)
        layout[f"patch_embed{stage + 1}.proj.bias"] = (width,)
        layout[f"patch_embed{stage + 1}.norm.weight"] = (width,)
        layout[f"patch_embed{stage + 1}.norm.bias"] = (width,)
        hidden = width * mlp_ratios[stage]
        for layer in range(depths[stage]):
            prefix = f"block{stage + 1}.{layer}."
            parts = {
                "norm1.weight": (width,),
                "norm1.bias": (width,),
                "attn.q.weight": (width, width),
                "attn.q.bias": (width,),
                "attn.kv.weight": (2 * width, width),
                "attn.kv.bias": (2 * width,),
                "attn.proj.weight": (width, width),
                "attn.proj.bias": (width,),
            }
            if ratio > 1:
                parts |= {
                    "attn.sr.weight": (width, width, ratio, ratio),
                    "attn.sr.bias": (width,),
                    "attn.norm.weight": (width,),
                    "attn.norm.bias": (width,),
                }
            parts |= {
                "norm2.weight": (width,),
                "norm2.bias": (width,),
                "mlp.fc1.weight": (hidden, width),
                "mlp.fc1.bias": (hidden,),
                "mlp.fc2.weight": (width, hidden),
                "mlp.fc2.bias": (width,),
            }
            layout |= {prefix + name: shape for name, shape in parts.items()}
        in_channels = width
    layout["norm.weight"] = (embed_dims[3],)
    layout["norm.bias"] = (embed_dims[3],)
    layout["cls_token"] = (1, 1, embed_dims[3])
    layout["head.weight"] = (num_classes, embed_dims[3])
    layout["head.bias"] = (num_classes,)
    return layout


def random_original_weights(layout: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights scaled so that every LayerNorm sees an input variance near its epsilon (about 1e-5): then
    the epsilons of the original code (1e-5 after convolutions, 1e-6 elsewhere) visibly change the logits, and a
    conversion that got them wrong cannot pass. Attention logits stay of order one so the softmax matters too."""
    generator = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=generator) * std

    small = math.sqrt(1e-5)  # the residual stream's scale
    weights = {}
    for key, shape in layout.items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        if key.endswith("norm.weight") or key.endswith(("norm1.weight", "norm2.weight")):
            scale = small if key.startswith("patch_embed") else 1.0  # patch norms feed the small residual stream
            weights[key] = scale * (1.0 + normal(shape, 0.2))
        elif key.endswith("norm.bias") or key.endswith(("norm1.bias", "norm2.bias")):
            weights[key] = normal(shape, small if key.startswith("patch_embed") else 0.1)
        elif key == "patch_embed1.proj.weight" or key.endswith("attn.sr.weight"):
            weights[key] = normal(shape, small / math.sqrt(fan_in))  # unit-variance input -> variance ~1e-5
        elif key.startswith("patch_embed") and key.endswith("proj.weight"):
            weights[key] = normal(shape, 1.0 / math.sqrt(fan_in))  # residual-stream input keeps its scale
        elif key.endswith(("attn.proj.weight", "mlp.fc2.weight")):
            weights[key] = normal(shape, small / math.sqrt(fan_in))  # writes back into the residual stream
        elif key.startswith("pos_embed") or key == "cls_token":
            weights[key] = normal(shape, small)
        elif key.endswith("weight"):
            weights[key] = normal(shape, 1.0 / math.sqrt(fan_in))
        else:  # remaining biases
            weights[key] = normal(shape, small if key.endswith(("proj.bias", "fc2.bias", "sr.bias")) else 0.1)
    return weights


def original_forward(
    weights: dict[str, torch.Tensor],
    pixel_values: torch.Tensor,
    image_size: int,
    depths,
    patch_sizes,
    embed_dims,
    num_heads,
    mlp_ratios,
    sr_ratios,
    patch_norm_eps: float = 1e-5,
    reduction_norm_eps: float = 1e-5,
    block_norm_eps: float = 1e-6,
) -> torch.Tensor:
    """`PyramidVisionTransformer.forward` of the original code in eval mode, written with functional ops."""
    batch = pixel_values.shape[0]
    first_stage_patches = (image_size // patch_sizes[0]) ** 2
    hidden, stored_grid = pixel_values, image_size
    for stage in range(4):
        width, heads, ratio = embed_dims[stage], num_heads[stage], sr_ratios[stage]
        is_last = stage == 3
        stored_grid //= patch_sizes[stage]
        # PatchEmbed: Conv2d(kernel = stride = patch size), flatten, LayerNorm with PyTorch's default eps.
        hidden = F.conv2d(
            hidden,
            weights[f"patch_embed{stage + 1}.proj.weight"],
            weights[f"patch_embed{stage + 1}.proj.bias"],
            stride=patch_sizes[stage],
        )
        height, width_ = hidden.shape[-2:]
        tokens = hidden.flatten(2).transpose(1, 2)
        tokens = F.layer_norm(
            tokens,
            (width,),
            weights[f"patch_embed{stage + 1}.norm.weight"],
            weights[f"patch_embed{stage + 1}.norm.bias"],
            patch_norm_eps,
        )
        position = weights[f"pos_embed{stage + 1}"]
        if is_last:
            class_position, position = position[:, :1], position[:, 1:]
        # `_get_pos_embed`: the original compares with the *first* stage's patch count and otherwise resizes from
        # the stored grid (a same-size bilinear resize is the identity).
        if height * width_ != first_stage_patches:
            grid = position.reshape(1, stored_grid, stored_grid, -1).permute(0, 3, 1, 2)
            position = F.interpolate(grid, size=(height, width_), mode="bilinear")
            position = position.reshape(1, -1, height * width_).permute(0, 2, 1)
        if is_last:
            tokens = torch.cat((weights["cls_token"].expand(batch, -1, -1), tokens), dim=1)
            position = torch.cat((class_position, position), dim=1)
        tokens = tokens + position
        for layer in range(depths[stage]):
            prefix = f"block{stage + 1}.{layer}."
            normed = F.layer_norm(
                tokens, (width,), weights[prefix + "norm1.weight"], weights[prefix + "norm1.bias"], block_norm_eps
            )
            num_tokens, head_dim = normed.shape[1], width // heads
            query = F.linear(normed, weights[prefix + "attn.q.weight"], weights[prefix + "attn.q.bias"])
            query = query.reshape(batch, num_tokens, heads, head_dim).permute(0, 2, 1, 3)
            if ratio > 1:
                reduced = normed.permute(0, 2, 1).reshape(batch, width, height, width_)
                reduced = F.conv2d(
                    reduced, weights[prefix + "attn.sr.weight"], weights[prefix + "attn.sr.bias"], stride=ratio
                )
                reduced = reduced.reshape(batch, width, -1).permute(0, 2, 1)
                reduced = F.layer_norm(
                    reduced,
                    (width,),
                    weights[prefix + "attn.norm.weight"],
                    weights[prefix + "attn.norm.bias"],
                    reduction_norm_eps,
                )
            else:
                reduced = normed
            key_value = F.linear(reduced, weights[prefix + "attn.kv.weight"], weights[prefix + "attn.kv.bias"])
            key_value = key_value.reshape(batch, -1, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
            key, value = key_value[0], key_value[1]
            attention = (query @ key.transpose(-2, -1)) * head_dim**-0.5
            attention = attention.softmax(dim=-1)
            attended = (attention @ value).transpose(1, 2).reshape(batch, num_tokens, width)
            tokens = tokens + F.linear(
                attended, weights[prefix + "attn.proj.weight"], weights[prefix + "attn.proj.bias"]
            )
            normed = F.layer_norm(
                tokens, (width,), weights[prefix + "norm2.weight"], weights[prefix + "norm2.bias"], block_norm_eps
            )
            expanded = F.gelu(F.linear(normed, weights[prefix + "mlp.fc1.weight"], weights[prefix + "mlp.fc1.bias"]))
            tokens = tokens + F.linear(expanded, weights[prefix + "mlp.fc2.weight"], weights[prefix + "mlp.fc2.bias"])
        if not is_last:
            hidden = tokens.reshape(batch, height, width_, -1).permute(0, 3, 1, 2).contiguous()
    tokens = F.layer_norm(tokens, (embed_dims[3],), weights["norm.weight"], weights["norm.bias"], block_norm_eps)
    return F.linear(tokens[:, 0], weights["head.weight"], weights["head.bias"])


def toy_original_weights(seed: int = 0, num_classes: int = 10) -> dict[str, torch.Tensor]:
    layout = original_layout(TOY_IMAGE_SIZE, TOY_DEPTHS, num_classes=num_classes, **TOY_ARCHITECTURE)
    return random_original_weights(layout, seed)


def toy_reference(weights, pixel_values, **eps) -> torch.Tensor:
    with torch.no_grad():
        return original_forward(weights, pixel_values, TOY_IMAGE_SIZE, TOY_DEPTHS, **TOY_ARCHITECTURE, **eps)


def converted_model(weights: dict[str, torch.Tensor], config: PvtConfig, attn_implementation: str = "sdpa"):
    model = PvtForImageClassification._from_config(config, attn_implementation=attn_implementation)
    model.load_state_dict(convert_original_state_dict(weights, config), strict=True)
    return model.eval()


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def run_script(*args: str) -> int:
    return load_script("convert_original_checkpoint").main([str(arg) for arg in args])


# --------------------------------------------------------------------------------------------------------------------
# Numerical equivalence with the original forward


def test_reference_is_sensitive_to_what_a_conversion_can_get_wrong():
    """The comparison below would catch wrong epsilons, swapped keys/values or a different position resize."""
    weights = toy_original_weights()
    pixel_values = torch.randn(2, 3, 45, 61)
    reference = toy_reference(weights, pixel_values)
    wrong = {
        "every norm at 1e-6 (transformers' port)": toy_reference(
            weights, pixel_values, patch_norm_eps=1e-6, reduction_norm_eps=1e-6
        ),
        "block norms at 1e-5": toy_reference(weights, pixel_values, block_norm_eps=1e-5),
        "reduction norms at 1e-6": toy_reference(weights, pixel_values, reduction_norm_eps=1e-6),
    }
    swapped = dict(weights)
    for key in [key for key in weights if key.endswith(("attn.kv.weight", "attn.kv.bias"))]:
        swapped[key] = torch.cat(weights[key].chunk(2)[::-1])
    wrong["keys and values swapped"] = toy_reference(swapped, pixel_values)
    for description, logits in wrong.items():
        difference = (logits - reference).abs().max().item()
        assert difference > 100 * (1e-5 + 1e-4 * reference.abs().max().item()), description


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("image_size", [(32, 32), (45, 61), (64, 40), (96, 96)])
def test_converted_model_reproduces_the_original_forward(image_size, attn_implementation):
    weights = toy_original_weights()
    model = converted_model(weights, toy_config(), attn_implementation)
    pixel_values = torch.randn(2, 3, *image_size)
    with torch.no_grad():
        logits = model(pixel_values).logits
    assert_logits_close(logits, toy_reference(weights, pixel_values))


def test_key_and_value_come_from_the_two_halves_of_kv():
    weights = toy_original_weights()
    converted = convert_original_state_dict(weights, toy_config())
    key_value = weights["block2.0.attn.kv.weight"]
    assert torch.equal(converted["pvt.encoder.block.1.0.attention.self.key.weight"], key_value[:16])
    assert torch.equal(converted["pvt.encoder.block.1.0.attention.self.value.weight"], key_value[16:])
    assert torch.equal(converted["pvt.encoder.patch_embeddings.3.cls_token"], weights["cls_token"])
    assert torch.equal(converted["pvt.encoder.patch_embeddings.3.position_embeddings"], weights["pos_embed4"])
    assert torch.equal(converted["classifier.weight"], weights["head.weight"])
    # The converted tensors own their memory: safetensors refuses tensors that share storage.
    assert converted["pvt.encoder.block.1.0.attention.self.key.weight"].untyped_storage().data_ptr() != (
        converted["pvt.encoder.block.1.0.attention.self.value.weight"].untyped_storage().data_ptr()
    )


def test_real_tiny_training_checkpoint_through_the_script(tmp_path):
    """A full-size PVT-tiny training checkpoint (weights under "model", arguments as an argparse.Namespace) becomes a
    folder that loads with the Auto classes and reproduces the original logits at 224 and at another size."""
    layout = original_layout(224, ORIGINAL_DEPTHS["tiny"], **ORIGINAL_ARCHITECTURE)
    weights = random_original_weights(layout, seed=1)
    checkpoint = tmp_path / "checkpoint.pth"
    torch.save(
        {"model": weights, "optimizer": {"state": {}}, "epoch": 299, "args": argparse.Namespace(model="pvt_tiny")},
        checkpoint,
    )
    output_dir = tmp_path / "pvt-tiny"
    assert run_script("--checkpoint", checkpoint, "--size", "tiny", "--output_dir", output_dir) == 0

    files = sorted(path.name for path in output_dir.iterdir())
    assert "model.safetensors" in files and "preprocessor_config.json" in files and "config.json" in files
    assert not [name for name in files if name.endswith((".bin", ".pth", ".pt", ".pkl"))]
    model = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    assert isinstance(model, PvtForImageClassification)
    assert model.config.num_labels == 1000
    assert model.config.id2label[0] == "tench, Tinca tinca"
    assert model.config.id2label[999] == "toilet tissue, toilet paper, bathroom tissue"
    assert model.config.label2id["tench, Tinca tinca"] == 0
    assert model.config.depths == [2, 2, 2, 2]

    for height, width in [(224, 224), (160, 288)]:
        pixel_values = torch.randn(1, 3, height, width)
        with torch.no_grad():
            expected = original_forward(weights, pixel_values, 224, ORIGINAL_DEPTHS["tiny"], **ORIGINAL_ARCHITECTURE)
            assert_logits_close(model(pixel_values).logits, expected)


@pytest.mark.parametrize("size", list(PVT_PRESETS))
def test_layout_of_every_size_matches_the_original_and_stock_transformers(size):
    config = PvtConfig.from_preset(size)
    expected = expected_original_shapes(config)
    assert expected == original_layout(224, ORIGINAL_DEPTHS[size], **ORIGINAL_ARCHITECTURE)
    # Shape-only tensors are enough to check that the conversion fills exactly stock transformers' keys.
    converted = convert_original_state_dict({key: torch.empty(shape) for key, shape in expected.items()}, config)
    with torch.device("meta"):
        stock = StockPvtForImageClassification(StockPvtConfig(depths=list(ORIGINAL_DEPTHS[size])))
    stock_shapes = {key: tuple(tensor.shape) for key, tensor in stock.state_dict().items()}
    assert {key: tuple(tensor.shape) for key, tensor in converted.items()} == stock_shapes


# --------------------------------------------------------------------------------------------------------------------
# Refusals


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / "evil.pth"
    torch.save({"model": toy_original_weights(), "payload": _RunsCodeWhenUnpickled(marker)}, checkpoint)
    output_dir = tmp_path / "out"
    assert run_script("--checkpoint", checkpoint, "--size", "tiny", "--output_dir", output_dir) == 1
    message = capsys.readouterr().err
    assert "--allow_unsafe_pickle" in message and "mkdir" in message
    assert not marker.exists() and not output_dir.exists()


def test_unsafe_pickles_need_the_explicit_opt_in(tmp_path):
    weights = toy_original_weights()
    checkpoint = tmp_path / "with-path.pth"
    torch.save({"model": weights, "data_path": pathlib.PurePosixPath("/imagenet")}, checkpoint)
    with pytest.raises(UnsafeCheckpointError, match=r"pathlib\.PurePosixPath.*--allow_unsafe_pickle"):
        load_original_checkpoint(checkpoint)
    loaded = load_original_checkpoint(checkpoint, allow_unsafe_pickle=True)
    assert loaded.keys() == weights.keys()


def test_plain_state_dicts_and_training_checkpoints_load_safely(tmp_path):
    weights = toy_original_weights()
    torch.save(weights, tmp_path / "released.pth")
    torch.save({"model": weights, "epoch": 3, "args": argparse.Namespace(lr=5e-4)}, tmp_path / "training.pth")
    for name in ("released.pth", "training.pth"):
        loaded = load_original_checkpoint(tmp_path / name)
        assert loaded.keys() == weights.keys()
        assert all(torch.equal(loaded[key], weights[key]) for key in weights)


def test_unknown_missing_and_mis_shaped_keys_are_all_named(tmp_path):
    weights = toy_original_weights()
    del weights["pos_embed2"]
    del weights["block1.1.attn.sr.weight"]
    weights["block3.0.attn.sr_extra.weight"] = torch.zeros(3)
    weights["head_dist.weight"] = torch.zeros(10, 32)
    weights["block4.1.mlp.fc1.weight"] = torch.zeros(64, 32)
    with pytest.raises(CheckpointConversionError) as raised:
        convert_original_state_dict(weights, toy_config())
    message = str(raised.value)
    for name in ("pos_embed2", "block1.1.attn.sr.weight", "block3.0.attn.sr_extra.weight", "head_dist.weight"):
        assert name in message
    assert "block4.1.mlp.fc1.weight: checkpoint (64, 32), expected (128, 32)" in message
    assert "nothing was converted" in message


def test_reduction_weights_in_the_last_stage_are_unknown():
    # Stage 4 has reduction ratio 1: the original code creates no `sr`/`norm` there, so such keys cannot be placed.
    weights = toy_original_weights()
    weights["block4.0.attn.sr.weight"] = torch.zeros(32, 32, 1, 1)
    with pytest.raises(CheckpointConversionError, match=r"Unknown keys.*\n  block4\.0\.attn\.sr\.weight"):
        convert_original_state_dict(weights, toy_config())


def test_a_checkpoint_of_another_size_names_the_right_size():
    weights = {
        key: torch.empty(shape) for key, shape in expected_original_shapes(PvtConfig.from_preset("tiny")).items()
    }
    with pytest.raises(CheckpointConversionError, match=r"looks like PVT-tiny \(--size tiny\)"):
        convert_original_state_dict(weights, PvtConfig.from_preset("small"))


def test_a_head_with_another_number_of_classes_is_a_shape_mismatch():
    with pytest.raises(CheckpointConversionError, match=r"head\.weight: checkpoint \(5, 32\), expected \(10, 32\)"):
        convert_original_state_dict(toy_original_weights(num_classes=5), toy_config())


def test_entries_that_are_not_tensors_are_named():
    weights = toy_original_weights()
    weights["pos_embed1"] = [0.0]
    with pytest.raises(CheckpointConversionError, match="not tensors.*\n  pos_embed1"):
        convert_original_state_dict(weights, toy_config())


def test_half_precision_checkpoints_are_cast_to_float32_with_a_warning(caplog):
    weights = {key: value.half() for key, value in toy_original_weights().items()}
    with caplog.at_level("WARNING", logger="modeling_pvt.convert"):
        converted = convert_original_state_dict(weights, toy_config())
    assert {tensor.dtype for tensor in converted.values()} == {torch.float32}
    assert "torch.float16" in caplog.text


def test_the_script_refuses_missing_files_and_non_empty_output_folders(tmp_path, capsys):
    assert run_script("--checkpoint", tmp_path / "absent.pth", "--size", "tiny", "--output_dir", tmp_path / "o") == 1
    assert "absent.pth" in capsys.readouterr().err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    torch.save(toy_original_weights(), tmp_path / "toy.pth")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_checkpoint(tmp_path / "toy.pth", "tiny", occupied)
    assert (occupied / "notes.txt").read_text() == "keep me"
