"""End-to-end inference benchmark of Mask DINO against Transformers' Mask2Former (ResNet-50) as the baseline.

Models (random weights, nothing downloaded):

* ``r50``: the released R50 instance model (hid-2048 FFN, 300 queries, mask-enhanced boxes; 4 encoder levels), built
  from its official config in ``tests/fixtures/official/manifests``.
* ``swinl``: the released Swin-L instance model (5 encoder levels, res2 included). Slow on a 2-core CPU.
* baseline: ``Mask2FormerForUniversalSegmentation`` with a ResNet-50 backbone and ``num_labels=133``, timed in the same
  run, interleaved with ours (so that background load affects both alike); the ratio ours / baseline is printed.

Per (model, batch size): median forward latency of ``--runs`` runs after ``--warmup`` runs, under
``torch.inference_mode``, in fp32 and with bf16 autocast (ours; ratio bf16 / fp32), peak memory (CUDA:
``max_memory_allocated``; CPU: the process RSS high-water mark sampled during the forward by a background thread, with
the increase over the RSS before the call), and, separately, the image processor (preprocess of uint8 images) and
``post_process_instance_segmentation``. CPU runs use ``--threads`` (default 2) threads; CUDA is used when present
(``--device``). ``--memory-check`` also measures, in a fresh process, the peak RSS of one fp32 inference of a
1333x800 image through the processor and the R50 model, then of each post-processing (target: 3 GiB).

    python benchmarks/inference.py                                  # R50, batch 1, CPU (+ CUDA when present)
    python benchmarks/inference.py --models r50 swinl --batch-sizes 1 4 --runs 5
    python benchmarks/inference.py --quick                          # small images, 2 runs: a smoke test
    python benchmarks/inference.py --memory-check                   # also the 1333x800 fp32 peak-RSS check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "tests" / "fixtures" / "official" / "manifests"
MANIFEST_FILES = {
    "r50": "maskdino_r50_50ep_300q_hid2048_3sd1_instance_maskenhanced_mask46.3ap_box51.7ap.json",
    "swinl": "maskdino_swinl_50ep_300q_hid2048_3sd1_instance_maskenhanced_mask52.3ap_box59.0ap.json",
}
GIB = 1024**3
# Post-processing measured by --memory-check (random weights keep most queries: a worst case for panoptic).
POST_PROCESSING = ("instance", "panoptic", "semantic")


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


def official_cfg(name: str) -> dict:
    return json.loads((MANIFESTS / MANIFEST_FILES[name]).read_text())["cfg"]


def build_maskdino(name: str, device: torch.device):
    from maskdino_hf import MaskDINOForUniversalSegmentation, MaskDINOImageProcessor
    from maskdino_hf.convert_maskdino_to_hf import config_from_official, processor_kwargs_from_official

    cfg = official_cfg(name)
    config = config_from_official(cfg)
    torch.manual_seed(0)
    model = MaskDINOForUniversalSegmentation(config).eval().to(device)
    processor = MaskDINOImageProcessor(**processor_kwargs_from_official(cfg, config))
    return model, processor


def build_mask2former(device: torch.device):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig

    backbone = ResNetConfig(
        depths=[3, 4, 6, 3],
        hidden_sizes=[256, 512, 1024, 2048],
        layer_type="bottleneck",
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(backbone_config=backbone, num_labels=133)
    torch.manual_seed(0)
    return Mask2FormerForUniversalSegmentation(config).eval().to(device)


# ---------------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------------


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class PeakRSS:
    """Highest RSS of this process while the block runs, sampled every `interval` s by a thread (ops release the GIL)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.before = self.peak = 0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.before = self.peak = _rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def timed(fn, device: torch.device, cpu_times: list | None = None) -> float:
    """Wall-clock seconds of fn(); the process CPU seconds (all threads) go to `cpu_times` when given."""
    _sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    if cpu_times is not None:
        cpu_times.append(time.process_time() - start_cpu)
    return time.perf_counter() - start


def peak_memory(fn, device: torch.device) -> tuple[float, float]:
    """(peak, increase over the level before the call) in GiB: CUDA allocator peak, or the process RSS on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return peak / GIB, (peak - before) / GIB
    with PeakRSS() as meter:
        fn()
    return meter.peak / GIB, (meter.peak - meter.before) / GIB


def load_info() -> str:
    try:
        one, five, _ = os.getloadavg()
        return f"load average {one:.1f} / {five:.1f} (1 / 5 min) on {os.cpu_count()} logical CPUs"
    except OSError:
        return "load average unavailable"


# ---------------------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------------------


def bench_config(args, name: str, batch_size: int, device: torch.device, baseline) -> dict:
    model, processor = build_maskdino(name, device)
    if device.type == "cuda" and args.msda_kernel:
        from maskdino_hf.ms_deform_attn import load_msda_kernel

        load_msda_kernel(model)  # falls back to the PyTorch op (with one log line) when no kernel can be loaded
    height, width = args.height, args.width
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(batch_size)]

    # Processor (uint8 HWC images -> normalised, padded batch), timed alone.
    # --quick: keep the small size (the processor would resize the shorter edge to 800).
    preprocess = lambda: processor(images, return_tensors="pt", do_resize=not args.quick)  # noqa: E731
    pre_times = [timed(preprocess, device) for _ in range(max(1, args.runs // 2))]
    inputs = preprocess()
    pixel_values = inputs["pixel_values"].to(device)
    pixel_mask = inputs["pixel_mask"].to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)

    def ours(bf16: bool):
        def run():
            with torch.inference_mode(), _autocast(device, bf16):
                return model(pixel_values, pixel_mask=pixel_mask)

        return run

    def theirs():
        with torch.inference_mode():
            return baseline(pixel_values)

    variants = {"ours_fp32": ours(False)}
    if not args.no_bf16:
        variants["ours_bf16"] = ours(True)
    if baseline is not None:
        variants["mask2former_fp32"] = theirs

    for _ in range(args.warmup):
        for fn in variants.values():
            timed(fn, device)
    times = {key: [] for key in variants}
    cpu_times = {key: [] for key in variants}
    for _ in range(args.runs):  # interleaved, so that a change of background load hits every variant alike
        for key, fn in variants.items():
            times[key].append(timed(fn, device, cpu_times[key]))
    memory = {key: peak_memory(fn, device) for key, fn in variants.items()}

    # Post-processing of the fp32 outputs, timed alone.
    with torch.inference_mode():
        outputs = model(pixel_values, pixel_mask=pixel_mask)
    sizes = [(height, width)] * batch_size  # original image size
    resized = processor.image_sizes_from_pixel_mask(inputs["pixel_mask"])
    post_times = [
        timed(lambda: processor.post_process_instance_segmentation(outputs, target_sizes=sizes, image_sizes=resized), device)
        for _ in range(max(1, args.runs // 2))
    ]
    del model, outputs
    return {
        "model": name,
        "batch": batch_size,
        "input": tuple(pixel_values.shape[-2:]),
        "times": {key: statistics.median(values) for key, values in times.items()},
        "all_times": times,
        "cpu_times": {key: statistics.median(values) for key, values in cpu_times.items()},
        "memory": memory,
        "pre": statistics.median(pre_times),
        "post": statistics.median(post_times),
    }


def print_table(results: list[dict], device: torch.device) -> None:
    where = "CUDA" if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    memory_kind = "max_memory_allocated" if device.type == "cuda" else "peak RSS (increase)"
    print(f"\n### {where}: median latency in seconds; memory in GiB, {memory_kind}")
    header = (
        f"{'model':<6} {'batch':>5} {'input':>10} | {'ours fp32':>9} {'ours bf16':>9} {'bf16/fp32':>9} | "
        f"{'M2F fp32':>9} {'ours/M2F':>8} | {'mem ours':>15} {'mem bf16':>15} {'mem M2F':>15} | {'preproc':>7} {'postproc':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in results:
        t = row["times"]
        fp32, bf16, m2f = t.get("ours_fp32"), t.get("ours_bf16"), t.get("mask2former_fp32")

        def fmt(value, spec=".2f"):
            return "-" if value is None else format(value, spec)

        def mem(key):
            if key not in row["memory"]:
                return "-"
            peak, increase = row["memory"][key]
            return f"{peak:.2f} ({increase:+.2f})"

        print(
            f"{row['model']:<6} {row['batch']:>5} {'x'.join(map(str, row['input'])):>10} | {fmt(fp32):>9} {fmt(bf16):>9} "
            f"{fmt(bf16 / fp32 if bf16 else None):>9} | {fmt(m2f):>9} {fmt(fp32 / m2f if m2f else None):>8} | "
            f"{mem('ours_fp32'):>15} {mem('ours_bf16'):>15} {mem('mask2former_fp32'):>15} | "
            f"{fmt(row['pre'], '.3f'):>7} {fmt(row['post'], '.3f'):>8}"
        )
    if device.type == "cpu":
        # Process CPU seconds (all threads): less sensitive than wall time to other processes on a shared machine
        # (with 1 thread they are the work itself; with more they include OpenMP spin-waiting).
        for row in results:
            c = row["cpu_times"]
            ratios = []
            if "mask2former_fp32" in c:
                ratios.append(f"ours/M2F {c['ours_fp32'] / c['mask2former_fp32']:.2f}")
            if "ours_bf16" in c:
                ratios.append(f"bf16/fp32 {c['ours_bf16'] / c['ours_fp32']:.2f}")
            print(
                f"CPU seconds (median) {row['model']} b{row['batch']}: "
                + ", ".join(f"{k} {v:.2f}" for k, v in c.items()) + (" -> " + ", ".join(ratios) if ratios else "")
            )
    print("(all runs, s: " + "; ".join(
        f"{row['model']} b{row['batch']} " + ", ".join(f"{k}=[{' '.join(f'{v:.2f}' for v in vs)}]" for k, vs in row["all_times"].items())
        for row in results
    ) + ")")


def memory_probe(name: str, height: int, width: int) -> None:
    """Run in a fresh process: one fp32 inference of a (height, width) image; print the peak RSS (GiB) of the process
    during the processor + forward, and during post-processing (sampled: `ru_maxrss` would count the parent's RSS,
    which a child started by fork + exec inherits as its high-water mark)."""
    torch.set_num_threads(2)
    model, processor = build_maskdino(name, torch.device("cpu"))
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    loaded = _rss() / GIB
    with torch.inference_mode():
        with PeakRSS() as forward:
            inputs = processor([image], return_tensors="pt")
            outputs = model(inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
        post = {}
        for task in POST_PROCESSING:
            with PeakRSS() as peak:
                getattr(processor, f"post_process_{task}_segmentation")(outputs, target_sizes=[(height, width)])
            post[task] = peak.peak / GIB
    print(json.dumps({
        "input": list(inputs["pixel_values"].shape), "after_load_gib": loaded, "forward_peak_gib": forward.peak / GIB,
        **{f"{task}_peak_gib": value for task, value in post.items()},
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["r50"], choices=sorted(MANIFEST_FILES))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1088)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CPU, then CUDA if present")
    parser.add_argument("--quick", action="store_true", help="320x448 images, 2 runs, no warm-up: a smoke test")
    parser.add_argument("--no-baseline", action="store_true", help="skip Mask2Former")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast timing")
    parser.add_argument("--channels-last", action="store_true", help="run our model in channels-last memory format")
    parser.add_argument("--msda-kernel", action="store_true", help="CUDA: load the compiled MSDA kernel (load_msda_kernel)")
    parser.add_argument("--memory-check", action="store_true", help="peak RSS of a 1333x800 fp32 inference (fresh process)")
    parser.add_argument("--_memory-probe", dest="memory_probe", nargs=3, metavar=("MODEL", "H", "W"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        memory_probe(args.memory_probe[0], int(args.memory_probe[1]), int(args.memory_probe[2]))
        return
    if args.quick:
        args.height, args.width, args.runs, args.warmup = 320, 448, 2, 0

    torch.set_num_threads(args.threads)
    devices = []
    if args.device in ("auto", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        devices.append(torch.device("cuda"))
    print(
        f"torch {torch.__version__}, {args.height}x{args.width} uint8 images, runs={args.runs}, warmup={args.warmup}, "
        f"cuda={'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}; {load_info()}"
    )
    for device in devices:
        baseline = None if args.no_baseline else build_mask2former(device)
        results = []
        for name in args.models:
            for batch_size in args.batch_sizes:
                print(f"[{device.type}] {name} batch {batch_size} ...", flush=True)
                row = bench_config(args, name, batch_size, device, baseline)
                results.append(row)
                print(f"   done: {json.dumps({k: round(v, 3) for k, v in row['times'].items()})}", flush=True)
        print_table(results, device)
        print(load_info())
        del baseline
    if args.memory_check:
        command = [sys.executable, __file__, "--_memory-probe", "r50", "800", "1333"]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        probe = json.loads(result.stdout.strip().splitlines()[-1])
        steps = [("forward_peak_gib", "processor + forward")]
        steps += [(f"{task}_peak_gib", f"{task} post-processing") for task in POST_PROCESSING]
        for key, what in steps:
            verdict = "meets" if probe[key] <= 3.0 else "exceeds"
            print(
                f"memory check (fresh process, CPU fp32, r50, 1333x800 image -> input {probe['input']}, model loaded: "
                f"{probe['after_load_gib']:.2f} GiB): peak RSS during {what} {probe[key]:.2f} GiB: {verdict} 3 GiB"
            )

if __name__ == "__main__":
    main()
