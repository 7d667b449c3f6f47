"""Transformers pipelines (`image-segmentation`, `object-detection`) that give Mask DINO's own defaults.

Transformers' pipelines pass their own defaults to the post-processing whether or not the user gave them
(`threshold=0.9` and `overlap_mask_area_threshold=0.5` for segmentation, `threshold=0.5` for detection). Those numbers
mean something else for Mask DINO's scores, so with them `pipeline("image-segmentation")` returned nothing. These
subclasses are registered as the implementation of the two tasks, but only for Mask DINO models: constructing one
with any other model returns the stock Transformers pipeline, built exactly as before (`_register()` in the
package `__init__` registers them by dotted path, so this module is imported when a pipeline is built). For Mask DINO
they:

* leave every argument the user did not pass to the processor (`None`), so the post-processing uses the official
  inference settings (`object_mask_threshold`, `overlap_threshold`, ...);
* return what `maskdino-hf predict` returns by default: the default subtask is the model's own task (panoptic for a
  panoptic model, semantic for a semantic-only one, else instance); instances and detections keep thing classes
  only when the model has stuff classes, scores >= [`~maskdino_hf.predict.DEFAULT_INSTANCE_THRESHOLD`] unless `threshold` is passed, and
  boxes clipped to the image; each instance's mask is its full binary mask (overlaps kept);
* still filter by an explicitly passed `threshold` (instances and detections: score; panoptic: query keep score).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image
from transformers.pipelines.image_segmentation import ImageSegmentationPipeline
from transformers.pipelines.object_detection import ObjectDetectionPipeline

from .configuration_maskdino import MaskDINOConfig
from .image_processing_maskdino import clip_boxes
from .predict import DEFAULT_INSTANCE_THRESHOLD, default_task

SUBTASKS = ("panoptic", "instance", "semantic")


class _MaskDINOOnly:
    """Constructing the subclass with a model that is not Mask DINO returns `transformers_pipeline`, the stock
    Transformers pipeline it extends (Python then skips the subclass's `__init__`)."""

    transformers_pipeline: type

    def __new__(cls, *args, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        if getattr(getattr(model, "config", None), "model_type", None) != MaskDINOConfig.model_type:
            return cls.transformers_pipeline(*args, **kwargs)
        return super().__new__(cls)


def _things_only(image_processor) -> bool | None:
    """Stuff classes are not instances: dropped from instance and detection results when the model has them."""
    return True if image_processor.stuff_labels else None


def _mask_image(mask) -> Image.Image:
    return Image.fromarray(mask.cpu().numpy().astype(np.uint8) * 255, mode="L")


class MaskDINOImageSegmentationPipeline(_MaskDINOOnly, ImageSegmentationPipeline):
    """`image-segmentation` for Mask DINO with the official defaults (see the module docstring)."""

    transformers_pipeline = ImageSegmentationPipeline

    def default_subtask(self) -> str:
        """The model's own task, as `maskdino-hf predict` chooses it."""
        return default_task(self.image_processor)

    def postprocess(
        self,
        model_outputs,
        subtask: str | None = None,
        threshold: float | None = None,
        mask_threshold: float | None = None,
        overlap_mask_area_threshold: float | None = None,
    ) -> list[dict[str, Any]]:
        subtask = self.default_subtask() if subtask is None else subtask
        if subtask not in SUBTASKS:
            raise ValueError(f"subtask must be one of {SUBTASKS} (or None for the model's own), got {subtask!r}")
        processor, id2label = self.image_processor, self.model.config.id2label
        target_sizes = model_outputs["target_size"]
        mask_threshold = 0.5 if mask_threshold is None else mask_threshold
        if subtask == "semantic":
            segmentation = processor.post_process_semantic_segmentation(model_outputs, target_sizes=target_sizes)[0]
            return [
                {"score": None, "label": id2label[int(label)], "mask": _mask_image(segmentation == label)}
                for label in segmentation.unique()
            ]
        if subtask == "panoptic":
            result = processor.post_process_panoptic_segmentation(
                model_outputs,
                threshold=threshold,
                mask_threshold=mask_threshold,
                overlap_mask_area_threshold=overlap_mask_area_threshold,
                target_sizes=target_sizes,
            )[0]
            return [
                {
                    "score": segment["score"],
                    "label": id2label[segment["label_id"]],
                    "mask": _mask_image(result["segmentation"] == segment["id"]),
                }
                for segment in result["segments_info"]
            ]
        result = processor.post_process_instance_segmentation(
            model_outputs,
            threshold=DEFAULT_INSTANCE_THRESHOLD if threshold is None else threshold,
            mask_threshold=mask_threshold,
            overlap_mask_area_threshold=overlap_mask_area_threshold,
            target_sizes=target_sizes,
            panoptic_on=_things_only(processor),
        )[0]
        return [
            {"score": score, "label": id2label[label], "mask": _mask_image(mask)}
            for score, label, mask in zip(result["scores"].tolist(), result["labels"].tolist(), result["masks"])
        ]


class MaskDINOObjectDetectionPipeline(_MaskDINOOnly, ObjectDetectionPipeline):
    """`object-detection` for Mask DINO with the defaults of `maskdino-hf predict --task detection`."""

    transformers_pipeline = ObjectDetectionPipeline

    def postprocess(self, model_outputs, threshold: float | None = None) -> list[dict[str, Any]]:
        processor = self.image_processor
        target_size = model_outputs["target_size"]
        result = processor.post_process_object_detection(
            model_outputs,
            threshold=DEFAULT_INSTANCE_THRESHOLD if threshold is None else threshold,
            target_sizes=target_size,
            panoptic_on=_things_only(processor),
        )[0]
        height, width = (int(side) for side in target_size[0])
        boxes = clip_boxes(result["boxes"], height, width)
        return [
            {"score": score, "label": self.model.config.id2label[label], "box": self._get_bounding_box(box)}
            for score, label, box in zip(result["scores"].tolist(), result["labels"].tolist(), boxes)
        ]


__all__ = ["MaskDINOImageSegmentationPipeline", "MaskDINOObjectDetectionPipeline"]
