"""Pyramid Vision Transformer (PVT v1) for the Hugging Face ecosystem."""

from .configuration_pvt import PVT_PRESETS, PvtConfig

__all__ = ["PVT_PRESETS", "PvtConfig"]
