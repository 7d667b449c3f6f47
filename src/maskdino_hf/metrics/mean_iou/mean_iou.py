"""Semantic segmentation mean IoU as an `evaluate` metric.

Load offline with ``maskdino_hf.evaluation.load_metric("mean_iou")`` or ``evaluate.load("<path to this folder>")``.
The computation lives in :mod:`maskdino_hf.evaluation`.
"""

import datasets
import evaluate
import numpy as np

from maskdino_hf.evaluation import compute_mean_iou, schema_conforming_metric

_DESCRIPTION = """Mean intersection over union of semantic label maps from a confusion matrix over all images:
IoU = TP / (TP + FP + FN) per class, mIoU over the classes present in ground truth or prediction; pixels whose
reference is `ignore_index` are skipped. Also fwIoU, mACC (mean class accuracy) and pACC (pixel accuracy)."""

_CITATION = ""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one (H, W) map of predicted class ids per image.
    references: one (H, W) map of ground-truth class ids per image (`ignore_index` = not evaluated).
    num_labels: number of classes (required).
    ignore_index: reference value to skip (default 255).
    id2label: optional {class id: name} for the per-class entries.
    per_category: add "IoU/<name>" and "ACC/<name>" entries (default True).
Returns:
    dict of floats: mIoU, fwIoU, mACC, pACC and per-class entries (nan for classes absent from both maps).
"""

_FEATURES = datasets.Features(
    {
        "predictions": datasets.List(datasets.List(datasets.Value("int64"))),
        "references": datasets.List(datasets.List(datasets.Value("int64"))),
    }
)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanIoU(schema_conforming_metric(_FEATURES, _DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION)):
    def _compute(self, predictions, references, num_labels=None, ignore_index=255, id2label=None, per_category=True):
        if num_labels is None:
            raise ValueError("mean_iou needs num_labels in compute()")
        preds = [np.asarray(p, dtype=np.int64) for p in predictions]
        refs = [np.asarray(r, dtype=np.int64) for r in references]
        return compute_mean_iou(preds, refs, num_labels, ignore_index=ignore_index, id2label=id2label,
                                per_category=per_category)
