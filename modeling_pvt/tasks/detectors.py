"""Transformers object detectors on a PvtBackbone, and the image processor that goes with each.

The detectors are transformers' own under model types of their own (`modeling_pvt_heads`): a saved detector loads
after `import modeling_pvt`, or in plain transformers with `trust_remote_code=True` (the folder carries the code).
"""

import logging
from dataclasses import dataclass

import torch
from transformers import (
    ConditionalDetrImageProcessor,
    DeformableDetrImageProcessor,
    DetrImageProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    RTDetrImageProcessor,
)

from ..configuration_pvt import PvtConfig
from ..modeling_pvt import PvtBackbone
from ..modeling_pvt_heads import (
    ConditionalDetrForObjectDetection,
    DeformableDetrForObjectDetection,
    DetrForObjectDetection,
    RTDetrForObjectDetection,
)

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DetectorFamily:
    model_class: type
    processor_class: type
    backbone_stages: tuple[str, ...]
    """The PVT stages the detector reads: one map for DETR-style, three for the multi-scale detectors."""


DETECTORS = {
    "detr": DetectorFamily(DetrForObjectDetection, DetrImageProcessor, ("stage4",)),
    "conditional_detr": DetectorFamily(ConditionalDetrForObjectDetection, ConditionalDetrImageProcessor, ("stage4",)),
    "deformable_detr": DetectorFamily(
        DeformableDetrForObjectDetection, DeformableDetrImageProcessor, ("stage2", "stage3", "stage4")
    ),
    "rt_detr": DetectorFamily(RTDetrForObjectDetection, RTDetrImageProcessor, ("stage2", "stage3", "stage4")),
}


def build_detector_config(
    detector: str, backbone_config: PvtConfig, id2label: dict[int, str], **detector_kwargs
) -> PreTrainedConfig:
    """The detector's config with `backbone_config` (a PvtConfig) set to read the stages the detector needs."""
    if detector not in DETECTORS:
        raise ValueError(f"Unknown detector {detector!r}; choose one of {sorted(DETECTORS)}.")
    family = DETECTORS[detector]
    backbone_settings = backbone_config.to_dict()
    backbone_settings.update(out_features=list(family.backbone_stages), out_indices=None)
    backbone_config = PvtConfig.from_dict(backbone_settings)
    kwargs = {
        "backbone_config": backbone_config,
        "id2label": {int(key): value for key, value in id2label.items()},
        "label2id": {value: int(key) for key, value in id2label.items()},
    }
    if detector == "rt_detr":
        widths = [
            backbone_config.hidden_sizes[backbone_config.stage_names.index(stage)] for stage in family.backbone_stages
        ]
        kwargs.update(encoder_in_channels=widths, feat_strides=[8, 16, 32])
    else:
        kwargs.update(use_timm_backbone=False, use_pretrained_backbone=False, backbone=None)
        if detector == "deformable_detr":
            kwargs["num_feature_levels"] = len(family.backbone_stages) + 1  # plus one strided conv on the last map
    kwargs.update(detector_kwargs)
    return family.model_class.config_class(**kwargs)


def find_pvt_backbone(model: torch.nn.Module) -> PvtBackbone:
    """The PvtBackbone inside a detector (each family wraps it differently)."""
    for module in model.modules():
        if isinstance(module, PvtBackbone):
            return module
    raise ValueError(f"{type(model).__name__} has no PvtBackbone inside.")


def build_detector(
    detector: str, config: PreTrainedConfig, backbone_weights: PvtBackbone | None = None
) -> PreTrainedModel:
    """A randomly initialised detector, with the backbone's weights copied from `backbone_weights` if given."""
    model = DETECTORS[detector].model_class(config)
    if backbone_weights is not None:
        find_pvt_backbone(model).load_state_dict(backbone_weights.state_dict())
    return model


def build_image_processor(detector: str, size: dict[str, int], **kwargs):
    """The detector family's image processor: resize to `size`, ImageNet normalisation (what PVT was trained
    with), and padding with a pixel mask for the DETR family."""
    processor_kwargs = {"size": size, "do_normalize": True, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD}
    processor_kwargs.update(kwargs)
    return DETECTORS[detector].processor_class(**processor_kwargs)


def freeze_backbone_stages(model: torch.nn.Module, num_stages: int) -> None:
    """Freeze the first `num_stages` PVT stages (patch embedding and blocks): with few, high-resolution tokens they
    cost most of a training step, and a pretrained backbone's early stages need the least adapting."""
    backbone = find_pvt_backbone(model)
    for stage in range(num_stages):
        for module in (backbone.encoder.patch_embeddings[stage], backbone.encoder.block[stage]):
            module.requires_grad_(False)


def parameter_groups(
    model: torch.nn.Module, learning_rate: float, backbone_learning_rate: float, weight_decay: float
) -> list[dict]:
    """AdamW groups: the backbone at its own (lower) rate, the detection heads at `learning_rate`; no weight decay
    on biases, norms and embeddings (1-D tensors, position embeddings, query embeddings)."""
    backbone_ids = {id(parameter) for parameter in find_pvt_backbone(model).parameters()}
    groups = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        in_backbone = id(parameter) in backbone_ids
        decays = parameter.ndim > 1 and not name.endswith("position_embeddings") and "query" not in name
        key = (in_backbone, decays)
        if key not in groups:
            groups[key] = {
                "params": [],
                "lr": backbone_learning_rate if in_backbone else learning_rate,
                "weight_decay": weight_decay if decays else 0.0,
            }
        groups[key]["params"].append(parameter)
    return [groups[key] for key in sorted(groups)]
