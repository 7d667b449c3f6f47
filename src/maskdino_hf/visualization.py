"""Overlay drawings of Mask DINO results with PIL only (no matplotlib needed).

* :func:`draw_instances`: instance masks (one colour per instance, with a thin outline), boxes in the colour of
  their class with a ``"<class> <score>"`` tag, and a legend of the classes present (with counts) in a panel on the
  right. Boxes only (object detection) when ``masks`` is ``None``.
* :func:`draw_panoptic`: segments of a panoptic id map (things one colour per segment, stuff one colour per class),
  a tag per segment and the class legend.
* :func:`draw_semantic`: a semantic label map, one colour per class, legend with the area share of each class.

All functions take the image as a PIL image or an ``(H, W, 3)`` uint8 array and predictions at the image's size
(tensors or numpy arrays) and return a new RGB :class:`PIL.Image.Image`. Small images are enlarged for display
(``min_size``: the short side of the drawing, default 480 px; ``0`` keeps the size) so the text stays readable.
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "class_color",
    "draw_instances",
    "draw_panoptic",
    "draw_semantic",
    "instance_colors",
]

# Distinct, saturated colours for instances (tab10 + a few more), then golden-ratio hues.
_BASE_PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 90, 255), (255, 215, 0),
    (0, 200, 120), (255, 60, 160), (120, 60, 0), (90, 0, 160),
]
_LEGEND_BG = (255, 255, 255)
_LEGEND_FG = (20, 20, 20)


def _hue_color(index: int, saturation: float = 0.75, value: float = 0.95) -> tuple[int, int, int]:
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
    return int(r * 255), int(g * 255), int(b * 255)


def instance_colors(count: int) -> list[tuple[int, int, int]]:
    """``count`` distinct colours, the same for the same index every time."""
    return [_BASE_PALETTE[i] if i < len(_BASE_PALETTE) else _hue_color(i) for i in range(count)]


def class_color(label: int) -> tuple[int, int, int]:
    """A fixed colour per class id (golden-ratio hue walk; differs from neighbouring ids)."""
    return _hue_color(int(label) + 3, saturation=0.65, value=0.9)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _to_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = _to_numpy(image)
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
    r, g, b = background[:3]
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


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


def _blend_layers(
    base: np.ndarray, layers: Sequence[tuple[np.ndarray, tuple[int, int, int]]], alpha: float, outline: bool, scale: float
) -> np.ndarray:
    """Paint ``(mask, colour)`` layers in order (later ones on top) with ``alpha`` and an optional outline."""
    canvas = base.astype(np.float32)
    color_map = np.zeros_like(canvas)
    covered = np.zeros(base.shape[:2], dtype=bool)
    edges = np.zeros(base.shape[:2], dtype=bool)
    edge_colors = np.zeros_like(canvas)
    thickness = max(0, round(scale / 2))
    for mask, color in layers:
        if not mask.any():
            continue
        color_map[mask] = color
        covered |= mask
        if outline:
            edge = _thicken(_boundary(mask), thickness) & mask
            edges &= ~mask  # an instance on top hides the outline below it
            edges |= edge
            edge_colors[edge] = [min(255, c * 0.6) for c in color]
    canvas[covered] = canvas[covered] * (1 - alpha) + color_map[covered] * alpha
    canvas[edges] = edge_colors[edges]
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


def _interior_point(mask: np.ndarray) -> tuple[float, float]:
    """The pixel of ``mask`` farthest from its border (``(x, y)``)."""
    from scipy.ndimage import distance_transform_edt

    distance = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return float(x), float(y)


def _draw_tag(draw: ImageDraw.ImageDraw, x: float, y: float, text: str, color, font, bounds: tuple[int, int]) -> None:
    """A filled label box with its bottom-left at (x, y), moved inside the drawing if needed."""
    tw, th = _text_size(draw, text, font)
    pad = 2
    w, h = tw + 2 * pad, th + 2 * pad + 2
    x0 = min(max(0.0, x), max(0.0, bounds[0] - w))
    y0 = y - h if y - h >= 0 else y
    y0 = min(max(0.0, y0), max(0.0, bounds[1] - h))
    draw.rectangle([x0, y0, x0 + w, y0 + h], fill=tuple(color))
    draw.text((x0 + pad, y0 + pad), text, fill=_text_color(color), font=font)


def _add_legend(
    canvas: Image.Image, entries: Sequence[tuple[tuple[int, int, int], str]], title: str | None, font_size: int
) -> Image.Image:
    """``canvas`` with a white panel on the right listing ``(colour, text)`` entries."""
    font = _font(font_size)
    title_font = _font(font_size + 2)
    probe = ImageDraw.Draw(canvas)
    lines = list(entries) if entries else [((200, 200, 200), "(nothing detected)")]
    line_h = max(_text_size(probe, "Ag", font)[1], font_size) + 8
    swatch = line_h - 8
    text_w = max(_text_size(probe, text, font)[0] for _, text in lines)
    header = title or "classes"
    text_w = max(text_w, _text_size(probe, header, title_font)[0] - swatch - 8)
    panel_w = 12 + swatch + 8 + text_w + 12
    needed_h = 12 + line_h + len(lines) * line_h + 8
    out = Image.new("RGB", (canvas.width + panel_w, max(canvas.height, needed_h)), _LEGEND_BG)
    out.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(out)
    x = canvas.width + 12
    y = 10
    draw.text((x, y), header, fill=_LEGEND_FG, font=title_font)
    y += line_h + 2
    for color, text in lines:
        draw.rectangle([x, y + 2, x + swatch, y + 2 + swatch], fill=tuple(color), outline=(60, 60, 60))
        draw.text((x + swatch + 8, y + 1), text, fill=_LEGEND_FG, font=font)
        y += line_h
    return out


def _prepare(image: Any, min_size: int) -> tuple[Image.Image, float, int, int]:
    pil = _to_pil(image)
    scale = _display_scale(pil.height, pil.width, min_size)
    if scale != 1.0:
        pil = pil.resize((round(pil.width * scale), round(pil.height * scale)), Image.BILINEAR)
    return pil, scale, pil.height, pil.width


def draw_instances(
    image: Any,
    labels: Any,
    scores: Any | None = None,
    masks: Any | None = None,
    boxes: Any | None = None,
    id2label: Mapping[int, str] | None = None,
    alpha: float = 0.5,
    min_size: int = 480,
    legend: bool = True,
    title: str | None = None,
) -> Image.Image:
    """Instances (or detections) over ``image``.

    Args:
        labels: ``(N,)`` class ids. scores: ``(N,)`` or ``None``.
        masks: ``(N, H, W)`` bool at the image's size, or ``None`` (boxes only).
        boxes: ``(N, 4)`` absolute ``xyxy`` boxes at the image's size, or ``None`` (masks only).
        id2label: class names (``config.id2label``).
        alpha: mask opacity. min_size: short side of the drawing (small images are enlarged), 0 = as is.
        legend: add the class legend panel; title: its header (default ``"classes"``).
    The first instance is drawn on top (pass them sorted by decreasing score).
    """
    labels = _to_numpy(labels).reshape(-1).astype(np.int64)
    n = len(labels)
    scores_np = None if scores is None else _to_numpy(scores).reshape(-1).astype(np.float64)
    if scores_np is not None and len(scores_np) != n:
        raise ValueError(f"{n} labels but {len(scores_np)} scores")
    pil, scale, height, width = _prepare(image, min_size)
    colors = instance_colors(n)
    if masks is not None:
        masks_np = _to_numpy(masks).astype(bool)
        if masks_np.ndim != 3 or masks_np.shape[0] != n:
            raise ValueError(f"masks must be (N, H, W) with N={n}, got {masks_np.shape}")
        layers = [
            (_resize_label_map(masks_np[i].astype(np.uint8), height, width).astype(bool), colors[i])
            for i in reversed(range(n))
        ]
        pil = Image.fromarray(_blend_layers(np.asarray(pil), layers, alpha, outline=True, scale=scale))
    draw = ImageDraw.Draw(pil)
    font = _font(max(11, round(height / 36)))
    line = max(2, round(scale * 1.5))
    if boxes is not None:
        boxes_np = _to_numpy(boxes).astype(np.float64).reshape(-1, 4) * scale
        if len(boxes_np) != n:
            raise ValueError(f"{n} labels but {len(boxes_np)} boxes")
        for i in reversed(range(n)):
            x0, y0, x1, y1 = boxes_np[i]
            x0, x1 = np.clip([x0, x1], 0, width - 1)
            y0, y1 = np.clip([y0, y1], 0, height - 1)
            color = class_color(labels[i])
            draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=color, width=line)
    for i in reversed(range(n)):
        text = _label_name(labels[i], id2label)
        if scores_np is not None:
            text += f" {scores_np[i]:.2f}"
        if boxes is not None:
            x, y = boxes_np[i][0], boxes_np[i][1]
        else:
            ys, xs = np.nonzero(_resize_label_map(masks_np[i].astype(np.uint8), height, width))
            if len(xs) == 0:
                continue
            x, y = float(xs.min()), float(ys.min())
        _draw_tag(draw, x, y, text, class_color(labels[i]), font, (width, height))
    if not legend:
        return pil
    counts: dict[int, int] = {}
    for label in labels.tolist():
        counts[label] = counts.get(label, 0) + 1
    entries = [
        (class_color(label), f"{_label_name(label, id2label)} x{count}" if count > 1 else _label_name(label, id2label))
        for label, count in sorted(counts.items())
    ]
    return _add_legend(pil, entries, title, max(12, round(height / 32)))


def draw_panoptic(
    image: Any,
    segmentation: Any,
    segments_info: Sequence[Mapping],
    id2label: Mapping[int, str] | None = None,
    alpha: float = 0.55,
    min_size: int = 480,
    legend: bool = True,
    title: str | None = None,
) -> Image.Image:
    """A panoptic result over ``image``: ``segmentation`` is an ``(H, W)`` id map (0 or -1 = no segment) and
    ``segments_info`` lists ``{"id", "label_id" (or "category_id"), "isthing" (optional), "score" (optional)}``.
    Things get one colour per segment (and a tag), stuff the colour of its class."""
    pil, scale, height, width = _prepare(image, min_size)
    seg = _resize_label_map(_to_numpy(segmentation).astype(np.int64), height, width)
    colors = instance_colors(len(segments_info))
    layers = []
    tags = []
    present: dict[int, int] = {}
    for k, info in enumerate(segments_info):
        label = int(info.get("label_id", info.get("category_id", -1)))
        mask = seg == int(info["id"])
        if not mask.any():
            continue
        isthing = bool(info.get("isthing", True))
        color = colors[k] if isthing else class_color(label)
        layers.append((mask, color))
        present[label] = present.get(label, 0) + 1
        text = _label_name(label, id2label)
        if info.get("score") is not None and isthing:
            text += f" {float(info['score']):.2f}"
        if isthing:  # at the top-left corner of the segment, like a box tag
            ys, xs = np.nonzero(mask)
            tags.append((float(xs.min()), float(ys.min()), text, class_color(label), False))
        else:  # stuff regions are irregular: centred on their most interior pixel
            x, y = _interior_point(mask)
            tags.append((x, y, text, color, True))
    pil = Image.fromarray(_blend_layers(np.asarray(pil), layers, alpha, outline=True, scale=scale))
    draw = ImageDraw.Draw(pil)
    font = _font(max(11, round(height / 36)))
    for x, y, text, color, centred in tags:
        tw, th = _text_size(draw, text, font)
        if centred:
            _draw_tag(draw, x - tw / 2, y + th / 2 + 3, text, color, font, (width, height))
        else:
            _draw_tag(draw, x, y + th + 6, text, color, font, (width, height))
    if not legend:
        return pil
    entries = [
        (class_color(label), f"{_label_name(label, id2label)} x{count}" if count > 1 else _label_name(label, id2label))
        for label, count in sorted(present.items())
    ]
    return _add_legend(pil, entries, title, max(12, round(height / 32)))


def draw_semantic(
    image: Any,
    segmentation: Any,
    id2label: Mapping[int, str] | None = None,
    ignore_index: int | None = 255,
    alpha: float = 0.55,
    min_size: int = 480,
    legend: bool = True,
    title: str | None = None,
) -> Image.Image:
    """A semantic ``(H, W)`` label map over ``image``, one colour per class; the legend gives each class's share of
    the image."""
    pil, scale, height, width = _prepare(image, min_size)
    original = _to_numpy(segmentation).astype(np.int64)
    seg = _resize_label_map(original, height, width)
    labels, counts = np.unique(original, return_counts=True)
    layers = []
    entries = []
    total = original.size
    for label, count in zip(labels.tolist(), counts.tolist()):
        if ignore_index is not None and label == ignore_index or label < 0:
            continue
        layers.append((seg == label, class_color(label)))
        entries.append((class_color(label), f"{_label_name(label, id2label)} {100.0 * count / total:.1f}%"))
    pil = Image.fromarray(_blend_layers(np.asarray(pil), layers, alpha, outline=True, scale=scale))
    if not legend:
        return pil
    return _add_legend(pil, entries, title, max(12, round(height / 32)))
