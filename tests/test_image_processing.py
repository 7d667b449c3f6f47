"""Tests of `MaskDINOImageProcessor`: preprocessing, the official inference heads and training targets.

Ground truth is the official Mask DINO run stored in `tests/fixtures/official/<case>/` (see its README): the
processor must rebuild `inputs.safetensors:pixel_values` from the original PNGs and, fed the official final
outputs (`decoder.safetensors:pred_*`), return what the official model returned (`results.*`).
"""

from __future__ import annotations

import json
import warnings
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from pycocotools import mask as coco_mask
from safetensors.torch import load_file

from maskdino_hf.image_processing_maskdino import MaskDINOImageProcessor, get_resize_output_size

FIXTURES = Path(__file__).parent / "fixtures" / "official"
CASES = sorted(path.name for path in FIXTURES.iterdir() if (path / "case.json").is_file())
# Panoptic metadata registered for the fixtures (case READMEs, "panoptic metadata ... stuff ids").
STUFF_LABELS = {"panoptic_r50_batch": [7, 8, 9, 10], "panoptic_decoupled_box": [80, 81, 82, 83]}
# pycocotools' decode trips a numpy 2 deprecation warning inside pycocotools itself
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@cache
def load_case(name: str) -> dict:
    folder = FIXTURES / name
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    return {
        "folder": folder,
        "case": json.loads((folder / "case.json").read_text()),
        "cfg": cfg,
        "test": cfg["MODEL"]["MaskDINO"]["TEST"],
        "inputs": load_file(folder / "inputs.safetensors"),
        "decoder": load_file(folder / "decoder.safetensors"),
        "results": load_file(folder / "results.safetensors"),
        "results_json": json.loads((folder / "results.json").read_text()),
    }


def cases_with(flag: str) -> list[str]:
    return [name for name in CASES if load_case(name)["test"][flag]]


def processor_for(name: str) -> MaskDINOImageProcessor:
    data = load_case(name)
    cfg, test = data["cfg"], data["test"]
    return MaskDINOImageProcessor(
        size={"shortest_edge": data["case"]["min_size_test"], "longest_edge": data["case"]["max_size_test"]},
        size_divisibility=data["case"]["size_divisibility"],
        num_labels=cfg["MODEL"]["SEM_SEG_HEAD"]["NUM_CLASSES"],
        stuff_labels=STUFF_LABELS.get(name, []),
        test_topk_per_image=cfg["TEST"]["DETECTIONS_PER_IMAGE"],
        object_mask_threshold=test["OBJECT_MASK_THRESHOLD"],
        overlap_threshold=test["OVERLAP_THRESHOLD"],
        panoptic_temperature=test["PANO_TEMPERATURE"],
        panoptic_transform_eval=test["PANO_TRANSFORM_EVAL"],
        focus_on_box=test["TEST_FOUCUS_ON_BOX"],
        semantic_postprocessing_before_inference=test["SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE"],
        instance_on=test["INSTANCE_ON"],
        panoptic_on=test["PANOPTIC_ON"],
        semantic_on=test["SEMANTIC_ON"],
    )


def official_outputs(name: str, batch: slice = slice(None)) -> SimpleNamespace:
    decoder = load_case(name)["decoder"]
    return SimpleNamespace(
        class_queries_logits=decoder["pred_logits"][batch],
        masks_queries_logits=decoder["pred_masks"][batch],
        pred_boxes=decoder["pred_boxes"][batch],
    )


def sizes(name: str) -> dict:
    inputs = load_case(name)["inputs"]
    return {"target_sizes": inputs["original_sizes"].tolist(), "image_sizes": inputs["image_sizes"].tolist()}


def original_images(name: str) -> list[Image.Image]:
    count = len(load_case(name)["inputs"]["image_sizes"])
    return [
        Image.open(load_case(name)["folder"] / "inputs" / f"image{i}_original.png").convert("RGB")
        for i in range(count)
    ]


# ---------------------------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("name", CASES)
def test_preprocess_reproduces_official_pixel_values(name):
    inputs = load_case(name)["inputs"]
    encoded = processor_for(name)(original_images(name))
    assert encoded["pixel_values"].dtype == torch.float32
    assert encoded["pixel_values"].shape == inputs["pixel_values"].shape
    torch.testing.assert_close(encoded["pixel_values"], inputs["pixel_values"], atol=1e-5, rtol=0)
    assert encoded["pixel_mask"].dtype == torch.int64
    assert MaskDINOImageProcessor.image_sizes_from_pixel_mask(encoded["pixel_mask"]) == [
        tuple(size) for size in inputs["image_sizes"].tolist()
    ]
    for image_size, mask in zip(inputs["image_sizes"].tolist(), encoded["pixel_mask"], strict=True):
        assert int(mask.sum()) == image_size[0] * image_size[1]


@pytest.mark.parametrize("name", CASES)
def test_resize_rule_gives_official_resized_sizes(name):
    data = load_case(name)
    for original, resized in zip(
        data["inputs"]["original_sizes"].tolist(), data["inputs"]["image_sizes"].tolist(), strict=True
    ):
        assert get_resize_output_size(
            *original, data["case"]["min_size_test"], data["case"]["max_size_test"]
        ) == tuple(resized)


def test_resize_rule_caps_long_side_and_rounds_half_up():
    assert get_resize_output_size(480, 640, 800, 1333) == (800, 1067)  # 1066.67 -> 1067
    assert get_resize_output_size(100, 1000, 800, 1333) == (133, 1333)  # capped by the long side
    assert get_resize_output_size(640, 480, 800, None) == (1067, 800)
    assert get_resize_output_size(800, 800, 800, 1333) == (800, 800)


def test_input_layouts_and_types_give_the_same_batch():
    processor = MaskDINOImageProcessor(size={"shortest_edge": 32, "longest_edge": 64})
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    reference = processor(Image.fromarray(hwc))["pixel_values"]
    variants = [
        hwc,
        np.moveaxis(hwc, -1, 0),
        torch.from_numpy(hwc),
        torch.from_numpy(np.moveaxis(hwc, -1, 0).copy()),
        [hwc],
        np.concatenate([hwc, np.full((20, 30, 1), 7, dtype=np.uint8)], axis=-1),  # RGBA: alpha dropped
        Image.fromarray(np.concatenate([hwc, np.zeros((20, 30, 1), dtype=np.uint8)], axis=-1), mode="RGBA"),
        hwc.astype(np.int64),
    ]
    for variant in variants:
        torch.testing.assert_close(processor(variant)["pixel_values"], reference, atol=0, rtol=0)
    # a 4-D array is a batch
    assert processor(np.stack([hwc, hwc]))["pixel_values"].shape[0] == 2


def test_grayscale_is_repeated_to_rgb():
    processor = MaskDINOImageProcessor(size={"shortest_edge": 32, "longest_edge": 64})
    grey = np.random.default_rng(1).integers(0, 256, size=(20, 30), dtype=np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    reference = processor(rgb)["pixel_values"]
    for variant in (grey, grey[None], grey[..., None], Image.fromarray(grey), torch.from_numpy(grey)):
        torch.testing.assert_close(processor(variant)["pixel_values"], reference, atol=0, rtol=0)


def test_batch_of_different_sizes_is_padded_to_the_rounded_maximum():
    processor = MaskDINOImageProcessor(size={"shortest_edge": 40, "longest_edge": 100})
    images = [np.zeros((30, 50, 3), np.uint8), np.zeros((60, 20, 3), np.uint8)]
    encoded = processor(images)
    # (40, 67) and (100, 33) -> max (100, 67) -> multiples of 32: (128, 96)
    assert encoded["pixel_values"].shape == (2, 3, 128, 96)
    assert processor.image_sizes_from_pixel_mask(encoded["pixel_mask"]) == [(40, 67), (100, 33)]
    # padding is zero AFTER normalisation; real pixels are (0 - mean) / std
    assert torch.all(encoded["pixel_values"][0, :, 40:, :] == 0)
    assert torch.all(encoded["pixel_values"][0, :, :40, :67] < 0)


def test_float_images_are_taken_on_the_0_255_scale():
    image = np.random.default_rng(2).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    processor = MaskDINOImageProcessor(do_resize=False)
    torch.testing.assert_close(
        processor(image.astype(np.float32))["pixel_values"], processor(image)["pixel_values"], atol=0, rtol=0
    )
    # resized per channel without uint8 rounding: close to the uint8 path (within one grey level)
    processor = MaskDINOImageProcessor(size={"shortest_edge": 40, "longest_edge": 100})
    difference = processor(image.astype(np.float32))["pixel_values"] - processor(image)["pixel_values"]
    assert difference.abs().max() <= 1.0 / 57.0


def test_preprocess_switches():
    image = np.full((20, 30, 3), 100, np.uint8)
    processor = MaskDINOImageProcessor(do_resize=False, do_normalize=False, size_divisibility=0)
    encoded = processor(image)
    assert encoded["pixel_values"].shape == (1, 3, 20, 30)
    assert torch.all(encoded["pixel_values"] == 100)
    assert processor(image, do_pad=False, return_tensors="np")["pixel_values"].shape == (1, 3, 20, 30)
    with pytest.raises(ValueError, match="do_pad=False"):
        processor([image, np.zeros((10, 10, 3), np.uint8)], do_pad=False)


@pytest.mark.parametrize(
    ("bad_input", "error", "message"),
    [
        (np.zeros((6, 7, 2), np.uint8), ValueError, "channel axis"),
        (np.zeros((6, 7, 5), np.uint8), ValueError, "channel axis"),
        (np.zeros((5, 4, 6), np.uint8), ValueError, "channel axis"),
        (np.zeros((10,), np.uint8), ValueError, "dimensions"),
        (np.zeros((1, 1, 3, 4, 5), np.uint8), ValueError, "dimensions"),
        ([], ValueError, "empty"),
        ("image.png", TypeError, "PIL images, numpy arrays or torch tensors"),
        (None, TypeError, "PIL images, numpy arrays or torch tensors"),
        ([[np.zeros((4, 5, 3), np.uint8)]], TypeError, "nested"),
        (np.zeros((4, 5, 3), bool), TypeError, "dtype"),
        (np.full((4, 5, 3), 300, np.int32), ValueError, "0..255"),
    ],
)
def test_bad_images_raise_clear_errors(bad_input, error, message):
    with pytest.raises(error, match=message):
        MaskDINOImageProcessor()(bad_input)


def test_two_channels_with_explicit_layout_is_refused():
    with pytest.raises(ValueError, match="1, 3 or 4 channels, got 2"):
        MaskDINOImageProcessor()(np.zeros((2, 4, 5), np.uint8), input_data_format="channels_first")


def test_settings_round_trip_through_save_pretrained(tmp_path):
    processor = MaskDINOImageProcessor(
        size={"shortest_edge": 96, "longest_edge": 160},
        num_labels=11,
        stuff_labels=[10, 7, 8, 9],
        test_topk_per_image=50,
        object_mask_threshold=0.3,
        overlap_threshold=0.7,
        panoptic_temperature=0.1,
        panoptic_transform_eval=False,
        focus_on_box=True,
        semantic_postprocessing_before_inference=True,
        instance_on=False,
        panoptic_on=True,
        semantic_on=True,
    )
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["stuff_labels"] == [7, 8, 9, 10] and saved["test_topk_per_image"] == 50
    reloaded = MaskDINOImageProcessor.from_pretrained(tmp_path)
    for key in (
        "size", "image_mean", "image_std", "size_divisibility", "do_resize", "do_normalize", "do_pad", "num_labels",
        "stuff_labels", "test_topk_per_image", "object_mask_threshold", "overlap_threshold", "panoptic_temperature",
        "panoptic_transform_eval", "focus_on_box", "semantic_postprocessing_before_inference", "instance_on",
        "panoptic_on", "semantic_on", "ignore_index", "resample",
    ):  # fmt: skip
        assert getattr(reloaded, key) == getattr(processor, key), key
    assert reloaded.to_dict() == processor.to_dict()
    assert MaskDINOImageProcessor.from_pretrained(tmp_path, test_topk_per_image=7).test_topk_per_image == 7


def test_defaults_are_the_official_ones():
    processor = MaskDINOImageProcessor()
    assert processor.size == {"shortest_edge": 800, "longest_edge": 1333}
    assert processor.image_mean == [123.675, 116.28, 103.53] and processor.image_std == [58.395, 57.12, 57.375]
    assert processor.size_divisibility == 32 and processor.test_topk_per_image == 100
    assert processor.model_input_names == ["pixel_values", "pixel_mask"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": {"height": 10}}, "shortest_edge"),
        ({"image_mean": [1.0, 2.0]}, "image_mean"),
        ({"panoptic_temperature": 0.0}, "panoptic_temperature"),
        ({"num_labels": 5, "stuff_labels": [5]}, "stuff_labels"),
        ({"test_topk_per_image": 0}, "test_topk_per_image"),
        ({"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}, "0-255 scale"),
    ],
)
def test_nonsense_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskDINOImageProcessor(**kwargs)


# ---------------------------------------------------------------------------------------------- instance


def assert_instances_match_official(result, name, image_index, official_index=None):
    data = load_case(name)
    official_index = image_index if official_index is None else official_index
    prefix = f"{official_index}.instances."
    scores = data["results"][prefix + "scores"]
    order = torch.sort(scores, descending=True, stable=True).indices
    assert len(result["scores"]) == len(scores)
    torch.testing.assert_close(result["scores"], scores[order], atol=1e-4, rtol=0)
    assert torch.equal(result["labels"], data["results"][prefix + "pred_classes"][order])
    torch.testing.assert_close(result["boxes"], data["results"][prefix + "pred_boxes"][order], atol=1e-4, rtol=1e-5)

    official = data["results_json"][official_index]["instances"]
    expected = np.stack([coco_mask.decode(rle) for rle in official["pred_masks_rle"]]).astype(bool)[order.numpy()]
    ours = result["masks"].numpy()
    assert ours.shape == expected.shape
    position = {int(original): sorted_position for sorted_position, original in enumerate(order.tolist())}
    for instance, y, x in data["results_json"][official_index]["near_tie_pixels"].get("instances", []):
        expected[position[instance], y, x] = ours[position[instance], y, x]
    assert np.array_equal(ours, expected)


@pytest.mark.parametrize("name", cases_with("INSTANCE_ON"))
def test_instance_segmentation_matches_official(name):
    results = processor_for(name).post_process_instance_segmentation(official_outputs(name), **sizes(name))
    for image_index, result in enumerate(results):
        assert_instances_match_official(result, name, image_index)


@pytest.mark.parametrize("queries_per_chunk", [1, 7])
def test_instance_masks_resized_a_few_queries_at_a_time_match_official(monkeypatch, queries_per_chunk):
    """The kept queries' masks are resized in chunks (bounded memory at large sizes); any chunking gives the official
    results."""
    import maskdino_hf.image_processing_maskdino as module

    name = cases_with("INSTANCE_ON")[0]
    outputs = official_outputs(name)
    padded_area = 16 * outputs.masks_queries_logits.shape[-2] * outputs.masks_queries_logits.shape[-1]
    largest = max([padded_area] + [height * width for height, width in sizes(name)["target_sizes"]])
    monkeypatch.setattr(module, "RESIZE_CHUNK_VALUES", queries_per_chunk * largest)
    results = processor_for(name).post_process_instance_segmentation(outputs, **sizes(name))
    for image_index, result in enumerate(results):
        assert_instances_match_official(result, name, image_index)


def test_instance_results_of_a_panoptic_model_are_things_only():
    results = processor_for("panoptic_r50_batch").post_process_instance_segmentation(
        official_outputs("panoptic_r50_batch"), **sizes("panoptic_r50_batch")
    )
    for result in results:
        assert len(result["labels"]) < 100
        assert not torch.isin(result["labels"], torch.tensor(STUFF_LABELS["panoptic_r50_batch"])).any()


def test_instance_pipeline_fields_and_threshold():
    name = "instance_r50_mask2box"
    processor = processor_for(name)
    result = processor.post_process_instance_segmentation(official_outputs(name), **sizes(name))[0]
    segmentation = result["segmentation"]
    assert segmentation.shape == tuple(sizes(name)["target_sizes"][0])
    # Mask2Former's segments_info: every instance with a non-empty mask, ids 0, 1, ... in score order
    non_empty = result["masks"].flatten(1).any(1)
    assert 0 < int(non_empty.sum()) and len(result["segments_info"]) == int(non_empty.sum())
    assert [segment["id"] for segment in result["segments_info"]] == list(range(int(non_empty.sum())))
    assert [segment["label_id"] for segment in result["segments_info"]] == result["labels"][non_empty].tolist()
    assert [segment["score"] for segment in result["segments_info"]] == result["scores"][non_empty].tolist()
    assert all(segment["was_fused"] is False for segment in result["segments_info"])
    # every labelled pixel belongs to the highest-scoring instance covering it
    covered = result["masks"].any(0)
    assert torch.equal(segmentation >= 0, covered)
    first_owner = result["masks"][non_empty].float().argmax(0)
    assert torch.equal(segmentation[covered], first_owner[covered])
    # return_binary_maps: the segments' own masks, indexed by id (overlaps kept)
    binary = processor.post_process_instance_segmentation(
        official_outputs(name), return_binary_maps=True, **sizes(name)
    )[0]
    assert torch.equal(binary["segmentation"], result["masks"][non_empty])
    assert binary["segments_info"] == result["segments_info"]

    threshold = float(result["scores"][10])
    kept = processor.post_process_instance_segmentation(official_outputs(name), threshold=threshold, **sizes(name))[0]
    assert len(kept["scores"]) == int((result["scores"] >= threshold).sum()) == 11
    torch.testing.assert_close(kept["boxes"], result["boxes"][:11])

    coco = processor.post_process_instance_segmentation(
        official_outputs(name), return_coco_annotation=True, **sizes(name)
    )[0]
    assert np.array_equal(coco_mask.decode(coco["rle_masks"][0]).astype(bool), result["masks"][0].numpy())
    # Mask2Former's format: one run-length encoding per value of the segment map (-1 first), column-major runs
    values = segmentation.unique().tolist()
    assert len(coco["segmentation"]) == len(values)
    for value, runs in zip(values, coco["segmentation"], strict=True):
        assert sum(runs[1::2]) == int((segmentation == value).sum())
    with pytest.raises(ValueError, match="cannot both be True"):
        processor.post_process_instance_segmentation(
            official_outputs(name), return_coco_annotation=True, return_binary_maps=True, **sizes(name)
        )


def test_object_detection_uses_the_instance_topk_without_mask_rescoring():
    name = "instance_r50_mask2box"
    processor = processor_for(name)
    detections = processor.post_process_object_detection(official_outputs(name), **sizes(name))[0]
    logits = load_case(name)["decoder"]["pred_logits"][0]
    expected_scores = logits.sigmoid().flatten().topk(100).values
    torch.testing.assert_close(detections["scores"], expected_scores, atol=0, rtol=0)
    # same (label, box) pairs as the official instances, which only differ by the mask rescoring
    official = load_case(name)["results"]
    ours = {
        (int(label), tuple(np.round(box.numpy(), 3)))
        for label, box in zip(detections["labels"], detections["boxes"], strict=True)
    }
    theirs = {
        (int(label), tuple(np.round(box.numpy(), 3)))
        for label, box in zip(official["0.instances.pred_classes"], official["0.instances.pred_boxes"], strict=True)
    }
    assert ours == theirs
    assert len(
        processor.post_process_object_detection(official_outputs(name), threshold=0.7, **sizes(name))[0]["scores"]
    ) == int((expected_scores >= 0.7).sum())


# ---------------------------------------------------------------------------------------------- panoptic


def assert_panoptic_matches_official(result, name, official_index):
    data = load_case(name)
    expected = data["results"][f"{official_index}.panoptic_seg"]
    ours = result["segmentation"]
    assert ours.dtype == torch.int32 and ours.shape == expected.shape
    valid = torch.ones_like(expected, dtype=torch.bool)
    for y, x in data["results_json"][official_index]["near_tie_pixels"].get("panoptic", []):
        valid[y, x] = False
    # equal up to renumbering: a bijection between ids, void (0) maps to void
    pairs = set(zip(ours[valid].tolist(), expected[valid].tolist(), strict=True))
    forward = dict(pairs)
    assert len(forward) == len(pairs) == len(set(forward.values())), (
        f"ids are not in one-to-one correspondence: {pairs}"
    )
    assert forward.get(0, 0) == 0
    official_info = {s["id"]: s for s in data["results_json"][official_index]["panoptic_seg"]["segments_info"]}
    our_info = {s["id"]: s for s in result["segments_info"]}
    assert len(our_info) == len(official_info) > 0
    for our_id, official_id in forward.items():
        if our_id == 0:
            continue
        assert our_info[our_id]["label_id"] == official_info[official_id]["category_id"]
        assert our_info[our_id]["isthing"] == official_info[official_id]["isthing"]
        assert our_info[our_id]["was_fused"] == (not official_info[official_id]["isthing"])


@pytest.mark.parametrize("name", cases_with("PANOPTIC_ON"))
def test_panoptic_segmentation_matches_official(name):
    results = processor_for(name).post_process_panoptic_segmentation(official_outputs(name), **sizes(name))
    for image_index, result in enumerate(results):
        assert_panoptic_matches_official(result, name, image_index)


def test_panoptic_fuses_stuff_of_the_same_class_and_numbers_from_one():
    name = "panoptic_r50_batch"
    processor = processor_for(name)
    outputs = official_outputs(name)
    target = sizes(name)
    # label every query as the same stuff class with a confident score: all segments must share id 1
    logits = torch.full_like(outputs.class_queries_logits, -10.0)
    logits[..., 9] = 10.0
    fused = SimpleNamespace(class_queries_logits=logits, masks_queries_logits=outputs.masks_queries_logits)
    for result in processor.post_process_panoptic_segmentation(fused, **target):
        assert [segment["id"] for segment in result["segments_info"]] == [1]
        assert result["segments_info"][0]["was_fused"] and not result["segments_info"][0]["isthing"]
        assert set(result["segmentation"].unique().tolist()) <= {0, 1}
    # the same with fusion switched off gives several thing-like segments numbered 1..n
    for result in processor.post_process_panoptic_segmentation(fused, label_ids_to_fuse=[], **target):
        ids = [segment["id"] for segment in result["segments_info"]]
        assert ids == list(range(1, len(ids) + 1)) and len(ids) > 1
    # nothing above the threshold: all void
    empty = processor.post_process_panoptic_segmentation(fused, threshold=1.0, **target)
    assert all(r["segments_info"] == [] and not r["segmentation"].any() for r in empty)


def split_duplicates_outputs() -> SimpleNamespace:
    """One image (64 x 64 input, 16 x 16 masks), sigmoid classifier over classes (thing 0, stuff 1): queries 0 and
    1 both predict class 0 on the square rows/cols 4-11 of the mask maps, query 0 more confident on its left half and
    query 1 on its right half (so that each owns only half of its mask); query 2 is stuff 1 everywhere else."""
    masks = torch.full((1, 3, 16, 16), -8.0)
    masks[0, 0, 4:12, 4:12], masks[0, 1, 4:12, 4:12] = 4.0, 4.0
    masks[0, 0, 4:12, 4:8], masks[0, 1, 4:12, 8:12] = 6.0, 6.0
    masks[0, 2] = 6.0
    masks[0, 2, 4:12, 4:12] = -8.0
    logits = torch.full((1, 3, 2), -8.0)
    logits[0, 0, 0], logits[0, 1, 0], logits[0, 2, 1] = 2.0, 1.0, 3.0
    return SimpleNamespace(class_queries_logits=logits, masks_queries_logits=masks)


def test_mask_nms_keeps_one_of_two_queries_that_split_a_shape():
    """The official rule leaves a shape shared by two duplicate queries void; mask NMS gives it to the better one."""
    outputs = split_duplicates_outputs()
    square = torch.zeros(64, 64, dtype=torch.bool)
    square[16:48, 16:48] = True
    official = MaskDINOImageProcessor(num_labels=2, stuff_labels=[1]).post_process_panoptic_segmentation(outputs)[0]
    assert [s["label_id"] for s in official["segments_info"]] == [1]
    # both duplicates own half of their mask and are dropped: the square is void (its rim, blurred by the bilinear
    # upsampling, goes partly to the stuff query)
    assert (official["segmentation"][20:44, 20:44] == 0).all()

    processor = MaskDINOImageProcessor(num_labels=2, stuff_labels=[1], panoptic_mask_nms_threshold=0.5)
    result = processor.post_process_panoptic_segmentation(outputs)[0]
    thing = [s for s in result["segments_info"] if s["isthing"]]
    assert len(thing) == 1 and thing[0]["label_id"] == 0
    segment = result["segmentation"] == thing[0]["id"]
    assert segment[square].float().mean() > 0.9 and not segment[~square].any()
    assert (result["segmentation"][~square] > 0).all()  # the stuff query is untouched
    # 1.0 switches it off for one call (the duplicates' masks are identical: any lower threshold drops one)
    off = processor.post_process_panoptic_segmentation(outputs, mask_nms_threshold=1.0)[0]
    assert torch.equal(off["segmentation"], official["segmentation"])


def test_mask_nms_keeps_different_classes_and_stuff():
    outputs = split_duplicates_outputs()
    outputs.class_queries_logits[0, 1] = torch.tensor([-8.0, 1.0])  # query 1 becomes stuff on the same square
    kwargs = {"num_labels": 2, "stuff_labels": [1]}
    plain = MaskDINOImageProcessor(**kwargs).post_process_panoptic_segmentation(outputs)[0]
    nms = MaskDINOImageProcessor(**kwargs, panoptic_mask_nms_threshold=0.1).post_process_panoptic_segmentation(outputs)
    assert torch.equal(nms[0]["segmentation"], plain["segmentation"]) and nms[0]["segments_info"] == plain[
        "segments_info"]
    # two stuff queries of one class are both kept: panoptic merging fuses them into one segment
    outputs.class_queries_logits[0, 0] = torch.tensor([-8.0, 2.0])
    plain = MaskDINOImageProcessor(**kwargs).post_process_panoptic_segmentation(outputs)[0]
    nms = MaskDINOImageProcessor(**kwargs, panoptic_mask_nms_threshold=0.1).post_process_panoptic_segmentation(outputs)
    assert torch.equal(nms[0]["segmentation"], plain["segmentation"])


def test_mask_nms_threshold_is_saved_and_checked(tmp_path):
    MaskDINOImageProcessor(panoptic_mask_nms_threshold=0.5).save_pretrained(tmp_path)
    assert MaskDINOImageProcessor.from_pretrained(tmp_path).panoptic_mask_nms_threshold == 0.5
    assert MaskDINOImageProcessor().panoptic_mask_nms_threshold is None
    with pytest.raises(ValueError, match="panoptic_mask_nms_threshold must be in"):
        MaskDINOImageProcessor(panoptic_mask_nms_threshold=1.5)
    with pytest.raises(ValueError, match="mask_nms_threshold"):
        MaskDINOImageProcessor().post_process_panoptic_segmentation(split_duplicates_outputs(), mask_nms_threshold=-1)


# ---------------------------------------------------------------------------------------------- semantic


@pytest.mark.parametrize("masks_per_block", [None, 1, 7])
@pytest.mark.parametrize("count", [0, 1, 5, 300])
def test_instance_map_gives_each_pixel_its_first_covering_instance(monkeypatch, count, masks_per_block):
    """Whole or taken a block of masks at a time, the map is that of painting the instances best last."""
    import maskdino_hf.image_processing_maskdino as module

    if masks_per_block is not None:
        monkeypatch.setattr(module, "RESIZE_CHUNK_VALUES", masks_per_block * 9 * 11)
    masks = torch.rand(count, 9, 11, generator=torch.Generator().manual_seed(count)) > 0.97
    expected = torch.full((9, 11), -1, dtype=torch.int64)
    for instance in reversed(range(count)):  # the loop it replaces: better instances painted last
        expected[masks[instance]] = instance
    assert torch.equal(MaskDINOImageProcessor._instance_map(masks), expected)


@pytest.mark.parametrize("empty", [(), (0,), (2, 3, 7), tuple(range(8))])
def test_segment_map_numbers_the_non_empty_masks_without_copying_them_out(empty):
    """The segmentation of the instance results is the instance map of the non-empty masks alone, numbered in their
    order, whichever kept masks are empty."""
    masks = torch.rand(8, 9, 11, generator=torch.Generator().manual_seed(len(empty))) > 0.8
    masks[list(empty)] = False
    segment_rows = torch.nonzero(masks.flatten(1).any(1)).flatten()
    expected = MaskDINOImageProcessor._instance_map(masks[segment_rows])
    assert torch.equal(MaskDINOImageProcessor._segment_map(masks, segment_rows), expected)
    assert (expected >= 0).any() == bool(len(segment_rows))


@pytest.mark.parametrize("kind", ["permutation", "identity", "subset", "reversed subset", "none"])
def test_masks_reordered_in_place_equal_indexing(kind):
    """The score-ordered masks are written over the resized ones (no second full-size copy): the same rows as
    `masks[order]`, for any distinct indices, as the first `len(order)` rows of the same storage."""
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(12, 5, 6, generator=generator) > 0.5
    order = {
        "permutation": torch.randperm(12, generator=generator),
        "identity": torch.arange(12),
        "subset": torch.randperm(12, generator=generator)[:7],
        "reversed subset": torch.tensor([11, 3, 9, 0]),
        "none": torch.zeros(0, dtype=torch.int64),
    }[kind]
    expected = masks[order]
    reordered = MaskDINOImageProcessor._reorder_rows_(masks, order)
    assert torch.equal(reordered, expected)
    assert reordered.untyped_storage().data_ptr() == masks.untyped_storage().data_ptr()


@pytest.mark.parametrize("count", [1, 2, 33, 300])
def test_first_argmax_is_the_argmax_of_score_times_probability_with_ties(count):
    """The running maximum gives `(scores * probs).argmax(0)` and `probs.argmax(0)`, first index among ties."""
    from maskdino_hf.image_processing_maskdino import _first_argmax

    generator = torch.Generator().manual_seed(count)
    probs = (torch.rand(count, 17, 23, generator=generator) * 8).round() / 8  # coarse values: many ties
    scores = torch.rand(count, generator=generator)
    probs[count // 2], scores[count // 2] = probs[0], scores[0]  # an exact copy of query 0 later on
    assert torch.equal(_first_argmax(probs, scores), (scores.view(-1, 1, 1) * probs).argmax(0))
    assert torch.equal(_first_argmax(probs), probs.argmax(0))


def reference_panoptic_merge(mask_probs, scores, labels, mask_threshold, overlap, fuse):
    """The official `panoptic_inference` merging loop, one query at a time (the independent reference)."""
    segmentation = torch.zeros(mask_probs.shape[1:], dtype=torch.int32)
    owner = (scores.view(-1, 1, 1) * mask_probs).argmax(0)
    segments, stuff_ids, current = [], {}, 0
    for k in range(len(labels)):
        label = int(labels[k])
        owned = owner == k
        original_area = int((mask_probs[k] >= mask_threshold).sum())
        mask = owned & (mask_probs[k] >= mask_threshold)
        if int(owned.sum()) > 0 and original_area > 0 and int(mask.sum()) > 0:
            if int(owned.sum()) / original_area < overlap:
                continue
            if label in fuse and label in stuff_ids:
                segmentation[mask] = stuff_ids[label]
                continue
            current += 1
            if label in fuse:
                stuff_ids[label] = current
            segmentation[mask] = current
            segments.append(
                {"id": current, "label_id": label, "was_fused": label in fuse, "isthing": label not in fuse,
                 "score": float(scores[k])}
            )
    return segmentation, segments


@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.8, 1.0])
def test_vectorised_panoptic_merge_equals_the_official_loop(overlap):
    generator = torch.Generator().manual_seed(0)
    count, height, width = 24, 37, 53
    # Overlapping round blobs, with exact ties in score x probability on some pixels.
    centres = torch.rand(count, 2, 1, 1, generator=generator) * torch.tensor([height, width]).view(1, 2, 1, 1)
    radii = 4 + torch.rand(count, 1, 1, generator=generator) * 12
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    distance = ((ys - centres[:, 0]) ** 2 + (xs - centres[:, 1]) ** 2).sqrt()
    mask_probs = (3 * (1 - distance / radii)).sigmoid()
    mask_probs[3] = mask_probs[2]
    mask_probs[7, :10] = 0.0  # a query with no confident pixel in part of the image
    scores = torch.rand(count, generator=generator)
    scores[3] = scores[2]
    labels = torch.randint(0, 6, (count,), generator=generator)
    fuse = {4, 5}
    reference = reference_panoptic_merge(mask_probs, scores, labels, 0.5, overlap, fuse)
    ours = MaskDINOImageProcessor._compute_segments(
        mask_probs.clone(), scores, labels, 0.5, overlap, fuse, (height, width)
    )
    assert torch.equal(ours[0], reference[0])
    assert ours[1] == reference[1]
    if overlap <= 0.5:
        assert len(reference[1]) > 3, "too few segments for a useful comparison"


def reference_panoptic(processor, outputs, threshold, mask_threshold, overlap, fuse, target_sizes, image_sizes,
                       num_labels=None):
    """Panoptic inference written plainly: every kept query's mask resized alone (4x, crop, resize to the target
    size), then the official merging loop above."""
    results = []
    padded = (4 * outputs.masks_queries_logits.shape[-2], 4 * outputs.masks_queries_logits.shape[-1])
    for logits, masks, target, image in zip(
        outputs.class_queries_logits, outputs.masks_queries_logits, target_sizes, image_sizes, strict=True
    ):
        if num_labels is not None and logits.shape[-1] == num_labels + 1:
            scores, labels = logits.softmax(-1).max(-1)
            keep = (labels != num_labels) & (scores > threshold)
        else:
            scores, labels = logits.sigmoid().max(-1)
            keep = scores > threshold
            if processor.panoptic_transform_eval:
                scores, labels = torch.softmax(logits.sigmoid() / processor.panoptic_temperature, -1).max(-1)
        resized = []
        for mask in masks[keep]:
            full = torch.nn.functional.interpolate(mask[None, None], size=padded, mode="bilinear", align_corners=False)
            crop = full[..., : image[0], : image[1]]
            resized.append(
                torch.nn.functional.interpolate(crop, size=tuple(target), mode="bilinear", align_corners=False)[0, 0]
            )
        if not resized:
            results.append((torch.zeros(tuple(target), dtype=torch.int32), []))
            continue
        results.append(
            reference_panoptic_merge(
                torch.stack(resized).sigmoid(), scores[keep], labels[keep], mask_threshold, overlap, fuse
            )
        )
    return results


def random_panoptic_outputs(kind: str, seed: int) -> SimpleNamespace:
    """Random outputs of 2 images (queries x 8 classes, 16 x 24 mask logits) that stress the panoptic merging:
    `smooth`: 300 queries of weak, smooth masks and close scores (what random weights give: nearly every query kept,
    near-ties everywhere); `sharp`: saturated blobs (probabilities exactly 1 or 0), duplicated queries and scores
    (exact ties of score x probability), few classes (stuff merging); `coarse`: logits on a 0.5 grid (ties after
    resizing)."""
    generator = torch.Generator().manual_seed(seed)
    count = 300 if kind == "smooth" else 40
    logits = torch.randn(2, count, 8, generator=generator) * (0.5 if kind == "smooth" else 3.0)
    if kind == "smooth":
        coarse = torch.randn(2 * count, 1, 4, 6, generator=generator)
        masks = 0.5 * torch.nn.functional.interpolate(coarse, size=(16, 24), mode="bilinear", align_corners=False)
    else:
        ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(24.0), indexing="ij")
        centres = torch.rand(2 * count, 2, 1, 1, generator=generator) * torch.tensor([16.0, 24.0]).view(1, 2, 1, 1)
        radii = 1 + torch.rand(2 * count, 1, 1, generator=generator) * 4
        distance = ((ys - centres[:, 0]) ** 2 + (xs - centres[:, 1]) ** 2).sqrt()
        masks = (40.0 if kind == "sharp" else 2.0) * (1 - distance / radii)
        if kind == "coarse":
            masks = (masks * 2).round() / 2
    masks = masks.reshape(2, count, 16, 24)
    # exact copies of queries (same logits and mask), some in the other half of the queries
    logits[:, count // 2] = logits[:, 0]
    masks[:, count // 2] = masks[:, 0]
    logits[:, 7], masks[:, 7] = logits[:, 3], masks[:, 3]
    return SimpleNamespace(class_queries_logits=logits, masks_queries_logits=masks)


PANOPTIC_PROPERTY_CASES = [
    # kind, threshold, mask_threshold, overlap, label_ids_to_fuse, target_sizes, image_sizes, float64
    ("smooth", 0.25, 0.5, 0.2, None, [(64, 96), (64, 96)], [(64, 96), (64, 96)], False),
    ("smooth", 0.25, 0.5, 0.0, [1, 2], [(45, 67), (130, 150)], [(60, 90), (52, 60)], False),
    ("smooth", 0.0, 0.6, 0.5, [0, 1, 2, 3, 4, 5, 6, 7], [(30, 41), (64, 96)], [(60, 90), (64, 96)], True),
    ("sharp", 0.25, 0.5, 0.8, None, [(64, 96), (64, 96)], [(64, 96), (64, 96)], False),
    ("sharp", 0.1, 0.99, 1.0, [4, 5], [(120, 180), (33, 50)], [(60, 90), (44, 66)], False),
    ("sharp", 0.5, 1.0, 0.0, [4, 5], [(64, 96), (64, 96)], [(64, 96), (64, 96)], False),
    ("sharp", 0.25, 0.0, 0.0, [], [(64, 96), (48, 72)], [(64, 96), (64, 96)], True),
    ("coarse", 0.2, 0.5, 0.8, [2], [(64, 96), (50, 70)], [(64, 96), (50, 70)], False),
    ("coarse", 0.2, 0.5, 0.3, [2, 3], [(100, 140), (64, 96)], [(63, 95), (64, 96)], False),
    ("coarse", 1.0, 0.5, 0.8, None, [(64, 96), (64, 96)], [(64, 96), (64, 96)], False),
]


@pytest.mark.parametrize("case", range(len(PANOPTIC_PROPERTY_CASES)))
def test_panoptic_equals_a_plain_per_query_implementation(case):
    """The panoptic post-processing (only the queries that can own a pixel resized, vectorised merging) gives the
    ids, segments and scores of the plain one on random outputs full of ties, stuff merging and threshold edges."""
    kind, threshold, mask_threshold, overlap, fuse_ids, target_sizes, image_sizes, double = (
        PANOPTIC_PROPERTY_CASES[case]
    )
    outputs = random_panoptic_outputs(kind, seed=case)
    if double:
        outputs = SimpleNamespace(**{key: value.double() for key, value in vars(outputs).items()})
    processor = MaskDINOImageProcessor(num_labels=8, stuff_labels=[4, 5], panoptic_transform_eval=case % 2 == 0)
    ours = processor.post_process_panoptic_segmentation(
        outputs, threshold=threshold, mask_threshold=mask_threshold, overlap_mask_area_threshold=overlap,
        label_ids_to_fuse=fuse_ids, target_sizes=target_sizes, image_sizes=image_sizes,
    )
    fuse = {4, 5} if fuse_ids is None else set(fuse_ids)
    expected = reference_panoptic(
        processor, outputs, threshold, mask_threshold, overlap, fuse, target_sizes, image_sizes
    )
    for result, (segmentation, segments) in zip(ours, expected, strict=True):
        assert torch.equal(result["segmentation"], segmentation)
        assert [{**s, "score": None} for s in result["segments_info"]] == [{**s, "score": None} for s in segments]
        assert [s["score"] for s in result["segments_info"]] == pytest.approx([s["score"] for s in segments], abs=1e-4)
    if threshold < 1.0:
        assert any(len(segments) > 1 for _, segments in expected), "the case must produce segments"
    else:
        assert all(not segments and not segmentation.any() for segmentation, segments in expected)


def test_panoptic_of_a_softmax_classifier_equals_a_plain_per_query_implementation():
    outputs = random_panoptic_outputs("sharp", seed=11)
    outputs.class_queries_logits = torch.cat([outputs.class_queries_logits, torch.zeros(2, 40, 1)], dim=-1)
    processor = MaskDINOImageProcessor(num_labels=8, stuff_labels=[4, 5])
    sizes_ = {"target_sizes": [(64, 96), (40, 60)], "image_sizes": [(64, 96), (64, 96)]}
    ours = processor.post_process_panoptic_segmentation(outputs, threshold=0.1, num_labels=8, **sizes_)
    expected = reference_panoptic(processor, outputs, 0.1, 0.5, 0.8, {4, 5}, num_labels=8, **sizes_)
    for result, (segmentation, segments) in zip(ours, expected, strict=True):
        assert torch.equal(result["segmentation"], segmentation) and len(segments) > 1
        assert [s["id"] for s in result["segments_info"]] == [s["id"] for s in segments]


@pytest.mark.parametrize("kind", ["smooth", "sharp", "coarse"])
def test_possible_owners_hold_every_winning_query_and_leave_others_out(kind):
    """Every query that wins score x probability at some pixel, for crops and resizes up and down, is among the
    possible owners; and the screen leaves queries out (otherwise it would buy nothing)."""
    from maskdino_hf.image_processing_maskdino import _possible_owners

    outputs = random_panoptic_outputs(kind, seed=3)
    masks = outputs.masks_queries_logits[0]
    scores = torch.rand(masks.shape[0], generator=torch.Generator().manual_seed(3))
    possible = set(_possible_owners(scores, masks).tolist())
    assert len(possible) < masks.shape[0]
    for image, target in [((64, 96), (64, 96)), ((61, 89), (150, 200)), ((64, 96), (17, 23)), ((40, 50), (41, 49))]:
        resized = MaskDINOImageProcessor._upsample_crop_resize(masks, (64, 96), image, target).sigmoid()
        winners = set((scores.view(-1, 1, 1) * resized).argmax(0).unique().tolist())
        assert winners <= possible


@pytest.mark.parametrize("name", cases_with("SEMANTIC_ON"))
def test_semantic_segmentation_matches_official(name):
    processor = processor_for(name)
    results = processor.post_process_semantic_segmentation(
        official_outputs(name), return_segmentation_scores=True, **sizes(name)
    )
    for image_index, result in enumerate(results):
        expected = load_case(name)["results"][f"{image_index}.sem_seg"]
        torch.testing.assert_close(result.segmentation_scores, expected, atol=1e-4, rtol=0)
        assert torch.equal(result.segmentation, expected.argmax(0))
    maps = processor.post_process_semantic_segmentation(official_outputs(name), **sizes(name))
    assert all(torch.equal(m, r.segmentation) for m, r in zip(maps, results, strict=True))


@pytest.mark.parametrize("before_inference", [True, False], ids=["resize-then-score", "score-then-resize"])
@pytest.mark.parametrize("queries_per_chunk", [1, 7, 1000])
def test_semantic_scores_summed_over_query_chunks_equal_the_einsum(monkeypatch, before_inference, queries_per_chunk):
    """The score map is summed over chunks of queries whose full-size maps go through buffers reused chunk after
    chunk; any chunking gives the official `einsum("qc,qhw->chw")` of all the maps at once, in either order of
    resizing and scoring."""
    import maskdino_hf.image_processing_maskdino as module

    name = "semantic_r50_ade"
    processor = processor_for(name)
    processor.semantic_postprocessing_before_inference = before_inference
    monkeypatch.setattr(module, "_QUERY_CHUNK", queries_per_chunk)
    results = processor.post_process_semantic_segmentation(
        official_outputs(name), return_segmentation_scores=True, **sizes(name)
    )
    outputs, target_sizes, image_sizes, padded_size = processor._resolve_sizes(
        official_outputs(name), sizes(name)["target_sizes"], None
    )
    for index, result in enumerate(results):
        class_probs = outputs.class_queries_logits[index].softmax(-1)[:, :-1]
        masks = outputs.masks_queries_logits[index]
        (height, width), target_size = image_sizes[index], target_sizes[index]
        if before_inference:
            maps = processor._upsample_crop_resize(masks, padded_size, (height, width), target_size).sigmoid()
            expected = torch.einsum("qc,qhw->chw", class_probs, maps)
        else:
            maps = F.interpolate(masks[None], size=padded_size, mode="bilinear", align_corners=False)[0].sigmoid()
            expected = torch.einsum("qc,qhw->chw", class_probs, maps)[None, :, :height, :width]
            expected = F.interpolate(expected, size=target_size, mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(result.segmentation_scores, expected, atol=1e-5, rtol=0)
        assert torch.equal(result.segmentation, expected.argmax(0))


def test_semantic_only_model_computes_on_the_padded_input():
    # quirk 11: the semantic ADE model computes scores on the padded size and crops/resizes afterwards; the other
    # order gives (slightly) different scores, so the switch is really exercised
    name = "semantic_r50_ade"
    expected = load_case(name)["results"]["0.sem_seg"]
    processor = processor_for(name)
    processor.semantic_postprocessing_before_inference = True
    other = processor.post_process_semantic_segmentation(
        official_outputs(name), return_segmentation_scores=True, **sizes(name)
    )[0]
    assert (other.segmentation_scores - expected).abs().max() > 1e-4


def test_softmax_classifier_is_recognised_from_num_labels():
    name = "semantic_r50_ade"
    processor = processor_for(name)
    assert processor.num_labels == 9 and load_case(name)["decoder"]["pred_logits"].shape[-1] == 10
    with pytest.raises(ValueError, match="expected 7 .* or 8"):
        processor.post_process_semantic_segmentation(official_outputs(name), num_labels=7, **sizes(name))


def test_softmax_classifier_drops_the_no_object_logit_for_instances_and_panoptic():
    # not used by any released configuration (semantic CE models run semantic inference only); the rule is the
    # Mask2Former one: softmax probabilities without the last ("no object") logit
    name = "semantic_r50_ade"
    processor = processor_for(name)
    outputs = official_outputs(name)
    probabilities = outputs.class_queries_logits[0].softmax(-1)[:, :-1]
    detections = processor.post_process_object_detection(outputs, **sizes(name))[0]
    torch.testing.assert_close(detections["scores"], probabilities.flatten().topk(100).values, atol=0, rtol=0)
    assert int(detections["labels"].max()) < 9
    panoptic = processor.post_process_panoptic_segmentation(outputs, threshold=0.0, **sizes(name))[0]
    assert all(segment["label_id"] < 9 for segment in panoptic["segments_info"])


def test_pipeline_style_calls_work_without_image_sizes():
    # what transformers' image-segmentation pipeline passes: only target_sizes and its own thresholds
    name = "panoptic_r50_batch"
    processor = processor_for(name)
    outputs = official_outputs(name, slice(0, 1))
    target_sizes = sizes(name)["target_sizes"][:1]
    for method in (processor.post_process_panoptic_segmentation, processor.post_process_instance_segmentation):
        result = method(
            outputs, threshold=0.5, mask_threshold=0.5, overlap_mask_area_threshold=0.5, target_sizes=target_sizes
        )[0]
        assert result["segmentation"].shape == tuple(target_sizes[0])
        assert result["segments_info"]
        for segment in result["segments_info"]:
            assert isinstance(segment["label_id"], int) and isinstance(segment["score"], float)
        if method == processor.post_process_panoptic_segmentation:
            assert all((result["segmentation"] == segment["id"]).any() for segment in result["segments_info"])
    semantic = processor.post_process_semantic_segmentation(outputs, target_sizes=target_sizes)[0]
    assert semantic.shape == tuple(target_sizes[0]) and semantic.dtype == torch.int64


# ------------------------------------------------------------------------------------ all tasks, batches, errors


@pytest.mark.parametrize("name", CASES)
def test_universal_post_processing_returns_what_the_official_model_returns(name):
    results = processor_for(name).post_process_universal_segmentation(official_outputs(name), **sizes(name))
    test = load_case(name)["test"]
    for image_index, result in enumerate(results):
        assert ("sem_seg" in result) == test["SEMANTIC_ON"]
        assert ("panoptic_seg" in result) == test["PANOPTIC_ON"]
        assert ("instances" in result) == test["INSTANCE_ON"]
        if "instances" in result:
            assert_instances_match_official(result["instances"], name, image_index)
        if "panoptic_seg" in result:
            assert_panoptic_matches_official(result["panoptic_seg"], name, image_index)
        if "sem_seg" in result:
            expected = load_case(name)["results"][f"{image_index}.sem_seg"]
            torch.testing.assert_close(result["sem_seg"], expected, atol=1e-4, rtol=0)


def test_padded_batch_gives_the_same_results_as_each_image_alone():
    name = "panoptic_r50_batch"
    processor = processor_for(name)
    batch = sizes(name)
    together = processor.post_process_universal_segmentation(official_outputs(name), **batch)
    for index in range(2):
        alone_sizes = {key: value[index : index + 1] for key, value in batch.items()}
        alone = processor.post_process_universal_segmentation(
            official_outputs(name, slice(index, index + 1)), **alone_sizes
        )[0]
        assert torch.equal(alone["sem_seg"], together[index]["sem_seg"])
        assert torch.equal(alone["panoptic_seg"]["segmentation"], together[index]["panoptic_seg"]["segmentation"])
        assert alone["panoptic_seg"]["segments_info"] == together[index]["panoptic_seg"]["segments_info"]
        for key in ("scores", "labels", "boxes", "masks"):
            assert torch.equal(alone["instances"][key], together[index]["instances"][key])
        # and each slice still matches the official result of that image
        assert_instances_match_official(alone["instances"], name, 0, official_index=index)


@pytest.mark.parametrize("name", CASES)
def test_image_sizes_default_to_the_processor_resize_of_target_sizes(name):
    processor = processor_for(name)
    target_sizes = sizes(name)["target_sizes"]
    explicit = processor.post_process_semantic_segmentation(
        official_outputs(name), return_segmentation_scores=True, **sizes(name)
    )
    derived = processor.post_process_semantic_segmentation(
        official_outputs(name), target_sizes=torch.tensor(target_sizes), return_segmentation_scores=True
    )
    for a, b in zip(explicit, derived, strict=True):
        assert torch.equal(a.segmentation_scores, b.segmentation_scores)


def test_without_target_sizes_results_stay_at_the_resized_size():
    name = "instance_r50_mask2box"
    image_size = sizes(name)["image_sizes"][0]
    result = processor_for(name).post_process_instance_segmentation(official_outputs(name), image_sizes=[image_size])[
        0
    ]
    assert result["masks"].shape[1:] == tuple(image_size)
    semantic = processor_for(name).post_process_semantic_segmentation(official_outputs(name))[0]
    assert semantic.shape == (128, 192)  # padded input = 4 x mask size


def test_post_processing_errors_are_clear():
    name = "panoptic_r50_batch"
    processor = processor_for(name)
    outputs = official_outputs(name)
    with pytest.raises(ValueError, match="target_sizes has 1 entries but the outputs hold 2 images"):
        processor.post_process_instance_segmentation(outputs, target_sizes=[(84, 112)])
    with pytest.raises(ValueError, match="target_sizes has 3 entries"):
        processor.post_process_panoptic_segmentation(outputs, target_sizes=[(84, 112)] * 3)
    with pytest.raises(ValueError, match="image_sizes has 1 entries"):
        processor.post_process_semantic_segmentation(outputs, target_sizes=[(84, 112)] * 2, image_sizes=[(96, 128)])
    with pytest.raises(ValueError, match="larger than the padded input"):
        processor.post_process_semantic_segmentation(outputs, image_sizes=[(200, 128), (128, 96)])
    with pytest.raises(ValueError, match="pred_boxes"):
        processor.post_process_instance_segmentation(
            SimpleNamespace(
                class_queries_logits=outputs.class_queries_logits, masks_queries_logits=outputs.masks_queries_logits
            ),
            **sizes(name),
        )
    with pytest.raises(ValueError, match="masks_queries_logits"):
        processor.post_process_semantic_segmentation(
            SimpleNamespace(class_queries_logits=outputs.class_queries_logits)
        )
    with pytest.raises(ValueError, match="mask_threshold"):
        processor.post_process_instance_segmentation(outputs, mask_threshold=1.0, **sizes(name))


# ---------------------------------------------------------------------------------------------- training targets


def square_polygon(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def test_polygon_square_gives_the_expected_mask_and_box():
    processor = MaskDINOImageProcessor(do_resize=False, num_labels=5)
    image = np.zeros((40, 60, 3), np.uint8)
    annotation = {"annotations": [{"segmentation": square_polygon(10, 5, 30, 25), "category_id": 3, "iscrowd": 0}]}
    encoded = processor(image, annotations=annotation)
    assert encoded["pixel_values"].shape == (1, 3, 64, 64)
    masks, labels, boxes = encoded["mask_labels"][0], encoded["class_labels"][0], encoded["boxes"][0]
    expected = torch.zeros((1, 64, 64))
    expected[0, 5:25, 10:30] = 1
    assert masks.dtype == torch.float32 and torch.equal(masks, expected)
    assert labels.dtype == torch.int64 and labels.tolist() == [3]
    # cxcywh normalised by the UNPADDED size (60 x 40), not the padded 64 x 64
    torch.testing.assert_close(boxes, torch.tensor([[20 / 60, 15 / 40, 20 / 60, 20 / 40]]))


def test_annotations_are_resized_with_the_image():
    processor = MaskDINOImageProcessor(size={"shortest_edge": 80, "longest_edge": 200}, num_labels=5)
    image = np.zeros((40, 60, 3), np.uint8)
    square = np.zeros((40, 60), np.uint8)
    square[5:25, 10:30] = 1
    rle = coco_mask.encode(np.asfortranarray(square))
    annotation = {
        "annotations": [
            {"segmentation": square_polygon(10, 5, 30, 25), "category_id": 1},
            {"segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}, "category_id": 2},
            {"segmentation": square, "category_id": 4},
            {"segmentation": square_polygon(0, 0, 5, 5), "category_id": 0, "iscrowd": 1},  # crowd: skipped
        ]
    }
    encoded = processor(image, annotations=[annotation])
    assert encoded["pixel_values"].shape == (1, 3, 96, 128)  # resized to 80 x 120
    expected = torch.zeros((96, 128))
    expected[10:50, 20:60] = 1
    assert encoded["class_labels"][0].tolist() == [1, 2, 4]
    for mask in encoded["mask_labels"][0]:
        assert torch.equal(mask, expected)
    torch.testing.assert_close(encoded["boxes"][0], torch.tensor([[40 / 120, 30 / 80, 40 / 120, 40 / 80]] * 3))


def test_semantic_map_gives_one_mask_per_class_without_ignore_index():
    processor = MaskDINOImageProcessor(do_resize=False, num_labels=10)
    semantic = np.full((32, 32), 255, np.uint8)
    semantic[:16] = 7
    semantic[16:, :8] = 2
    encoded = processor(np.zeros((32, 32, 3), np.uint8), segmentation_maps=[semantic])
    assert encoded["class_labels"][0].tolist() == [2, 7]
    assert torch.equal(encoded["mask_labels"][0][0].bool(), torch.from_numpy(semantic == 2))
    assert torch.equal(encoded["mask_labels"][0][1].bool(), torch.from_numpy(semantic == 7))
    torch.testing.assert_close(encoded["boxes"][0][1], torch.tensor([0.5, 0.25, 1.0, 0.5]))
    # a custom ignore value
    relabelled = np.where(semantic == 255, 0, semantic)
    encoded = processor(np.zeros((32, 32, 3), np.uint8), segmentation_maps=relabelled, ignore_index=2)
    assert encoded["class_labels"][0].tolist() == [0, 7]


def test_reduce_labels_for_maps_whose_zero_is_other():
    """ADE20K-style maps (0 = "other", classes 1..150): 0 and the ignore value are unlabelled, the rest drop by one,
    as Transformers' `do_reduce_labels`."""
    semantic = np.zeros((32, 32), np.uint8)
    semantic[:8] = 1
    semantic[8:16] = 150
    semantic[16:20] = 255
    image = np.zeros((32, 32, 3), np.uint8)
    processor = MaskDINOImageProcessor(do_resize=False, num_labels=150, do_reduce_labels=True)
    encoded = processor(image, segmentation_maps=semantic)
    assert encoded["class_labels"][0].tolist() == [0, 149]
    assert torch.equal(encoded["mask_labels"][0][0].bool(), torch.from_numpy(semantic == 1))
    assert torch.equal(encoded["mask_labels"][0][1].bool(), torch.from_numpy(semantic == 150))
    # the same as a per-call switch, and off by default
    plain = MaskDINOImageProcessor(do_resize=False, num_labels=151)
    assert plain(image, segmentation_maps=semantic, do_reduce_labels=True)["class_labels"][0].tolist() == [0, 149]
    assert plain(image, segmentation_maps=semantic)["class_labels"][0].tolist() == [0, 1, 150]
    # 150 without reduction is out of range for 150 classes: a clear error
    with pytest.raises(ValueError, match="150"):
        MaskDINOImageProcessor(do_resize=False, num_labels=150)(image, segmentation_maps=semantic)


def test_reduce_labels_survives_save_pretrained(tmp_path):
    MaskDINOImageProcessor(do_reduce_labels=True).save_pretrained(tmp_path)
    assert MaskDINOImageProcessor.from_pretrained(tmp_path).do_reduce_labels is True
    assert MaskDINOImageProcessor().do_reduce_labels is False


def test_semantic_map_values_go_through_category_id_to_label():
    semantic = np.full((16, 16), 3, np.uint8)
    semantic[:4] = 17
    image = np.zeros((16, 16, 3), np.uint8)
    processor = MaskDINOImageProcessor(do_resize=False, num_labels=2)
    encoded = processor(image, segmentation_maps=semantic, category_id_to_label={3: 1, 17: 0})
    assert encoded["class_labels"][0].tolist() == [1, 0]
    assert torch.equal(encoded["mask_labels"][0][1][:16, :16].bool(), torch.from_numpy(semantic == 17))  # padded to 32
    with pytest.raises(ValueError, match="category_id 17 is not in category_id_to_label"):
        processor(image, segmentation_maps=semantic, category_id_to_label={3: 1})


def test_panoptic_png_is_read_with_rgb_to_id(tmp_path):
    processor = MaskDINOImageProcessor(do_resize=False, num_labels=10)
    ids = np.zeros((32, 32), np.int64)
    ids[:, :10] = 300  # id 300 = (44, 1, 0)
    ids[:, 10:] = 70000  # id 70000 = (112, 17, 1)
    png = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    segments_info = [{"id": 70000, "category_id": 8, "iscrowd": 0}, {"id": 300, "category_id": 1, "iscrowd": 0}]
    encoded = processor(
        np.zeros((32, 32, 3), np.uint8),
        annotations={"segments_info": segments_info, "panoptic_seg": Image.fromarray(png)},
    )
    assert encoded["class_labels"][0].tolist() == [8, 1]
    assert torch.equal(encoded["mask_labels"][0][0].bool(), torch.from_numpy(ids == 70000))
    torch.testing.assert_close(
        encoded["boxes"][0], torch.tensor([[21 / 32, 0.5, 22 / 32, 1.0], [5 / 32, 0.5, 10 / 32, 1.0]])
    )
    # the same PNG read from disk (COCO layout: file_name under masks_path), resized x2 with the image (nearest)
    Image.fromarray(png).save(tmp_path / "0001.png")
    resized = MaskDINOImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}, num_labels=10)(
        np.zeros((32, 32, 3), np.uint8),
        annotations={"segments_info": segments_info, "file_name": "0001.png"},
        masks_path=tmp_path,
    )
    expected = torch.zeros((64, 64))
    expected[:, 20:] = 1
    assert torch.equal(resized["mask_labels"][0][0], expected)
    torch.testing.assert_close(resized["boxes"][0], encoded["boxes"][0])


def official_training(name):
    return load_file(FIXTURES / name / "training" / "inputs.safetensors")


def assert_targets_match_official(encoded, training, count):
    for index in range(count):
        torch.testing.assert_close(encoded["mask_labels"][index], training[f"targets.{index}.masks_padded"].float())
        assert torch.equal(encoded["class_labels"][index], training[f"targets.{index}.labels"])
        torch.testing.assert_close(
            encoded["boxes"][index], training[f"targets.{index}.boxes_cxcywh_norm"], atol=1e-6, rtol=0
        )


@pytest.mark.parametrize("name", ["instance_r50_mask2box", "panoptic_r50_batch"])
def test_instance_annotations_reproduce_the_official_training_targets(name):
    training = official_training(name)
    images = [training["image.0"], training["image.1"]]
    annotations = []
    for index in range(2):
        objects = []
        for mask, label in zip(
            training[f"gt.{index}.masks"].numpy(), training[f"gt.{index}.classes"].tolist(), strict=True
        ):
            rle = coco_mask.encode(np.asfortranarray(mask))
            objects.append({"segmentation": rle, "category_id": label, "iscrowd": 0})
        annotations.append({"annotations": objects})
    encoded = processor_for(name)(images, annotations=annotations, do_resize=False)
    assert encoded["pixel_values"].shape[-2:] == training["targets.0.masks_padded"].shape[-2:]
    assert_targets_match_official(encoded, training, 2)


def test_panoptic_annotations_reproduce_the_official_training_targets():
    name = "panoptic_decoupled_box"
    training = official_training(name)
    images, annotations = [], []
    for index in range(2):
        masks = training[f"gt.{index}.masks"].numpy().astype(bool)
        ids = np.zeros(masks.shape[1:], np.int64)
        segments = []
        for number, (mask, label) in enumerate(zip(masks, training[f"gt.{index}.classes"].tolist(), strict=True)):
            segment_id = 1000 * (number + 1) + 7
            ids[mask] = segment_id
            segments.append({"id": segment_id, "category_id": label, "iscrowd": 0})
        png = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
        images.append(training[f"image.{index}"])
        annotations.append({"segments_info": segments, "panoptic_seg": png})
    encoded = processor_for(name)(images, annotations=annotations, do_resize=False)
    assert_targets_match_official(encoded, training, 2)


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        ({"annotations": [{"segmentation": square_polygon(1, 1, 5, 5), "category_id": 5}]}, "class id 5 is outside"),
        (
            {"annotations": [{"segmentation": np.zeros((10, 10), np.uint8), "category_id": 1}]},
            "does not match the image size",
        ),
        (
            {"annotations": [{"segmentation": {"size": [10, 10], "counts": "PP0"}, "category_id": 1}]},
            "RLE size",
        ),
        ({"annotations": [{"segmentation": [[1, 2, 3, 4]], "category_id": 1}]}, "at least 3"),
        ({"segments_info": [], "panoptic_seg": np.zeros((10, 10, 3), np.uint8)}, "does not match the image size"),
        ({"boxes": []}, "'annotations' .* or 'segments_info'"),
    ],
)
def test_bad_annotations_raise_clear_errors(annotation, message):
    processor = MaskDINOImageProcessor(do_resize=False, num_labels=5)
    with pytest.raises(ValueError, match=message):
        processor(np.zeros((20, 30, 3), np.uint8), annotations=annotation)


def test_bad_semantic_maps_and_counts_raise_clear_errors():
    processor = MaskDINOImageProcessor(do_resize=False, num_labels=5)
    image = np.zeros((20, 30, 3), np.uint8)
    with pytest.raises(ValueError, match="does not match the image size"):
        processor(image, segmentation_maps=np.zeros((30, 20), np.uint8))
    with pytest.raises(ValueError, match="class id 9 is outside"):
        processor(image, segmentation_maps=np.full((20, 30), 9, np.uint8))
    with pytest.raises(ValueError, match="got 2 annotations for 1 images"):
        processor(image, annotations=[{"annotations": []}, {"annotations": []}])
    with pytest.raises(ValueError, match="category_id 3 is not in category_id_to_label"):
        processor(
            image,
            annotations={"annotations": [{"segmentation": square_polygon(1, 1, 5, 5), "category_id": 3}]},
            category_id_to_label={1: 0},
        )


def test_category_ids_are_mapped_and_empty_images_give_empty_targets():
    processor = MaskDINOImageProcessor(do_resize=False, num_labels=5)
    images = [np.zeros((20, 30, 3), np.uint8), np.zeros((40, 10, 3), np.uint8)]
    annotations = [
        {"annotations": [{"segmentation": square_polygon(1, 1, 5, 5), "category_id": 90}]},
        {"annotations": []},
    ]
    encoded = processor(images, annotations=annotations, category_id_to_label={90: 4})
    assert encoded["class_labels"][0].tolist() == [4]
    assert encoded["mask_labels"][1].shape == (0, 64, 32)
    assert encoded["class_labels"][1].shape == (0,) and encoded["boxes"][1].shape == (0, 4)


def test_instance_post_processing_with_no_kept_query_returns_empty_results():
    """A panoptic model whose top-k queries are all stuff keeps no instance: empty results, not an error."""

    processor = MaskDINOImageProcessor(stuff_labels=[0, 1], num_labels=2, test_topk_per_image=3)
    logits = torch.full((1, 4, 2), -5.0)
    outputs = SimpleNamespace(
        class_queries_logits=logits, masks_queries_logits=torch.zeros(1, 4, 8, 8), pred_boxes=torch.rand(1, 4, 4)
    )
    result = processor.post_process_instance_segmentation(
        outputs, target_sizes=[(30, 30)], image_sizes=[(32, 32)], panoptic_on=True
    )[0]
    assert result["scores"].numel() == 0 and result["masks"].shape == (0, 30, 30)


def test_target_sizes_of_other_preprocessing_resize_the_whole_prediction():
    """Transformers' common post-processing test: outputs that this processor's settings did not produce (the
    derived resized size does not fit the padded input) with any target size, as Mask2Former allows: the whole
    prediction is resized to the target (with a warning), and a wrong number of target sizes raises."""
    processor = MaskDINOImageProcessor(num_labels=3)  # official 800 / 1333 resize; the masks below are 8 x 8
    generator = torch.Generator().manual_seed(0)
    outputs = SimpleNamespace(
        class_queries_logits=torch.randn(2, 5, 3, generator=generator),
        masks_queries_logits=torch.randn(2, 5, 8, 8, generator=generator),
        pred_boxes=torch.rand(2, 5, 4, generator=generator),
    )
    target_sizes = [(1, 4), (1, 4)]
    maps = processor.post_process_semantic_segmentation(outputs, target_sizes=target_sizes)
    scores = processor.post_process_semantic_segmentation(
        outputs, target_sizes=target_sizes, return_segmentation_scores=True
    )
    for segmentation, result in zip(maps, scores, strict=True):
        assert segmentation.shape == (1, 4) and torch.equal(result.segmentation, segmentation)
        assert result.segmentation_scores.shape == (3, 1, 4)
    whole = processor.post_process_semantic_segmentation(outputs, target_sizes=target_sizes, image_sizes=[(32, 32)] * 2)
    assert all(torch.equal(a, b) for a, b in zip(maps, whole, strict=True))
    for method in (processor.post_process_instance_segmentation, processor.post_process_panoptic_segmentation):
        assert method(outputs, target_sizes=target_sizes)[0]["segmentation"].shape == (1, 4)
    with pytest.raises(ValueError):
        processor.post_process_semantic_segmentation(outputs, target_sizes=target_sizes + [(1, 4)])


def test_post_processing_of_outputs_with_gradients_is_detached_and_warning_free():
    """Outputs of a forward run with gradients (no `torch.no_grad`, as in training): every post-processing method
    works on detached tensors, so its results carry no autograd history and reading a score as a Python float
    raises no "requires_grad=True" warning."""
    from conftest import tiny_config

    from maskdino_hf import MaskDINOForUniversalSegmentation

    torch.manual_seed(0)
    model = MaskDINOForUniversalSegmentation(tiny_config()).eval()
    processor = MaskDINOImageProcessor(
        num_labels=5, stuff_labels=[3, 4], size={"shortest_edge": 64, "longest_edge": 96}, focus_on_box=False,
        instance_on=True, panoptic_on=True, semantic_on=True,
    )
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    outputs = model(**processor([image], return_tensors="pt"))
    assert outputs.class_queries_logits.requires_grad and outputs.pred_boxes.requires_grad
    sizes = {"target_sizes": [(60, 80)]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        instance = processor.post_process_instance_segmentation(outputs, panoptic_on=False, **sizes)[0]
        detection = processor.post_process_object_detection(outputs, panoptic_on=False, **sizes)[0]
        panoptic = processor.post_process_panoptic_segmentation(outputs, threshold=0.0, **sizes)[0]
        semantic = processor.post_process_semantic_segmentation(outputs, return_segmentation_scores=True, **sizes)[0]
        universal = processor.post_process_universal_segmentation(outputs, **sizes)[0]
        scores = [float(result["scores"][0]) for result in (instance, detection, universal["instances"])]
        boxes = [float(value) for value in instance["boxes"][0]]
    assert len(scores) == 3 and len(boxes) == 4 and len(panoptic["segments_info"]) > 0
    tensors = [instance["scores"], instance["boxes"], detection["scores"], detection["boxes"],
               semantic.segmentation_scores, universal["sem_seg"], universal["instances"]["boxes"]]
    assert not any(tensor.requires_grad for tensor in tensors)


def test_half_precision_outputs_are_post_processed_in_float32():
    """Outputs of a model run under bfloat16 autocast give the results of the same values in float32."""
    processor = MaskDINOImageProcessor(num_labels=3, test_topk_per_image=5)
    generator = torch.Generator().manual_seed(0)
    outputs = SimpleNamespace(
        class_queries_logits=torch.randn(1, 6, 3, generator=generator).bfloat16(),
        masks_queries_logits=torch.randn(1, 6, 8, 8, generator=generator).bfloat16(),
        pred_boxes=torch.rand(1, 6, 4, generator=generator).bfloat16(),
    )
    as_float = SimpleNamespace(**{name: value.float() for name, value in vars(outputs).items()})
    sizes = {"target_sizes": [(30, 30)], "image_sizes": [(32, 32)]}
    half = processor.post_process_instance_segmentation(outputs, **sizes)[0]
    full = processor.post_process_instance_segmentation(as_float, **sizes)[0]
    assert half["scores"].dtype == half["boxes"].dtype == torch.float32 and len(half["scores"]) == 5
    for name in ("scores", "labels", "boxes", "masks"):
        torch.testing.assert_close(half[name], full[name], rtol=0, atol=0)
    semantic = processor.post_process_semantic_segmentation(outputs, return_segmentation_scores=True, **sizes)[0]
    assert semantic.segmentation_scores.dtype == torch.float32


def test_processor_mask_boxes_are_the_model_bitmask_rule():
    """The processor's copy of the mask-to-box rule (its saved remote code imports no other module) gives the
    model's `mask_boxes(masks, "bitmask")`, empty masks (all-zero boxes) and one-pixel masks included."""
    from maskdino_hf.image_processing_maskdino import _bitmask_boxes
    from maskdino_hf.modeling_maskdino import mask_boxes

    generator = torch.Generator().manual_seed(0)
    for shape in [(0, 5, 7), (4, 1, 1), (20, 13, 17), (5, 40, 3)]:
        masks = torch.rand(shape, generator=generator) > 0.9
        if shape[0] > 2:
            masks[1] = False
            masks[2] = False
            masks[2, 0, shape[2] - 1] = True
        torch.testing.assert_close(_bitmask_boxes(masks), mask_boxes(masks, "bitmask"), rtol=0, atol=0)
