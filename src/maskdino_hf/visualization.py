"""Overlay drawings and one-line summaries of Mask DINO results, with PIL, numpy and scipy.

The pictures are meant to be read against their legend without guessing:

* the image is shown in grey, so every colour in the drawing is a prediction (an unlabelled red object cannot pass
  for a red segment);
* one colour per segment (instance, panoptic segment or semantic class; the ``k``-th segment of a class gets the
  ``k``-th shade of its class hue); the legend has one row per segment and its swatch is exactly the colour
  blended into that segment's pixels (``alpha`` of it over the grey image), outlines are near-black;
* each segment's label sits inside its own visible mask (at the interior point farthest from the border where the
  label box fits, found with a distance transform; other pieces of a split segment get one too where it fits), in
  a box of the segment's colour with black or white text, whichever contrasts more (WCAG); labels never overlap
  (a label that cannot be placed without overlap is left out of the image, its legend row stays);
* void pixels (panoptic id 0 or -1, semantic ``ignore_index``) are greyed and hatched, and the legend lists
  ``void (N px)``: what the model missed stays visible;
* semantic maps are drawn nearly opaque (``alpha`` 0.8) so their colours are the legend's.

Drawing functions: :func:`draw_instances` (instance masks, or boxes only for detection), :func:`draw_panoptic`,
:func:`draw_semantic`, and :func:`draw_result` that picks one by task for the results of the predict path.
Text: :func:`summarize` (one line per image, counts per class) and :func:`segment_table` (one row per segment).

Drawings take the image as a PIL image or an ``(H, W, 3)`` uint8 array and predictions at the image's size (tensors
or numpy arrays) and return a new RGB :class:`PIL.Image.Image`. Small images are enlarged for display
(``min_size``: the short side of the drawing, default 480 px; ``0`` keeps the size) so the text stays readable.
The returned image's ``info`` holds what was drawn where (``"labels"``: text and box of each in-image label;
``"legend"``: text, colour and swatch box of each legend row; ``"scale"``: display scale), for tests and callers
that place their own annotations.
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from transformers.utils import to_numpy

__all__ = [
    "TASKS",
    "class_color",
    "draw_instances",
    "draw_panoptic",
    "draw_result",
    "draw_semantic",
    "segment_colors",
    "segment_table",
    "summarize",
]

TASKS = ("instance", "panoptic", "semantic", "detection")

_LEGEND_BG = (255, 255, 255)
_LEGEND_FG = (20, 20, 20)
# Void: the image in light grey under dark diagonal stripes (slate, a tint the grey image never has).
VOID_STRIPE = (40, 40, 56)
_VOID_GREY = 210
_OUTLINE = (25, 25, 25)
_DEFAULT_ALPHA = {"instance": 0.6, "panoptic": 0.6, "semantic": 0.8}


# (saturation, value) of the 1st, 2nd, ... segment of a class: its class colour, then darker and lighter shades.
_SHADES = [(0.65, 0.9), (0.95, 0.55), (0.35, 1.0), (1.0, 0.38)]


def segment_colors(labels: Sequence[int]) -> list[tuple[int, int, int]]:
    """One distinct colour per segment of ``labels`` (class ids in drawing order): the ``k``-th segment of a class
    gets the ``k``-th shade of its class hue (a golden-ratio walk over hues, so neighbouring ids differ), so a
    class keeps its colour family in every image and mode. No greys: grey means "no prediction"."""
    seen: dict[int, int] = {}
    colors: list[tuple[int, int, int]] = []
    for label in labels:
        k = seen.get(int(label), 0)
        seen[int(label)] = k + 1
        saturation, value = _SHADES[k % len(_SHADES)]
        shift = (k // len(_SHADES)) * 0.045 * (-1) ** (k // len(_SHADES))
        hue = (int(label) + 3) * 0.618033988749895 + shift
        color = None
        while color is None or color in colors:  # another class's shade landed on the same colour: nudge the hue
            r, g, b = colorsys.hsv_to_rgb(hue % 1.0, saturation, value)
            color = (int(r * 255), int(g * 255), int(b * 255))
            hue += 0.007
        colors.append(color)
    return colors


def class_color(label: int) -> tuple[int, int, int]:
    """The colour of class ``label`` (the first shade of :func:`segment_colors`)."""
    return segment_colors([label])[0]


def _to_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = to_numpy(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image must be a PIL image or an (H, W, 3) array, got shape {array.shape}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    return Image.fromarray(array[..., :3])


def _label_name(label: int, id2label: Mapping[int, str] | None) -> str:
    if id2label:
        name = id2label.get(int(label), id2label.get(str(int(label))))  # type: ignore[arg-type]
        if name is not None:
            return str(name)
    return f"class {int(label)}"


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no scalable default font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _text_color(background: Sequence[int]) -> tuple[int, int, int]:
    """Black or white, whichever has the higher WCAG 2 contrast ratio with ``background``: black wins when the
    relative luminance ``L`` has ``(L + 0.05) / 0.05 > 1.05 / (L + 0.05)``."""
    channel = np.asarray(background[:3], dtype=np.float64) / 255
    linear = np.where(channel <= 0.03928, channel / 12.92, ((channel + 0.055) / 1.055) ** 2.4)
    luminance = float(linear @ [0.2126, 0.7152, 0.0722])
    return (0, 0, 0) if (luminance + 0.05) ** 2 > 0.0525 else (255, 255, 255)


def _display_scale(height: int, width: int, min_size: int, max_size: int = 1600) -> float:
    if min_size <= 0 or min(height, width) >= min_size:
        return 1.0
    scale = min_size / min(height, width)
    return min(scale, max(1.0, max_size / max(height, width)))


def _resize_label_map(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of an integer map."""
    if array.shape == (height, width):
        return array
    rows = np.minimum((np.arange(height) + 0.5) * array.shape[0] / height, array.shape[0] - 1).astype(np.int64)
    cols = np.minimum((np.arange(width) + 0.5) * array.shape[1] / width, array.shape[1] - 1).astype(np.int64)
    return array[rows[:, None], cols[None, :]]


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _thicken(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:, :] |= out[:-1, :]
        grown[:-1, :] |= out[1:, :]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def _hatch(height: int, width: int) -> np.ndarray:
    """The diagonal stripe pattern marking void pixels (period and width grow with the drawing)."""
    period = max(8, round(min(height, width) / 48))
    thickness = max(2, period // 3)
    rows, cols = np.indices((height, width))
    return (rows + cols) % period < thickness


def _paint_void(canvas: np.ndarray, void: np.ndarray) -> np.ndarray:
    """Void pixels lightened towards a light grey (keeping some of the image) under dark diagonal stripes."""
    out = canvas.copy()
    if not void.any():
        return out
    luma = canvas[..., 0] * 0.299 + canvas[..., 1] * 0.587 + canvas[..., 2] * 0.114
    grey = np.clip(np.round(0.35 * luma + 0.65 * _VOID_GREY), 0, 255).astype(np.uint8)
    out[void] = grey[void][:, None]
    stripes = void & _hatch(*void.shape)
    out[stripes] = VOID_STRIPE
    return out


def _bounds(mask: np.ndarray, pad: int = 0) -> tuple[slice, slice] | None:
    """The slices of ``mask``'s bounding box grown by ``pad`` pixels (clipped to the array); ``None`` if empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    return (
        slice(max(0, rows[0] - pad), min(mask.shape[0], rows[-1] + 1 + pad)),
        slice(max(0, cols[0] - pad), min(mask.shape[1], cols[-1] + 1 + pad)),
    )


def _blend_layers(
    base: np.ndarray, layers: Sequence[tuple[np.ndarray, tuple[int, int, int]]], alpha: float, scale: float
) -> np.ndarray:
    """Paint ``(mask, colour)`` layers in order (later ones on top) with ``alpha`` and a near-black outline (a
    darker shade of the fill would read as another segment's colour)."""
    canvas = base.astype(np.float32)
    color_map = np.zeros_like(canvas)
    covered = np.zeros(base.shape[:2], dtype=bool)
    edges = np.zeros(base.shape[:2], dtype=bool)
    thickness = max(0, round(scale / 3))
    for mask, color in layers:
        box = _bounds(mask, pad=1)
        if box is None:
            continue
        crop = mask[box]
        color_map[box][crop] = color
        covered[box] |= crop
        edge = _thicken(_boundary(crop), thickness) & crop
        edges[box] &= ~crop  # a segment on top hides the outline below it
        edges[box] |= edge
    canvas[covered] = canvas[covered] * (1 - alpha) + color_map[covered] * alpha
    canvas[edges] = _OUTLINE
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


def _box_sums(region: np.ndarray, rows: np.ndarray, cols: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixels of ``region`` inside each ``height x width`` box whose top-left is ``(rows, cols)`` (outside = 0)."""
    integral = np.zeros((region.shape[0] + 1, region.shape[1] + 1), dtype=np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(region, axis=0), axis=1)
    r0 = np.clip(rows, 0, region.shape[0])
    r1 = np.clip(rows + height, 0, region.shape[0])
    c0 = np.clip(cols, 0, region.shape[1])
    c1 = np.clip(cols + width, 0, region.shape[1])
    return integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]


def _place_label(
    region: np.ndarray,
    offset: tuple[int, int],
    size: tuple[int, int],
    taken: Sequence[tuple[int, int, int, int]],
    margin: int = 1,
) -> tuple[tuple[int, int, int, int], float] | None:
    """A ``(x0, y0, x1, y1)`` label box of ``size`` (w, h) centred on a pixel of ``region`` (a crop whose top-left
    pixel is at ``offset`` = (y, x) in the drawing) and overlapping no box of ``taken``, and the share of the box
    inside ``region``.

    Among allowed centres the box most inside ``region`` wins, then the centre farthest from the region's border
    (the pole of inaccessibility when the label fits there). ``None`` when every centre is taken."""
    from scipy.ndimage import distance_transform_edt

    ys, xs = np.nonzero(region)
    if len(ys) == 0:
        return None
    w, h = size
    y0s, x0s = ys - h // 2, xs - w // 2
    gy0s, gx0s = y0s + offset[0], x0s + offset[1]
    allowed = np.ones(len(ys), dtype=bool)
    for bx0, by0, bx1, by1 in taken:
        allowed &= ~(
            (gx0s < bx1 + margin) & (gx0s + w > bx0 - margin) & (gy0s < by1 + margin) & (gy0s + h > by0 - margin)
        )
    if not allowed.any():
        return None
    distance = distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1][ys[allowed], xs[allowed]]
    inside = _box_sums(region, y0s[allowed], x0s[allowed], h, w) / float(w * h)
    best = int(np.argmax(np.round(inside, 3) * 1e6 + distance))
    x0, y0 = int(gx0s[allowed][best]), int(gy0s[allowed][best])
    return (x0, y0, x0 + w, y0 + h), float(inside[best])


@dataclass
class _Segment:
    """One drawn segment at display size: its mask (or box) and colour, its in-image tag and its legend row."""

    color: tuple[int, int, int]
    tag: str
    short_tag: str
    legend: str
    mask: np.ndarray | None = None
    box: tuple[float, float, float, float] | None = None


def _draw_labels(
    pil: Image.Image, segments: Sequence[_Segment], font, scale: float
) -> list[dict[str, Any]]:
    """Each segment's tag inside its visible region (segments earlier in the list are on top), no two overlapping.

    The largest connected piece of every segment gets a tag, the most constrained (smallest) pieces first; then
    other pieces (a class split in two by an object in front) get one where it fits entirely inside them. Returns
    what was drawn where."""
    from scipy.ndimage import find_objects
    from scipy.ndimage import label as connected_components

    draw = ImageDraw.Draw(pil)
    height, width = pil.height, pil.width
    required, optional = [], []  # (segment index, piece size, (y, x) offset, piece crop)
    above = np.zeros((height, width), dtype=bool)
    for index, segment in enumerate(segments):
        if segment.mask is not None:
            full = segment.mask
        else:
            full = np.zeros((height, width), dtype=bool)
            x0, y0, x1, y1 = (int(round(v)) for v in segment.box)
            full[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = True
        box = _bounds(full)
        if box is None:
            continue
        visible = full[box] & ~above[box]
        above[box] |= full[box]
        region = visible if visible.any() else full[box]
        pieces, count = connected_components(region)
        sizes = np.bincount(pieces.ravel(), minlength=count + 1)[1:]
        slices = find_objects(pieces)
        for rank, k in enumerate(np.argsort(-sizes, kind="stable")):
            rows, cols = slices[k]
            offset = (box[0].start + rows.start, box[1].start + cols.start)
            item = (index, int(sizes[k]), offset, pieces[rows, cols] == k + 1)
            (required if rank == 0 else optional).append(item)
    pad = max(2, round(scale))
    taken: list[tuple[int, int, int, int]] = []
    placed = []
    queue = sorted(required, key=lambda item: item[1]) + sorted(optional, key=lambda item: -item[1])
    for number, (index, _, offset, region) in enumerate(queue):
        must = number < len(required)
        segment = segments[index]
        choice = None
        for text in dict.fromkeys((segment.tag, segment.short_tag)):
            tw, th = _text_size(draw, text, font)
            found = _place_label(region, offset, (tw + 2 * pad + 2, th + 2 * pad + 2), taken)
            if found is not None and (choice is None or found[1] > choice[2]):
                choice = (text, found[0], found[1])
            if choice is not None and choice[2] >= 1.0:
                break
        if choice is None or (not must and choice[2] < 1.0):
            continue
        text, box, _ = choice
        taken.append(box)
        placed.append({"segment": index, "text": text, "box": box})
    for item in placed:
        color = segments[item["segment"]].color
        ink = _text_color(color)
        x0, y0, x1, y1 = item["box"]
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=tuple(color), outline=ink)
        left, top, _, _ = draw.textbbox((0, 0), item["text"], font=font)
        draw.text((x0 + pad + 1 - left, y0 + pad + 1 - top), item["text"], fill=ink, font=font)
    return placed


def _add_legend(
    canvas: Image.Image,
    entries: Sequence[tuple[tuple[int, int, int] | None, str]],
    title: str | None,
    font_size: int,
) -> tuple[Image.Image, list[dict[str, Any]]]:
    """``canvas`` with a white panel on the right listing ``(colour, text)`` rows (colour ``None``: the void
    hatch), in as many columns as the canvas height needs; and where each row's swatch is."""
    font = _font(font_size)
    title_font = _font(font_size + 2)
    probe = ImageDraw.Draw(canvas)
    lines = list(entries) if entries else [((255, 255, 255), "(nothing detected)")]
    line_h = max(_text_size(probe, "Ag", font)[1], font_size) + 8
    swatch = line_h - 6
    header = title or "segments"
    header_h = line_h + 12
    per_column = max(1, (canvas.height - header_h - 8) // line_h)
    columns = [lines[i : i + per_column] for i in range(0, len(lines), per_column)]
    column_w = [12 + swatch + 8 + max(_text_size(probe, text, font)[0] for _, text in column) for column in columns]
    panel_w = max(sum(column_w), _text_size(probe, header, title_font)[0] + 12) + 12
    needed_h = header_h + min(len(lines), per_column) * line_h + 8
    out = Image.new("RGB", (canvas.width + panel_w, max(canvas.height, needed_h)), _LEGEND_BG)
    out.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(out)
    draw.text((canvas.width + 12, 10), header, fill=_LEGEND_FG, font=title_font)
    rows = []
    x = canvas.width + 12
    for column, column_width in zip(columns, column_w):
        y = header_h
        for color, text in column:
            box = (x, y + 1, x + swatch, y + 1 + swatch)
            if color is None:
                patch = _paint_void(np.full((swatch, swatch, 3), 255, dtype=np.uint8), np.ones((swatch, swatch), bool))
                out.paste(Image.fromarray(patch), box[:2])
            else:
                draw.rectangle(box, fill=tuple(color))
            draw.rectangle(box, outline=(60, 60, 60))
            draw.text((x + swatch + 8, y + 2), text, fill=_LEGEND_FG, font=font)
            rows.append({"text": text, "color": None if color is None else tuple(color), "swatch": box})
            y += line_h
        x += column_width
    return out, rows


def _prepare(image: Any, min_size: int) -> tuple[Image.Image, float, int, int]:
    pil = _to_pil(image)
    scale = _display_scale(pil.height, pil.width, min_size)
    if scale != 1.0:
        pil = pil.resize((round(pil.width * scale), round(pil.height * scale)), Image.BILINEAR)
    return pil, scale, pil.height, pil.width


def _render(
    pil: Image.Image,
    scale: float,
    segments: Sequence[_Segment],
    void: np.ndarray | None,
    void_pixels: int,
    alpha: float,
    legend: bool,
    title: str | None,
    boxes: bool = False,
) -> Image.Image:
    """Void hatch, segment fills (first segment on top), boxes, tags and legend on ``pil``."""
    height, width = pil.height, pil.width
    canvas = np.repeat(np.asarray(pil.convert("L"))[..., None], 3, axis=-1)
    if void is not None:
        canvas = _paint_void(canvas, void)
    layers = [(s.mask, s.color) for s in reversed(segments) if s.mask is not None]
    drawing = Image.fromarray(_blend_layers(canvas, layers, alpha, scale) if layers else canvas)
    if boxes:
        draw = ImageDraw.Draw(drawing)
        line = max(2, round(scale * 1.5))
        for segment in reversed(segments):
            x0, y0, x1, y1 = segment.box
            x0, x1 = np.clip([x0, x1], 0, width - 1)
            y0, y1 = np.clip([y0, y1], 0, height - 1)
            draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=segment.color, width=line)
    labels = _draw_labels(drawing, segments, _font(max(11, round(height / 36))), scale)
    rows: list[dict[str, Any]] = []
    if legend:
        entries: list[tuple[tuple[int, int, int] | None, str]] = [(s.color, s.legend) for s in segments]
        if void_pixels:
            entries.append((None, f"void ({void_pixels} px)"))
        drawing, rows = _add_legend(drawing, entries, title, max(12, round(height / 32)))
    drawing.info.update({"labels": labels, "legend": rows, "scale": scale})
    return drawing


def draw_instances(
    image: Any,
    labels: Any,
    scores: Any | None = None,
    masks: Any | None = None,
    boxes: Any | None = None,
    id2label: Mapping[int, str] | None = None,
    alpha: float = _DEFAULT_ALPHA["instance"],
    min_size: int = 480,
    legend: bool = True,
    title: str | None = None,
) -> Image.Image:
    """Instances (or detections) over ``image``, one colour per instance for its mask, box, tag and legend row.

    Args:
        labels: ``(N,)`` class ids. scores: ``(N,)`` or ``None``.
        masks: ``(N, H, W)`` bool at the image's size, or ``None`` (boxes only).
        boxes: ``(N, 4)`` absolute ``xyxy`` boxes at the image's size, or ``None`` (masks only).
        id2label: class names (``config.id2label``).
        alpha: mask opacity. min_size: short side of the drawing (small images are enlarged), 0 = as is.
        legend: add the legend panel; title: its header (default ``"segments"``).
    The first instance is drawn on top (pass them sorted by decreasing score). Pixels outside every instance are
    not marked void: instance results do not claim to cover the image.
    """
    labels = to_numpy(labels).reshape(-1).astype(np.int64)
    n = len(labels)
    scores_np = None if scores is None else to_numpy(scores).reshape(-1).astype(np.float64)
    if scores_np is not None and len(scores_np) != n:
        raise ValueError(f"{n} labels but {len(scores_np)} scores")
    if masks is None and boxes is None:
        raise ValueError("draw_instances needs masks, boxes or both; got neither")
    pil, scale, height, width = _prepare(image, min_size)
    masks_np = None
    if masks is not None:
        masks_np = to_numpy(masks).astype(bool)
        if masks_np.ndim != 3 or masks_np.shape[0] != n:
            raise ValueError(f"masks must be (N, H, W) with N={n}, got {masks_np.shape}")
    boxes_np = None
    if boxes is not None:
        boxes_np = to_numpy(boxes).astype(np.float64).reshape(-1, 4) * scale
        if len(boxes_np) != n:
            raise ValueError(f"{n} labels but {len(boxes_np)} boxes")
    colors = segment_colors(labels.tolist())
    segments = []
    for i in range(n):
        name = _label_name(labels[i], id2label)
        text = name if scores_np is None else f"{name} {scores_np[i]:.2f}"
        mask = None
        if masks_np is not None:
            mask = _resize_label_map(masks_np[i], height, width)
        box = None if boxes_np is None else tuple(boxes_np[i])
        segments.append(_Segment(colors[i], text, name, text, mask=mask, box=box))
    return _render(pil, scale, segments, None, 0, alpha, legend, title, boxes=boxes_np is not None)


def draw_panoptic(
    image: Any,
    segmentation: Any,
    segments_info: Sequence[Mapping],
    id2label: Mapping[int, str] | None = None,
    alpha: float = _DEFAULT_ALPHA["panoptic"],
    min_size: int = 480,
    legend: bool = True,
    title: str | None = None,
) -> Image.Image:
    """A panoptic result over ``image``: ``segmentation`` is an ``(H, W)`` id map (0 or -1 = void) and
    ``segments_info`` lists ``{"id", "label_id" (or "category_id"), "isthing" (optional), "score" (optional)}``.
    One colour per segment; void pixels (no segment) are hatched and counted in the legend."""
    pil, scale, height, width = _prepare(image, min_size)
    original = to_numpy(segmentation).astype(np.int64)
    seg = _resize_label_map(original, height, width)
    known = np.isin(original, [int(info["id"]) for info in segments_info])
    colors = segment_colors([int(info.get("label_id", info.get("category_id", -1))) for info in segments_info])
    segments = []
    for k, info in enumerate(segments_info):
        mask = seg == int(info["id"])
        if not mask.any():
            continue
        name = _label_name(int(info.get("label_id", info.get("category_id", -1))), id2label)
        if info.get("score") is not None and bool(info.get("isthing", True)):
            text = f"{name} {float(info['score']):.2f}"
        else:
            text = f"{name} {100.0 * float((original == int(info['id'])).mean()):.1f}%"
        segments.append(_Segment(colors[k], text, name, text, mask=mask))
    void = ~np.isin(seg, [int(info["id"]) for info in segments_info])
    return _render(pil, scale, segments, void, int((~known).sum()), alpha, legend, title)


def draw_semantic(
    image: Any,
    segmentation: Any,
    id2label: Mapping[int, str] | None = None,
    ignore_index: int | None = 255,
    alpha: float = _DEFAULT_ALPHA["semantic"],
    min_size: int = 480,
    legend: bool = True,
    title: str | None = None,
) -> Image.Image:
    """A semantic ``(H, W)`` label map over ``image``, one colour per class, drawn nearly opaque; the legend gives
    each class's share of the image. ``ignore_index`` and negative values are void (hatched)."""
    pil, scale, height, width = _prepare(image, min_size)
    original = to_numpy(segmentation).astype(np.int64)
    seg = _resize_label_map(original, height, width)
    labels, counts = np.unique(original, return_counts=True)
    segments = []
    void_labels = []
    for label, count in zip(labels.tolist(), counts.tolist()):
        if label < 0 or (ignore_index is not None and label == ignore_index):
            void_labels.append(label)
            continue
        name = _label_name(label, id2label)
        text = f"{name} {100.0 * count / original.size:.1f}%"
        segments.append(_Segment(class_color(label), text, name, text, mask=seg == label))
    void = np.isin(seg, void_labels)
    return _render(pil, scale, segments, void, int(np.isin(original, void_labels).sum()), alpha, legend, title)


def draw_result(
    image: Any, result: Any, id2label: Mapping[int, str] | None, task: str, **kwargs: Any
) -> Image.Image:
    """The drawing of one image's ``result`` of ``task`` as the predict path returns it (instance / detection:
    ``scores, labels, boxes[, masks]``; panoptic: ``segmentation, segments_info``; semantic: the label map).
    ``kwargs`` go to the drawing function (``alpha``, ``min_size``, ``legend``, ``title``)."""
    _check_task(task)
    if task in ("instance", "detection"):
        kwargs.setdefault("title", f"{task} ({len(to_numpy(result['labels']).reshape(-1))})")
        masks = result.get("masks") if task == "instance" else None
        return draw_instances(
            image, result["labels"], result.get("scores"), masks=masks, boxes=result.get("boxes"), id2label=id2label,
            **kwargs,
        )
    if task == "panoptic":
        kwargs.setdefault("title", f"panoptic ({len(result['segments_info'])})")
        return draw_panoptic(image, result["segmentation"], result["segments_info"], id2label=id2label, **kwargs)
    kwargs.setdefault("title", "semantic")
    return draw_semantic(image, result, id2label=id2label, ignore_index=None, **kwargs)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def segment_table(result: Any, id2label: Mapping[int, str] | None, task: str) -> list[dict[str, Any]]:
    """One row per segment of one image's ``result`` (as :func:`draw_result` takes it): ``id`` (instance /
    detection: rank from 1; panoptic: segment id; semantic: class id), ``label_id``, ``label``, ``score``
    (``None`` for semantic classes and stuff without a score), ``area`` in pixels (detection: box area) and
    ``box`` (``[x0, y0, x1, y1]`` in pixels; from the mask for panoptic and semantic)."""
    _check_task(task)
    import torch

    from .modeling_maskdino import mask_boxes

    def boxes_of(masks: np.ndarray) -> list[list[float]]:
        return mask_boxes(torch.from_numpy(masks), "bitmask").tolist()

    rows = []
    if task in ("instance", "detection"):
        labels = to_numpy(result["labels"]).reshape(-1)
        scores = to_numpy(result["scores"]).reshape(-1)
        boxes = to_numpy(result["boxes"]).reshape(-1, 4).astype(np.float64)
        masks = result.get("masks") if task == "instance" else None
        areas = (
            to_numpy(masks).sum(axis=(-2, -1))  # (N, H, W), N may be 0
            if masks is not None
            else (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        )
        for i in range(len(labels)):
            rows.append(
                {"id": i + 1, "label_id": int(labels[i]), "label": _label_name(labels[i], id2label),
                 "score": round(float(scores[i]), 4),
                 "area": int(round(float(areas[i]))), "box": [round(float(v), 1) for v in boxes[i]]}
            )
        return rows
    if task == "panoptic":
        segmentation = to_numpy(result["segmentation"]).astype(np.int64)
        infos = list(result["segments_info"])
        masks = np.stack([segmentation == int(info["id"]) for info in infos]) if infos else np.zeros((0, 1, 1), bool)
        for info, mask, box in zip(infos, masks, boxes_of(masks)):
            score = info.get("score")
            label = int(info.get("label_id", info.get("category_id", -1)))
            rows.append(
                {"id": int(info["id"]), "label_id": label, "label": _label_name(label, id2label),
                 "score": None if score is None else round(float(score), 4), "area": int(mask.sum()), "box": box}
            )
        return rows
    label_map = to_numpy(result).astype(np.int64)
    labels = [label for label in np.unique(label_map).tolist() if label >= 0]
    masks = np.stack([label_map == label for label in labels]) if labels else np.zeros((0, 1, 1), bool)
    for label, mask, box in zip(labels, masks, boxes_of(masks)):
        rows.append({"id": label, "label_id": label, "label": _label_name(label, id2label), "score": None,
                     "area": int(mask.sum()), "box": box})
    return rows


def summarize(result: Any, id2label: Mapping[int, str] | None, task: str) -> str:
    """One line about one image's ``result``: the number of segments and the count per class in class id order
    (semantic: the share of the image per class), and for panoptic the void pixels (what no segment covers), e.g.
    ``"panoptic: 4 segments (triangle 1, rectangle 1, sky 1, ground 1), void 4489 px (31.5%)"``."""
    rows = segment_table(result, id2label, task)
    if task == "semantic":
        total = to_numpy(result).size
        shares = ", ".join(f"{row['label']} {100.0 * row['area'] / total:.1f}%" for row in rows)
        return f"semantic: {len(rows)} classes ({shares})" if rows else "semantic: no class"
    counts: dict[str, int] = {}
    for row in sorted(rows, key=lambda row: row["label_id"]):
        counts[row["label"]] = counts.get(row["label"], 0) + 1
    noun = {"instance": "instance", "detection": "detection", "panoptic": "segment"}[task]
    line = f"{task}: {len(rows)} {noun}{'' if len(rows) == 1 else 's'}"
    if counts:
        line += " (" + ", ".join(f"{label} {count}" for label, count in counts.items()) + ")"
    if task == "panoptic":
        segmentation = to_numpy(result["segmentation"]).astype(np.int64)
        void = int((~np.isin(segmentation, [row["id"] for row in rows])).sum())
        line += f", void {void} px ({100.0 * void / segmentation.size:.1f}%)"
    return line
