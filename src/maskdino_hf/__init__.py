"""Mask DINO as a Hugging Face Transformers model.

Importing the package is cheap (no torch, no transformers): the classes are loaded on first use (PEP 562), and
the MaskDINO classes are registered with Transformers' Auto classes, so `AutoConfig`, `AutoModel`,
`AutoModelForUniversalSegmentation`, `AutoModelForImageSegmentation`, `AutoModelForObjectDetection`,
`AutoImageProcessor` and `pipeline(...)` resolve them:

- the model type ``maskdino`` is added to Transformers' lazy name tables as soon as its Auto machinery is imported
  (at once when it already is), with this package standing for the module ``transformers.models.maskdino``;
- resolving a class through those tables, or reading one from this package, runs :func:`_register`, which
  registers the classes themselves.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .configuration_maskdino import MaskDINOConfig
    from .image_processing_maskdino import MaskDINOImageProcessor
    from .modeling_maskdino import (
        MaskDINOForUniversalSegmentation,
        MaskDINOForUniversalSegmentationOutput,
        MaskDINOModel,
        MaskDINOModelOutput,
        MaskDINOPreTrainedModel,
    )

_LAZY_ATTRIBUTES = {
    "MaskDINOConfig": "configuration_maskdino",
    "MaskDINOImageProcessor": "image_processing_maskdino",
    "MaskDINOForUniversalSegmentation": "modeling_maskdino",
    "MaskDINOForUniversalSegmentationOutput": "modeling_maskdino",
    "MaskDINOModel": "modeling_maskdino",
    "MaskDINOModelOutput": "modeling_maskdino",
    "MaskDINOPreTrainedModel": "modeling_maskdino",
}
_MODEL_TYPE = "maskdino"
_CONFIG_AUTO = "transformers.models.auto.configuration_auto"
_registered = False


def _register() -> None:
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
    from .modeling_maskdino import MaskDINOForUniversalSegmentation, MaskDINOModel

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
    # The two tasks build Mask DINO's pipeline subclasses (official post-processing defaults, see `pipelines.py`),
    # which hand any other model to the stock Transformers pipeline. By dotted path: imported on first use.
    from transformers.pipelines import PIPELINE_REGISTRY

    for task, name in (
        ("image-segmentation", "MaskDINOImageSegmentationPipeline"),
        ("object-detection", "MaskDINOObjectDetectionPipeline"),
    ):
        entry = PIPELINE_REGISTRY.supported_tasks[task]
        PIPELINE_REGISTRY.supported_tasks[task] = {**entry, "impl": f"{__name__}.pipelines.{name}"}


def _ensure_registered() -> None:
    global _registered
    if not _registered:
        _registered = True
        _register()


def __getattr__(name: str) -> Any:
    """Loads a public class on first access (and registers the Auto classes then)."""
    module_name = _LAZY_ATTRIBUTES.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    _ensure_registered()
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_ATTRIBUTES))


def _add_to_name_tables(configuration_auto: Any) -> None:
    """Lists the ``maskdino`` model type in Transformers' lazy tables (config and image processor class names),
    resolved from ``transformers.models.maskdino``, which is this package: Transformers imports nothing of ours
    until a Mask DINO checkpoint is actually loaded."""
    from transformers.models.auto import auto_mappings

    sys.modules.setdefault(f"transformers.models.{_MODEL_TYPE}", sys.modules[__name__])
    configuration_auto.CONFIG_MAPPING_NAMES.setdefault(_MODEL_TYPE, "MaskDINOConfig")
    auto_mappings.IMAGE_PROCESSOR_MAPPING_NAMES.setdefault(_MODEL_TYPE, {"pil": "MaskDINOImageProcessor"})


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs a callback once, right after the module ``name`` has been executed (a post-import hook)."""

    def __init__(self, name: str, callback) -> None:
        self.name, self.callback, self.loader = name, callback, None

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            self.loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        self.callback(module)


if _CONFIG_AUTO in sys.modules:
    _add_to_name_tables(sys.modules[_CONFIG_AUTO])
else:
    sys.meta_path.insert(0, _AfterImport(_CONFIG_AUTO, _add_to_name_tables))

__all__ = sorted(_LAZY_ATTRIBUTES)
