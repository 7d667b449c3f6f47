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
Category ids are kept as they are in the json files; :func:`read_categories` and :func:`id2label_from_categories`
give the mapping to names.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage

import datasets
from datasets import Features, List, Value

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_EXTENSIONS",
    "build_features",
    "rows_to_dataset",
    "rgb2id",
    "id2rgb",
    "mask_to_rle",
    "rle_to_mask",
    "segmentation_to_rle",
    "mask_to_bbox",
    "read_categories",
    "id2label_from_categories",
    "load_coco_instances",
    "load_coco_panoptic",
    "load_semantic_folder",
    "load_coco_folder",
    "dataset_to_coco_instances",
    "dataset_to_coco_panoptic",
]

IGNORE_INDEX = 255
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


def rgb2id(color: Any) -> np.ndarray | int:
    """COCO panoptic encoding: ``id = R + 256 * G + 256**2 * B``. Takes an ``(H, W, 3)`` array, a PIL image or a
    single ``(r, g, b)`` triple."""
    if isinstance(color, PILImage.Image):
        color = np.asarray(color.convert("RGB"))
    if isinstance(color, np.ndarray) and color.ndim == 3:
        if color.dtype == np.uint8:
            color = color.astype(np.int64)
        return color[..., 0] + 256 * color[..., 1] + 256 * 256 * color[..., 2]
    return int(color[0] + 256 * color[1] + 256 * 256 * color[2])


def id2rgb(id_map: Any) -> np.ndarray | list[int]:
    """Inverse of :func:`rgb2id`: an ``(H, W)`` id map to an ``(H, W, 3)`` uint8 array, or one id to ``[r, g, b]``."""
    if isinstance(id_map, np.ndarray):
        id_map = id_map.astype(np.int64)
        rgb = np.zeros((*id_map.shape, 3), dtype=np.uint8)
        for i in range(3):
            rgb[..., i] = id_map % 256
            id_map = id_map // 256
        return rgb
    color = []
    id_map = int(id_map)
    for _ in range(3):
        color.append(id_map % 256)
        id_map //= 256
    return color


def mask_to_rle(mask: np.ndarray) -> dict:
    """Binary ``(H, W)`` mask to a compressed COCO RLE whose ``counts`` is a ``str`` (JSON friendly)."""
    from pycocotools import mask as mask_utils

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask_to_rle expects a 2-D mask, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: Mapping) -> np.ndarray:
    """Compressed or uncompressed COCO RLE (``counts`` as ``str``, ``bytes`` or list) to a bool ``(H, W)`` mask."""
    from pycocotools import mask as mask_utils

    with warnings.catch_warnings():  # pycocotools + numpy 2 "copy keyword" deprecation, harmless
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(_to_compressed_rle(rle)).astype(bool)


def _to_compressed_rle(rle: Mapping) -> dict:
    from pycocotools import mask as mask_utils

    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):
        return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": [height, width], "counts": counts}


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict:
    """Any COCO segmentation (polygon list, uncompressed or compressed RLE) to a compressed RLE with ``str`` counts."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, Mapping):
        if "counts" not in segmentation or "size" not in segmentation:
            raise ValueError(f"RLE segmentation needs 'counts' and 'size', got keys {sorted(segmentation)}")
        rle = _to_compressed_rle(segmentation)
    elif isinstance(segmentation, (list, tuple)):
        polygons = [list(map(float, p)) for p in segmentation if len(p) >= 6]
        if not polygons:
            rle = mask_utils.encode(np.asfortranarray(np.zeros((height, width), dtype=np.uint8)))
        else:
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    else:
        raise ValueError(f"Unsupported segmentation of type {type(segmentation).__name__}")
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def mask_to_bbox(mask: np.ndarray) -> list[int]:
    """Tight ``[x, y, w, h]`` box (integer pixels) of a binary mask; ``[0, 0, 0, 0]`` when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0, 0, 0, 0]
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    return [x0, y0, x1 - x0 + 1, y1 - y0 + 1]


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


def id2label_from_categories(categories: Sequence[Mapping], contiguous: bool = False) -> dict[int, str]:
    """``{category_id: name}``; with ``contiguous=True`` the keys are ``0..N-1`` in the order of ``categories``."""
    if contiguous:
        return {i: str(c["name"]) for i, c in enumerate(categories)}
    return {int(c["id"]): str(c["name"]) for c in categories}


# ----------------------------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------------------------


def _image_entry(path: Path, embed: bool) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {path}")
    if embed:
        return {"bytes": path.read_bytes(), "path": path.name}
    return {"bytes": None, "path": str(path.resolve())}


def _image_size(path: Path) -> tuple[int, int]:
    with PILImage.open(path) as im:
        width, height = im.size
    return int(width), int(height)


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


def _parse_images(data: Mapping, where: str, image_dir: Path) -> dict[int, dict]:
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
        if "width" in img and "height" in img:
            width, height = int(img["width"]), int(img["height"])
        else:
            width, height = _image_size(path)
        images[image_id] = {"file_name": str(img["file_name"]), "path": path, "width": width, "height": height}
    return images


def _parse_instance_annotations(data: Mapping, where: str, images: Mapping[int, dict]) -> dict[int, list[dict]]:
    from pycocotools import mask as mask_utils

    _require_keys(data, ["annotations"], where)
    per_image: dict[int, list[dict]] = {image_id: [] for image_id in images}
    for i, ann in enumerate(data["annotations"]):
        _require_keys(ann, ["image_id", "category_id"], f"{where}: annotations[{i}]")
        image_id = int(ann["image_id"])
        if image_id not in images:
            raise ValueError(f"{where}: annotations[{i}] refers to unknown image id {image_id}")
        height, width = images[image_id]["height"], images[image_id]["width"]
        if "segmentation" in ann and ann["segmentation"] not in (None, [], {}):
            rle = segmentation_to_rle(ann["segmentation"], height, width)
        elif "bbox" in ann:
            # Box-only annotation: the box as a polygon so that segm evaluation still has a mask.
            x, y, w, h = (float(v) for v in ann["bbox"])
            rle = segmentation_to_rle([[x, y, x + w, y, x + w, y + h, x, y + h]], height, width)
        else:
            raise KeyError(f"{where}: annotations[{i}] has neither 'segmentation' nor 'bbox'")
        compressed = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
        bbox = [float(v) for v in ann["bbox"]] if "bbox" in ann else [float(v) for v in mask_utils.toBbox(compressed)]
        area = float(ann["area"]) if "area" in ann else float(mask_utils.area(compressed))
        per_image[image_id].append(
            {
                "id": int(ann.get("id", i + 1)),
                "bbox": bbox,
                "category_id": int(ann["category_id"]),
                "segmentation": rle,
                "area": area,
                "iscrowd": int(ann.get("iscrowd", 0)),
            }
        )
    return per_image


def load_coco_instances(
    folder_or_json: str | os.PathLike, image_dir: str | os.PathLike | None = None, *, embed_images: bool = False
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
    images = _parse_images(data, where, image_dir)
    objects = _parse_instance_annotations(data, where, images)
    rows = []
    for image_id, info in images.items():
        rows.append(
            {
                "image": _image_entry(info["path"], embed_images),
                "image_id": image_id,
                "file_name": info["file_name"],
                "width": info["width"],
                "height": info["height"],
                "objects": objects[image_id],
            }
        )
    return rows_to_dataset(rows, features=build_features(instances=True, panoptic=False, semantic=False))


def _parse_panoptic(data: Mapping, where: str, images: Mapping[int, dict], png_dir: Path) -> dict[int, dict]:
    _require_keys(data, ["annotations", "categories"], where)
    isthing = {}
    for i, cat in enumerate(data["categories"]):
        _require_keys(cat, ["id"], f"{where}: categories[{i}]")
        isthing[int(cat["id"])] = int(cat.get("isthing", 1))
    out: dict[int, dict] = {}
    for i, ann in enumerate(data["annotations"]):
        _require_keys(ann, ["image_id", "file_name", "segments_info"], f"{where}: annotations[{i}]")
        image_id = int(ann["image_id"])
        if image_id not in images:
            raise ValueError(f"{where}: annotations[{i}] refers to unknown image id {image_id}")
        png_path = png_dir / ann["file_name"]
        if not png_path.is_file():
            raise FileNotFoundError(f"{where}: panoptic PNG {ann['file_name']!r} not found at {png_path}")
        segments = []
        for j, seg in enumerate(ann["segments_info"]):
            _require_keys(seg, ["id", "category_id"], f"{where}: annotations[{i}].segments_info[{j}]")
            category_id = int(seg["category_id"])
            if category_id not in isthing:
                raise ValueError(f"{where}: segment {seg['id']} of image {image_id} has unknown category {category_id}")
            segments.append(
                {
                    "id": int(seg["id"]),
                    "category_id": category_id,
                    "isthing": int(seg.get("isthing", isthing[category_id])),
                    "iscrowd": int(seg.get("iscrowd", 0)),
                    "area": int(seg["area"]) if "area" in seg else -1,
                    "bbox": [int(round(float(v))) for v in seg["bbox"]] if "bbox" in seg else None,
                }
            )
        if any(s["area"] < 0 or s["bbox"] is None for s in segments):
            ids = rgb2id(np.asarray(PILImage.open(png_path).convert("RGB")))
            for s in segments:
                m = ids == s["id"]
                if s["area"] < 0:
                    s["area"] = int(m.sum())
                if s["bbox"] is None:
                    s["bbox"] = mask_to_bbox(m)
        out[image_id] = {"png_path": png_path, "segments_info": segments}
    return out


def load_coco_panoptic(
    json_file: str | os.PathLike,
    png_dir: str | os.PathLike,
    image_dir: str | os.PathLike,
    *,
    embed_images: bool = False,
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
    images = _parse_images(data, where, image_dir)
    panoptic = _parse_panoptic(data, where, images, png_dir)
    rows = []
    for image_id, info in images.items():
        if image_id not in panoptic:
            continue
        rows.append(
            {
                "image": _image_entry(info["path"], embed_images),
                "image_id": image_id,
                "file_name": info["file_name"],
                "width": info["width"],
                "height": info["height"],
                "panoptic": _image_entry(panoptic[image_id]["png_path"], embed_images),
                "segments_info": panoptic[image_id]["segments_info"],
            }
        )
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
        width, height = _image_size(path)
        lw, lh = _image_size(label_path)
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


def load_coco_folder(folder: str | os.PathLike, *, embed_images: bool = False) -> datasets.Dataset:
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
        images = _parse_images(data, str(instances_json), image_dir)
        objects = _parse_instance_annotations(data, str(instances_json), images)
    if has_panoptic:
        data = _load_json(panoptic_json)
        pan_images = _parse_images(data, str(panoptic_json), image_dir)
        if images is None:
            images = pan_images
        panoptic = _parse_panoptic(data, str(panoptic_json), images, panoptic_dir)
        missing = [i for i in images if i not in panoptic]
        if missing:
            raise ValueError(f"{panoptic_json}: no panoptic annotation for image id(s) {missing[:10]}")
    if images is None:
        return load_semantic_folder(image_dir, semantic_dir, embed_images=embed_images)

    rows = []
    for image_id, info in images.items():
        row = {
            "image": _image_entry(info["path"], embed_images),
            "image_id": image_id,
            "file_name": info["file_name"],
            "width": info["width"],
            "height": info["height"],
        }
        if objects is not None:
            row["objects"] = objects[image_id]
        if panoptic is not None:
            row["panoptic"] = _image_entry(panoptic[image_id]["png_path"], embed_images)
            row["segments_info"] = panoptic[image_id]["segments_info"]
        if has_semantic:
            label_path = semantic_dir / (Path(info["file_name"]).stem + ".png")
            if not label_path.is_file():
                raise FileNotFoundError(f"Semantic label map for image {info['file_name']!r} not found at {label_path}")
            row["semantic"] = _image_entry(label_path, embed_images)
        rows.append(row)
    features = build_features(instances=has_instances, panoptic=has_panoptic, semantic=has_semantic)
    return rows_to_dataset(rows, features=features)


# ----------------------------------------------------------------------------------------------------------------
# Dataset -> COCO dictionaries
# ----------------------------------------------------------------------------------------------------------------


def _categories_or_inferred(categories: Sequence[Mapping] | None, ids: Iterable[int], isthing: int) -> list[dict]:
    if categories is not None:
        return [dict(c) for c in categories]
    return [{"id": int(i), "name": str(i), "isthing": isthing} for i in sorted(set(ids))]


def dataset_to_coco_instances(dataset: datasets.Dataset, categories: Sequence[Mapping] | None = None) -> dict:
    """A COCO instances dict (``images``, ``annotations``, ``categories``) from a data set with an ``objects``
    column. Object ids are kept when they are all positive and unique, else renumbered ``1..N`` (pycocotools treats
    id 0 as "unmatched"). ``categories``
    defaults to one entry per category id seen; pass the thing categories to evaluate on a fixed set."""
    for col in ("image_id", "width", "height", "objects"):
        if col not in dataset.column_names:
            raise KeyError(f"dataset_to_coco_instances needs column {col!r}; columns are {dataset.column_names}")
    cols = ["image_id", "width", "height", "objects"] + (["file_name"] if "file_name" in dataset.column_names else [])
    table = dataset.select_columns(cols).to_dict()
    obj_ids = [o.get("id") for objs in table["objects"] for o in objs]
    keep_ids = all(i is not None and int(i) > 0 for i in obj_ids) and len(set(obj_ids)) == len(obj_ids)
    images, annotations = [], []
    seen = set()
    for i in range(len(table["image_id"])):
        image_id = int(table["image_id"][i])
        if image_id in seen:
            raise ValueError(f"Duplicate image_id {image_id} in dataset")
        seen.add(image_id)
        image = {"id": image_id, "width": int(table["width"][i]), "height": int(table["height"][i])}
        image["file_name"] = table["file_name"][i] if "file_name" in table else f"{image_id:06d}.png"
        images.append(image)
        for obj in table["objects"][i]:
            annotations.append(
                {
                    "id": int(obj["id"]) if keep_ids else len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(obj["category_id"]),
                    "bbox": [float(v) for v in obj["bbox"]],
                    "area": float(obj["area"]),
                    "iscrowd": int(obj.get("iscrowd", 0)),
                    "segmentation": {"size": [int(v) for v in obj["segmentation"]["size"]],
                                     "counts": obj["segmentation"]["counts"]},
                }
            )
    cats = _categories_or_inferred(categories, (a["category_id"] for a in annotations), 1)
    return {"info": {"description": "maskdino_hf"}, "images": images, "annotations": annotations, "categories": cats}


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
