"""Configurations of transformers' detection and segmentation heads on a PVT backbone, each with a model type of its
own (`pvt_detr`, ..., `pvt_upernet`).

The stock configs resolve a `backbone_config` of model type `pvt` to transformers' built-in PVT, which has no
backbone class, so a saved detector could not be built again without this package. These subclasses read it as this
package's `PvtConfig` instead; their own model type makes plain transformers ask for `trust_remote_code=True` rather
than build the stock head and fail inside AutoBackbone.
"""

from transformers import (
    ConditionalDetrConfig,
    DeformableDetrConfig,
    DetrConfig,
    PreTrainedConfig,
    RTDetrConfig,
    UperNetConfig,
)

from .configuration_pvt import PvtConfig


class PvtBackboneConfigMixin:
    """Reads `backbone_config` (a `PvtConfig`, or a dict of model type `pvt` as config.json holds it) as this
    package's `PvtConfig`, keeping only the architecture: a classification checkpoint's `auto_map`, path and
    architectures would send transformers looking for remote code that the head's folder does not hold."""

    def __post_init__(self, **kwargs):
        backbone_config = self.backbone_config
        if isinstance(backbone_config, PreTrainedConfig):
            if not isinstance(backbone_config, PvtConfig):
                raise ValueError(
                    f"{type(self).__name__} takes a PVT backbone (a PvtConfig), got a "
                    f"{type(backbone_config).__name__}; transformers' own config of this head takes other backbones."
                )
            backbone_config = backbone_config.to_dict()
        if isinstance(backbone_config, dict) and backbone_config.get("model_type") == PvtConfig.model_type:
            settings = {
                key: value
                for key, value in backbone_config.items()
                if key not in ("auto_map", "_name_or_path", "architectures")
            }
            self.backbone_config = PvtConfig.from_dict(settings)
        super().__post_init__(**kwargs)
        # The stock config checks its fields against each other in its own `__init__` only, which these subclasses
        # do not run: without this, e.g. two-stage Deformable DETR without box refinement would fail in the forward.
        self.validate()


class PvtDetrConfig(PvtBackboneConfigMixin, DetrConfig):
    model_type = "pvt_detr"


class PvtConditionalDetrConfig(PvtBackboneConfigMixin, ConditionalDetrConfig):
    model_type = "pvt_conditional_detr"


class PvtDeformableDetrConfig(PvtBackboneConfigMixin, DeformableDetrConfig):
    model_type = "pvt_deformable_detr"


class PvtRTDetrConfig(PvtBackboneConfigMixin, RTDetrConfig):
    model_type = "pvt_rt_detr"


class PvtUperNetConfig(PvtBackboneConfigMixin, UperNetConfig):
    model_type = "pvt_upernet"


__all__ = [
    "PvtConditionalDetrConfig",
    "PvtDeformableDetrConfig",
    "PvtDetrConfig",
    "PvtRTDetrConfig",
    "PvtUperNetConfig",
]
