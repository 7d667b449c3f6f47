"""Bad and unusual inputs of `MaskDINOImageProcessor`: images, annotations and post-processing arguments.

Each case is one input. A mistake must raise a `ValueError` / `TypeError` whose message names the argument, the bad
value and what is allowed (the regex below); a legitimate but unusual input must be handled by the documented rule
(16-bit and float images, grey, RGBA, no annotations). None may crash the process: the NaN polygon and the malformed
RLEs used to reach pycocotools, which segfaults or reads uninitialised memory on them.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.testing_utils import CaptureLogger

from maskdino_hf import MaskDINOImageProcessor
from maskdino_hf.image_processing_maskdino import logger as processor_logger

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def small_processor(**kwargs) -> MaskDINOImageProcessor:
    return MaskDINOImageProcessor(size={"shortest_edge": 32, "longest_edge": 64}, **kwargs)


def rgb(height: int = 20, width: int = 30, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ images: refused

BAD_IMAGES = {
    "float_0_1000": (np.linspace(0, 1000, 20 * 30 * 3, dtype=np.float32).reshape(20, 30, 3), {}, ValueError,
                     r"must be in \[0, 255\].*0\.\.1000"),
    "float_normalised": (np.linspace(-2.1, 2.6, 20 * 30 * 3, dtype=np.float32).reshape(20, 30, 3), {}, ValueError,
                         r"-2\.1\.\.2\.6.*already normalised pass do_normalize=False"),
    "float_0_1": (np.full((20, 30, 3), 0.5, np.float32), {}, ValueError, r"0-1 scale.*do_rescale=True"),
    "float_nan": (np.where(np.eye(20, 30, dtype=bool)[..., None], np.nan, 100.0).astype(np.float32), {}, ValueError,
                  r"image 0: the image holds NaN or infinite values"),
    "float_inf": (np.full((20, 30, 3), np.inf, np.float32), {}, ValueError, "NaN or infinite"),
    "rescaled_out_of_range": (rgb(), {"do_rescale": True}, ValueError,
                              r"after rescaling by rescale_factor=255.0, got 0\.\.6\d+"),
    "aspect_5000x1": (Image.new("RGB", (5000, 1)), {}, ValueError,
                      r"image 0: an image of \(height, width\) = \(1, 5000\) resizes to \(0, 64\).*aspect ratio"),
    "aspect_1x5000": (np.zeros((3, 5000, 1), np.uint8), {"input_data_format": "channels_first"}, ValueError,
                      r"\(5000, 1\) resizes to \(64, 0\)"),
    "ndim_1": (np.zeros((10,), np.uint8), {}, ValueError, r"2 \(H, W\) or 3 .* dimensions, got shape \(10,\)"),
    "ndim_5": (np.zeros((1, 1, 3, 4, 5), np.uint8), {}, ValueError, r"dimensions, got shape \(1, 1, 3, 4, 5\)"),
    "two_channels": (np.zeros((6, 7, 2), np.uint8), {}, ValueError, r"channel axis of an image of shape \(6, 7, 2\)"),
    "five_channels_explicit": (np.zeros((5, 6, 7), np.uint8), {"input_data_format": "channels_first"}, ValueError,
                               r"1, 3 or 4 channels, got 5"),
    "empty_list": ([], {}, ValueError, "images is an empty list"),
    "empty_batch": (np.zeros((0, 8, 8, 3), np.uint8), {}, ValueError, "empty batch"),
    "zero_height": (np.zeros((0, 10, 3), np.uint8), {}, ValueError, r"must not be empty, got shape \(3, 0, 10\)"),
    "bool_dtype": (np.zeros((4, 5, 3), bool), {}, TypeError, "integer or floating dtype, got bool"),
    "path_string": ("image.png", {}, TypeError, "PIL images, numpy arrays or torch tensors"),
    "int32_over_255": (np.full((4, 5, 3), 300, np.int32), {}, ValueError, r"0\.\.255 .*got 300\.\.300"),
    "negative_int": (np.full((4, 5, 3), -1, np.int16), {}, ValueError, r"0\.\.255 .*got -1\.\.-1"),
    "rgba_without_conversion": (np.zeros((6, 7, 4), np.uint8), {"do_convert_rgb": False}, ValueError,
                                r"image_mean and image_std have 3 values but the images have 4 channels"),
    "center_crop": (rgb(), {"do_center_crop": True}, ValueError, "do_center_crop=True is not supported"),
    "square_resize": (rgb(), {"default_to_square": True}, ValueError, "default_to_square=True is not supported"),
    "post_processing_setting": (rgb(), {"stuff_labels": [1]}, TypeError,
                               r"\['stuff_labels'\] are post-processing settings"),
    "unknown_keyword": (rgb(), {"colour": True}, TypeError, r"unexpected arguments \['colour'\]"),
    "pad_size_too_small": (rgb(), {"pad_size": {"height": 16, "width": 16}}, ValueError,
                           r"pad_size \(16, 16\) .* smaller than the largest resized image \(32, 48\)"),
    "bad_data_format": (rgb(), {"data_format": "nhwc"}, ValueError, "data_format must be"),
    "bad_rescale_factor": (rgb(), {"do_rescale": True, "rescale_factor": -1.0}, ValueError, "rescale_factor must be"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_images_are_refused(case):
    image, kwargs, error, message = BAD_IMAGES[case]
    with pytest.raises(error, match=message):
        small_processor()(image, **kwargs)


# ------------------------------------------------------------------------------------------------ images: handled


def test_16_bit_images_are_scaled_by_their_dtype_range():
    """A 0..4000 gradient in a 16-bit image is 0..15.6 on the 0-255 scale: dark, not clipped to white."""
    gradient = np.linspace(0, 4000, 20 * 30).reshape(20, 30).astype(np.uint16)
    processor = small_processor()
    expected = processor(np.repeat(gradient[..., None], 3, -1).astype(np.float32) * (255 / 65535))["pixel_values"]
    as_pil_16 = Image.fromarray(gradient)
    assert as_pil_16.mode == "I;16"
    as_pil_32 = Image.fromarray(gradient.astype(np.int32), mode="I")  # how PIL may open a 16-bit PNG
    for variant in (gradient, np.repeat(gradient[..., None], 3, -1), as_pil_16, as_pil_32, torch.from_numpy(gradient)):
        torch.testing.assert_close(processor(variant)["pixel_values"], expected, atol=1e-5, rtol=0)
    real = processor.image_sizes_from_pixel_mask(processor(gradient)["pixel_mask"])[0]
    unnormalised = processor(gradient, do_normalize=False)["pixel_values"][0, :, : real[0], : real[1]]
    assert 15.0 < float(unnormalised.max()) < 15.7 and len(unnormalised.unique()) > 10


def test_16_bit_pil_mode_i_outside_the_16_bit_range_is_refused():
    with pytest.raises(ValueError, match=r"mode 'I' image is read as 16-bit \(0\.\.65535\), got values 0\.\.70000"):
        small_processor()(Image.fromarray(np.array([[0, 70000]] * 3, np.int32), mode="I"))


def test_float_images_on_the_0_1_scale_with_do_rescale():
    image = rgb()
    processor = small_processor()
    torch.testing.assert_close(
        processor(image.astype(np.float32) / 255, do_rescale=True)["pixel_values"],
        processor(image.astype(np.float32))["pixel_values"],
        atol=1e-4, rtol=0,
    )  # fmt: skip
    # and a processor configured for them
    rescaling = small_processor(do_rescale=True)
    torch.testing.assert_close(
        rescaling(image.astype(np.float32) / 255)["pixel_values"], processor(image.astype(np.float32))["pixel_values"],
        atol=1e-4, rtol=0,
    )  # fmt: skip


def test_transformers_rescale_convention_gives_the_same_pixels():
    """`do_rescale=True, rescale_factor=1/255` with 0-1 mean / std (other processors' convention) is the same
    normalisation as the official 0-255 one."""
    image = rgb()
    official = small_processor()
    converted = small_processor(
        do_rescale=True, rescale_factor=1 / 255, image_mean=[m / 255 for m in official.image_mean],
        image_std=[s / 255 for s in official.image_std],
    )  # fmt: skip
    torch.testing.assert_close(converted(image)["pixel_values"], official(image)["pixel_values"], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\] .* after rescaling by rescale_factor=0.0039.*0\.\.3\.9"):
        converted(np.linspace(0, 1000, 20 * 30 * 3, dtype=np.float32).reshape(20, 30, 3))
    with pytest.raises(ValueError, match="look like the 0-1 scale .* do_rescale=True with rescale_factor=1/255"):
        small_processor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


def test_already_normalised_float_images_pass_with_do_normalize_false():
    normalised = np.random.default_rng(3).normal(size=(3, 32, 32)).astype(np.float32)
    encoded = MaskDINOImageProcessor(do_resize=False, do_normalize=False)(normalised)
    torch.testing.assert_close(encoded["pixel_values"][0], torch.from_numpy(normalised))


@pytest.mark.parametrize("mode", ["grey_2d", "grey_pil", "rgba_array", "rgba_pil", "la_pil", "palette_pil"])
def test_grey_rgba_and_palette_images_are_converted_to_rgb(mode):
    image = rgb()
    grey = image[..., 0]
    palette = Image.fromarray(image).convert("P")
    variants = {
        "grey_2d": (grey, np.repeat(grey[..., None], 3, -1)),
        "grey_pil": (Image.fromarray(grey), np.repeat(grey[..., None], 3, -1)),
        "rgba_array": (np.concatenate([image, np.full((20, 30, 1), 9, np.uint8)], -1), image),
        "rgba_pil": (Image.fromarray(np.concatenate([image, np.zeros((20, 30, 1), np.uint8)], -1), "RGBA"), image),
        "la_pil": (Image.fromarray(grey).convert("LA"), np.repeat(grey[..., None], 3, -1)),
        "palette_pil": (palette, np.asarray(palette.convert("RGB"))),
    }  # fmt: skip
    given, expected = variants[mode]
    processor = small_processor()
    torch.testing.assert_close(processor(given)["pixel_values"], processor(expected)["pixel_values"], atol=0, rtol=0)


def test_four_channels_kept_without_rgb_conversion():
    """Transformers' common 4-channel call: do_convert_rgb=False and 4-value mean/std keep the channels."""
    image = np.random.default_rng(4).integers(0, 256, size=(20, 30, 4), dtype=np.uint8)
    encoded = small_processor()(image, do_convert_rgb=False, input_data_format="channels_last",
                                image_mean=[0.0] * 4, image_std=[1.0] * 4)  # fmt: skip
    assert encoded["pixel_values"].shape == (1, 4, 32, 64)
    assert encoded["pixel_values"].max() > 1.0  # 0-255 values, mean 0 / std 1


def test_tiny_images_are_resized_and_padded():
    encoded = small_processor()(Image.new("RGB", (1, 1), (200, 10, 10)))
    assert encoded["pixel_values"].shape == (1, 3, 32, 32) and int(encoded["pixel_mask"].sum()) == 32 * 32


def test_every_images_kwargs_keyword_is_accepted():
    processor = small_processor()
    image = rgb()
    reference = processor(image)["pixel_values"]
    encoded = processor(
        image, do_convert_rgb=True, do_rescale=False, rescale_factor=255.0, do_center_crop=False, crop_size=None,
        default_to_square=False, data_format="channels_first", input_data_format="channels_last", device="cpu",
        disable_grouping=True, image_seq_length=None, return_tensors="pt", pad_size=None,
    )  # fmt: skip
    torch.testing.assert_close(encoded["pixel_values"], reference, atol=0, rtol=0)
    assert processor(image, data_format="channels_last")["pixel_values"].shape == (1, 32, 64, 3)
    assert processor(image, pad_size={"height": 40, "width": 70})["pixel_values"].shape == (1, 3, 40, 70)
    assert MaskDINOImageProcessor.from_dict({}, do_convert_rgb=False).do_convert_rgb is False
    # every keyword of the kwargs class, restating the processor's own settings
    settings = {name: getattr(processor, name) for name in MaskDINOImageProcessor.valid_kwargs.__annotations__
                if hasattr(processor, name)}  # fmt: skip
    settings.update(return_tensors="pt", data_format="channels_first", input_data_format="channels_last")
    torch.testing.assert_close(processor(image, **settings)["pixel_values"], reference, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ annotations


def square(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def instance(segmentation, category_id=1, **extra):
    return {"annotations": [{"segmentation": segmentation, "category_id": category_id, **extra}]}


def panoptic(ids: np.ndarray, segments):
    png = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    return {"segments_info": segments, "panoptic_seg": png}


IDS = np.zeros((20, 30), np.int64)
IDS[:, :10], IDS[:, 10:20] = 300, 7

BAD_ANNOTATIONS = {
    "rle_counts_too_few": (instance({"size": [20, 30], "counts": [10, 20, 30]}), ValueError,
                           r"RLE counts sum to 60, but a 20 x 30 mask has 600 pixels"),
    "rle_counts_too_many": (instance({"size": [20, 30], "counts": [100, 600]}), ValueError, "sum to 700"),
    "rle_negative_count": (instance({"size": [20, 30], "counts": [700, -100]}), ValueError,
                           "RLE counts must be non-negative ints, got -100"),
    "rle_compressed_short": (instance({"size": [20, 30], "counts": "1"}), ValueError, "RLE counts sum to 1,"),
    "rle_compressed_bad_character": (instance({"size": [20, 30], "counts": "a~b"}), ValueError,
                                     "invalid character '~'"),
    "rle_compressed_truncated": (instance({"size": [20, 30], "counts": "P"}), ValueError,
                                 "end in the middle of a run"),
    "rle_without_counts": (instance({"size": [20, 30]}), ValueError, r"an RLE needs 'size' and 'counts'"),
    "rle_wrong_size": (instance({"size": [10, 10], "counts": [100]}), ValueError,
                       r"RLE size \(10, 10\) does not match the image size \(20, 30\)"),
    "polygon_nan": (instance([[1.0, 1.0, float("nan"), 5.0, 5.0, 5.0]]), ValueError,
                    "polygon holds NaN or infinite coordinates"),
    "polygon_inf": (instance([[1.0, 1.0, float("inf"), 5.0, 5.0, 5.0]]), ValueError, "NaN or infinite"),
    "polygon_text": (instance([["a", "b", "c", "d", "e", "f"]]), ValueError, "flat list of numbers"),
    "polygon_two_points": (instance([[1, 2, 3, 4]]), ValueError, "at least 3 .* points, got 4 values"),
    "mask_wrong_size": (instance(np.ones((30, 20), np.uint8)), ValueError,
                        r"mask of shape \(30, 20\) does not match the image size \(20, 30\)"),
    "mask_nan": (instance(np.full((20, 30), np.nan)), ValueError, "mask holds NaN"),
    "category_outside_labels": (instance(square(1, 1, 5, 5), category_id=7), ValueError,
                                r"class id 7 is outside 0\.\.4 \(num_labels=5\)"),
    "category_negative": (instance(square(1, 1, 5, 5), category_id=-1), ValueError, "class id -1 is outside"),
    "category_float": (instance(square(1, 1, 5, 5), category_id=1.5), TypeError, "category_id must be an int, got 1.5"),
    "category_string": (instance(square(1, 1, 5, 5), category_id="1"), TypeError, "category_id must be an int"),
    "bbox_negative_width": (instance(square(1, 1, 5, 5), bbox=[1, 1, -4, 4]), ValueError,
                            r"width, height >= 0, got \[1, 1, -4, 4\]"),
    "bbox_nan": (instance(square(1, 1, 5, 5), bbox=[1, float("nan"), 4, 4]), ValueError, "4 finite numbers"),
    "bbox_three_numbers": (instance(square(1, 1, 5, 5), bbox=[1, 1, 4]), ValueError, r"\[x, y, width, height\]"),
    "object_not_a_dict": ({"annotations": [[1, 2, 3]]}, TypeError, "instance annotation must be a dict"),
    "object_without_category": ({"annotations": [{"segmentation": square(1, 1, 5, 5)}]}, ValueError,
                                "needs 'segmentation' and 'category_id'"),
    "panoptic_id_missing_from_segments_info": (
        panoptic(IDS, [{"id": 300, "category_id": 1}]), ValueError,
        r"panoptic_seg holds segment ids \[7\] that are not in segments_info"),
    "panoptic_duplicate_ids": (
        panoptic(IDS, [{"id": 300, "category_id": 1}, {"id": 300, "category_id": 2}, {"id": 7, "category_id": 1}]),
        ValueError, "lists a segment id twice"),
    "panoptic_entry_without_id": (panoptic(IDS, [{"category_id": 1}]), ValueError, "needs 'id' and 'category_id'"),
    "panoptic_category_outside": (
        panoptic(IDS, [{"id": 300, "category_id": 9}, {"id": 7, "category_id": 1}]), ValueError,
        r"class id 9 is outside"),
    "panoptic_wrong_size": (panoptic(IDS[:10], []), ValueError, r"does not match the image size \(20, 30\)"),
    "neither_kind": ({"boxes": []}, ValueError, "'annotations' .* or 'segments_info'"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_ANNOTATIONS))
def test_bad_annotations_are_refused(case):
    annotation, error, message = BAD_ANNOTATIONS[case]
    processor = MaskDINOImageProcessor(do_resize=False, num_labels=5)
    with pytest.raises(error, match=message):
        processor(np.zeros((20, 30, 3), np.uint8), annotations=annotation)


def test_category_id_missing_from_the_mapping_is_refused():
    with pytest.raises(ValueError, match="category_id 3 is not in category_id_to_label"):
        MaskDINOImageProcessor(do_resize=False, num_labels=5)(
            np.zeros((20, 30, 3), np.uint8), annotations=instance(square(1, 1, 5, 5), category_id=3),
            category_id_to_label={1: 0},
        )  # fmt: skip


def test_legitimate_annotations_are_handled():
    """A valid RLE (list and compressed), crowd objects (skipped), 0/255 masks and images without objects."""
    from pycocotools import mask as coco_mask

    mask = np.zeros((20, 30), np.uint8)
    mask[2:8, 3:9] = 1
    compressed = coco_mask.encode(np.asfortranarray(mask))
    # column-major runs of that square, written out: 3 empty columns + 2 rows, then 6 columns of 6 on / 14 off
    uncompressed_counts = [62, 6, 14, 6, 14, 6, 14, 6, 14, 6, 14, 6, 432]
    objects = [
        {"segmentation": {"size": [20, 30], "counts": compressed["counts"].decode()}, "category_id": 1},
        {"segmentation": {"size": [20, 30], "counts": uncompressed_counts}, "category_id": 2},
        {"segmentation": mask * 255, "category_id": 3},
        {"segmentation": [[float("nan")] * 6], "category_id": 4, "iscrowd": 1},  # crowd: skipped, never decoded
    ]
    processor = MaskDINOImageProcessor(do_resize=False, num_labels=5)
    images = [np.zeros((20, 30, 3), np.uint8)] * 2
    encoded = processor(images, annotations=[{"annotations": objects}, {"annotations": []}])
    assert encoded["class_labels"][0].tolist() == [1, 2, 3]
    for target in encoded["mask_labels"][0]:
        assert torch.equal(target[:20, :30].bool(), torch.from_numpy(mask.astype(bool)))
    assert encoded["mask_labels"][1].shape == (0, 32, 32) and encoded["boxes"][1].shape == (0, 4)


# ------------------------------------------------------------------------------------------------ post-processing


def outputs(batch: int = 1):
    """Random model outputs for images of (40, 60) resized to (32, 48) and padded to (32, 64)."""
    generator = torch.Generator().manual_seed(0)
    return SimpleNamespace(
        class_queries_logits=torch.randn(batch, 6, 3, generator=generator) * 3,
        masks_queries_logits=torch.randn(batch, 6, 8, 16, generator=generator) * 3,
        pred_boxes=torch.rand(batch, 6, 4, generator=generator),
    )


def post_processor() -> MaskDINOImageProcessor:
    return small_processor(num_labels=3, stuff_labels=[2], panoptic_on=True)


INSTANCE, PANOPTIC, SEMANTIC, DETECTION = "instance", "panoptic", "semantic", "detection"
BAD_POST_PROCESSING = {
    "target_sizes_width_height": (INSTANCE, {"target_sizes": [(60, 40)]}, ValueError,
                                  r"target_sizes \(60, 40\) resizes to \(48, 32\), which does not fill the padded "
                                  r"input \(32, 64\), but read as \(width, height\) it does"),
    "image_sizes_larger_than_padded": (SEMANTIC, {"image_sizes": [(40, 70)]}, ValueError,
                                       r"image size \(40, 70\) is larger than the padded input \(32, 64\)"),
    "target_sizes_width_height_with_image_sizes": (
        PANOPTIC, {"target_sizes": [(60, 40)], "image_sizes": [(32, 48)]}, ValueError,
        r"target_sizes entry \(60, 40\) has the aspect of the resized image \(32, 48\) only when read as "
        r"\(width, height\)"),
    "target_sizes_fractional": (SEMANTIC, {"target_sizes": [(40.5, 60)]}, ValueError,
                                r"integer \(height, width\) pairs, got \(40\.5, 60\)"),
    "target_sizes_text": (SEMANTIC, {"target_sizes": [("40", "60")]}, TypeError, "integer"),
    "target_sizes_flat_tensor": (DETECTION, {"target_sizes": torch.tensor([40, 60])}, ValueError,
                                 r"\(batch, 2\) tensor .* got shape \(2,\)"),
    "target_sizes_zero": (INSTANCE, {"target_sizes": [(0, 60)]}, ValueError, "positive sizes"),
    "target_sizes_batch_mismatch": (PANOPTIC, {"target_sizes": [(40, 60), (40, 60)]}, ValueError,
                                    "target_sizes has 2 entries but the outputs hold 1 images"),
    "image_sizes_batch_mismatch": (SEMANTIC, {"image_sizes": [(32, 48)] * 3}, ValueError,
                                   "image_sizes has 3 entries"),
    "threshold_above_one": (INSTANCE, {"threshold": 1.5}, ValueError, r"threshold must be in \[0, 1\], got 1.5"),
    "threshold_negative_panoptic": (PANOPTIC, {"threshold": -0.1}, ValueError, r"threshold must be in \[0, 1\]"),
    "threshold_nan": (DETECTION, {"threshold": float("nan")}, ValueError, r"threshold must be in \[0, 1\], got nan"),
    "threshold_text": (INSTANCE, {"threshold": "0.5"}, TypeError, "threshold must be a number"),
    "overlap_above_one": (PANOPTIC, {"overlap_mask_area_threshold": 2}, ValueError,
                          r"overlap_mask_area_threshold must be in \[0, 1\]"),
    "mask_threshold_zero": (INSTANCE, {"mask_threshold": 0.0}, ValueError, r"mask_threshold must be in \(0, 1\)"),
    "mask_threshold_panoptic": (PANOPTIC, {"mask_threshold": 1.2}, ValueError, "mask_threshold must be in"),
    "label_ids_to_fuse_unknown": (PANOPTIC, {"label_ids_to_fuse": [99]}, ValueError,
                                  r"label_ids_to_fuse holds 99, which is not a class id: .* 0\.\.2"),
    "label_ids_to_fuse_text": (PANOPTIC, {"label_ids_to_fuse": "2"}, TypeError, "set or list of class ids"),
    "label_ids_to_fuse_float": (PANOPTIC, {"label_ids_to_fuse": [1.0]}, TypeError, "int class ids"),
    "top_k_negative": (INSTANCE, {"top_k": -1}, ValueError, "top_k must be a positive int .* got -1"),
    "top_k_zero_detection": (DETECTION, {"top_k": 0}, ValueError, "top_k must be a positive int"),
    "top_k_float": (INSTANCE, {"top_k": 2.5}, TypeError, "top_k must be a positive int"),
    "top_k_bool": (DETECTION, {"top_k": True}, TypeError, "top_k must be a positive int"),
    "coco_and_binary_maps": (INSTANCE, {"return_coco_annotation": True, "return_binary_maps": True}, ValueError,
                             "cannot both be True"),
    "num_labels_mismatch": (SEMANTIC, {"num_labels": 7}, ValueError, "has 3 classes but num_labels is 7"),
}  # fmt: skip


def _method(processor, kind):
    return getattr(processor, {
        INSTANCE: "post_process_instance_segmentation", PANOPTIC: "post_process_panoptic_segmentation",
        SEMANTIC: "post_process_semantic_segmentation", DETECTION: "post_process_object_detection",
    }[kind])  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_POST_PROCESSING))
def test_bad_post_processing_arguments_are_refused(case):
    kind, kwargs, error, message = BAD_POST_PROCESSING[case]
    kwargs = {"target_sizes": [(40, 60)], **kwargs}
    with pytest.raises(error, match=message):
        _method(post_processor(), kind)(outputs(), **kwargs)


def test_label_ids_to_fuse_replaces_stuff_labels_with_a_warning():
    """An explicit set is Mask2Former's rule (exactly those classes fuse); leaving stuff classes out is said aloud."""
    processor = post_processor()
    logits = torch.full((1, 6, 3), -8.0)
    logits[..., 2] = 8.0  # every query: confident stuff class 2
    masks = torch.full((1, 6, 8, 16), -10.0)
    for query in range(6):
        masks[0, query, :, 2 * query : 2 * query + 2] = 10.0  # disjoint stripes, each one query's own region
    fused = SimpleNamespace(class_queries_logits=logits, masks_queries_logits=masks)
    default = processor.post_process_panoptic_segmentation(fused, target_sizes=[(40, 60)])[0]
    assert len(default["segments_info"]) == 1 and default["segments_info"][0]["was_fused"]
    with CaptureLogger(processor_logger) as captured:
        explicit = processor.post_process_panoptic_segmentation(
            fused, target_sizes=[(40, 60)], label_ids_to_fuse={0}
        )[0]
    assert "stuff classes [2] are not fused" in captured.out
    assert len(explicit["segments_info"]) > 1 and not any(s["was_fused"] for s in explicit["segments_info"])
    same = processor.post_process_panoptic_segmentation(fused, target_sizes=[(40, 60)], label_ids_to_fuse=[2])[0]
    assert same["segments_info"] == default["segments_info"]


def test_target_sizes_as_integer_tensors_and_float_integers_are_accepted():
    processor = post_processor()
    reference = processor.post_process_semantic_segmentation(outputs(), target_sizes=[(40, 60)])[0]
    for sizes in (torch.tensor([[40, 60]]), torch.tensor([[40.0, 60.0]]), np.array([[40, 60]]), [[40.0, 60.0]]):
        assert torch.equal(processor.post_process_semantic_segmentation(outputs(), target_sizes=sizes)[0], reference)
