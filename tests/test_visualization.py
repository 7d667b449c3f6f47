"""Overlays that tell the truth: legend swatches are the fill colours drawn, void is marked and counted, labels sit
inside their masks without overlapping, and the one-line summary counts what the result holds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from maskdino_hf import predict
from maskdino_hf.visualization import (
    VOID_STRIPE,
    draw_instances,
    draw_panoptic,
    draw_result,
    draw_semantic,
    segment_colors,
    segment_table,
    summarize,
)

ID2LABEL = {0: "circle", 1: "rectangle", 2: "triangle", 3: "sky", 4: "ground"}
H, W = 120, 160


def _image() -> Image.Image:
    """A bundled demo image (real texture and colours) at the test size."""
    return Image.open(predict.demo_images()[0]).convert("RGB").resize((W, H))


def _disc(cy: int, cx: int, r: int) -> np.ndarray:
    rows, cols = np.indices((H, W))
    return (rows - cy) ** 2 + (cols - cx) ** 2 <= r * r


def _panoptic() -> tuple[np.ndarray, list[dict]]:
    """Sky over ground, two circles and a rectangle; a void disc (no segment) and a void strip at the right."""
    seg = np.where(np.indices((H, W))[0] < 60, 1, 2)
    seg[_disc(30, 40, 18)] = 3
    seg[_disc(85, 45, 20)] = 4
    seg[70:110, 90:130] = 5
    seg[_disc(28, 110, 15)] = 0
    seg[:, 150:] = 0
    info = [
        {"id": 3, "label_id": 0, "isthing": True, "score": 0.9},
        {"id": 4, "label_id": 0, "isthing": True, "score": 0.8},
        {"id": 5, "label_id": 1, "isthing": True, "score": 0.7},
        {"id": 1, "label_id": 3, "isthing": False, "score": 1.0},
        {"id": 2, "label_id": 4, "isthing": False, "score": 1.0},
    ]
    return seg, info


def _display_masks(drawing: Image.Image, seg: np.ndarray, ids: list[int]) -> list[np.ndarray]:
    """Each id's mask at the drawing's scale (nearest neighbour, as the drawing enlarges it)."""
    scale = drawing.info["scale"]
    h, w = round(seg.shape[0] * scale), round(seg.shape[1] * scale)
    big = np.asarray(Image.fromarray(seg.astype(np.int32)).resize((w, h), Image.NEAREST))
    return [big == i for i in ids]


def _interior(mask: np.ndarray, drawing: Image.Image, margin: int = 4) -> np.ndarray:
    """Pixels of ``mask`` at least ``margin`` px from its border and outside every label box."""
    from scipy.ndimage import binary_erosion

    inner = binary_erosion(mask, iterations=margin)
    for label in drawing.info["labels"]:
        x0, y0, x1, y1 = label["box"]
        inner[max(0, y0 - 1) : y1 + 1, max(0, x0 - 1) : x1 + 1] = False
    return inner


def _swatches(drawing: Image.Image) -> list[tuple[str, np.ndarray]]:
    """(text, colour read from the drawing at the centre of its swatch) of every legend row."""
    pixels = np.asarray(drawing)
    rows = []
    for row in drawing.info["legend"]:
        x0, y0, x1, y1 = row["swatch"]
        rows.append((row["text"], pixels[(y0 + y1) // 2, (x0 + x1) // 2].astype(np.int64)))
    return rows


def _fills(drawing: Image.Image, masks: list[np.ndarray]) -> list[np.ndarray]:
    pixels = np.asarray(drawing)[: masks[0].shape[0], : masks[0].shape[1]]
    return [np.median(pixels[_interior(mask, drawing)], axis=0) for mask in masks]


def test_opaque_fills_equal_their_legend_swatch_exactly():
    seg, info = _panoptic()
    drawing = draw_panoptic(_image(), seg, info, id2label=ID2LABEL, alpha=1.0)
    masks = _display_masks(drawing, seg, [s["id"] for s in info])
    pixels = np.asarray(drawing)
    swatches = _swatches(drawing)
    assert len(swatches) == len(info) + 1 and swatches[-1][0].startswith("void")
    for mask, (text, swatch) in zip(masks, swatches):
        inner = _interior(mask, drawing)
        assert inner.sum() > 50, text
        assert (pixels[: mask.shape[0], : mask.shape[1]][inner] == swatch).all(), text


@pytest.mark.parametrize("mode", ["panoptic", "instance", "semantic"])
def test_every_fill_is_nearest_to_its_own_legend_swatch(mode):
    """With the default opacity each segment's colour, as seen, is matched to its own legend row, and no two
    segments share a colour."""
    seg, info = _panoptic()
    image = _image()
    if mode == "panoptic":
        ids = [s["id"] for s in info]
        drawing = draw_panoptic(image, seg, info, id2label=ID2LABEL)
    elif mode == "instance":
        ids = [3, 4, 5]
        masks = np.stack([seg == i for i in ids])
        drawing = draw_instances(image, [0, 0, 1], [0.9, 0.8, 0.7], masks=masks, id2label=ID2LABEL)
    else:
        label_map = np.full((H, W), 3)
        label_map[60:] = 4
        label_map[_disc(30, 40, 18) | _disc(85, 45, 20)] = 0
        label_map[70:110, 90:130] = 1
        seg, ids = label_map, [0, 1, 3, 4]
        drawing = draw_semantic(image, label_map, id2label=ID2LABEL)
    swatches = [colour for text, colour in _swatches(drawing) if not text.startswith("void")]
    assert len(swatches) == len(ids)
    assert len({tuple(c) for c in swatches}) == len(swatches), "two segments share a colour"
    for k, fill in enumerate(_fills(drawing, _display_masks(drawing, seg, ids))):
        distances = [np.linalg.norm(fill - swatch) for swatch in swatches]
        assert int(np.argmin(distances)) == k, (mode, k, fill, swatches)
        if mode == "semantic":  # nearly opaque: the colour seen is the swatch's
            assert distances[k] < 45, (fill, swatches[k])


def test_one_colour_per_segment_even_with_many_segments_of_one_class():
    labels = [7] * 40 + list(range(133)) * 2
    colours = segment_colors(labels)
    assert len(set(colours)) == len(labels)
    assert all(max(c) - min(c) > 40 for c in colours), "a grey colour would read as void"


@pytest.mark.parametrize("mode", ["panoptic", "semantic"])
def test_void_pixels_are_hatched_and_counted_in_the_legend(mode):
    seg, info = _panoptic()
    image = _image()
    if mode == "panoptic":
        drawing = draw_panoptic(image, seg, info, id2label=ID2LABEL)
        void = seg == 0
    else:
        label_map = np.where(seg == 0, 255, np.where(np.indices((H, W))[0] < 60, 3, 4))
        drawing = draw_semantic(image, label_map, id2label=ID2LABEL, ignore_index=255)
        void = label_map == 255
    legend = [row["text"] for row in drawing.info["legend"]]
    assert legend[-1] == f"void ({int(void.sum())} px)"
    big_void = _display_masks(drawing, void.astype(np.int64), [1])[0]
    pixels = np.asarray(drawing)[: big_void.shape[0], : big_void.shape[1]]
    stripes = (pixels == VOID_STRIPE).all(axis=-1)
    share = stripes[big_void].mean()
    assert 0.1 < share < 0.5, share
    assert stripes[~big_void].mean() < 0.001
    # the legend's void swatch shows the same stripes
    x0, y0, x1, y1 = drawing.info["legend"][-1]["swatch"]
    assert (np.asarray(drawing)[y0 + 1 : y1, x0 + 1 : x1] == VOID_STRIPE).all(axis=-1).any()


def test_nothing_is_hatched_without_void():
    seg, info = _panoptic()
    seg[seg == 0] = 1
    drawing = draw_panoptic(_image(), seg, info, id2label=ID2LABEL)
    assert not any(row["text"].startswith("void") for row in drawing.info["legend"])
    assert (np.asarray(drawing) == VOID_STRIPE).all(axis=-1).mean() < 0.001


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_labels_sit_inside_their_masks_without_overlap():
    """A crowded scene: 24 small squares side by side, a large background and two overlapping instances."""
    seg = np.full((H, W), 1)
    info = [{"id": 1, "label_id": 3, "isthing": False}]
    for k, (r, c) in enumerate(itertools.product(range(4), range(6))):
        seg[5 + r * 22 : 25 + r * 22, 4 + c * 26 : 28 + c * 26] = 10 + k
        info.append({"id": 10 + k, "label_id": k % 3, "isthing": True, "score": 0.5 + k / 100})
    drawing = draw_panoptic(_image(), seg, info, id2label=ID2LABEL)
    masks = _display_masks(drawing, seg, [s["id"] for s in info])
    labels = drawing.info["labels"]
    assert {label["segment"] for label in labels} == set(range(len(info)))
    for label in labels:
        x0, y0, x1, y1 = label["box"]
        assert masks[label["segment"]][(y0 + y1) // 2, (x0 + x1) // 2], label
        assert masks[label["segment"]][y0:y1, x0:x1].all(), label  # the squares are big enough for a full tag
    for a, b in itertools.combinations(labels, 2):
        assert not _overlaps(a["box"], b["box"]), (a, b)

    masks = np.stack([_disc(60, 60, 40), _disc(60, 90, 40)])
    drawing = draw_instances(_image(), [0, 0], [0.9, 0.8], masks=masks, id2label=ID2LABEL, min_size=0)
    first, second = sorted(drawing.info["labels"], key=lambda label: label["segment"])
    assert not _overlaps(first["box"], second["box"])
    # the second instance is drawn under the first: its tag sits in the part that stays visible
    visible = masks[1] & ~masks[0]
    x0, y0, x1, y1 = second["box"]
    assert visible[(y0 + y1) // 2, (x0 + x1) // 2]


def test_label_text_contrasts_with_its_box():
    """Each tag is drawn in black or white, whichever contrasts most with the segment's colour (WCAG ratio)."""

    def luminance(color) -> float:
        channel = np.asarray(color, dtype=np.float64) / 255
        channel = np.where(channel <= 0.03928, channel / 12.92, ((channel + 0.055) / 1.055) ** 2.4)
        return float(channel @ [0.2126, 0.7152, 0.0722])

    seg, info = _panoptic()
    drawing = draw_panoptic(_image(), seg, info, id2label=ID2LABEL)
    pixels = np.asarray(drawing)
    colours = segment_colors([s["label_id"] for s in info])
    for label in drawing.info["labels"]:
        x0, y0, x1, y1 = label["box"]
        fill = colours[label["segment"]]
        box = pixels[y0:y1, x0:x1].reshape(-1, 3)
        inks = [ink for ink in ((0, 0, 0), (255, 255, 255)) if (box == ink).all(axis=1).any()]
        assert len(inks) == 1, label
        ratios = {ink: (max(luminance(ink), luminance(fill)) + 0.05) / (min(luminance(ink), luminance(fill)) + 0.05)
                  for ink in ((0, 0, 0), (255, 255, 255))}
        assert ratios[inks[0]] == max(ratios.values()), (label, fill)
        assert ratios[inks[0]] >= 4.0, (label, fill)


def test_summary_and_table_count_what_the_result_holds():
    seg, info = _panoptic()
    void = int((seg == 0).sum())
    panoptic = {"segmentation": seg, "segments_info": info}
    assert summarize(panoptic, ID2LABEL, "panoptic") == (
        f"panoptic: 5 segments (circle 2, rectangle 1, sky 1, ground 1), void {void} px "
        f"({100 * void / seg.size:.1f}%)"
    )
    rows = segment_table(panoptic, ID2LABEL, "panoptic")
    assert [(row["id"], row["label"]) for row in rows] == [(3, "circle"), (4, "circle"), (5, "rectangle"),
                                                          (1, "sky"), (2, "ground")]
    assert rows[2]["area"] == 40 * 40 and rows[2]["box"] == [90, 70, 130, 110]

    boxes = np.array([[1, 2, 11, 22], [5, 5, 15, 10], [0, 0, 4, 4]], dtype=np.float32)
    instances = {"labels": np.array([2, 0, 2]), "scores": np.array([0.9, 0.7, 0.6]), "boxes": boxes}
    assert summarize(instances, ID2LABEL, "instance") == "instance: 3 instances (circle 1, triangle 2)"
    assert summarize(instances, ID2LABEL, "detection") == "detection: 3 detections (circle 1, triangle 2)"
    assert [row["area"] for row in segment_table(instances, ID2LABEL, "detection")] == [200, 50, 16]
    as_tensors = {key: torch.as_tensor(value) for key, value in instances.items()}  # as the predict path has them
    assert summarize(as_tensors, ID2LABEL, "instance") == "instance: 3 instances (circle 1, triangle 2)"
    empty = {"labels": np.zeros(0, int), "scores": np.zeros(0), "boxes": np.zeros((0, 4))}
    assert summarize(empty, ID2LABEL, "instance") == "instance: 0 instances"
    assert summarize({**empty, "masks": np.zeros((0, 7, 9), bool)}, ID2LABEL, "instance") == "instance: 0 instances"

    label_map = np.full((10, 20), 3)
    label_map[5:] = 4
    label_map[0:2, 0:5] = 0
    assert summarize(label_map, ID2LABEL, "semantic") == "semantic: 3 classes (circle 5.0%, sky 45.0%, ground 50.0%)"
    with pytest.raises(ValueError, match="task must be one of"):
        summarize(label_map, ID2LABEL, "depth")


@pytest.fixture(scope="module")
def demo_predictions():
    """The bundled model's results of all four tasks on the first bundled image, through the CLI's predict path."""
    model, processor = predict.load_model_and_processor(None)
    image = predict.load_image(predict.demo_images()[0])
    run = predict.model_predict_fn(model, processor, ["instance", "detection", "panoptic", "semantic"],
                                   threshold=predict.DEFAULT_INSTANCE_THRESHOLD)
    return image, run([image])[0], model.config.id2label


@pytest.mark.parametrize("task", ["instance", "detection", "panoptic", "semantic"])
def test_bundled_model_drawings_list_every_segment_and_the_void(task, demo_predictions):
    image, results, id2label = demo_predictions
    result = results[task]
    rows = segment_table(result, id2label, task)
    assert rows, f"the bundled model found nothing ({task})"
    drawing = draw_result(image, result, id2label, task)
    legend = [row["text"] for row in drawing.info["legend"]]
    void = int((np.asarray(result["segmentation"]) <= 0).sum()) if task == "panoptic" else 0
    assert len(legend) == len(rows) + (1 if void else 0)
    if void:
        assert legend[-1] == f"void ({void} px)"
    assert {label["segment"] for label in drawing.info["labels"]} == set(range(len(rows)))
    for row, text in zip(rows, legend):
        assert text.startswith(row["label"])
