"""Prediction: image files, folders or `datasets` rows -> batches -> model -> post-processing -> result writers.

What `maskdino-hf predict` runs, usable from Python too (:func:`predict_files`, :func:`predict_dataset`,
:func:`predict_images`). A folder run never loses work:

- a bad image (unreadable or corrupt, a mode that is not an image of 8-bit channels, too elongated for the model) is
  reported with its path and the reason and skipped; the rest is processed;
- results are written as each image finishes: one JSON line per image in ``predictions.jsonl``, then the whole
  report in ``predictions.json`` (which lists the skipped files under ``"skipped"``);
- each image gets a one-line summary (counts per class) on stdout.

Size rule (:func:`input_size`): an image is resized by the image processor as usual (short side to
``size["shortest_edge"]``, long side at most ``size["longest_edge"]``). When that leaves the short side under the
model's minimum input side (the coarsest feature stride, e.g. a 10000x50 strip), the image is instead resized keeping
its aspect ratio so that its short side equals that minimum (the long side then exceeds ``longest_edge``), provided
the result holds no more pixels than the processor's largest regular input (``shortest_edge * longest_edge``);
otherwise it is refused as too elongated. Tiny images need no rule: the processor enlarges them.

Nothing heavy is imported at module level: the CLI imports this module to parse its arguments.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

TASKS = ("instance", "panoptic", "semantic", "detection")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
DEFAULT_INSTANCE_THRESHOLD = 0.5
# The mask probability from which a pixel belongs to an instance or panoptic segment (the official rule's 0.5), and
# the tasks it applies to.
DEFAULT_MASK_THRESHOLD = 0.5
MASK_THRESHOLD_TASKS = ("instance", "panoptic")
# PIL modes converted to RGB as they are; 16-bit grey (also mode I within 0..65535) is scaled by 1/257.
_RGB_CONVERTIBLE_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


class CLIError(ValueError):
    """A mistake in the user's input, reported by the CLI as one line (no traceback) with exit status 2."""


class BadImageError(CLIError):
    """An image file that cannot be used; a folder run reports it (``path``, ``reason``) and goes on."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


# ---------------------------------------------------------------------------------------------------------------
# Model, device and image loading (shared with evaluation)
# ---------------------------------------------------------------------------------------------------------------


def demo_model_dir() -> Path:
    """The bundled demo model folder (``maskdino_hf/demo``; it may not exist in a source checkout)."""
    from importlib.resources import files

    return Path(str(files("maskdino_hf") / "demo"))


def demo_images() -> list[Path]:
    """The images bundled with the demo model (``maskdino_hf/demo/images``)."""
    folder = demo_model_dir() / "images"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _looks_like_local_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~", "\\"))
        or name.endswith(("/", "\\"))
        or os.sep in name.strip("/").replace("/", "", 1)
        or (os.altsep is not None and os.altsep in name.replace("/", "", 1))
        or Path(name).suffix in (".json", ".safetensors", ".bin", ".pth")
    )


def _check_hub_id(name: str) -> None:
    """Fail fast (no download retries) when a Hub id cannot be reached or does not exist."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise CLIError(
            f"model {name!r} is not a local folder and is not in the Hugging Face cache, and HF_HUB_OFFLINE is set"
        )
    try:
        HfApi().model_info(name, timeout=10)
    except (RepositoryNotFoundError, GatedRepoError) as error:
        raise CLIError(
            f"model {name!r} is not a local folder and the Hugging Face Hub has no accessible model by that id "
            f"({type(error).__name__})"
        ) from None
    except Exception as error:  # noqa: BLE001  (network errors of any HTTP library)
        raise CLIError(
            f"model {name!r} is not a local folder and the Hugging Face Hub could not be reached to download it "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Pass a local model "
            "folder or check the network connection."
        ) from None


def _model_name(model: str | os.PathLike | None) -> tuple[str, bool]:
    """``(name, is_local_folder)`` of ``--model`` (``None``: the bundled demo), checked without loading anything."""
    if model is None:
        path = demo_model_dir()
        if not (path / "config.json").is_file():
            raise CLIError(
                f"the bundled demo model is not installed (no config.json in {path}); pass --model DIR_OR_HUB_ID"
            )
        return str(path), True
    name = os.fspath(model)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CLIError(f"--model {name}: is a file; expected a model folder (config.json + weights) or a Hub id")
        if not (path / "config.json").is_file():
            raise CLIError(f"--model {name}: model folder has no config.json")
        return str(path), True
    if _looks_like_local_path(name):
        raise CLIError(f"--model {name}: model folder not found")
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except Exception:  # noqa: BLE001
        raise CLIError(f"--model {name}: model folder not found (and not a valid Hub id)") from None
    return name, False


def _default_processor(config):
    from . import MaskDINOImageProcessor

    return MaskDINOImageProcessor(num_labels=config.num_labels, stuff_labels=list(config.stuff_labels))


def load_model_and_processor(
    model: str | os.PathLike | None, device: str = "cpu", progress: bool = False, compile: bool = False
):
    """``(model, image_processor)`` from a local folder or a Hub id (``None``: the bundled demo model), in eval
    mode on ``device``. Raises :class:`CLIError` with a one-line message when the model cannot be loaded.
    ``progress``: show Transformers' loading progress bars (hidden by default; also ``MASKDINO_HF_PROGRESS=1``).
    ``compile``: compile the model in place with ``torch.compile`` (Inductor; see
    :func:`maskdino_hf.export.compile_model`)."""
    import torch
    from transformers import AutoModelForUniversalSegmentation

    from . import MaskDINOImageProcessor  # importing a class registers the Auto classes

    if progress:
        os.environ["MASKDINO_HF_PROGRESS"] = "1"
    name, local = _model_name(model)
    network, local_only = None, True
    if not local:
        try:  # the Hugging Face cache first, without touching the network
            network = AutoModelForUniversalSegmentation.from_pretrained(name, local_files_only=True)
        except Exception:  # noqa: BLE001  (not cached: ask the Hub)
            _check_hub_id(name)
            local_only = False
    if network is None:
        try:
            network = AutoModelForUniversalSegmentation.from_pretrained(name, local_files_only=local_only)
        except Exception as error:  # noqa: BLE001  (reported as one line)
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CLIError(f"could not load model {name!r}: {message}") from None
    if getattr(network.config, "model_type", None) != "maskdino":
        raise CLIError(f"model {name!r} is a {network.config.model_type!r} model, not a Mask DINO model")
    try:
        processor = MaskDINOImageProcessor.from_pretrained(name, local_files_only=local_only)
    except Exception:  # noqa: BLE001  (no or unusable preprocessor_config.json)
        print(f"warning: {name} has no usable preprocessor_config.json; using the default Mask DINO image processor",
              file=sys.stderr)
        processor = _default_processor(network.config)
    network.eval().to(torch.device(device))
    if compile:
        from .export import compile_model

        compile_model(network)
    return network, processor


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda`` without CUDA is a :class:`CLIError`."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: CUDA is not available on this machine (use --device cpu)")
    return device


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_FREED_MEMORY_ENV = "MASKDINO_HF_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Make this process reuse the memory it frees instead of handing it back to the system (glibc only).

    A CPU forward pass allocates and frees many tensors of tens of MB. glibc maps each one afresh from the system and
    unmaps it when freed, so every forward pays a page fault per 4 KB page it touches: about 430,000 faults per fp32
    R50 inference at 800x1088, 3.24 s against 2.73 s with this setting (`benchmarks/allocator.py`). Raising glibc's
    mmap and trim thresholds keeps freed memory in the process for the next allocation. The process then holds its
    peak memory until it exits, so only entry points do this, for their own process (`maskdino-hf predict`,
    `evaluate` and `demo`, `examples/train.py`; `MASKDINO_HF_KEEP_FREED_MEMORY=0` turns it off). Returns whether both
    settings took effect (`False` on other C libraries and systems, which keep their own behaviour)."""
    import ctypes

    if os.environ.get(KEEP_FREED_MEMORY_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    largest = 2**31 - 1  # mallopt takes an int: allocations above 2 GiB are still mapped and unmapped
    return mallopt(_M_MMAP_THRESHOLD, largest) == 1 and mallopt(_M_TRIM_THRESHOLD, largest) == 1


def slow_bfloat16_reason(device: str = "cpu") -> str | None:
    """Why bfloat16 autocast on `device` would run far slower than float32, or `None`.

    PyTorch's CPU bfloat16 matmuls and convolutions go through oneDNN, which needs AVX-512 (BW, VL, DQ), AVX-512 BF16,
    AMX or AVX-NE-CONVERT on x86. Without them (e.g. an AVX2-only AMD EPYC) a bfloat16 matmul falls back to a scalar
    loop: a 2048^3 `torch.mm` ran at 0.3 GFLOP/s there against 87 in float32. Other devices and architectures are not
    judged (`None`)."""
    import torch

    if torch.device(device).type != "cpu":
        return None
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    if capabilities.get("architecture") != "x86_64":
        return None
    if any(capabilities.get(name) for name in ("amx_bf16", "avx512_bf16", "avx_ne_convert")) or all(
        capabilities.get(name) for name in ("avx512_bw", "avx512_vl", "avx512_dq")
    ):
        return None
    return (f"this CPU ({capabilities.get('cpu_name') or 'unknown'}) has neither AVX-512, AMX nor AVX-NE-CONVERT, so "
            "PyTorch runs bfloat16 matmuls in a scalar fallback, far slower than float32")


def _to_rgb(image, path: Path):
    """RGB of a PIL image of any 8-bit mode; 16-bit grey scaled from its full range; other modes refused."""
    import numpy as np
    from PIL import Image

    if image.mode in _RGB_CONVERTIBLE_MODES:
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            return Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA")).convert("RGB")
        return image.convert("RGB")
    array = np.asarray(image) if image.mode in _SIXTEEN_BIT_MODES | {"I"} else None
    if array is not None and array.min(initial=0) >= 0 and array.max(initial=0) <= 65535:
        array = array.astype(np.float64) / 257.0
        return Image.fromarray(np.round(array).clip(0, 255).astype(np.uint8)).convert("RGB")
    raise BadImageError(
        path, f"wrong mode: {image.mode!r} (float or 32-bit pixels outside 0..65535 have no defined 0-255 range); "
        "convert it to 8-bit RGB or grey"
    )


def load_image(path: str | os.PathLike):
    """An RGB PIL image (EXIF orientation applied, transparency composited on white, 16-bit grey scaled by 1/257).

    Raises :class:`BadImageError` naming the file and the reason when it cannot be read or has an unusable mode.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise BadImageError(path, "image not found")
    if not path.is_file():
        raise BadImageError(path, "not an image file")
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise BadImageError(path, f"unreadable ({type(error).__name__}: {error})") from None
    if image.width < 1 or image.height < 1:
        raise BadImageError(path, f"empty image ({image.width}x{image.height})")
    return _to_rgb(image, path)


def collect_images(arguments: Sequence[str]) -> list[Path]:
    """Image files from the command line; folders are expanded to the images they contain (sorted)."""
    paths: list[Path] = []
    for argument in arguments:
        path = Path(argument).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise CLIError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}")
            paths.extend(found)
        elif not path.exists():
            raise CLIError(f"image not found: {path}")
        else:
            paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Model -> post-processed results
# ---------------------------------------------------------------------------------------------------------------


def min_input_side(model) -> int:
    """The smallest input side ``model`` accepts (its coarsest feature stride)."""
    return int(getattr(model, "min_input_size", None) or model.model.min_input_size)


def input_size(height: int, width: int, processor, min_side: int) -> dict[str, int | None] | None:
    """The processor ``size`` for an image of ``height x width`` under the module's size rule: ``None`` (the
    processor's own resize), a ``{"shortest_edge": min_side, "longest_edge": None}`` override for a too elongated
    image, or a ``ValueError`` saying why the image cannot be used."""
    resized = processor.get_resized_size(height, width)
    if min(resized) >= min_side:
        return None
    scale = min_side / min(height, width)
    needed = (round(height * scale), round(width * scale))
    size = processor.size
    if processor.do_resize and size.get("longest_edge"):
        budget = size["shortest_edge"] * size["longest_edge"]
        if needed[0] * needed[1] > budget:
            raise ValueError(
                f"too elongated ({width}x{height}, aspect ratio {max(height, width) / min(height, width):.0f}:1): the "
                f"model needs a short side of at least {min_side} px, which would take {needed[1]}x{needed[0]} = "
                f"{needed[0] * needed[1]} pixels, over the processor's largest regular input "
                f"{size['shortest_edge']}x{size['longest_edge']} = {budget}"
            )
    return {"shortest_edge": min_side, "longest_edge": None}


def _to_cpu(value: Any) -> Any:
    if hasattr(value, "cpu"):  # tensors (post-processing returns them detached)
        return value.cpu()
    if isinstance(value, Mapping):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def check_mask_threshold(mask_threshold: float | None, tasks: Sequence[str]) -> float:
    """``mask_threshold`` (default ``DEFAULT_MASK_THRESHOLD``) once checked: in (0, 1), and given only for tasks
    whose masks it thresholds (``MASK_THRESHOLD_TASKS``), so that it never goes silently unused."""
    if mask_threshold is None:
        return DEFAULT_MASK_THRESHOLD
    unused = [task for task in tasks if task not in MASK_THRESHOLD_TASKS]
    if unused:
        raise ValueError(f"mask_threshold applies to {' and '.join(MASK_THRESHOLD_TASKS)} masks; task "
                         f"{unused[0]!r} has none to threshold")
    if not 0.0 < mask_threshold < 1.0:
        raise ValueError(f"mask_threshold must be a probability in (0, 1), got {mask_threshold}")
    return float(mask_threshold)


def _post_process(processor, outputs, tasks, threshold, sizes, target_sizes,
                  mask_threshold: float = DEFAULT_MASK_THRESHOLD) -> list[dict[str, Any]]:
    """``[{task: result}]`` on CPU; instance / detection boxes clipped to the image."""
    from .image_processing_maskdino import clip_boxes

    things_only = True if processor.stuff_labels else None  # stuff classes are no instances (official rule)
    results: list[dict[str, Any]] = [{} for _ in target_sizes]
    for task in tasks:
        if task == "instance":
            items = processor.post_process_instance_segmentation(
                outputs, threshold=threshold or 0.0, mask_threshold=mask_threshold, panoptic_on=things_only, **sizes
            )
        elif task == "detection":
            items = processor.post_process_object_detection(
                outputs, threshold=threshold or 0.0, panoptic_on=things_only, **sizes
            )
        elif task == "panoptic":
            items = processor.post_process_panoptic_segmentation(
                outputs, threshold=threshold, mask_threshold=mask_threshold, **sizes
            )
        elif task == "semantic":
            items = processor.post_process_semantic_segmentation(outputs, **sizes)
        else:
            raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
        for result, item, (height, width) in zip(results, items, target_sizes):
            item = _to_cpu(item)
            if task in ("instance", "detection"):
                item = {key: item[key] for key in ("scores", "labels", "boxes", "masks") if key in item}
                item["boxes"] = clip_boxes(item["boxes"], height, width)
            result[task] = item
    return results


def preprocess_images(processor, min_side: int, images: Sequence[Any]) -> list[tuple[list[int], dict[str, Any]]]:
    """The processor's inputs of ``images`` as ``[(positions, {"pixel_values", "pixel_mask"})]``: the images that
    the processor's own resize suits padded together, each one needing the size rule's override alone. Needs no
    model, so DataLoader workers run it (:func:`predict_images`, :func:`maskdino_hf.evaluation.evaluate`)."""
    overrides = [input_size(image.height, image.width, processor, min_side) for image in images]
    regular = [index for index, size in enumerate(overrides) if size is None]
    groups = [(regular, None)] if regular else []
    groups += [([index], size) for index, size in enumerate(overrides) if size is not None]
    prepared = []
    for positions, size in groups:
        override = {"size": dict(size), "do_resize": True} if size else {}
        inputs = processor([images[index] for index in positions], return_tensors="pt", **override)
        prepared.append((positions, {"pixel_values": inputs["pixel_values"], "pixel_mask": inputs["pixel_mask"]}))
    return prepared


class ModelPredictor:
    """``predictor(images, rows=None, inputs=None) -> [{task: result}]`` (``rows``, the data set rows, are not
    used): the model once per group of :func:`preprocess_images` (``inputs``, computed here when not given, e.g.
    by a DataLoader worker through the picklable ``predictor.preprocess``), then the processor's post-processing of
    each task at the original image size. Made by :func:`model_predict_fn`."""

    def __init__(self, model, processor, tasks: Sequence[str], device: str = "cpu", threshold: float | None = None,
                 bf16: bool = False, mask_threshold: float | None = None) -> None:
        self.model, self.processor, self.tasks = model, processor, list(tasks)
        self.device, self.threshold, self.bf16 = device, threshold, bf16
        self.mask_threshold = check_mask_threshold(mask_threshold, self.tasks)
        reason = slow_bfloat16_reason(device) if bf16 else None
        if reason is not None:
            print(f"warning: bfloat16 autocast (--bf16) will be slow: {reason}; float32 is faster here",
                  file=sys.stderr)
        self.preprocess = partial(preprocess_images, processor, min_input_side(model))

    def _run(self, images: Sequence[Any], inputs: Mapping[str, Any]) -> list[dict[str, Any]]:
        import torch

        target_sizes = [(image.height, image.width) for image in images]
        image_sizes = self.processor.image_sizes_from_pixel_mask(inputs["pixel_mask"])
        device = self.device
        with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                                                    enabled=self.bf16):
            outputs = self.model(pixel_values=inputs["pixel_values"].to(device),
                                 pixel_mask=inputs["pixel_mask"].to(device))
        sizes = {"target_sizes": target_sizes, "image_sizes": image_sizes}
        return _post_process(self.processor, outputs, self.tasks, self.threshold, sizes, target_sizes,
                             self.mask_threshold)

    def __call__(self, images: Sequence[Any], rows: Sequence[Mapping] | None = None,
                 inputs: Sequence[tuple[list[int], Mapping[str, Any]]] | None = None) -> list[dict[str, Any]]:
        inputs = self.preprocess(images) if inputs is None else inputs
        results: list[dict[str, Any] | None] = [None] * len(images)
        for positions, group in inputs:
            for position, result in zip(positions, self._run([images[index] for index in positions], group)):
                results[position] = result
        return results  # type: ignore[return-value]


def model_predict_fn(
    model,
    processor,
    tasks: Sequence[str],
    device: str = "cpu",
    threshold: float | None = None,
    bf16: bool = False,
    mask_threshold: float | None = None,
) -> ModelPredictor:
    """A :class:`ModelPredictor`, the function ``(images, rows=None) -> [{task: result}]`` running the model once
    per batch (images of different sizes are padded together by the processor; an image needing the size rule's
    override runs alone) and the processor's post-processing of each task at the original image size.

    Results (on CPU): ``instance``: ``scores, labels, boxes`` (xyxy, clipped to the image), ``masks`` (N, H, W) bool,
    sorted by score, thing classes only when the processor has ``stuff_labels``; ``detection``: ``scores, labels,
    boxes``; ``panoptic``: ``segmentation`` (H, W) (0 = void) and ``segments_info`` (``id, label_id, isthing, score,
    was_fused``); ``semantic``: the (H, W) label map.
    ``threshold``: score threshold of instances / detections (default 0: keep the top-k, as for AP) and the query
    keep threshold of panoptic inference (default: the processor's ``object_mask_threshold``). ``bf16``: run the
    model under bfloat16 autocast (CPU or CUDA; the model keeps float32 where precision needs it).
    ``mask_threshold``: the mask probability from which a pixel belongs to an instance or panoptic segment (default
    ``DEFAULT_MASK_THRESHOLD``, the official 0.5; lower values leave fewer void pixels along panoptic segment
    boundaries); refused for tasks without masks to threshold (detection, semantic)."""
    return ModelPredictor(model, processor, tasks, device, threshold, bf16, mask_threshold)


# ---------------------------------------------------------------------------------------------------------------
# Result writers
# ---------------------------------------------------------------------------------------------------------------


def id2label_of(config) -> dict[int, str]:
    """The model's ``id2label`` with int keys and str names."""
    return {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}


def default_task(processor) -> str:
    """The task the processor's post-processing was configured for: panoptic when it is on, semantic for a
    semantic-only processor, else instance."""
    if getattr(processor, "panoptic_on", False):
        return "panoptic"
    if getattr(processor, "semantic_on", False) and not getattr(processor, "instance_on", True):
        return "semantic"
    return "instance"


def _save_label_png(array, path: Path) -> None:
    import numpy as np
    from PIL import Image

    array = np.asarray(array)
    if array.min(initial=0) >= 0 and array.max(initial=0) < 256:
        Image.fromarray(array.astype(np.uint8)).save(path)  # 2-D uint8: mode L
    else:
        Image.fromarray(array.astype(np.uint16)).save(path)


@dataclass
class ImageResult:
    """One image's records for the reports and its overlay."""

    annotations: list[dict]
    overlay: Any


class PredictionWriter:
    """Writes each image's results as it finishes (overlay, panoptic / semantic PNG, one ``predictions.jsonl``
    line) and, on :meth:`close`, ``predictions.json`` (plus ``coco_results.json`` for instance / detection)."""

    def __init__(self, output_dir: str | os.PathLike, task: str, id2label: Mapping[int, str], stuff: set[int]):
        self.output_dir, self.task, self.id2label, self.stuff = Path(output_dir), task, dict(id2label), set(stuff)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if task in ("panoptic", "semantic"):
            (self.output_dir / task).mkdir(exist_ok=True)
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.skipped: list[dict] = []
        self._skipped_ids: list[int] = []
        self.jsonl_path = self.output_dir / "predictions.jsonl"
        self._jsonl = self.jsonl_path.open("w")

    def _name(self, label: int) -> str:
        return self.id2label.get(int(label), str(int(label)))

    def _instances(self, image_id: int, image, item: Mapping) -> ImageResult:
        from .evaluation import instances_to_coco_results
        from .visualization import draw_instances

        masks = item.get("masks")
        coco = instances_to_coco_results(
            image_id, item["scores"], item["labels"], masks=masks, boxes=item["boxes"], box_format="xyxy"
        )
        overlay = draw_instances(image, item["labels"], item["scores"], masks=masks, boxes=item["boxes"],
                                 id2label=self.id2label, title=f"{self.task} ({len(coco)})")
        return ImageResult(coco, overlay)

    def _panoptic(self, image_id: int, image, item: Mapping, stem: str) -> ImageResult:
        import numpy as np
        from PIL import Image
        from transformers.image_transforms import id_to_rgb

        from .data import mask_to_bbox
        from .visualization import draw_panoptic

        segmentation = item["segmentation"].numpy().astype(np.int64)
        png_name = f"panoptic/{stem}.png"
        Image.fromarray(id_to_rgb(np.maximum(segmentation, 0)).astype(np.uint8)).save(self.output_dir / png_name)
        segments = []
        for segment in item["segments_info"]:
            mask = segmentation == int(segment["id"])
            label = int(segment["label_id"])
            segments.append({
                "id": int(segment["id"]), "category_id": label, "label": self._name(label),
                "isthing": int(segment.get("isthing", label not in self.stuff)), "iscrowd": 0,
                "score": float(segment.get("score", 1.0)), "area": int(mask.sum()), "bbox": mask_to_bbox(mask),
            })
        overlay = draw_panoptic(image, segmentation, item["segments_info"], id2label=self.id2label,
                                title=f"panoptic ({len(segments)})")
        return ImageResult([{"image_id": image_id, "file_name": png_name, "segments_info": segments}], overlay)

    def _semantic(self, image_id: int, image, item, stem: str) -> ImageResult:
        import numpy as np

        from .visualization import draw_semantic

        label_map = item.numpy()
        png_name = f"semantic/{stem}.png"
        _save_label_png(label_map, self.output_dir / png_name)
        labels, pixels = np.unique(label_map, return_counts=True)
        classes = [{"label_id": int(label), "label": self._name(label), "area": int(count)}
                   for label, count in zip(labels.tolist(), pixels.tolist())]
        overlay = draw_semantic(image, label_map, id2label=self.id2label, ignore_index=None, title="semantic")
        return ImageResult([{"image_id": image_id, "file_name": png_name, "classes": classes}], overlay)

    def add(self, image_id: int, path: Path, stem: str, image, item) -> str:
        """Writes one image's results; returns its one-line summary (:func:`maskdino_hf.visualization.summarize`)."""
        from .visualization import summarize

        if self.task in ("instance", "detection"):
            result = self._instances(image_id, image, item)
        elif self.task == "panoptic":
            result = self._panoptic(image_id, image, item, stem)
        else:
            result = self._semantic(image_id, image, item, stem)
        info = {"id": image_id, "file_name": path.name, "path": str(path), "height": image.height,
                "width": image.width, "overlay": f"{stem}_overlay.png"}
        result.overlay.save(self.output_dir / info["overlay"])
        self.images.append(info)
        self.annotations.extend(result.annotations)
        self._jsonl.write(json.dumps({"image": info, "annotations": result.annotations}) + "\n")
        self._jsonl.flush()
        return f"{path}: {summarize(item, self.id2label, self.task)}"

    def skip(self, path: str | os.PathLike, reason: str, image_id: int | None = None) -> None:
        """Records a skipped image (``image_id``: its place in the input, to list the skipped files in that order)."""
        self.skipped.append({"path": str(path), "reason": reason})
        self._skipped_ids.append(len(self._skipped_ids) if image_id is None else image_id)
        self._jsonl.write(json.dumps({"skipped": {"path": str(path), "reason": reason}}) + "\n")
        self._jsonl.flush()

    def close(self, header: Mapping[str, Any]) -> list[Path]:
        """Writes ``predictions.json`` (``header`` + categories, images, annotations, skipped, each in input order
        whatever order the images finished in); returns the files."""
        self._jsonl.close()
        self.images.sort(key=lambda info: info["id"])
        self.annotations.sort(key=lambda annotation: annotation["image_id"])  # stable: an image's own order kept
        self.skipped = [entry for _, entry in sorted(zip(self._skipped_ids, self.skipped), key=lambda pair: pair[0])]
        categories = [{"id": label, "name": name, "isthing": int(label not in self.stuff)}
                      for label, name in sorted(self.id2label.items())]
        report = {**header, "categories": categories, "images": self.images, "annotations": self.annotations,
                  "skipped": self.skipped}
        written = [self.output_dir / "predictions.json", self.jsonl_path]
        written[0].write_text(json.dumps(report))
        if self.task in ("instance", "detection"):
            written.append(self.output_dir / "coco_results.json")
            written[-1].write_text(json.dumps(self.annotations))
        return written


# ---------------------------------------------------------------------------------------------------------------
# Batches: similar sizes together, loaded and preprocessed by DataLoader workers while the model runs
# ---------------------------------------------------------------------------------------------------------------

# Images are grouped by size within windows of this many batches: enough choice to pair similar sizes, while
# results still come out soon after their images (the window is what a run reads ahead at most, in planning only).
BUCKET_WINDOW_BATCHES = 8
# Below this many images, DataLoader workers cost more to start than they save (see default_num_workers).
MIN_IMAGES_FOR_WORKERS = 8


def default_num_workers(num_images: int) -> int:
    """DataLoader workers for ``num_images`` images: none for a handful of images (starting a worker process costs
    more than decoding them), else ``min(2, CPUs - 1)``, at least 1: one or two processes decoding and
    preprocessing keep ahead of the forward pass, which keeps the other CPUs."""
    if num_images < MIN_IMAGES_FOR_WORKERS:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(2, cpus - 1))


def encoded_image_size(image: Any) -> tuple[int, int] | None:
    """``(height, width)`` of a file path, an undecoded ``datasets`` image (``{"bytes", "path"}``), a PIL image or
    an (H, W[, C]) array, read from the header without decoding the pixels (EXIF orientation not applied); ``None``
    when it cannot be read. Only a batching hint (:func:`plan_batches`): the decoded image decides everything else."""
    import io

    from PIL import Image

    if isinstance(image, Image.Image):
        return image.height, image.width
    if getattr(image, "ndim", 0) >= 2:  # an array (rows of a list data set)
        return int(image.shape[0]), int(image.shape[1])
    if isinstance(image, Mapping):
        image = io.BytesIO(image["bytes"]) if image.get("bytes") else image.get("path")
    if image is None:
        return None
    try:
        with Image.open(image) as opened:
            width, height = opened.size
    except Exception:  # noqa: BLE001  (an unreadable file is reported when it is loaded)
        return None
    return height, width


def _size_key(size: tuple[int, int] | None) -> tuple[int, int, int]:
    """Unknown sizes first (mostly unreadable files, reported at once), then aspect ratio in steps of 2^(1/4),
    then area."""
    if size is None or min(size) < 1:
        return (0, 0, 0)
    height, width = size
    return (1, round(4 * math.log2(width / height)), height * width)


def plan_batches(sizes: Sequence[tuple[int, int] | None], batch_size: int,
                 window: int | None = None) -> list[list[int]]:
    """Batches of indices into ``sizes`` (each image's ``(height, width)``, ``None`` when unknown): within each
    window of ``window`` consecutive images (default ``batch_size * BUCKET_WINDOW_BATCHES``) the images are sorted by
    aspect ratio, then area (:func:`_size_key`), and cut into batches, so that a batch is padded little; a batch
    lists its images in input order. Batch size 1 keeps the input order. Deterministic, so every process of a
    sharded evaluation makes the same plan."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if batch_size == 1:
        return [[index] for index in range(len(sizes))]
    window = window or batch_size * BUCKET_WINDOW_BATCHES
    batches = []
    for start in range(0, len(sizes), window):
        indices = sorted(range(start, min(start + window, len(sizes))), key=lambda index: _size_key(sizes[index]))
        batches.extend(sorted(indices[first:first + batch_size]) for first in range(0, len(indices), batch_size))
    return batches


class ImageSource(NamedTuple):
    """An image to predict: its ``name`` (a path, or a data set row's file name), how to ``load`` it as RGB and,
    optionally, how to ``probe`` its ``(height, width)`` cheaply for batching (:func:`encoded_image_size`). Both
    callables must be picklable for DataLoader workers (a ``partial`` of a top-level function)."""

    name: str
    load: Callable[[], Any]
    probe: Callable[[], tuple[int, int] | None] | None = None


class _PlannedBatches:
    """Map-style data set for a DataLoader: item ``k`` is ``load(batches[k])``. Picklable (with a picklable
    ``load``), so workers also start where processes are spawned rather than forked."""

    def __init__(self, batches: Sequence[Sequence[int]], load: Callable[[Sequence[int]], Any]) -> None:
        self.batches, self.load = [list(batch) for batch in batches], load

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, item: int) -> Any:
        return self.load(self.batches[item])


def _as_is(item: Any) -> Any:
    return item


def load_batches(batches: Sequence[Sequence[int]], load: Callable[[Sequence[int]], Any], num_workers: int):
    """``load(batch)`` of each batch, in order, computed ahead by ``num_workers`` DataLoader worker processes (0:
    in this process, one at a time). ``load`` must be picklable (a top-level function or a ``partial`` of one)."""
    from torch.utils.data import DataLoader

    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return DataLoader(_PlannedBatches(batches, load), batch_size=None, shuffle=False, num_workers=num_workers,
                      collate_fn=_as_is)


@dataclass
class LoadedBatch:
    """One planned batch as a worker hands it over: the usable images (``(index, rgb image)``), the skipped ones
    (``(index, reason)``) and the usable images' :func:`preprocess_images` (``None`` when preprocessing them
    together failed: the predictor then retries them one by one)."""

    images: list[tuple[int, Any]]
    skipped: list[tuple[int, str]]
    inputs: list[tuple[list[int], dict[str, Any]]] | None


def _load_sources(sources: Sequence[ImageSource], processor, min_side: int, indices: Sequence[int]) -> LoadedBatch:
    """Worker side of :func:`predict_images`: decodes the batch's images, checks the size rule, preprocesses."""
    images, skipped = [], []
    for index in indices:
        try:
            image = sources[index].load()
            input_size(image.height, image.width, processor, min_side)
        except (BadImageError, ValueError) as error:
            skipped.append((index, error.reason if isinstance(error, BadImageError) else str(error)))
            continue
        images.append((index, image))
    try:
        inputs = preprocess_images(processor, min_side, [image for _, image in images]) if images else []
    except (ValueError, RuntimeError):
        inputs = None
    return LoadedBatch(images, skipped, inputs)


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def _unique_stems(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    stems = []
    for name in names:
        stem = Path(name).stem
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return stems


@dataclass
class PredictReport:
    """What a run wrote and what it skipped (``[{"path", "reason"}]``), and how fast: ``seconds`` from the first
    image read to the last result written, ``images_per_second`` the predicted images over that time."""

    task: str
    num_images: int
    written: list[Path] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else 0.0


def predict_images(sources: Sequence[ImageSource | tuple], model, processor, output_dir: str | os.PathLike,
                   task: str | None = None, threshold: float | None = None, batch_size: int = 1,
                   device: str = "cpu", bf16: bool = False, model_name: str | None = None,
                   log: Callable[[str], None] = print, num_workers: int = 0,
                   mask_threshold: float | None = None) -> PredictReport:
    """Runs ``model`` on named images and writes the results to ``output_dir`` as each image finishes.

    Images go in batches of ``batch_size``, similar sizes together (:func:`plan_batches`); ``num_workers``
    DataLoader worker processes decode and preprocess the next batches while the model runs (0: all in this
    process; see :func:`default_num_workers`). ``predictions.jsonl`` gets the images as they finish,
    ``predictions.json`` in input order. The last ``log`` line gives the images per second.

    An image that cannot be loaded or used, or whose batch fails in the model or post-processing with a
    ``ValueError`` / ``RuntimeError`` (retried alone first), is reported through ``log`` and listed in the report's
    ``skipped``. ``task`` defaults to :func:`default_task`, ``threshold`` to ``DEFAULT_INSTANCE_THRESHOLD`` for
    instance / detection; ``mask_threshold`` as in :func:`model_predict_fn`; ``model_name`` (for the report) to the
    folder or Hub id the model was loaded from."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    task = task or default_task(processor)
    if threshold is None and task in ("instance", "detection"):
        threshold = DEFAULT_INSTANCE_THRESHOLD
    sources = [ImageSource(*source) for source in sources]
    id2label = id2label_of(model.config)
    stuff = {int(label) for label in getattr(model.config, "stuff_labels", ()) or ()}
    writer = PredictionWriter(output_dir, task, id2label, stuff)
    predictor = model_predict_fn(model, processor, [task], device, threshold, bf16=bf16, mask_threshold=mask_threshold)
    names = [source.name for source in sources]
    stems = _unique_stems(names)
    start = time.perf_counter()
    sizes = [source.probe() if batch_size > 1 and source.probe is not None else None for source in sources]
    load = partial(_load_sources, sources, processor, min_input_side(model))
    for loaded in load_batches(plan_batches(sizes, batch_size), load, num_workers):
        for index, reason in loaded.skipped:
            writer.skip(names[index], reason, index + 1)
            log(f"skipped {names[index]}: {reason}")
        for index, image, result in _runnable(loaded.images, loaded.inputs, predictor, names, writer, log):
            path = Path(names[index])
            log(f"[{index + 1}/{len(sources)}] " + writer.add(index + 1, path, stems[index], image, result[task]))
    seconds = time.perf_counter() - start
    model_name = getattr(model, "name_or_path", "") if model_name is None else model_name
    settings = {"task": task, "model": str(model_name), "threshold": threshold}
    if task in MASK_THRESHOLD_TASKS:
        settings["mask_threshold"] = predictor.mask_threshold
    written = writer.close(settings)
    report = PredictReport(task, len(writer.images), written, writer.skipped, seconds)
    log(f"predicted {report.num_images} image(s) in {seconds:.1f} s: {report.images_per_second:.2f} images/s "
        f"(batch size {batch_size}, {num_workers} loader worker(s))")
    return report


def predict_files(paths: Sequence[str | os.PathLike], model, processor, output_dir: str | os.PathLike,
                  **kwargs: Any) -> PredictReport:
    """:func:`predict_images` on image files (read with :func:`load_image`)."""
    sources = [ImageSource(str(path), partial(load_image, path), partial(encoded_image_size, path)) for path in paths]
    return predict_images(sources, model, processor, output_dir, **kwargs)


def _row_image(images, index: int, name: str):
    """The RGB image of row ``index`` of a one-column (``image``) data set."""
    from PIL import Image

    value = images[index]["image"]
    if not isinstance(value, Image.Image):
        raise BadImageError(name, f"the 'image' column holds {type(value).__name__}, not a decoded image")
    return _to_rgb(value, Path(name))


def _row_image_size(encoded, index: int) -> tuple[int, int] | None:
    return encoded_image_size(encoded[index]["image"])


def undecoded_images(dataset):
    """The ``image`` column of a ``datasets`` data set without decoding (``{"bytes", "path"}`` per row), for
    :func:`encoded_image_size`; ``None`` when the column is no ``datasets.Image`` (e.g. a list of rows)."""
    import datasets

    if not isinstance(dataset, datasets.Dataset) or not isinstance(dataset.features.get("image"), datasets.Image):
        return None
    return dataset.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))


def predict_dataset(dataset, model, processor, output_dir: str | os.PathLike, **kwargs: Any) -> PredictReport:
    """:func:`predict_images` on the rows of a ``datasets`` data set with an ``image`` column (named by their
    ``file_name`` column when there is one, else ``row-<index>``); each image is decoded when its turn comes."""
    if "image" not in dataset.column_names:
        raise ValueError(f"the data set has no 'image' column (columns {dataset.column_names})")
    images = dataset.select_columns(["image"])
    encoded = undecoded_images(dataset)
    names = ([str(name) for name in dataset["file_name"]] if "file_name" in dataset.column_names
             else [f"row-{index}" for index in range(len(dataset))])
    sources = [ImageSource(name, partial(_row_image, images, index, name),
                           None if encoded is None else partial(_row_image_size, encoded, index))
               for index, name in enumerate(names)]
    return predict_images(sources, model, processor, output_dir, **kwargs)


def _runnable(images: Sequence[tuple[int, Any]], inputs, predictor, names: Sequence[str], writer: PredictionWriter,
              log) -> Iterator[tuple[int, Any, dict]]:
    """``(index, image, result)`` of each of ``images`` (``(index, image)``, preprocessed as ``inputs`` or not);
    when the batch fails, each image alone, skipping the ones that still fail."""
    if not images:
        return
    try:
        results = predictor([image for _, image in images], inputs=inputs)
    except (ValueError, RuntimeError) as error:
        if len(images) > 1:
            for item in images:
                yield from _runnable([item], None, predictor, names, writer, log)
            return
        index = images[0][0]
        reason = f"failed in the model: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        writer.skip(names[index], reason, index + 1)
        log(f"skipped {names[index]}: {reason}")
        return
    for (index, image), result in zip(images, results):
        yield index, image, result
