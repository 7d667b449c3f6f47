"""Bad data and checkpoints: every case gets a clear error naming the file or argument, the bad value and what is
allowed, or is handled correctly when it is legitimate. Data: COCO instance folders, panoptic PNG + json, semantic
folders and `datasets` rows. Checkpoints: unfinished, truncated and pickle-carrying folders on resume."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskdino_hf import cli
from maskdino_hf.data import (
    dataset_to_coco_instances,
    load_coco_folder,
    load_coco_instances,
    load_coco_panoptic,
    load_semantic_folder,
    rle_to_mask,
)
from maskdino_hf.training import CheckpointError, check_checkpoint, resume_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 32, 24
CATEGORIES = [{"id": 1, "name": "thing", "isthing": 1}, {"id": 2, "name": "stuff", "isthing": 0}]


# ----------------------------------------------------------------------------------------------------------------
# A small COCO folder: two images, instances and panoptic annotations, semantic maps


def _instances() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": WIDTH, "height": HEIGHT},
                   {"id": 2, "file_name": "b.png", "width": WIDTH, "height": HEIGHT}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [2.0, 3.0, 10.0, 8.0],
             "segmentation": [[2.0, 3.0, 12.0, 3.0, 12.0, 11.0, 2.0, 11.0]]},
            {"id": 2, "image_id": 2, "category_id": 1, "iscrowd": 1, "bbox": [0.0, 0.0, 4.0, 2.0],
             "segmentation": {"size": [HEIGHT, WIDTH], "counts": [0, 2, HEIGHT - 2, 2, HEIGHT - 2, 2, HEIGHT - 2, 2,
                                                                   HEIGHT * WIDTH - 4 * HEIGHT + HEIGHT - 2]}},
        ],
        "categories": [dict(c) for c in CATEGORIES],
    }


def _panoptic_ids() -> np.ndarray:
    ids = np.full((HEIGHT, WIDTH), 7, dtype=np.int64)  # segment 7: stuff
    ids[3:11, 2:12] = 5  # segment 5: a thing
    return ids


def _panoptic() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": WIDTH, "height": HEIGHT},
                   {"id": 2, "file_name": "b.png", "width": WIDTH, "height": HEIGHT}],
        "annotations": [{"image_id": i, "file_name": f"{stem}.png",
                         "segments_info": [{"id": 5, "category_id": 1}, {"id": 7, "category_id": 2}]}
                        for i, stem in ((1, "a"), (2, "b"))],
        "categories": [dict(c) for c in CATEGORIES],
    }


def _write_ids(path: Path, ids: np.ndarray) -> None:
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "coco"
    for sub in ("images", "annotations", "panoptic", "semantic"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for stem in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(root / "images" / f"{stem}.png")
        _write_ids(root / "panoptic" / f"{stem}.png", _panoptic_ids())
        Image.fromarray(np.where(_panoptic_ids() == 5, 1, 2).astype(np.uint8)).save(root / "semantic" / f"{stem}.png")
    (root / "annotations" / "instances.json").write_text(json.dumps(_instances()))
    (root / "annotations" / "panoptic.json").write_text(json.dumps(_panoptic()))
    return root


def _set_instances(root: Path, edit) -> None:
    data = _instances()
    edit(data)
    (root / "annotations" / "instances.json").write_text(json.dumps(data))


def _set_panoptic(root: Path, edit) -> None:
    data = _panoptic()
    edit(data)
    (root / "annotations" / "panoptic.json").write_text(json.dumps(data))


def _annotation(data: dict, **values) -> None:
    data["annotations"][0].update(values)


def _truncate(path: Path, keep: float = 0.5) -> None:
    payload = path.read_bytes()
    path.write_bytes(payload[: int(len(payload) * keep)])


def test_the_valid_folder_loads(folder):
    data = load_coco_folder(folder)
    assert data.num_rows == 2 and set(data.column_names) >= {"objects", "panoptic", "segments_info", "semantic"}
    assert [len(objects) for objects in data["objects"]] == [1, 1]
    assert data[0]["segments_info"][0]["area"] == 80 and data[0]["segments_info"][0]["bbox"] == [2, 3, 10, 8]


# ----------------------------------------------------------------------------------------------------------------
# Instance annotations: each edit of instances.json, the exception and the words of its message

INSTANCE_CASES = {
    "json size disagrees with the file": (
        lambda d: d["images"][0].update(width=64, height=48), ValueError, ["a.png", "64 x 48", "32 x 24"]),
    "polygon with a NaN coordinate": (
        lambda d: _annotation(d, segmentation=[[2.0, 3.0, float("nan"), 3.0, 12.0, 11.0]]), ValueError,
        ["annotations[0]", "polygon 0", "non-finite"]),
    "polygon with an infinite coordinate": (
        lambda d: _annotation(d, segmentation=[[2.0, 3.0, float("inf"), 3.0, 12.0, 11.0]]), ValueError,
        ["annotations[0]", "non-finite"]),
    "polygon with an odd number of coordinates": (
        lambda d: _annotation(d, segmentation=[[2.0, 3.0, 12.0, 3.0, 12.0, 11.0, 2.0]]), ValueError,
        ["annotations[0]", "odd number", "7"]),
    "polygon of strings": (
        lambda d: _annotation(d, segmentation=[["2", "3", "12", "3", "12", "11"]]), ValueError,
        ["annotations[0]", "flat list of numbers"]),
    "uncompressed RLE counts short of height * width": (
        lambda d: d["annotations"][1]["segmentation"].update(counts=[0, 2, 10]), ValueError,
        ["annotations[1]", "sum to 12", "24x32", "768"]),
    "uncompressed RLE counts beyond height * width": (
        lambda d: d["annotations"][1]["segmentation"].update(counts=[0, 2, 1000]), ValueError,
        ["annotations[1]", "sum to 1002", "768"]),
    "uncompressed RLE with a negative count": (
        lambda d: d["annotations"][1]["segmentation"].update(counts=[0, -2, 770]), ValueError,
        ["annotations[1]", "non-negative"]),
    "compressed RLE counts short of height * width": (
        lambda d: d["annotations"][1]["segmentation"].update(counts="0220"), ValueError,
        ["annotations[1]", "compressed RLE counts sum to 6", "768"]),
    "empty compressed RLE": (
        lambda d: d["annotations"][1]["segmentation"].update(counts=""), ValueError,
        ["annotations[1]", "sum to 0", "768"]),
    "compressed RLE of invalid characters": (
        lambda d: d["annotations"][1]["segmentation"].update(counts="0z1~"), ValueError,
        ["annotations[1]", "invalid character 'z'"]),
    "RLE of another size than the image": (
        lambda d: d["annotations"][1]["segmentation"].update(size=[10, 10], counts=[0, 100]), ValueError,
        ["annotations[1]", "[10, 10]", "[24, 32]"]),
    "RLE without counts": (
        lambda d: d["annotations"][1].update(segmentation={"size": [HEIGHT, WIDTH]}), ValueError,
        ["annotations[1]", "'counts'"]),
    "category id not in categories": (
        lambda d: _annotation(d, category_id=9), ValueError, ["annotations[0]", "category_id 9", "[1, 2]"]),
    "box with a negative width": (
        lambda d: _annotation(d, bbox=[12.0, 3.0, -10.0, 8.0]), ValueError, ["annotations[0]", "negative width"]),
    "box outside the image": (
        lambda d: _annotation(d, bbox=[30.0, 3.0, 10.0, 8.0]), ValueError, ["annotations[0]", "outside", "32 x 24"]),
    "box with a NaN": (
        lambda d: _annotation(d, bbox=[float("nan"), 3.0, 10.0, 8.0]), ValueError, ["annotations[0]", "non-finite"]),
    "box of three numbers": (
        lambda d: _annotation(d, bbox=[2.0, 3.0, 10.0]), ValueError, ["annotations[0]", "[x, y, width, height]"]),
    "annotation of an unknown image": (
        lambda d: _annotation(d, image_id=42), ValueError, ["annotations[0]", "unknown image id 42"]),
    "no categories at all": (lambda d: d.pop("categories"), KeyError, ["categories"]),
}


@pytest.mark.parametrize("case", list(INSTANCE_CASES))
def test_bad_instance_annotations_are_refused(case, folder):
    edit, error, words = INSTANCE_CASES[case]
    _set_instances(folder, edit)
    with pytest.raises(error) as info:
        load_coco_instances(folder)
    message = str(info.value)
    assert "instances.json" in message or "a.png" in message
    for word in words:
        assert word in message, (word, message)


def test_a_nan_polygon_fails_cleanly_in_a_fresh_process(folder):
    """The case that used to crash the process inside pycocotools: a separate interpreter exits with the error."""
    _set_instances(folder, INSTANCE_CASES["polygon with a NaN coordinate"][0])
    code = f"from maskdino_hf.data import load_coco_instances; load_coco_instances({str(folder)!r})"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1 and "ValueError" in done.stderr and "non-finite" in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("name", ["truncated", "not an image"])
def test_unreadable_image_files_are_named(name, folder):
    path = folder / "images" / "b.png"
    if name == "truncated":
        _truncate(path)
    else:
        path.write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="Cannot read image .*b.png"):
        load_coco_instances(folder)


def test_verify_images_false_reads_only_headers(folder):
    """For very large data sets: sizes still checked from the headers, decoding left to when a row is read."""
    _truncate(folder / "images" / "b.png")
    data = load_coco_folder(folder, verify_images=False)
    assert data.num_rows == 2 and data[0]["segments_info"][0]["area"] == 80
    with pytest.raises(OSError):
        data[1]["image"]
    _set_instances(folder, INSTANCE_CASES["json size disagrees with the file"][0])
    with pytest.raises(ValueError, match="64 x 48"):
        load_coco_instances(folder, verify_images=False)


def test_a_truncated_jpeg_is_named(folder):
    image = Image.open(folder / "images" / "a.png")
    image.save(folder / "images" / "a.jpg", quality=95)
    _truncate(folder / "images" / "a.jpg", 0.6)
    _set_instances(folder, lambda d: d["images"][0].update(file_name="a.jpg"))
    with pytest.raises(ValueError, match=r"a\.jpg.*truncated"):
        load_coco_instances(folder)


def test_a_missing_image_file_is_named(folder):
    (folder / "images" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"'b\.png' \(id 2\) not found"):
        load_coco_instances(folder)


def test_a_polygon_of_two_points_is_dropped_with_a_warning(folder):
    _set_instances(folder, lambda d: _annotation(d, segmentation=[[2.0, 3.0, 12.0, 3.0]]))
    with pytest.warns(UserWarning, match="fewer than 3 points; dropped"):
        data = load_coco_instances(folder)
    assert not rle_to_mask(data[0]["objects"][0]["segmentation"]).any()


def test_images_without_annotations_load_with_empty_objects(folder):
    _set_instances(folder, lambda d: d.update(annotations=[]))
    data = load_coco_instances(folder)
    assert [len(objects) for objects in data["objects"]] == [0, 0]
    ground_truth = dataset_to_coco_instances(data, CATEGORIES[:1])
    assert len(ground_truth["images"]) == 2 and ground_truth["annotations"] == []


# ----------------------------------------------------------------------------------------------------------------
# Panoptic and semantic annotations


def _png_with_an_unlisted_segment(root: Path) -> None:
    ids = _panoptic_ids()
    ids[0, 0] = 9
    _write_ids(root / "panoptic" / "a.png", ids)


PANOPTIC_CASES = {
    "PNG segment missing from segments_info": (
        _png_with_an_unlisted_segment, ValueError, ["a.png", "segment ids [9]", "not in segments_info"]),
    "segments_info id absent from the PNG": (
        lambda root: _set_panoptic(root, lambda d: d["annotations"][0]["segments_info"].append(
            {"id": 11, "category_id": 1})), ValueError, ["lists ids [11]", "do not occur", "a.png"]),
    "segment category not in categories": (
        lambda root: _set_panoptic(root, lambda d: d["annotations"][0]["segments_info"][0].update(category_id=5)),
        ValueError, ["segment 5", "category_id 5", "[1, 2]"]),
    "PNG of another size than the image": (
        lambda root: _write_ids(root / "panoptic" / "a.png", np.full((10, 10), 7)), ValueError,
        ["a.png", "10 x 10", "32 x 24"]),
    "missing PNG": (
        lambda root: (root / "panoptic" / "b.png").unlink(), FileNotFoundError, ["'b.png'", "not found"]),
    "truncated PNG": (
        lambda root: _truncate(root / "panoptic" / "b.png", 0.6), ValueError, ["Cannot read image", "b.png"]),
}


@pytest.mark.parametrize("case", list(PANOPTIC_CASES))
def test_bad_panoptic_annotations_are_refused(case, folder):
    edit, error, words = PANOPTIC_CASES[case]
    edit(folder)
    with pytest.raises(error) as info:
        load_coco_panoptic(folder / "annotations" / "panoptic.json", folder / "panoptic", folder / "images")
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_semantic_maps_of_another_size_are_refused(folder):
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(folder / "semantic" / "b.png")
    with pytest.raises(ValueError, match=r"Label map .*b\.png is 5x5 but image .*b\.png is 32x24"):
        load_semantic_folder(folder / "images", folder / "semantic")
    with pytest.raises(ValueError, match=r"Label map .*b\.png is 5x5"):
        load_coco_folder(folder)


def test_a_missing_semantic_map_is_named(folder):
    (folder / "semantic" / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"a\.png"):
        load_semantic_folder(folder / "images", folder / "semantic")


# ----------------------------------------------------------------------------------------------------------------
# `datasets` rows and the evaluation / CLI entry


def test_rows_with_bad_uncompressed_rle_are_refused():
    with pytest.raises(ValueError, match="objects\\[0\\].*sum to 3.*12"):
        rle_to_mask({"size": [3, 4], "counts": [1, 2]}, "objects[0]")


@pytest.mark.parametrize("edit, words", [
    (lambda o: o.update(bbox=[2.0, 3.0, -1.0, 8.0]), ["image 1: objects[0]", "negative width"]),
    (lambda o: o.update(bbox=[2.0, 3.0, 100.0, 8.0]), ["image 1: objects[0]", "outside the 32 x 24 image"]),
    (lambda o: o["segmentation"].update(size=[8, 8]), ["image 1: objects[0]", "[8, 8]", "[24, 32]"]),
    (lambda o: o["segmentation"].update(counts="0220"), ["image 1: objects[0]", "sum to 6", "768"]),
])
def test_ground_truth_rows_with_bad_objects_are_refused(edit, words, folder):
    rows = [dict(row) for row in load_coco_instances(folder).remove_columns("image")]
    edit(rows[0]["objects"][0])
    with pytest.raises(ValueError) as info:
        dataset_to_coco_instances(rows, CATEGORIES[:1])
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_semantic_classes_outside_the_categories_are_refused(folder):
    from maskdino_hf.evaluation import DatasetEvaluator

    evaluator = DatasetEvaluator(["semantic"], CATEGORIES, {0: 1, 1: 2}, 2)
    row = {"image_id": 1, "semantic": np.full((HEIGHT, WIDTH), 2, dtype=np.uint8)}
    assert evaluator.image_record(row, {"semantic": np.ones((HEIGHT, WIDTH), dtype=np.int64)})["semantic"] is not None
    row["semantic"][0, 0] = 9
    with pytest.raises(ValueError, match=r"image 1: the semantic map has class ids \[9\]"):
        evaluator.image_record(row, {"semantic": np.ones((HEIGHT, WIDTH), dtype=np.int64)})


def test_ground_truth_of_an_unknown_category_is_refused(folder):
    data = load_coco_instances(folder)
    with pytest.raises(ValueError, match=r"category ids \[1\] that are not in the categories \[2\]"):
        dataset_to_coco_instances(data, CATEGORIES[1:])


def test_evaluate_names_the_row_whose_image_cannot_be_decoded(folder):
    from conftest import tiny_config

    from maskdino_hf import MaskDINOForUniversalSegmentation, MaskDINOImageProcessor
    from maskdino_hf.evaluation import evaluate

    data = load_coco_instances(folder)
    _truncate(folder / "images" / "b.png")
    model = MaskDINOForUniversalSegmentation(tiny_config(num_labels=2, id2label={0: "thing", 1: "stuff"}))
    with pytest.raises(ValueError, match=r"row 1 \(b\.png\).*cannot decode its image"):
        evaluate(model, MaskDINOImageProcessor(num_labels=2), data, "instance", categories=CATEGORIES)


def test_cli_evaluate_reports_a_bad_annotation_file_in_one_line(folder, capsys):
    _set_instances(folder, lambda d: d["images"][0].update(width=64))
    assert cli.main(["evaluate", "--data", str(folder), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a.png" in err and "64 x 24" in err, err


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: atomic saving, resume that skips unfinished and broken ones, no pickle payload ever runs


class _Counter:
    def __init__(self):
        self.step = 3

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


def _accelerator_with_state():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    counter = _Counter()
    accelerator.register_for_checkpointing(counter)
    return accelerator, model, counter


@pytest.fixture
def checkpoints(tmp_path) -> Path:
    """checkpoint-2 and checkpoint-4 written by `save_checkpoint`, plus an unfinished checkpoint-6.tmp."""
    folder = tmp_path / "checkpoints"
    accelerator, model, _ = _accelerator_with_state()
    for step in (2, 4):
        with torch.no_grad():
            model.weight.fill_(step)
        save_checkpoint(accelerator, folder, step)
    (folder / "checkpoint-6.tmp").mkdir()
    (folder / "checkpoint-6.tmp" / "model.safetensors").write_bytes(b"half")
    return folder


class _Payload:
    """Unpickling this object would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_save_checkpoint_leaves_only_finished_folders(checkpoints):
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6.tmp"]
    assert (checkpoints / "checkpoint-4" / "model.safetensors").is_file()


def test_latest_skips_the_unfinished_checkpoint_and_loads(checkpoints):
    resume = resume_checkpoint("latest", checkpoints)
    assert resume == checkpoints / "checkpoint-4"
    accelerator, model, counter = _accelerator_with_state()
    counter.step = 0
    accelerator.load_state(str(resume))
    assert torch.all(model.weight == 4) and counter.step == 3


@pytest.mark.parametrize("file", ["model.safetensors", "optimizer.bin", "random_states_0.pkl",
                                  "custom_checkpoint_0.pkl"])
def test_a_truncated_checkpoint_file_is_named_and_latest_falls_back(file, checkpoints):
    bad = checkpoints / "checkpoint-4" / file
    _truncate(bad)
    with pytest.raises(CheckpointError) as info:
        resume_checkpoint(checkpoints / "checkpoint-4", checkpoints)
    assert str(bad) in str(info.value) and "the newest good checkpoint is" in str(info.value)
    assert str(checkpoints / "checkpoint-2") in str(info.value)
    with pytest.warns(UserWarning, match=f"skips .*checkpoint-4.*{file}"):
        assert resume_checkpoint("latest", checkpoints) == checkpoints / "checkpoint-2"


def test_a_pickle_payload_in_a_checkpoint_never_runs(checkpoints, tmp_path):
    marker = tmp_path / "payload-ran"
    for name in ("custom_checkpoint_0.pkl", "optimizer.bin"):
        target = checkpoints / "checkpoint-4" / name
        original = target.read_bytes()
        torch.save({"state": _Payload(marker)}, target)
        with pytest.raises(CheckpointError, match=f"{name}.*cannot be loaded"):
            check_checkpoint(checkpoints / "checkpoint-4")
        target.write_bytes(pickle.dumps(_Payload(marker)))
        with pytest.raises(CheckpointError, match=name):
            check_checkpoint(checkpoints / "checkpoint-4")
        assert not marker.exists()
        target.write_bytes(original)
    # and resuming "latest" does not load it either: the payload checkpoint is skipped, nothing runs
    torch.save(_Payload(marker), checkpoints / "checkpoint-4" / "custom_checkpoint_0.pkl")
    with pytest.warns(UserWarning, match="checkpoint-4"):
        resume = resume_checkpoint("latest", checkpoints)
    accelerator, _, _ = _accelerator_with_state()
    accelerator.load_state(str(resume))
    assert resume.name == "checkpoint-2" and not marker.exists()


@pytest.mark.parametrize("target, error, words", [
    ("checkpoint-6.tmp", CheckpointError, ["unfinished"]),
    ("checkpoint-8", FileNotFoundError, ["checkpoint not found", "checkpoint-8"]),
    ("checkpoint-2/model.safetensors", CheckpointError, ["is not a folder"]),
])
def test_resume_from_a_bad_path(target, error, words, checkpoints):
    with pytest.raises(error) as info:
        resume_checkpoint(checkpoints / target, checkpoints)
    for word in words:
        assert word in str(info.value)


def test_latest_without_any_good_checkpoint(tmp_path, checkpoints):
    with pytest.raises(FileNotFoundError, match="no good checkpoint-N folder"):
        resume_checkpoint("latest", tmp_path / "empty")
    for step in (2, 4):
        (checkpoints / f"checkpoint-{step}" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model weights"), pytest.warns(UserWarning):
        resume_checkpoint("latest", checkpoints)


def test_train_script_resumes_latest_past_unfinished_and_broken_checkpoints(tmp_path):
    """End to end: a run saved checkpoint-2; a later save was killed (checkpoint-3.tmp) and checkpoint-4 is
    truncated. `--resume-from latest` continues from checkpoint-2 (it used to crash on int('3.tmp'))."""
    from maskdino_hf.synthetic import generate_shapes_dataset

    data = tmp_path / "data"
    generate_shapes_dataset({"train": 4}, image_size=((64, 80), (64, 80)), seed=0).save_to_disk(str(data))
    config = {"backbone_config": {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [16, 32, 64, 128],
                                  "depths": [1, 1, 1, 1], "layer_type": "bottleneck",
                                  "out_features": ["stage1", "stage2", "stage3", "stage4"]},
              "feature_size": 32, "mask_feature_size": 32, "encoder_layers": 1, "encoder_attention_heads": 4,
              "encoder_ffn_dim": 32, "decoder_layers": 2, "decoder_ffn_dim": 32, "num_queries": 10,
              "denoising_num": 8, "train_num_points": 64}
    output = tmp_path / "run"
    common = [sys.executable, str(ROOT / "examples" / "train.py"), "--dataset", str(data), "--config-json",
              json.dumps(config), "--image-size", "64", "--batch-size", "2", "--output-dir", str(output),
              "--no-final-eval", "--no-progress", "--save-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([*common, "--max-steps", "2"], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoints = output / "checkpoints"
    shutil.copytree(checkpoints / "checkpoint-2", checkpoints / "checkpoint-3.tmp")
    shutil.copytree(checkpoints / "checkpoint-2", checkpoints / "checkpoint-4")
    _truncate(checkpoints / "checkpoint-4" / "model.safetensors")
    done = subprocess.run([*common, "--max-steps", "3", "--resume-from", "latest"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout + done.stderr and "checkpoint-2 at step 2" in done.stdout + done.stderr
    assert "skips" in done.stderr and "checkpoint-4" in done.stderr
    steps = [json.loads(line).get("step") for line in (output / "log.jsonl").read_text().splitlines()]
    assert steps[-1] == 3
    # an explicit broken path: exit status 2, one line naming the file and the good checkpoint
    done = subprocess.run([*common, "--max-steps", "3", "--resume-from", str(checkpoints / "checkpoint-4")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "checkpoint-4/model.safetensors" in done.stderr and "newest good checkpoint" in done.stderr
    assert "Traceback" not in done.stderr

