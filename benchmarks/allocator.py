"""How much the command line's `keep_freed_memory()` (glibc mmap / trim thresholds) saves on CPU inference.

Each setting runs in its own fresh process (the allocator's settings are per process and cannot be undone cleanly):
the model is built, one warm-up inference runs, then `--runs` timed inferences, each processor + forward +
instance post-processing, with the minor page faults and system CPU time of the process during each. Printed: the
medians per setting and the ratio kept / default.

    python benchmarks/allocator.py                      # R50 (random weights, released instance config), 800x1088
    python benchmarks/allocator.py --model demo --runs 10
    python benchmarks/allocator.py --quick              # the demo model, 3 runs: a smoke test
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build(model_name: str):
    """(model, processor, image): the R50 of `benchmarks/inference.py` on a random 800x1088 image, or the bundled demo
    model on its first bundled image."""
    import numpy as np

    if model_name == "r50":
        sys.path.insert(0, str(HERE))
        from inference import build_maskdino

        model, processor = build_maskdino("r50", __import__("torch").device("cpu"))
        return model, processor, np.random.default_rng(0).integers(0, 256, (800, 1088, 3), dtype=np.uint8)
    from PIL import Image

    from maskdino_hf import MaskDINOForUniversalSegmentation, MaskDINOImageProcessor
    from maskdino_hf.predict import demo_images, demo_model_dir

    model = MaskDINOForUniversalSegmentation.from_pretrained(demo_model_dir()).eval()
    processor = MaskDINOImageProcessor.from_pretrained(demo_model_dir())
    return model, processor, np.asarray(Image.open(demo_images()[0]).convert("RGB"))


def probe(model_name: str, keep: bool, runs: int, threads: int) -> dict:
    """One setting, in this (fresh) process: the per-run seconds, minor faults and system CPU seconds."""
    import torch

    from maskdino_hf.predict import keep_freed_memory

    torch.set_num_threads(threads)
    applied = keep_freed_memory() if keep else False
    model, processor, image = build(model_name)

    def infer():
        inputs = processor(images=image, return_tensors="pt", input_data_format="channels_last")
        with torch.inference_mode():
            outputs = model(**inputs)
        return processor.post_process_instance_segmentation(outputs, target_sizes=[image.shape[:2]])

    infer()
    seconds, faults, system = [], [], []
    for _ in range(runs):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        infer()
        seconds.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        faults.append(after.ru_minflt - before.ru_minflt)
        system.append(after.ru_stime - before.ru_stime)
    return {"applied": applied, "seconds": seconds, "faults": faults, "system": system}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["r50", "demo"], default="r50")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="the demo model, 3 runs")
    parser.add_argument("--_probe", dest="probe", choices=["default", "kept"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.model, args.runs = "demo", 3
    if args.probe:
        print(json.dumps(probe(args.model, args.probe == "kept", args.runs, args.threads)))
        return
    results = {}
    for setting in ("default", "kept"):
        command = [sys.executable, __file__, "--model", args.model, "--runs", str(args.runs),
                   "--threads", str(args.threads), "--_probe", setting]
        completed = subprocess.run(command, capture_output=True, text=True, check=True)
        results[setting] = json.loads(completed.stdout.strip().splitlines()[-1])
    print(f"model {args.model}, {args.runs} runs per setting, {args.threads} threads, each setting in a fresh process; "
          "one inference = processor + fp32 forward + instance post-processing")
    print(f"{'setting':<34} {'median s':>9} {'minor faults':>13} {'system CPU s':>13}")
    labels = {"default": "default glibc allocator",
              "kept": "keep_freed_memory()" + ("" if results["kept"]["applied"] else " (not applied here)")}
    for setting, row in results.items():
        print(f"{labels[setting]:<34} {statistics.median(row['seconds']):>9.3f} "
              f"{statistics.median(row['faults']):>13.0f} {statistics.median(row['system']):>13.3f}")
    ratio = statistics.median(results["kept"]["seconds"]) / statistics.median(results["default"]["seconds"])
    print(f"kept / default inference time: {ratio:.2f}")


if __name__ == "__main__":
    main()
