"""Deployment options side by side: eager PyTorch, `torch.compile` (Inductor) and ONNX Runtime, in one run.

Models:

* ``r50``: the released R50 instance model (hid-2048 FFN, 300 queries; random weights, nothing downloaded), built by
  ``benchmarks/inference.py``'s ``build_maskdino("r50")``, at ``--height`` x ``--width`` (default 512x704: a short
  run; ``--height 800 --width 1088`` is the size of ``benchmarks/inference.py``).
* ``demo``: the bundled demo model on its first bundled image, as the processor pads it (160x192).

Variants: eager PyTorch, ``compile`` (Inductor), ``onnx`` (ONNX Runtime on a file exported for the input's size) and
``onnx-any`` (ONNX Runtime on a file exported for any size and batch: ``export_onnx`` without ``input_size`` and
``batch_size``).

Per model and device: the one-off costs (Inductor's compilation on the first call; the ONNX export and session
creation), then ``--runs`` timed forward passes of each variant, interleaved (eager, compiled, ONNX Runtime, eager,
...) so that background load affects all alike; medians and speed-ups over eager are printed, with each variant's
largest difference from eager. CPU runs use ``--threads`` threads (PyTorch and ONNX Runtime alike); CUDA is
benchmarked too when present (ONNX Runtime there only when it has the CUDA provider).

    python benchmarks/deploy.py                                   # r50 at 512x704 and demo, CPU (+ CUDA)
    python benchmarks/deploy.py --models r50 --height 800 --width 1088 --runs 5
    python benchmarks/deploy.py --models demo --variants eager compile
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import build_maskdino, load_info, timed  # noqa: E402

from maskdino_hf.export import OUTPUT_NAMES, MaskDINOOnnxModel, compile_model, export_onnx  # noqa: E402

VARIANTS = ("eager", "compile", "onnx", "onnx-any")


def demo_inputs():
    from PIL import Image

    from maskdino_hf.predict import demo_images, load_model_and_processor

    model, processor = load_model_and_processor(None, "cpu")
    inputs = processor([Image.open(demo_images()[0]).convert("RGB")], return_tensors="pt")
    return model, inputs["pixel_values"], inputs["pixel_mask"]


def r50_inputs(height: int, width: int):
    model, _ = build_maskdino("r50", torch.device("cpu"))
    pixel_values = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    return model, pixel_values, torch.ones(1, height, width, dtype=torch.long)


def max_error(outputs, reference) -> float:
    return max((getattr(outputs, name).float().cpu() - getattr(reference, name).float().cpu()).abs().max().item()
               for name in OUTPUT_NAMES)


def bench(args, name: str, model, pixel_values, pixel_mask, device: torch.device, work_dir: Path) -> dict:
    """One-off costs, interleaved timings and errors of every variant of one model on one device."""
    model = model.eval().to(device)
    pixel_values, pixel_mask = pixel_values.to(device), pixel_mask.to(device)
    runners, setup = {}, {}
    with torch.inference_mode():
        reference = model(pixel_values, pixel_mask=pixel_mask)

        def eager():
            return model(pixel_values, pixel_mask=pixel_mask)

        runners["eager"] = eager
        if "compile" in args.variants:
            torch._dynamo.reset()
            compiled_model = compile_model(copy.deepcopy(model))

            def compiled():
                return compiled_model(pixel_values, pixel_mask=pixel_mask)

            start = time.perf_counter()
            compiled()
            setup["compile"] = time.perf_counter() - start
            runners["compile"] = compiled
    # "onnx": exported for this input size and batch; "onnx-any": for any (dynamic batch, height and width).
    one_size = (tuple(pixel_values.shape[-2:]), pixel_values.shape[0])
    for variant, (export_size, export_batch) in (("onnx", one_size), ("onnx-any", (None, None))):
        if variant not in args.variants:
            continue
        providers = ["CUDAExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
        import onnxruntime

        if set(providers) <= set(onnxruntime.get_available_providers()):
            start = time.perf_counter()
            path = export_onnx(model, work_dir / f"{name}-{device.type}-{variant}.onnx", input_size=export_size,
                               batch_size=export_batch)
            # No spinning: ONNX Runtime's threads would otherwise spin on after each run and slow the next variant.
            session = MaskDINOOnnxModel(path, providers=providers, spin=False,
                                        intra_op_num_threads=args.threads if device.type == "cpu" else None)
            setup[variant] = time.perf_counter() - start

            def onnx(session=session):
                return session(pixel_values, pixel_mask=pixel_mask)

            runners[variant] = onnx
    errors, times = {}, {variant: [] for variant in runners}
    with torch.inference_mode():
        for variant, run in runners.items():
            errors[variant] = max_error(run(), reference)  # also the warm-up run
        for _ in range(args.runs):
            for variant, run in runners.items():
                times[variant].append(timed(run, device))
    return {"model": name, "device": device.type, "size": tuple(pixel_values.shape[-2:]), "setup": setup,
            "errors": errors, "medians": {variant: statistics.median(values) for variant, values in times.items()}}


def print_table(results: list[dict]) -> None:
    print("| model | device | input | variant | one-off cost | median forward | speed-up over eager | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for result in results:
        eager = result["medians"]["eager"]
        for variant, median in result["medians"].items():
            setup = result["setup"].get(variant)
            cost = "-" if setup is None else f"{setup:.1f} s ({'compile' if variant == 'compile' else 'export'})"
            print(f"| {result['model']} | {result['device']} | {result['size'][0]}x{result['size'][1]} | {variant} "
                  f"| {cost} | {median * 1000:.1f} ms | {eager / median:.2f}x | {result['errors'][variant]:.2g} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["r50", "demo"], choices=["r50", "demo"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="eager is always timed (the reference)")
    parser.add_argument("--height", type=int, default=512, help="r50 input height (default 512)")
    parser.add_argument("--width", type=int, default=704, help="r50 input width (default 704)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per variant (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of PyTorch and ONNX Runtime")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CPU, then CUDA if present")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] if args.device in ("auto", "cpu") else []
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    print(f"torch {torch.__version__}, {args.threads} CPU threads, {load_info()}")
    results = []
    with tempfile.TemporaryDirectory() as work_dir:
        for device in devices:
            for name in args.models:
                model, pixel_values, pixel_mask = (
                    r50_inputs(args.height, args.width) if name == "r50" else demo_inputs()
                )
                results.append(bench(args, name, model, pixel_values, pixel_mask, device, Path(work_dir)))
                print_table(results[-1:])
                sys.stdout.flush()
    print("\nAll results:")
    print_table(results)


if __name__ == "__main__":
    main()
