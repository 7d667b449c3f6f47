"""Mask DINO as a Hugging Face Transformers model."""

from .configuration_maskdino import MaskDINOConfig

__all__ = ["MaskDINOConfig"]
