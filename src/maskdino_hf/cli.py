"""The `maskdino-hf` command line: convert official checkpoints, predict on images, evaluate on a data set.

  maskdino-hf predict [IMAGES ...] [--model DIR_OR_HUB_ID] [--task instance|panoptic|semantic|detection]
                      [--threshold T] [--output-dir D] [--device auto|cpu|cuda] [--batch-size N]
  maskdino-hf evaluate --model DIR_OR_HUB_ID --data DIR [--task all|instance|panoptic|semantic|detection]
                       [--split validation] [--output REPORT.json]
  maskdino-hf convert --checkpoint model.pth --config config.yaml --output-dir DIR

Without IMAGES (and without --model) `predict` runs the bundled demo model on its bundled images.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

TASKS = ("instance", "panoptic", "semantic", "detection")
EVAL_TASKS = ("all",) + TASKS
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
DEFAULT_INSTANCE_THRESHOLD = 0.5


class CLIError(Exception):
    """An error reported as one line (no traceback) with exit status 2."""


# ----------------------------------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------------------------------


def _parse_labels(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise SystemExit(f"--stuff-labels must be comma-separated class ids, got {text!r}") from error


def _convert(args: argparse.Namespace) -> int:
    from .convert_maskdino_to_hf import convert_checkpoint

    id2label = None
    if args.id2label:
        id2label = {int(k): v for k, v in json.loads(Path(args.id2label).read_text()).items()}
    convert_checkpoint(args.checkpoint, args.config, args.output_dir, _parse_labels(args.stuff_labels), id2label)
    print(f"converted {args.checkpoint} -> {args.output_dir}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Model, device and image loading (shared by predict and evaluate)
# ----------------------------------------------------------------------------------------------------------------


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


def load_model_and_processor(model: str | os.PathLike | None, device: str = "cpu"):
    """``(model, image_processor)`` from a local folder or a Hub id (``None``: the bundled demo model), in eval
    mode on ``device``. Raises :class:`CLIError` with a one-line message when the model cannot be loaded."""
    import torch
    from transformers import AutoModelForUniversalSegmentation
    from transformers.utils import logging as hf_logging

    from . import (
        MaskDINOImageProcessor,  # importing the package registers the Auto classes
    )

    hf_logging.disable_progress_bar()
    if model is None:
        path = demo_model_dir()
        if not (path / "config.json").is_file():
            raise CLIError(
                f"the bundled demo model is not installed (no config.json in {path}); pass --model DIR_OR_HUB_ID"
            )
        name = str(path)
    else:
        name = os.fspath(model)
        path = Path(name).expanduser()
    local = path.exists()
    if local:
        if not path.is_dir():
            raise CLIError(f"--model {name}: is a file; expected a model folder (config.json + weights) or a Hub id")
        if not (path / "config.json").is_file():
            raise CLIError(f"--model {name}: model folder has no config.json")
        name = str(path)
    elif _looks_like_local_path(name):
        raise CLIError(f"--model {name}: model folder not found")

    local_only = True
    network = None
    if not local:
        try:
            from huggingface_hub.utils import validate_repo_id

            validate_repo_id(name)
        except Exception:  # noqa: BLE001
            raise CLIError(f"--model {name}: model folder not found (and not a valid Hub id)") from None
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
        config = network.config
        print(
            f"warning: {name} has no usable preprocessor_config.json; using the default Mask DINO image processor",
            file=sys.stderr,
        )
        processor = MaskDINOImageProcessor(num_labels=config.num_labels, stuff_labels=list(config.stuff_labels))
    network.eval().to(torch.device(device))
    return network, processor


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: CUDA is not available on this machine (use --device cpu)")
    return device


def load_image(path: str | os.PathLike):
    """An RGB PIL image (EXIF orientation applied); :class:`CLIError` naming the file when it cannot be read."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise CLIError(f"image not found: {path}")
    if not path.is_file():
        raise CLIError(f"not an image file: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise CLIError(f"cannot read image {path}: {error}") from None


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


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _to_cpu(value: Any) -> Any:
    if hasattr(value, "detach"):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def model_predict_fn(
    model,
    processor,
    tasks: Sequence[str],
    device: str = "cpu",
    threshold: float | None = None,
    bf16: bool = False,
) -> Callable[..., list[dict[str, Any]]]:
    """A function ``(images, rows=None) -> [{task: result}]`` (``rows``, the data set rows, are not used) running the model once per batch (images of different sizes are
    padded together by the processor) and the processor's post-processing of each task at the original image size.

    Results (on CPU): ``instance``: ``scores, labels, boxes`` (xyxy, clipped to the image), ``masks`` (N, H, W) bool,
    sorted by score, thing classes only when the processor has ``stuff_labels``; ``detection``: ``scores, labels, boxes``; ``panoptic``: ``segmentation`` (H, W) (0 = void) and
    ``segments_info`` (``id, label_id, isthing, score, was_fused``); ``semantic``: the (H, W) label map.
    ``threshold``: score threshold of instances / detections (default 0: keep the top-k, as for AP) and the query
    keep threshold of panoptic inference (default: the processor's ``object_mask_threshold``). ``bf16``: run the
    model under bfloat16 autocast (CPU or CUDA; the model keeps float32 where precision needs it)."""
    import torch

    def predict(images: Sequence[Any], rows: Sequence[Mapping] | None = None) -> list[dict[str, Any]]:
        inputs = processor(list(images), return_tensors="pt")
        target_sizes = [(image.height, image.width) for image in images]
        image_sizes = processor.image_sizes_from_pixel_mask(inputs["pixel_mask"])
        with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            outputs = model(pixel_values=inputs["pixel_values"].to(device), pixel_mask=inputs["pixel_mask"].to(device))
        for name in ("class_queries_logits", "masks_queries_logits", "pred_boxes"):  # post-processing in float32
            setattr(outputs, name, getattr(outputs, name).float())
        sizes = {"target_sizes": target_sizes, "image_sizes": image_sizes}
        # stuff classes are no instances: drop them from instance / detection results (official panoptic-model rule)
        things_only = True if processor.stuff_labels else None
        results: list[dict[str, Any]] = [{} for _ in images]
        for task in tasks:
            if task == "instance":
                items = processor.post_process_instance_segmentation(
                    outputs, threshold=threshold or 0.0, panoptic_on=things_only, **sizes
                )
            elif task == "detection":
                items = processor.post_process_object_detection(
                    outputs, threshold=threshold or 0.0, panoptic_on=things_only, **sizes
                )
            elif task == "panoptic":
                items = processor.post_process_panoptic_segmentation(outputs, threshold=threshold, **sizes)
            elif task == "semantic":
                items = processor.post_process_semantic_segmentation(outputs, **sizes)
            else:
                raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
            for result, item, (height, width) in zip(results, items, target_sizes):
                item = _to_cpu(item)
                if task in ("instance", "detection"):
                    boxes = item["boxes"].clone()
                    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
                    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
                    item = {key: item[key] for key in ("scores", "labels", "boxes", "masks") if key in item}
                    item["boxes"] = boxes
                result[task] = item
        return results

    return predict


# ----------------------------------------------------------------------------------------------------------------
# predict
# ----------------------------------------------------------------------------------------------------------------


def _id2label(config) -> dict[int, str]:
    return {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}


def _unique_stems(paths: Sequence[Path]) -> list[str]:
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        stem = path.stem
        if stem in seen:
            seen[stem] += 1
            stem = f"{stem}_{seen[stem]}"
        else:
            seen[stem] = 1
        stems.append(stem)
    return stems


def _bbox_xywh(mask) -> list[int]:
    import numpy as np

    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _save_label_png(array, path: Path) -> None:
    import numpy as np
    from PIL import Image

    array = np.asarray(array)
    if array.min(initial=0) >= 0 and array.max(initial=0) < 256:
        Image.fromarray(array.astype(np.uint8)).save(path)  # 2-D uint8: mode L
    else:
        Image.fromarray(array.astype(np.uint16)).save(path)


def _predict(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    from transformers.image_transforms import id_to_rgb
    from .evaluation import instances_to_coco_results
    from .visualization import draw_instances, draw_panoptic, draw_semantic

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise CLIError(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.images:
        paths = collect_images(args.images)
    else:
        paths = demo_images()
        if not paths:
            raise CLIError(f"no IMAGES given and the demo model has no bundled images in {demo_model_dir() / 'images'}")
    for path in paths:  # fail before loading the model, naming the file
        load_image(path).close()
    device = resolve_device(args.device)
    model, processor = load_model_and_processor(args.model, device)
    id2label = _id2label(model.config)
    stuff = {int(label) for label in getattr(model.config, "stuff_labels", ()) or ()}
    if args.task is None:  # the tasks the processor's post-processing was configured for
        if processor.panoptic_on:
            args.task = "panoptic"
        elif processor.semantic_on and not processor.instance_on:
            args.task = "semantic"
        else:
            args.task = "instance"
    threshold = args.threshold
    if threshold is None and args.task in ("instance", "detection"):
        threshold = DEFAULT_INSTANCE_THRESHOLD
    predict = model_predict_fn(model, processor, [args.task], device, threshold, bf16=args.bf16)

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.task in ("panoptic", "semantic"):
        (output_dir / args.task).mkdir(exist_ok=True)
    stems = _unique_stems(paths)
    images_info, annotations = [], []
    progress = tqdm(total=len(paths), unit="img", desc=f"maskdino-hf predict ({args.task})", file=sys.stderr)
    for batch in _batches(list(enumerate(paths)), args.batch_size):
        pil_images = [load_image(path) for _, path in batch]
        results = predict(pil_images)
        for (index, path), image, result in zip(batch, pil_images, results):
            image_id = index + 1
            stem = stems[index]
            item = result[args.task]
            overlay_name = f"{stem}_overlay.png"
            info = {"id": image_id, "file_name": path.name, "path": str(path), "height": image.height,
                    "width": image.width, "overlay": overlay_name}
            if args.task in ("instance", "detection"):
                masks = item.get("masks")
                coco = instances_to_coco_results(
                    image_id, item["scores"], item["labels"], masks=masks, boxes=item["boxes"], box_format="xyxy"
                )
                annotations.extend(coco)
                drawing = draw_instances(
                    image, item["labels"], item["scores"], masks=masks, boxes=item["boxes"], id2label=id2label,
                    title=f"{args.task} ({len(coco)})",
                )
            elif args.task == "panoptic":
                segmentation = item["segmentation"].numpy().astype(np.int64)
                png_name = f"{args.task}/{stem}.png"
                Image.fromarray(id_to_rgb(np.maximum(segmentation, 0))).save(output_dir / png_name)
                segments = []
                for segment in item["segments_info"]:
                    mask = segmentation == int(segment["id"])
                    label = int(segment["label_id"])
                    segments.append(
                        {
                            "id": int(segment["id"]),
                            "category_id": label,
                            "label": id2label.get(label, str(label)),
                            "isthing": int(segment.get("isthing", label not in stuff)),
                            "iscrowd": 0,
                            "score": float(segment.get("score", 1.0)),
                            "area": int(mask.sum()),
                            "bbox": _bbox_xywh(mask),
                        }
                    )
                annotations.append({"image_id": image_id, "file_name": png_name, "segments_info": segments})
                drawing = draw_panoptic(image, segmentation, item["segments_info"], id2label=id2label,
                                        title=f"panoptic ({len(segments)})")
            else:
                label_map = item.numpy()
                png_name = f"{args.task}/{stem}.png"
                _save_label_png(label_map, output_dir / png_name)
                labels, counts = np.unique(label_map, return_counts=True)
                annotations.append(
                    {
                        "image_id": image_id,
                        "file_name": png_name,
                        "classes": [
                            {"label_id": int(label), "label": id2label.get(int(label), str(int(label))),
                             "area": int(count)}
                            for label, count in zip(labels.tolist(), counts.tolist())
                        ],
                    }
                )
                drawing = draw_semantic(image, label_map, id2label=id2label, ignore_index=None, title="semantic")
            drawing.save(output_dir / overlay_name)
            images_info.append(info)
            progress.update(1)
    progress.close()

    categories = [
        {"id": label, "name": name, "isthing": int(label not in stuff)} for label, name in sorted(id2label.items())
    ]
    report = {
        "task": args.task,
        "model": str(args.model) if args.model is not None else str(demo_model_dir()),
        "threshold": threshold,
        "categories": categories,
        "images": images_info,
        "annotations": annotations,
    }
    (output_dir / "predictions.json").write_text(json.dumps(report))
    written = [output_dir / "predictions.json"]
    if args.task in ("instance", "detection"):
        (output_dir / "coco_results.json").write_text(json.dumps(annotations))
        written.append(output_dir / "coco_results.json")
    count = len(annotations) if args.task in ("instance", "detection") else sum(
        len(a.get("segments_info", a.get("classes", []))) for a in annotations
    )
    what = {"instance": "instances", "detection": "detections", "panoptic": "segments", "semantic": "class regions"}
    print(
        f"{len(paths)} image(s), {count} {what[args.task]}: overlays and "
        + ", ".join(str(p) for p in written)
        + (f" and {output_dir / args.task}/*.png" if args.task in ("panoptic", "semantic") else "")
        + f" in {output_dir}"
    )
    return 0


# ----------------------------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate, format_metrics_table, load_eval_dataset, process_state, tasks_for_dataset

    dataset, categories = load_eval_dataset(args.data, args.split)
    if len(dataset) == 0:
        raise CLIError(f"--data {args.data}: the {args.split!r} split is empty")
    tasks = tasks_for_dataset(args.task, dataset.column_names)
    state = process_state()  # under `accelerate launch` every process evaluates its share on its own device
    device = str(state.device) if state.num_processes > 1 else resolve_device(args.device)
    model, processor = load_model_and_processor(args.model, device)
    metrics = evaluate(model, processor, dataset, tasks, categories=categories, batch_size=args.batch_size,
                       max_images=args.max_images, bf16=args.bf16, progress=True)
    if not state.is_main_process:
        return 0
    num_images = len(dataset) if args.max_images is None else min(len(dataset), args.max_images)
    model_name = str(args.model) if args.model is not None else str(demo_model_dir())
    report = {"model": model_name, "data": str(args.data), "split": args.split, "tasks": tasks,
              "num_images": num_images, "metrics": metrics}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(_json_safe(report), indent=1))
    print(format_metrics_table(metrics, title=f"{', '.join(tasks)} on {args.data} ({num_images} images)"))
    if args.output:
        print(f"report written to {args.output}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskdino-hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert an official checkpoint (.pth + yaml) to a model folder")
    convert.add_argument("--checkpoint", required=True, help="official .pth file")
    convert.add_argument("--config", required=True, help="official yaml (with its _BASE_ chain) or a dumped config")
    convert.add_argument("--output-dir", required=True)
    convert.add_argument("--stuff-labels", help="comma-separated stuff class ids (default: COCO panoptic rule)")
    convert.add_argument("--id2label", help="JSON file mapping class ids to names")
    convert.set_defaults(handler=_convert)

    predict = commands.add_parser(
        "predict",
        help="segment images and write overlays + results JSON",
        description="Run a Mask DINO model on images. Writes <stem>_overlay.png per image and predictions.json "
        "(plus coco_results.json for instance/detection, panoptic/<stem>.png or semantic/<stem>.png maps).",
    )
    predict.add_argument("images", nargs="*", metavar="IMAGES",
                         help="image files or folders of images (default: the demo model's bundled images)")
    predict.add_argument("--model", default=None,
                         help="model folder or Hugging Face Hub id (default: the bundled demo model)")
    predict.add_argument("--task", choices=TASKS, default=None,
                         help="default: panoptic for a panoptic model, semantic for a semantic-only one, else instance")
    predict.add_argument("--threshold", type=float, default=None,
                         help=f"instance/detection score threshold (default {DEFAULT_INSTANCE_THRESHOLD}); panoptic "
                         "query keep threshold (default: the processor's object_mask_threshold); unused for semantic")
    predict.add_argument("--output-dir", default="outputs", help="output folder (default: outputs)")
    predict.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    predict.add_argument("--batch-size", type=int, default=1, help="images per forward pass (sizes may differ)")
    predict.add_argument("--bf16", action="store_true",
                         help="run the model under bfloat16 autocast: about 0.55x the float32 time on CPUs with AVX-512 BF16 or AMX (see README)")
    predict.set_defaults(handler=_predict)

    evaluate = commands.add_parser(
        "evaluate",
        help="COCO box/mask AP, panoptic quality and mean IoU on a data set",
        description="Evaluate a model on a COCO-format folder (images/, annotations/instances.json, "
        "annotations/panoptic.json + panoptic/, semantic/), a folder of such split folders, or a datasets "
        "save_to_disk folder. Prints a table and optionally writes a JSON report.",
    )
    evaluate.add_argument("--model", default=None, help="model folder or Hub id (default: the bundled demo model)")
    evaluate.add_argument("--data", required=True, help="COCO-format folder or datasets save_to_disk folder")
    evaluate.add_argument("--task", choices=EVAL_TASKS, default="all",
                          help="all (default): every kind of annotation the data has")
    evaluate.add_argument("--split", default="validation", help="split of a DatasetDict / sub-folder (validation)")
    evaluate.add_argument("--output", default=None, help="write the report JSON here")
    evaluate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    evaluate.add_argument("--batch-size", type=int, default=1)
    evaluate.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images")
    evaluate.add_argument("--bf16", action="store_true",
                          help="run the model under bfloat16 autocast: about 0.55x the float32 time on CPUs with AVX-512 BF16 or AMX (see README)")
    evaluate.set_defaults(handler=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except CLIError as error:
        print(f"maskdino-hf {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"maskdino-hf {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
