"""Loading COCO-format folders into :mod:`datasets` and converting datasets back to COCO dictionaries.

Every loader here produces the column layout of :func:`maskdino_hf.synthetic.generate_shapes_dataset`, so that
training and evaluation code can take either a synthetic data set or a local COCO-format one:

=================  =============================================================================================
column             content
=================  =============================================================================================
``image``          ``datasets.Image()`` (RGB)
``image_id``       ``int64``
``file_name``      ``string``: the image's file name (no directory)
``width``          ``int64``
``height``         ``int64``
``objects``        list of ``{"id", "bbox" [x, y, w, h] float64, "category_id", "segmentation" {"size": [h, w],
                   "counts": str} (compressed RLE), "area" float64, "iscrowd"}`` (instance annotations)
``panoptic``       ``datasets.Image()``: RGB PNG, segment id = R + 256 * G + 256 ** 2 * B (0 = void)
``segments_info``  list of ``{"id", "category_id", "isthing", "iscrowd", "area", "bbox" [x, y, w, h]}`` (int64)
``semantic``       ``datasets.Image()``: ``L`` PNG of class ids, 255 = ignore
=================  =============================================================================================

Instance-only, panoptic-only and semantic-only loaders return the first five columns plus their own ones.
Category ids are kept as they are in the json files; :func:`read_categories` gives their names.

The loaders validate what they read and raise a ``ValueError`` / ``FileNotFoundError`` naming the file, the bad value
and what is allowed: images that cannot be decoded (truncated or corrupt files), json sizes that disagree with the
image file, polygons with non-finite coordinates, uncompressed RLEs whose counts do not cover ``height * width``,
boxes with a negative size or outside the image, category ids missing from ``categories``, panoptic PNG segments
missing from ``segments_info`` (and the reverse). Images without annotations are legitimate and load with empty
lists. Checking decodability and PNG segments decodes every image once; ``verify_images=False`` reads only the
headers (for very large data sets: a broken file then fails when its row is read). :func:`dataset_to_coco_instances` is the one builder of COCO instance ground truth (evaluation uses it).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage
from transformers.image_transforms import rgb_to_id

import datasets
from datasets import Features, List, Value

from .image_processing_maskdino import rle_counts
from .modeling_maskdino import mask_boxes

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_EXTENSIONS",
    "build_features",
    "rows_to_dataset",
    "mask_to_rle",
    "rle_to_mask",
    "segmentation_to_rle",
    "mask_to_bbox",
    "read_categories",
    "read_image",
    "panoptic_ids",
    "instance_annotations",
    "load_coco_instances",
    "load_coco_panoptic",
    "load_semantic_folder",
    "load_coco_folder",
    "dataset_to_coco_instances",
    "dataset_to_coco_panoptic",
]

IGNORE_INDEX = 255
BOX_TOLERANCE = 1.0  # pixels a COCO box may exceed the image by (float rounding in real annotation files)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

RLE_FEATURE = {"size": List(Value("int64"), length=2), "counts": Value("string")}
OBJECT_FEATURE = {
    "id": Value("int64"),
    "bbox": List(Value("float64"), length=4),
    "category_id": Value("int64"),
    "segmentation": RLE_FEATURE,
    "area": Value("float64"),
    "iscrowd": Value("int64"),
}
SEGMENT_FEATURE = {
    "id": Value("int64"),
    "category_id": Value("int64"),
    "isthing": Value("int64"),
    "iscrowd": Value("int64"),
    "area": Value("int64"),
    "bbox": List(Value("int64"), length=4),
}


def build_features(instances: bool = True, panoptic: bool = True, semantic: bool = True) -> Features:
    """The :class:`datasets.Features` of the common column layout (see the module docstring)."""
    features = {
        "image": datasets.Image(),
        "image_id": Value("int64"),
        "file_name": Value("string"),
        "width": Value("int64"),
        "height": Value("int64"),
    }
    if instances:
        features["objects"] = List(OBJECT_FEATURE)
    if panoptic:
        features["panoptic"] = datasets.Image()
        features["segments_info"] = List(SEGMENT_FEATURE)
    if semantic:
        features["semantic"] = datasets.Image()
    return Features(features)


def rows_to_dataset(rows: Sequence[Mapping], features: Features, **kwargs) -> datasets.Dataset:
    """``Dataset.from_list`` that also accepts an empty list (keeping the columns)."""
    if not rows:
        return datasets.Dataset.from_dict({k: [] for k in features}, features=features, **kwargs)
    return datasets.Dataset.from_list(list(rows), features=features, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Encoding helpers
# ----------------------------------------------------------------------------------------------------------------


def mask_to_rle(mask: np.ndarray) -> dict:
    """Binary ``(H, W)`` mask to a compressed COCO RLE whose ``counts`` is a ``str`` (JSON friendly)."""
    from pycocotools import mask as mask_utils

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask_to_rle expects a 2-D mask, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: Mapping, where: str = "RLE") -> np.ndarray:
    """Compressed or uncompressed COCO RLE (``counts`` as ``str``, ``bytes`` or list) to a bool ``(H, W)`` mask."""
    from pycocotools import mask as mask_utils

    with warnings.catch_warnings():  # pycocotools + numpy 2 "copy keyword" deprecation, harmless
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(_to_compressed_rle(rle, where)).astype(bool)


def _rle_size(rle: Mapping, where: str) -> tuple[int, int]:
    if not isinstance(rle, Mapping) or "counts" not in rle or "size" not in rle:
        keys = sorted(rle) if isinstance(rle, Mapping) else type(rle).__name__
        raise ValueError(f"{where}: an RLE needs 'counts' and 'size' [height, width], got {keys}")
    size = rle["size"]
    if (
        not isinstance(size, Sequence) or len(size) != 2
        or not all(isinstance(v, (int, np.integer)) and v >= 0 for v in size)
    ):
        raise ValueError(f"{where}: RLE 'size' must be [height, width] of non-negative integers, got {size!r}")
    return int(size[0]), int(size[1])


def _check_counts(values: Sequence[int], height: int, width: int, kind: str, where: str) -> None:
    """Run lengths must be non-negative and cover the mask exactly: pycocotools reads (or writes) past the mask
    otherwise and returns a different mask on every call."""
    if any(v < 0 for v in values):
        raise ValueError(f"{where}: {kind} RLE counts must be non-negative integers, got {list(values)[:8]}")
    if sum(values) != height * width:
        raise ValueError(
            f"{where}: {kind} RLE counts sum to {sum(values)}, but size {height}x{width} needs {height * width}"
        )


def _to_compressed_rle(rle: Mapping, where: str = "RLE") -> dict:
    """A compressed RLE with ``bytes`` counts, its counts checked first (see :func:`_check_counts`)."""
    from pycocotools import mask as mask_utils

    height, width = _rle_size(rle, where)
    counts = rle["counts"]
    if isinstance(counts, (list, tuple, np.ndarray)):
        values = np.asarray(counts)
        if values.ndim != 1 or (values.size and values.dtype.kind not in "iu"):
            raise ValueError(f"{where}: uncompressed RLE counts must be non-negative integers, got {list(counts)[:8]}")
        _check_counts([int(v) for v in values], height, width, "uncompressed", where)
        return mask_utils.frPyObjects({"size": [height, width], "counts": [int(v) for v in values]}, height, width)
    if isinstance(counts, str):
        counts = counts.encode("ascii", errors="replace")
    if not isinstance(counts, bytes):
        raise ValueError(f"{where}: RLE counts must be a string (compressed) or a list of integers, got {type(counts).__name__}")
    _check_counts(rle_counts(counts, where), height, width, "compressed", where)
    return {"size": [height, width], "counts": counts}


def _polygons(segmentation: Sequence, where: str) -> list[list[float]]:
    """Polygons as float lists, each checked: finite coordinates (a NaN crashes pycocotools), an even count. As
    detectron2, polygons of fewer than 3 points are dropped (with a warning)."""
    polygons = []
    for k, polygon in enumerate(segmentation):
        if not isinstance(polygon, (list, tuple)) or not all(isinstance(v, (int, float)) for v in polygon):
            raise ValueError(f"{where}: polygon {k} must be a flat list of numbers [x1, y1, x2, y2, ...]")
        values = np.asarray(polygon, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError(f"{where}: polygon {k} has non-finite coordinates {values[~np.isfinite(values)][:4].tolist()}")
        if len(values) % 2:
            raise ValueError(f"{where}: polygon {k} has an odd number of coordinates ({len(values)}); expected x, y pairs")
        if len(values) < 6:
            warnings.warn(f"{where}: polygon {k} has fewer than 3 points; dropped", stacklevel=3)
            continue
        polygons.append(values.tolist())
    return polygons


def segmentation_to_rle(segmentation: Any, height: int, width: int, where: str = "segmentation") -> dict:
    """Any COCO segmentation (polygon list, uncompressed or compressed RLE) to a compressed RLE with ``str``
    counts. An RLE must have the image's size."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, Mapping):
        if _rle_size(segmentation, where) != (height, width):
            raise ValueError(f"{where}: RLE size {list(segmentation['size'])} differs from the image size {[height, width]}")
        rle = _to_compressed_rle(segmentation, where)
    elif isinstance(segmentation, (list, tuple)):
        polygons = _polygons(segmentation, where)
        if not polygons:
            rle = mask_utils.encode(np.asfortranarray(np.zeros((height, width), dtype=np.uint8)))
        else:
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    else:
        raise ValueError(f"{where}: unsupported segmentation of type {type(segmentation).__name__}; expected polygons or an RLE")
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def mask_to_bbox(mask: np.ndarray) -> list[int]:
    """Tight ``[x, y, w, h]`` box (integer pixels) of a binary mask by the model's ``bitmask`` rule (detectron2
    ``BitMasks.get_bounding_boxes``); ``[0, 0, 0, 0]`` when empty."""
    x0, y0, x1, y1 = mask_boxes(torch.as_tensor(np.asarray(mask, dtype=bool)), "bitmask").tolist()
    return [int(x0), int(y0), int(x1 - x0), int(y1 - y0)]


def panoptic_ids(png: Any) -> np.ndarray:
    """``(H, W)`` int64 segment ids of a COCO panoptic PNG (PIL image or ``(H, W, 3)`` array): R + 256 G + 256^2 B."""
    if isinstance(png, PILImage.Image):
        png = png.convert("RGB")
    return rgb_to_id(np.asarray(png)).astype(np.int64)


def read_image(path: str | os.PathLike, mode: str | None = None) -> PILImage.Image:
    """The fully decoded image at ``path`` (``mode`` converts it). A missing file is a ``FileNotFoundError``; a
    truncated or corrupt one a ``ValueError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {path}")
    try:
        with PILImage.open(path) as image:
            image.load()
            return image.convert(mode) if mode else image.copy()
    except (OSError, SyntaxError, ValueError, PILImage.DecompressionBombError) as error:
        raise ValueError(f"Cannot read image {path}: {error} (truncated or not an image file)") from None


# ----------------------------------------------------------------------------------------------------------------
# Categories
# ----------------------------------------------------------------------------------------------------------------


def _load_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Annotation file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at top level, got {type(data).__name__}")
    return data


def _require_keys(obj: Mapping, keys: Iterable[str], where: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise KeyError(f"{where} is missing required key(s) {missing}; it has {sorted(obj)}")


def read_categories(folder_or_json: str | os.PathLike | Mapping) -> list[dict]:
    """Categories (``id``, ``name``, ``isthing``, ``color`` when present) of a COCO json, a COCO dict or a COCO folder
    (``annotations/panoptic.json`` preferred since it has ``isthing``, else ``annotations/instances.json``).
    Instance-only jsons get ``isthing = 1``."""
    if isinstance(folder_or_json, Mapping):
        data = folder_or_json
        where = "COCO dict"
    else:
        path = Path(folder_or_json)
        if path.is_dir():
            candidates = [path / "annotations" / "panoptic.json", path / "annotations" / "instances.json"]
            found = [c for c in candidates if c.is_file()]
            if not found:
                raise FileNotFoundError(f"No annotations/panoptic.json or annotations/instances.json under {path}")
            path = found[0]
        data = _load_json(path)
        where = str(path)
    _require_keys(data, ["categories"], where)
    categories = []
    for i, cat in enumerate(data["categories"]):
        _require_keys(cat, ["id", "name"], f"{where}: categories[{i}]")
        out = {"id": int(cat["id"]), "name": str(cat["name"]), "isthing": int(cat.get("isthing", 1))}
        if "color" in cat:
            out["color"] = [int(c) for c in cat["color"]]
        categories.append(out)
    return categories


# ----------------------------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------------------------


def _image_entry(path: Path, embed: bool) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {path}")
    if embed:
        return {"bytes": path.read_bytes(), "path": path.name}
    return {"bytes": None, "path": str(path.resolve())}


def _image_size(path: Path, verify: bool = True) -> tuple[int, int]:
    """``(width, height)`` of the image at ``path``: decoded in full so that a truncated file is caught here, or
    (``verify=False``, for very large data sets) read from the header only."""
    if verify:
        width, height = read_image(path).size
        return int(width), int(height)
    try:
        with PILImage.open(path) as image:
            return int(image.size[0]), int(image.size[1])
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"Cannot read image {path}: {error} (not an image file)") from None


def _image_row(image_id: int, info: Mapping, embed: bool) -> dict:
    """The common columns of one image (see the module docstring)."""
    return {"image": _image_entry(info["path"], embed), "image_id": image_id, "file_name": info["file_name"],
            "width": info["width"], "height": info["height"]}


def _resolve_instances_paths(folder_or_json, image_dir) -> tuple[Path, Path]:
    path = Path(folder_or_json)
    if path.is_dir():
        json_path = path / "annotations" / "instances.json"
        image_dir = Path(image_dir) if image_dir is not None else path / "images"
    else:
        json_path = path
        if image_dir is None:
            raise ValueError("image_dir is required when folder_or_json is a json file")
        image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"Image directory not found: {image_dir}")
    return json_path, image_dir


def _parse_images(data: Mapping, where: str, image_dir: Path, verify: bool = True) -> dict[int, dict]:
    _require_keys(data, ["images"], where)
    images = {}
    for i, img in enumerate(data["images"]):
        _require_keys(img, ["id", "file_name"], f"{where}: images[{i}]")
        image_id = int(img["id"])
        if image_id in images:
            raise ValueError(f"{where}: duplicate image id {image_id}")
        path = image_dir / img["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"{where}: image {img['file_name']!r} (id {image_id}) not found at {path}")
        width, height = _image_size(path, verify)
        if ("width" in img and int(img["width"]) != width) or ("height" in img and int(img["height"]) != height):
            raise ValueError(
                f"{where}: images[{i}] ({img['file_name']!r}) says width x height = {img.get('width')} x "
                f"{img.get('height')}, but the file {path} is {width} x {height}"
            )
        images[image_id] = {"file_name": str(img["file_name"]), "path": path, "width": width, "height": height}
    return images


def _category_ids(data: Mapping, where: str) -> set[int]:
    _require_keys(data, ["categories"], where)
    for i, cat in enumerate(data["categories"]):
        _require_keys(cat, ["id"], f"{where}: categories[{i}]")
    return {int(cat["id"]) for cat in data["categories"]}


def _check_box(bbox: Any, width: int, height: int, where: str) -> list[float]:
    """A COCO ``[x, y, w, h]`` box: four finite numbers, ``w, h >= 0``, inside the image (``BOX_TOLERANCE`` px)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise ValueError(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise ValueError(f"{where}: bbox {list(bbox)} has non-finite values")
    if w < 0 or h < 0:
        raise ValueError(f"{where}: bbox {list(bbox)} has a negative width or height; expected [x, y, w >= 0, h >= 0]")
    t = BOX_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        raise ValueError(f"{where}: bbox {list(bbox)} lies outside the {width} x {height} image")
    return [x, y, w, h]


def _parse_instance_annotations(data: Mapping, where: str, images: Mapping[int, dict]) -> dict[int, list[dict]]:
    from pycocotools import mask as mask_utils

    _require_keys(data, ["annotations"], where)
    per_image: dict[int, list[dict]] = {image_id: [] for image_id in images}
    known_categories: set[int] | None = None
    for i, ann in enumerate(data["annotations"]):
        here = f"{where}: annotations[{i}]"
        _require_keys(ann, ["image_id", "category_id"], here)
        known_categories = _category_ids(data, where) if known_categories is None else known_categories
        image_id = int(ann["image_id"])
        if image_id not in images:
            raise ValueError(f"{here} refers to unknown image id {image_id}")
        if int(ann["category_id"]) not in known_categories:
            raise ValueError(
                f"{here} has category_id {ann['category_id']}, which is not in the json's categories "
                f"{sorted(known_categories)}"
            )
        height, width = images[image_id]["height"], images[image_id]["width"]
        bbox = _check_box(ann["bbox"], width, height, here) if "bbox" in ann else None
        if "segmentation" in ann and ann["segmentation"] not in (None, [], {}):
            rle = segmentation_to_rle(ann["segmentation"], height, width, here)
        elif bbox is not None:
            # Box-only annotation: the box as a polygon so that segm evaluation still has a mask.
            x, y, w, h = bbox
            rle = segmentation_to_rle([[x, y, x + w, y, x + w, y + h, x, y + h]], height, width, here)
        else:
            raise KeyError(f"{here} has neither 'segmentation' nor 'bbox'")
        compressed = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
        per_image[image_id].append(
            {
                "id": int(ann.get("id", i + 1)),
                "bbox": bbox if bbox is not None else [float(v) for v in mask_utils.toBbox(compressed)],
                "category_id": int(ann["category_id"]),
                "segmentation": rle,
                "area": float(ann["area"]) if "area" in ann else float(mask_utils.area(compressed)),
                "iscrowd": int(ann.get("iscrowd", 0)),
            }
        )
    return per_image


def load_coco_instances(
    folder_or_json: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    *,
    embed_images: bool = False,
    verify_images: bool = True,
) -> datasets.Dataset:
    """Load a COCO instances json into a :class:`datasets.Dataset` with columns
    ``image, image_id, file_name, width, height, objects``.

    Args:
        folder_or_json: a COCO folder (``annotations/instances.json`` + ``images/``) or the json file itself.
        image_dir: the images' directory; required with a json file, defaults to ``<folder>/images``.
        embed_images: read the image bytes into the data set now (otherwise images are referenced by path and read
            lazily; ``save_to_disk`` embeds them in both cases).

    Polygons and uncompressed RLEs are converted to compressed RLEs with ``str`` counts; missing ``area``/``bbox``
    are computed from the mask, missing ``iscrowd`` is 0.
    """
    json_path, image_dir = _resolve_instances_paths(folder_or_json, image_dir)
    data = _load_json(json_path)
    where = str(json_path)
    images = _parse_images(data, where, image_dir, verify_images)
    objects = _parse_instance_annotations(data, where, images)
    rows = [{**_image_row(image_id, info, embed_images), "objects": objects[image_id]} for image_id, info in images.items()]
    return rows_to_dataset(rows, features=build_features(instances=True, panoptic=False, semantic=False))


def _parse_panoptic(
    data: Mapping, where: str, images: Mapping[int, dict], png_dir: Path, verify: bool = True
) -> dict[int, dict]:
    """Segments of every panoptic annotation, checked against its PNG (``verify``): the PNG has the image's size,
    and its segment ids are exactly those of ``segments_info`` (an id missing from it would silently become void).
    Without ``verify`` a PNG is read only to fill in a missing ``area`` or ``bbox``."""
    _require_keys(data, ["annotations", "categories"], where)
    isthing = {int(cat["id"]): int(cat.get("isthing", 1)) for cat in data["categories"] if cat.get("id") is not None}
    _category_ids(data, where)
    out: dict[int, dict] = {}
    for i, ann in enumerate(data["annotations"]):
        here = f"{where}: annotations[{i}]"
        _require_keys(ann, ["image_id", "file_name", "segments_info"], here)
        image_id = int(ann["image_id"])
        if image_id not in images:
            raise ValueError(f"{here} refers to unknown image id {image_id}")
        png_path = png_dir / ann["file_name"]
        if not png_path.is_file():
            raise FileNotFoundError(f"{here}: panoptic PNG {ann['file_name']!r} not found at {png_path}")
        complete = all("area" in seg and "bbox" in seg for seg in ann["segments_info"])
        ids = panoptic_ids(read_image(png_path, "RGB")) if verify or not complete else None
        size = (images[image_id]["height"], images[image_id]["width"])
        if ids is not None and ids.shape != size:
            raise ValueError(f"{here}: panoptic PNG {png_path} is {ids.shape[1]} x {ids.shape[0]} but its image is "
                             f"{size[1]} x {size[0]}")
        segments = []
        for j, seg in enumerate(ann["segments_info"]):
            _require_keys(seg, ["id", "category_id"], f"{here}.segments_info[{j}]")
            category_id = int(seg["category_id"])
            if category_id not in isthing:
                raise ValueError(f"{here}: segment {seg['id']} of image {image_id} has category_id {category_id}, "
                                 f"which is not in the json's categories {sorted(isthing)}")
            mask = ids == int(seg["id"]) if ids is not None else None
            segments.append(
                {
                    "id": int(seg["id"]),
                    "category_id": category_id,
                    "isthing": int(seg.get("isthing", isthing[category_id])),
                    "iscrowd": int(seg.get("iscrowd", 0)),
                    "area": int(seg["area"]) if "area" in seg else int(mask.sum()),
                    "bbox": [int(round(float(v))) for v in seg["bbox"]] if "bbox" in seg else mask_to_bbox(mask),
                }
            )
        if not verify:
            out[image_id] = {"png_path": png_path, "segments_info": segments}
            continue
        listed = {s["id"] for s in segments}
        present = set(np.unique(ids).tolist()) - {0}
        if present - listed:
            raise ValueError(f"{here}: panoptic PNG {png_path} has segment ids {sorted(present - listed)[:10]} that "
                             "are not in segments_info (id 0 is the only void)")
        if listed - present:
            raise ValueError(f"{here}: segments_info lists ids {sorted(listed - present)[:10]} that do not occur in "
                             f"the panoptic PNG {png_path}")
        out[image_id] = {"png_path": png_path, "segments_info": segments}
    return out


def load_coco_panoptic(
    json_file: str | os.PathLike,
    png_dir: str | os.PathLike,
    image_dir: str | os.PathLike,
    *,
    embed_images: bool = False,
    verify_images: bool = True,
) -> datasets.Dataset:
    """Load a COCO panoptic json + PNG folder into a :class:`datasets.Dataset` with columns
    ``image, image_id, file_name, width, height, panoptic, segments_info``.

    ``segments_info`` entries get ``isthing`` from the json's categories, ``iscrowd`` defaults to 0 and missing
    ``area``/``bbox`` are computed from the PNG. Images without a panoptic annotation are skipped.
    """
    json_path, png_dir, image_dir = Path(json_file), Path(png_dir), Path(image_dir)
    for d, what in ((png_dir, "Panoptic PNG"), (image_dir, "Image")):
        if not d.is_dir():
            raise FileNotFoundError(f"{what} directory not found: {d}")
    data = _load_json(json_path)
    where = str(json_path)
    images = _parse_images(data, where, image_dir, verify_images)
    panoptic = _parse_panoptic(data, where, images, png_dir, verify_images)
    rows = [
        {**_image_row(image_id, info, embed_images), "panoptic": _image_entry(panoptic[image_id]["png_path"], embed_images),
         "segments_info": panoptic[image_id]["segments_info"]}
        for image_id, info in images.items()
        if image_id in panoptic
    ]
    return rows_to_dataset(rows, features=build_features(instances=False, panoptic=True, semantic=False))


def _list_images(directory: Path, extensions: Sequence[str]) -> list[Path]:
    exts = {e.lower() for e in extensions}
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in exts)


def load_semantic_folder(
    image_dir: str | os.PathLike,
    label_dir: str | os.PathLike,
    *,
    label_suffix: str = ".png",
    image_extensions: Sequence[str] = IMAGE_EXTENSIONS,
    embed_images: bool = False,
    verify_images: bool = True,
) -> datasets.Dataset:
    """Pair every image of ``image_dir`` with ``label_dir/<stem><label_suffix>`` (a single-channel PNG of class ids,
    255 = ignore) into a :class:`datasets.Dataset` with columns ``image, image_id, file_name, width, height,
    semantic``. ``image_id`` is the integer file stem when all stems are integers, else the 1-based sorted index.
    """
    image_dir, label_dir = Path(image_dir), Path(label_dir)
    for d, what in ((image_dir, "Image"), (label_dir, "Label")):
        if not d.is_dir():
            raise FileNotFoundError(f"{what} directory not found: {d}")
    image_paths = _list_images(image_dir, image_extensions)
    if not image_paths:
        raise FileNotFoundError(f"No images with extensions {tuple(image_extensions)} in {image_dir}")
    missing = [p.name for p in image_paths if not (label_dir / (p.stem + label_suffix)).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) have no label map in {label_dir} (expected <stem>{label_suffix}), "
            f"e.g. {missing[:5]}"
        )
    stems = [p.stem for p in image_paths]
    numeric = all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems)
    rows = []
    for i, path in enumerate(image_paths):
        label_path = label_dir / (path.stem + label_suffix)
        width, height = _image_size(path, verify_images)
        lw, lh = _image_size(label_path, verify_images)
        if (lw, lh) != (width, height):
            raise ValueError(f"Label map {label_path} is {lw}x{lh} but image {path} is {width}x{height}")
        rows.append(
            {
                "image": _image_entry(path, embed_images),
                "image_id": int(path.stem) if numeric else i + 1,
                "file_name": path.name,
                "width": width,
                "height": height,
                "semantic": _image_entry(label_path, embed_images),
            }
        )
    return rows_to_dataset(rows, features=build_features(instances=False, panoptic=False, semantic=True))


def load_coco_folder(
    folder: str | os.PathLike, *, embed_images: bool = False, verify_images: bool = True
) -> datasets.Dataset:
    """Load a folder written by :func:`maskdino_hf.synthetic.export_coco_folder` (or laid out the same way):

    ``images/``, ``annotations/instances.json``, ``annotations/panoptic.json`` + ``panoptic/``, ``semantic/``.
    Whatever annotation kinds are present become columns (at least one is required); images come from the
    instances json, else the panoptic json, else the ``images/`` folder. Semantic maps are matched by file stem.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"COCO folder not found: {folder}")
    image_dir = folder / "images"
    if not image_dir.is_dir():
        raise FileNotFoundError(f"Image directory not found: {image_dir}")
    instances_json = folder / "annotations" / "instances.json"
    panoptic_json = folder / "annotations" / "panoptic.json"
    panoptic_dir = folder / "panoptic"
    semantic_dir = folder / "semantic"
    has_instances = instances_json.is_file()
    has_panoptic = panoptic_json.is_file()
    has_semantic = semantic_dir.is_dir()
    if has_panoptic and not panoptic_dir.is_dir():
        raise FileNotFoundError(f"{panoptic_json} exists but the PNG directory {panoptic_dir} does not")
    if not (has_instances or has_panoptic or has_semantic):
        raise FileNotFoundError(
            f"No annotations in {folder}: expected annotations/instances.json, annotations/panoptic.json or semantic/"
        )

    images: dict[int, dict] | None = None
    objects = panoptic = None
    if has_instances:
        data = _load_json(instances_json)
        images = _parse_images(data, str(instances_json), image_dir, verify_images)
        objects = _parse_instance_annotations(data, str(instances_json), images)
    if has_panoptic:
        data = _load_json(panoptic_json)
        pan_images = _parse_images(data, str(panoptic_json), image_dir, verify_images)
        if images is None:
            images = pan_images
        panoptic = _parse_panoptic(data, str(panoptic_json), images, panoptic_dir, verify_images)
        missing = [i for i in images if i not in panoptic]
        if missing:
            raise ValueError(f"{panoptic_json}: no panoptic annotation for image id(s) {missing[:10]}")
    if images is None:
        return load_semantic_folder(image_dir, semantic_dir, embed_images=embed_images, verify_images=verify_images)

    rows = []
    for image_id, info in images.items():
        row = _image_row(image_id, info, embed_images)
        if objects is not None:
            row["objects"] = objects[image_id]
        if panoptic is not None:
            row["panoptic"] = _image_entry(panoptic[image_id]["png_path"], embed_images)
            row["segments_info"] = panoptic[image_id]["segments_info"]
        if has_semantic:
            label_path = semantic_dir / (Path(info["file_name"]).stem + ".png")
            if not label_path.is_file():
                raise FileNotFoundError(f"Semantic label map for image {info['file_name']!r} not found at {label_path}")
            label_size = _image_size(label_path, verify_images)
            if label_size != (info["width"], info["height"]):
                raise ValueError(f"Label map {label_path} is {label_size[0]}x{label_size[1]} but image "
                                 f"{info['path']} is {info['width']}x{info['height']}")
            row["semantic"] = _image_entry(label_path, embed_images)
        rows.append(row)
    features = build_features(instances=has_instances, panoptic=has_panoptic, semantic=has_semantic)
    return rows_to_dataset(rows, features=features)


# ----------------------------------------------------------------------------------------------------------------
# Dataset -> COCO dictionaries
# ----------------------------------------------------------------------------------------------------------------


def instance_annotations(row: Mapping) -> list[dict]:
    """COCO instance annotations (``category_id``, ``iscrowd``, and ``id``, ``bbox``, ``area``, ``segmentation`` as
    far as given) of one row: its ``objects``, or the thing segments of its ``panoptic`` + ``segments_info`` when it
    has no objects (box, area and RLE from the PNG)."""
    if row.get("objects") is not None:
        annotations = []
        for obj in row["objects"]:
            annotation = {"category_id": int(obj["category_id"]), "iscrowd": int(obj.get("iscrowd") or 0)}
            if obj.get("id") is not None:
                annotation["id"] = int(obj["id"])
            if obj.get("bbox") is not None:
                annotation["bbox"] = [float(v) for v in obj["bbox"]]
            if obj.get("area") is not None:
                annotation["area"] = float(obj["area"])
            if obj.get("segmentation") is not None:
                annotation["segmentation"] = dict(obj["segmentation"])
            annotations.append(annotation)
        return annotations
    if row.get("panoptic") is None or row.get("segments_info") is None:
        raise KeyError(f"a row needs 'objects' or 'panoptic' + 'segments_info' for instance annotations; it has {sorted(row)}")
    ids = panoptic_ids(row["panoptic"])
    annotations = []
    for segment in row["segments_info"]:
        if not segment.get("isthing", 1):
            continue
        mask = ids == int(segment["id"])
        annotations.append(
            {
                "category_id": int(segment["category_id"]),
                "bbox": [float(v) for v in mask_to_bbox(mask)],
                "area": float(mask.sum()),
                "iscrowd": int(segment.get("iscrowd") or 0),
                "segmentation": mask_to_rle(mask),
            }
        )
    return annotations


def dataset_to_coco_instances(
    rows: datasets.Dataset | Iterable[Mapping], categories: Sequence[Mapping] | None = None
) -> dict:
    """The COCO instances dict (``images``, ``annotations``, ``categories``) of a data set or of rows
    (``image_id``, ``width``, ``height``, optional ``file_name``, and ``objects`` or ``panoptic`` +
    ``segments_info``, see :func:`instance_annotations`). This is the one builder of COCO instance ground truth.

    Object ids are kept when they are all positive and unique, else renumbered ``1..N`` (pycocotools treats id 0 as
    "unmatched"). ``categories`` defaults to one entry per category id seen; when given (the thing categories, to
    evaluate on a fixed set), an annotation of another category is an error."""
    if isinstance(rows, datasets.Dataset):
        annotation_columns = ["objects"] if "objects" in rows.column_names else ["panoptic", "segments_info"]
        needed = ["image_id", "width", "height", *annotation_columns]
        missing = [c for c in needed if c not in rows.column_names]
        if missing:
            raise KeyError(f"dataset_to_coco_instances needs columns {missing}; columns are {rows.column_names}")
        rows = rows.select_columns(needed + (["file_name"] if "file_name" in rows.column_names else []))
    images, annotations, seen = [], [], set()
    for row in rows:
        image_id = int(row["image_id"])
        if image_id in seen:
            raise ValueError(f"Duplicate image_id {image_id} in the data set")
        seen.add(image_id)
        width, height = int(row["width"]), int(row["height"])
        images.append({"id": image_id, "width": width, "height": height,
                       "file_name": row.get("file_name") or f"{image_id:06d}.png"})
        for k, annotation in enumerate(instance_annotations(row)):
            where = f"image {image_id}: objects[{k}]"
            if "bbox" in annotation:
                _check_box(annotation["bbox"], width, height, where)
            if "segmentation" in annotation:
                segmentation_to_rle(annotation["segmentation"], height, width, where)
            annotations.append({**annotation, "image_id": image_id})
    ids = [annotation.get("id") for annotation in annotations]
    if not (all(i is not None and i > 0 for i in ids) and len(set(ids)) == len(ids)):
        for number, annotation in enumerate(annotations, start=1):
            annotation["id"] = number
    if categories is None:
        categories = [{"id": i, "name": str(i), "isthing": 1} for i in sorted({a["category_id"] for a in annotations})]
    known = {int(c["id"]) for c in categories}
    unknown = sorted({a["category_id"] for a in annotations} - known)
    if unknown:
        raise ValueError(f"instance annotations have category ids {unknown[:10]} that are not in the categories "
                         f"{sorted(known)}")
    return {"info": {"description": "maskdino_hf"}, "images": images, "annotations": annotations,
            "categories": [dict(c) for c in categories]}


def dataset_to_coco_panoptic(dataset: datasets.Dataset, categories: Sequence[Mapping] | None = None) -> dict:
    """A COCO panoptic dict (``images``, ``annotations`` with ``file_name`` = ``<stem>.png`` and
    ``segments_info``, ``categories``) from a data set with a ``segments_info`` column."""
    for col in ("image_id", "width", "height", "segments_info"):
        if col not in dataset.column_names:
            raise KeyError(f"dataset_to_coco_panoptic needs column {col!r}; columns are {dataset.column_names}")
    cols = ["image_id", "width", "height", "segments_info"]
    cols += ["file_name"] if "file_name" in dataset.column_names else []
    table = dataset.select_columns(cols).to_dict()
    images, annotations, seen_cats = [], [], {}
    for i in range(len(table["image_id"])):
        image_id = int(table["image_id"][i])
        file_name = table["file_name"][i] if "file_name" in table else f"{image_id:06d}.png"
        images.append({"id": image_id, "width": int(table["width"][i]), "height": int(table["height"][i]),
                       "file_name": file_name})
        segments = []
        for s in table["segments_info"][i]:
            seen_cats[int(s["category_id"])] = int(s["isthing"])
            segments.append({k: (list(map(int, v)) if k == "bbox" else int(v)) for k, v in s.items()})
        annotations.append({"image_id": image_id, "file_name": Path(file_name).stem + ".png",
                            "segments_info": segments})
    if categories is not None:
        cats = [dict(c) for c in categories]
    else:
        cats = [{"id": c, "name": str(c), "isthing": t} for c, t in sorted(seen_cats.items())]
    return {"info": {"description": "maskdino_hf"}, "images": images, "annotations": annotations, "categories": cats}
