"""Pyramid Vision Transformer (PVT v1) for the Hugging Face ecosystem.

Importing the package makes the Auto classes resolve the `pvt` model type to this package's implementation, and
`save_pretrained` writes an `auto_map` so a saved folder also runs this code through `trust_remote_code=True`.
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
)

from .configuration_pvt import PVT_PRESETS, PvtConfig
from .image_processing_pvt import PvtImageProcessor
from .modeling_pvt import PvtBackbone, PvtForImageClassification, PvtModel, PvtPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(PvtConfig.model_type, PvtConfig, exist_ok=True)
AutoModel.register(PvtConfig, PvtModel, exist_ok=True)
AutoModelForImageClassification.register(PvtConfig, PvtForImageClassification, exist_ok=True)
AutoBackbone.register(PvtConfig, PvtBackbone, exist_ok=True)
AutoImageProcessor.register(PvtConfig, slow_image_processor_class=PvtImageProcessor, exist_ok=True)

PvtConfig.register_for_auto_class()
PvtModel.register_for_auto_class("AutoModel")
PvtForImageClassification.register_for_auto_class("AutoModelForImageClassification")
PvtBackbone.register_for_auto_class("AutoBackbone")
PvtImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "PVT_PRESETS",
    "PvtBackbone",
    "PvtConfig",
    "PvtForImageClassification",
    "PvtImageProcessor",
    "PvtModel",
    "PvtPreTrainedModel",
]
