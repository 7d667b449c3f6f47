"""Metrics: COCO box/mask AP, panoptic quality, mean IoU (hand-checked cases) and their offline `evaluate` modules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from maskdino_hf.data import dataset_to_coco_instances, mask_to_rle, panoptic_ids
from maskdino_hf.evaluation import (
    COCO_STAT_NAMES,
    compute_coco_metrics,
    compute_mean_iou,
    compute_panoptic_quality,
    format_metrics_table,
    instances_to_coco_results,
    load_metric,
    metric_path,
    print_metrics_table,
)
from maskdino_hf.synthetic import SHAPES_CATEGORIES, generate_shapes_split, id2label

THINGS = [c for c in SHAPES_CATEGORIES if c["isthing"]]


@pytest.fixture(scope="module")
def val():
    return generate_shapes_split(4, image_size=(128, 144), seed=11, split="validation")


def _gt_as_results(val, score=1.0):
    results = []
    for ex in val.select_columns(["image_id", "objects"]):
        for obj in ex["objects"]:
            results.append({"image_id": ex["image_id"], "category_id": obj["category_id"], "bbox": obj["bbox"],
                            "score": score, "segmentation": obj["segmentation"]})
    return results


def _close(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        if math.isnan(a[k]):
            assert math.isnan(b[k]), k
        else:
            assert a[k] == pytest.approx(b[k], abs=1e-9), k


# ----------------------------------------------------------------------------------------------------------------
# COCO AP
# ----------------------------------------------------------------------------------------------------------------


def test_coco_perfect_prediction_is_ap_1(val):
    gt = dataset_to_coco_instances(val, THINGS)
    results = compute_coco_metrics(gt, _gt_as_results(val))
    for t in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "AR100"):
            assert results[f"{t}_{name}"] == pytest.approx(1.0), f"{t}_{name}"
        for c in THINGS:
            value = results[f"{t}_AP/{c['name']}"]
            assert math.isnan(value) or value == pytest.approx(1.0)
    assert set(f"bbox_{n}" for n in COCO_STAT_NAMES) <= set(results)


def _one_image_gt(extra_categories=()):
    mask = np.zeros((40, 40), dtype=bool)
    mask[10:20, 10:20] = True  # 10 x 10 = 100 px
    return mask, {
        "images": [{"id": 1, "height": 40, "width": 40}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10.0, 10.0, 10.0, 10.0],
                         "area": 100.0, "iscrowd": 0, "segmentation": mask_to_rle(mask)}],
        "categories": [{"id": 1, "name": "thing"}, *extra_categories],
    }


def test_coco_partial_overlap_by_hand():
    _, gt = _one_image_gt()
    pred_mask = np.zeros((40, 40), dtype=bool)
    pred_mask[10:18, 10:18] = True  # 8 x 8 inside the ground truth: IoU = 64 / 100 = 0.64
    pred = [{"image_id": 1, "category_id": 1, "bbox": [10.0, 10.0, 8.0, 8.0], "score": 0.9,
             "segmentation": mask_to_rle(pred_mask)}]
    r = compute_coco_metrics(gt, pred)
    # matched at IoU thresholds 0.50, 0.55, 0.60 (3 of 10) with precision 1 -> AP = 0.3
    for t in ("bbox", "segm"):
        assert r[f"{t}_AP"] == pytest.approx(0.3)
        assert r[f"{t}_AP50"] == pytest.approx(1.0)
        assert r[f"{t}_AP75"] == pytest.approx(0.0)
        assert r[f"{t}_AR100"] == pytest.approx(0.3)
        assert math.isnan(r[f"{t}_APl"])  # no large ground truth
    # a higher-scored false positive first: precision 1/2 at recall 1 -> AP50 = 0.5
    fp = {"image_id": 1, "category_id": 1, "bbox": [30.0, 30.0, 5.0, 5.0], "score": 0.95,
          "segmentation": mask_to_rle(np.pad(np.ones((5, 5), bool), ((30, 5), (30, 5))))}
    r = compute_coco_metrics(gt, pred + [fp], iou_types=["bbox"])
    assert r["bbox_AP50"] == pytest.approx(0.5)
    assert "segm_AP" not in r
    assert pred[0]["bbox"] == [10.0, 10.0, 8.0, 8.0] and "id" not in pred[0]  # inputs are not modified


def test_coco_edge_cases():
    mask, gt = _one_image_gt(extra_categories=[{"id": 2, "name": "unused"}])
    r = compute_coco_metrics(gt, [])
    assert r["bbox_AP"] == 0.0 and r["segm_AP"] == 0.0
    assert math.isnan(r["bbox_AP/unused"])
    with pytest.raises(ValueError, match="image ids"):
        compute_coco_metrics(gt, [{"image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(ValueError, match="segmentation"):
        compute_coco_metrics(gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}])
    # iou_types=None picks bbox only when a prediction has no mask
    r = compute_coco_metrics(gt, [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 10, 10], "score": 1.0}],
                             iou_types=None)
    assert r["bbox_AP"] == pytest.approx(1.0) and "segm_AP" not in r
    # annotation id 0 (pycocotools' "unmatched") is renumbered
    gt["annotations"][0]["id"] = 0
    r = compute_coco_metrics(gt, [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 10, 10], "score": 1.0,
                                   "segmentation": mask_to_rle(mask)}])
    assert r["segm_AP"] == pytest.approx(1.0)


def test_instances_to_coco_results():
    import torch

    masks = torch.zeros(2, 20, 30)
    masks[0, 2:6, 3:9] = 1.0
    masks[1, 10:20, 0:5] = 0.8
    res = instances_to_coco_results(7, torch.tensor([0.9, 0.4]), torch.tensor([0, 2]), masks=masks,
                                    label_to_category_id={0: 10, 2: 12})
    assert [r["category_id"] for r in res] == [10, 12]
    assert res[0]["bbox"] == [3.0, 2.0, 6.0, 4.0] and res[1]["bbox"] == [0.0, 10.0, 5.0, 10.0]
    assert res[0]["image_id"] == 7 and res[0]["score"] == pytest.approx(0.9)
    boxes = instances_to_coco_results(1, [0.5], [1], boxes=[[2.0, 3.0, 10.0, 7.0]])
    assert boxes[0]["bbox"] == [2.0, 3.0, 8.0, 4.0] and "segmentation" not in boxes[0]


# ----------------------------------------------------------------------------------------------------------------
# Panoptic quality
# ----------------------------------------------------------------------------------------------------------------

PQ_CATEGORIES = [{"id": 0, "name": "thing", "isthing": 1}, {"id": 1, "name": "bg", "isthing": 0}]


def _square_map(col0: int) -> np.ndarray:
    ids = np.full((8, 8), 1)  # segment 1 = "bg" stuff
    ids[2:6, col0:col0 + 4] = 2  # segment 2 = a 4 x 4 "thing"
    return ids


SEGMENTS = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 0}]


def test_pq_perfect_on_synthetic(val):
    refs = [(np.asarray(ex["panoptic"]), ex["segments_info"]) for ex in val]
    preds = [(panoptic_ids(np.asarray(ex["panoptic"])), ex["segments_info"]) for ex in val]
    r = compute_panoptic_quality(preds, refs, SHAPES_CATEGORIES)
    for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
        assert r[k] == pytest.approx(1.0), k


def test_pq_one_shifted_segment_by_hand():
    gt = _square_map(2)
    pred = _square_map(3)  # shifted right by one column
    r = compute_panoptic_quality([(pred, SEGMENTS)], [(gt, SEGMENTS)], PQ_CATEGORIES)
    thing_iou = 12 / 20  # 12 shared pixels, 16 + 16 - 12 in the union
    stuff_iou = 44 / 52  # 48 px each, 44 shared
    assert r["PQ_th"] == pytest.approx(thing_iou) and r["SQ_th"] == pytest.approx(thing_iou)
    assert r["RQ_th"] == 1.0
    assert r["PQ_st"] == pytest.approx(stuff_iou)
    assert r["PQ"] == pytest.approx((thing_iou + stuff_iou) / 2)
    assert r["PQ/thing"] == pytest.approx(thing_iou)

    # IoU below 0.5: one false positive and one false negative -> PQ = RQ = SQ = 0 for the thing
    far = _square_map(4)
    far[2:6, 4:8] = 1
    far[0:2, 0:4] = 2
    far[6:8, 4:8] = 2  # 8 + 8 px thing, intersection with the ground truth = 0
    r = compute_panoptic_quality([(far, SEGMENTS)], [(gt, SEGMENTS)], PQ_CATEGORIES)
    assert r["PQ_th"] == 0.0 and r["RQ_th"] == 0.0 and r["SQ_th"] == 0.0

    # wrong category: no match even with perfect overlap -> thing: FN, stuff class "bg" gets the FP
    wrong = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 1}]
    r = compute_panoptic_quality([(gt, wrong)], [(gt, SEGMENTS)], PQ_CATEGORIES)
    assert r["PQ_th"] == 0.0
    assert r["RQ_st"] == pytest.approx(1 / (1 + 0.5))  # bg: 1 TP (IoU 1) + 1 FP


def test_pq_void_and_crowd():
    gt = _square_map(2)
    gt[:, 7] = 0  # void column
    pred = _square_map(2)
    r = compute_panoptic_quality([(pred, SEGMENTS)], [(gt, SEGMENTS)], PQ_CATEGORIES)
    assert r["PQ"] == pytest.approx(1.0)  # predicted pixels on void are not counted in the union

    # a prediction lying on void only is not a false positive; HF-style -1 "no segment" and label_id are accepted
    pred2 = pred.copy()
    pred2[0:4, 7] = 3
    pred2[4:8, 7] = -1
    segs = [{"id": 1, "label_id": 1}, {"id": 2, "label_id": 0}, {"id": 3, "label_id": 0}]
    assert compute_panoptic_quality([(pred2, segs)], [(gt, SEGMENTS)], PQ_CATEGORIES)["PQ"] == pytest.approx(1.0)

    # crowd: never a false negative, and a prediction on it is not a false positive
    gt_crowd = _square_map(2)
    gt_crowd[6:8, 0:3] = 3
    crowd_segments = SEGMENTS + [{"id": 3, "category_id": 0, "iscrowd": 1}]
    pred3 = _square_map(2)
    pred3[6:8, 0:3] = 4
    pred_segments = SEGMENTS + [{"id": 4, "category_id": 0}]
    r = compute_panoptic_quality([{"segmentation": pred3, "segments_info": pred_segments}],
                                 [{"segmentation": gt_crowd, "segments_info": crowd_segments}], PQ_CATEGORIES)
    assert r["PQ_th"] == pytest.approx(1.0)
    assert r["PQ_st"] == pytest.approx(1.0)
    r = compute_panoptic_quality([(_square_map(2), SEGMENTS)], [(gt_crowd, crowd_segments)], PQ_CATEGORIES)
    assert r["RQ_th"] == pytest.approx(1.0)  # the unpredicted crowd region is not a false negative

    with pytest.raises(ValueError, match="not in its segments_info"):
        compute_panoptic_quality([(pred, SEGMENTS[:1])], [(gt, SEGMENTS)], PQ_CATEGORIES)
    with pytest.raises(ValueError, match="not in the categories"):
        compute_panoptic_quality([(pred, [{"id": 1, "category_id": 9}, SEGMENTS[1]])], [(gt, SEGMENTS)],
                                 PQ_CATEGORIES)


# ----------------------------------------------------------------------------------------------------------------
# Mean IoU
# ----------------------------------------------------------------------------------------------------------------


def test_miou_perfect_on_synthetic(val):
    maps = [np.asarray(ex["semantic"]) for ex in val]
    r = compute_mean_iou(maps, maps, num_labels=5, id2label=id2label())
    assert r["mIoU"] == 1.0 and r["pACC"] == 1.0 and r["mACC"] == 1.0 and r["fwIoU"] == 1.0
    assert r["IoU/circle"] in (1.0,) or math.isnan(r["IoU/circle"])


def test_miou_half_wrong_by_hand():
    ref = np.zeros((4, 4), dtype=np.int64)
    ref[:, 2:] = 1
    pred = np.zeros((4, 4), dtype=np.int64)  # right half wrong
    r = compute_mean_iou([pred], [ref], num_labels=3)
    # class 0: TP 8, FP 8 -> 0.5; class 1: TP 0, FN 8 -> 0; class 2 absent from both -> not averaged
    assert r["IoU/0"] == 0.5 and r["IoU/1"] == 0.0 and math.isnan(r["IoU/2"])
    assert r["mIoU"] == 0.25
    assert r["pACC"] == 0.5 and r["mACC"] == 0.5
    assert r["fwIoU"] == 0.25

    # ignored pixels do not count, predictions outside [0, num_labels) are plain errors
    ref_ign = ref.copy()
    ref_ign[:, 3] = 255
    pred2 = ref.copy()
    pred2[:, 2] = 255  # wrong on the 4 remaining class-1 pixels
    r = compute_mean_iou([pred2], [ref_ign], num_labels=2)
    assert r["IoU/0"] == 1.0 and r["IoU/1"] == 0.0 and r["mIoU"] == 0.5 and r["pACC"] == 8 / 12

    with pytest.raises(ValueError, match="outside"):
        compute_mean_iou([pred], [ref + 5], num_labels=3)


def test_table_formatting(capsys):
    metrics = {"PQ": 0.5, "SQ": float("nan"), "PQ/thing": 0.25, "SQ/thing": 1.0, "PQ/bg": 0.75}
    text = format_metrics_table(metrics, title="Panoptic")
    lines = text.splitlines()
    assert lines[0] == "Panoptic"
    assert any(line.startswith("PQ") and "50.00" in line for line in lines)
    assert any(line.startswith("SQ") and line.rstrip().endswith("-") for line in lines)
    assert any(line.startswith("thing") and "25.00" in line and "100.00" in line for line in lines)
    print_metrics_table(metrics, percent=False)
    assert "0.2500" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# evaluate modules, offline
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")


def test_evaluate_modules_match_functions(val, offline):
    with pytest.raises(ValueError, match="Unknown metric"):
        metric_path("accuracy")

    # COCO detection: one entry per image; predictions as they come from instances_to_coco_results
    coco = load_metric("coco_detection", keep_in_memory=True)
    gt = dataset_to_coco_instances(val, THINGS)
    preds = _gt_as_results(val, score=0.8)
    preds[0] = {**preds[0], "bbox": [preds[0]["bbox"][0] + 3, *preds[0]["bbox"][1:]]}  # a shifted box
    refs = [{k: ex[k] for k in ("image_id", "height", "width", "objects")} for ex in val.remove_columns(
        ["image", "panoptic", "semantic"])]
    per_image = [[p for p in preds if p["image_id"] == ref["image_id"]] for ref in refs]
    got = coco.compute(predictions=per_image, references=refs, categories=THINGS)
    _close(got, compute_coco_metrics(gt, preds))
    assert got["bbox_AP"] < 1.0 and got["segm_AP"] == pytest.approx(1.0)

    # panoptic quality: maps as arrays, Transformers-style segments_info (label_id, score) accepted
    pq = load_metric("panoptic_quality", keep_in_memory=True)
    ref_maps = [(panoptic_ids(np.asarray(ex["panoptic"])), ex["segments_info"]) for ex in val]
    pred_maps = [(m.copy(), s) for m, s in ref_maps]
    for m, _ in pred_maps[:2]:  # perturb two images: the left 60 columns become the bottom-right segment
        m[:, :60] = m[-1, -1]
    pq.add_batch(
        predictions=[{"segmentation": m, "segments_info": [{"id": s["id"], "label_id": s["category_id"], "score": 1.0}
                                                           for s in segs]} for m, segs in pred_maps[:2]],
        references=[{"segmentation": m, "segments_info": s} for m, s in ref_maps[:2]],
    )
    for (pm, ps), (rm, rs) in zip(pred_maps[2:], ref_maps[2:]):
        pq.add(prediction={"segmentation": pm, "segments_info": ps}, reference={"segmentation": rm, "segments_info": rs})
    got = pq.compute(categories=SHAPES_CATEGORIES)
    _close(got, compute_panoptic_quality(pred_maps, ref_maps, SHAPES_CATEGORIES))
    assert got["PQ"] < 1.0

    # mean IoU
    miou = load_metric("mean_iou", keep_in_memory=True)
    refs_sem = [np.asarray(ex["semantic"]) for ex in val]
    preds_sem = [r.copy() for r in refs_sem]
    preds_sem[1][:, :40] = 4
    got = miou.compute(predictions=preds_sem, references=refs_sem, num_labels=5, id2label=id2label())
    _close(got, compute_mean_iou(preds_sem, refs_sem, num_labels=5, id2label=id2label()))
    assert 0.0 < got["mIoU"] < 1.0


# ----------------------------------------------------------------------------------------------------------------
# The evaluation path's task choice and its one label -> category mapping
# ----------------------------------------------------------------------------------------------------------------


def test_tasks_follow_the_annotations_of_the_data_set():
    from maskdino_hf.evaluation import tasks_for_dataset

    assert tasks_for_dataset("all", ["image", "objects", "segments_info", "semantic"]) == [
        "instance", "panoptic", "semantic"]
    assert tasks_for_dataset("all", ["image", "panoptic", "segments_info"]) == ["instance", "panoptic"]
    assert tasks_for_dataset(["detection", "semantic"], ["objects", "semantic"]) == ["detection", "semantic"]
    with pytest.raises(ValueError, match="task 'semantic' needs the semantic annotations"):
        tasks_for_dataset("semantic", ["image", "objects"])
    with pytest.raises(ValueError, match="unknown evaluation task 'boxes'"):
        tasks_for_dataset("boxes", ["objects"])
    with pytest.raises(ValueError, match="no objects, panoptic or semantic"):
        tasks_for_dataset("all", ["image"])


def test_one_label_to_category_mapping():
    from maskdino_hf.evaluation import label_to_category_mapping

    categories = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]
    assert label_to_category_mapping({0: "cat", 1: "dog"}, categories) == {0: 1, 1: 3}  # by name
    assert label_to_category_mapping({0: "dog"}, categories) == {0: 3}  # the model knows a subset
    assert label_to_category_mapping({1: "a", 3: "b", 5: "c"}, categories) == {1: 1, 3: 3}  # ids are labels
    with pytest.raises(ValueError, match="cannot map the model's classes"):
        label_to_category_mapping({0: "a", 1: "b"}, categories)


def test_evaluate_with_the_ground_truth_as_predictions_scores_one(val):
    """`evaluate` with a predict function that returns the ground truth: every metric 1, the model left in training
    mode as it was."""
    import torch

    from maskdino_hf import MaskDINOForUniversalSegmentation, MaskDINOImageProcessor
    from maskdino_hf.data import rle_to_mask
    from maskdino_hf.evaluation import evaluate
    from maskdino_hf.training import tiny_config

    def ground_truth(images, rows):
        results = []
        for row in rows:
            objects = row["objects"]
            boxes = [[x, y, x + w, y + h] for x, y, w, h in (o["bbox"] for o in objects)]
            instance = {"scores": torch.ones(len(objects)), "labels": torch.tensor([o["category_id"] for o in objects]),
                        "boxes": torch.tensor(boxes), "masks": torch.from_numpy(np.stack(
                            [rle_to_mask(o["segmentation"]) for o in objects]))}
            panoptic = {"segmentation": panoptic_ids(row["panoptic"]),
                        "segments_info": [{"id": s["id"], "label_id": s["category_id"]} for s in row["segments_info"]]}
            results.append({"instance": instance, "panoptic": panoptic, "semantic": np.asarray(row["semantic"])})
        return results

    model = MaskDINOForUniversalSegmentation(tiny_config(num_labels=5, id2label=id2label(), stuff_labels=[3, 4]))
    model.train()
    metrics = evaluate(model, MaskDINOImageProcessor(num_labels=5), val, categories=SHAPES_CATEGORIES,
                       batch_size=3, predict_fn=ground_truth)
    assert model.training
    for key in ("segm_AP", "bbox_AP", "PQ", "SQ", "RQ", "mIoU", "pACC"):
        assert metrics[key] == pytest.approx(1.0), key


def test_evaluate_with_loader_workers_gives_the_same_metrics_and_images_per_second(capsys):
    """Two DataLoader workers decoding and preprocessing ahead of the demo model change no metric; with `progress`
    the images per second are reported at the end."""
    from maskdino_hf.evaluation import evaluate
    from maskdino_hf.predict import load_model_and_processor

    data = generate_shapes_split(4, image_size=((96, 128), (96, 128)), seed=5, split="validation")
    model, processor = load_model_and_processor(None, "cpu")
    metrics = {workers: evaluate(model, processor, data, categories=SHAPES_CATEGORIES, batch_size=2,
                                 num_workers=workers, progress=True) for workers in (0, 2)}
    assert metrics[0]["segm_AP"] > 0.2 and metrics[0]["PQ"] > 0.3 and metrics[0]["mIoU"] > 0.3, metrics[0]
    assert metrics[0].keys() == metrics[2].keys()
    for key, value in metrics[0].items():
        assert (math.isnan(value) and math.isnan(metrics[2][key])) or value == metrics[2][key], key
    reported = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evaluated 4 image(s) in ")]
    assert len(reported) == 2 and all(" images/s (batch size 2, 1 process(es)" in line for line in reported), reported
    assert "0 loader worker(s)" in reported[0] and "2 loader worker(s)" in reported[1]
