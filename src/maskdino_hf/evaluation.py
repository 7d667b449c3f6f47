"""Evaluation: one path from a model and a data set to COCO box/mask AP (pycocotools), panoptic quality and
semantic mean IoU, used by ``maskdino-hf evaluate``, ``examples/evaluate.py`` and the periodic evaluation of
``examples/train.py``.

:func:`evaluate` runs the model in batches through the predict helpers (the processor's post-processing at each
image's size), turns every image into a small record against its ground truth (:class:`DatasetEvaluator`), and
computes the metrics once. Under Accelerate each process takes its share of the batches, the records are gathered
and the main process computes the metrics in data set order, so any number of processes gives exactly the
single-process numbers; every process returns them. COCO ground truth comes from one builder
(:func:`maskdino_hf.data.dataset_to_coco_instances`) and model labels map to data set categories through one rule
(:func:`label_to_category_mapping`). Boxes are evaluated as the predict path returns them.

All metric functions return plain ``dict[str, float]`` with values in ``[0, 1]`` (not percent). ``nan`` means
"undefined" (e.g. COCO ``APs`` without small ground-truth objects, or a class absent from both prediction and ground
truth). Per-category entries are keyed ``"<metric>/<category name>"``; :func:`format_metrics_table` /
:func:`print_metrics_table` print summary and per-category tables.

* :func:`compute_coco_metrics`: ground truth as a COCO dict (``images``, ``annotations``, ``categories``; see
  :func:`maskdino_hf.data.dataset_to_coco_instances`), predictions in COCO results format
  (``image_id``, ``category_id``, ``bbox`` xywh, ``score``, ``segmentation`` compressed RLE). Keys
  ``bbox_AP, bbox_AP50, bbox_AP75, bbox_APs, bbox_APm, bbox_APl, bbox_AR1, bbox_AR10, bbox_AR100, bbox_ARs,
  bbox_ARm, bbox_ARl`` (same with ``segm_``) and ``bbox_AP/<name>``.
* :func:`compute_panoptic_quality` / :class:`PanopticQualityAccumulator`: standard PQ (panopticapi): a predicted and
  a ground-truth segment of the same category match when IoU > 0.5, where the union leaves out the predicted
  segment's pixels on ground-truth void. Unmatched predictions that lie more than half on void or on a crowd
  region of their category are not false positives; crowd ground truth is never a false negative. Keys ``PQ, SQ,
  RQ, PQ_th, SQ_th, RQ_th, PQ_st, SQ_st, RQ_st`` and ``PQ/<name>, SQ/<name>, RQ/<name>``.
* :func:`compute_mean_iou` / :class:`ConfusionMatrixAccumulator`: confusion matrix over pixels whose label is not
  ``ignore_index``. Keys ``mIoU`` (mean over classes present in ground truth or prediction), ``fwIoU``, ``mACC``
  (mean over classes present in ground truth), ``pACC`` and ``IoU/<name>``, ``ACC/<name>``.

``evaluate`` wrappers of the three live in ``maskdino_hf/metrics/`` and load offline with :func:`load_metric`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from PIL import Image as PILImage
from transformers.utils import to_numpy

from .data import (
    IGNORE_INDEX,
    dataset_to_coco_instances,
    instance_annotations,
    mask_to_rle,
    panoptic_ids,
    segmentation_to_rle,
)

__all__ = [
    "EVAL_TASKS",
    "evaluate",
    "DatasetEvaluator",
    "label_to_category_mapping",
    "tasks_for_dataset",
    "load_eval_dataset",
    "COCO_STAT_NAMES",
    "METRICS_DIR",
    "compute_coco_metrics",
    "instances_to_coco_results",
    "PanopticQualityAccumulator",
    "compute_panoptic_quality",
    "ConfusionMatrixAccumulator",
    "compute_mean_iou",
    "format_metrics_table",
    "print_metrics_table",
    "load_metric",
    "metric_path",
    "conform_to_schema",
]

COCO_STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
METRICS_DIR = Path(__file__).resolve().parent / "metrics"
AVAILABLE_METRICS = ("coco_detection", "panoptic_quality", "mean_iou")
EVAL_TASKS = ("instance", "detection", "panoptic", "semantic")


def _to_numpy(x: Any) -> np.ndarray:
    return np.asarray(to_numpy(x))


def _nan_if_negative(v: float) -> float:
    v = float(v)
    return float("nan") if v < 0 else v


# ----------------------------------------------------------------------------------------------------------------
# COCO box / mask AP
# ----------------------------------------------------------------------------------------------------------------


def instances_to_coco_results(
    image_id: int,
    scores: Any,
    labels: Any,
    masks: Any | None = None,
    boxes: Any | None = None,
    label_to_category_id: Mapping[int, int] | None = None,
    box_format: str = "xyxy",
) -> list[dict]:
    """Per-image instance predictions to COCO results dicts.

    Args:
        scores, labels: ``(N,)`` arrays or tensors.
        masks: optional ``(N, H, W)`` binary masks (bool/0-1, or probabilities thresholded at 0.5).
        boxes: optional ``(N, 4)`` absolute-pixel boxes in ``box_format`` (``"xyxy"`` or ``"xywh"``); derived from the
            masks when not given.
        label_to_category_id: maps model label ids to COCO category ids (identity by default).
    """
    from pycocotools import mask as mask_utils

    scores = _to_numpy(scores).reshape(-1)
    labels = _to_numpy(labels).reshape(-1)
    n = len(scores)
    if len(labels) != n:
        raise ValueError(f"{n} scores but {len(labels)} labels")
    rles = None
    if masks is not None:
        masks = _to_numpy(masks)
        if masks.ndim != 3 or masks.shape[0] != n:
            raise ValueError(f"masks must be (N, H, W) with N={n}, got {masks.shape}")
        if masks.dtype != bool:
            masks = masks > 0.5
        rles = [mask_to_rle(m) for m in masks]
    if boxes is not None:
        boxes = _to_numpy(boxes).astype(np.float64).reshape(-1, 4)
        if len(boxes) != n:
            raise ValueError(f"{n} scores but {len(boxes)} boxes")
        if box_format == "xyxy":
            boxes = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        elif box_format != "xywh":
            raise ValueError(f"box_format must be 'xyxy' or 'xywh', got {box_format!r}")
    elif rles is not None:
        boxes = np.stack(
            [mask_utils.toBbox({"size": r["size"], "counts": r["counts"].encode("ascii")}) for r in rles]
        ) if n else np.zeros((0, 4))
    else:
        raise ValueError("instances_to_coco_results needs masks or boxes")
    results = []
    for i in range(n):
        label = int(labels[i])
        res = {
            "image_id": int(image_id),
            "category_id": int(label_to_category_id[label]) if label_to_category_id is not None else label,
            "bbox": [float(v) for v in boxes[i]],
            "score": float(scores[i]),
        }
        if rles is not None:
            res["segmentation"] = rles[i]
        results.append(res)
    return results


def _prepare_ground_truth(ground_truth: Mapping, iou_types: Sequence[str]) -> dict:
    from pycocotools import mask as mask_utils

    for key in ("images", "annotations", "categories"):
        if key not in ground_truth:
            raise KeyError(f"COCO ground truth is missing {key!r}; it has {sorted(ground_truth)}")
    gt = {k: v for k, v in ground_truth.items()}
    image_sizes = {int(img["id"]): (int(img["height"]), int(img["width"])) for img in gt["images"]}
    ids = [a.get("id") for a in gt["annotations"]]
    renumber = any(i is None or int(i) <= 0 for i in ids) or len(set(ids)) != len(ids)
    annotations = []
    for k, ann in enumerate(gt["annotations"]):
        for key in ("image_id", "category_id"):
            if key not in ann:
                raise KeyError(f"COCO ground-truth annotations[{k}] is missing {key!r}")
        ann = dict(ann)
        if renumber:
            ann["id"] = k + 1  # pycocotools uses id 0 as "unmatched"
        ann.setdefault("iscrowd", 0)
        seg = ann.get("segmentation")
        if "segm" in iou_types and not seg:
            raise ValueError(f"segm evaluation needs 'segmentation' in ground-truth annotation {ann.get('id')}")
        if seg:
            h, w = image_sizes[int(ann["image_id"])]
            ann["segmentation"] = _compressed(segmentation_to_rle(seg, h, w, f"ground-truth annotation {ann.get('id')}"))
        if "bbox" not in ann:
            if not seg:
                raise KeyError(f"COCO ground-truth annotation {ann.get('id')} has neither bbox nor segmentation")
            ann["bbox"] = [float(v) for v in mask_utils.toBbox(ann["segmentation"])]
        if "area" not in ann:
            ann["area"] = float(mask_utils.area(ann["segmentation"])) if seg else float(ann["bbox"][2] * ann["bbox"][3])
        annotations.append(ann)
    gt["annotations"] = annotations
    gt.setdefault("info", {})
    return gt


def _compressed(rle: Mapping) -> dict:
    """A ``str``-counts RLE of :func:`segmentation_to_rle` with ``bytes`` counts, as pycocotools takes it."""
    return {"size": list(rle["size"]), "counts": rle["counts"].encode("ascii")}


def _results_coco(coco_gt, predictions: Sequence[Mapping], iou_type: str):
    """What ``COCO.loadRes`` does, without printing, accepting an empty list, and with the detectron2 rule that
    segm results are evaluated (areas included) on their masks, bbox results on their boxes."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    anns = []
    for k, p in enumerate(predictions):
        ann = {"image_id": int(p["image_id"]), "category_id": int(p["category_id"]), "score": float(p["score"])}
        if iou_type == "segm":
            seg = p.get("segmentation")
            if not seg:
                raise ValueError(f"segm evaluation needs 'segmentation' in every prediction (prediction {k})")
            h, w = (int(v) for v in seg["size"])
            rle = _compressed(segmentation_to_rle(seg, h, w, f"prediction {k}"))
            ann["segmentation"] = rle
            ann["area"] = float(mask_utils.area(rle))
            ann["bbox"] = [float(v) for v in mask_utils.toBbox(rle)]
        else:
            if p.get("bbox") is not None:
                x, y, w, h = (float(v) for v in p["bbox"])
            elif p.get("segmentation"):
                seg = p["segmentation"]
                rle = _compressed(segmentation_to_rle(seg, *seg["size"], f"prediction {k}"))
                x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
            else:
                raise ValueError(f"bbox evaluation needs 'bbox' (or 'segmentation') in prediction {k}")
            ann["bbox"] = [x, y, w, h]
            ann["area"] = w * h
            ann["segmentation"] = [[x, y, x, y + h, x + w, y + h, x + w, y]]
        ann["id"] = k + 1
        ann["iscrowd"] = 0
        anns.append(ann)
    res = COCO()
    res.dataset["info"] = copy.deepcopy(coco_gt.dataset.get("info", {}))
    res.dataset["images"] = list(coco_gt.dataset["images"])
    res.dataset["categories"] = copy.deepcopy(coco_gt.dataset["categories"])
    res.dataset["annotations"] = anns
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def compute_coco_metrics(
    ground_truth: Mapping,
    predictions: Sequence[Mapping],
    iou_types: Sequence[str] | None = ("bbox", "segm"),
    per_category: bool = True,
    max_dets: Sequence[int] = (1, 10, 100),
    verbose: bool = False,
) -> dict[str, float]:
    """COCO AP/AR through ``pycocotools.cocoeval.COCOeval``.

    Args:
        ground_truth: COCO dict with ``images`` (``id``, ``height``, ``width``), ``annotations`` (``id``,
            ``image_id``, ``category_id``, ``bbox`` xywh, ``area``, ``iscrowd``, ``segmentation`` polygon/RLE) and
            ``categories`` (``id``, ``name``). Missing ``area``/``bbox``/``iscrowd`` are filled in; annotation ids
            that are missing, duplicated or 0 are renumbered.
        predictions: COCO results: ``image_id``, ``category_id``, ``score``, ``bbox`` (xywh, absolute pixels),
            ``segmentation`` (compressed RLE, ``counts`` str or bytes). Not modified.
        iou_types: subset of ``("bbox", "segm")``; ``None`` = ``bbox`` plus ``segm`` when every prediction has a
            segmentation.
        per_category: add ``"<iou_type>_AP/<category name>"`` entries.
        max_dets: COCOeval ``maxDets`` (the last one is used for AP).
        verbose: let pycocotools print its summary.

    Returns:
        ``{"bbox_AP": ..., ..., "segm_ARl": ...}`` in ``[0, 1]``; ``nan`` where COCOeval reports -1 (no ground truth
        in that area range / category). Without any prediction every defined value is 0.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    predictions = list(predictions)
    if iou_types is None:
        iou_types = ["bbox"]
        if predictions and all(p.get("segmentation") for p in predictions):
            iou_types.append("segm")
    iou_types = list(iou_types)
    for t in iou_types:
        if t not in ("bbox", "segm"):
            raise ValueError(f"Unsupported iou_type {t!r}; use 'bbox' and/or 'segm'")
    gt = _prepare_ground_truth(ground_truth, iou_types)
    known_images = {int(img["id"]) for img in gt["images"]}
    unknown = sorted({int(p["image_id"]) for p in predictions} - known_images)
    if unknown:
        raise ValueError(f"Predictions refer to image ids not in the ground truth: {unknown[:10]}")
    known_cats = {int(c["id"]) for c in gt["categories"]}
    bad_cats = sorted({int(p["category_id"]) for p in predictions} - known_cats)
    if bad_cats:
        raise ValueError(f"Predictions use category ids not in the ground truth categories: {bad_cats[:10]}")

    out = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    results: dict[str, float] = {}
    with out:
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        names = {int(c["id"]): str(c.get("name", c["id"])) for c in gt["categories"]}
        for iou_type in iou_types:
            coco_dt = _results_coco(coco_gt, predictions, iou_type)
            ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
            ev.params.maxDets = list(max_dets)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            for name, value in zip(COCO_STAT_NAMES, ev.stats):
                results[f"{iou_type}_{name}"] = _nan_if_negative(value)
            if per_category:
                precision = ev.eval["precision"]  # [T, R, K, A, M]
                for k, cat_id in enumerate(ev.params.catIds):
                    p = precision[:, :, k, 0, -1]
                    p = p[p > -1]
                    results[f"{iou_type}_AP/{names[cat_id]}"] = float(p.mean()) if p.size else float("nan")
    return results


# ----------------------------------------------------------------------------------------------------------------
# Panoptic quality
# ----------------------------------------------------------------------------------------------------------------


def _id_map(x: Any) -> np.ndarray:
    """``(H, W)`` int id map from an id map, an ``(H, W, 3)`` COCO-panoptic-encoded array or a PIL image."""
    if hasattr(x, "convert") and hasattr(x, "size"):  # PIL image
        return panoptic_ids(x)
    arr = _to_numpy(x)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        return panoptic_ids(arr)
    if arr.ndim != 2:
        raise ValueError(f"Expected an (H, W) id map or an (H, W, 3) RGB-encoded map, got shape {arr.shape}")
    return arr.astype(np.int64)


def _segment_category(seg: Mapping) -> int:
    if "category_id" in seg and seg["category_id"] is not None:
        return int(seg["category_id"])
    if "label_id" in seg and seg["label_id"] is not None:
        return int(seg["label_id"])
    raise KeyError(f"Segment {seg.get('id')} has no 'category_id' (or 'label_id')")


class PanopticQualityAccumulator:
    """Streaming panoptic quality. ``update`` once per image, then ``compute``.

    Args:
        categories: ``[{"id", "name", "isthing"}, ...]`` (``name`` optional); every category id of the ground truth
            and of the predictions must be listed.
    """

    def __init__(self, categories: Sequence[Mapping]):
        if not categories:
            raise ValueError("categories must not be empty")
        self.categories = [
            {"id": int(c["id"]), "name": str(c.get("name", c["id"])), "isthing": int(c.get("isthing", 1))}
            for c in categories
        ]
        self._index = {c["id"]: i for i, c in enumerate(self.categories)}
        k = len(self.categories)
        self.iou = np.zeros(k, dtype=np.float64)
        self.tp = np.zeros(k, dtype=np.int64)
        self.fp = np.zeros(k, dtype=np.int64)
        self.fn = np.zeros(k, dtype=np.int64)
        self.num_images = 0

    def _cat_index(self, category_id: int, where: str) -> int:
        if category_id not in self._index:
            raise ValueError(f"{where} category id {category_id} is not in the categories {sorted(self._index)}")
        return self._index[category_id]

    def update(
        self,
        pred_map: Any,
        pred_segments: Sequence[Mapping],
        gt_map: Any,
        gt_segments: Sequence[Mapping],
    ) -> None:
        """Add one image (see :meth:`image_statistics`)."""
        self.add(self.image_statistics(pred_map, pred_segments, gt_map, gt_segments))

    def image_statistics(
        self,
        pred_map: Any,
        pred_segments: Sequence[Mapping],
        gt_map: Any,
        gt_segments: Sequence[Mapping],
    ) -> dict[str, list]:
        """The matches of one image, as :meth:`add` takes them: ``{"tp": [category index], "iou": [IoU of each
        match], "fp": [...], "fn": [...]}``. Small and picklable, so processes can compute them on their shard and
        one process adds them in image order (the same float sums as a single process).

        Args:
            pred_map, gt_map: ``(H, W)`` segment-id maps (numpy/torch), ``(H, W, 3)`` COCO-panoptic-encoded arrays or
                PIL images. Ground-truth id 0 is void; predicted ids <= 0 (0 or -1, as Transformers' post-processing
                writes) are "no segment".
            pred_segments: ``[{"id", "category_id"}]`` (``label_id`` is accepted instead of ``category_id``).
            gt_segments: ``[{"id", "category_id", "iscrowd" (optional)}]``.
        Segments without pixels are ignored; a positive id in a map that is not in its segments list is an error.
        """
        pred = _id_map(pred_map)
        gt = _id_map(gt_map)
        if pred.shape != gt.shape:
            raise ValueError(f"Prediction map {pred.shape} and ground-truth map {gt.shape} differ in size")

        def compact(id_map, segments, what):
            seg_ids = [int(s["id"]) for s in segments]
            if len(set(seg_ids)) != len(seg_ids):
                raise ValueError(f"Duplicate segment ids in {what} segments_info")
            uniq, inverse = np.unique(id_map, return_inverse=True)
            lookup = {sid: j + 1 for j, sid in enumerate(seg_ids)}
            table = np.zeros(len(uniq), dtype=np.int64)
            for u_idx, u in enumerate(uniq.tolist()):
                if u <= 0:
                    continue
                if u not in lookup:
                    raise ValueError(f"Segment id {u} is in the {what} map but not in its segments_info")
                table[u_idx] = lookup[u]
            return table[inverse.reshape(-1)], len(seg_ids)

        g, ng = compact(gt, gt_segments, "ground-truth")
        p, np_ = compact(pred, pred_segments, "predicted")
        inter = np.bincount(g * (np_ + 1) + p, minlength=(ng + 1) * (np_ + 1)).reshape(ng + 1, np_ + 1)
        gt_area = inter.sum(axis=1)
        pred_area = inter.sum(axis=0)
        gt_cat = [self._cat_index(_segment_category(s), "Ground-truth") for s in gt_segments]
        gt_crowd = [int(s.get("iscrowd", 0) or 0) for s in gt_segments]
        pred_cat = [self._cat_index(_segment_category(s), "Predicted") for s in pred_segments]

        stats: dict[str, list] = {"tp": [], "iou": [], "fp": [], "fn": []}
        gt_matched = np.zeros(ng + 1, dtype=bool)
        pred_matched = np.zeros(np_ + 1, dtype=bool)
        gi, pi = np.nonzero(inter[1:, 1:])
        for gj, pj in zip((gi + 1).tolist(), (pi + 1).tolist()):
            if gt_crowd[gj - 1] or gt_cat[gj - 1] != pred_cat[pj - 1]:
                continue
            union = pred_area[pj] + gt_area[gj] - inter[gj, pj] - inter[0, pj]
            iou = inter[gj, pj] / union
            if iou > 0.5:
                stats["tp"].append(gt_cat[gj - 1])
                stats["iou"].append(float(iou))
                gt_matched[gj] = True
                pred_matched[pj] = True
        for gj in range(1, ng + 1):
            if gt_area[gj] > 0 and not gt_matched[gj] and not gt_crowd[gj - 1]:
                stats["fn"].append(gt_cat[gj - 1])
        crowd_by_cat: dict[int, list[int]] = {}
        for gj in range(1, ng + 1):
            if gt_crowd[gj - 1]:
                crowd_by_cat.setdefault(gt_cat[gj - 1], []).append(gj)
        for pj in range(1, np_ + 1):
            if pred_area[pj] == 0 or pred_matched[pj]:
                continue
            c = pred_cat[pj - 1]
            ignored = inter[0, pj] + sum(inter[gj, pj] for gj in crowd_by_cat.get(c, []))
            if ignored / pred_area[pj] > 0.5:
                continue
            stats["fp"].append(c)
        return stats

    def add(self, stats: Mapping[str, Sequence]) -> None:
        """Add the :meth:`image_statistics` of one image."""
        for c, iou in zip(stats["tp"], stats["iou"], strict=True):
            self.tp[c] += 1
            self.iou[c] += iou
        for c in stats["fn"]:
            self.fn[c] += 1
        for c in stats["fp"]:
            self.fp[c] += 1
        self.num_images += 1

    def compute(self, per_category: bool = True) -> dict[str, float]:
        """``PQ, SQ, RQ`` over all categories with at least one TP, FP or FN, and over things (``_th``) and stuff
        (``_st``); ``nan`` when a group has none. Per category ``PQ/<name>``, ``SQ/<name>``, ``RQ/<name>``
        (``nan`` for categories absent from both ground truth and predictions)."""
        denom = self.tp + 0.5 * self.fp + 0.5 * self.fn
        valid = (self.tp + self.fp + self.fn) > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            pq = np.where(valid, self.iou / np.where(denom > 0, denom, 1), np.nan)
            sq = np.where(valid, np.where(self.tp > 0, self.iou / np.maximum(self.tp, 1), 0.0), np.nan)
            rq = np.where(valid, self.tp / np.where(denom > 0, denom, 1), np.nan)
        isthing = np.array([c["isthing"] for c in self.categories], dtype=bool)
        results: dict[str, float] = {}
        for suffix, sel in (("", np.ones_like(isthing)), ("_th", isthing), ("_st", ~isthing)):
            m = sel & valid
            for name, arr in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
                results[f"{name}{suffix}"] = float(arr[m].mean()) if m.any() else float("nan")
        if per_category:
            for i, c in enumerate(self.categories):
                for name, arr in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
                    results[f"{name}/{c['name']}"] = float(arr[i])
        return results


def compute_panoptic_quality(
    predictions: Iterable[tuple[Any, Sequence[Mapping]]] | Iterable[Mapping],
    references: Iterable[tuple[Any, Sequence[Mapping]]] | Iterable[Mapping],
    categories: Sequence[Mapping],
    per_category: bool = True,
) -> dict[str, float]:
    """Panoptic quality over a list of images.

    ``predictions`` and ``references`` are aligned per image; each item is ``(id_map, segments_info)`` or a dict
    with ``segments_info`` and the map under ``segmentation`` / ``panoptic`` / ``panoptic_seg``. Maps may be id
    maps, COCO-panoptic-encoded RGB arrays or PIL images. See :class:`PanopticQualityAccumulator`.
    """
    acc = PanopticQualityAccumulator(categories)
    for pred, ref in zip(predictions, references, strict=True):
        pm, ps = _unpack_panoptic(pred)
        gm, gs = _unpack_panoptic(ref)
        acc.update(pm, ps, gm, gs)
    return acc.compute(per_category=per_category)


def _unpack_panoptic(item: Any) -> tuple[Any, Sequence[Mapping]]:
    if isinstance(item, Mapping):
        for key in ("segmentation", "panoptic", "panoptic_seg"):
            if key in item:
                return item[key], item["segments_info"]
        raise KeyError(f"Panoptic item needs 'segmentation' (or 'panoptic') and 'segments_info'; got {sorted(item)}")
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    raise TypeError(f"Panoptic item must be (id_map, segments_info) or a dict, got {type(item).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# Semantic segmentation: mean IoU
# ----------------------------------------------------------------------------------------------------------------


class ConfusionMatrixAccumulator:
    """Streaming confusion matrix for semantic segmentation.

    ``matrix[gt, pred]`` over pixels whose label is not ``ignore_index``; predictions outside ``[0, num_labels)``
    land in an extra "invalid" column (they are errors for the true class but false positives of no class).
    """

    def __init__(self, num_labels: int, ignore_index: int = 255, id2label: Mapping[int, str] | None = None):
        if num_labels <= 0:
            raise ValueError(f"num_labels must be positive, got {num_labels}")
        self.num_labels = int(num_labels)
        self.ignore_index = ignore_index
        self.id2label = {int(k): str(v) for k, v in (id2label or {}).items()}
        self.matrix = np.zeros((self.num_labels, self.num_labels + 1), dtype=np.int64)

    def update(self, prediction: Any, reference: Any) -> None:
        """Add one image's ``(H, W)`` predicted and reference label maps."""
        self.add(self.image_counts(prediction, reference))

    def add(self, counts: tuple[np.ndarray, np.ndarray]) -> None:
        """Add the sparse counts of :meth:`image_counts`."""
        np.add.at(self.matrix.reshape(-1), counts[0], counts[1])

    def image_counts(self, prediction: Any, reference: Any) -> tuple[np.ndarray, np.ndarray]:
        """One image's confusion counts, sparse: ``(flat indices into matrix, counts)`` (integers: summing them in
        any order gives the same matrix)."""
        pred = _to_numpy(prediction).astype(np.int64)
        ref = _to_numpy(reference).astype(np.int64)
        if pred.shape != ref.shape:
            raise ValueError(f"Prediction {pred.shape} and reference {ref.shape} differ in shape")
        valid = ref != self.ignore_index if self.ignore_index is not None else np.ones(ref.shape, dtype=bool)
        ref = ref[valid]
        pred = pred[valid]
        if ref.size and (ref.min() < 0 or ref.max() >= self.num_labels):
            bad = sorted(set(np.unique(ref[(ref < 0) | (ref >= self.num_labels)]).tolist()))
            raise ValueError(f"Reference labels {bad[:10]} are outside [0, {self.num_labels}) and not ignore_index")
        pred = np.where((pred < 0) | (pred >= self.num_labels), self.num_labels, pred)
        k1 = self.num_labels + 1
        counts = np.bincount(ref * k1 + pred, minlength=self.num_labels * k1)
        indices = np.flatnonzero(counts)
        return indices, counts[indices]

    def compute(self, per_category: bool = True) -> dict[str, float]:
        m = self.matrix
        k = self.num_labels
        tp = np.diag(m[:, :k]).astype(np.float64)
        gt_count = m.sum(axis=1).astype(np.float64)
        pred_count = m[:, :k].sum(axis=0).astype(np.float64)
        union = gt_count + pred_count - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)
            acc = np.where(gt_count > 0, tp / np.where(gt_count > 0, gt_count, 1), np.nan)
        total = gt_count.sum()
        present = union > 0
        in_gt = gt_count > 0
        results = {
            "mIoU": float(iou[present].mean()) if present.any() else float("nan"),
            "fwIoU": float((gt_count[in_gt] * iou[in_gt]).sum() / total) if total > 0 else float("nan"),
            "mACC": float(acc[in_gt].mean()) if in_gt.any() else float("nan"),
            "pACC": float(tp.sum() / total) if total > 0 else float("nan"),
        }
        if per_category:
            for i in range(k):
                name = self.id2label.get(i, str(i))
                results[f"IoU/{name}"] = float(iou[i])
            for i in range(k):
                name = self.id2label.get(i, str(i))
                results[f"ACC/{name}"] = float(acc[i])
        return results


def compute_mean_iou(
    predictions: Iterable[Any],
    references: Iterable[Any],
    num_labels: int,
    ignore_index: int = 255,
    id2label: Mapping[int, str] | None = None,
    per_category: bool = True,
) -> dict[str, float]:
    """Mean IoU of semantic label maps (each an ``(H, W)`` array/tensor of class ids; reference pixels equal to
    ``ignore_index`` are skipped). Per class ``IoU = TP / (TP + FP + FN)``; ``mIoU`` averages the classes that appear
    in the ground truth or the prediction. See :class:`ConfusionMatrixAccumulator`."""
    acc = ConfusionMatrixAccumulator(num_labels, ignore_index=ignore_index, id2label=id2label)
    for pred, ref in zip(predictions, references, strict=True):
        acc.update(pred, ref)
    return acc.compute(per_category=per_category)


# ----------------------------------------------------------------------------------------------------------------
# Evaluating a model on a data set
# ----------------------------------------------------------------------------------------------------------------

# The data set columns each task evaluates against (any one of them).
TASK_COLUMNS = {
    "instance": ("objects", "segments_info"),
    "detection": ("objects", "segments_info"),
    "panoptic": ("segments_info",),
    "semantic": ("semantic",),
}


def tasks_for_dataset(task: str | Sequence[str], columns: Sequence[str]) -> list[str]:
    """The tasks to evaluate: ``"all"`` = instance (objects, or the things of a panoptic annotation), panoptic and
    semantic, as far as the data set has the annotations; otherwise the named task(s), each checked."""
    if task == "all":
        tasks = [t for t in ("instance", "panoptic", "semantic") if any(c in columns for c in TASK_COLUMNS[t])]
        if not tasks:
            raise ValueError(f"the data set has no objects, panoptic or semantic annotations (columns {list(columns)})")
        return tasks
    tasks = [task] if isinstance(task, str) else list(task)
    for name in tasks:
        if name not in TASK_COLUMNS:
            raise ValueError(f"unknown evaluation task {name!r}; choose from {('all', *EVAL_TASKS)}")
        if not any(c in columns for c in TASK_COLUMNS[name]):
            raise ValueError(f"task {name!r} needs the {' or '.join(TASK_COLUMNS[name])} annotations, which the data "
                             f"set lacks (columns {list(columns)})")
    return tasks


def label_to_category_mapping(id2label: Mapping[int, str], categories: Sequence[Mapping]) -> dict[int, int]:
    """Model label id -> data set category id, the one mapping of training and evaluation: by name when the class
    names of one side all appear on the other (model classes missing from the data set are left out), else identity
    (when every category id is a label id)."""
    by_name = {str(c["name"]): int(c["id"]) for c in categories}
    by_label = {int(label): by_name[str(name)] for label, name in id2label.items() if str(name) in by_name}
    if by_label and (len(by_label) == len(id2label) or set(by_label.values()) == set(by_name.values())):
        return by_label
    ids = {int(c["id"]) for c in categories}
    if id2label and ids <= {int(label) for label in id2label}:
        return {int(label): int(label) for label in id2label if int(label) in ids}
    raise ValueError(
        f"cannot map the model's classes {sorted(map(str, id2label.values()))[:10]} to the data set's categories "
        f"{sorted(by_name)[:10]}: the names differ and the category ids are not label ids"
    )


def load_eval_dataset(data: str | Path, split: str = "validation"):
    """``(dataset, categories)`` from a COCO-format folder (``images/``, ``annotations/...``: taken whatever
    ``split``), a folder of ``<split>/`` COCO folders, or a ``datasets`` ``save_to_disk`` folder (a ``DatasetDict``:
    ``split`` is taken). Categories as :func:`maskdino_hf.training.dataset_categories` finds them."""
    from .training import dataset_categories, load_dataset_splits

    path = Path(data).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--data {path}: not found")
    if not path.is_dir():
        raise ValueError(f"--data {path}: expected a folder (COCO format or datasets save_to_disk)")
    splits = load_dataset_splits(path)
    if split in splits:
        dataset = splits[split]
    elif (path / "images").is_dir() or (path / "state.json").is_file():  # one data set: whatever the split
        dataset = next(iter(splits.values()))
    else:
        raise ValueError(f"--data {path} has no split {split!r}; it has {sorted(splits)}")
    return dataset, dataset_categories(splits, path, split)


class DatasetEvaluator:
    """Turns each image's prediction (the format of the predict helpers: ``{task: result}``) and its data set row
    into a small picklable record, and computes COCO box/mask AP, panoptic quality and mean IoU from the records.

    Args:
        tasks: subset of ``instance`` (box + mask AP), ``detection`` (box AP; ``det_``-prefixed beside ``instance``),
            ``panoptic`` (PQ), ``semantic`` (mIoU).
        categories: ``[{"id", "name", "isthing"}]`` of the data set.
        label_to_category: model label id -> category id (labels missing from it are dropped; see
            :func:`label_to_category_mapping`).
        num_labels, id2label: of the model (mean IoU is computed over the model's label ids).
        ignore_index: void value of the data set's semantic maps.
    """

    def __init__(self, tasks, categories, label_to_category, num_labels, id2label=None, ignore_index=IGNORE_INDEX):
        self.tasks = list(tasks)
        self.categories = [
            {"id": int(c["id"]), "name": str(c.get("name", c["id"])), "isthing": int(c.get("isthing", 1))}
            for c in categories
        ]
        self.things = [c for c in self.categories if c["isthing"]]
        self.label_to_category = {int(k): int(v) for k, v in label_to_category.items()}
        self.num_labels = int(num_labels)
        self.id2label = dict(id2label or {})
        self.ignore_index = ignore_index
        self.panoptic = PanopticQualityAccumulator(self.categories) if "panoptic" in self.tasks else None
        # semantic ground truth holds category ids: a lookup table to label ids (unknown -> ignore)
        size = max([256, ignore_index + 1] + [c["id"] + 1 for c in self.categories])
        self._category_to_label = np.full(size, ignore_index, dtype=np.int64)
        for label, category in self.label_to_category.items():
            if 0 <= category < size:
                self._category_to_label[category] = label
        self._category_to_label[ignore_index] = ignore_index

    def image_record(self, row: Mapping[str, Any], prediction: Mapping[str, Any]) -> dict[str, Any]:
        """One image's record: its COCO image entry and instance annotations, its COCO results per box/mask task,
        its panoptic match statistics and its sparse semantic confusion counts."""
        record: dict[str, Any] = {}
        image_id = int(row["image_id"])
        coco_tasks = [t for t in ("instance", "detection") if t in self.tasks]
        if coco_tasks:
            record["image"] = {"image_id": image_id, "width": int(row["width"]), "height": int(row["height"]),
                               "file_name": row.get("file_name") or "", "objects": instance_annotations(row)}
        for task in coco_tasks:
            item = prediction[task]
            labels = _to_numpy(item["labels"]).reshape(-1)
            keep = np.array([int(label) in self.label_to_category for label in labels], dtype=bool)
            masks = item.get("masks") if task == "instance" else None
            record[task] = instances_to_coco_results(
                image_id,
                _to_numpy(item["scores"]).reshape(-1)[keep],
                labels[keep],
                masks=None if masks is None else _to_numpy(masks)[keep],
                boxes=_to_numpy(item["boxes"]).reshape(-1, 4)[keep],
                label_to_category_id=self.label_to_category,
            )
        if self.panoptic is not None:
            item = prediction["panoptic"]
            segmentation = _to_numpy(item["segmentation"]).astype(np.int64)
            segments = []
            for segment in item["segments_info"]:
                label = int(segment.get("label_id", segment.get("category_id")))
                if label not in self.label_to_category:
                    segmentation[segmentation == int(segment["id"])] = 0
                    continue
                segments.append({"id": int(segment["id"]), "category_id": self.label_to_category[label]})
            record["panoptic"] = self.panoptic.image_statistics(
                segmentation, segments, row["panoptic"], row["segments_info"]
            )
        if "semantic" in self.tasks:
            reference = _to_numpy(row["semantic"]).astype(np.int64)  # L, P or 16-bit maps of class ids
            if reference.ndim != 2:
                raise ValueError(f"image {image_id}: the semantic map must be one channel of class ids, got shape "
                                 f"{reference.shape}")
            unknown = sorted(set(np.unique(reference).tolist()) - {c["id"] for c in self.categories} - {self.ignore_index})
            if unknown:
                raise ValueError(f"image {image_id}: the semantic map has class ids {unknown[:10]} that are neither "
                                 f"categories {[c['id'] for c in self.categories][:20]} nor {self.ignore_index} (ignore)")
            reference = self._category_to_label[reference]
            record["semantic"] = self._semantic_accumulator().image_counts(_to_numpy(prediction["semantic"]), reference)
        return record

    def _semantic_accumulator(self) -> ConfusionMatrixAccumulator:
        return ConfusionMatrixAccumulator(self.num_labels, ignore_index=self.ignore_index, id2label=self.id2label)

    def compute(self, records: Sequence[Mapping[str, Any]], per_category: bool = True) -> dict[str, float]:
        """The metrics of all records (in data set order)."""
        metrics: dict[str, float] = {}
        if any(t in self.tasks for t in ("instance", "detection")):
            ground_truth = dataset_to_coco_instances([r["image"] for r in records], self.things)
            known = {c["id"] for c in self.things}
            for task, iou_types in (("instance", ("bbox", "segm")), ("detection", ("bbox",))):
                if task not in self.tasks:
                    continue
                predictions = [p for r in records for p in r[task] if p["category_id"] in known]
                values = compute_coco_metrics(ground_truth, predictions, iou_types=iou_types, per_category=per_category)
                if task == "detection" and "instance" in self.tasks:  # keep the instance head's box AP, add this one
                    values = {f"det_{k}": v for k, v in values.items()}
                metrics.update(values)
        if self.panoptic is not None:
            panoptic = PanopticQualityAccumulator(self.categories)
            for record in records:
                panoptic.add(record["panoptic"])
            metrics.update(panoptic.compute(per_category=per_category))
        if "semantic" in self.tasks:
            semantic = self._semantic_accumulator()
            for record in records:
                semantic.add(record["semantic"])
            metrics.update(semantic.compute(per_category=per_category))
        return metrics


def process_state():
    """Accelerate's process state (one process unless started by `accelerate launch`), set up as an `Accelerator`
    would set it up (`ACCELERATE_USE_CPU` runs CPU processes over gloo)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def _dataset_row(dataset: Any, index: int) -> dict:
    """Row ``index`` of a data set (or a list of rows), with its image as RGB; an image that cannot be decoded is
    a ``ValueError`` naming the row and its file."""
    try:
        row = dict(dataset[int(index)])
        image = row["image"]
        row["image"] = image.convert("RGB") if hasattr(image, "convert") else PILImage.fromarray(np.asarray(image)).convert("RGB")
    except (OSError, SyntaxError) as error:
        columns = getattr(dataset, "column_names", ())
        name = dataset.select_columns(["file_name"])[int(index)]["file_name"] if "file_name" in columns else ""
        raise ValueError(f"row {index} ({name or 'no file_name'}) of the data set: cannot decode its image: {error}") from None
    return row


def _load_rows(dataset: Any, preprocess: Callable[[Sequence[Any]], Any] | None,
               indices: Sequence[int]) -> tuple[list[dict], Any, str | None]:
    """DataLoader side of :func:`evaluate`: ``(rows, inputs, error)`` of a batch, its images decoded and, with a
    ``preprocess`` (:attr:`maskdino_hf.predict.ModelPredictor.preprocess`), preprocessed (``None`` when that
    fails: the predictor then raises the error in the main process); ``error`` is the message of a row that cannot
    be decoded, raised by the main process."""
    try:
        rows = [_dataset_row(dataset, index) for index in indices]
    except ValueError as error:
        return [], None, str(error)
    inputs = None
    if preprocess is not None:
        try:
            inputs = preprocess([row["image"] for row in rows])
        except (ValueError, RuntimeError):
            inputs = None
    return rows, inputs, None


def _image_sizes(dataset: Any, count: int) -> list[tuple[int, int] | None]:
    """``(height, width)`` of the first ``count`` images, read without decoding them where the data set allows,
    to batch similar sizes together (:func:`maskdino_hf.predict.plan_batches`)."""
    from .predict import encoded_image_size, undecoded_images

    encoded = undecoded_images(dataset)
    if encoded is not None:
        return [encoded_image_size(image) for image in encoded[:count]["image"]]
    return [encoded_image_size(dataset[index]["image"]) for index in range(count)]


def evaluate(
    model,
    processor,
    dataset: Any,
    tasks: str | Sequence[str] = "all",
    *,
    categories: Sequence[Mapping] | None = None,
    label_to_category: Mapping[int, int] | None = None,
    batch_size: int = 1,
    max_images: int | None = None,
    bf16: bool = False,
    predict_fn: Callable[[Sequence[Any], Sequence[Mapping]], list[dict[str, Any]]] | None = None,
    per_category: bool = True,
    progress: bool = False,
    num_workers: int = 0,
) -> dict[str, float]:
    """COCO box/mask AP, PQ and mIoU of ``model`` on ``dataset`` (a :class:`datasets.Dataset` in the column layout
    of :mod:`maskdino_hf.data`, or a list of such rows).

    Args:
        tasks: ``"all"`` (every annotation the data set has) or task names of :data:`EVAL_TASKS`.
        categories: the data set's ``[{"id", "name", "isthing"}]`` (default: the model's labels, stuff from
            ``config.stuff_labels``).
        label_to_category: model label -> category id (default: :func:`label_to_category_mapping`).
        batch_size: images per forward pass (per process), images of similar sizes batched together
            (:func:`maskdino_hf.predict.plan_batches`); ``max_images``: the first N images only.
        bf16: run the model under bfloat16 autocast.
        predict_fn: ``(images, rows) -> [{task: result}]`` in place of the model's predict helper (e.g. the ground
            truth, to check the metrics).
        progress: show a progress bar and, at the end, the images per second (on stderr, main process).
        num_workers: DataLoader worker processes decoding (and, for the model's own predictor, preprocessing) the
            next batches while the model runs; 0: all in this process.

    Under Accelerate (``accelerate launch``) each process predicts its share of the batches; the records are gathered
    and the metrics, computed once on the main process in data set order, are returned on every process. The batch
    plan depends on the images only, so the metrics do not depend on the number of processes either.
    """
    from accelerate.utils import broadcast_object_list, gather_object
    from tqdm.auto import tqdm

    from .predict import ModelPredictor, load_batches, model_predict_fn, plan_batches

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1 (or None for all), got {max_images}")
    if len(dataset) == 0:
        raise ValueError("the data set to evaluate has no rows")
    columns = getattr(dataset, "column_names", None) or list(dataset[0])
    tasks = tasks_for_dataset(tasks, columns)
    id2label = {int(k): str(v) for k, v in (model.config.id2label or {}).items()}
    if categories is None:
        stuff = {int(label) for label in getattr(model.config, "stuff_labels", None) or ()}
        categories = [{"id": k, "name": v, "isthing": int(k not in stuff)} for k, v in sorted(id2label.items())]
    if label_to_category is None:
        label_to_category = label_to_category_mapping(id2label, categories)
    evaluator = DatasetEvaluator(tasks, categories, label_to_category, model.config.num_labels, id2label,
                                 getattr(processor, "ignore_index", IGNORE_INDEX))
    if predict_fn is None:
        predict_fn = model_predict_fn(model, processor, tasks, str(model.device), threshold=None, bf16=bf16)
    preprocess = predict_fn.preprocess if isinstance(predict_fn, ModelPredictor) else None
    count = len(dataset) if max_images is None else min(len(dataset), max_images)
    start = time.perf_counter()
    batches = plan_batches(_image_sizes(dataset, count) if batch_size > 1 else [None] * count, batch_size)
    state = process_state()
    was_training = model.training
    model.eval()
    records = []
    try:
        with state.split_between_processes(batches) as shard:
            loader = load_batches(shard, partial(_load_rows, dataset, preprocess), num_workers)
            bar = tqdm(loader, desc="evaluate", unit="batch", disable=not progress or not state.is_main_process)
            for indices, (rows, inputs, error) in zip(shard, bar, strict=True):
                if error is not None:
                    raise ValueError(error)
                images = [row["image"] for row in rows]
                predictions = predict_fn(images, rows, inputs=inputs) if preprocess else predict_fn(images, rows)
                for index, row, prediction in zip(indices, rows, predictions, strict=True):
                    records.append((index, evaluator.image_record(row, prediction)))
    except Exception as error:  # noqa: BLE001  (the other processes must not wait for this one forever)
        if state.num_processes == 1:
            raise
        records.append((-1, f"{type(error).__name__}: {error}"))
    finally:
        model.train(was_training)
    if state.num_processes > 1:
        records = gather_object(records)
        failures = [record for index, record in records if index == -1]
        if failures:
            raise ValueError(f"evaluation failed on {len(failures)} process(es): {failures[0]}")
    metrics = None
    if state.is_main_process:
        metrics = evaluator.compute([record for _, record in sorted(records, key=lambda item: item[0])], per_category)
    if state.num_processes > 1:
        metrics = broadcast_object_list([metrics])[0]
    if progress and state.is_main_process:
        seconds = time.perf_counter() - start
        print(f"evaluated {count} image(s) in {seconds:.1f} s: {count / seconds:.2f} images/s (batch size "
              f"{batch_size}, {state.num_processes} process(es), {num_workers} loader worker(s) each)", file=sys.stderr)
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------------------------


def _fmt(v: Any, percent: bool) -> str:
    if isinstance(v, (int, float, np.floating, np.integer)):
        v = float(v)
        if math.isnan(v):
            return "-"
        return f"{100 * v:.2f}" if percent else f"{v:.4f}"
    return str(v)


def format_metrics_table(metrics: Mapping[str, Any], title: str | None = None, percent: bool = True) -> str:
    """Summary metrics as a two-column table, then per-category entries (``"<metric>/<name>"``) as a grid with one
    row per category. Values are shown in percent by default; ``nan`` shows as ``-``."""
    summary = [(k, v) for k, v in metrics.items() if "/" not in k]
    per_cat: dict[str, dict[str, Any]] = {}
    metric_names: list[str] = []
    for k, v in metrics.items():
        if "/" in k:
            metric, name = k.split("/", 1)
            per_cat.setdefault(name, {})[metric] = v
            if metric not in metric_names:
                metric_names.append(metric)
    lines = []
    if title:
        lines.append(title)
    if summary:
        w = max(len("metric"), *(len(k) for k, _ in summary))
        lines.append(f"{'metric':<{w}} | value")
        lines.append(f"{'-' * w}-+-{'-' * 7}")
        lines += [f"{k:<{w}} | {_fmt(v, percent):>7}" for k, v in summary]
    if per_cat:
        if summary:
            lines.append("")
        w = max(len("category"), *(len(n) for n in per_cat))
        widths = [max(7, len(m)) for m in metric_names]
        lines.append(f"{'category':<{w}} | " + " | ".join(f"{m:>{cw}}" for m, cw in zip(metric_names, widths)))
        lines.append(f"{'-' * w}-+-" + "-+-".join("-" * cw for cw in widths))
        for name, vals in per_cat.items():
            cells = [f"{_fmt(vals[m], percent) if m in vals else '':>{cw}}" for m, cw in zip(metric_names, widths)]
            lines.append(f"{name:<{w}} | " + " | ".join(cells))
    return "\n".join(lines)


def print_metrics_table(
    metrics: Mapping[str, Any], title: str | None = None, percent: bool = True, file: TextIO | None = None
) -> None:
    """Print :func:`format_metrics_table` (to stdout by default)."""
    print(format_metrics_table(metrics, title=title, percent=percent), file=file or sys.stdout)


# ----------------------------------------------------------------------------------------------------------------
# evaluate modules
# ----------------------------------------------------------------------------------------------------------------


def conform_to_schema(obj: Any, schema: Any) -> Any:
    """Reshape ``obj`` to a :mod:`datasets` feature schema for ``evaluate``'s strict input checks: dict keys missing
    from ``obj`` become ``None``, keys not in the schema are dropped, ``None`` lists become ``[]``, tensors become
    numpy arrays. Used by the bundled ``evaluate`` modules so that e.g. box-only predictions or Transformers'
    ``segments_info`` (with ``label_id``/``score``/``was_fused``) can be passed as they are."""
    import datasets

    if hasattr(obj, "detach"):
        obj = obj.detach().cpu().numpy()
    if isinstance(schema, dict):
        if obj is None:
            return None
        if not isinstance(obj, Mapping):
            raise TypeError(f"Expected a dict with keys {sorted(schema)}, got {type(obj).__name__}")
        return {k: conform_to_schema(obj.get(k), sub) for k, sub in schema.items()}
    if isinstance(schema, (datasets.List, datasets.LargeList)):
        if obj is None:
            return []
        if isinstance(obj, np.ndarray):
            return obj
        return [conform_to_schema(o, schema.feature) for o in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def metric_path(name: str) -> str:
    """Local directory of one of the bundled ``evaluate`` modules."""
    if name not in AVAILABLE_METRICS:
        raise ValueError(f"Unknown metric {name!r}; available: {AVAILABLE_METRICS}")
    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        raise FileNotFoundError(f"Metric script not found: {path / (name + '.py')}")
    return str(path)


def load_metric(name: str, **kwargs: Any):
    """``evaluate.load`` of a bundled metric (``coco_detection``, ``panoptic_quality``, ``mean_iou``) from its local
    directory; needs no network. ``kwargs`` go to ``evaluate.load`` (e.g. ``keep_in_memory=True``,
    ``experiment_id``)."""
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)


def schema_conforming_metric(
    features: Any, description: str, citation: str, inputs_description: str, reference_urls: Sequence[str] = ()
):
    """An `evaluate.Metric` base with its `MetricInfo`, whose `add`/`add_batch` reshape inputs to `features` (see
    `conform_to_schema`): evaluate 0.4 rejects missing or extra keys, so box-only predictions or Transformers'
    `segments_info` could not be passed as they are. Imported lazily so `evaluate` stays optional for the package."""
    import evaluate

    class SchemaConformingMetric(evaluate.Metric):
        def _info(self):
            return evaluate.MetricInfo(description=description, citation=citation,
                                       inputs_description=inputs_description, features=features,
                                       reference_urls=list(reference_urls))

        def add_batch(self, *, predictions=None, references=None, **kwargs):
            """Add a batch of predictions and references, reshaped to the metric's features first."""
            if predictions is not None:
                predictions = [conform_to_schema(p, features["predictions"]) for p in predictions]
            if references is not None:
                references = [conform_to_schema(r, features["references"]) for r in references]
            return super().add_batch(predictions=predictions, references=references, **kwargs)

        def add(self, *, prediction=None, reference=None, **kwargs):
            """Add one prediction and reference, reshaped to the metric's features first."""
            if prediction is not None:
                prediction = conform_to_schema(prediction, features["predictions"])
            if reference is not None:
                reference = conform_to_schema(reference, features["references"])
            return super().add(prediction=prediction, reference=reference, **kwargs)

    return SchemaConformingMetric
