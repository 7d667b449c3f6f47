"""A small, deterministic synthetic "shapes" data set for instance, panoptic and semantic segmentation.

Each image has a textured background made of two *stuff* regions (``sky`` above a wavy horizon, ``ground`` below;
sometimes only one of them) and 1-5 coloured *thing* shapes (``circle``, ``rectangle`` possibly rotated,
``triangle``) drawn one after another, so later shapes occlude earlier ones. Annotations are derived from the
exact pixel masks used to paint the image:

* instances: visible mask as a compressed COCO RLE (``counts`` is a ``str``), ``bbox`` = tight ``[x, y, w, h]``
  of the visible mask, ``area`` = visible pixel count, ``iscrowd`` = 0. Shapes whose visible part is too small
  (see ``min_visible_fraction`` / ``min_area``) are not painted at all, so every painted pixel is annotated.
* panoptic: an RGB PNG with ``id = R + 256 G + 256^2 B`` and ``segments_info`` (things in the order of
  ``objects``, then stuff); every pixel belongs to exactly one segment.
* semantic: an ``L`` PNG of category ids (255 = ignore; the generator labels every pixel).

Category ids are 0-based and equal to the model's label index: ``0 circle, 1 rectangle, 2 triangle`` (things),
``3 sky, 4 ground`` (stuff). Everything depends only on ``seed``, the split and the image index.

Command line: ``python -m maskdino_hf.synthetic OUTPUT_DIR --num-train 64 --num-val 16 --seed 0``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage

import datasets
from transformers.image_transforms import id_to_rgb, rgb_to_id

from .data import (
    build_features,
    dataset_to_coco_instances,
    dataset_to_coco_panoptic,
    mask_to_bbox,
    mask_to_rle,
    rows_to_dataset,
)

__all__ = [
    "SHAPES_CATEGORIES",
    "THING_CLASSES",
    "STUFF_CLASSES",
    "id2label",
    "label2id",
    "generate_shapes_example",
    "generate_shapes_split",
    "generate_shapes_dataset",
    "export_coco_folder",
    "make_synthetic_dataset",
]

SHAPES_CATEGORIES: list[dict[str, Any]] = [
    {"id": 0, "name": "circle", "isthing": 1, "color": [220, 40, 40]},
    {"id": 1, "name": "rectangle", "isthing": 1, "color": [245, 205, 30]},
    {"id": 2, "name": "triangle", "isthing": 1, "color": [190, 50, 210]},
    {"id": 3, "name": "sky", "isthing": 0, "color": [120, 170, 235]},
    {"id": 4, "name": "ground", "isthing": 0, "color": [90, 130, 60]},
]
THING_CLASSES = [c["name"] for c in SHAPES_CATEGORIES if c["isthing"]]
STUFF_CLASSES = [c["name"] for c in SHAPES_CATEGORIES if not c["isthing"]]
_CAT = {c["name"]: c for c in SHAPES_CATEGORIES}
_SPLIT_KEYS = {"train": 0, "validation": 1, "test": 2}


def id2label(things_only: bool = False) -> dict[int, str]:
    """``{label_id: name}`` for the shapes categories (label id == category id); ``things_only`` drops stuff."""
    return {c["id"]: c["name"] for c in SHAPES_CATEGORIES if c["isthing"] or not things_only}


def label2id(things_only: bool = False) -> dict[str, int]:
    """Inverse of :func:`id2label`."""
    return {v: k for k, v in id2label(things_only).items()}


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a random grid bilinearly upsampled."""
    gh, gw = max(2, cells), max(2, int(round(cells * w / max(h, 1))))
    grid = rng.random((gh, gw)).astype(np.float32)
    ys = np.linspace(0, gh - 1, h, dtype=np.float32)
    xs = np.linspace(0, gw - 1, w, dtype=np.float32)
    y0 = np.floor(ys).astype(int).clip(0, gh - 2)
    x0 = np.floor(xs).astype(int).clip(0, gw - 2)
    fy = (ys - y0)[:, None]
    fx = (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _jitter(rng: np.random.Generator, color: Sequence[int], amount: int) -> np.ndarray:
    return np.clip(np.asarray(color, np.float32) + rng.integers(-amount, amount + 1, size=3), 0, 255)


def _texture(rng: np.random.Generator, h: int, w: int, base: np.ndarray, kind: str) -> np.ndarray:
    """An ``(h, w, 3)`` float texture around ``base``: ``gradient``, ``noise``, ``stripes`` or ``clouds``."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        other = _jitter(rng, base, 50)
        tex = base[None, None] * (1 - t[..., None]) + other[None, None] * t[..., None]
    elif kind == "stripes":
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(6, 20)
        phase = (np.cos(angle) * xx + np.sin(angle) * yy) * 2 * np.pi / period
        t = 0.5 + 0.5 * np.sin(phase)
        other = _jitter(rng, base, 45)
        tex = base[None, None] * (1 - t[..., None]) + other[None, None] * t[..., None]
    elif kind == "clouds":
        t = _smooth_noise(rng, h, w, int(rng.integers(3, 7)))
        tex = base[None, None] + (t[..., None] - 0.5) * 90.0
    else:  # noise
        t = _smooth_noise(rng, h, w, int(rng.integers(8, 16)))
        tex = base[None, None] + (t[..., None] - 0.5) * 60.0
    tex = tex + rng.normal(0, 6.0, size=(h, w, 1)).astype(np.float32)
    return tex


def _convex_polygon_mask(points: np.ndarray, h: int, w: int) -> np.ndarray:
    """Pixels whose centre lies inside a convex polygon (vertices in any consistent order)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    xx += 0.5
    yy += 0.5
    # Orient counter-clockwise in image coordinates.
    area2 = sum(points[i][0] * points[(i + 1) % len(points)][1] - points[(i + 1) % len(points)][0] * points[i][1]
                for i in range(len(points)))
    if area2 < 0:
        points = points[::-1]
    inside = np.ones((h, w), dtype=bool)
    for i in range(len(points)):
        x0, y0 = points[i]
        x1, y1 = points[(i + 1) % len(points)]
        inside &= (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0) >= 0
    return inside


def _shape_mask(rng: np.random.Generator, kind: str, h: int, w: int, size_range: tuple[float, float]) -> np.ndarray:
    side = min(h, w)
    r = rng.uniform(*size_range) * side
    margin = 0.6 * r
    cx = rng.uniform(margin, w - margin) if w > 2 * margin else w / 2
    cy = rng.uniform(margin, h - margin) if h > 2 * margin else h / 2
    if kind == "circle":
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r**2
    if kind == "rectangle":
        aspect = rng.uniform(0.5, 1.0)
        hw, hh = (r, r * aspect) if rng.random() < 0.5 else (r * aspect, r)
        hw, hh = hw * 0.9, hh * 0.9
        angle = rng.uniform(-np.pi / 4, np.pi / 4) if rng.random() < 0.5 else 0.0
        corners = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]])
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        return _convex_polygon_mask(corners @ rot.T + [cx, cy], h, w)
    if kind == "triangle":
        start = rng.uniform(0, 2 * np.pi)
        angles = start + np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.25, 0.25, size=3)
        radii = r * rng.uniform(0.85, 1.1, size=3)
        pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
        return _convex_polygon_mask(pts, h, w)
    raise ValueError(f"Unknown shape {kind!r}")


def _sample_size(rng: np.random.Generator, image_size) -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)):
        image_size = (int(image_size), int(image_size))
    if len(image_size) != 2:
        raise ValueError(f"image_size must be an int, (h, w) or ((h_min, h_max), (w_min, w_max)); got {image_size}")
    dims = []
    for d in image_size:
        if isinstance(d, (int, np.integer)):
            dims.append(int(d))
        else:
            lo, hi = (int(v) for v in d)
            if lo > hi:
                raise ValueError(f"Empty size range {d}")
            dims.append(int(rng.integers(lo, hi + 1)))
    if min(dims) < 16:
        raise ValueError(f"Images must be at least 16 px per side, got {dims}")
    return dims[0], dims[1]


def _segment_id_generator(rng: np.random.Generator):
    used = {0}

    def new_id(color: Sequence[int]) -> int:
        for _ in range(1000):
            candidate = rgb_to_id(_jitter(rng, color, 30).astype(np.int64))
            if candidate not in used:
                used.add(candidate)
                return candidate
        candidate = max(used) + 1
        used.add(candidate)
        return candidate

    return new_id


def _png_bytes(array: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _resolve_occlusion(shapes, h, w, min_area, min_visible_fraction):
    """Visible masks (later shapes on top) after dropping shapes whose visible part is too small; dropping one can
    uncover others, so iterate until stable."""
    keep = [int(s["mask"].sum()) >= min_area for s in shapes]
    while True:
        visible = []
        covered = np.zeros((h, w), dtype=bool)
        for i in reversed(range(len(shapes))):
            if keep[i]:
                vis = shapes[i]["mask"] & ~covered
                covered |= shapes[i]["mask"]
            else:
                vis = np.zeros((h, w), dtype=bool)
            visible.append(vis)
        visible = visible[::-1]
        changed = False
        for i, s in enumerate(shapes):
            if keep[i]:
                area = int(visible[i].sum())
                if area < min_area or area < min_visible_fraction * int(s["mask"].sum()):
                    keep[i] = False
                    changed = True
        if not changed:
            return keep, visible


def generate_shapes_example(
    rng: np.random.Generator,
    image_id: int,
    image_size=(160, 160),
    num_objects: tuple[int, int] = (1, 5),
    object_size: tuple[float, float] = (0.12, 0.25),
    min_visible_fraction: float = 0.25,
    min_area: int = 64,
    class_colors: bool = True,
    sky_probability: float = 0.85,
    ground_probability: float = 0.9,
) -> dict:
    """One example as a dict of numpy arrays and python values (see :func:`generate_shapes_dataset`). The images are
    returned as numpy arrays under ``image_array`` (uint8 RGB), ``panoptic_ids`` (int64 id map) and
    ``semantic_array`` (uint8)."""
    h, w = _sample_size(rng, image_size)

    # --- stuff layout: sky above a wavy horizon, ground below (sometimes only one of them)
    has_sky = rng.random() < sky_probability
    has_ground = rng.random() < ground_probability or not has_sky
    xs = np.arange(w, dtype=np.float64) + 0.5
    if has_sky and has_ground:
        base = rng.uniform(0.3, 0.7) * h
        amp = rng.uniform(0, 0.08) * h
        freq = rng.uniform(0.5, 2.5) * 2 * np.pi / w
        horizon = base + amp * np.sin(freq * xs + rng.uniform(0, 2 * np.pi))
    else:
        horizon = np.full(w, float(h) if has_sky else 0.0)
    yy = np.arange(h, dtype=np.float64)[:, None] + 0.5
    sky_mask = yy < horizon[None, :]
    semantic = np.where(sky_mask, _CAT["sky"]["id"], _CAT["ground"]["id"]).astype(np.uint8)

    sky_tex = _texture(rng, h, w, _jitter(rng, _CAT["sky"]["color"], 25), str(rng.choice(["gradient", "clouds"])))
    ground_base = _jitter(rng, rng.choice([[90, 130, 60], [130, 100, 70], [110, 110, 100]]), 20)
    ground_tex = _texture(rng, h, w, ground_base, str(rng.choice(["noise", "stripes", "gradient"])))
    image = np.where(sky_mask[..., None], sky_tex, ground_tex)

    # --- things: sample, then drop those whose visible part is too small (and never paint them); resample the
    # layout (up to 10 times) if that leaves fewer than num_objects[0] (at most 1) shapes.
    for _attempt in range(10):
        n = int(rng.integers(num_objects[0], num_objects[1] + 1))
        shapes = []
        for _ in range(n):
            kind = THING_CLASSES[int(rng.integers(len(THING_CLASSES)))]
            mask = _shape_mask(rng, kind, h, w, object_size)
            if class_colors:
                color = _jitter(rng, _CAT[kind]["color"], 30)
            else:
                color = rng.uniform(20, 245, size=3).astype(np.float32)
            shading = rng.uniform(-25, 25, size=2)
            shapes.append({"kind": kind, "mask": mask, "color": color, "shading": shading})
        keep, visible = _resolve_occlusion(shapes, h, w, min_area, min_visible_fraction)
        if sum(keep) >= min(1, num_objects[0]):
            break

    yyf, xxf = np.mgrid[0:h, 0:w].astype(np.float32)
    objects = []
    thing_masks = []
    for i, s in enumerate(shapes):
        if not keep[i]:
            continue
        vis = visible[i]
        ys, xs_ = np.nonzero(s["mask"])
        cyy, cxx = ys.mean(), xs_.mean()
        span = max(float(np.ptp(ys)), float(np.ptp(xs_)), 1.0)
        shade = (s["shading"][0] * (xxf - cxx) + s["shading"][1] * (yyf - cyy)) / span
        fill = s["color"][None, None] + shade[..., None]
        image = np.where(vis[..., None], fill, image)
        semantic[vis] = _CAT[s["kind"]]["id"]
        thing_masks.append((s["kind"], vis))
    image = image + rng.normal(0, 3.0, size=image.shape)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)

    # --- annotations
    new_id = _segment_id_generator(rng)
    panoptic = np.zeros((h, w), dtype=np.int64)
    segments_info = []
    for k, (kind, vis) in enumerate(thing_masks):
        seg_id = new_id(_CAT[kind]["color"])
        panoptic[vis] = seg_id
        bbox = mask_to_bbox(vis)
        area = int(vis.sum())
        objects.append(
            {
                "id": int(image_id) * 1000 + k + 1,
                "bbox": [float(v) for v in bbox],
                "category_id": _CAT[kind]["id"],
                "segmentation": mask_to_rle(vis),
                "area": float(area),
                "iscrowd": 0,
            }
        )
        segments_info.append(
            {"id": seg_id, "category_id": _CAT[kind]["id"], "isthing": 1, "iscrowd": 0, "area": area, "bbox": bbox}
        )
    for name in STUFF_CLASSES:
        cat = _CAT[name]
        region = (semantic == cat["id"])
        area = int(region.sum())
        if area == 0:
            continue
        seg_id = new_id(cat["color"])
        panoptic[region] = seg_id
        segments_info.append(
            {"id": seg_id, "category_id": cat["id"], "isthing": 0, "iscrowd": 0, "area": area,
             "bbox": mask_to_bbox(region)}
        )
    assert (panoptic != 0).all()
    return {
        "image_array": image,
        "image_id": int(image_id),
        "file_name": f"{int(image_id):06d}.png",
        "width": w,
        "height": h,
        "objects": objects,
        "panoptic_ids": panoptic,
        "segments_info": segments_info,
        "semantic_array": semantic,
    }


def generate_shapes_split(num_images: int, image_size=(160, 160), seed: int = 0, split: str = "train",
                          **kwargs) -> datasets.Dataset:
    """One split as a :class:`datasets.Dataset` (columns of :func:`generate_shapes_dataset`). Image ``i`` of a split
    only depends on ``(seed, split, i)``, so a larger data set extends a smaller one."""
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    split_key = _SPLIT_KEYS.get(split)
    if split_key is None:
        split_key = int.from_bytes(split.encode("utf-8")[:8].ljust(8, b"\0"), "little")
    rows = []
    for i in range(num_images):
        rng = np.random.default_rng([int(seed), split_key, i])
        ex = generate_shapes_example(rng, image_id=i + 1, image_size=image_size, **kwargs)
        rows.append(
            {
                "image": {"bytes": _png_bytes(ex["image_array"], "RGB"), "path": ex["file_name"]},
                "image_id": ex["image_id"],
                "file_name": ex["file_name"],
                "width": ex["width"],
                "height": ex["height"],
                "objects": ex["objects"],
                "panoptic": {"bytes": _png_bytes(id_to_rgb(ex["panoptic_ids"]), "RGB"), "path": ex["file_name"]},
                "segments_info": ex["segments_info"],
                "semantic": {"bytes": _png_bytes(ex["semantic_array"], "L"), "path": ex["file_name"]},
            }
        )
    features = build_features()
    info = datasets.DatasetInfo(
        description="maskdino_hf synthetic shapes; categories: " + json.dumps(SHAPES_CATEGORIES),
        features=features,
    )
    return rows_to_dataset(rows, features=features, info=info, split=datasets.NamedSplit(split))


def generate_shapes_dataset(
    num_images: int | Mapping[str, int] = 64,
    image_size=(160, 160),
    seed: int = 0,
    validation_fraction: float = 0.25,
    **kwargs,
) -> datasets.DatasetDict:
    """Generate the synthetic shapes data set.

    Args:
        num_images: total number of images, split into ``train``/``validation`` with ``validation_fraction``
            (at least one validation image when ``num_images >= 2``), or a mapping ``{"train": n, "validation": m}``
            (any split names).
        image_size: ``int`` (square), ``(h, w)``, or ranges ``((h_min, h_max), (w_min, w_max))`` (inclusive) sampled
            per image. 128-192 px keeps CPU training fast.
        seed: everything is a deterministic function of ``seed``, the split name and the image index.
        **kwargs: forwarded to :func:`generate_shapes_example`: ``num_objects=(1, 5)``, ``object_size=(0.12, 0.25)``
            (shape radius as a fraction of the short side), ``min_visible_fraction=0.25``, ``min_area=64``,
            ``class_colors=True`` (colour jittered around the class colour; ``False`` = random colours),
            ``sky_probability``, ``ground_probability``.

    Returns:
        A :class:`datasets.DatasetDict`; each split has the columns ``image`` (Image), ``image_id`` (1-based within
        the split), ``file_name``, ``width``, ``height``, ``objects`` (list of ``{id, bbox, category_id,
        segmentation: {size, counts: str}, area, iscrowd}``), ``panoptic`` (RGB Image, ``rgb_to_id`` encoding),
        ``segments_info`` (list of ``{id, category_id, isthing, iscrowd, area, bbox}``), ``semantic`` (L Image).
        ``save_to_disk``/``load_from_disk`` work directly (all images are embedded PNG bytes).
    """
    if isinstance(num_images, Mapping):
        counts = {str(k): int(v) for k, v in num_images.items()}
    else:
        total = int(num_images)
        n_val = int(round(total * validation_fraction))
        if total >= 2 and validation_fraction > 0:
            n_val = min(max(n_val, 1), total - 1)
        counts = {"train": total - n_val, "validation": n_val}
    return datasets.DatasetDict(
        {split: generate_shapes_split(n, image_size=image_size, seed=seed, split=split, **kwargs)
         for split, n in counts.items()}
    )


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------


def _write_image_column(dataset: datasets.Dataset, column: str, directory: Path, names: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    raw = dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False))
    for name, entry in zip(names, raw[column]):
        target = directory / name
        if entry.get("bytes") is not None:
            data = entry["bytes"]
            if target.suffix.lower() == ".png" and not data.startswith(b"\x89PNG"):
                with PILImage.open(io.BytesIO(data)) as im:
                    im.save(target, format="PNG")
                continue
            target.write_bytes(data)
        elif entry.get("path"):
            shutil.copyfile(entry["path"], target)
        else:
            raise ValueError(f"Column {column!r} has an empty image entry for {name}")


def export_coco_folder(
    dataset_split: datasets.Dataset,
    folder: str | os.PathLike,
    categories: Sequence[Mapping] | None = None,
) -> dict[str, str]:
    """Write one split as a COCO-format folder::

        folder/images/<file_name>
        folder/annotations/instances.json      (if the split has ``objects``; thing categories only)
        folder/annotations/panoptic.json       (if it has ``panoptic`` + ``segments_info``; all categories)
        folder/panoptic/<stem>.png
        folder/semantic/<stem>.png             (if it has ``semantic``)

    ``categories`` defaults to :data:`SHAPES_CATEGORIES`. Returns the written paths by kind. The folder can be read
    back with :func:`maskdino_hf.data.load_coco_folder` (or the individual loaders).
    """
    categories = [dict(c) for c in (categories if categories is not None else SHAPES_CATEGORIES)]
    folder = Path(folder)
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    columns = dataset_split.column_names
    if "file_name" in columns:
        file_names = list(dataset_split["file_name"])
    else:
        file_names = [f"{int(i):06d}.png" for i in dataset_split["image_id"]]
    if len(set(file_names)) != len(file_names):
        raise ValueError("Duplicate file names in the split; cannot export to one folder")
    stems = [Path(n).stem + ".png" for n in file_names]
    out = {"images": str(folder / "images")}
    _write_image_column(dataset_split, "image", folder / "images", file_names)

    if "objects" in columns:
        things = [c for c in categories if c.get("isthing", 1)]
        coco = dataset_to_coco_instances(dataset_split, things)
        if "file_name" not in columns:
            for img, name in zip(coco["images"], file_names):
                img["file_name"] = name
        path = folder / "annotations" / "instances.json"
        path.write_text(json.dumps(coco))
        out["instances"] = str(path)
    if "panoptic" in columns and "segments_info" in columns:
        coco = dataset_to_coco_panoptic(dataset_split, categories)
        for img, name in zip(coco["images"], file_names):
            img["file_name"] = name
        path = folder / "annotations" / "panoptic.json"
        path.write_text(json.dumps(coco))
        _write_image_column(dataset_split, "panoptic", folder / "panoptic", stems)
        out["panoptic_json"] = str(path)
        out["panoptic"] = str(folder / "panoptic")
    if "semantic" in columns:
        _write_image_column(dataset_split, "semantic", folder / "semantic", stems)
        out["semantic"] = str(folder / "semantic")
    (folder / "categories.json").write_text(json.dumps(categories, indent=1))
    return out


def make_synthetic_dataset(
    output_dir: str | os.PathLike,
    num_train: int = 64,
    num_val: int = 16,
    seed: int = 0,
    image_size=(160, 160),
    save_hf: bool = True,
    **kwargs,
) -> dict[str, str]:
    """Generate the data set and write it under ``output_dir``: ``train/`` and ``validation/`` COCO folders (see
    :func:`export_coco_folder`) and, with ``save_hf``, ``hf/`` (``DatasetDict.save_to_disk``). Returns the paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ds = generate_shapes_dataset({"train": num_train, "validation": num_val}, image_size=image_size, seed=seed,
                                 **kwargs)
    paths = {}
    for split, data in ds.items():
        export_coco_folder(data, output_dir / split)
        paths[split] = str(output_dir / split)
    if save_hf:
        ds.save_to_disk(str(output_dir / "hf"))
        paths["hf"] = str(output_dir / "hf")
    (output_dir / "categories.json").write_text(json.dumps(SHAPES_CATEGORIES, indent=1))
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the synthetic shapes data set (COCO folders + HF data set).")
    parser.add_argument("output_dir")
    parser.add_argument("--num-train", type=int, default=64)
    parser.add_argument("--num-val", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, nargs="+", default=[160, 160],
                        help="one value (square), two (h w) or four (h_min h_max w_min w_max)")
    parser.add_argument("--no-hf", action="store_true", help="do not write the save_to_disk copy")
    args = parser.parse_args(argv)
    s = args.image_size
    if len(s) == 1:
        size = s[0]
    elif len(s) == 2:
        size = (s[0], s[1])
    elif len(s) == 4:
        size = ((s[0], s[1]), (s[2], s[3]))
    else:
        parser.error("--image-size takes 1, 2 or 4 integers")
    paths = make_synthetic_dataset(args.output_dir, args.num_train, args.num_val, args.seed, image_size=size,
                                   save_hf=not args.no_hf)
    print(json.dumps(paths, indent=1))


if __name__ == "__main__":
    main()
