"""The `maskdino-hf` command line: parses arguments and dispatches; nothing heavy is imported until work starts.

  maskdino-hf predict [IMAGES ...] [--model DIR_OR_HUB_ID] [--task instance|panoptic|semantic|detection]
                      [--threshold T] [--mask-threshold M] [--output-dir D] [--device auto|cpu|cuda]
                      [--batch-size N] [--num-workers N] [--bf16] [--compile]
  maskdino-hf evaluate --model DIR_OR_HUB_ID --data DIR [--task all|instance|panoptic|semantic|detection]
                       [--split validation] [--output REPORT.json] [--max-images N] [--compile]
  maskdino-hf convert --checkpoint model.pth --config config.yaml --output-dir DIR
  maskdino-hf convert --release NAME --output-dir DIR [--checkpoint model.pth] [--push-to-hub REPO_ID]
  maskdino-hf export --output model.onnx [--height H --width W] [--model DIR_OR_HUB_ID] [--batch-size N]
  maskdino-hf releases
  maskdino-hf demo [--model DIR_OR_HUB_ID] [--host H] [--port P] [--share]

Without IMAGES (and without --model) `predict` runs the bundled demo model on its bundled images.

Exit status: 0 done; 2 a mistake in the input (one line on stderr; for `predict` also when no image could be used);
3 `predict` finished but skipped some images (each listed with its reason); 130 interrupted (Ctrl-C); 1 an
unexpected error (with its traceback; also shown for input errors when MASKDINO_HF_DEBUG=1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .predict import (
    DEFAULT_INSTANCE_THRESHOLD,
    DEFAULT_MASK_THRESHOLD,
    TASKS,
    CLIError,
    check_mask_threshold,
    collect_images,
    default_num_workers,
    demo_images,
    demo_model_dir,
    keep_freed_memory,
    load_model_and_processor,
    predict_files,
    resolve_device,
)

EVAL_TASKS = ("all",) + TASKS
EXIT_USAGE = 2
EXIT_SKIPPED = 3
# Errors that mean "the user's input is wrong": one line, no traceback.
USER_ERRORS = (CLIError, ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, PermissionError)

__all__ = ["CLIError", "build_parser", "demo_images", "demo_model_dir", "main"]


# ----------------------------------------------------------------------------------------------------------------
# convert, releases, demo
# ----------------------------------------------------------------------------------------------------------------


def _parse_labels(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CLIError(f"--stuff-labels must be comma-separated class ids, got {text!r}") from None


def _read_id2label(path: str | None) -> dict[int, str] | None:
    if path is None:
        return None
    try:
        mapping = json.loads(Path(path).read_text())
        return {int(k): str(v) for k, v in mapping.items()}
    except FileNotFoundError:
        raise CLIError(f"--id2label {path}: file not found") from None
    except (json.JSONDecodeError, AttributeError, ValueError) as error:
        raise CLIError(f"--id2label {path}: expected a JSON object of class id -> name ({error})") from None


def _convert(args: argparse.Namespace) -> int:
    if args.config is not None:
        if args.checkpoint is None:
            raise CLIError("--checkpoint is required with --config")
        for name in ("cache_dir", "push_to_hub"):
            if getattr(args, name) is not None:
                raise CLIError(f"--{name.replace('_', '-')} only applies to --release")
    if args.release is not None:
        from .releases import convert_release

        output = convert_release(args.release, args.output_dir, checkpoint=args.checkpoint, cache_dir=args.cache_dir,
                                 push_to_hub=args.push_to_hub)
        print(f"converted release {args.release} -> {output}")
        return 0
    from .convert_maskdino_to_hf import convert_checkpoint

    convert_checkpoint(args.checkpoint, args.config, args.output_dir, _parse_labels(args.stuff_labels),
                       _read_id2label(args.id2label))
    print(f"converted {args.checkpoint} -> {args.output_dir}")
    return 0


def _releases(args: argparse.Namespace) -> int:
    from .releases import releases_table

    print(releases_table())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from importlib.util import find_spec

    if find_spec("gradio") is None:
        raise CLIError('the web demo needs Gradio: pip install -e ".[demo]"')
    from .webdemo import launch

    keep_freed_memory()
    launch(model=args.model, server_name=args.host, server_port=args.port, share=args.share)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# predict
# ----------------------------------------------------------------------------------------------------------------


def _make_output_dir(path: str) -> None:
    """Creates ``--output-dir`` before any work, so that a bad one fails at once."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise CLIError(f"--output-dir {path}: is a file, not a folder") from None
    except OSError as error:
        raise CLIError(f"--output-dir {path}: cannot create the folder ({error.strerror or error})") from None


def _predict(args: argparse.Namespace) -> int:
    if args.task is not None:  # a mask threshold the given task cannot use fails before the model loads
        check_mask_threshold(args.mask_threshold, [args.task])
    if args.images:
        paths = collect_images(args.images)
    else:
        paths = demo_images()
        if not paths:
            raise CLIError(f"no IMAGES given and the demo model has no bundled images in {demo_model_dir() / 'images'}")
    _make_output_dir(args.output_dir)
    device = resolve_device(args.device)
    keep_freed_memory()
    model, processor = load_model_and_processor(args.model, device, progress=args.progress, compile=args.compile)
    num_workers = default_num_workers(len(paths)) if args.num_workers is None else args.num_workers
    report = predict_files(paths, model, processor, args.output_dir, task=args.task, threshold=args.threshold,
                           mask_threshold=args.mask_threshold,
                           batch_size=args.batch_size, device=device, bf16=args.bf16, num_workers=num_workers)
    print(f"{report.num_images} image(s) ({report.task}): overlays and " + ", ".join(map(str, report.written))
          + (f" and {Path(args.output_dir) / report.task}/*.png" if report.task in ("panoptic", "semantic") else "")
          + f" in {args.output_dir}")
    if not report.skipped:
        return 0
    if report.num_images == 0:  # nothing usable: an input error like any other
        listed = [f"{entry['path']}: {entry['reason']}" for entry in report.skipped]
        more = f"; and {len(listed) - 3} more" if len(listed) > 3 else ""
        prefix = "" if len(listed) == 1 else f"none of the {len(listed)} images could be used: "
        raise CLIError(prefix + "; ".join(listed[:3]) + more)
    print(f"maskdino-hf predict: skipped {len(report.skipped)} of {len(paths)} image(s):", file=sys.stderr)
    for entry in report.skipped:
        print(f"  {entry['path']}: {entry['reason']}", file=sys.stderr)
    return EXIT_SKIPPED


def _export(args: argparse.Namespace) -> int:
    from .export import dynamic_size_range, export_onnx

    if (args.height is None) != (args.width is None):
        raise CLIError("give both --height and --width (one input size), or neither (any size)")
    size = None if args.height is None else (args.height, args.width)
    model, _ = load_model_and_processor(args.model, "cpu")
    try:
        path = export_onnx(model, args.output, size, batch_size=args.batch_size)
    except ImportError as error:  # the export extra is missing: an input problem, said in one line
        raise CLIError(str(error)) from None
    batch = "N" if args.batch_size is None else args.batch_size
    if size is None:
        low, high = dynamic_size_range(model)
        print(f"wrote {path}: input {batch}x3xHxW, H and W from {low} to {high} px (the image processor's own "
              "padding); run it with maskdino_hf.export.MaskDINOOnnxModel")
    else:
        print(f"wrote {path}: input {batch}x3x{args.height}x{args.width}; pad every batch to it with "
              f"processor(images, pad_size={{'height': {args.height}, 'width': {args.width}}}) and run it with "
              "maskdino_hf.export.MaskDINOOnnxModel")
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
    from .evaluation import process_state

    state = process_state()  # under `accelerate launch` every process evaluates its share on its own device
    try:
        status = _evaluate_share(args, state)
        state.wait_for_everyone()
        return status
    finally:
        # Gloo's threads outliving the interpreter abort the process at exit: close the group while it lives.
        state.destroy_process_group()


def _evaluate_share(args: argparse.Namespace, state: Any) -> int:
    """``maskdino-hf evaluate`` in one of the processes of ``state``; the main one prints and writes the report."""
    from .evaluation import evaluate, format_metrics_table, load_eval_dataset, tasks_for_dataset

    dataset, categories = load_eval_dataset(args.data, args.split)
    if len(dataset) == 0:
        raise CLIError(f"--data {args.data}: the {args.split!r} split is empty")
    tasks = tasks_for_dataset(args.task, dataset.column_names)
    device = str(state.device) if state.num_processes > 1 else resolve_device(args.device)
    keep_freed_memory()
    model, processor = load_model_and_processor(args.model, device, compile=args.compile)
    num_images = len(dataset) if args.max_images is None else min(len(dataset), args.max_images)
    num_workers = default_num_workers(num_images) if args.num_workers is None else args.num_workers
    metrics = evaluate(model, processor, dataset, tasks, categories=categories, batch_size=args.batch_size,
                       max_images=args.max_images, bf16=args.bf16, progress=True, num_workers=num_workers)
    if not state.is_main_process:
        return 0
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


def _ranged(convert: Callable[[str], Any], low: float, high: float, allowed: str) -> Callable[[str], Any]:
    """An argparse type: ``convert(text)`` within ``[low, high]``; anything else is an argument error naming
    ``allowed``."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {value}")
        return value

    return parse


_positive_int = _ranged(int, 1, math.inf, "a whole number >= 1")
_non_negative_int = _ranged(int, 0, math.inf, "a whole number >= 0")
_unit_float = _ranged(float, 0.0, 1.0, "a number in [0, 1]")
_open_unit_float = _ranged(float, math.nextafter(0.0, 1.0), math.nextafter(1.0, 0.0), "a number in (0, 1)")
_port = _ranged(int, 1, 65535, "a port number in 1..65535")


BF16_HELP = ("run the model under bfloat16 autocast: about 0.55x the float32 time on CPUs with AVX-512 BF16 or AMX, "
             "far slower than float32 on CPUs without AVX-512 (a warning says so; see README)")


def _add_convert(commands) -> None:
    convert = commands.add_parser(
        "convert", help="convert an official checkpoint (.pth + yaml, or a named release) to a model folder",
        description="Convert an official Mask DINO checkpoint: --config (official yaml) with --checkpoint, or "
        "--release NAME (see `maskdino-hf releases`; the checkpoint is downloaded unless --checkpoint is given).",
    )
    source = convert.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="official yaml (with its _BASE_ chain) or a dumped config")
    source.add_argument("--release", metavar="NAME", help="an official release (see `maskdino-hf releases`)")
    convert.add_argument("--checkpoint", help="official .pth file (required with --config)")
    convert.add_argument("--output-dir", required=True)
    convert.add_argument("--stuff-labels", help="comma-separated stuff class ids (default: COCO panoptic rule)")
    convert.add_argument("--id2label", help="JSON file mapping class ids to names")
    convert.add_argument("--cache-dir", help="download folder of --release checkpoints")
    convert.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the converted --release to this Hub repo")
    convert.set_defaults(handler=_convert)


def _add_model_options(parser) -> None:
    """The options of ``predict`` and ``evaluate`` that choose the model and how it runs."""
    parser.add_argument("--model", default=None,
                        help="model folder or Hugging Face Hub id (default: the bundled demo model)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--batch-size", type=_positive_int, default=1,
                        help="images per forward pass (sizes may differ; similar sizes are batched together)")
    parser.add_argument("--num-workers", type=_non_negative_int, default=None,
                        help="worker processes decoding and preprocessing images while the model runs (0: none; "
                        "default: none for fewer than 8 images, else min(2, CPUs - 1))")
    parser.add_argument("--bf16", action="store_true", help=BF16_HELP)


def _add_predict(commands) -> None:
    predict = commands.add_parser(
        "predict",
        help="segment images and write overlays + results JSON",
        description="Run a Mask DINO model on images. Writes <stem>_overlay.png per image, predictions.jsonl (one "
        "line per image as it finishes), predictions.json (plus coco_results.json for instance/detection, "
        "panoptic/<stem>.png or semantic/<stem>.png maps). An unusable image is reported and skipped (exit status "
        "3); see maskdino_hf.predict for the rule applied to very elongated images.",
    )
    predict.add_argument("images", nargs="*", metavar="IMAGES",
                         help="image files or folders of images (default: the demo model's bundled images)")
    _add_model_options(predict)
    predict.add_argument("--task", choices=TASKS, default=None,
                         help="default: panoptic for a panoptic model, semantic for a semantic-only one, else instance")
    predict.add_argument("--threshold", type=_unit_float, default=None,
                         help=f"instance/detection score threshold (default {DEFAULT_INSTANCE_THRESHOLD}); panoptic "
                         "query keep threshold (default: the processor's object_mask_threshold); unused for semantic")
    predict.add_argument("--mask-threshold", type=_open_unit_float, default=None,
                         help="mask probability from which a pixel belongs to an instance or panoptic segment "
                         f"(default {DEFAULT_MASK_THRESHOLD}, the official rule); lower values leave fewer void "
                         "pixels along panoptic segment boundaries; instance and panoptic only")
    predict.add_argument("--output-dir", default="outputs", help="output folder (default: outputs)")
    predict.add_argument("--progress", action="store_true", help="show Transformers' model loading progress bars")
    _add_compile_option(predict)
    predict.set_defaults(handler=_predict)


def _add_compile_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", action="store_true",
                        help="compile the model with torch.compile (Inductor; needs a C++ compiler on CPU): the "
                        "first batch of each new padded size pays the compilation, later ones run faster (see README)")


def _add_evaluate(commands) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="COCO box/mask AP, panoptic quality and mean IoU on a data set",
        description="Evaluate a model on a COCO-format folder (images/, annotations/instances.json, "
        "annotations/panoptic.json + panoptic/, semantic/), a folder of such split folders, or a datasets "
        "save_to_disk folder. Prints a table and optionally writes a JSON report.",
    )
    _add_model_options(evaluate)
    evaluate.add_argument("--data", required=True, help="COCO-format folder or datasets save_to_disk folder")
    evaluate.add_argument("--task", choices=EVAL_TASKS, default="all",
                          help="all (default): every kind of annotation the data has")
    evaluate.add_argument("--split", default="validation", help="split of a DatasetDict / sub-folder (validation)")
    evaluate.add_argument("--output", default=None, help="write the report JSON here")
    evaluate.add_argument("--max-images", type=_positive_int, default=None, help="evaluate only the first N images")
    _add_compile_option(evaluate)
    evaluate.set_defaults(handler=_evaluate)


def _add_export(commands) -> None:
    export = commands.add_parser(
        "export", help="export a model to ONNX (run by ONNX Runtime; needs the export extra)",
        description="Export the inference forward pass of a Mask DINO model to an ONNX file (pip install -e "
        "\".[export]\"): for any input size by default, or, with --height and --width, for that size only (pad every "
        "batch to it with the image processor's pad_size; a smaller graph). "
        "maskdino_hf.export.MaskDINOOnnxModel runs the file and returns outputs the processor's post-processing "
        "takes.",
    )
    export.add_argument("--format", choices=("onnx",), default="onnx", help="onnx (the only format so far)")
    export.add_argument("--model", default=None, help="model folder or Hub id (default: the bundled demo model)")
    export.add_argument("--output", required=True, help="the .onnx file to write")
    export.add_argument("--height", type=_positive_int, default=None,
                        help="the one input height in pixels (padded size; default: any size)")
    export.add_argument("--width", type=_positive_int, default=None,
                        help="the one input width in pixels (padded size; default: any size)")
    export.add_argument("--batch-size", type=_positive_int, default=None,
                        help="the one number of images per run (default: any)")
    export.set_defaults(handler=_export)


def _add_releases_and_demo(commands) -> None:
    releases = commands.add_parser("releases", help="list the official checkpoints `convert --release` knows")
    releases.set_defaults(handler=_releases)
    demo = commands.add_parser("demo", help="start the Gradio web demo (needs the demo extra)",
                               description='Start the web demo (pip install -e ".[demo]"): upload an image, choose '
                               "the task and threshold, see the overlay and the segment table.")
    demo.add_argument("--model", default=None, help="model folder or Hub id (default: the bundled demo model)")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    demo.add_argument("--port", type=_port, default=7860, help="port (default 7860)")
    demo.add_argument("--share", action="store_true", help="ask Gradio for a public share link")
    demo.set_defaults(handler=_demo)


class _VersionAction(argparse.Action):
    """`--version`, looked up only when asked (reading package metadata costs start-up time)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version

        try:
            parser.exit(message=f"maskdino-hf {version('maskdino-hf')}\n")
        except PackageNotFoundError:
            parser.exit(message="maskdino-hf (not installed)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskdino-hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action=_VersionAction, nargs=0, help="print the package version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_predict(commands)
    _add_evaluate(commands)
    _add_convert(commands)
    _add_export(commands)
    _add_releases_and_demo(commands)
    return parser


def _one_line(error: BaseException) -> str:
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    text = "; ".join(line.strip() for line in str(message).splitlines() if line.strip())
    return text or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns the exit status (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except USER_ERRORS as error:
        if os.environ.get("MASKDINO_HF_DEBUG", "").lower() in ("1", "true", "yes", "on"):
            raise
        print(f"maskdino-hf {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # what predict finished so far is in predictions.jsonl
        print(f"maskdino-hf {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
