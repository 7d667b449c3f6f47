"""`maskdino-hf predict` / `evaluate` / `--help`: outputs, error messages, and the evaluation path checked against
ground truth fed back as predictions (scores 1.0) and hand-computed imperfect cases."""

from __future__ import annotations

import json
import os
import platform
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskdino_hf import (
    MaskDINOConfig,
    MaskDINOForUniversalSegmentation,
    MaskDINOImageProcessor,
    cli,
)
from maskdino_hf import predict as predict_module
from conftest import mask_iou, tiny_config

from maskdino_hf.data import load_coco_folder, panoptic_ids, rle_to_mask
from maskdino_hf.synthetic import (
    SHAPES_CATEGORIES,
    generate_shapes_split,
    id2label,
    make_synthetic_dataset,
)

REPO = Path(__file__).resolve().parents[1]
NUM_LABELS = 5
STUFF = [3, 4]


def _tiny_config() -> MaskDINOConfig:
    return tiny_config(num_labels=NUM_LABELS, id2label=id2label(), stuff_labels=STUFF)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random model + processor saved like a real model folder."""
    folder = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    MaskDINOForUniversalSegmentation(_tiny_config()).save_pretrained(folder)
    MaskDINOImageProcessor(
        size={"shortest_edge": 128, "longest_edge": 160}, num_labels=NUM_LABELS, stuff_labels=STUFF
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory) -> list[Path]:
    """Two synthetic images of different sizes (a PNG and a JPEG)."""
    folder = tmp_path_factory.mktemp("images")
    data = generate_shapes_split(2, image_size=((90, 130), (90, 130)), seed=4, split="test")
    paths = [folder / "first.png", folder / "second.jpg"]
    for path, image in zip(paths, data["image"]):
        image.save(path)
    assert data[0]["image"].size != data[1]["image"].size
    return paths


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    """train/ + validation/ COCO folders and hf/ (save_to_disk) of a tiny synthetic data set."""
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(root, num_train=1, num_val=3, image_size=(64, 80), seed=2)
    return root


# ------------------------------------------------------------------------------------------------ predict


@pytest.mark.parametrize("task", ["instance", "detection", "panoptic", "semantic"])
def test_predict_writes_overlays_and_results(task, model_dir, image_paths, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["predict", *map(str, image_paths), "--model", str(model_dir), "--task", task, "--output-dir", str(out),
            "--batch-size", "2", "--device", "cpu"]
    if task in ("instance", "detection"):
        argv += ["--threshold", "0"]  # a random model scores low: keep everything so there is something to check
    assert cli.main(argv) == 0, capsys.readouterr().err
    report = json.loads((out / "predictions.json").read_text())
    assert report["task"] == task
    assert [c["name"] for c in report["categories"]] == [c["name"] for c in SHAPES_CATEGORIES]
    assert [image["file_name"] for image in report["images"]] == [p.name for p in image_paths]
    sizes = {}
    for info, path in zip(report["images"], image_paths):
        with Image.open(path) as image:
            width, height = image.size
        assert (info["width"], info["height"]) == (width, height)
        sizes[info["id"]] = (height, width)
        with Image.open(out / info["overlay"]) as overlay:
            assert overlay.mode == "RGB"
            # enlarged for display, plus the legend panel on the right
            assert overlay.width > overlay.height * width / height and overlay.height >= height

    if task in ("instance", "detection"):
        results = json.loads((out / "coco_results.json").read_text())
        assert results == report["annotations"] and len(results) > 0
        for result in results:
            assert set(result) >= {"image_id", "category_id", "bbox", "score"}
            assert result["category_id"] in (0, 1, 2) and 0.0 <= result["score"] <= 1.0  # things only
            height, width = sizes[result["image_id"]]
            x, y, w, h = result["bbox"]
            assert 0 <= x <= x + w <= width and 0 <= y <= y + h <= height
            if task == "instance":
                assert isinstance(result["segmentation"]["counts"], str)
                mask = rle_to_mask(result["segmentation"])
                assert mask.shape == (height, width)
            else:
                assert "segmentation" not in result
        assert {r["image_id"] for r in results} == {1, 2}
    else:
        for annotation in report["annotations"]:
            height, width = sizes[annotation["image_id"]]
            with Image.open(out / annotation["file_name"]) as png:
                assert png.size == (width, height)
                array = np.asarray(png)
            if task == "panoptic":
                ids = panoptic_ids(array)
                assert set(np.unique(ids).tolist()) - {0} == {s["id"] for s in annotation["segments_info"]}
                for segment in annotation["segments_info"]:
                    assert segment["area"] == int((ids == segment["id"]).sum()) > 0
                    assert segment["isthing"] == int(segment["category_id"] not in STUFF)
            else:
                assert array.dtype == np.uint8 and array.max() < NUM_LABELS
                assert sum(c["area"] for c in annotation["classes"]) == width * height
    stdout = capsys.readouterr().out
    assert "image(s)" in stdout
    # one summary line per image (visualization.summarize: count and classes, void for panoptic), one JSON line
    # per image written as it finished
    for index, (info, path) in enumerate(zip(report["images"], image_paths)):
        prefix = f"[{index + 1}/{len(image_paths)}] {path}: {task}: "
        summary = next(line for line in stdout.splitlines() if line.startswith(prefix))[len(prefix):]
        annotations = [a for a in report["annotations"] if a["image_id"] == info["id"]]
        if task == "panoptic":
            assert summary.startswith(f"{len(annotations[0]['segments_info'])} segment") and ", void " in summary
        elif task == "semantic":
            assert summary.startswith(f"{len(annotations[0]['classes'])} class")
        else:
            assert summary.startswith(f"{len(annotations)} {task}")
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [line["image"] for line in lines] == report["images"]
    assert [a for line in lines for a in line["annotations"]] == report["annotations"]
    assert report["skipped"] == []


def test_predict_folder_argument_and_default_model_error(model_dir, image_paths, tmp_path, capsys, monkeypatch):
    # a folder of images expands to its images
    assert cli.main(["predict", str(image_paths[0].parent), "--model", str(model_dir), "--output-dir",
                     str(tmp_path / "o"), "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "o").glob("*_overlay.png")) == ["first_overlay.png", "second_overlay.png"]
    # without --model the bundled demo model is used; a clear error while it is not installed
    monkeypatch.setattr(predict_module, "demo_model_dir", lambda: tmp_path / "no_demo")
    assert cli.main(["predict", str(image_paths[0]), "--output-dir", str(tmp_path / "o2")]) == 2
    assert "demo model is not installed" in capsys.readouterr().err


def test_predict_without_arguments_uses_the_demo_folder(model_dir, image_paths, tmp_path, monkeypatch):
    """`maskdino-hf predict --output-dir outputs` = the demo model on the demo images (here a stand-in demo)."""
    demo = tmp_path / "demo"
    shutil.copytree(model_dir, demo)
    (demo / "images").mkdir()
    shutil.copy(image_paths[0], demo / "images" / "a.png")
    monkeypatch.setattr(predict_module, "demo_model_dir", lambda: demo)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["predict", "--output-dir", "outputs", "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "outputs" / "predictions.json").read_text())
    assert report["model"] == str(demo) and [i["file_name"] for i in report["images"]] == ["a.png"]
    assert (tmp_path / "outputs" / "a_overlay.png").is_file()


@pytest.mark.parametrize(
    "case, message",
    [
        ("unreadable", "maskdino-hf predict: error: {bad}: unreadable"),
        ("missing", "image not found: {missing}"),
        ("no_model_folder", "model folder not found"),
        ("folder_without_config", "model folder has no config.json"),
        ("hub_id_offline", "'someone/no-such-maskdino'"),
    ],
)
def test_predict_errors_are_one_clear_line(case, message, model_dir, image_paths, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    missing = tmp_path / "missing.png"
    images, model = [str(image_paths[0])], str(model_dir)
    if case == "unreadable":  # the only image: nothing to do, an input error (with other images: skipped, status 3)
        images = [str(bad)]
    elif case == "missing":
        images = [str(missing)]
    elif case == "no_model_folder":
        model = str(tmp_path / "no_such_model")
    elif case == "folder_without_config":
        (tmp_path / "empty_model").mkdir()
        model = str(tmp_path / "empty_model")
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        model = "someone/no-such-maskdino"
    code = cli.main(["predict", *images, "--model", model, "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("maskdino-hf predict: error: ") and "Traceback" not in err
    assert message.format(bad=bad, missing=missing) in err and len(err.strip().splitlines()) == 1
    if case != "unreadable":  # failed before any work
        assert not (tmp_path / "out" / "predictions.json").exists()


def test_help(capsys):
    """`maskdino-hf --help` (in-process: the console script itself runs in the end-to-end evaluate test)."""
    for argv, words in ((["--help"], ("predict", "evaluate", "convert", "export", "releases", "demo")),
                        (["predict", "--help"], ("--batch-size", "--progress", "--compile")),
                        (["export", "--help"], ("--output", "--height", "--width", "pad_size")),
                        (["evaluate", "--help"], ("--split", "--output")),
                        (["convert", "--help"], ("--release", "--config", "--push-to-hub", "--cache-dir")),
                        (["releases", "--help"], ("releases",)),
                        (["demo", "--help"], ("--model", "--host", "--port", "--share"))):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        for word in words:
            assert word in out, (argv, word)


def test_predict_default_demo_model(tmp_path):
    """The README's main job: `maskdino-hf predict --output-dir outputs` on the bundled demo."""
    assert cli.main(["predict", "--output-dir", str(tmp_path), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "predictions.json").read_text())
    assert len(report["images"]) == len(predict_module.demo_images()) > 0
    assert all((tmp_path / image["overlay"]).is_file() for image in report["images"])

    # Every shape and both stuff regions of the bundled images are found and labelled: the images are validation
    # images 0-3 of the demo's training data (src/maskdino_hf/demo/TRAINING.md), so the generator gives their truth.
    truth = generate_shapes_split(4, image_size=((96, 128), (96, 128)), seed=0, split="validation")
    assert report["task"] == "panoptic"
    for annotation, path, row in zip(report["annotations"], predict_module.demo_images(), truth, strict=True):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(row["image"].convert("RGB")))
        predicted = panoptic_ids(Image.open(tmp_path / annotation["file_name"]))
        expected = panoptic_ids(row["panoptic"])
        for segment in row["segments_info"]:
            mask = expected == segment["id"]
            ious = [
                mask_iou(mask, predicted == s["id"])
                for s in annotation["segments_info"]
                if s["category_id"] == segment["category_id"]
            ]
            assert max(ious, default=0.0) >= 0.8, (path.name, SHAPES_CATEGORIES[segment["category_id"]]["name"], ious)


def test_predict_mask_threshold_is_the_processors(tmp_path):
    """`--mask-threshold` on the bundled demo: each panoptic map equals the processor's own post-processing with that
    `mask_threshold` (the model run here directly), it is recorded in predictions.json, and it changes the result
    (the official 0.5 leaves other void pixels along the segment boundaries)."""
    demo = predict_module.demo_model_dir()
    model = MaskDINOForUniversalSegmentation.from_pretrained(demo).eval()
    processor = MaskDINOImageProcessor.from_pretrained(demo)
    voids = {}
    for threshold in (None, 0.35):
        out = tmp_path / str(threshold)
        extra = [] if threshold is None else ["--mask-threshold", str(threshold)]
        assert cli.main(["predict", "--output-dir", str(out), "--device", "cpu", *extra]) == 0
        report = json.loads((out / "predictions.json").read_text())
        assert report["mask_threshold"] == (0.5 if threshold is None else threshold)
        voids[threshold] = []
        for annotation, path in zip(report["annotations"], predict_module.demo_images()):
            image = Image.open(path).convert("RGB")
            with torch.inference_mode():
                outputs = model(**processor(image, return_tensors="pt"))
            expected = processor.post_process_panoptic_segmentation(
                outputs, mask_threshold=0.5 if threshold is None else threshold, target_sizes=[image.size[::-1]]
            )[0]
            ids = panoptic_ids(Image.open(out / annotation["file_name"]))
            written = {(s["category_id"], int((ids == s["id"]).sum())) for s in annotation["segments_info"]}
            segmentation = expected["segmentation"].numpy()
            assert written == {(s["label_id"], int((segmentation == s["id"]).sum())) for s in expected["segments_info"]}
            assert np.array_equal(ids == 0, segmentation == 0)
            voids[threshold].append(int((ids == 0).sum()))
    assert voids[None] != voids[0.35]
    # instance masks take it too
    image = Image.open(predict_module.demo_images()[0]).convert("RGB")
    with torch.inference_mode():
        outputs = model(**processor(image, return_tensors="pt"))
    for threshold in (0.2, 0.8):
        predictor = predict_module.model_predict_fn(model, processor, ["instance"], mask_threshold=threshold)
        expected = processor.post_process_instance_segmentation(
            outputs, threshold=0.0, mask_threshold=threshold, panoptic_on=True, target_sizes=[image.size[::-1]]
        )[0]
        assert torch.equal(predictor([image])[0]["instance"]["masks"], expected["masks"])


def test_mask_threshold_is_refused_where_it_would_go_unused():
    """Detection and semantic results have no masks to threshold: a mask threshold for them is an error, as is one
    outside (0, 1)."""
    demo = predict_module.demo_model_dir()
    model = MaskDINOForUniversalSegmentation.from_pretrained(demo).eval()
    processor = MaskDINOImageProcessor.from_pretrained(demo)
    for task in ("semantic", "detection"):
        with pytest.raises(ValueError, match=f"task '{task}' has none to threshold"):
            predict_module.model_predict_fn(model, processor, [task], mask_threshold=0.4)
    with pytest.raises(ValueError, match=r"probability in \(0, 1\), got 1.5"):
        predict_module.model_predict_fn(model, processor, ["instance"], mask_threshold=1.5)


def test_predict_bf16_keeps_the_float32_instances(tmp_path):
    """`--bf16` (autocast) on the bundled demo: the same confident instances (default threshold 0.5) as float32: same
    class, masks with IoU >= 0.9. An instance scoring within 0.05 of the threshold in one precision may cross it in
    the other (bf16 moves scores by about 1e-2), so only instances clear of the threshold must be in both. Masks, not
    boxes: bf16 rounding moves the demo model's box-head outputs by up to 2.5 px of a 125 px image (about 2%), while
    its masks stay put."""
    from pycocotools import mask as mask_utils

    reports = {}
    for name, extra in (("fp32", []), ("bf16", ["--bf16"])):
        argv = ["predict", "--task", "instance", "--output-dir", str(tmp_path / name), "--device", "cpu", *extra]
        assert cli.main(argv) == 0
        reports[name] = json.loads((tmp_path / name / "predictions.json").read_text())

    def by_image(report):
        grouped = {}
        for item in report["annotations"]:  # COCO results: image_id, category_id, bbox (xywh), score, segmentation
            grouped.setdefault(item["image_id"], []).append((item["category_id"], item["segmentation"], item["score"]))
        return grouped

    def contains(items, label, rle):
        return any(
            other == label and mask_utils.iou([other_rle], [rle], [0])[0, 0] >= 0.9 for other, other_rle, _ in items
        )

    reference, ours = by_image(reports["fp32"]), by_image(reports["bf16"])
    found = 0
    for first, second in ((reference, ours), (ours, reference)):
        for image, items in first.items():
            for label, rle, score in items:
                if score >= 0.55:
                    assert contains(second.get(image, []), label, rle), (image, label, score)
                    found += first is reference
    assert found >= 4


AVX2_ONLY = {"architecture": "x86_64", "cpu_name": "AMD EPYC", "avx2": True, "avx512_bw": False, "avx512_vl": False,
             "avx512_dq": False, "avx512_bf16": False, "amx_bf16": False, "avx_ne_convert": False}


@pytest.mark.parametrize("capabilities, slow", [
    (AVX2_ONLY, True),
    ({**AVX2_ONLY, "avx512_bw": True, "avx512_vl": True, "avx512_dq": True}, False),  # oneDNN's AVX-512 bfloat16
    ({**AVX2_ONLY, "avx512_bf16": True}, False),
    ({**AVX2_ONLY, "amx_bf16": True}, False),
    ({**AVX2_ONLY, "avx_ne_convert": True}, False),
    ({"architecture": "aarch64"}, False),  # not judged
])
def test_slow_bfloat16_reason_follows_the_cpu_capabilities(monkeypatch, capabilities, slow):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(capabilities))
    reason = predict_module.slow_bfloat16_reason("cpu")
    assert (reason is not None) == slow
    if slow:
        assert "AMD EPYC" in reason and "AVX-512" in reason
    assert predict_module.slow_bfloat16_reason("cuda") is None


def test_predict_bf16_warns_on_a_cpu_that_emulates_bfloat16(tmp_path, monkeypatch, capsys):
    """`--bf16` where bfloat16 matmuls are a scalar fallback (a 2048^3 matmul at 0.3 GFLOP/s on an AVX2 EPYC, about 300x
    slower than float32): the run still completes (its numbers are right), and stderr says why it is slow."""
    image = sorted((REPO / "src" / "maskdino_hf" / "demo" / "images").glob("*.png"))[0]
    for capabilities, warned in ((AVX2_ONLY, True), ({**AVX2_ONLY, "amx_bf16": True}, False)):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(capabilities))
        output = tmp_path / str(warned)
        argv = ["predict", str(image), "--output-dir", str(output), "--device", "cpu", "--bf16"]
        assert cli.main(argv) == 0
        err = capsys.readouterr().err
        assert ("bfloat16 autocast (--bf16) will be slow" in err) == warned, err
        assert ("AMD EPYC" in err) == warned
        assert (output / "predictions.json").is_file()


# ------------------------------------------------------------------------------------------------ evaluate


def _ground_truth_predictor(shift: int = 0, drop_first_thing: bool = False, semantic_label: int | None = None):
    """Predictions made from the ground truth rows (``shift`` rolls everything ``shift`` pixels to the right)."""

    def predict(images, rows):
        results = []
        for image, row in zip(images, rows):
            objects = row["objects"]
            masks = np.stack([np.roll(rle_to_mask(o["segmentation"]), shift, axis=1) for o in objects])
            boxes = torch.tensor([[x + shift, y, x + w + shift, y + h] for x, y, w, h in (o["bbox"] for o in objects)])
            instance = {
                "scores": torch.ones(len(objects)),
                "labels": torch.tensor([o["category_id"] for o in objects]),
                "boxes": boxes,
                "masks": torch.from_numpy(masks),
            }
            panoptic = np.roll(panoptic_ids(row["panoptic"]), shift, axis=1)
            segments = [{"id": s["id"], "label_id": s["category_id"]} for s in row["segments_info"]]
            if drop_first_thing and row["image_id"] == 1:
                first = next(s for s in row["segments_info"] if s["isthing"])
                panoptic[panoptic == first["id"]] = 0
                segments = [s for s in segments if s["id"] != first["id"]]
            semantic = np.roll(np.asarray(row["semantic"]).astype(np.int64), shift, axis=1)
            if semantic_label is not None:
                semantic = np.full_like(semantic, semantic_label)
            assert semantic.shape == (image.height, image.width)
            results.append({"instance": instance, "detection": dict(instance), "panoptic": {
                "segmentation": torch.from_numpy(panoptic), "segments_info": segments},
                "semantic": torch.from_numpy(semantic)})
        return results

    return predict


def _evaluate_ground_truth(dataset, **kwargs):
    from maskdino_hf.evaluation import DatasetEvaluator, label_to_category_mapping

    tasks = ["instance", "detection", "panoptic", "semantic"]
    mapping = label_to_category_mapping(id2label(), SHAPES_CATEGORIES)
    assert mapping == {i: i for i in range(NUM_LABELS)}
    evaluator = DatasetEvaluator(tasks, SHAPES_CATEGORIES, mapping, NUM_LABELS, id2label=id2label())
    rows = list(dataset)
    predictions = _ground_truth_predictor(**kwargs)([row["image"] for row in rows], rows)
    return evaluator.compute([evaluator.image_record(row, p) for row, p in zip(rows, predictions)])


def test_ground_truth_as_predictions_scores_one_and_shifted_scores_less(synthetic_root):
    dataset = load_coco_folder(synthetic_root / "validation")
    perfect = _evaluate_ground_truth(dataset)
    for key in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP75", "det_bbox_AP", "PQ", "SQ", "RQ", "PQ_th", "PQ_st",
                "mIoU", "pACC", "mACC"):
        assert perfect[key] == pytest.approx(1.0), key
    shifted = _evaluate_ground_truth(dataset, shift=6)
    for key in ("bbox_AP", "segm_AP", "PQ", "mIoU"):
        assert 0.0 <= shifted[key] < 0.99, (key, shifted[key])


def test_hand_checked_panoptic_and_semantic_cases(synthetic_root):
    dataset = load_coco_folder(synthetic_root / "validation")
    rows = list(dataset)
    # PQ: the first thing of image 1 missing from the prediction (its pixels void): one false negative.
    first = next(s for s in rows[0]["segments_info"] if s["isthing"])
    per_category = {}
    for row in rows:
        for s in row["segments_info"]:
            per_category[s["category_id"]] = per_category.get(s["category_id"], 0) + 1
    expected = {}
    for category, count in per_category.items():
        tp = count - (category == first["category_id"])
        fn = count - tp
        expected[category] = tp / (tp + 0.5 * fn)  # every matched segment has IoU 1
    metrics = _evaluate_ground_truth(dataset, drop_first_thing=True)
    names = id2label()
    for category, value in expected.items():
        assert metrics[f"PQ/{names[category]}"] == pytest.approx(value)
    assert metrics["PQ"] == pytest.approx(np.mean(list(expected.values())))
    assert metrics["SQ"] == pytest.approx(1.0)
    # mIoU: everything predicted "ground": IoU(ground) = ground pixels / all pixels, 0 for the other classes.
    semantic = [np.asarray(row["semantic"]) for row in rows]
    total = sum(s.size for s in semantic)
    ground = sum(int((s == 4).sum()) for s in semantic)
    present = set(np.unique(np.concatenate([s.ravel() for s in semantic])).tolist()) | {4}
    metrics = _evaluate_ground_truth(dataset, semantic_label=4)
    assert metrics["IoU/ground"] == pytest.approx(ground / total)
    assert metrics["mIoU"] == pytest.approx(ground / total / len(present))
    assert metrics["pACC"] == pytest.approx(ground / total)


def test_evaluate_end_to_end_with_a_tiny_model(model_dir, synthetic_root, tmp_path):
    """A real `maskdino-hf evaluate` run (subprocess) on a COCO folder, then the save_to_disk copy in-process."""
    report_path = tmp_path / "report.json"
    command = [shutil.which("maskdino-hf")] if shutil.which("maskdino-hf") else [sys.executable, "-m", "maskdino_hf.cli"]
    done = subprocess.run(
        [*command, "evaluate", "--model", str(model_dir), "--data", str(synthetic_root), "--split", "validation",
         "--output", str(report_path), "--batch-size", "2", "--device", "cpu"],
        check=False, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr
    for key in ("bbox_AP", "segm_AP", "PQ", "SQ", "RQ", "mIoU", "circle", "ground"):
        assert key in done.stdout, key
    report = json.loads(report_path.read_text())
    assert report["tasks"] == ["instance", "panoptic", "semantic"] and report["num_images"] == 3
    for key in ("bbox_AP", "segm_AP", "PQ", "mIoU"):
        value = report["metrics"][key]
        assert value is None or 0.0 <= value <= 1.0


def test_examples_evaluate_wrapper_on_saved_dataset(model_dir, synthetic_root, tmp_path, monkeypatch, capsys):
    output = tmp_path / "semantic.json"
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--model", str(model_dir), "--data", str(synthetic_root / "hf"),
                                      "--task", "semantic", "--max-images", "2", "--output", str(output)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "examples" / "evaluate.py"), run_name="__main__")
    assert exit_info.value.code == 0
    assert "mIoU" in capsys.readouterr().out
    report = json.loads(output.read_text())
    assert report["tasks"] == ["semantic"] and report["num_images"] == 2


def test_evaluate_errors(model_dir, synthetic_root, tmp_path, capsys):
    assert cli.main(["evaluate", "--model", str(model_dir), "--data", str(tmp_path / "nothing")]) == 2
    assert "--data" in capsys.readouterr().err
    assert cli.main(["evaluate", "--model", str(model_dir), "--data", str(synthetic_root / "hf"), "--split", "dev"]) == 2
    assert "no split 'dev'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ start-up and errors

HEAVY_MODULES = ("torch", "transformers", "PIL.Image", "numpy", "datasets")


@pytest.mark.parametrize(
    "argv, code",
    [
        (["--help"], 0),
        (["predict", "--help"], 0),
        (["evaluate", "--help"], 0),
        (["convert", "--help"], 0),
        (["demo", "--help"], 0),
        (["export", "--help"], 0),
        (["export", "--output", "x.onnx", "--height", "0", "--width", "160"], 2),
        (["predict", "--batch-size", "0"], 2),
        (["predict", "--threshold", "1.5"], 2),
        (["predict", "--mask-threshold", "1"], 2),
        (["predict", "--task", "semantic", "--mask-threshold", "0.4"], 2),
        (["predict", "--task", "nonsense"], 2),
        (["convert", "--config", "x.yaml", "--output-dir", "o"], 2),
        (["convert", "--config", "x.yaml", "--release", "r", "--output-dir", "o"], 2),
        (["convert", "--config", "x.yaml", "--checkpoint", "k.pth", "--output-dir", "o", "--push-to-hub", "a/b"], 2),
        (["predict", "no/such/image.png"], 2),
    ],
)
def test_help_and_argument_errors_import_nothing_heavy(argv, code):
    """What makes `--help` and argument errors instant: torch, transformers, PIL, numpy, datasets stay unimported."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "maskdino_hf.cli", *argv], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == code, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & set(HEAVY_MODULES), sorted(imported & set(HEAVY_MODULES))
    errors = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    if code == 2:
        assert "error: " in errors[-1] and "Traceback" not in done.stderr


@pytest.mark.parametrize("transformers_first", [False, True])
def test_import_is_lazy_and_auto_classes_still_resolve(model_dir, transformers_first):
    """`import maskdino_hf` imports neither torch nor transformers, yet the Auto classes and pipelines find Mask DINO
    afterwards (fresh interpreter), also when Transformers' Auto classes were imported first, and the classes come
    from the package on first access."""
    first = "from transformers import AutoModelForUniversalSegmentation" if transformers_first else ""
    check = "" if transformers_first else 'assert "torch" not in sys.modules and "transformers" not in sys.modules'
    code = f"""
import sys
{first}
import maskdino_hf
{check}
from transformers import AutoConfig, AutoImageProcessor, AutoModelForUniversalSegmentation, pipeline
model = AutoModelForUniversalSegmentation.from_pretrained({str(model_dir)!r})
processor = AutoImageProcessor.from_pretrained({str(model_dir)!r})
segmenter = pipeline("image-segmentation", model={str(model_dir)!r})
print(type(AutoConfig.from_pretrained({str(model_dir)!r})).__name__, type(model).__name__, type(processor).__name__,
      type(segmenter.model).__name__, model.__class__ is maskdino_hf.MaskDINOForUniversalSegmentation)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["MaskDINOConfig", "MaskDINOForUniversalSegmentation", "MaskDINOImageProcessor",
                                   "MaskDINOForUniversalSegmentation", "True"]


def test_loading_prints_no_progress_bar(model_dir, image_paths, tmp_path, capfd):
    assert cli.main(["predict", str(image_paths[0]), "--model", str(model_dir), "--output-dir", str(tmp_path),
                     "--device", "cpu"]) == 0
    assert "Loading weights" not in capfd.readouterr().err


@pytest.mark.parametrize("error", [ValueError("bad value\nsecond line"), TypeError("bad type"),
                                   FileNotFoundError(2, "No such file", "x.pth"), PermissionError(13, "denied", "/o")])
def test_user_errors_print_one_line_with_status_2(error, monkeypatch, capsys):
    def fail(args):
        raise error

    monkeypatch.setattr(cli, "_releases", fail)
    assert cli.main(["releases"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("maskdino-hf releases: error: ") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    if isinstance(error, ValueError):
        assert err.strip().endswith("bad value; second line")


def test_interrupt_is_one_line_with_status_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_releases", interrupted)
    assert cli.main(["releases"]) == 130
    assert capsys.readouterr().err == "maskdino-hf releases: interrupted\n"


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    def fail(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_releases", fail)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["releases"])
    monkeypatch.setattr(cli, "_releases", lambda args: (_ for _ in ()).throw(ValueError("user")))
    monkeypatch.setenv("MASKDINO_HF_DEBUG", "1")
    with pytest.raises(ValueError, match="user"):
        cli.main(["releases"])


def test_convert_release_releases_and_demo_dispatch(monkeypatch, tmp_path, capsys):
    """`convert --release`, `releases` and `demo` call the library functions with the parsed arguments."""
    import types

    calls = []
    releases = types.ModuleType("maskdino_hf.releases")
    releases.releases_table = lambda: "| name | task |"
    releases.convert_release = lambda name, output_dir, **kwargs: calls.append((name, output_dir, kwargs)) or Path(
        output_dir)
    webdemo = types.ModuleType("maskdino_hf.webdemo")
    webdemo.launch = lambda **kwargs: calls.append(("demo", kwargs))
    monkeypatch.setitem(sys.modules, "maskdino_hf.releases", releases)
    monkeypatch.setitem(sys.modules, "maskdino_hf.webdemo", webdemo)
    assert cli.main(["releases"]) == 0 and "| name | task |" in capsys.readouterr().out
    assert cli.main(["convert", "--release", "r50-instance", "--output-dir", str(tmp_path), "--push-to-hub",
                     "me/model"]) == 0
    assert calls[-1] == ("r50-instance", str(tmp_path), {"checkpoint": None, "cache_dir": None,
                                                         "push_to_hub": "me/model"})
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())
    assert cli.main(["demo", "--port", "7999", "--share"]) == 0
    assert calls[-1] == ("demo", {"model": None, "server_name": "127.0.0.1", "server_port": 7999, "share": True})


def test_demo_without_gradio_is_one_clear_line(monkeypatch, capsys):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None if name == "gradio" else object())
    assert cli.main(["demo"]) == 2
    assert 'pip install -e ".[demo]"' in capsys.readouterr().err


def test_library_load_and_save_print_no_progress_bars_unless_asked(model_dir, tmp_path, capfd, monkeypatch):
    model = MaskDINOForUniversalSegmentation.from_pretrained(model_dir)
    model.save_pretrained(tmp_path / "copy")
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err
    monkeypatch.setenv("MASKDINO_HF_PROGRESS", "1")
    MaskDINOForUniversalSegmentation.from_pretrained(tmp_path / "copy")
    assert "Loading weights" in capfd.readouterr().err


def test_readme_python_snippet_runs_without_warnings_or_progress_bars():
    """The README's "Using the model" snippet, on the bundled demo, with warnings as errors and nothing on stderr."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("```python\nimport torch\nfrom PIL import Image") + len("```python\n")
    snippet = readme[start:readme.index("```", start)]
    demo = predict_module.demo_model_dir()
    snippet = snippet.replace('"path/or/hub-id"', repr(str(demo))).replace(
        '"image.png"', repr(str(predict_module.demo_images()[0])))
    done = subprocess.run([sys.executable, "-W", "error", "-c", snippet + '\nprint(len(result["scores"]))'],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and done.stderr == "", done.stderr[-3000:]
    assert int(done.stdout) > 0


def test_output_dir_that_is_a_file_fails_before_loading_the_model(image_paths, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    monkeypatch.setattr(cli, "load_model_and_processor", lambda *a, **k: pytest.fail("model loaded"))
    assert cli.main(["predict", str(image_paths[0]), "--output-dir", str(blocker)]) == 2
    assert capsys.readouterr().err.strip() == f"maskdino-hf predict: error: --output-dir {blocker}: is a file, not a folder"


def test_cli_startup_benchmark_prints_its_table():
    """`benchmarks/cli_startup.py` (the README's start-up figures) runs and prints every row with its ratio."""
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cli_startup.py"), "--runs", "1"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    for row in ("maskdino-hf --help", "maskdino-hf predict --help", "argument error", "import maskdino_hf",
                "import transformers"):
        line = next(line for line in done.stdout.splitlines() if row in line)
        assert len(line.split()) >= 4, line


_REALLOCATION_FAULTS = """
import resource, sys, torch
from maskdino_hf.predict import keep_freed_memory
applied = keep_freed_memory()
def step():  # tensors of 40-100 MiB alive together, as in an R50 forward pass at 800x1088, then freed
    alive = [torch.ones(mib * 2**18) for mib in (40, 64, 100, 48, 72)]
step()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()  # the same sizes again: fresh pages unless the freed memory was kept
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="keep_freed_memory sets glibc's malloc thresholds: Linux with glibc only")
def test_keep_freed_memory_reuses_freed_tensors_without_page_faults():
    """Five more steps of the same tensors (324 MiB, 82,944 pages of 4 KiB per step; glibc maps allocations above 32
    MiB afresh by default: about 415,000 faults) fault in less than one step's pages once freed memory is kept;
    MASKDINO_HF_KEEP_FREED_MEMORY=0 leaves the allocator alone."""
    def run(**env):
        completed = subprocess.run([sys.executable, "-c", _REALLOCATION_FAULTS], capture_output=True, text=True,
                                   env={**os.environ, **env}, check=True)
        applied, faults = completed.stdout.split()
        return applied == "True", int(faults)

    applied, faults = run()
    assert applied and faults < 82944, faults
    applied, faults = run(MASKDINO_HF_KEEP_FREED_MEMORY="0")
    assert not applied and faults > 82944, faults  # what the setting saves


def test_predict_evaluate_and_demo_keep_freed_memory(model_dir, synthetic_root, image_paths, tmp_path, monkeypatch):
    """The commands that run a model set the allocator for their own process before loading it."""
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("kept") or True)
    assert cli.main(["predict", str(image_paths[0]), "--model", str(model_dir), "--output-dir", str(tmp_path / "p"),
                     "--device", "cpu"]) == 0
    assert calls == ["kept"]
    assert cli.main(["evaluate", "--model", str(model_dir), "--data", str(synthetic_root / "hf"), "--device",
                     "cpu"]) == 0
    assert calls == ["kept", "kept"]
