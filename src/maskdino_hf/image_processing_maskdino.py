"""Image processor for Mask DINO: test-time preprocessing, training targets and the official inference heads.

Mask DINO (Li et al., "Mask DINO: Towards A Unified Transformer-based Framework for Object Detection and
Segmentation") predicts, per query, class logits, a mask at 1/4 of the padded input and a box. This file holds
everything around the network:

* preprocessing as the official detectron2 test path does it: shortest-edge resize with a maximum size
  (`ResizeShortestEdge`, PIL bilinear on uint8), normalisation on the 0-255 scale, zero padding (after
  normalisation) to a multiple of `size_divisibility`;
* training targets (`mask_labels`, `class_labels`, `boxes`) from COCO instance, COCO panoptic or semantic
  annotations, laid out like the official `prepare_targets` (masks padded to the batch, boxes normalised by the
  unpadded image size);
* the official inference of the paper's three segmentation tasks plus box-only detection: semantic
  (`semantic_inference`), panoptic (`panoptic_inference`) and instance (`instance_inference` with
  `box_postprocess`), all reading back through the padding of every image (crop to the resized size, then resize
  to the requested size).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_transforms import center_to_corners_format, corners_to_center_format, rgb_to_id
from transformers.processing_utils import ImagesKwargs
from transformers.utils import logging

try:
    from pycocotools import mask as coco_mask
except ImportError:  # optional: only COCO polygon / RLE annotations and `return_coco_annotation` need it

    class _MissingPycocotools:
        def __getattr__(self, name):
            raise ImportError("COCO polygon / RLE masks need `pycocotools`: `pip install pycocotools`")

    coco_mask = _MissingPycocotools()

logger = logging.get_logger(__name__)

# detectron2 / Mask DINO defaults (RGB order, 0-255 scale).
MASKDINO_PIXEL_MEAN = (123.675, 116.28, 103.53)
MASKDINO_PIXEL_STD = (58.395, 57.12, 57.375)
# Channel counts an image array may have: grey, RGB, RGBA.
_CHANNEL_COUNTS = (1, 3, 4)


class MaskDINOImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    size_divisibility (`int`, *optional*, defaults to 32):
        The padded batch is rounded up to a multiple of this (0 or 1: no rounding).
    num_labels (`int`, *optional*):
        Number of classes. Checks annotation labels and tells a softmax classifier (`num_labels + 1` logits, the
        last one "no object") from a sigmoid one (`num_labels` logits).
    ignore_index (`int`, *optional*, defaults to 255):
        Value of unlabelled pixels in semantic maps.
    stuff_labels (`list[int]`, *optional*):
        Class ids that are "stuff" (fused into one panoptic segment, dropped from instance results of a panoptic
        model).
    do_reduce_labels (`bool`, *optional*, defaults to `False`):
        Semantic maps whose 0 is "other" (ADE20K): 0 becomes `ignore_index` and every other class id drops by one.
    """

    size_divisibility: int
    do_reduce_labels: bool
    num_labels: int | None
    ignore_index: int
    stuff_labels: list[int]
    test_topk_per_image: int
    object_mask_threshold: float
    overlap_threshold: float
    panoptic_temperature: float
    panoptic_transform_eval: bool
    focus_on_box: bool
    semantic_postprocessing_before_inference: bool
    instance_on: bool
    panoptic_on: bool
    semantic_on: bool


def get_resize_output_size(
    height: int, width: int, shortest_edge: int, longest_edge: int | None = None
) -> tuple[int, int]:
    """Output size of detectron2's `ResizeShortestEdge` (test time, one short-edge length).

    The short side is scaled to `shortest_edge`; if the long side then exceeds `longest_edge`, both sides are
    scaled down so that it equals `longest_edge`; each side is finally rounded half up (`int(x + 0.5)`).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got (height, width) = ({height}, {width})")
    scale = float(shortest_edge) / min(height, width)
    if height < width:
        new_height, new_width = float(shortest_edge), scale * width
    else:
        new_height, new_width = scale * height, float(shortest_edge)
    if longest_edge is not None and max(new_height, new_width) > longest_edge:
        shrink = float(longest_edge) / max(new_height, new_width)
        new_height, new_width = new_height * shrink, new_width * shrink
    resized = int(new_height + 0.5), int(new_width + 0.5)
    if min(resized) < 1:
        raise ValueError(
            f"an image of (height, width) = ({height}, {width}) resizes to {resized} with shortest_edge="
            f"{shortest_edge} and longest_edge={longest_edge}: its aspect ratio is too extreme (a side under one "
            "pixel); crop or pad it first"
        )
    return resized


# Mask logits resized at once by instance post-processing, at most (floats of the padded or target size): 16 MB.
RESIZE_CHUNK_VALUES = 4 * 1024 * 1024


def _round_up(value: int, divisor: int) -> int:
    return value if divisor <= 1 else (value + divisor - 1) // divisor * divisor


def _resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of an integer (H, W) map with PIL, as detectron2 resizes masks and label maps."""
    if array.shape == (height, width):
        return array
    resized = Image.fromarray(array.astype(np.int32)).resize((width, height), Image.NEAREST)
    return np.asarray(resized).astype(array.dtype)


def _bitmask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight float32 boxes (x0, y0, x1 + 1, y1 + 1) of bool masks (N, H, W), all zeros for an empty mask: detectron2
    `BitMasks.get_bounding_boxes`, the model's `mask_boxes(masks, "bitmask")`. Written here, not imported, because
    the processor is saved as standalone remote code (no imports of other package modules)."""
    height, width = masks.shape[-2:]
    cols, rows = masks.any(dim=-2), masks.any(dim=-1)
    x = torch.arange(width, device=masks.device, dtype=torch.float32)
    y = torch.arange(height, device=masks.device, dtype=torch.float32)
    boxes = torch.stack([
        torch.where(cols, x, float(width)).amin(-1), torch.where(rows, y, float(height)).amin(-1),
        torch.where(cols, x, -1.0).amax(-1) + 1, torch.where(rows, y, -1.0).amax(-1) + 1,
    ], dim=-1)
    return torch.where(cols.any(-1, keepdim=True), boxes, 0.0)


def rle_counts(counts: Any, where: str) -> list[int]:
    """Run lengths of a COCO RLE: a list of ints, or the compressed string (6-bit chunks from '0', the format
    pycocotools writes), read here so that malformed counts are refused before pycocotools decodes them (it reads
    past the runs it was given)."""
    if isinstance(counts, list):
        for count in counts:
            if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
                raise ValueError(f"{where}: RLE counts must be non-negative ints, got {count!r}")
        return [int(count) for count in counts]
    if isinstance(counts, str):
        counts = counts.encode()
    if not isinstance(counts, bytes):
        raise TypeError(f"{where}: RLE counts must be a list of ints or a compressed string, got {type(counts)}")
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position == len(counts):
                raise ValueError(f"{where}: compressed RLE counts {counts[:40]!r} end in the middle of a run")
            chunk = counts[position] - 48
            if not 0 <= chunk < 64:
                raise ValueError(f"{where}: compressed RLE counts hold the invalid character {chr(counts[position])!r}")
            value |= (chunk & 0x1F) << shift
            more = bool(chunk & 0x20)
            position += 1
            shift += 5
            if not more and chunk & 0x10:
                value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise ValueError(f"{where}: compressed RLE counts decode to a negative run length {value}")
        runs.append(value)
    return runs


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Absolute xyxy boxes (N, 4) clipped to an image of `height` x `width` (a new tensor)."""
    limits = boxes.new_tensor([width, height, width, height])
    return torch.minimum(boxes.clamp(min=0), limits)


def _as_size_pairs(sizes: Any, name: str) -> list[tuple[int, int]]:
    """(height, width) pairs from a list of pairs or a (batch, 2) tensor / array, refusing anything else."""
    if isinstance(sizes, (torch.Tensor, np.ndarray)):
        if sizes.ndim != 2 or sizes.shape[1] != 2:
            raise ValueError(f"{name} must be a (batch, 2) tensor of (height, width), got shape {tuple(sizes.shape)}")
        sizes = sizes.tolist()
    if not isinstance(sizes, Sequence) or isinstance(sizes, str):
        raise TypeError(f"{name} must be a list of (height, width) pairs or a (batch, 2) tensor, got {type(sizes)}")
    pairs = []
    for size in sizes:
        if isinstance(size, (torch.Tensor, np.ndarray)):
            size = size.tolist()
        if not isinstance(size, Sequence) or isinstance(size, str) or len(size) != 2:
            raise ValueError(f"every entry of {name} must be a (height, width) pair, got {size!r}")
        for value in size:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must hold integer (height, width) pairs, got {size!r}")
            if not (math.isfinite(value) and float(value).is_integer()):
                raise ValueError(f"{name} must hold integer (height, width) pairs, got {size!r}")
        height, width = int(size[0]), int(size[1])
        if height <= 0 or width <= 0:
            raise ValueError(f"{name} must hold positive sizes, got {size!r}")
        pairs.append((height, width))
    return pairs


def _check_fraction(name: str, value: Any) -> float:
    """A threshold in [0, 1] as a float, or a clear error."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def _check_top_k(top_k: Any) -> int | None:
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"top_k must be a positive int (or None for test_topk_per_image), got {top_k!r}")
    if top_k < 1:
        raise ValueError(f"top_k must be a positive int (or None for test_topk_per_image), got {top_k}")
    return int(top_k)


def _same_aspect(size: tuple[int, int], resized: tuple[int, int]) -> bool:
    """Whether `resized` can be `size` scaled by one factor with each side rounded (|h' w - w' h| <= (h + w) / 2)."""
    (height, width), (new_height, new_width) = size, resized
    slack = 0.5 * (height + width) + 0.5 * (new_height + new_width) + 1
    return abs(new_height * width - new_width * height) <= slack


# Queries whose full-size maps are materialised at once in semantic post-processing (memory bound).
_QUERY_CHUNK = 32


def _resize_bilinear(maps: torch.Tensor, size, buffers: dict | None, key: str) -> torch.Tensor:
    """`F.interpolate(maps, size, mode="bilinear", align_corners=False)` (the same kernel, so the same values),
    written into `buffers[key]` when `buffers` is given: a tensor kept there and grown when a call needs more maps."""
    if buffers is None:
        return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    shape = (*maps.shape[:2], *size)
    buffer = buffers.get(key)
    too_small = buffer is not None and any(have < need for have, need in zip(buffer.shape[:2], shape[:2]))
    if buffer is None or too_small or buffer.shape[2:] != shape[2:] or buffer.dtype != maps.dtype:
        buffer = buffers[key] = maps.new_empty(shape)
    out = buffer[: shape[0], : shape[1]]
    return torch.ops.aten.upsample_bilinear2d.out(maps, list(size), False, None, None, out=out)


def _first_argmax(maps: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """`maps.argmax(0)`, or `(weights[:, None, None] * maps).argmax(0)` without materialising the product (first
    index among ties): a running maximum over the leading axis, a later map winning only where it is strictly
    larger (one elementwise pass per map is several times faster on CPU than a reduction over the leading axis)."""
    best = maps[0].clone() if weights is None else maps[0] * weights[0]
    index = torch.zeros(best.shape, dtype=torch.int64, device=best.device)
    product, better = torch.empty_like(best), torch.empty(best.shape, dtype=torch.bool, device=best.device)
    for position in range(1, maps.shape[0]):
        candidate = maps[position] if weights is None else torch.mul(maps[position], weights[position], out=product)
        torch.gt(candidate, best, out=better)
        index.masked_fill_(better, position)
        torch.maximum(best, candidate, out=best)
    return index


def _mask_nms(scores: torch.Tensor, labels: torch.Tensor, mask_logits: torch.Tensor, threshold: float,
              fuse: set[int]) -> torch.Tensor:
    """Indices (ascending) of the queries left by greedy mask NMS: in decreasing `scores`, a thing query (label not in
    `fuse`) is dropped when its mask (logit > 0 on the (Q, h, w) maps) has IoU above `threshold` with a kept query of
    the same class. Stuff queries are all kept (panoptic merging fuses them)."""
    binary = (mask_logits > 0).flatten(1).double()  # float64: exact pixel counts
    intersection = binary @ binary.T
    area = binary.sum(1)
    iou = intersection / (area[:, None] + area[None, :] - intersection).clamp(min=1)
    # The greedy pass reads the few kept queries' pairs on the host: one transfer, not one per query.
    duplicate = ((iou > threshold) & (labels[:, None] == labels[None, :])).tolist()
    label_list = labels.tolist()
    kept: list[int] = []
    for query in scores.argsort(descending=True, stable=True).tolist():
        if label_list[query] in fuse or not any(duplicate[query][other] for other in kept):
            kept.append(query)
    return torch.tensor(sorted(kept), dtype=torch.long, device=labels.device)


def _window_extremes(maps: torch.Tensor, extreme) -> torch.Tensor:
    """`extreme` (torch.maximum or torch.minimum) of each value's 3x3 neighbourhood in (N, h, w) maps, the border
    replicated: shifted elementwise comparisons (`max_pool2d` with stride 1 is far slower on CPU)."""
    result = maps.clone()
    for dim in (-2, -1):
        source, length = (result.clone() if dim == -1 else maps), maps.shape[dim] - 1
        for target, shifted in ((result.narrow(dim, 1, length), source.narrow(dim, 0, length)),
                                (result.narrow(dim, 0, length), source.narrow(dim, 1, length))):
            extreme(target, shifted, out=target)
    return result


def _product_bounds(scores, highest, lowest, margin) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds on score x sigmoid(logit) for logits in [lowest, highest], widened by `margin` (logit rounding), a
    relative 1e-5 (sigmoid rounding) and 1e-30 (denormal probabilities)."""
    upper = highest.add(margin).sigmoid_().mul_(1 + 1e-5).add_(1e-30).mul_(scores)
    lower = lowest.sub(margin).sigmoid_().mul_(1 - 1e-5).sub_(1e-30).mul_(scores)
    return upper, lower


def _possible_owners(scores: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Indices (ascending) of the queries that can win `(scores * sigmoid(resized mask_logits)).argmax(0)` at some
    pixel, for any crop and bilinear resize of the 4x upsampled (Q, h, w) logits; all queries if a logit is not
    finite.

    Bilinear resizing (the 4x upsampling, then any crop and resize) makes every value a convex combination of
    logits within a 3x3 window of the low-resolution map, so a query whose highest possible score x probability on a
    window is below another query's lowest one there owns no pixel anchored at it. Queries are first screened on
    their extremes over the whole map, then on every window. The margins (relative 1e-4 of the largest logit
    magnitude for the resizes' rounding, see `_product_bounds`) make the product of a query left out strictly
    smaller at every pixel, so the argmax, first index among ties included, is the same over the possible owners as
    over all queries.
    """
    count = mask_logits.shape[0]
    flat = mask_logits.flatten(1)
    highest, lowest = flat.amax(1), flat.amin(1)  # reductions: no full-size temporaries
    if count <= 1 or not (highest.isfinite().all() and lowest.isfinite().all()):
        return torch.arange(count, device=mask_logits.device)
    margin = torch.maximum(highest.abs(), lowest.abs()).mul_(1e-4).add_(1e-4)
    upper, lower = _product_bounds(scores, highest, lowest, margin)
    possible = torch.nonzero(upper >= lower.amax()).flatten()
    maps = mask_logits[possible]
    upper, lower = _product_bounds(
        scores[possible, None, None],
        _window_extremes(maps, torch.maximum),
        _window_extremes(maps, torch.minimum),
        margin[possible, None, None],
    )
    return possible[upper.ge_(lower.amax(0)).flatten(1).any(1)]


class MaskDINOImageProcessor(BaseImageProcessor):
    r"""
    Image processor of Mask DINO, reproducing the official detectron2 test-time input pipeline and inference.

    Preprocessing (`preprocess` / `__call__`), in this order:

    1. convert each image to RGB (`do_convert_rgb`, the default): a grey image (2-D, one channel, PIL `L`) is
       repeated three times, a fourth (alpha) channel is dropped, other PIL modes go through PIL's `convert("RGB")`;
       anything else (1-D or 5-D arrays, 2 or 5 channels, non-image types, an empty list) raises;
    2. bring the values to the 0-255 scale: uint8 as is; **16-bit images** (uint16 arrays, PIL modes `I;16` and
       `I`) are scaled by their dtype range (x * 255 / 65535); other integer arrays must hold 0..255; float images
       are read on the 0-255 scale and must be finite and within [0, 255] — a float image in [0, 1] or an already
       normalised one raises (pass `do_rescale=True` with `rescale_factor`, default 255, or `do_normalize=False`);
       with `do_rescale` the values are multiplied by `rescale_factor` instead of the dtype rule;
    3. resize so that the short side is `size["shortest_edge"]` unless the long side would exceed
       `size["longest_edge"]` ([`get_resize_output_size`], detectron2 `ResizeShortestEdge`), with PIL bilinear on
       uint8 images (other images are resized per channel in PIL mode `F`, without rounding); an image whose aspect
       ratio would make a side shorter than one pixel (e.g. 1 x 5000) raises, naming its size;
    4. normalise `(x - image_mean) / image_std` on the 0-255 scale;
    5. zero-pad bottom/right to the largest image of the batch, rounded up to `size_divisibility` (or to
       `pad_size`).

    Returns `pixel_values` (batch, 3, H_pad, W_pad) float32 and `pixel_mask` (batch, H_pad, W_pad) int64, 1 on real
    pixels. The resized size of image i is `pixel_mask[i]`'s extent (see [`image_sizes_from_pixel_mask`]).

    Args:
        do_resize (`bool`, defaults to `True`): resize with the shortest-edge rule.
        size (`dict`, defaults to `{"shortest_edge": 800, "longest_edge": 1333}`): `INPUT.MIN_SIZE_TEST` and
            `INPUT.MAX_SIZE_TEST`; `longest_edge` may be `None` (no cap).
        resample (`int`, defaults to `PIL.Image.BILINEAR`): PIL filter for images (masks always use nearest).
        do_normalize (`bool`, defaults to `True`), image_mean / image_std (3 floats, 0-255 scale, RGB order).
        do_pad (`bool`, defaults to `True`): pad the batch; without padding all resized images must share a size.
        do_convert_rgb (`bool`, defaults to `True`): convert grey and RGBA images to RGB (step 1).
        do_rescale (`bool`, defaults to `False`), rescale_factor (`float`, defaults to 255): multiply pixel values by
            `rescale_factor` before normalisation, e.g. float images on the 0-1 scale with the default factor, or the
            Transformers convention `rescale_factor=1/255` with `image_mean` / `image_std` on the 0-1 scale (the
            same normalisation).
        size_divisibility (`int`, defaults to 32): padded sizes are multiples of it.
        num_labels (`int`, *optional*): number of classes, see the class-logit rule below.
        ignore_index (`int`, defaults to 255): unlabelled value of semantic maps.
        do_reduce_labels (`bool`, defaults to `False`): for semantic maps whose 0 means "other" (ADE20K's
            `scene_parse_150`): 0 becomes `ignore_index` and every other class id is decreased by one.
        stuff_labels (`list[int]`, defaults to `[]`): stuff class ids; every other class is a thing.
        test_topk_per_image (`int`, defaults to 100): `TEST.DETECTIONS_PER_IMAGE`.
        object_mask_threshold (`float`, defaults to 0.25), overlap_threshold (`float`, defaults to 0.8): panoptic
            query keep threshold and segment overlap ratio.
        panoptic_mask_nms_threshold (`float`, *optional*): not official; when set, panoptic inference first drops
            each thing query whose mask has IoU above it with a higher-scoring query of the same class (greedy mask
            NMS on the predicted mask logits > 0). The official rule gives a shape predicted by two similar queries to
            neither (they split its pixels and both fall under `overlap_threshold`), leaving it void; NMS keeps the
            better one. `None` (the default) is the official inference.
        panoptic_temperature (`float`, defaults to 0.06), panoptic_transform_eval (`bool`, defaults to `True`):
            sharpen sigmoid class scores with `softmax(sigmoid / T)` for semantic and panoptic inference.
        focus_on_box (`bool`, defaults to `False`): instance scores are not rescored by their mask.
        semantic_postprocessing_before_inference (`bool`, defaults to `False`): resize the mask logits to the
            requested size before semantic inference (always the case when `instance_on` or `panoptic_on`).
        instance_on / panoptic_on / semantic_on (`bool`): the tasks the checkpoint was configured for
            (`MODEL.MaskDINO.TEST.*_ON`). They select the semantic order above, make instance and detection results
            of a panoptic model keep thing classes only, and choose what [`post_process_universal_segmentation`]
            returns.

    Class logits: with `num_labels` known (argument of the post-processing methods, else the processor's), logits of
    width `num_labels + 1` are a softmax classifier whose last logit is "no object" (`SEMANTIC_CE_LOSS` semantic
    models); width `num_labels` (or `num_labels` unknown) is the sigmoid (focal) classifier. Any other width raises.

    Post-processing takes Mask2Former's arguments and returns its keys (`segmentation`, `segments_info`), with the
    official inference as the default of every argument left `None`; thresholds outside [0, 1], a non-positive
    `top_k`, unknown `label_ids_to_fuse` and malformed `target_sizes` (including (width, height) pairs recognisable
    from the padded size) raise. `maskdino_hf.pipelines` gives Transformers' pipelines the same defaults.
    """

    valid_kwargs = MaskDINOImageProcessorKwargs
    model_input_names = ["pixel_values", "pixel_mask"]
    default_to_square = False  # an int size is the shortest edge

    def __init__(
        self,
        do_resize: bool = True,
        size: dict[str, int | None] | int | None = None,
        resample: int = Image.BILINEAR,
        do_normalize: bool = True,
        image_mean: Sequence[float] = MASKDINO_PIXEL_MEAN,
        image_std: Sequence[float] = MASKDINO_PIXEL_STD,
        do_pad: bool = True,
        size_divisibility: int = 32,
        num_labels: int | None = None,
        ignore_index: int = 255,
        do_reduce_labels: bool = False,
        stuff_labels: Iterable[int] | None = None,
        test_topk_per_image: int = 100,
        object_mask_threshold: float = 0.25,
        overlap_threshold: float = 0.8,
        panoptic_mask_nms_threshold: float | None = None,
        panoptic_temperature: float = 0.06,
        panoptic_transform_eval: bool = True,
        focus_on_box: bool = False,
        semantic_postprocessing_before_inference: bool = False,
        instance_on: bool = True,
        panoptic_on: bool = False,
        semantic_on: bool = False,
        do_convert_rgb: bool = True,
        do_rescale: bool = False,
        rescale_factor: float = 255.0,
        **kwargs,
    ):
        kwargs.pop("image_processor_type", None)
        super().__init__(**kwargs)
        self.do_convert_rgb = bool(do_convert_rgb)
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = float(rescale_factor)
        self.do_resize = do_resize
        self.size = self._standardize_size(size)
        self.resample = int(resample)
        self.do_normalize = do_normalize
        self.image_mean = [float(value) for value in image_mean]
        self.image_std = [float(value) for value in image_std]
        self.do_pad = do_pad
        self.size_divisibility = int(size_divisibility)
        self.num_labels = None if num_labels is None else int(num_labels)
        self.ignore_index = int(ignore_index)
        self.do_reduce_labels = bool(do_reduce_labels)
        self.stuff_labels = sorted(int(label) for label in (stuff_labels or ()))
        self.test_topk_per_image = int(test_topk_per_image)
        self.object_mask_threshold = float(object_mask_threshold)
        self.overlap_threshold = float(overlap_threshold)
        self.panoptic_mask_nms_threshold = None if panoptic_mask_nms_threshold is None else float(
            panoptic_mask_nms_threshold
        )
        self.panoptic_temperature = float(panoptic_temperature)
        self.panoptic_transform_eval = bool(panoptic_transform_eval)
        self.focus_on_box = bool(focus_on_box)
        self.semantic_postprocessing_before_inference = bool(semantic_postprocessing_before_inference)
        self.instance_on = bool(instance_on)
        self.panoptic_on = bool(panoptic_on)
        self.semantic_on = bool(semantic_on)
        self._validate_settings()

    # ------------------------------------------------------------------ settings

    @staticmethod
    def _standardize_size(size: dict[str, int | None] | int | None) -> dict[str, int | None]:
        if size is None:
            return {"shortest_edge": 800, "longest_edge": 1333}
        if isinstance(size, int):
            return {"shortest_edge": size, "longest_edge": None}
        if not isinstance(size, Mapping) or "shortest_edge" not in size:
            raise ValueError(f"size must be a dict with 'shortest_edge' (and optionally 'longest_edge'), got {size!r}")
        unknown = set(size) - {"shortest_edge", "longest_edge"}
        if unknown:
            raise ValueError(f"size only takes 'shortest_edge' and 'longest_edge', got extra keys {sorted(unknown)}")
        longest = size.get("longest_edge")
        return {"shortest_edge": int(size["shortest_edge"]), "longest_edge": None if longest is None else int(longest)}

    def _validate_settings(self):
        if self.size["shortest_edge"] <= 0:
            raise ValueError(f"size['shortest_edge'] must be positive, got {self.size['shortest_edge']}")
        if self.size["longest_edge"] is not None and self.size["longest_edge"] < self.size["shortest_edge"]:
            raise ValueError(f"size['longest_edge'] must be at least size['shortest_edge'], got {self.size}")
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} must have 3 values (RGB), got {getattr(self, name)}")
        if any(value == 0 for value in self.image_std):
            raise ValueError(f"image_std must not contain 0, got {self.image_std}")
        if not self.do_rescale and max(self.image_mean) <= 1.0 and max(self.image_std) <= 1.0:
            raise ValueError(
                "image_mean and image_std are on the 0-255 scale of the official MODEL.PIXEL_MEAN/PIXEL_STD (e.g. "
                f"123.675 / 58.395); got {self.image_mean} / {self.image_std}, which look like the 0-1 scale (for "
                "that scale pass do_rescale=True with rescale_factor=1/255, as other Transformers processors do)"
            )
        if not (math.isfinite(self.rescale_factor) and self.rescale_factor > 0):
            raise ValueError(f"rescale_factor must be a positive finite number, got {self.rescale_factor}")
        if self.size_divisibility < 0:
            raise ValueError(f"size_divisibility must be >= 0, got {self.size_divisibility}")
        if self.num_labels is not None and self.num_labels <= 0:
            raise ValueError(f"num_labels must be positive, got {self.num_labels}")
        if self.test_topk_per_image <= 0:
            raise ValueError(f"test_topk_per_image must be positive, got {self.test_topk_per_image}")
        if self.panoptic_temperature <= 0:
            raise ValueError(f"panoptic_temperature must be positive, got {self.panoptic_temperature}")
        if not 0.0 <= self.object_mask_threshold <= 1.0:
            raise ValueError(f"object_mask_threshold must be in [0, 1], got {self.object_mask_threshold}")
        if not 0.0 <= self.overlap_threshold <= 1.0:
            raise ValueError(f"overlap_threshold must be in [0, 1], got {self.overlap_threshold}")
        if self.panoptic_mask_nms_threshold is not None and not 0.0 <= self.panoptic_mask_nms_threshold <= 1.0:
            raise ValueError(
                f"panoptic_mask_nms_threshold must be in [0, 1] or None, got {self.panoptic_mask_nms_threshold}"
            )
        if self.num_labels is not None:
            bad = [label for label in self.stuff_labels if not 0 <= label < self.num_labels]
            if bad:
                raise ValueError(f"stuff_labels {bad} are outside 0..{self.num_labels - 1} (num_labels)")
        if self.resample not in (
            Image.NEAREST,
            Image.BILINEAR,
            Image.BICUBIC,
            Image.LANCZOS,
            Image.BOX,
            Image.HAMMING,
        ):
            raise ValueError(f"resample must be a PIL resampling filter, got {self.resample}")

    @staticmethod
    def _standardized_setting(name: str, value: Any) -> Any:
        """A post-processing setting as the constructor stores it (`stuff_labels` sorted ints)."""
        return sorted(int(label) for label in value) if name == "stuff_labels" else value

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["size"] = dict(self.size)
        return output

    # ------------------------------------------------------------------ images

    @staticmethod
    def _image_to_array(image: Any, input_data_format: str | None, do_convert_rgb: bool, where: str) -> np.ndarray:
        """One image as a (channels, H, W) array of its own dtype (16-bit PIL images as uint16); see the class
        docstring for the channel rules."""
        if isinstance(image, Image.Image):
            if image.mode.startswith("I;16"):
                array = np.asarray(image).astype(np.uint16)
            elif image.mode == "I":
                # 32-bit integer mode, which is how PIL may open 16-bit PNGs: read as 16-bit
                array = np.asarray(image)
                if array.size and (array.min() < 0 or array.max() > 65535):
                    raise ValueError(
                        f"{where}: a PIL mode 'I' image is read as 16-bit (0..65535), got values "
                        f"{array.min()}..{array.max()}"
                    )
                array = array.astype(np.uint16)
            elif image.mode == "F":
                array = np.asarray(image)
            elif image.mode in ("L", "LA"):
                array = np.asarray(image.convert("L"))
            elif image.mode == "RGBA":
                array = np.asarray(image)
            else:
                array = np.asarray(image.convert("RGB"))
            input_data_format = "channels_last"
        elif isinstance(image, torch.Tensor):
            image = image.detach().cpu()
            array = (image.float() if image.dtype == torch.bfloat16 else image).numpy()
        elif isinstance(image, np.ndarray):
            array = image
        else:
            raise TypeError(
                f"images must be PIL images, numpy arrays or torch tensors (or a list of them), got {type(image)}"
            )

        if array.dtype == np.bool_ or not (
            np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
        ):
            raise TypeError(f"{where}: image arrays must have an integer or floating dtype, got {array.dtype}")
        if array.ndim == 2:
            array = array[None]
        elif array.ndim == 3:
            if input_data_format is None:
                first, last = array.shape[0] in _CHANNEL_COUNTS, array.shape[-1] in _CHANNEL_COUNTS
                if not (first or last):
                    raise ValueError(
                        f"{where}: cannot find the channel axis of an image of shape {tuple(array.shape)}: the first "
                        "or last axis must have 1 (grey), 3 (RGB) or 4 (RGBA) channels, or pass input_data_format"
                    )
                input_data_format = "channels_first" if first else "channels_last"
            input_data_format = getattr(input_data_format, "value", input_data_format)  # a ChannelDimension
            if input_data_format in ("channels_last", "last"):
                array = np.moveaxis(array, -1, 0)
            elif input_data_format not in ("channels_first", "first"):
                raise ValueError(
                    f"input_data_format must be 'channels_first' or 'channels_last', got {input_data_format!r}"
                )
        else:
            raise ValueError(
                f"{where}: an image must have 2 (H, W) or 3 (channels, H, W / H, W, channels) dimensions, got shape "
                f"{tuple(array.shape)}"
            )
        if array.shape[1] == 0 or array.shape[2] == 0:
            raise ValueError(f"{where}: an image must not be empty, got shape {tuple(array.shape)}")

        channels = array.shape[0]
        if do_convert_rgb:
            if channels == 1:
                array = np.repeat(array, 3, axis=0)
            elif channels == 4:
                array = array[:3]
            elif channels != 3:
                raise ValueError(
                    f"{where}: an image must have 1, 3 or 4 channels, got {channels} (grey, RGB or RGBA; shape "
                    f"{tuple(array.shape)})"
                )
        return array

    @staticmethod
    def _to_pixel_scale(
        array: np.ndarray, do_rescale: bool, rescale_factor: float, do_normalize: bool, where: str, top: float = 255.0
    ) -> np.ndarray:
        """Pixel values on the 0-255 scale of `image_mean` / `image_std`: uint8, or float32 (rules in the class
        docstring). With `do_rescale` the values are only checked here: uint8 images stay uint8 (so that they are
        resized as the official pipeline does) and the caller multiplies by `rescale_factor` after resizing; the
        rescaled values must lie in [0, `top`], the scale of `image_mean` / `image_std` (255, or 1 for 0-1)."""
        if do_rescale:
            if array.dtype == np.uint8 and rescale_factor * 255 <= top:
                return np.ascontiguousarray(array)
            array = array.astype(np.float32)
            checked = array * np.float32(rescale_factor)
        elif array.dtype == np.uint8:
            return np.ascontiguousarray(array)
        elif array.dtype == np.uint16:
            # 16-bit images (PNG modes I;16 / I): the dtype range 0..65535 mapped onto 0..255
            return np.ascontiguousarray(array.astype(np.float32) * np.float32(255.0 / 65535.0))
        elif np.issubdtype(array.dtype, np.integer):
            if array.min() < 0 or array.max() > 255:
                raise ValueError(
                    f"{where}: integer images must hold values in 0..255 (uint16 images are scaled from 0..65535), "
                    f"got {array.min()}..{array.max()} with dtype {array.dtype}"
                )
            return np.ascontiguousarray(array.astype(np.uint8))
        else:
            array = checked = array.astype(np.float32)
        if not np.isfinite(checked).all():
            raise ValueError(f"{where}: the image holds NaN or infinite values")
        if do_normalize:
            low, high = float(checked.min()), float(checked.max())
            top = top if do_rescale else 255.0
            scale = f" after rescaling by rescale_factor={rescale_factor}" if do_rescale else ""
            if low < 0.0 or high > top:
                raise ValueError(
                    f"{where}: pixel values must be in [0, {top:g}] (the scale of image_mean / image_std){scale}, got "
                    f"{low:g}..{high:g}; for an image that is already normalised pass do_normalize=False, for another "
                    "scale pass do_rescale=True with the factor that maps it onto 0..255"
                )
            if not do_rescale and 0.0 < high <= 1.0:
                raise ValueError(
                    f"{where}: a float image with values in [0, 1] ({low:g}..{high:g}) looks like the 0-1 scale, but "
                    "images are read on the 0-255 scale: pass do_rescale=True (rescale_factor=255) or multiply it "
                    "by 255"
                )
        return np.ascontiguousarray(array)

    def _images_to_list(self, images: Any, input_data_format: str | None, do_convert_rgb: bool) -> list[np.ndarray]:
        if isinstance(images, (list, tuple)):
            if len(images) == 0:
                raise ValueError("images is an empty list: pass at least one image")
            items = list(images)
        elif isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            if images.shape[0] == 0:
                raise ValueError("images is an empty batch: pass at least one image")
            items = list(images)
        else:
            items = [images]
        for item in items:
            if isinstance(item, (list, tuple)):
                raise TypeError("images must be an image or a flat list of images, got a nested list")
        return [
            self._image_to_array(item, input_data_format, do_convert_rgb, f"image {index}")
            for index, item in enumerate(items)
        ]

    def _resize_image(self, image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
        if image.shape[1:] == (height, width):
            return image
        if image.dtype == np.uint8 and image.shape[0] == 3:
            resized = Image.fromarray(np.moveaxis(image, 0, -1)).resize((width, height), resample)
            return np.ascontiguousarray(np.moveaxis(np.asarray(resized), -1, 0))
        # float images (PIL mode F) and other channel counts (do_convert_rgb=False): one channel at a time
        channels = [np.asarray(Image.fromarray(channel).resize((width, height), resample)) for channel in image]
        return np.stack(channels)

    def get_resized_size(self, height: int, width: int, size: dict | None = None) -> tuple[int, int]:
        """Size after this processor's resize (the identity when `do_resize` is off)."""
        if not self.do_resize:
            return height, width
        size = self.size if size is None else self._standardize_size(size)
        return get_resize_output_size(height, width, size["shortest_edge"], size["longest_edge"])

    @staticmethod
    def image_sizes_from_pixel_mask(pixel_mask: torch.Tensor) -> list[tuple[int, int]]:
        """Resized (unpadded) size of each image from the `pixel_mask` returned by `preprocess`."""
        # the image is the top-left part of its pixel mask: its size is the mask's box's bottom-right corner
        boxes = _bitmask_boxes(torch.as_tensor(pixel_mask).bool())
        return [(int(y1), int(x1)) for _, _, x1, y1 in boxes.tolist()]

    def preprocess(
        self,
        images: Any,
        annotations: dict | Sequence[dict] | None = None,
        segmentation_maps: Any = None,
        masks_path: str | os.PathLike | None = None,
        category_id_to_label: Mapping[int, int] | None = None,
        do_resize: bool | None = None,
        size: dict[str, int | None] | int | None = None,
        resample: int | None = None,
        do_normalize: bool | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        do_pad: bool | None = None,
        size_divisibility: int | None = None,
        num_labels: int | None = None,
        ignore_index: int | None = None,
        do_reduce_labels: bool | None = None,
        input_data_format: str | None = None,
        return_tensors: str | None = "pt",
        do_convert_rgb: bool | None = None,
        do_rescale: bool | None = None,
        rescale_factor: float | None = None,
        pad_size: dict[str, int] | int | None = None,
        data_format: str | None = None,
        device: str | torch.device | None = None,
        do_center_crop: bool | None = None,
        crop_size: Any = None,
        default_to_square: bool | None = None,
        disable_grouping: bool | None = None,
        image_seq_length: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        r"""
        Preprocess images (and optionally their annotations) into a padded batch.

        Args:
            images: a PIL image, numpy array or torch tensor (channels first or last, or (H, W) grey), a list of
                them (sizes may differ), or a 4-D array/tensor read as a batch.
            annotations: training annotations, one dict per image, either
                * COCO instances: `{"annotations": [{"segmentation": polygons | RLE | (H, W) binary mask,
                  "category_id": int, "iscrowd": 0}, ...]}` (crowd objects are skipped); or
                * COCO panoptic: `{"segments_info": [{"id": int, "category_id": int, "iscrowd": 0}, ...],
                  "panoptic_seg": RGB PNG (PIL/array, id = R + 256 G + 256^2 B) or (H, W) id map}`, or with
                  `"file_name"` instead of `"panoptic_seg"`, read from `masks_path`.
            segmentation_maps: semantic label maps (H, W), one per image; `ignore_index` pixels are unlabelled
                (after `do_reduce_labels`, if set).
            category_id_to_label: maps annotation `category_id`s (and semantic map values) to contiguous class ids
                (identity if not given); a value missing from it is an error.
            num_labels: classes allowed in annotations (else the processor's `num_labels`; unchecked if neither).
            input_data_format: `"channels_first"` or `"channels_last"` for arrays whose channel axis is ambiguous.
            return_tensors: `"pt"` (default) or `"np"` for `pixel_values` and `pixel_mask`.
            do_convert_rgb: convert grey and RGBA images to RGB (default `True`); with `False` images keep their
                channel count, which must then be the same for the batch and match `image_mean` / `image_std`.
            do_rescale / rescale_factor: multiply the pixel values by `rescale_factor` (default 255: images on the
                0-1 scale) before normalisation, which works on the 0-255 scale.
            pad_size: pad to this `{"height": int, "width": int}` (or square int) instead of the batch maximum
                rounded up to `size_divisibility`.
            data_format: `"channels_first"` (default) or `"channels_last"` layout of `pixel_values`.
            device: device of the returned tensors (`return_tensors="pt"`).
            do_center_crop / crop_size / default_to_square: Transformers keywords of other resize rules; Mask DINO
                resizes by the shortest edge and never crops, so `do_center_crop=True` and `default_to_square=True`
                raise, and `crop_size` is only accepted without `do_center_crop`.
            disable_grouping / image_seq_length: keywords of the torchvision backend and of image-token models;
                nothing here depends on them (`image_seq_length` must be `None`).
            The other arguments override the processor's attributes for this call.

        Returns:
            [`BatchFeature`] with `pixel_values` and `pixel_mask`, and with annotations also per-image lists
            `mask_labels` ((N, H_pad, W_pad) float32, zero-padded like the image), `class_labels` ((N,) int64) and
            `boxes` ((N, 4) float32, cxcywh normalised by the resized, UNPADDED image size as the official
            `prepare_targets` does). Masks are resized with the image (nearest; polygons are scaled and then
            rasterised); boxes are the tight boxes of the resized masks (detectron2 `BitMasks` convention, x1 + 1);
            objects whose mask is empty after resizing are dropped.
        """
        unknown = sorted(set(kwargs) - set(self.valid_kwargs.__annotations__))
        if unknown:
            raise TypeError(f"preprocess got unexpected arguments {unknown}")
        # The post-processing settings of the kwargs class: accepted when they restate the processor's own value
        # (or are None), since preprocessing does not depend on them; another value would be silently unused.
        different = sorted(
            name
            for name, value in kwargs.items()
            if value is not None and self._standardized_setting(name, value) != getattr(self, name)
        )
        if different:
            raise TypeError(
                f"{different} are post-processing settings of MaskDINOImageProcessor, which preprocess does not use: "
                "set them on the processor (constructor or from_pretrained) or pass them to post_process_*"
            )
        if do_center_crop:
            raise ValueError(
                "do_center_crop=True is not supported: Mask DINO resizes by the shortest edge and never crops "
                "(predictions are read back through the padding)"
            )
        if default_to_square:
            raise ValueError(
                "default_to_square=True is not supported: an int size is the shortest edge (size={'shortest_edge': "
                "n, 'longest_edge': None}), never a square"
            )
        if image_seq_length is not None:
            raise ValueError(f"image_seq_length does not apply to Mask DINO (no image tokens), got {image_seq_length}")
        if annotations is not None and segmentation_maps is not None:
            raise ValueError("pass either annotations or segmentation_maps, not both")
        do_resize = self.do_resize if do_resize is None else do_resize
        size = self.size if size is None else self._standardize_size(size)
        resample = self.resample if resample is None else int(resample)
        do_normalize = self.do_normalize if do_normalize is None else do_normalize
        image_mean = self.image_mean if image_mean is None else list(image_mean)
        image_std = self.image_std if image_std is None else list(image_std)
        do_pad = self.do_pad if do_pad is None else do_pad
        size_divisibility = self.size_divisibility if size_divisibility is None else int(size_divisibility)
        num_labels = self.num_labels if num_labels is None else int(num_labels)
        ignore_index = self.ignore_index if ignore_index is None else int(ignore_index)
        do_reduce_labels = self.do_reduce_labels if do_reduce_labels is None else bool(do_reduce_labels)
        do_convert_rgb = self.do_convert_rgb if do_convert_rgb is None else bool(do_convert_rgb)
        do_rescale = self.do_rescale if do_rescale is None else bool(do_rescale)
        rescale_factor = self.rescale_factor if rescale_factor is None else float(rescale_factor)
        data_format = getattr(data_format, "value", data_format) or "channels_first"
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        if data_format not in ("channels_first", "channels_last"):
            raise ValueError(f"data_format must be 'channels_first' or 'channels_last', got {data_format!r}")
        if do_rescale and not (math.isfinite(rescale_factor) and rescale_factor > 0):
            raise ValueError(f"rescale_factor must be a positive finite number, got {rescale_factor}")
        if len(image_mean) != len(image_std):
            raise ValueError(f"image_mean and image_std need as many values, got {image_mean} and {image_std}")

        raw_images = self._images_to_list(images, input_data_format, do_convert_rgb)
        channels = {image.shape[0] for image in raw_images}
        if len(channels) > 1:
            raise ValueError(
                "with do_convert_rgb=False all images of a batch need the same number of channels, got "
                f"{sorted(channels)}"
            )
        (num_channels,) = channels
        if do_normalize and len(image_mean) != num_channels:
            raise ValueError(
                f"image_mean and image_std have {len(image_mean)} values but the images have {num_channels} channels; "
                "do_convert_rgb=True (the default) converts grey and RGBA images to RGB"
            )
        original_sizes = [tuple(image.shape[1:]) for image in raw_images]
        resized_sizes = []
        for index, (height, width) in enumerate(original_sizes):
            try:
                resized_sizes.append(
                    get_resize_output_size(height, width, size["shortest_edge"], size["longest_edge"])
                    if do_resize
                    else (height, width)
                )
            except ValueError as error:
                raise ValueError(f"image {index}: {error}") from None
        mean = torch.tensor(image_mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(image_std, dtype=torch.float32).view(-1, 1, 1)
        top = 1.0 if max(image_mean) <= 1.0 and max(image_std) <= 1.0 else 255.0  # scale of image_mean / image_std
        tensors = []
        for index, (image, (height, width)) in enumerate(zip(raw_images, resized_sizes, strict=True)):
            image = self._to_pixel_scale(image, do_rescale, rescale_factor, do_normalize, f"image {index}", top)
            if do_resize:
                image = self._resize_image(image, height, width, resample)
            tensor = torch.from_numpy(np.ascontiguousarray(image))
            if do_rescale:
                tensor = tensor.float() * rescale_factor
            tensor = (tensor - mean) / std if do_normalize else tensor.float()
            tensors.append(tensor)

        largest = (max(h for h, _ in resized_sizes), max(w for _, w in resized_sizes))
        if pad_size is not None:
            if do_pad is False:
                raise ValueError("pad_size needs do_pad=True")
            pad = {"height": pad_size, "width": pad_size} if isinstance(pad_size, int) else dict(pad_size)
            if set(pad) != {"height", "width"}:
                raise ValueError(f"pad_size must be an int or a dict with 'height' and 'width', got {pad_size!r}")
            padded_height, padded_width = int(pad["height"]), int(pad["width"])
            if padded_height < largest[0] or padded_width < largest[1]:
                raise ValueError(
                    f"pad_size {(padded_height, padded_width)} (height, width) is smaller than the largest resized "
                    f"image {largest}"
                )
        elif do_pad:
            padded_height = _round_up(largest[0], size_divisibility)
            padded_width = _round_up(largest[1], size_divisibility)
        else:
            if len(set(resized_sizes)) > 1:
                raise ValueError(
                    f"do_pad=False needs all resized images to have the same size, got {sorted(set(resized_sizes))}"
                )
            padded_height, padded_width = resized_sizes[0]
        pixel_values = torch.zeros((len(tensors), num_channels, padded_height, padded_width), dtype=torch.float32)
        pixel_mask = torch.zeros((len(tensors), padded_height, padded_width), dtype=torch.int64)
        for index, (tensor, (height, width)) in enumerate(zip(tensors, resized_sizes, strict=True)):
            pixel_values[index, :, :height, :width] = tensor
            pixel_mask[index, :height, :width] = 1

        if data_format == "channels_last":
            pixel_values = pixel_values.permute(0, 2, 3, 1).contiguous()
        if return_tensors == "np":
            data = {"pixel_values": pixel_values.numpy(), "pixel_mask": pixel_mask.numpy()}
        else:
            data = {"pixel_values": pixel_values, "pixel_mask": pixel_mask}
        encoded = BatchFeature(data=data)

        if annotations is not None or segmentation_maps is not None:
            targets = self.encode_annotations(
                original_sizes,
                resized_sizes,
                (padded_height, padded_width),
                annotations=annotations,
                segmentation_maps=segmentation_maps,
                masks_path=masks_path,
                category_id_to_label=category_id_to_label,
                num_labels=num_labels,
                ignore_index=ignore_index,
                do_reduce_labels=do_reduce_labels,
            )
            encoded["mask_labels"] = [target["mask_labels"] for target in targets]
            encoded["class_labels"] = [target["class_labels"] for target in targets]
            encoded["boxes"] = [target["boxes"] for target in targets]
        if device is not None and return_tensors != "np":
            encoded = encoded.to(device)
        return encoded

    # ------------------------------------------------------------------ training targets

    def encode_annotations(
        self,
        original_sizes: Sequence[tuple[int, int]],
        resized_sizes: Sequence[tuple[int, int]],
        padded_size: tuple[int, int],
        annotations: dict | Sequence[dict] | None = None,
        segmentation_maps: Any = None,
        masks_path: str | os.PathLike | None = None,
        category_id_to_label: Mapping[int, int] | None = None,
        num_labels: int | None = None,
        ignore_index: int | None = None,
        do_reduce_labels: bool | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Per-image `mask_labels`, `class_labels`, `boxes` (see `preprocess`) from annotations of images of
        `original_sizes`, resized to `resized_sizes` and padded to `padded_size`."""
        num_labels = self.num_labels if num_labels is None else num_labels
        ignore_index = self.ignore_index if ignore_index is None else ignore_index
        do_reduce_labels = self.do_reduce_labels if do_reduce_labels is None else do_reduce_labels
        if annotations is not None:
            per_image = [annotations] if isinstance(annotations, Mapping) else list(annotations)
        elif isinstance(segmentation_maps, (list, tuple)):
            per_image = list(segmentation_maps)
        elif isinstance(segmentation_maps, (np.ndarray, torch.Tensor)) and segmentation_maps.ndim == 3:
            per_image = list(segmentation_maps)
        else:
            per_image = [segmentation_maps]
        if len(per_image) != len(original_sizes):
            kind = "annotations" if annotations is not None else "segmentation_maps"
            raise ValueError(f"got {len(per_image)} {kind} for {len(original_sizes)} images")

        targets = []
        for index, (item, (height, width), (new_height, new_width)) in enumerate(
            zip(per_image, original_sizes, resized_sizes, strict=True)
        ):
            where = f"image {index}"
            if annotations is None:
                masks, labels = self._semantic_targets(
                    item, height, width, new_height, new_width, ignore_index, do_reduce_labels, category_id_to_label,
                    where,
                )
            elif not isinstance(item, Mapping):
                raise TypeError(f"annotations for {where} must be a dict, got {type(item)}")
            elif "segments_info" in item:
                masks, labels = self._panoptic_targets(
                    item, height, width, new_height, new_width, masks_path, category_id_to_label, where
                )
            elif "annotations" in item:
                masks, labels = self._instance_targets(
                    item, height, width, new_height, new_width, category_id_to_label, where
                )
            else:
                raise ValueError(
                    f"annotations for {where} must have 'annotations' (COCO instances) or 'segments_info' (COCO "
                    f"panoptic), got keys {sorted(item)}"
                )
            for label in labels:
                if label < 0 or (num_labels is not None and label >= num_labels):
                    raise ValueError(
                        f"{where}: class id {label} is outside 0..{num_labels - 1 if num_labels else '?'} (num_labels"
                        f"={num_labels})"
                    )
            keep = [i for i, mask in enumerate(masks) if mask.any()]
            mask_tensor = torch.zeros((len(keep), *padded_size), dtype=torch.float32)
            for row, i in enumerate(keep):
                mask_tensor[row, :new_height, :new_width] = torch.from_numpy(masks[i].astype(np.float32))
            boxes = _bitmask_boxes(mask_tensor.bool())
            scale = torch.tensor([new_width, new_height, new_width, new_height], dtype=torch.float32)
            targets.append(
                {
                    "mask_labels": mask_tensor,
                    "class_labels": torch.tensor([labels[i] for i in keep], dtype=torch.int64),
                    "boxes": corners_to_center_format(boxes) / scale,
                }
            )
        return targets

    @staticmethod
    def _check_bbox(bbox: Any, where: str) -> None:
        """A COCO `bbox` given with an object (boxes are recomputed from the masks) must still be sane."""
        try:
            values = np.asarray(bbox, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: bbox must be 4 numbers [x, y, width, height], got {bbox!r}") from None
        if values.shape != (4,) or not np.isfinite(values).all() or values[2] < 0 or values[3] < 0:
            raise ValueError(
                f"{where}: bbox must be 4 finite numbers [x, y, width, height] with width, height >= 0, got {bbox!r}"
            )

    @staticmethod
    def _map_category(category_id: int, category_id_to_label: Mapping[int, int] | None, where: str) -> int:
        if isinstance(category_id, (torch.Tensor, np.ndarray)) and category_id.ndim == 0:
            category_id = category_id.item()
        if isinstance(category_id, bool) or not isinstance(category_id, numbers.Integral):
            raise TypeError(f"{where}: category_id must be an int, got {category_id!r}")
        category_id = int(category_id)
        if category_id_to_label is None:
            return category_id
        if category_id not in category_id_to_label:
            raise ValueError(f"{where}: category_id {category_id} is not in category_id_to_label")
        return int(category_id_to_label[category_id])

    @staticmethod
    def _label_map(array: Any, where: str, name: str) -> np.ndarray:
        if isinstance(array, Image.Image):
            array = np.asarray(array)
        elif isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
        elif not isinstance(array, np.ndarray):
            raise TypeError(f"{where}: {name} must be a PIL image, numpy array or torch tensor, got {type(array)}")
        return array

    def _instance_targets(self, item, height, width, new_height, new_width, category_id_to_label, where):
        masks, labels = [], []
        objects = item["annotations"]
        if not isinstance(objects, (list, tuple)):
            raise TypeError(f"{where}: 'annotations' must be a list of object dicts, got {type(objects)}")
        for number, obj in enumerate(objects):
            what = f"{where}, object {number}"
            if not isinstance(obj, Mapping):
                raise TypeError(f"{what}: an instance annotation must be a dict, got {type(obj)}")
            if obj.get("iscrowd", 0):
                continue
            if "segmentation" not in obj or "category_id" not in obj:
                raise ValueError(f"{what}: an instance annotation needs 'segmentation' and 'category_id'")
            if "bbox" in obj:
                self._check_bbox(obj["bbox"], what)
            segmentation = obj["segmentation"]
            if isinstance(segmentation, list):
                scale = np.array([new_width / width, new_height / height])
                polygons = []
                for polygon in segmentation:
                    try:
                        coords = np.asarray(polygon, dtype=np.float64).reshape(-1)
                    except (TypeError, ValueError):
                        raise ValueError(f"{what}: a polygon must be a flat list of numbers, got {polygon!r}") from None
                    if coords.size < 6 or coords.size % 2:
                        raise ValueError(f"{what}: a polygon needs at least 3 (x, y) points, got {coords.size} values")
                    if not np.isfinite(coords).all():
                        raise ValueError(f"{what}: a polygon holds NaN or infinite coordinates: {polygon!r}")
                    polygons.append((coords.reshape(-1, 2) * scale).reshape(-1).tolist())
                if not polygons:
                    raise ValueError(f"{what}: empty polygon list")
                rle = coco_mask.merge(coco_mask.frPyObjects(polygons, new_height, new_width))
                mask = coco_mask.decode(rle).astype(bool)
            elif isinstance(segmentation, Mapping):
                rle_size = tuple(int(v) for v in segmentation.get("size", ()))
                if rle_size != (height, width):
                    raise ValueError(f"{what}: RLE size {rle_size} does not match the image size {(height, width)}")
                if "counts" not in segmentation:
                    raise ValueError(f"{what}: an RLE needs 'size' and 'counts', got keys {sorted(segmentation)}")
                total = sum(rle_counts(segmentation["counts"], what))
                if total != height * width:
                    raise ValueError(
                        f"{what}: RLE counts sum to {total}, but a {height} x {width} mask has {height * width} pixels"
                    )
                if isinstance(segmentation["counts"], list):
                    rle = coco_mask.frPyObjects(dict(segmentation), height, width)
                else:
                    counts = segmentation["counts"]
                    rle = {"size": list(rle_size), "counts": counts.encode() if isinstance(counts, str) else counts}
                mask = _resize_nearest(coco_mask.decode(rle).astype(np.uint8), new_height, new_width).astype(bool)
            else:
                array = self._label_map(segmentation, what, "a mask")
                if array.shape != (height, width):
                    raise ValueError(
                        f"{what}: mask of shape {array.shape} does not match the image size {(height, width)}"
                    )
                if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
                    raise ValueError(f"{what}: the mask holds NaN or infinite values")
                mask = _resize_nearest((array != 0).astype(np.uint8), new_height, new_width).astype(bool)
            masks.append(mask)
            labels.append(self._map_category(obj["category_id"], category_id_to_label, what))
        return masks, labels

    def _panoptic_targets(self, item, height, width, new_height, new_width, masks_path, category_id_to_label, where):
        if "panoptic_seg" in item:
            png = item["panoptic_seg"]
        elif "file_name" in item:
            path = os.path.join(masks_path, item["file_name"]) if masks_path is not None else item["file_name"]
            with Image.open(path) as opened:
                png = np.asarray(opened.convert("RGB"))
        else:
            raise ValueError(f"{where}: a panoptic annotation needs 'panoptic_seg' or 'file_name' (with masks_path)")
        array = self._label_map(png, where, "panoptic_seg")
        if array.ndim == 3 and array.shape[-1] in (3, 4):
            ids = rgb_to_id(array[..., :3].astype(np.int64))
        elif array.ndim == 2:
            ids = array.astype(np.int64)
        else:
            raise ValueError(
                f"{where}: panoptic_seg must be an (H, W, 3) RGB PNG or an (H, W) id map, got {array.shape}"
            )
        if ids.shape != (height, width):
            raise ValueError(
                f"{where}: panoptic_seg of size {ids.shape} does not match the image size {(height, width)}"
            )
        segments = item["segments_info"]
        if not isinstance(segments, (list, tuple)) or not all(isinstance(s, Mapping) for s in segments):
            raise TypeError(f"{where}: segments_info must be a list of dicts, got {segments!r:.200}")
        for segment in segments:
            if "id" not in segment or "category_id" not in segment:
                raise ValueError(f"{where}: every segments_info entry needs 'id' and 'category_id', got {segment}")
        listed = [int(segment["id"]) for segment in segments]
        if len(set(listed)) != len(listed):
            raise ValueError(f"{where}: segments_info lists a segment id twice: {sorted(listed)}")
        missing = sorted(set(np.unique(ids).tolist()) - set(listed) - {0})
        if missing:
            raise ValueError(
                f"{where}: panoptic_seg holds segment ids {missing[:10]} that are not in segments_info (0 is the only "
                "unlabelled id)"
            )
        ids = _resize_nearest(ids, new_height, new_width)
        masks, labels = [], []
        for segment in segments:
            if segment.get("iscrowd", 0):
                continue
            masks.append(ids == int(segment["id"]))
            labels.append(
                self._map_category(segment["category_id"], category_id_to_label, f"{where}, segment {segment['id']}")
            )
        return masks, labels

    def _semantic_targets(
        self, item, height, width, new_height, new_width, ignore_index, reduce_labels, category_id_to_label, where
    ):
        array = self._label_map(item, where, "a segmentation map")
        if array.ndim != 2:
            raise ValueError(f"{where}: a segmentation map must be (H, W), got shape {array.shape}")
        if not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"{where}: a segmentation map must hold integer class ids, got {array.dtype}")
        if array.shape != (height, width):
            raise ValueError(
                f"{where}: segmentation map of size {array.shape} does not match the image size {(height, width)}"
            )
        array = _resize_nearest(array.astype(np.int64), new_height, new_width)
        if reduce_labels:
            array = np.where(array == 0, ignore_index, np.where(array == ignore_index, ignore_index, array - 1))
        values = [int(value) for value in np.unique(array) if value != ignore_index]
        labels = [self._map_category(value, category_id_to_label, f"{where}, map value") for value in values]
        return [array == value for value in values], labels

    # ------------------------------------------------------------------ post-processing helpers

    def _resolve_sizes(self, outputs, target_sizes, image_sizes):
        """Validated outputs and per-image (target, resized, padded) sizes. The outputs are detached (results never
        carry autograd history, even from a forward run with gradients) and half precision is computed in float32
        (a model run under bfloat16 autocast gets the float32 post-processing)."""
        for name in ("class_queries_logits", "masks_queries_logits"):
            if getattr(outputs, name, None) is None:
                raise ValueError(f"outputs must have `{name}`")

        def prepared(tensor: torch.Tensor | None) -> torch.Tensor | None:
            if tensor is None:
                return None
            tensor = tensor.detach()
            return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor

        outputs = SimpleNamespace(
            class_queries_logits=prepared(outputs.class_queries_logits),
            masks_queries_logits=prepared(outputs.masks_queries_logits),
            pred_boxes=prepared(getattr(outputs, "pred_boxes", None)),
        )
        logits, masks = outputs.class_queries_logits, outputs.masks_queries_logits
        if logits.ndim != 3 or masks.ndim != 4 or logits.shape[:2] != masks.shape[:2]:
            raise ValueError(
                "expected class_queries_logits (batch, queries, classes) and masks_queries_logits (batch, queries, h, "
                f"w) with the same batch and queries, got {tuple(logits.shape)} and {tuple(masks.shape)}"
            )
        batch_size = logits.shape[0]
        # the masks are predicted at 1/4 of the padded input (mask features stride)
        padded_size = (4 * masks.shape[-2], 4 * masks.shape[-1])
        if target_sizes is not None:
            target_sizes = _as_size_pairs(target_sizes, "target_sizes")
            if len(target_sizes) != batch_size:
                raise ValueError(
                    f"target_sizes has {len(target_sizes)} entries but the outputs hold {batch_size} images"
                )
        if image_sizes is not None:
            image_sizes = _as_size_pairs(image_sizes, "image_sizes")
            if len(image_sizes) != batch_size:
                raise ValueError(
                    f"image_sizes has {len(image_sizes)} entries but the outputs hold {batch_size} images"
                )
            if target_sizes is not None:
                for target, image in zip(target_sizes, image_sizes, strict=True):
                    if not _same_aspect(target, image) and _same_aspect(target[::-1], image):
                        raise ValueError(
                            f"target_sizes entry {target} has the aspect of the resized image {image} only when read "
                            "as (width, height): target_sizes are (height, width) pairs"
                        )
        elif target_sizes is not None:
            image_sizes = [self._resized_size_or_none(size) for size in target_sizes]
            if batch_size == 1 and not self._fills(image_sizes[0], padded_size):
                swapped = self._resized_size_or_none(target_sizes[0][::-1])
                if self._fills(swapped, padded_size):
                    raise ValueError(
                        f"target_sizes {target_sizes[0]} resizes to {image_sizes[0]}, which does not fill the padded "
                        f"input {padded_size}, but read as (width, height) it does: target_sizes are (height, width) "
                        "pairs"
                    )
            for index, size in enumerate(image_sizes):
                if size is None or size[0] > padded_size[0] or size[1] > padded_size[1]:
                    # Outputs not preprocessed with this processor's settings: the whole prediction is resized
                    # to the target size, as Mask2Former's post-processing does.
                    logger.warning_once(
                        f"target_sizes {target_sizes[index]} resizes to {size} with this processor's settings, which "
                        f"does not fit the padded input {padded_size}: the whole padded prediction is resized to it. "
                        "Pass image_sizes (see image_sizes_from_pixel_mask) to crop the padding."
                    )
                    image_sizes[index] = padded_size
        else:
            image_sizes = [padded_size] * batch_size
        for height, width in image_sizes:
            if height > padded_size[0] or width > padded_size[1]:
                raise ValueError(
                    f"image size {(height, width)} is larger than the padded input {padded_size} (4x the mask size): "
                    "pass the right image_sizes (resized, unpadded) and target_sizes as (height, width) pairs"
                )
        if target_sizes is None:
            target_sizes = list(image_sizes)
        return outputs, target_sizes, image_sizes, padded_size

    def _resized_size_or_none(self, size: tuple[int, int]) -> tuple[int, int] | None:
        """This processor's resized size of an original `size`, `None` where the resize rule refuses it."""
        try:
            return self.get_resized_size(*size)
        except ValueError:
            return None

    def _fills(self, image_size: tuple[int, int] | None, padded_size: tuple[int, int]) -> bool:
        """Whether `image_size` padded to `size_divisibility` gives `padded_size` (true of a batch's largest image)."""
        return image_size is not None and all(
            _round_up(side, self.size_divisibility) == padded for side, padded in zip(image_size, padded_size)
        )

    @staticmethod
    def _upsample_crop_resize(
        masks: torch.Tensor, padded_size, image_size, target_size, buffers: dict | None = None
    ) -> torch.Tensor:
        """(Q, h, w) mask logits -> padded input size -> crop the padding -> target size (bilinear, as official).

        With `buffers` (a dict the caller keeps over its chunks of queries) the full-size maps are written into
        tensors kept there, allocated by the first chunk and overwritten by the next ones (the result is then a view
        of them, valid until the next call): a chunk's maps are over 100 MB at 800x1088, which on the CPU would be
        fresh memory, page-faulted, at every chunk."""
        if masks.shape[0] == 0:  # no query kept (interpolate refuses empty batches)
            return masks.new_zeros((0, *target_size))
        padded = _resize_bilinear(masks[None], padded_size, buffers, "padded")
        cropped = padded[:, :, : image_size[0], : image_size[1]]
        if tuple(cropped.shape[-2:]) == tuple(target_size):
            return cropped[0]  # a same-size bilinear resize is the identity (weights exactly 1 and 0): skipped
        return _resize_bilinear(cropped, target_size, buffers, "target")[0]

    def _resized_binary_masks(
        self,
        mask_logits: torch.Tensor,
        padded_size: tuple[int, int],
        image_size: tuple[int, int],
        target_size: tuple[int, int],
        logit_threshold: float,
        mean_probability: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(Q, h, w) mask logits -> the (Q, H, W) bool masks at the target size (resized logit > threshold), the mean
        mask probability inside each mask (`None` unless `mean_probability`), and which masks are non-empty.

        The queries are resized a few at a time (at most `RESIZE_CHUNK_VALUES` floats per map, 16 MB): each
        chunk's maps stay in cache through thresholding and scoring, and come from memory the allocator reuses rather
        than one (Q, H, W) float map freshly mapped, and page-faulted, per image (350 MB at 800x1088, top-100).
        Row-wise, so the same values as resizing all queries at once."""
        count = mask_logits.shape[0]
        binary = torch.empty((count, *target_size), dtype=torch.bool, device=mask_logits.device)
        inside = mask_logits.new_empty(count) if mean_probability else None
        area = mask_logits.new_empty(count) if mean_probability else None
        largest = max(padded_size[0] * padded_size[1], target_size[0] * target_size[1])
        per_chunk = max(1, RESIZE_CHUNK_VALUES // largest)
        for start in range(0, count, per_chunk):
            rows = slice(start, start + per_chunk)
            logits = self._upsample_crop_resize(mask_logits[rows], padded_size, image_size, target_size)
            torch.gt(logits, logit_threshold, out=binary[rows])
            if mean_probability:
                # In place on this method's own resized logits: logits at or below the threshold become -inf, whose
                # sigmoid is 0; the signs of the probabilities then count the mask's pixels (integer and bool sums
                # are far slower on CPU). Sums over (H, W), not over a flattened copy: the maps may be a cropped view.
                probabilities = F.threshold_(logits, logit_threshold, -math.inf).sigmoid_()
                inside[rows] = probabilities.sum((1, 2))
                area[rows] = probabilities.sign_().sum((1, 2))
        if not mean_probability:
            return binary, None, binary.flatten(1).any(1)
        # A mask with a positive area is not empty; one without is checked (a sigmoid may underflow to 0).
        nonempty = area > 0
        unsure = torch.nonzero(~nonempty).flatten()
        nonempty[unsure] = binary[unsure].flatten(1).any(1)
        return binary, inside / (area + 1e-6), nonempty

    @staticmethod
    def _instance_map(masks: torch.Tensor) -> torch.Tensor:
        """(N, H, W) bool masks sorted by score -> (H, W) int64: per pixel the first (best) covering instance, -1 if
        none."""
        if masks.shape[0] == 0:
            return torch.full(masks.shape[1:], -1, dtype=torch.int64, device=masks.device)
        count = masks.shape[0]
        # Rank count - i for instance i (0 = not covered); the pixel's highest rank is its first instance. A max over
        # the instance axis of small integers is one vectorised pass (argmax over it is ~5x slower on CPU), taken
        # `RESIZE_CHUNK_VALUES` pixels of masks at a time: the ranked copy of all masks (87 MB for the top-100 at
        # 800x1088) would be fresh memory, page-faulted, at every call.
        rank_dtype = torch.uint8 if count < 256 else torch.int32
        ranks = torch.arange(count, 0, -1, dtype=rank_dtype, device=masks.device)[:, None, None]
        per_block = max(1, RESIZE_CHUNK_VALUES // max(1, masks[0].numel()))
        best = None
        for start in range(0, count, per_block):
            block = slice(start, start + per_block)
            ranked = (masks[block].view(torch.uint8).to(rank_dtype) * ranks[block]).amax(0)
            best = ranked if best is None else torch.maximum(best, ranked, out=best)
        return torch.where(best > 0, count - best.long(), -1)

    @classmethod
    def _segment_map(cls, masks: torch.Tensor, segment_rows: torch.Tensor) -> torch.Tensor:
        """The instance map of the non-empty masks `masks[segment_rows]`, numbered in that order, taken over all
        masks without copying those rows out: an empty mask covers no pixel, so each pixel's first covering mask is
        a segment, renumbered through a lookup table."""
        instance_map = cls._instance_map(masks)
        if len(segment_rows) == masks.shape[0]:
            return instance_map
        segment_ids = torch.full((masks.shape[0],), -1, dtype=torch.int64, device=masks.device)
        segment_ids[segment_rows] = torch.arange(len(segment_rows), device=masks.device)
        return torch.where(instance_map >= 0, segment_ids[instance_map.clamp(min=0)], -1)

    @staticmethod
    def _reorder_rows_(rows: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """`rows[order]` for distinct indices `order`, written over `rows` and returned as its first `len(order)`
        rows: the same values as indexing, without a second copy of the (N, H, W) masks (fresh memory, page-faulted
        on the CPU). The rows move along the cycles of the permutation, with one row of scratch per cycle."""
        source = order.tolist()
        taken = set(source)
        source += [index for index in range(rows.shape[0]) if index not in taken]
        done = [False] * len(source)
        for start in range(len(source)):
            if done[start] or source[start] == start:
                continue
            scratch = rows[start].clone()
            target = start
            while source[target] != start:
                rows[target].copy_(rows[source[target]])
                done[target] = True
                target = source[target]
            rows[target].copy_(scratch)
            done[target] = True
        return rows[: len(order)]

    def _classifier_kind(self, logits: torch.Tensor, num_labels: int | None) -> bool:
        """True for a softmax classifier with a trailing no-object logit (see the class docstring)."""
        num_labels = self.num_labels if num_labels is None else num_labels
        width = logits.shape[-1]
        if num_labels is None or width == num_labels:
            return False
        if width == num_labels + 1:
            return True
        raise ValueError(
            f"class_queries_logits has {width} classes but num_labels is {num_labels}: expected {num_labels} (sigmoid "
            f"classifier) or {num_labels + 1} (softmax classifier with a no-object logit)"
        )

    def _class_probabilities(self, logits: torch.Tensor, num_labels: int | None) -> torch.Tensor:
        """Per-class probabilities (Q, C) used for top-k selection: sigmoid, or softmax without the no-object logit."""
        if self._classifier_kind(logits, num_labels):
            return logits.softmax(-1)[..., :-1]
        return logits.sigmoid()

    @staticmethod
    def _mask_logit_threshold(mask_threshold: float) -> float:
        if not 0.0 < mask_threshold < 1.0:
            raise ValueError(f"mask_threshold must be in (0, 1), got {mask_threshold}")
        return math.log(mask_threshold / (1.0 - mask_threshold))

    def _topk_queries(self, probabilities: torch.Tensor, top_k: int | None, drop_labels: Sequence[int]):
        """Official instance selection: top-k of the flattened (Q x C) scores, unsorted; optionally drop classes."""
        num_queries, num_classes = probabilities.shape
        top_k = _check_top_k(top_k)
        top_k = self.test_topk_per_image if top_k is None else top_k
        top_k = min(top_k, num_queries * num_classes)
        scores, indices = probabilities.flatten().topk(top_k, sorted=False)
        labels = indices % num_classes
        queries = indices // num_classes
        if drop_labels:
            keep = ~torch.isin(labels, torch.tensor(list(drop_labels), device=labels.device))
            scores, labels, queries = scores[keep], labels[keep], queries[keep]
        return scores, labels, queries

    def _scaled_boxes(self, pred_boxes: torch.Tensor, padded_size, image_size, target_size) -> torch.Tensor:
        """Official `box_postprocess`: cxcywh on the padded canvas -> xyxy, the canvas mapped to the target scale."""
        height = padded_size[0] / image_size[0] * target_size[0]
        width = padded_size[1] / image_size[1] * target_size[1]
        scale = torch.tensor([width, height, width, height], dtype=pred_boxes.dtype, device=pred_boxes.device)
        return center_to_corners_format(pred_boxes) * scale

    def _instance_drop_labels(self, panoptic_on: bool | None) -> list[int]:
        panoptic_on = self.panoptic_on if panoptic_on is None else panoptic_on
        return list(self.stuff_labels) if panoptic_on else []

    # ------------------------------------------------------------------ post-processing

    def post_process_instance_segmentation(
        self,
        outputs,
        threshold: float | None = None,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float | None = None,
        target_sizes: Any = None,
        return_coco_annotation: bool = False,
        return_binary_maps: bool = False,
        image_sizes: Any = None,
        top_k: int | None = None,
        num_labels: int | None = None,
        panoptic_on: bool | None = None,
    ) -> list[dict[str, Any]]:
        """
        Official Mask DINO instance inference (`instance_inference` + `box_postprocess`).

        Per image: top-`top_k` (`test_topk_per_image`) of the flattened (queries x classes) class probabilities;
        query = index // C, label = index % C; a panoptic model (`panoptic_on`) keeps thing classes only. Mask logits
        are upsampled to the padded input, cropped to the resized image, resized to the target size (bilinear), then
        binarised (`sigmoid > mask_threshold`, i.e. logit > 0 by default); the score is multiplied by the mean mask
        probability inside the binary mask (unless `focus_on_box`). Boxes are the predicted boxes as absolute xyxy at
        the target size (not clipped; the padded canvas is mapped to the target scale as the official code does).
        Results are sorted by score (the official top-k order is arbitrary); `threshold` then drops results with a
        lower score (`None`, the default, or 0 keeps the official top-k).

        The arguments and the `segmentation` / `segments_info` keys are those of Transformers' Mask2Former.

        Args:
            outputs: object with `class_queries_logits` (B, Q, C), `masks_queries_logits` (B, Q, h, w) at 1/4 of the
                padded input and `pred_boxes` (B, Q, 4) sigmoid cxcywh relative to the padded input.
            threshold: score threshold in [0, 1] (`None`: 0, the official top-k).
            mask_threshold: mask probability threshold in (0, 1) (official 0.5, i.e. logit > 0).
            overlap_mask_area_threshold: in [0, 1]; accepted as Mask2Former's instance method does, unused.
            target_sizes: original (height, width) per image; `None` keeps the resized size.
            return_coco_annotation: `segmentation` becomes the run-length encoding of the segment map (Mask2Former's
                format), and `rle_masks` holds each instance's mask as COCO RLE (pycocotools).
            return_binary_maps: `segmentation` becomes the (num_segments, H, W) stack of the segments' binary masks,
                indexed by segment `id` (overlapping instances keep all their pixels).
            image_sizes: resized, unpadded (height, width) per image (see `image_sizes_from_pixel_mask`); derived
                from `target_sizes` with this processor's resize rule if omitted.
            top_k: queries x classes kept per image (default `test_topk_per_image`).
            panoptic_on: drop stuff classes (default: the processor's `panoptic_on`).

        Returns:
            One dict per image with Mask2Former's keys:
            - `segmentation` (H, W) int64: at each pixel the `id` of the highest-scoring segment covering it, -1 for
              none (or the RLE / binary maps above);
            - `segments_info`: per instance with a non-empty mask, in score order, `id` (0, 1, ... in that order),
              `label_id`, `was_fused` (False), `score`;
            and Mask DINO's official per-instance results, every kept instance in score order (empty masks included):
            `scores` (N,), `labels` (N,) int64, `boxes` (N, 4) xyxy at the target size, `masks` (N, H, W) bool.
        """
        if getattr(outputs, "pred_boxes", None) is None:
            raise ValueError("instance segmentation needs `pred_boxes` in the outputs")
        if return_coco_annotation and return_binary_maps:
            raise ValueError("return_coco_annotation and return_binary_maps cannot both be True")
        threshold = 0.0 if threshold is None else _check_fraction("threshold", threshold)
        if overlap_mask_area_threshold is not None:
            _check_fraction("overlap_mask_area_threshold", overlap_mask_area_threshold)
        _check_top_k(top_k)
        outputs, target_sizes, image_sizes, padded_size = self._resolve_sizes(outputs, target_sizes, image_sizes)
        mask_logit_threshold = self._mask_logit_threshold(mask_threshold)
        drop_labels = self._instance_drop_labels(panoptic_on)
        results = []
        for index in range(len(target_sizes)):
            probabilities = self._class_probabilities(outputs.class_queries_logits[index], num_labels)
            scores, labels, queries = self._topk_queries(probabilities, top_k, drop_labels)
            binary, mean_probability, nonempty = self._resized_binary_masks(
                outputs.masks_queries_logits[index][queries],
                padded_size,
                image_sizes[index],
                target_sizes[index],
                mask_logit_threshold,
                mean_probability=not self.focus_on_box,
            )
            if mean_probability is not None:
                scores = scores * mean_probability
            boxes = self._scaled_boxes(
                outputs.pred_boxes[index], padded_size, image_sizes[index], target_sizes[index]
            )[queries]
            order = torch.sort(scores, descending=True, stable=True).indices
            order = order[scores[order] >= threshold]
            result = {
                "scores": scores[order],
                "labels": labels[order],
                "boxes": boxes[order],
                "masks": self._reorder_rows_(binary, order),
            }
            segment_rows = torch.nonzero(nonempty[order]).flatten()
            result["segments_info"] = [
                {"id": i, "label_id": label, "was_fused": False, "score": score}
                for i, (label, score) in enumerate(
                    zip(result["labels"][segment_rows].tolist(), result["scores"][segment_rows].tolist())
                )
            ]
            result["segmentation"] = self._segment_map(result["masks"], segment_rows)
            if return_coco_annotation:
                from transformers.models.mask2former.image_processing_pil_mask2former import (
                    convert_segmentation_to_rle,
                )

                result["rle_masks"] = [
                    coco_mask.encode(np.asfortranarray(mask.cpu().numpy().astype(np.uint8)))
                    for mask in result["masks"]
                ]
                result["segmentation"] = convert_segmentation_to_rle(result["segmentation"])
            elif return_binary_maps and len(segment_rows):
                result["segmentation"] = result["masks"][segment_rows]
            results.append(result)
        return results

    def post_process_object_detection(
        self,
        outputs,
        threshold: float | None = None,
        target_sizes: Any = None,
        image_sizes: Any = None,
        top_k: int | None = None,
        num_labels: int | None = None,
        panoptic_on: bool | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """
        Box-only results with the instance top-k rule (no mask rescoring): top-`top_k` of the flattened
        (queries x classes) class probabilities, thing classes only for a panoptic model, boxes as absolute xyxy
        at the target size (see `post_process_instance_segmentation`), sorted by score, `scores >= threshold` kept
        (`threshold` in [0, 1]; `None`, the default, keeps the official top-k).

        Returns:
            One dict per image with `scores` (N,), `labels` (N,) int64 and `boxes` (N, 4).
        """
        if getattr(outputs, "pred_boxes", None) is None:
            raise ValueError("object detection needs `pred_boxes` in the outputs")
        threshold = 0.0 if threshold is None else _check_fraction("threshold", threshold)
        _check_top_k(top_k)
        outputs, target_sizes, image_sizes, padded_size = self._resolve_sizes(outputs, target_sizes, image_sizes)
        drop_labels = self._instance_drop_labels(panoptic_on)
        results = []
        for index in range(len(target_sizes)):
            probabilities = self._class_probabilities(outputs.class_queries_logits[index], num_labels)
            scores, labels, queries = self._topk_queries(probabilities, top_k, drop_labels)
            boxes = self._scaled_boxes(outputs.pred_boxes[index], padded_size, image_sizes[index], target_sizes[index])
            order = torch.sort(scores, descending=True, stable=True).indices
            order = order[scores[order] >= threshold]
            results.append({"scores": scores[order], "labels": labels[order], "boxes": boxes[queries][order]})
        return results

    def post_process_panoptic_segmentation(
        self,
        outputs,
        threshold: float | None = None,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float | None = None,
        label_ids_to_fuse: Iterable[int] | None = None,
        target_sizes: Any = None,
        image_sizes: Any = None,
        num_labels: int | None = None,
        mask_nms_threshold: float | None = None,
    ) -> list[dict[str, Any]]:
        """
        Official Mask DINO panoptic inference (`panoptic_inference`).

        Mask logits are brought to the target size first (padded size, crop, resize). A query is kept when its best
        sigmoid class score exceeds `threshold` (`object_mask_threshold`); kept queries then take score and label
        from `softmax(sigmoid(logits) / panoptic_temperature)` (when `panoptic_transform_eval`). Each pixel goes to
        the kept query maximising score x mask probability; a query becomes a segment if its pixels with mask
        probability >= `mask_threshold` are at least `overlap_mask_area_threshold` (`overlap_threshold`) of its
        mask; segments of the same stuff class (`label_ids_to_fuse`, default `stuff_labels`; a given set replaces
        it, as in Mask2Former, and ids outside the model's classes raise) share the first id. Thresholds must be in
        [0, 1].
        `mask_nms_threshold` (default `panoptic_mask_nms_threshold`, `None`: off, as official) first removes
        duplicate thing queries by greedy mask NMS among the kept ones, ranked by their class score; 1.0 turns it
        off for one call.
        For a softmax classifier (`num_labels + 1` logits) the Mask2Former rule is used instead: softmax scores, and
        queries predicting "no object" are dropped.

        Returns:
            One dict per image: `segmentation` (H, W) int32 with segment ids starting at 1 and **0 for void** (the
            official convention, unlike the -1 of Transformers' Mask2Former), and `segments_info`: `id`, `label_id`,
            `was_fused` (the class is fusable stuff), `isthing`, `score`.
        """
        threshold = self.object_mask_threshold if threshold is None else _check_fraction("threshold", threshold)
        overlap = (
            self.overlap_threshold
            if overlap_mask_area_threshold is None
            else _check_fraction("overlap_mask_area_threshold", overlap_mask_area_threshold)
        )
        _check_fraction("mask_threshold", mask_threshold)
        nms = (
            self.panoptic_mask_nms_threshold
            if mask_nms_threshold is None
            else _check_fraction("mask_nms_threshold", mask_nms_threshold)
        )
        outputs, target_sizes, image_sizes, padded_size = self._resolve_sizes(outputs, target_sizes, image_sizes)
        fuse = self._labels_to_fuse(label_ids_to_fuse, outputs.class_queries_logits, num_labels)
        results = []
        for index in range(len(target_sizes)):
            logits = outputs.class_queries_logits[index]
            if self._classifier_kind(logits, num_labels):
                scores, labels = logits.softmax(-1).max(-1)
                keep = labels.ne(logits.shape[-1] - 1) & (scores > threshold)
                class_scores = scores[keep]
            else:
                scores, labels = logits.sigmoid().max(-1)
                keep = scores > threshold
                class_scores = scores[keep]  # NMS ranks by these: the sharpened scores saturate near 1
                if self.panoptic_transform_eval:
                    scores, labels = F.softmax(logits.sigmoid() / self.panoptic_temperature, dim=-1).max(-1)
            # Only the kept queries that can own a pixel are resized (row-wise, so the same values as resizing all
            # of them); the others would give no segment and no id.
            scores, labels, masks = scores[keep], labels[keep], outputs.masks_queries_logits[index][keep]
            if nms is not None and nms < 1.0:
                # on the mask maps' part covering the image (they are at 1/4 of the padded input)
                height, width = (-(-side // 4) for side in image_sizes[index])
                unique = _mask_nms(class_scores, labels, masks[:, :height, :width], nms, fuse)
                scores, labels, masks = scores[unique], labels[unique], masks[unique]
            owners = _possible_owners(scores, masks)
            mask_probs = self._upsample_crop_resize(
                masks[owners], padded_size, image_sizes[index], target_sizes[index]
            ).sigmoid_()
            segmentation, segments = self._compute_segments(
                mask_probs, scores[owners], labels[owners], mask_threshold, overlap, fuse, target_sizes[index]
            )
            results.append({"segmentation": segmentation, "segments_info": segments})
        return results

    def _labels_to_fuse(self, label_ids_to_fuse: Any, logits: torch.Tensor, num_labels: int | None) -> set[int]:
        """The validated classes to fuse: `stuff_labels` by default, else exactly the given ones (as Mask2Former)."""
        if label_ids_to_fuse is None:
            return set(self.stuff_labels)
        if isinstance(label_ids_to_fuse, (str, bytes)) or not isinstance(label_ids_to_fuse, Iterable):
            raise TypeError(f"label_ids_to_fuse must be a set or list of class ids, got {label_ids_to_fuse!r}")
        num_classes = logits.shape[-1] - int(self._classifier_kind(logits, num_labels))
        fuse = set()
        for label in label_ids_to_fuse:
            if isinstance(label, bool) or not isinstance(label, numbers.Integral):
                raise TypeError(f"label_ids_to_fuse must hold int class ids, got {label!r}")
            if not 0 <= label < num_classes:
                raise ValueError(
                    f"label_ids_to_fuse holds {label}, which is not a class id: the model predicts classes "
                    f"0..{num_classes - 1}"
                )
            fuse.add(int(label))
        unfused = sorted(set(self.stuff_labels) - fuse)
        if unfused:
            logger.warning_once(
                f"label_ids_to_fuse={sorted(fuse)} replaces the processor's stuff_labels: stuff classes {unfused} are "
                "not fused (leave label_ids_to_fuse unset to fuse every stuff class)"
            )
        return fuse

    @staticmethod
    def _compute_segments(mask_probs, scores, labels, mask_threshold, overlap, fuse, size):
        """Official panoptic merging of the kept queries, vectorised over them (overwrites `mask_probs`).

        Each pixel is owned by the query maximising score x mask probability; query k's segment is the pixels it owns
        where its own probability is >= `mask_threshold`. Query k is dropped when it owns no pixel, has no confident
        pixel or an empty segment, or owns less than `overlap` of its confident area. In query order, each remaining
        query gets the next id, except that a fusable (stuff) class reuses the id its first segment got.
        """
        segmentation = torch.zeros(size, dtype=torch.int32, device=mask_probs.device)
        count = mask_probs.shape[0]
        if count == 0:
            return segmentation, []
        owner = _first_argmax(mask_probs, scores)
        # The owner's own probability is confident at the pixel.
        in_segment = mask_probs.gather(0, owner[None])[0] >= mask_threshold
        owned_area = torch.bincount(owner.flatten(), minlength=count)
        # float64 weights: exact counts, and far faster than indexing `owner` with the boolean map
        segment_area = torch.bincount(owner.flatten(), weights=in_segment.flatten().double(), minlength=count)
        # Confident pixels of the queries owning a pixel (no other can become a segment), in place on `mask_probs`
        # (not needed any more) and as a float sum (bool and integer sums are far slower on CPU): the sign of p - t
        # is exact in floating point, so heaviside(p - t, 1) is exactly [p >= t], and float32 counts are exact
        # below 2**24 pixels.
        owning = torch.nonzero(owned_area > 0).flatten()
        if len(owning) < count:
            mask_probs = mask_probs[owning]
        confident = mask_probs.sub_(mask_threshold).heaviside_(mask_probs.new_ones(()))
        exact = torch.float32 if confident[0].numel() < 2**24 else torch.float64
        confident_area = torch.zeros(count, dtype=exact, device=owner.device)
        # over (H, W): no flattened copy of a cropped view
        confident_area[owning] = confident.sum((1, 2), dtype=exact)
        kept = (owned_area > 0) & (confident_area > 0) & (segment_area > 0)
        kept &= owned_area.double() / confident_area.double().clamp(min=1) >= overlap  # as the official int ratio

        segment_ids = [0] * count
        segments: list[dict[str, Any]] = []
        fused_ids: dict[int, int] = {}
        for k, (keep, label, score) in enumerate(zip(kept.tolist(), labels.tolist(), scores.tolist())):
            if not keep:
                continue
            if label in fuse and label in fused_ids:
                segment_ids[k] = fused_ids[label]
                continue
            segment_ids[k] = len(segments) + 1
            if label in fuse:
                fused_ids[label] = segment_ids[k]
            segments.append(
                {"id": segment_ids[k], "label_id": label, "was_fused": label in fuse, "isthing": label not in fuse,
                 "score": score}
            )
        ids = torch.tensor(segment_ids, dtype=torch.int32, device=mask_probs.device)
        segmentation = torch.where(in_segment, ids[owner], segmentation)
        return segmentation, segments

    def post_process_semantic_segmentation(
        self,
        outputs,
        target_sizes: Any = None,
        return_segmentation_scores: bool = False,
        image_sizes: Any = None,
        num_labels: int | None = None,
    ) -> list[torch.Tensor] | list[SemanticSegmentationPostProcessorOutput]:
        """
        Official Mask DINO semantic inference (`semantic_inference`): per-class score map
        `einsum("qc,qhw->chw", class probabilities, sigmoid(mask logits))`, with class probabilities
        `softmax(logits)[..., :-1]` for a softmax classifier and `softmax(sigmoid(logits) / panoptic_temperature)`
        (or plain sigmoid without `panoptic_transform_eval`) for a sigmoid one. When `instance_on`, `panoptic_on` or
        `semantic_postprocessing_before_inference`, mask logits are brought to the target size (padded size, crop,
        resize) before inference; otherwise (semantic-only models) the score map is computed on the padded input and
        then cropped and resized.

        Returns:
            Per image the (H, W) int64 argmax class map, or with `return_segmentation_scores` a
            [`SemanticSegmentationPostProcessorOutput`] with `segmentation` and `segmentation_scores` (C, H, W), the
            official `sem_seg` output.
        """
        outputs, target_sizes, image_sizes, padded_size = self._resolve_sizes(outputs, target_sizes, image_sizes)
        before = self.semantic_postprocessing_before_inference or self.instance_on or self.panoptic_on
        results = []
        for index in range(len(target_sizes)):
            logits = outputs.class_queries_logits[index]
            if self._classifier_kind(logits, num_labels):
                class_probs = F.softmax(logits, dim=-1)[..., :-1]
            else:
                class_probs = logits.sigmoid()
                if self.panoptic_transform_eval:
                    class_probs = F.softmax(class_probs / self.panoptic_temperature, dim=-1)
            masks = outputs.masks_queries_logits[index]
            if before:
                image_size, target_size = image_sizes[index], target_sizes[index]
                scores = self._class_score_map(
                    class_probs,
                    masks,
                    target_size,
                    lambda chunk, buffers: self._upsample_crop_resize(
                        chunk, padded_size, image_size, target_size, buffers
                    ),
                )
            else:
                scores = self._class_score_map(
                    class_probs, masks, padded_size,
                    lambda chunk, buffers: _resize_bilinear(chunk[None], padded_size, buffers, "padded")[0],
                )
                height, width = image_sizes[index]
                scores = F.interpolate(
                    scores[None, :, :height, :width], size=target_sizes[index], mode="bilinear", align_corners=False
                )[0]
            segmentation = _first_argmax(scores)
            if return_segmentation_scores:
                results.append(
                    SemanticSegmentationPostProcessorOutput(
                        data={"segmentation": segmentation, "segmentation_scores": scores}
                    )
                )
            else:
                results.append(segmentation)
        return results

    @staticmethod
    def _class_score_map(class_probs: torch.Tensor, mask_logits: torch.Tensor, size, resize) -> torch.Tensor:
        """`einsum("qc,qhw->chw", class_probs, sigmoid(resize(mask_logits)))`: the (C, H, W) semantic scores at
        `size`, `resize(chunk, buffers)` bringing a chunk of mask logits there. Summed over chunks of `_QUERY_CHUNK`
        queries in place (`addmm_`; the same sums as adding each chunk's product), so that one chunk of full-size
        probability maps exists at a time, written into buffers that every chunk reuses (at 800x1088 the maps of all
        queries at once are 1 GB, and a fresh chunk of them is page-faulted memory on the CPU)."""
        scores, buffers = None, {}
        for start in range(0, mask_logits.shape[0], _QUERY_CHUNK):
            probabilities = resize(mask_logits[start : start + _QUERY_CHUNK], buffers).sigmoid_()
            weights = class_probs[start : start + _QUERY_CHUNK].T
            maps = probabilities.reshape(len(probabilities), -1)
            scores = weights @ maps if scores is None else scores.addmm_(weights, maps)
        if scores is None:  # no query
            return class_probs.new_zeros(class_probs.shape[1], *size)
        return scores.view(-1, *size)

    def post_process_universal_segmentation(
        self, outputs, target_sizes: Any = None, image_sizes: Any = None, num_labels: int | None = None
    ) -> list[dict[str, Any]]:
        """
        What the official model returns at test time: per image a dict with `sem_seg` (semantic scores (C, H, W),
        if `semantic_on`), `panoptic_seg` (the panoptic dict, if `panoptic_on`) and `instances` (the instance dict,
        if `instance_on`), each computed with the processor's settings.
        """
        results = [{} for _ in range(outputs.class_queries_logits.shape[0])]
        if self.semantic_on:
            semantic = self.post_process_semantic_segmentation(
                outputs, target_sizes, return_segmentation_scores=True, image_sizes=image_sizes, num_labels=num_labels
            )
            for result, item in zip(results, semantic, strict=True):
                result["sem_seg"] = item.segmentation_scores
        if self.panoptic_on:
            panoptic = self.post_process_panoptic_segmentation(
                outputs, target_sizes=target_sizes, image_sizes=image_sizes, num_labels=num_labels
            )
            for result, item in zip(results, panoptic, strict=True):
                result["panoptic_seg"] = item
        if self.instance_on:
            instances = self.post_process_instance_segmentation(
                outputs, target_sizes=target_sizes, image_sizes=image_sizes, num_labels=num_labels
            )
            for result, item in zip(results, instances, strict=True):
                result["instances"] = item
        return results


__all__ = ["MaskDINOImageProcessor", "clip_boxes", "get_resize_output_size"]
