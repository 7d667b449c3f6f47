"""Synthetic shapes data set: determinism, internal consistency, save/load and COCO-folder round trips, loaders."""

from __future__ import annotations

import json

import numpy as np
import pytest

import datasets
from maskdino_hf.data import (
    dataset_to_coco_instances,
    load_coco_folder,
    load_coco_instances,
    load_coco_panoptic,
    load_semantic_folder,
    mask_to_bbox,
    read_categories,
    panoptic_ids,
    rle_to_mask,
)
from maskdino_hf.synthetic import (
    SHAPES_CATEGORIES,
    export_coco_folder,
    generate_shapes_dataset,
    generate_shapes_split,
    id2label,
    main,
    make_synthetic_dataset,
)

THING_IDS = {c["id"] for c in SHAPES_CATEGORIES if c["isthing"]}
STUFF_IDS = {c["id"] for c in SHAPES_CATEGORIES if not c["isthing"]}


@pytest.fixture(scope="module")
def shapes():
    return generate_shapes_dataset({"train": 8, "validation": 3}, image_size=((128, 176), (128, 192)), seed=3)


def _arrays(example: dict) -> dict:
    out = dict(example)
    for key in ("image", "panoptic", "semantic"):
        if key in out:
            out[key] = np.asarray(out[key])
    return out


def _assert_examples_equal(a: dict, b: dict, skip=()):
    a, b = _arrays(a), _arrays(b)
    assert set(a) - set(skip) == set(b) - set(skip)
    for key in a:
        if key in skip:
            continue
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert a[key] == b[key], key


def test_categories_and_labels():
    assert id2label() == {0: "circle", 1: "rectangle", 2: "triangle", 3: "sky", 4: "ground"}
    assert id2label(things_only=True) == {0: "circle", 1: "rectangle", 2: "triangle"}
    assert [c["id"] for c in SHAPES_CATEGORIES] == list(range(len(SHAPES_CATEGORIES)))
    assert all(len(c["color"]) == 3 for c in SHAPES_CATEGORIES)


def test_layout(shapes):
    assert isinstance(shapes, datasets.DatasetDict)
    assert set(shapes) == {"train", "validation"}
    assert shapes["train"].num_rows == 8 and shapes["validation"].num_rows == 3
    features = shapes["train"].features
    assert isinstance(features["image"], datasets.Image)
    assert isinstance(features["panoptic"], datasets.Image)
    assert isinstance(features["semantic"], datasets.Image)
    assert shapes["train"].column_names == [
        "image", "image_id", "file_name", "width", "height", "objects", "panoptic", "segments_info", "semantic"
    ]
    ex = shapes["train"][0]
    assert set(ex["objects"][0]) == {"id", "bbox", "category_id", "segmentation", "area", "iscrowd"}
    assert isinstance(ex["objects"][0]["segmentation"]["counts"], str)
    assert set(ex["segments_info"][0]) == {"id", "category_id", "isthing", "iscrowd", "area", "bbox"}
    assert ex["image"].mode == "RGB" and ex["panoptic"].mode == "RGB" and ex["semantic"].mode == "L"
    # default split sizes
    ds = generate_shapes_dataset(8, image_size=128, seed=0)
    assert (ds["train"].num_rows, ds["validation"].num_rows) == (6, 2)


def test_deterministic():
    a = generate_shapes_dataset({"train": 3, "validation": 2}, image_size=(128, 144), seed=7)
    b = generate_shapes_dataset({"train": 3, "validation": 2}, image_size=(128, 144), seed=7)
    for split in a:
        for i in range(a[split].num_rows):
            _assert_examples_equal(a[split][i], b[split][i])
    # image i of a split does not depend on the split's size
    longer = generate_shapes_split(5, image_size=(128, 144), seed=7, split="train")
    for i in range(3):
        _assert_examples_equal(a["train"][i], longer[i])
    # another seed and another split give other images
    c = generate_shapes_split(1, image_size=(128, 144), seed=8, split="train")
    assert not np.array_equal(np.asarray(c[0]["image"]), np.asarray(a["train"][0]["image"]))
    assert not np.array_equal(np.asarray(a["validation"][0]["image"]), np.asarray(a["train"][0]["image"]))


def test_annotations_are_consistent(shapes):
    for split in shapes.values():
        for ex in split:
            h, w = ex["height"], ex["width"]
            assert 128 <= h <= 176 and 128 <= w <= 192
            image = np.asarray(ex["image"])
            ids = panoptic_ids(np.asarray(ex["panoptic"]))
            semantic = np.asarray(ex["semantic"])
            assert image.shape == (h, w, 3) and ids.shape == (h, w) and semantic.shape == (h, w)

            objects = ex["objects"]
            assert 1 <= len(objects) <= 5
            union = np.zeros((h, w), dtype=int)
            masks = []
            for obj in objects:
                mask = rle_to_mask(obj["segmentation"])
                assert obj["segmentation"]["size"] == [h, w]
                assert obj["category_id"] in THING_IDS
                assert obj["iscrowd"] == 0
                assert obj["area"] == mask.sum() >= 64  # objects are not tiny
                assert obj["bbox"] == [float(v) for v in mask_to_bbox(mask)]  # box = mask extent
                union += mask
                masks.append(mask)
            assert union.max() == 1  # visible masks are disjoint (occlusion resolved)

            segments = ex["segments_info"]
            assert (ids != 0).all()  # no void: every pixel has a segment
            assert sorted(np.unique(ids).tolist()) == sorted(s["id"] for s in segments)
            things = [s for s in segments if s["isthing"]]
            assert len(things) == len(objects)
            for seg, obj, mask in zip(things, objects, masks):  # things are listed in the order of objects
                assert seg["category_id"] == obj["category_id"]
                np.testing.assert_array_equal(ids == seg["id"], mask)
                assert seg["area"] == obj["area"]
            for seg in segments:
                region = ids == seg["id"]
                assert seg["area"] == region.sum() > 0
                assert seg["bbox"] == mask_to_bbox(region)
                assert seg["isthing"] == (seg["category_id"] in THING_IDS)
                assert seg["iscrowd"] == 0
                assert (semantic[region] == seg["category_id"]).all()  # semantic label matches
            stuff = [s["category_id"] for s in segments if not s["isthing"]]
            assert len(stuff) == len(set(stuff)) >= 1 and set(stuff) <= STUFF_IDS


def test_save_to_disk_round_trip(shapes, tmp_path):
    shapes.save_to_disk(str(tmp_path / "hf"))
    loaded = datasets.load_from_disk(str(tmp_path / "hf"))
    assert loaded["train"].features == shapes["train"].features
    for split in shapes:
        for i in range(shapes[split].num_rows):
            _assert_examples_equal(shapes[split][i], loaded[split][i])


def test_export_coco_folder_round_trip(shapes, tmp_path):
    split = shapes["validation"]
    folder = tmp_path / "coco"
    paths = export_coco_folder(split, folder)
    for sub in ("images", "panoptic", "semantic"):
        assert len(list((folder / sub).glob("*.png"))) == split.num_rows
    instances = json.loads((folder / "annotations" / "instances.json").read_text())
    assert [c["id"] for c in instances["categories"]] == sorted(THING_IDS)
    assert len(instances["annotations"]) == sum(len(o) for o in split["objects"])
    assert paths["instances"].endswith("instances.json")
    assert read_categories(folder) == SHAPES_CATEGORIES

    full = load_coco_folder(folder)
    assert full.column_names == split.column_names
    for i in range(split.num_rows):
        _assert_examples_equal(split[i], full[i])

    inst = load_coco_instances(folder)
    assert inst.column_names == ["image", "image_id", "file_name", "width", "height", "objects"]
    inst_json = load_coco_instances(folder / "annotations" / "instances.json", folder / "images", embed_images=True)
    pan = load_coco_panoptic(folder / "annotations" / "panoptic.json", folder / "panoptic", folder / "images")
    sem = load_semantic_folder(folder / "images", folder / "semantic")
    for i in range(split.num_rows):
        ex = split[i]
        _assert_examples_equal({k: ex[k] for k in inst.column_names}, inst[i])
        _assert_examples_equal({k: ex[k] for k in inst.column_names}, inst_json[i])
        _assert_examples_equal({k: ex[k] for k in pan.column_names}, pan[i])
        _assert_examples_equal({k: ex[k] for k in sem.column_names}, sem[i])

    # a data set loaded by path survives save_to_disk after its folder is gone
    full.save_to_disk(str(tmp_path / "saved"))
    import shutil

    shutil.rmtree(folder)
    again = datasets.load_from_disk(str(tmp_path / "saved"))
    _assert_examples_equal(split[0], again[0])


def test_make_synthetic_dataset_and_cli(tmp_path):
    paths = make_synthetic_dataset(tmp_path / "out", num_train=2, num_val=1, seed=1, image_size=128)
    assert set(paths) == {"train", "validation", "hf"}
    train = load_coco_folder(paths["train"])
    assert train.num_rows == 2
    hf = datasets.load_from_disk(paths["hf"])
    assert hf["validation"].num_rows == 1
    _assert_examples_equal(hf["train"][1], train[1])
    main([str(tmp_path / "cli"), "--num-train", "1", "--num-val", "1", "--image-size", "128", "--no-hf"])
    assert (tmp_path / "cli" / "validation" / "annotations" / "panoptic.json").is_file()
    assert not (tmp_path / "cli" / "hf").exists()


def _write_png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)


def test_loader_converts_polygons_and_fills_defaults(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    _write_png(tmp_path / "images" / "a.png", np.zeros((20, 30, 3), dtype=np.uint8))
    coco = {
        "images": [{"id": 5, "file_name": "a.png"}],  # no width/height: read from the file
        "annotations": [
            {"image_id": 5, "category_id": 7, "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]},  # polygon, no area
            {"id": 9, "image_id": 5, "category_id": 8, "bbox": [20, 0, 5, 4], "iscrowd": 0},  # box only
        ],
        "categories": [{"id": 7, "name": "seven"}, {"id": 8, "name": "eight"}],
    }
    (tmp_path / "annotations" / "instances.json").write_text(json.dumps(coco))
    ds = load_coco_instances(tmp_path)
    ex = ds[0]
    assert (ex["image_id"], ex["width"], ex["height"]) == (5, 30, 20)
    poly, box = ex["objects"]
    mask = rle_to_mask(poly["segmentation"])
    assert poly["area"] == mask.sum() > 90
    assert poly["bbox"] == [float(v) for v in mask_to_bbox(mask)]
    assert (poly["id"], poly["iscrowd"], box["id"]) == (1, 0, 9)
    assert rle_to_mask(box["segmentation"]).sum() == 20
    assert read_categories(tmp_path) == [
        {"id": 7, "name": "seven", "isthing": 1}, {"id": 8, "name": "eight", "isthing": 1}
    ]
    gt = dataset_to_coco_instances(ds)
    assert [a["id"] for a in gt["annotations"]] == [1, 9]


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Image directory"):
        load_coco_instances(tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="instances.json"):
        load_coco_instances(tmp_path)
    (tmp_path / "annotations").mkdir()
    path = tmp_path / "annotations" / "instances.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "missing.png"}], "annotations": []}))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_coco_instances(tmp_path)
    _write_png(tmp_path / "images" / "missing.png", np.zeros((4, 4, 3), dtype=np.uint8))
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "missing.png"}]}))
    with pytest.raises(KeyError, match="annotations"):
        load_coco_instances(tmp_path)
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "missing.png"}],
                                "annotations": [{"image_id": 1, "segmentation": []}]}))
    with pytest.raises(KeyError, match="category_id"):
        load_coco_instances(tmp_path)
    with pytest.raises(ValueError, match="image_dir is required"):
        load_coco_instances(path)
    (tmp_path / "labels").mkdir()
    with pytest.raises(FileNotFoundError, match="no label map"):
        load_semantic_folder(tmp_path / "images", tmp_path / "labels")
    with pytest.raises(FileNotFoundError, match="No annotations"):
        load_coco_folder(_empty_coco(tmp_path))
    with pytest.raises(FileNotFoundError, match="Panoptic PNG directory"):
        load_coco_panoptic(tmp_path / "nope.json", tmp_path / "panoptic", tmp_path / "images")


def _empty_coco(tmp_path):
    folder = tmp_path / "empty"
    (folder / "images").mkdir(parents=True)
    return folder
