"""Conversion of the original authors' PVT v1 checkpoints into this package's (= stock transformers') layout.

The original code (github.com/whai362/PVT, `classification/pvt.py`) names its weights
`patch_embed{1..4}.{proj,norm}.*`, `pos_embed{1..4}`, `cls_token`, `block{1..4}.{j}.{norm1,attn.q,attn.kv,attn.sr,
attn.norm,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`, `norm.*` and `head.*`; `attn.kv` stacks the key projection (first half
of the output rows) on the value projection (second half). The mapping below is derived from the keys the target
model actually has, so every target weight must come from exactly one original key and every original key must
land somewhere: nothing is dropped or left at random initialisation, and nothing is guessed.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..configuration_pvt import PVT_PRESETS, PvtConfig

logger = logging.getLogger(__name__)

UNSAFE_PICKLE_FLAG = "--allow_unsafe_pickle"

# Training checkpoints of the original code (DeiT's `main.py`) store the command line as an `argparse.Namespace`
# next to the weights. Rebuilding a Namespace only sets attributes, so it is safe to allow in the restricted
# unpickler; anything else that is not plain data still makes `weights_only=True` refuse the file.
_EXTRA_SAFE_GLOBALS = [argparse.Namespace]


class CheckpointConversionError(ValueError):
    """The checkpoint does not fit the requested PVT size; the message names every offending key."""


class UnsafeCheckpointError(CheckpointConversionError):
    """The checkpoint needs arbitrary unpickling, which is refused unless explicitly allowed."""


@dataclass(frozen=True)
class OriginalSource:
    """Where one target weight comes from: an original key, and for `attn.kv` which half (0 keys, 1 values)."""

    key: str
    half: int | None = None


# (pattern on our key, template of the original key, half of `attn.kv` or None). `{stage}` is 1-based in the
# original code and 0-based here; `{layer}` and `{param}` (`weight`/`bias`) pass through unchanged.
_PATCH = r"pvt\.encoder\.patch_embeddings\.(?P<stage>\d+)\."
_LAYER = r"pvt\.encoder\.block\.(?P<stage>\d+)\.(?P<layer>\d+)\."
_PARAM = r"\.(?P<param>weight|bias)"
_ORIGINAL_LAYER = "block{stage}.{layer}."
_RULES: list[tuple[re.Pattern[str], str, int | None]] = [
    (re.compile(pattern), template, half)
    for pattern, template, half in [
        (_PATCH + "projection" + _PARAM, "patch_embed{stage}.proj.{param}", None),
        (_PATCH + "layer_norm" + _PARAM, "patch_embed{stage}.norm.{param}", None),
        (_PATCH + "position_embeddings", "pos_embed{stage}", None),
        (_PATCH + "cls_token", "cls_token", None),
        (_LAYER + "layer_norm_1" + _PARAM, _ORIGINAL_LAYER + "norm1.{param}", None),
        (_LAYER + r"attention\.self\.query" + _PARAM, _ORIGINAL_LAYER + "attn.q.{param}", None),
        (_LAYER + r"attention\.self\.key" + _PARAM, _ORIGINAL_LAYER + "attn.kv.{param}", 0),
        (_LAYER + r"attention\.self\.value" + _PARAM, _ORIGINAL_LAYER + "attn.kv.{param}", 1),
        (_LAYER + r"attention\.self\.sequence_reduction" + _PARAM, _ORIGINAL_LAYER + "attn.sr.{param}", None),
        (_LAYER + r"attention\.self\.layer_norm" + _PARAM, _ORIGINAL_LAYER + "attn.norm.{param}", None),
        (_LAYER + r"attention\.output\.dense" + _PARAM, _ORIGINAL_LAYER + "attn.proj.{param}", None),
        (_LAYER + "layer_norm_2" + _PARAM, _ORIGINAL_LAYER + "norm2.{param}", None),
        (_LAYER + r"mlp\.dense1" + _PARAM, _ORIGINAL_LAYER + "mlp.fc1.{param}", None),
        (_LAYER + r"mlp\.dense2" + _PARAM, _ORIGINAL_LAYER + "mlp.fc2.{param}", None),
        (r"pvt\.encoder\.layer_norm" + _PARAM, "norm.{param}", None),
        (r"classifier" + _PARAM, "head.{param}", None),
    ]
]


def original_source(target_key: str, config: PvtConfig) -> OriginalSource:
    """The original key (and `attn.kv` half) that one of our state-dict keys is converted from."""
    for pattern, template, half in _RULES:
        match = pattern.fullmatch(target_key)
        if match is None:
            continue
        groups = match.groupdict()
        if "stage" in groups:
            stage = int(groups["stage"])
            if template == "cls_token" and stage != config.num_encoder_blocks - 1:
                break  # the original code has one class token, in the last stage
            groups["stage"] = str(stage + 1)
        return OriginalSource(template.format(**groups), half)
    raise CheckpointConversionError(
        f"The model has a weight {target_key!r} that no rule maps to the original checkpoint layout; the conversion "
        "rules in modeling_pvt/convert.py must be updated for it."
    )


def _target_shapes(config: PvtConfig) -> dict[str, tuple[int, ...]]:
    from .model_facts import build_on_meta

    return {key: tuple(tensor.shape) for key, tensor in build_on_meta(config).state_dict().items()}


def _conversion_plan(config: PvtConfig) -> tuple[dict[str, OriginalSource], dict[str, tuple[int, ...]]]:
    """For every key of `PvtForImageClassification(config)`'s state dict, the original key it comes from; and the
    shape of every original key."""
    plan, original_shapes = {}, {}
    for target_key, shape in _target_shapes(config).items():
        source = plan[target_key] = original_source(target_key, config)
        # Keys and values are stacked along the output dimension of `attn.kv`.
        original_shapes[source.key] = shape if source.half is None else (2 * shape[0], *shape[1:])
    return plan, original_shapes


def expected_original_shapes(config: PvtConfig) -> dict[str, tuple[int, ...]]:
    """The key layout and shapes an original checkpoint of this configuration has."""
    return _conversion_plan(config)[1]


def _checkpoint_depths(keys: list[str]) -> list[int]:
    layers: dict[int, set[int]] = {}
    for key in keys:
        match = re.match(r"block(\d+)\.(\d+)\.", key)
        if match:
            layers.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    return [len(layers[stage]) for stage in sorted(layers)]


def _size_hint(keys: list[str], config: PvtConfig) -> str:
    depths = _checkpoint_depths(keys)
    if not depths or depths == list(config.depths):
        return ""
    matching = [name for name, preset in PVT_PRESETS.items() if preset.get("depths") == depths]
    hint = f"\nThe checkpoint has {depths} layers per stage, the requested configuration {list(config.depths)}"
    return hint + (f": it looks like PVT-{matching[0]} (--size {matching[0]})." if matching else ".")


def _format_keys(title: str, lines: list[str], limit: int = 40) -> str:
    shown = "\n".join(f"  {line}" for line in lines[:limit])
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return f"{title} ({len(lines)}):\n{shown}{more}"


def convert_original_state_dict(
    original_state_dict: Mapping[str, torch.Tensor], config: PvtConfig
) -> dict[str, torch.Tensor]:
    """The original weights under our keys, with `attn.kv` split into key and value.

    Raises `CheckpointConversionError` naming every unknown key (in the checkpoint but not in the layout of
    `config`), every missing key and every shape mismatch, all at once.
    """
    non_tensors = sorted(key for key, value in original_state_dict.items() if not isinstance(value, torch.Tensor))
    if non_tensors:
        raise CheckpointConversionError(_format_keys("Entries of the state dict that are not tensors", non_tensors))
    plan, expected_shapes = _conversion_plan(config)
    unknown = sorted(set(original_state_dict) - set(expected_shapes))
    missing = sorted(set(expected_shapes) - set(original_state_dict))
    mismatched = sorted(
        f"{key}: checkpoint {tuple(original_state_dict[key].shape)}, expected {expected_shapes[key]}"
        for key in set(expected_shapes) & set(original_state_dict)
        if tuple(original_state_dict[key].shape) != expected_shapes[key]
    )
    if unknown or missing or mismatched:
        sections = [
            _format_keys(title, lines)
            for title, lines in (
                ("Unknown keys (no place in the model)", unknown),
                ("Missing keys (the model needs them)", missing),
                ("Shape mismatches", mismatched),
            )
            if lines
        ]
        raise CheckpointConversionError(
            "The checkpoint does not match the requested PVT configuration; nothing was converted.\n"
            + "\n".join(sections)
            + _size_hint(list(original_state_dict), config)
        )
    other_dtypes = sorted({str(tensor.dtype) for tensor in original_state_dict.values()} - {str(torch.float32)})
    if other_dtypes:
        # The model is float32, as the original training; say so rather than save a silently mixed-precision model.
        logger.warning("Casting checkpoint tensors of dtype %s to torch.float32.", ", ".join(other_dtypes))
    converted = {}
    for target_key, source in plan.items():
        tensor = original_state_dict[source.key]
        if source.half is not None:
            tensor = tensor.chunk(2, dim=0)[source.half]
        # Own, contiguous storage: safetensors refuses tensors that share memory (the two halves of `attn.kv`).
        converted[target_key] = tensor.detach().to(torch.float32, copy=True).contiguous()
    return converted


def extract_state_dict(checkpoint: object) -> dict[str, torch.Tensor]:
    """The weights of a loaded original checkpoint: the object itself, or its `"model"` entry (training checkpoints,
    which also hold optimiser, scheduler, epoch and arguments)."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointConversionError(
            f"Expected the checkpoint to hold a dict of weights, found a {type(checkpoint).__name__}."
        )
    if "model" in checkpoint:
        weights = checkpoint["model"]
        if not isinstance(weights, Mapping):
            raise CheckpointConversionError(
                f"The checkpoint's 'model' entry is a {type(weights).__name__}, not a dict of weights."
            )
        logger.info("Training checkpoint: taking the weights under 'model' (other entries: %s).", sorted(checkpoint))
        return dict(weights)
    return dict(checkpoint)


def load_original_checkpoint(path: str | Path, allow_unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load an original PVT checkpoint on CPU with `torch.load(weights_only=True)` and return its weights.

    A file that needs arbitrary unpickling (which can run any code) raises `UnsafeCheckpointError`, unless
    `allow_unsafe_pickle=True` says the user trusts it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}.")
    try:
        with torch.serialization.safe_globals(_EXTRA_SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not allow_unsafe_pickle:
            raise UnsafeCheckpointError(
                f"Refusing to load {path}: torch.load(weights_only=True) only rebuilds tensors and plain containers, "
                f"and this file also pickles {_unsafe_globals(path, error)}. Loading it fully would run whatever "
                "code such pickled objects name, which is how a malicious checkpoint takes over a machine. If you "
                f"trust this file, re-run with {UNSAFE_PICKLE_FLAG} (allow_unsafe_pickle=True)."
            ) from error
        logger.warning("Loading %s with full unpickling (weights_only=False) because allow_unsafe_pickle=True.", path)
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    return extract_state_dict(checkpoint)


def _unsafe_globals(path: Path, error: Exception) -> str:
    """The Python objects that made the restricted unpickler refuse a checkpoint, for the error message."""
    try:
        names = [
            name
            for name in torch.serialization.get_unsafe_globals_in_checkpoint(path)
            if name != f"{argparse.Namespace.__module__}.{argparse.Namespace.__qualname__}"
        ]
    except Exception:  # the listing is only for the message; the refusal stands either way
        names = []
    if names:
        return "these Python objects: " + ", ".join(sorted(names))
    reason = next((line.strip() for line in str(error).splitlines() if "Unsupported" in line), "")
    return f"objects it cannot rebuild ({reason or type(error).__name__})"


def imagenet_1k_id2label() -> dict[int, str]:
    """ImageNet-1k class names in the standard (sorted WordNet id) order, from the class list timm ships."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    return {index: info.index_to_description(index) for index in range(info.num_classes())}


def convert_checkpoint(
    checkpoint_path: str | Path,
    size: str,
    output_dir: str | Path,
    allow_unsafe_pickle: bool = False,
    overwrite: bool = False,
) -> Path:
    """Convert an original checkpoint of PVT-`size` into a `save_pretrained` folder (safetensors weights, config with
    ImageNet-1k labels, image processor) and check that the folder reloads to exactly the converted weights."""
    from .. import PvtForImageClassification, PvtImageProcessor

    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir} is not empty; choose an empty folder or pass overwrite=True.")
    if size not in PVT_PRESETS:
        raise ValueError(f"Unknown PVT size {size!r}; choose one of {sorted(PVT_PRESETS)}.")

    original_state_dict = load_original_checkpoint(checkpoint_path, allow_unsafe_pickle=allow_unsafe_pickle)
    id2label = imagenet_1k_id2label()
    config = PvtConfig.from_preset(size, id2label=id2label, label2id={name: index for index, name in id2label.items()})
    converted = convert_original_state_dict(original_state_dict, config)

    # Build without memory or initialisation, then take the converted tensors as the parameters themselves; the
    # strict load guarantees every parameter was assigned.
    with torch.device("meta"):
        model = PvtForImageClassification(config)
    model.load_state_dict(converted, strict=True, assign=True)
    still_meta = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if still_meta:
        raise CheckpointConversionError(_format_keys("Model tensors the conversion left without values", still_meta))
    model.eval()

    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    PvtImageProcessor().save_pretrained(output_dir)

    reloaded = PvtForImageClassification.from_pretrained(output_dir).state_dict()
    differing = sorted(set(reloaded) ^ set(converted))
    differing += sorted(
        key for key, tensor in converted.items() if key in reloaded and not torch.equal(reloaded[key], tensor)
    )
    if differing:
        raise CheckpointConversionError(_format_keys("Weights that did not survive saving and reloading", differing))
    logger.info("Converted %s (PVT-%s, %d tensors) into %s.", checkpoint_path, size, len(converted), output_dir)
    return output_dir


__all__ = [
    "UNSAFE_PICKLE_FLAG",
    "CheckpointConversionError",
    "OriginalSource",
    "UnsafeCheckpointError",
    "convert_checkpoint",
    "convert_original_state_dict",
    "expected_original_shapes",
    "extract_state_dict",
    "imagenet_1k_id2label",
    "load_original_checkpoint",
    "original_source",
]
