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
from transformers.models.auto import modeling_auto
from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING

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
    # Mask DINO has no video processor. `pipeline(...)` loads one optionally, and without this entry derives the
    # non-existent `image_processing_maskdino.MaskDINOVideoProcessor` from the image processor's `auto_map` and asks
    # on stdin whether to run that custom code (15 s prompt) before giving up.
    # (`AutoVideoProcessor.register` does this, but `transformers.AutoVideoProcessor` is a dummy without torchvision.)
    VIDEO_PROCESSOR_MAPPING.register(MaskDINOConfig, {}, exist_ok=True)
    # The image-segmentation and object-detection pipelines check the model class against these name tables, not
    # against registered classes; list ours so they do not log "not supported" for it. The base-model table tells
    # code that reads it (Transformers' common tests among them) that `MaskDINOModel` is a headless base model.
    modeling_auto.MODEL_MAPPING_NAMES.setdefault(MaskDINOConfig.model_type, MaskDINOModel.__name__)
    for names in (
        modeling_auto.MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES,
        modeling_auto.MODEL_FOR_IMAGE_SEGMENTATION_MAPPING_NAMES,
        modeling_auto.MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES,
    ):
        names.setdefault(MaskDINOConfig.model_type, MaskDINOForUniversalSegmentation.__name__)


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
