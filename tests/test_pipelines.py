"""Transformers pipelines on saved Mask DINO folders: `image-segmentation` (panoptic / instance / semantic / the
model's own subtask) and `object-detection`, offline.

Two models: the bundled demo model (`src/maskdino_hf/demo`, trained on the synthetic shapes) on a bundled image, and
the official `panoptic_r50_batch` fixture checkpoint (things 0-6, stuff 7-10) converted and saved with readable label
names, on the fixture PNG. With default arguments every pipeline result must be what `maskdino-hf predict` writes
for the same image with ITS defaults (labels, scores, masks, boxes); an explicit `threshold` filters by score; any
other model still gets the stock Transformers pipelines.
"""

from __future__ import annotations

import builtins
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, STUFF_LABELS, converted_model
from PIL import Image
from pycocotools import mask as coco_mask
from transformers import AutoConfig, pipeline
from transformers.pipelines.image_segmentation import ImageSegmentationPipeline
from transformers.pipelines.object_detection import ObjectDetectionPipeline

from maskdino_hf import MaskDINOForUniversalSegmentation, MaskDINOImageProcessor, cli, predict
from maskdino_hf.data import panoptic_ids
from maskdino_hf.pipelines import MaskDINOImageSegmentationPipeline, MaskDINOObjectDetectionPipeline

CASE = "panoptic_r50_batch"
STUFF = STUFF_LABELS[CASE]
NUM_LABELS = 11
# readable names, so that a label shown by a pipeline can only come from the saved id2label
ID2LABEL = {i: (f"stuff-{i}" if i in STUFF else f"thing-{i}") for i in range(NUM_LABELS)}
IMAGES = [FIXTURES / CASE / "inputs" / f"image{i}_original.png" for i in (0, 1)]
DEMO_IMAGE = predict.demo_images()[0]
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


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


def _build(folder: Path) -> dict:
    """Both pipelines built from a folder, with stdin prompts and Transformers error logs turned into failures."""
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
            "segmentation": pipeline("image-segmentation", model=str(folder)),
            "detection": pipeline("object-detection", model=str(folder)),
        }
    finally:
        builtins.input = original_input
        transformers_logger.removeHandler(handler)
    assert prompts == []  # e.g. no "Do you wish to run the custom code?" for a derived MaskDINOVideoProcessor
    assert handler.messages == []  # e.g. no "model ... is not supported for image-segmentation"
    return built


@pytest.fixture(scope="module")
def models(saved_dir) -> dict:
    """name -> (folder, image path, pipelines)."""
    demo = predict.demo_model_dir()
    return {
        "demo": (demo, DEMO_IMAGE, _build(demo)),
        "fixture": (saved_dir, IMAGES[0], _build(saved_dir)),
    }


_PREDICTIONS: dict = {}


def predict_defaults(folder: Path, image: Path, task: str | None, tmp_path_factory, threshold=None) -> dict:
    """What `maskdino-hf predict IMAGE --model FOLDER [--task TASK]` writes with its defaults (cached)."""
    key = (str(folder), str(image), task, threshold)
    if key not in _PREDICTIONS:
        output = tmp_path_factory.mktemp("predict")
        argv = ["predict", str(image), "--model", str(folder), "--output-dir", str(output), "--device", "cpu"]
        argv += ["--task", task] if task else []
        argv += ["--threshold", str(threshold)] if threshold is not None else []
        assert cli.main(argv) == 0
        report = json.loads((output / "predictions.json").read_text())
        report["folder"] = output
        _PREDICTIONS[key] = report
    return _PREDICTIONS[key]


def _mask_array(mask: Image.Image) -> np.ndarray:
    assert isinstance(mask, Image.Image) and mask.mode == "L"
    array = np.asarray(mask)
    assert set(np.unique(array).tolist()) <= {0, 255}
    return array.astype(bool)


def _assert_same_segments(results: list[dict], report: dict, id2label: dict, task: str) -> None:
    """Pipeline results equal the predict report of one image: labels, scores and masks, in the same order."""
    assert report["task"] == task
    annotations = report["annotations"]
    if task == "panoptic":
        (entry,) = annotations
        ids = panoptic_ids(Image.open(report["folder"] / entry["file_name"]))
        expected = [(s["label"], s["score"], ids == s["id"]) for s in entry["segments_info"]]
    elif task == "semantic":
        (entry,) = annotations
        label_map = np.asarray(Image.open(report["folder"] / entry["file_name"]))
        expected = [(c["label"], None, label_map == c["label_id"]) for c in entry["classes"]]
    else:
        expected = [
            (id2label[a["category_id"]], a["score"], coco_mask.decode(a["segmentation"]).astype(bool))
            for a in annotations
        ]
    assert len(expected) > 0, "predict found nothing: the comparison would be empty"
    assert [r["label"] for r in results] == [label for label, _, _ in expected]
    for result, (_, score, mask) in zip(results, expected, strict=True):
        assert result["score"] == (None if score is None else pytest.approx(score, rel=1e-6, abs=1e-7))
        np.testing.assert_array_equal(_mask_array(result["mask"]), mask)


# ------------------------------------------------------------------------------------------------ construction


@pytest.mark.parametrize("name", ["demo", "fixture"])
def test_pipelines_load_our_classes_from_the_folder(models, name):
    folder, _, built = models[name]
    assert type(built["segmentation"]) is MaskDINOImageSegmentationPipeline
    assert type(built["detection"]) is MaskDINOObjectDetectionPipeline
    for pipe in built.values():
        assert type(pipe.model) is MaskDINOForUniversalSegmentation
        assert type(pipe.image_processor) is MaskDINOImageProcessor
        assert not pipe.model.training
    if name == "fixture":
        assert built["segmentation"].model.config.id2label == ID2LABEL


def test_other_models_get_the_stock_transformers_pipelines():
    """The registered subclasses hand any other model to Transformers' own pipeline classes, unchanged."""
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig
    from transformers.models.detr.image_processing_pil_detr import DetrImageProcessorPil

    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                            out_features=["stage4"])  # fmt: skip
    config = DetrConfig(use_timm_backbone=False, backbone_config=backbone, d_model=32, encoder_layers=1,
                        decoder_layers=1, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
                        decoder_attention_heads=2, num_queries=5, num_labels=3)  # fmt: skip
    torch.manual_seed(0)
    model = DetrForObjectDetection(config).eval()
    processor = DetrImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96})
    image = Image.open(IMAGES[0]).convert("RGB")
    detector = pipeline("object-detection", model=model, image_processor=processor)
    assert type(detector) is ObjectDetectionPipeline
    stock = ObjectDetectionPipeline(model=model, image_processor=processor)
    assert detector(image, threshold=0.0) == stock(image, threshold=0.0)
    assert type(MaskDINOImageSegmentationPipeline(model=model, image_processor=processor)) is ImageSegmentationPipeline


# ------------------------------------------------------------------------------------------------ defaults = predict


@pytest.mark.parametrize("name", ["demo", "fixture"])
@pytest.mark.parametrize("subtask", [None, "panoptic", "instance", "semantic"])
def test_segmentation_defaults_return_what_predict_returns(models, name, subtask, tmp_path_factory):
    folder, image_path, built = models[name]
    config = built["segmentation"].model.config
    results = built["segmentation"](str(image_path), **({"subtask": subtask} if subtask else {}))
    report = predict_defaults(folder, image_path, subtask, tmp_path_factory)
    _assert_same_segments(results, report, config.id2label, subtask or report["task"])
    if subtask is None:
        assert report["task"] == "panoptic"  # both models are panoptic models: their own task
    if subtask == "instance":
        assert all(r["score"] >= 0.5 for r in results)  # predict's instance default
    if name == "demo" and subtask in (None, "panoptic"):
        # the bundled image is validation image 0 of the synthetic generator: every segment of its ground truth
        # (four shapes, sky and ground) is found, confidently
        from maskdino_hf.synthetic import generate_shapes_split

        truth = generate_shapes_split(1, image_size=((96, 128), (96, 128)), seed=0, split="validation")[0]
        expected = sorted(config.id2label[segment["category_id"]] for segment in truth["segments_info"])
        assert sorted(r["label"] for r in results) == expected
        assert min(r["score"] for r in results) > 0.99


def test_an_instance_model_defaults_to_instances(tmp_path_factory):
    """A converted instance-only checkpoint: the pipeline's own subtask is instance, as predict's."""
    model, processor = converted_model("instance_r50_mask2box")
    folder = tmp_path_factory.mktemp("maskdino_instance")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image_path = FIXTURES / "instance_r50_mask2box" / "inputs" / "image0_original.png"
    segmenter = pipeline("image-segmentation", model=str(folder))
    report = predict_defaults(folder, image_path, None, tmp_path_factory)
    assert report["task"] == "instance"
    _assert_same_segments(segmenter(str(image_path)), report, segmenter.model.config.id2label, "instance")


@pytest.mark.parametrize("name", ["demo", "fixture"])
def test_object_detection_defaults_return_what_predict_returns(models, name, tmp_path_factory):
    folder, image_path, built = models[name]
    id2label = built["detection"].model.config.id2label
    results = built["detection"](str(image_path))
    report = predict_defaults(folder, image_path, "detection", tmp_path_factory)
    assert len(report["annotations"]) > 0
    assert [r["label"] for r in results] == [id2label[a["category_id"]] for a in report["annotations"]]
    with Image.open(image_path) as image:
        width, height = image.size
    for result, annotation in zip(results, report["annotations"], strict=True):
        assert set(result) == {"score", "label", "box"}
        assert result["score"] == pytest.approx(annotation["score"], rel=1e-6, abs=1e-7)
        x, y, w, h = annotation["bbox"]  # predict's boxes, clipped to the image, as COCO xywh
        box = result["box"]
        assert (box["xmin"], box["ymin"]) == (int(x), int(y))
        assert abs(box["xmax"] - (x + w)) <= 1 and abs(box["ymax"] - (y + h)) <= 1
        assert 0 <= box["xmin"] <= box["xmax"] <= width and 0 <= box["ymin"] <= box["ymax"] <= height


# ------------------------------------------------------------------------------------------------ explicit arguments


@pytest.mark.parametrize("name", ["demo", "fixture"])
def test_explicit_threshold_filters_by_score(models, name, tmp_path_factory):
    folder, image_path, built = models[name]
    id2label = built["segmentation"].model.config.id2label
    low = built["segmentation"](str(image_path), subtask="instance", threshold=0.02)
    _assert_same_segments(
        low, predict_defaults(folder, image_path, "instance", tmp_path_factory, threshold=0.02), id2label, "instance"
    )
    default = built["segmentation"](str(image_path), subtask="instance")
    assert len(low) > len(default) and all(r["score"] >= 0.02 for r in low)
    high = built["segmentation"](str(image_path), subtask="instance", threshold=0.95)
    assert [r["score"] for r in high] == [r["score"] for r in low if r["score"] >= 0.95]
    detections = built["detection"](str(image_path), threshold=0.02)
    assert len(detections) >= len(built["detection"](str(image_path))) and all(r["score"] >= 0.02 for r in detections)
    cut = detections[1]["score"]  # keeps the two best
    confident = built["detection"](str(image_path), threshold=cut)
    assert confident == [r for r in detections if r["score"] >= cut] and 2 <= len(confident) < len(detections)
    # panoptic: the query keep threshold; 1.0 keeps nothing
    assert built["segmentation"](str(image_path), subtask="panoptic", threshold=1.0) == []


def test_explicit_panoptic_arguments_reach_the_processor(models):
    """`threshold`, `mask_threshold`, `overlap_mask_area_threshold` given to the pipeline are those of the
    processor's panoptic method (Mask DINO's meaning), the others stay official."""
    folder, image_path, built = models["fixture"]
    image = Image.open(image_path).convert("RGB")
    model = built["segmentation"].model
    processor = built["segmentation"].image_processor
    with torch.no_grad():
        outputs = model(**processor(images=[image], return_tensors="pt"))
    kwargs = {"threshold": 0.5, "overlap_mask_area_threshold": 0.6}
    results = built["segmentation"](image, subtask="panoptic", **kwargs)
    expected = processor.post_process_panoptic_segmentation(
        outputs, target_sizes=[(image.height, image.width)], **kwargs
    )[0]
    assert len(results) == len(expected["segments_info"]) > 0
    for result, segment in zip(results, expected["segments_info"], strict=True):
        assert result["score"] == pytest.approx(segment["score"])
        assert result["label"] == ID2LABEL[segment["label_id"]]
        np.testing.assert_array_equal(_mask_array(result["mask"]), (expected["segmentation"] == segment["id"]).numpy())
    stuff_names = [r["label"] for r in results if r["label"].startswith("stuff-")]
    assert stuff_names and len(stuff_names) == len(set(stuff_names))  # stuff still fused by default
    with pytest.raises(ValueError, match="subtask must be one of"):
        built["segmentation"](image, subtask="universal")


def test_a_list_of_images_gives_one_result_list_per_image(models):
    _, _, built = models["fixture"]
    images = [Image.open(path).convert("RGB") for path in IMAGES]
    detections = built["detection"](images)
    assert len(detections) == 2
    for image, result in zip(images, detections, strict=True):
        assert result == built["detection"](image) and len(result) > 0
    segments = built["segmentation"]([str(path) for path in IMAGES], subtask="panoptic")
    assert len(segments) == 2
    for image, result in zip(images, segments, strict=True):
        assert len(result) > 0 and all(r["mask"].size == image.size for r in result)
