"""Transformers pipelines on a saved Mask DINO folder: `image-segmentation` (instance / panoptic / semantic) and
`object-detection`, offline.

The model is the official `panoptic_r50_batch` fixture checkpoint (things 0-6, stuff 7-10) converted and saved with
readable label names; its input is the fixture PNG. Every pipeline result is checked against the processor's own
post-processing called directly on the same model outputs, with the kwargs the pipeline passes.
"""

from __future__ import annotations

import builtins
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, STUFF_LABELS, converted_model
from PIL import Image
from transformers import AutoConfig, pipeline

from maskdino_hf import MaskDINOForUniversalSegmentation, MaskDINOImageProcessor

CASE = "panoptic_r50_batch"
STUFF = STUFF_LABELS[CASE]
NUM_LABELS = 11
# readable names, so that a label shown by a pipeline can only come from the saved id2label
ID2LABEL = {i: (f"stuff-{i}" if i in STUFF else f"thing-{i}") for i in range(NUM_LABELS)}
IMAGES = [FIXTURES / CASE / "inputs" / f"image{i}_original.png" for i in (0, 1)]


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory) -> Path:
    model, processor = converted_model(CASE)
    folder = tmp_path_factory.mktemp("maskdino_pipeline")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    config = AutoConfig.from_pretrained(folder)  # relabel the saved copy; the shared converted model is untouched
    config.id2label = dict(ID2LABEL)
    config.label2id = {name: i for i, name in ID2LABEL.items()}
    config.save_pretrained(folder)
    return folder


class _Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def pipelines(saved_dir):
    """Both pipelines built from the folder, with stdin prompts and Transformers error logs turned into failures."""
    handler = _Errors()
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    original_input = builtins.input
    prompts = []

    def no_prompt(*args, **kwargs):
        prompts.append(args)  # Transformers swallows errors raised here, so record and check afterwards
        raise EOFError

    builtins.input = no_prompt
    try:
        built = {
            "segmentation": pipeline("image-segmentation", model=str(saved_dir)),
            "detection": pipeline("object-detection", model=str(saved_dir)),
        }
    finally:
        builtins.input = original_input
        transformers_logger.removeHandler(handler)
    assert prompts == []  # e.g. no "Do you wish to run the custom code?" for a derived MaskDINOVideoProcessor
    assert handler.messages == []  # e.g. no "model ... is not supported for image-segmentation"
    return built


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.open(IMAGES[0]).convert("RGB")


@pytest.fixture(scope="module")
def direct(saved_dir, image):
    """Model outputs for the image computed without the pipeline, and the processor used."""
    model = MaskDINOForUniversalSegmentation.from_pretrained(saved_dir).eval()
    processor = MaskDINOImageProcessor.from_pretrained(saved_dir)
    inputs = processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    return outputs, processor, [(image.height, image.width)]


def _mask_array(mask: Image.Image) -> np.ndarray:
    assert isinstance(mask, Image.Image) and mask.mode == "L"
    array = np.asarray(mask)
    assert set(np.unique(array).tolist()) <= {0, 255}
    return array


def test_pipelines_load_our_classes_from_the_folder(pipelines):
    for pipe in pipelines.values():
        assert type(pipe.model) is MaskDINOForUniversalSegmentation
        assert type(pipe.image_processor) is MaskDINOImageProcessor
        assert pipe.model.config.id2label == ID2LABEL
        assert not pipe.model.training


def test_instance_subtask_matches_the_processor(pipelines, direct, image):
    outputs, processor, target_sizes = direct
    results = pipelines["segmentation"](image, subtask="instance", threshold=0.3)
    expected = processor.post_process_instance_segmentation(
        outputs, threshold=0.3, mask_threshold=0.5, overlap_mask_area_threshold=0.5, target_sizes=target_sizes
    )[0]
    assert len(results) == len(expected["segments_info"]) > 0
    for result, segment in zip(results, expected["segments_info"], strict=True):
        assert set(result) == {"score", "label", "mask"}
        assert result["score"] == pytest.approx(segment["score"])
        assert result["label"] == ID2LABEL[segment["label_id"]]
        assert result["label"].startswith("thing-")  # a panoptic model's instances are things only
        assert result["mask"].size == image.size
        mask = _mask_array(result["mask"])
        np.testing.assert_array_equal(mask, (expected["segmentation"] == segment["id"]).numpy() * 255)
        # the shown region is the instance's own binary mask (minus what higher-scoring instances cover)
        assert not (mask.astype(bool) & ~expected["masks"][segment["id"]].numpy()).any()
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    # the pipeline default (0.9) keeps only instances above it
    high = pipelines["segmentation"](image, subtask="instance")
    assert all(r["score"] >= 0.9 for r in high)
    assert len(high) == sum(s["score"] >= 0.9 for s in expected["segments_info"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # pipeline defaults: threshold 0.9, overlap 0.5
        {"threshold": 0.25, "overlap_mask_area_threshold": 0.8},  # the official object_mask / overlap thresholds
    ],
)
def test_panoptic_subtask_matches_the_processor(pipelines, direct, image, kwargs):
    outputs, processor, target_sizes = direct
    results = pipelines["segmentation"](image, subtask="panoptic", **kwargs)
    call = {"threshold": 0.9, "mask_threshold": 0.5, "overlap_mask_area_threshold": 0.5, **kwargs}
    expected = processor.post_process_panoptic_segmentation(outputs, target_sizes=target_sizes, **call)[0]
    assert len(results) == len(expected["segments_info"]) > 0
    covered = np.zeros((image.height, image.width), dtype=bool)
    for result, segment in zip(results, expected["segments_info"], strict=True):
        assert result["score"] == pytest.approx(segment["score"])
        assert result["label"] == ID2LABEL[segment["label_id"]]
        mask = _mask_array(result["mask"]).astype(bool)
        np.testing.assert_array_equal(mask, (expected["segmentation"] == segment["id"]).numpy())
        assert mask.any() and not (mask & covered).any()  # panoptic segments are disjoint
        covered |= mask
    # stuff is fused: at most one segment per stuff class
    stuff_names = [r["label"] for r in results if r["label"].startswith("stuff-")]
    assert len(stuff_names) == len(set(stuff_names))
    if kwargs:
        assert stuff_names and any(r["label"].startswith("thing-") for r in results)


def test_default_subtask_is_panoptic(pipelines, image):
    default = pipelines["segmentation"](image)
    panoptic = pipelines["segmentation"](image, subtask="panoptic")
    assert [(r["score"], r["label"]) for r in default] == [(r["score"], r["label"]) for r in panoptic]


def test_semantic_subtask_matches_the_processor(pipelines, direct, image):
    outputs, processor, target_sizes = direct
    results = pipelines["segmentation"](image, subtask="semantic")
    expected = processor.post_process_semantic_segmentation(outputs, target_sizes=target_sizes)[0].numpy()
    classes = np.unique(expected)
    assert [r["label"] for r in results] == [ID2LABEL[int(c)] for c in classes]
    union = np.zeros(expected.shape, dtype=int)
    for result, class_id in zip(results, classes, strict=True):
        assert result["score"] is None
        mask = _mask_array(result["mask"]).astype(bool)
        np.testing.assert_array_equal(mask, expected == class_id)
        union += mask
    assert (union == 1).all()  # one class per pixel


def test_object_detection_matches_the_processor(pipelines, direct, image):
    outputs, processor, target_sizes = direct
    results = pipelines["detection"](image)
    expected = processor.post_process_object_detection(outputs, 0.5, torch.tensor(target_sizes))[0]
    assert len(results) == len(expected["scores"]) > 0
    for result, score, label, box in zip(
        results, expected["scores"], expected["labels"], expected["boxes"], strict=True
    ):
        assert set(result) == {"score", "label", "box"}
        assert result["score"] == pytest.approx(float(score))
        assert result["score"] >= 0.5
        assert result["label"] == ID2LABEL[int(label)]
        assert result["label"].startswith("thing-")
        xmin, ymin, xmax, ymax = box.int().tolist()
        assert result["box"] == {"xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax}
        assert xmin <= xmax and ymin <= ymax
    lower = pipelines["detection"](image, threshold=0.1)
    assert len(lower) >= len(results) and all(r["score"] >= 0.1 for r in lower)


def test_a_list_of_images_gives_one_result_list_per_image(pipelines):
    images = [Image.open(path).convert("RGB") for path in IMAGES]
    detections = pipelines["detection"](images)
    assert len(detections) == 2
    for image, result in zip(images, detections, strict=True):
        assert result == pipelines["detection"](image)
    segments = pipelines["segmentation"]([str(path) for path in IMAGES], subtask="panoptic")
    assert len(segments) == 2
    for image, result in zip(images, segments, strict=True):
        assert all(r["mask"].size == image.size for r in result)
