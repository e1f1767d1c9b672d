"""Pyramid Vision Transformer (PVT v1) for the Hugging Face ecosystem.

Importing the package makes the Auto classes resolve the `pvt` model type to this package's implementation, and
a model's `save_pretrained` writes an `auto_map` and the code files, so a saved folder also runs this code through
`trust_remote_code=True`. The image processor's `preprocessor_config.json` stays in the standard format, with no
`auto_map` of its own: with one, transformers' pipelines stop to ask about remote code even when it is not wanted.
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForObjectDetection,
    AutoModelForSemanticSegmentation,
)

from . import modeling_pvt_heads
from .configuration_pvt import PVT_PRESETS, PvtConfig
from .image_processing_pvt import PvtImageProcessor
from .modeling_pvt import PvtBackbone, PvtForImageClassification, PvtModel, PvtPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(PvtConfig.model_type, PvtConfig, exist_ok=True)
AutoModel.register(PvtConfig, PvtModel, exist_ok=True)
AutoModelForImageClassification.register(PvtConfig, PvtForImageClassification, exist_ok=True)
AutoBackbone.register(PvtConfig, PvtBackbone, exist_ok=True)
AutoImageProcessor.register(
    PvtConfig, image_processor_classes={"pil": PvtImageProcessor, "torchvision": PvtImageProcessor}, exist_ok=True
)

PvtConfig.register_for_auto_class()
PvtModel.register_for_auto_class("AutoModel")
PvtForImageClassification.register_for_auto_class("AutoModelForImageClassification")
PvtBackbone.register_for_auto_class("AutoBackbone")

# The heads on a PVT backbone: their saved folders carry `configuration_pvt_heads.py`, `modeling_pvt_heads.py` and
# the files these import, with an `auto_map` to them.
for head, auto_class in (
    (modeling_pvt_heads.DetrForObjectDetection, AutoModelForObjectDetection),
    (modeling_pvt_heads.ConditionalDetrForObjectDetection, AutoModelForObjectDetection),
    (modeling_pvt_heads.DeformableDetrForObjectDetection, AutoModelForObjectDetection),
    (modeling_pvt_heads.RTDetrForObjectDetection, AutoModelForObjectDetection),
    (modeling_pvt_heads.UperNetForSemanticSegmentation, AutoModelForSemanticSegmentation),
):
    AutoConfig.register(head.config_class.model_type, head.config_class, exist_ok=True)
    auto_class.register(head.config_class, head, exist_ok=True)
    head.config_class.register_for_auto_class()
    head.register_for_auto_class(auto_class.__name__)

__all__ = [
    "PVT_PRESETS",
    "PvtBackbone",
    "PvtConfig",
    "PvtForImageClassification",
    "PvtImageProcessor",
    "PvtModel",
    "PvtPreTrainedModel",
]
