"""COCO box and mask AP (pycocotools COCOeval) as an `evaluate` metric.

Load offline with ``maskdino_hf.evaluation.load_metric("coco_detection")`` or
``evaluate.load("<path to this folder>")``. The computation lives in :mod:`maskdino_hf.evaluation` (this script is
copied into the `evaluate` modules cache, so it imports the installed package rather than relative files).
"""

import datasets
import evaluate

from maskdino_hf.data import dataset_to_coco_instances
from maskdino_hf.evaluation import compute_coco_metrics, schema_conforming_metric

_DESCRIPTION = """COCO average precision / recall for boxes (`bbox`) and masks (`segm`) through pycocotools' COCOeval.
Values are in [0, 1]; nan where COCOeval reports -1 (no ground truth in an area range or category)."""

_CITATION = """@inproceedings{lin2014microsoft,
  title={Microsoft COCO: Common Objects in Context},
  author={Lin, Tsung-Yi and Maire, Michael and Belongie, Serge and Hays, James and Perona, Pietro and Ramanan, Deva
  and Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  booktitle={ECCV}, year={2014}}"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one list per image of detections `{"category_id", "score", "bbox" [x, y, w, h] (absolute pixels),
        "segmentation" {"size": [h, w], "counts": str} (compressed RLE, optional)}`; an `image_id` key, if given,
        must equal the reference's.
    references: one dict per image `{"image_id", "height", "width", "objects": [{"bbox", "category_id",
        "segmentation", "area", "iscrowd", "id" (optional)}]}` (the columns of the maskdino_hf data sets).
    categories: optional `[{"id", "name"}]`; default: every category id seen in the references.
    iou_types: optional subset of ("bbox", "segm"); default bbox, plus segm when every prediction has a mask.
    per_category: add "<iou_type>_AP/<name>" entries (default True).
Returns:
    dict of floats: bbox_AP, bbox_AP50, bbox_AP75, bbox_APs, bbox_APm, bbox_APl, bbox_AR1, bbox_AR10, bbox_AR100,
    bbox_ARs, bbox_ARm, bbox_ARl (same with segm_) and per-category APs.
Examples:
    >>> from maskdino_hf.evaluation import load_metric
    >>> metric = load_metric("coco_detection")
    >>> rle = {"size": [4, 4], "counts": "02208"}
    >>> ref = {"image_id": 1, "height": 4, "width": 4, "objects": [
    ...     {"id": 1, "bbox": [0.0, 0.0, 2.0, 2.0], "category_id": 0, "segmentation": rle, "area": 4.0, "iscrowd": 0}]}
    >>> pred = [{"category_id": 0, "score": 0.9, "bbox": [0.0, 0.0, 2.0, 2.0], "segmentation": rle}]
    >>> round(metric.compute(predictions=[pred], references=[ref])["bbox_AP"], 6)
    1.0
"""

_RLE = {"size": datasets.List(datasets.Value("int64"), length=2), "counts": datasets.Value("string")}
_FEATURES = datasets.Features(
    {
        "predictions": datasets.List(
            {
                "image_id": datasets.Value("int64"),
                "category_id": datasets.Value("int64"),
                "score": datasets.Value("float64"),
                "bbox": datasets.List(datasets.Value("float64"), length=4),
                "segmentation": _RLE,
            }
        ),
        "references": {
            "image_id": datasets.Value("int64"),
            "height": datasets.Value("int64"),
            "width": datasets.Value("int64"),
            "objects": datasets.List(
                {
                    "id": datasets.Value("int64"),
                    "bbox": datasets.List(datasets.Value("float64"), length=4),
                    "category_id": datasets.Value("int64"),
                    "segmentation": _RLE,
                    "area": datasets.Value("float64"),
                    "iscrowd": datasets.Value("int64"),
                }
            ),
        },
    }
)

_REFERENCE_URLS = ["https://cocodataset.org/#detection-eval"]


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CocoDetection(schema_conforming_metric(_FEATURES, _DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION, _REFERENCE_URLS)):
    def _compute(self, predictions, references, categories=None, iou_types=None, per_category=True):
        results = []
        for ref, preds in zip(references, predictions):
            for det in preds or []:
                if det.get("image_id") is not None and int(det["image_id"]) != int(ref["image_id"]):
                    raise ValueError(f"A prediction has image_id {det['image_id']} but its reference has {ref['image_id']}")
                res = {"image_id": int(ref["image_id"]), "category_id": int(det["category_id"]), "score": float(det["score"])}
                for key in ("bbox", "segmentation"):
                    if det.get(key) is not None:
                        res[key] = det[key]
                results.append(res)
        if categories is None:
            ids = {int(o["category_id"]) for ref in references for o in ref["objects"] or []}
            categories = [{"id": i, "name": str(i)} for i in sorted(ids | {r["category_id"] for r in results})]
        ground_truth = dataset_to_coco_instances(
            [{**ref, "objects": ref["objects"] or []} for ref in references], categories
        )
        return compute_coco_metrics(ground_truth, results, iou_types=iou_types, per_category=per_category)
