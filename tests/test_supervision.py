"""Roboflow `supervision` reads Mask DINO's post-processing results with `sv.Detections.from_transformers`.

The model is the bundled demo model on a bundled image (five confident segments). For each result kind the
Detections must carry our masks, class ids and scores; boxes are supervision's own tight boxes of those masks
(instance / panoptic) or our predicted boxes (detection).
"""

from __future__ import annotations

import numpy as np
import pytest
import supervision as sv  # the test extra installs it; a missing one is a failure
import torch
from PIL import Image

from maskdino_hf import MaskDINOForUniversalSegmentation, MaskDINOImageProcessor, predict

pytestmark = pytest.mark.filterwarnings("ignore:OpenCV")


@pytest.fixture(scope="module")
def demo():
    folder = predict.demo_model_dir()
    model = MaskDINOForUniversalSegmentation.from_pretrained(folder).eval()
    processor = MaskDINOImageProcessor.from_pretrained(folder)
    image = Image.open(predict.demo_images()[0]).convert("RGB")
    with torch.no_grad():
        outputs = model(**processor(images=[image], return_tensors="pt"))
    return outputs, processor, [(image.height, image.width)], model.config.id2label


def tight_boxes(masks: np.ndarray) -> np.ndarray:
    """Inclusive (x_min, y_min, x_max, y_max) pixel boxes of binary masks, computed here independently."""
    boxes = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
    return np.array(boxes, dtype=float).reshape(-1, 4)


def assert_detections(detections, masks, labels, scores, id2label):
    assert len(detections) == len(labels) > 0
    np.testing.assert_array_equal(detections.mask, masks)
    np.testing.assert_array_equal(detections.class_id, labels)
    np.testing.assert_allclose(detections.confidence, scores, rtol=0, atol=0)
    np.testing.assert_allclose(detections.xyxy, tight_boxes(masks))
    assert detections.data["class_name"].tolist() == [id2label[label] for label in labels]


@pytest.mark.parametrize("return_binary_maps", [False, True])
def test_instance_results(demo, return_binary_maps):
    outputs, processor, target_sizes, id2label = demo
    result = processor.post_process_instance_segmentation(
        outputs, threshold=0.5, target_sizes=target_sizes, return_binary_maps=return_binary_maps
    )[0]
    detections = sv.Detections.from_transformers(result, id2label=id2label)
    non_empty = result["masks"].flatten(1).any(1)
    masks = result["masks"][non_empty].numpy()
    if not return_binary_maps:  # the segment map shows each pixel's best instance only
        shown = processor.post_process_instance_segmentation(outputs, threshold=0.5, target_sizes=target_sizes)[0]
        masks = np.stack([(shown["segmentation"] == i).numpy() for i in range(len(masks))])
        assert all(mask.any() for mask in masks)  # no instance of this image is fully hidden
    assert_detections(
        detections, masks, result["labels"][non_empty].numpy(), result["scores"][non_empty].numpy(), id2label
    )


def test_panoptic_results(demo):
    outputs, processor, target_sizes, id2label = demo
    result = processor.post_process_panoptic_segmentation(outputs, target_sizes=target_sizes)[0]
    detections = sv.Detections.from_transformers(result, id2label=id2label)
    segments = result["segments_info"]
    masks = np.stack([(result["segmentation"] == s["id"]).numpy() for s in segments])
    assert_detections(
        detections, masks, np.array([s["label_id"] for s in segments]), np.array([s["score"] for s in segments]),
        id2label,
    )  # fmt: skip
    assert sorted(detections.data["class_name"].tolist()) == sorted(id2label[s["label_id"]] for s in segments)
    assert {"circle", "rectangle", "triangle", "sky", "ground"} <= set(detections.data["class_name"].tolist())


def test_detection_results(demo):
    outputs, processor, target_sizes, id2label = demo
    result = processor.post_process_object_detection(outputs, threshold=0.5, target_sizes=target_sizes)[0]
    detections = sv.Detections.from_transformers(result, id2label=id2label)
    assert len(detections) == len(result["scores"]) > 0
    np.testing.assert_array_equal(detections.xyxy, result["boxes"].numpy())
    np.testing.assert_array_equal(detections.class_id, result["labels"].numpy())
    np.testing.assert_array_equal(detections.confidence, result["scores"].numpy())
    assert detections.mask is None


def test_semantic_results(demo):
    outputs, processor, target_sizes, id2label = demo
    segmentation = processor.post_process_semantic_segmentation(outputs, target_sizes=target_sizes)[0]
    for result in (segmentation, processor.post_process_semantic_segmentation(
        outputs, target_sizes=target_sizes, return_segmentation_scores=True
    )[0]):  # fmt: skip
        detections = sv.Detections.from_transformers(result, id2label=id2label)
        labels = segmentation.unique().numpy()
        masks = np.stack([(segmentation == label).numpy() for label in labels])
        np.testing.assert_array_equal(detections.class_id, labels)
        np.testing.assert_array_equal(detections.mask, masks)
        np.testing.assert_allclose(detections.xyxy, tight_boxes(masks))
