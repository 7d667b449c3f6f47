"""Folder runs that never lose work: bad images are reported with their path and reason and skipped, the rest is
written as it finishes, and the exit status says that some failed (`maskdino_hf.predict`, issue 15)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config
from maskdino_hf import MaskDINOForUniversalSegmentation, MaskDINOImageProcessor
from maskdino_hf.predict import BadImageError, input_size, load_image, min_input_side, predict_files
from maskdino_hf.synthetic import generate_shapes_split, id2label

SIZE = {"shortest_edge": 128, "longest_edge": 160}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    MaskDINOForUniversalSegmentation(tiny_config(id2label=id2label(), stuff_labels=[3, 4])).save_pretrained(folder)
    MaskDINOImageProcessor(size=SIZE, num_labels=5, stuff_labels=[3, 4]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def good_images() -> list[Image.Image]:
    return list(generate_shapes_split(2, image_size=((90, 130), (90, 130)), seed=7, split="test")["image"])


def test_folder_with_corrupt_and_elongated_images_keeps_the_good_results(model_dir, good_images, tmp_path):
    """The definition of done: a corrupt file, a 10000x50 image and two good images -> results for the good ones,
    a clear report of the rest, a non-zero exit status (3)."""
    folder = tmp_path / "images"
    folder.mkdir()
    good_images[0].save(folder / "a_good.png")
    good_images[1].save(folder / "d_good.jpg")
    (folder / "b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    Image.new("RGB", (10000, 50), (90, 140, 200)).save(folder / "c_strip.png")
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "maskdino_hf.cli", "predict", str(folder), "--model", str(model_dir), "--output-dir",
         str(out), "--device", "cpu", "--batch-size", "2", "--num-workers", "1", "--threshold", "0"],
        capture_output=True, text=True, timeout=600, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 3, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    # reported as they were met and again at the end, each with its path and reason
    assert f"skipped {folder / 'b_corrupt.png'}: unreadable" in done.stdout
    assert f"skipped {folder / 'c_strip.png'}: too elongated (10000x50" in done.stdout
    assert "skipped 2 of 4 image(s)" in done.stderr
    assert "predicted 2 image(s) in " in done.stdout and "images/s (batch size 2, 1 loader worker(s))" in done.stdout
    assert f"{folder / 'b_corrupt.png'}: unreadable" in done.stderr
    assert f"{folder / 'c_strip.png'}: too elongated" in done.stderr
    for name in ("a_good.png", "d_good.jpg"):
        assert f"{folder / name}: instance: " in done.stdout  # its summary line (visualization.summarize)

    report = json.loads((out / "predictions.json").read_text())
    assert [image["file_name"] for image in report["images"]] == ["a_good.png", "d_good.jpg"]
    assert {image_id["image_id"] for image_id in report["annotations"]} == {1, 4}  # ids follow the listing
    skipped = [entry["path"] for entry in report["skipped"]]
    assert skipped == [str(folder / "b_corrupt.png"), str(folder / "c_strip.png")]
    assert all((out / image["overlay"]).is_file() for image in report["images"])
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    # one line per image as its batch finished (batches pair similar sizes, so not in input order)
    assert sorted(line["image"]["id"] for line in lines if "image" in line) == [1, 4]
    assert sorted(line["skipped"]["path"] for line in lines if "skipped" in line) == skipped
    assert len(lines) == 4


def test_legitimate_unusual_images_are_handled(model_dir, good_images, tmp_path):
    """Tiny, 16-bit grey, RGBA, palette and moderately elongated images give results; a float image, a truncated
    file and an empty file are skipped with their reason (in-process run of `predict_files`)."""
    model = MaskDINOForUniversalSegmentation.from_pretrained(model_dir).eval()
    processor = MaskDINOImageProcessor.from_pretrained(model_dir)
    min_side = min_input_side(model)
    folder = tmp_path / "images"
    folder.mkdir()
    paths = {
        "tiny": folder / "tiny.png", "grey16": folder / "grey16.png", "rgba": folder / "rgba.png",
        "palette": folder / "palette.gif", "elongated": folder / "elongated.png", "float": folder / "float.tif",
        "truncated": folder / "truncated.jpg", "empty": folder / "empty.png",
    }
    Image.new("RGB", (3, 2), (200, 30, 30)).save(paths["tiny"])
    gradient = (np.arange(64 * 96, dtype=np.uint16).reshape(64, 96) * 10)
    Image.fromarray(gradient).save(paths["grey16"])
    good_images[0].convert("RGBA").save(paths["rgba"])
    good_images[1].convert("P").save(paths["palette"])
    elongated = (250, 50)  # processor resize: 160x32, under the model's minimum side -> the size rule's override
    Image.new("RGB", elongated, (10, 200, 10)).save(paths["elongated"])
    Image.fromarray(np.random.default_rng(0).random((40, 40), dtype=np.float32)).save(paths["float"])
    good_images[0].save(folder / "full.jpg")
    paths["truncated"].write_bytes((folder / "full.jpg").read_bytes()[:200])
    paths["empty"].write_bytes(b"")

    assert min(processor.get_resized_size(50, 250)) < min_side
    assert input_size(50, 250, processor, min_side) == {"shortest_edge": min_side, "longest_edge": None}
    with Image.open(paths["grey16"]) as raw:
        assert raw.mode.startswith("I")
    assert np.asarray(load_image(paths["grey16"]))[-1, -1, 0] == round(int(gradient[-1, -1]) / 257)

    logged: list[str] = []
    report = predict_files(list(paths.values()), model, processor, tmp_path / "out", task="panoptic",
                           log=logged.append)
    written = json.loads((tmp_path / "out" / "predictions.json").read_text())
    done = {Path(image["path"]).stem for image in written["images"]}
    assert done == {"tiny", "grey16", "rgba", "palette", "elongated"}
    reasons = {Path(entry["path"]).stem: entry["reason"] for entry in report.skipped}
    assert sorted(reasons) == ["empty", "float", "truncated"]
    assert reasons["float"].startswith("wrong mode: 'F'")
    assert reasons["truncated"].startswith("unreadable") and reasons["empty"].startswith("unreadable")
    for annotation in written["annotations"]:
        with Image.open(tmp_path / "out" / annotation["file_name"]) as png:
            info = next(i for i in written["images"] if i["id"] == annotation["image_id"])
            assert png.size == (info["width"], info["height"])  # maps at the original size, elongated one too
    assert sum(line.startswith("skipped ") for line in logged) == 3


def test_too_elongated_is_refused_with_the_numbers(model_dir):
    processor = MaskDINOImageProcessor.from_pretrained(model_dir)
    with pytest.raises(ValueError, match=r"too elongated \(10000x50, aspect ratio 200:1\).*at least 64 px"):
        input_size(50, 10000, processor, 64)
    assert input_size(90, 130, processor, 64) is None


def test_bad_image_error_names_the_file(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"not a png")
    with pytest.raises(BadImageError) as info:
        load_image(path)
    assert info.value.path == str(path) and str(info.value).startswith(f"{path}: unreadable")
    assert isinstance(info.value, ValueError)


def test_size_rule_enlarges_inputs_of_a_processor_without_resize(model_dir):
    """With `do_resize=False` an image under the model's minimum side is resized to it (aspect kept) instead of
    failing in the model; results come back at the original size, the large image goes through unchanged."""
    from maskdino_hf.predict import model_predict_fn

    model = MaskDINOForUniversalSegmentation.from_pretrained(model_dir).eval()
    processor = MaskDINOImageProcessor(do_resize=False, num_labels=5, stuff_labels=[3, 4])
    small, large = Image.new("RGB", (200, 40), (30, 90, 200)), Image.new("RGB", (96, 96), (200, 90, 30))
    assert input_size(40, 200, processor, min_input_side(model)) == {
        "shortest_edge": min_input_side(model), "longest_edge": None}
    assert input_size(96, 96, processor, min_input_side(model)) is None
    results = model_predict_fn(model, processor, ["instance", "semantic"])([small, large])
    assert results[0]["instance"]["masks"].shape[1:] == (40, 200) and results[0]["semantic"].shape == (40, 200)
    assert results[1]["instance"]["masks"].shape[1:] == (96, 96) and len(results[1]["instance"]["scores"]) > 0


def test_predict_dataset_rows_like_files(model_dir, good_images, tmp_path):
    """A `datasets` data set goes through the same path: rows named by `file_name`, results per row."""
    import datasets

    from maskdino_hf.predict import predict_dataset

    model = MaskDINOForUniversalSegmentation.from_pretrained(model_dir).eval()
    processor = MaskDINOImageProcessor.from_pretrained(model_dir)
    strip = Image.new("RGB", (10000, 50), (90, 140, 200))
    data = datasets.Dataset.from_dict({"image": [good_images[0], strip, good_images[1]],
                                       "file_name": ["a.png", "strip.png", "b.png"]},
                                      features=datasets.Features({"image": datasets.Image(),
                                                                  "file_name": datasets.Value("string")}))
    report = predict_dataset(data, model, processor, tmp_path / "out", task="semantic", batch_size=2,
                             log=lambda _: None)
    written = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [image["file_name"] for image in written["images"]] == ["a.png", "b.png"]
    assert [image["id"] for image in written["images"]] == [1, 3]
    assert [entry["path"] for entry in report.skipped] == ["strip.png"]
    assert report.skipped[0]["reason"].startswith("too elongated")
    for image, source in zip(written["images"], (good_images[0], good_images[1])):
        assert (image["width"], image["height"]) == source.size
        assert (tmp_path / "out" / image["overlay"]).is_file()


def test_plan_batches_pairs_similar_sizes():
    """Portrait and landscape images alternate in the input; batched by size, no batch mixes them (no padding),
    unknown sizes come first, every image is planned once and windows do not mix."""
    from maskdino_hf.predict import plan_batches

    portrait, landscape = (200, 100), (100, 200)
    sizes = [portrait, landscape, portrait, None, landscape, (90, 190)]
    plan = plan_batches(sizes, 2)
    assert sorted(index for batch in plan for index in batch) == list(range(6))
    assert plan == [[0, 3], [2, 5], [1, 4]]  # unknown first, then by aspect ratio and area; in input order within
    assert plan_batches(sizes, 1) == [[index] for index in range(6)]
    alternating = [landscape, portrait, portrait, landscape]
    assert plan_batches(alternating, 2) == [[1, 2], [0, 3]]
    assert plan_batches(alternating, 2, window=2) == [[0, 1], [2, 3]]  # each window of two batched on its own

    def padding(sizes, batches):
        padded = sum(len(batch) * max(sizes[i][0] for i in batch) * max(sizes[i][1] for i in batch)
                     for batch in batches)
        return padded - sum(sizes[i][0] * sizes[i][1] for batch in batches for i in batch)

    assert padding(alternating, [[0, 1], [2, 3]]) == 4 * 200 * 200 - 4 * 200 * 100  # input order: half padding
    assert padding(alternating, plan_batches(alternating, 2)) == 0


def _mixed_folder(folder: Path, good_images: list[Image.Image]) -> list[Path]:
    """Six good images of two shapes with a corrupt file and a float image among them (in the middle of batches)."""
    folder.mkdir()
    paths = []
    for index, image in enumerate(good_images):
        if index % 2:
            image = image.transpose(Image.Transpose.ROTATE_90)
        paths.append(folder / f"{2 * index:02d}_good.png")
        image.save(paths[-1])
        if index == 1:
            paths.append(folder / "03_corrupt.png")
            paths[-1].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
        if index == 3:
            paths.append(folder / "07_float.tif")
            Image.fromarray(np.zeros((40, 60), dtype=np.float32)).save(paths[-1])
    return paths


def test_workers_give_the_same_results_in_input_order(model_dir, tmp_path):
    """With 2 DataLoader workers the run writes exactly what it writes without workers: the same results, in
    input order in predictions.json, the bad files (in the middle of batches) skipped with their reason, and the
    images per second as the last log line."""
    model = MaskDINOForUniversalSegmentation.from_pretrained(model_dir).eval()
    processor = MaskDINOImageProcessor.from_pretrained(model_dir)
    images = list(generate_shapes_split(6, image_size=((90, 130), (140, 170)), seed=3, split="test")["image"])
    paths = _mixed_folder(tmp_path / "images", images)
    reports, logs = {}, {}
    for workers in (0, 2):
        logs[workers] = []
        predict_files(paths, model, processor, tmp_path / f"out{workers}", task="panoptic", batch_size=3,
                      num_workers=workers, log=logs[workers].append)
        reports[workers] = json.loads((tmp_path / f"out{workers}" / "predictions.json").read_text())
    assert reports[0] == reports[2]
    report = reports[2]
    good = [path for path in paths if path.stem.endswith("good")]
    assert [image["path"] for image in report["images"]] == [str(path) for path in good]
    assert [image["id"] for image in report["images"]] == [paths.index(path) + 1 for path in good]
    ids = [image["id"] for image in report["images"]]
    assert [annotation["image_id"] for annotation in report["annotations"]] == ids
    assert sum(len(annotation["segments_info"]) for annotation in report["annotations"]) > 0
    assert [Path(entry["path"]).name for entry in report["skipped"]] == ["03_corrupt.png", "07_float.tif"]
    assert report["skipped"][0]["reason"].startswith("unreadable")
    assert report["skipped"][1]["reason"].startswith("wrong mode")
    lines = (tmp_path / "out2" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == len(paths)
    for workers in (0, 2):
        last = logs[workers][-1]
        assert last.startswith(f"predicted {len(good)} image(s) in ") and "images/s" in last, last
        assert f"{workers} loader worker(s)" in last
        assert float(last.split(": ")[1].split(" images/s")[0]) > 0


def test_workers_start_where_processes_are_spawned(model_dir, good_images, tmp_path):
    """Where fork is unavailable (Windows, macOS default), workers are spawned: everything they get is picklable."""
    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(good_images):
        image.save(folder / f"{index}.png")
    (folder / "2_corrupt.png").write_bytes(b"not an image")
    script = tmp_path / "spawned.py"
    script.write_text(
        "import multiprocessing, sys\n"
        "from pathlib import Path\n"
        "if __name__ == '__main__':\n"
        "    multiprocessing.set_start_method('spawn')\n"
        "    from maskdino_hf import MaskDINOForUniversalSegmentation, MaskDINOImageProcessor\n"
        "    from maskdino_hf.predict import predict_files\n"
        "    model = MaskDINOForUniversalSegmentation.from_pretrained(sys.argv[1]).eval()\n"
        "    processor = MaskDINOImageProcessor.from_pretrained(sys.argv[1])\n"
        "    paths = sorted(Path(sys.argv[2]).iterdir())\n"
        "    report = predict_files(paths, model, processor, sys.argv[3], batch_size=2, num_workers=1)\n"
        "    print('DONE', report.num_images, len(report.skipped), multiprocessing.get_start_method())\n"
    )
    done = subprocess.run([sys.executable, str(script), str(model_dir), str(folder), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DONE 2 1 spawn" in done.stdout
    assert "1 loader worker(s)" in done.stdout
