"""Panoptic quality (PQ, SQ, RQ) as an `evaluate` metric.

Load offline with ``maskdino_hf.evaluation.load_metric("panoptic_quality")`` or
``evaluate.load("<path to this folder>")``. The computation lives in :mod:`maskdino_hf.evaluation`.
"""

import datasets
import evaluate
import numpy as np

from maskdino_hf.evaluation import compute_panoptic_quality, schema_conforming_metric

_DESCRIPTION = """Panoptic quality (Kirillov et al.): segments of the same category match when IoU > 0.5;
PQ = sum(IoU of matches) / (TP + FP/2 + FN/2), SQ = mean IoU of matches, RQ = TP / (TP + FP/2 + FN/2), averaged over
categories, overall, things (_th) and stuff (_st). Ground-truth id 0 is void; predictions lying mostly on void or on
a crowd region of their category are not false positives. Values are in [0, 1]."""

_CITATION = """@inproceedings{kirillov2019panoptic,
  title={Panoptic Segmentation}, author={Kirillov, Alexander and He, Kaiming and Girshick, Ross and Rother, Carsten
  and Doll{\\'a}r, Piotr}, booktitle={CVPR}, year={2019}}"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one dict per image `{"segmentation": (H, W) segment-id map, "segments_info": [{"id",
        "category_id"}]}` (`label_id` accepted instead of `category_id`, as in Transformers' post-processing;
        ids <= 0 mean "no segment").
    references: one dict per image `{"segmentation": (H, W) id map (0 = void), "segments_info": [{"id",
        "category_id", "iscrowd"}]}`.
    categories: `[{"id", "name", "isthing"}]` listing every category id used (required).
    per_category: add "PQ/<name>", "SQ/<name>", "RQ/<name>" entries (default True).
Returns:
    dict of floats: PQ, SQ, RQ, PQ_th, SQ_th, RQ_th, PQ_st, SQ_st, RQ_st and per-category entries.
"""

_FEATURES = datasets.Features(
    {
        "predictions": {
            "segmentation": datasets.List(datasets.List(datasets.Value("int64"))),
            "segments_info": datasets.List(
                {
                    "id": datasets.Value("int64"),
                    "category_id": datasets.Value("int64"),
                    "label_id": datasets.Value("int64"),
                }
            ),
        },
        "references": {
            "segmentation": datasets.List(datasets.List(datasets.Value("int64"))),
            "segments_info": datasets.List(
                {
                    "id": datasets.Value("int64"),
                    "category_id": datasets.Value("int64"),
                    "iscrowd": datasets.Value("int64"),
                }
            ),
        },
    }
)

_REFERENCE_URLS = ["https://github.com/cocodataset/panopticapi"]


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PanopticQuality(schema_conforming_metric(_FEATURES, _DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION, _REFERENCE_URLS)):
    def _compute(self, predictions, references, categories=None, per_category=True):
        if categories is None:
            raise ValueError("panoptic_quality needs categories=[{'id', 'name', 'isthing'}, ...] in compute()")
        preds = [(np.asarray(p["segmentation"], dtype=np.int64), p["segments_info"] or []) for p in predictions]
        refs = [(np.asarray(r["segmentation"], dtype=np.int64), r["segments_info"] or []) for r in references]
        return compute_panoptic_quality(preds, refs, categories, per_category=per_category)
