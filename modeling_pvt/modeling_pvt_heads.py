"""transformers' detection and segmentation heads on a `PvtBackbone`, under the configs of `configuration_pvt_heads`.

The heads are transformers' own, unchanged: they build their backbone with `AutoBackbone.from_config`, so this file
registers `PvtBackbone` for `PvtConfig` when it is imported. That is what lets a saved folder run through
`trust_remote_code=True` in a process that never imports the package: transformers imports this file (and the files
it imports) from the folder.

The classes keep the names of transformers' classes they extend: transformers' pipelines recognise a model of their
task by its class name (any other name logs "not supported"), and derive the loss from it.
"""

import transformers
from transformers import AutoBackbone

from .configuration_pvt import PvtConfig
from .configuration_pvt_heads import (
    PvtConditionalDetrConfig,
    PvtDeformableDetrConfig,
    PvtDetrConfig,
    PvtRTDetrConfig,
    PvtUperNetConfig,
)
from .modeling_pvt import PvtBackbone

AutoBackbone.register(PvtConfig, PvtBackbone, exist_ok=True)


class PvtBackboneHeadMixin:
    """Gives the head a backbone config of this file's `PvtConfig` class, the one registered above. Run as remote
    code from a local folder, transformers imports the config file and this file each in a copy of its own, so the
    config it passes in may hold another copy's `PvtConfig`, which AutoBackbone would not recognise."""

    def __init__(self, config, *args, **kwargs):
        if not isinstance(config.backbone_config, PvtConfig):
            config.backbone_config = PvtConfig.from_dict(config.backbone_config.to_dict())
        super().__init__(config, *args, **kwargs)


class DetrForObjectDetection(PvtBackboneHeadMixin, transformers.DetrForObjectDetection):
    config_class = PvtDetrConfig


class ConditionalDetrForObjectDetection(PvtBackboneHeadMixin, transformers.ConditionalDetrForObjectDetection):
    config_class = PvtConditionalDetrConfig


class DeformableDetrForObjectDetection(PvtBackboneHeadMixin, transformers.DeformableDetrForObjectDetection):
    config_class = PvtDeformableDetrConfig


class RTDetrForObjectDetection(PvtBackboneHeadMixin, transformers.RTDetrForObjectDetection):
    config_class = PvtRTDetrConfig


class UperNetForSemanticSegmentation(PvtBackboneHeadMixin, transformers.UperNetForSemanticSegmentation):
    config_class = PvtUperNetConfig


__all__ = [
    "ConditionalDetrForObjectDetection",
    "DeformableDetrForObjectDetection",
    "DetrForObjectDetection",
    "RTDetrForObjectDetection",
    "UperNetForSemanticSegmentation",
]
