"""Mask DINO as a Hugging Face Transformers model.

Importing the package registers the MaskDINO classes with Transformers' Auto classes, so `AutoConfig`,
`AutoModel`, `AutoModelForUniversalSegmentation`, `AutoModelForImageSegmentation`, `AutoModelForObjectDetection`,
`AutoImageProcessor` and `pipeline(...)` resolve them.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageSegmentation,
    AutoModelForObjectDetection,
    AutoModelForUniversalSegmentation,
)

from .configuration_maskdino import MaskDINOConfig
from .image_processing_maskdino import MaskDINOImageProcessor
from .modeling_maskdino import (
    MaskDINOForUniversalSegmentation,
    MaskDINOForUniversalSegmentationOutput,
    MaskDINOModel,
    MaskDINOModelOutput,
    MaskDINOPreTrainedModel,
)


def _register() -> None:
    AutoConfig.register(MaskDINOConfig.model_type, MaskDINOConfig, exist_ok=True)
    AutoModel.register(MaskDINOConfig, MaskDINOModel, exist_ok=True)
    for auto_class in (AutoModelForUniversalSegmentation, AutoModelForImageSegmentation, AutoModelForObjectDetection):
        auto_class.register(MaskDINOConfig, MaskDINOForUniversalSegmentation, exist_ok=True)
    AutoImageProcessor.register(MaskDINOConfig, image_processor_classes={"pil": MaskDINOImageProcessor}, exist_ok=True)
    MaskDINOConfig.register_for_auto_class()
    MaskDINOModel.register_for_auto_class("AutoModel")
    MaskDINOForUniversalSegmentation.register_for_auto_class("AutoModelForUniversalSegmentation")
    MaskDINOImageProcessor.register_for_auto_class("AutoImageProcessor")


_register()

__all__ = [
    "MaskDINOConfig",
    "MaskDINOForUniversalSegmentation",
    "MaskDINOForUniversalSegmentationOutput",
    "MaskDINOImageProcessor",
    "MaskDINOModel",
    "MaskDINOModelOutput",
    "MaskDINOPreTrainedModel",
]
