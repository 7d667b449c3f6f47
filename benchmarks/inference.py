"""End-to-end inference benchmark of Mask DINO against Transformers' Mask2Former (ResNet-50), and issue 17's
definition-of-done figures.

Models (random weights, nothing downloaded):

* ``r50``: the released R50 instance model (hid-2048 FFN, 300 queries, mask-enhanced boxes; 4 encoder levels), built
  from its official config in ``tests/fixtures/official/manifests``.
* ``swinl``: the released Swin-L instance model (5 encoder levels, res2 included). Slow on a 2-core CPU.
* baseline: ``Mask2FormerForUniversalSegmentation`` with a ResNet-50 backbone and ``num_labels=133``, with
  Transformers' (PIL) ``Mask2FormerImageProcessor`` and its ``post_process_instance_segmentation``.

Per (model, batch size), ``--runs`` interleaved runs (after ``--warmup`` runs; medians reported) of: our end to end
(processor on uint8 images + fp32 forward + ``post_process_instance_segmentation``, each stage timed, the forward also
per part: backbone / pixel decoder / decoder + heads), our forward under bf16 autocast, Mask2Former's end to end
(same three stages), and the fp32 and bf16 matmul ceilings (GFLOP/s of a 2048^3 ``torch.mm`` at the same thread
count). Then: peak memory of each forward (CUDA: ``max_memory_allocated``; CPU: the process RSS high-water mark sampled
during the forward by a background thread, with the increase over the RSS before the call), the FLOPs of our fp32
forward (``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions, attention; matmul floor = FLOPs /
ceiling), and panoptic post-processing of the fp32 outputs (random weights keep most queries: its worst case).
Forwards run under ``torch.inference_mode``. CPU runs use ``--threads`` (default 2) threads; CUDA is used when present
(``--device``). Printed: the latency / memory table, the per-part breakdown against each part's floor, and the
definition-of-done table (figure, measured, target, verdict; the same ratio from process CPU seconds beside it, which
is steadier on a loaded machine). ``--memory-check`` also measures, in a fresh process, the peak RSS of one fp32
inference of a 1333x800 image through the processor and the R50 model, then of each post-processing (target: 3 GiB).

    python benchmarks/inference.py                                  # R50, batch 1, 800x1088, CPU (+ CUDA when present)
    python benchmarks/inference.py --runs 2                         # the same, faster (noisier)
    python benchmarks/inference.py --models r50 swinl --batch-sizes 1 4 --runs 5
    python benchmarks/inference.py --quick                          # small images, 1 run, no memory: a smoke test
    python benchmarks/inference.py --memory-check                   # also the 1333x800 fp32 peak-RSS check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from maskdino_hf.predict import slow_bfloat16_reason

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
    from transformers import (
        Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessorPil, ResNetConfig,
    )

    backbone = ResNetConfig(
        depths=[3, 4, 6, 3],
        hidden_sizes=[256, 512, 1024, 2048],
        layer_type="bottleneck",
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(backbone_config=backbone, num_labels=133)
    torch.manual_seed(0)
    # The PIL image processor: Transformers' default one needs torchvision, which does not install beside CPU torch.
    return Mask2FormerForUniversalSegmentation(config).eval().to(device), Mask2FormerImageProcessorPil()


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

PARTS = {"backbone": "backbone", "pixel_decoder": "pixel decoder", "decoder": "decoder + heads"}  # timed submodules


def matmul_ceiling(dtype: torch.dtype, device: torch.device, record: dict, size: int = 2048, repeats: int = 3) -> None:
    """GFLOP/s of a large `torch.mm` in `dtype` at the current thread count, appended to `record`: "wall" (wall clock)
    and "cpu" (per CPU-second x threads: what the CPU delivers while this process is not waiting for a core)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device, dtype)
    b = torch.randn(size, size, generator=generator).to(device, dtype)
    torch.mm(a, b)
    cpu = []
    wall = timed(lambda: [torch.mm(a, b) for _ in range(repeats)], device, cpu)
    giga = 2 * size**3 * repeats / 1e9
    record.setdefault("wall", []).append(giga / wall)
    record.setdefault("cpu", []).append(giga / cpu[0] * torch.get_num_threads())


def register_onednn_linear_flops() -> None:
    """Teach `FlopCounterMode` the FLOPs of `mkldnn._linear_pointwise`, oneDNN's linear, which the model's float32 CPU
    feed-forward blocks call at inference (`maskdino_hf.modeling_maskdino.inference_linear`): 2 x rows x in x out,
    as for `addmm`. Without it their matmuls would drop out of the count, and the floor with them."""
    from torch.utils import flop_counter

    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or op in flop_counter.flop_registry or op.default in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def linear_pointwise_flops(input_shape, weight_shape, *args, **kwargs) -> int:
        rows = 1
        for size in input_shape[:-1]:
            rows *= size
        return 2 * rows * input_shape[-1] * weight_shape[0]


def count_flops(model, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[dict[str, float], object]:
    """FLOPs of one fp32 forward as `FlopCounterMode` counts them (matmuls, convolutions, attention), in total
    ("total") and per part of `PARTS`; and that forward's outputs."""
    from torch.utils.flop_counter import FlopCounterMode

    register_onednn_linear_flops()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        outputs = model(pixel_values, pixel_mask=pixel_mask)
    counts = counter.get_flop_counts()
    flops = {"total": float(sum(counts["Global"].values()))}
    for part in PARTS:
        flops[part] = float(sum(sum(ops.values()) for name, ops in counts.items() if name.endswith(f".model.{part}")))
    return flops, outputs


class PartTimer:
    """Wall-clock and process CPU seconds of each of `PARTS` (forward hooks on `model.model`), for the forwards run
    while `active`."""

    def __init__(self, model, device: torch.device):
        self.device, self.active = device, False
        self.times: dict[str, list[float]] = {part: [] for part in PARTS}
        self.cpu_times: dict[str, list[float]] = {part: [] for part in PARTS}
        self._start: dict[str, tuple[float, float]] = {}
        for part in PARTS:
            module = getattr(model.model, part)
            module.register_forward_pre_hook(lambda *_, part=part: self._enter(part))
            module.register_forward_hook(lambda *_, part=part: self._exit(part))

    def _enter(self, part: str) -> None:
        if self.active:
            _sync(self.device)
            self._start[part] = (time.perf_counter(), time.process_time())

    def _exit(self, part: str) -> None:
        if self.active:
            _sync(self.device)
            start, start_cpu = self._start[part]
            self.times[part].append(time.perf_counter() - start)
            self.cpu_times[part].append(time.process_time() - start_cpu)


def bf16_skipped(args, device: torch.device) -> str | None:
    """Why the bf16 timings are skipped (`--no-bf16`, or a CPU that only emulates bfloat16), or `None`."""
    if args.no_bf16:
        return "--no-bf16"
    reason = slow_bfloat16_reason(device.type)
    return None if reason is None else f"{reason} (its bf16 timings would measure the fallback)"


def end_to_end(preprocess, forward, postprocess, device: torch.device, record: dict) -> None:
    """Processor -> forward -> post-processing (of the batch and the outputs), as a user runs them. Appends to `record`
    the wall seconds of each stage ("pre", "forward", "post") and of the whole ("total"), and the process CPU seconds
    of the forward and of the whole."""
    start, start_cpu = time.perf_counter(), time.process_time()
    batch = preprocess()
    _sync(device)
    middle, middle_cpu = time.perf_counter(), time.process_time()
    outputs = forward(batch)
    _sync(device)
    end, end_cpu = time.perf_counter(), time.process_time()
    postprocess(batch, outputs)
    _sync(device)
    finish, finish_cpu = time.perf_counter(), time.process_time()
    for key, value in (
        ("pre", middle - start), ("forward", end - middle), ("post", finish - end), ("total", finish - start),
        ("forward_cpu", end_cpu - middle_cpu), ("total_cpu", finish_cpu - start_cpu),
    ):
        record.setdefault(key, []).append(value)


def bench_config(args, name: str, batch_size: int, device: torch.device, baseline) -> dict:
    """Interleaved runs of: our end to end (fp32, with its stages and parts), our bf16 forward, Mask2Former's end to
    end, and the fp32 / bf16 matmul ceilings; then peak memory, the FLOP count and panoptic post-processing."""
    model, processor = build_maskdino(name, device)
    if device.type == "cuda" and args.msda_kernel:
        from maskdino_hf.ms_deform_attn import load_msda_kernel

        load_msda_kernel(model)  # falls back to the PyTorch op (with one log line) when no kernel can be loaded
    height, width = args.height, args.width
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(batch_size)]
    sizes = [(height, width)] * batch_size  # original image size
    # --quick: keep the small size (the processors would resize the shorter edge to 800).
    resize = {"do_resize": False} if args.quick else {}

    def post_sizes(batch) -> dict:
        """Our post-processing's size arguments: the original sizes; unresized (--quick) images also need the resized
        size, which the processor otherwise derives from the original size with its resize rule."""
        if not args.quick:
            return {"target_sizes": sizes}
        return {"target_sizes": sizes, "image_sizes": processor.image_sizes_from_pixel_mask(batch["pixel_mask"])}

    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    parts = PartTimer(model, device)

    def our_forward(batch, bf16: bool = False):
        pixel_values = batch["pixel_values"].to(device)
        if args.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), _autocast(device, bf16):
            return model(pixel_values, pixel_mask=batch["pixel_mask"].to(device))

    def ours(record: dict) -> None:
        end_to_end(
            lambda: processor(images, return_tensors="pt", **resize),
            our_forward,
            lambda batch, outputs: processor.post_process_instance_segmentation(outputs, **post_sizes(batch)),
            device,
            record,
        )

    inputs = processor(images, return_tensors="pt", **resize)

    def ours_bf16(record: dict) -> None:
        seconds = timed(lambda: our_forward(inputs, bf16=True), device, record.setdefault("forward_cpu", []))
        record.setdefault("forward", []).append(seconds)

    variants = {"ours": ours}
    skipped = bf16_skipped(args, device)
    if skipped is None:
        variants["ours_bf16"] = ours_bf16
    if baseline is not None:
        baseline_model, baseline_processor = baseline

        def mask2former_forward(batch):
            with torch.inference_mode():
                return baseline_model(
                    pixel_values=batch["pixel_values"].to(device), pixel_mask=batch["pixel_mask"].to(device)
                )

        variants["mask2former"] = lambda record: end_to_end(
            lambda: baseline_processor(images, return_tensors="pt", **resize),
            mask2former_forward,
            lambda batch, outputs: baseline_processor.post_process_instance_segmentation(outputs, target_sizes=sizes),
            device,
            record,
        )
    variants["matmul_fp32"] = lambda record: matmul_ceiling(torch.float32, device, record)
    if "ours_bf16" in variants:
        variants["matmul_bf16"] = lambda record: matmul_ceiling(torch.bfloat16, device, record)

    for _ in range(args.warmup):
        for fn in variants.values():
            fn({})
    records = {key: {} for key in variants}
    for _ in range(args.runs):  # interleaved, so that a change of background load hits every variant alike
        for key, fn in variants.items():
            parts.active = key == "ours"  # the parts of our fp32 forward only
            fn(records[key])
        parts.active = False
    forwards = {"ours_fp32": lambda: our_forward(inputs)}
    if "ours_bf16" in variants:
        forwards["ours_bf16"] = lambda: our_forward(inputs, bf16=True)
    if baseline is not None:
        m2f_inputs = baseline_processor(images, return_tensors="pt", **resize)
        forwards["mask2former_fp32"] = lambda: mask2former_forward(m2f_inputs)
    memory = {} if args.quick else {key: peak_memory(fn, device) for key, fn in forwards.items()}
    flops, outputs = count_flops(model, inputs["pixel_values"].to(device), inputs["pixel_mask"].to(device))

    # Panoptic post-processing of the fp32 outputs: random weights keep most queries, its worst case.
    panoptic_cpu = []
    panoptic = [
        timed(lambda: processor.post_process_panoptic_segmentation(outputs, **post_sizes(inputs)), device, panoptic_cpu)
        for _ in range(1 if args.quick else max(2, args.runs))
    ]
    median = statistics.median
    forward_records = {"ours_fp32": records["ours"], "ours_bf16": records.get("ours_bf16"),
                       "mask2former_fp32": records.get("mask2former")}
    forward_records = {key: value for key, value in forward_records.items() if value is not None}
    return {
        "model": name,
        "batch": batch_size,
        "input": tuple(inputs["pixel_values"].shape[-2:]),
        "times": {key: median(value["forward"]) for key, value in forward_records.items()},
        "all_times": {key: value["forward"] for key, value in forward_records.items()},
        "cpu_times": {key: median(value["forward_cpu"]) for key, value in forward_records.items()},
        "memory": memory,
        "pre": median(records["ours"]["pre"]),
        "post": median(records["ours"]["post"]),
        "end_to_end": {key: {stage: median(values) for stage, values in records[key].items()}
                       for key in ("ours", "mask2former") if key in records},
        "ceiling": {dtype: {kind: median(values) for kind, values in records[f"matmul_{dtype}"].items()}
                    for dtype in ("fp32", "bf16") if f"matmul_{dtype}" in records},
        "bf16_skipped": skipped,
        "flops": flops,
        "parts": {part: median(values) for part, values in parts.times.items()},
        "parts_cpu": {part: median(values) for part, values in parts.cpu_times.items()},
        "panoptic": median(panoptic),
        "panoptic_cpu": median(panoptic_cpu),
    }


def print_table(results: list[dict], device: torch.device) -> None:
    where = "CUDA" if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    memory_kind = "max_memory_allocated" if device.type == "cuda" else "peak RSS (increase)"
    print(f"\n### {where}: median forward latency in seconds; memory in GiB, {memory_kind}")
    header = (
        f"{'model':<6} {'batch':>5} {'input':>10} | {'ours fp32':>9} {'ours bf16':>9} {'bf16/fp32':>9} | "
        f"{'M2F fp32':>9} {'ours/M2F':>8} | {'mem ours':>15} {'mem bf16':>15} {'mem M2F':>15} | {'preproc':>7} {'postproc':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in results:
        t = row["times"]
        fp32, bf16, m2f = t.get("ours_fp32"), t.get("ours_bf16"), t.get("mask2former_fp32")

        def mem(key):
            if key not in row["memory"]:
                return "-"
            peak, increase = row["memory"][key]
            return f"{peak:.2f} ({increase:+.2f})"

        print(
            f"{row['model']:<6} {row['batch']:>5} {'x'.join(map(str, row['input'])):>10} | {_fmt(fp32):>9} {_fmt(bf16):>9} "
            f"{_fmt(bf16 / fp32 if bf16 else None):>9} | {_fmt(m2f):>9} {_fmt(fp32 / m2f if m2f else None):>8} | "
            f"{mem('ours_fp32'):>15} {mem('ours_bf16'):>15} {mem('mask2former_fp32'):>15} | "
            f"{_fmt(row['pre'], '.3f'):>7} {_fmt(row['post'], '.3f'):>8}"
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
    for row in results:
        print_breakdown(row, device)
        print_definition_of_done(row, device)


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_breakdown(row: dict, device: torch.device) -> None:
    """Where the fp32 forward goes: each part's median time, FLOPs and time over its own matmul floor (on CPU also
    from process CPU seconds: CPU-s / threads over FLOPs / the ceiling per CPU-second x threads)."""
    ceiling, threads = row["ceiling"]["fp32"], torch.get_num_threads()
    forward, forward_cpu = row["times"]["ours_fp32"], row["cpu_times"]["ours_fp32"]
    on_cpu = device.type == "cpu"
    print(f"\nfp32 forward by part, {row['model']} batch {row['batch']} "
          f"(floor = part's GFLOP / fp32 matmul ceiling {ceiling['wall']:.0f} GFLOP/s):")
    print(f"  {'part':<16} {'time s':>7} {'share':>6} {'GFLOP':>7} {'floor s':>8} {'time/floor':>10} {'CPU-s/floor':>11}")
    rows = [(label, row["parts"][part], row["parts_cpu"][part], row["flops"][part]) for part, label in PARTS.items()]
    rows.append(("other", forward - sum(r[1] for r in rows), forward_cpu - sum(r[2] for r in rows),
                 row["flops"]["total"] - sum(r[3] for r in rows)))
    rows.append(("forward", forward, forward_cpu, row["flops"]["total"]))
    for label, seconds, cpu_seconds, flops in rows:
        floor = flops / 1e9 / ceiling["wall"]
        ratio = seconds / floor if floor > 0 else None
        cpu_ratio = (cpu_seconds / threads) / (flops / 1e9 / ceiling["cpu"]) if floor > 0 and on_cpu else None
        print(f"  {label:<16} {seconds:>7.3f} {100 * seconds / forward:>5.0f}% {flops / 1e9:>7.1f} {floor:>8.3f} "
              f"{_fmt(ratio):>10} {_fmt(cpu_ratio):>11}")


def print_definition_of_done(row: dict, device: torch.device) -> None:
    """Issue 17's definition-of-done figures, with their targets and verdicts. Wall-clock medians decide; beside them
    the same figure from process CPU seconds (a time: CPU seconds / threads), steadier when other processes load the
    machine."""
    threads = torch.get_num_threads()
    times, cpu, flops = row["times"], row["cpu_times"], row["flops"]["total"] / 1e9
    ceiling = row["ceiling"]
    ours, theirs = row["end_to_end"].get("ours"), row["end_to_end"].get("mask2former")
    on_cpu = device.type == "cpu"
    figures = []

    def stages(record):
        return f"{record['total']:.2f} s (pre {record['pre']:.2f} + forward {record['forward']:.2f} + post {record['post']:.2f})"

    if theirs is not None:
        figures.append(("our fp32 end-to-end / Mask2Former's", ours["total"] / theirs["total"], 0.5, "",
                        ours["total_cpu"] / theirs["total_cpu"] if on_cpu else None,
                        f"ours {stages(ours)}; Mask2Former {stages(theirs)}"))
    else:
        figures.append(("our fp32 end-to-end / Mask2Former's", None, 0.5, "", None, "not measured (--no-baseline)"))
    floor = flops / ceiling["fp32"]["wall"]
    figures.append(("our fp32 forward / fp32 matmul floor", times["ours_fp32"] / floor, 1.4, "",
                    (cpu["ours_fp32"] / threads) / (flops / ceiling["fp32"]["cpu"]) if on_cpu else None,
                    f"forward {times['ours_fp32']:.2f} s; floor {floor:.2f} s = {flops:.0f} GFLOP / "
                    f"{ceiling['fp32']['wall']:.0f} GFLOP/s (fp32 torch.mm 2048^3, {threads} threads"
                    + (f"; {ceiling['fp32']['cpu']:.0f} per CPU-second x threads)" if on_cpu else ")")))
    if "ours_bf16" in times:
        bf16_floor = flops / ceiling["bf16"]["wall"]
        figures.append(("our bf16 forward / fp32 forward", times["ours_bf16"] / times["ours_fp32"], 0.4, "",
                        cpu["ours_bf16"] / cpu["ours_fp32"] if on_cpu else None,
                        f"bf16 {times['ours_bf16']:.2f} s; bf16 floor {bf16_floor:.2f} s at {ceiling['bf16']['wall']:.0f} "
                        f"GFLOP/s, bf16 forward / bf16 floor {times['ours_bf16'] / bf16_floor:.2f}"))
    else:
        figures.append(("our bf16 forward / fp32 forward", None, 0.4, "", None, f"not measured: {row['bf16_skipped']}"))
    input_size = "x".join(map(str, row["input"]))
    figures.append(("worst-case panoptic post-processing", row["panoptic"], 0.4, " s",
                    row["panoptic_cpu"] / threads if on_cpu else None,
                    f"random weights (most queries kept), {input_size} input, target size = image size"))

    print(f"\n### Definition of done (issue 17): {row['model']}, batch {row['batch']}, {input_size} input, "
          f"{'CUDA' if not on_cpu else f'CPU {threads} threads'}; medians of interleaved runs")
    print(f"  {'figure':<38} {'measured':>9} {'target':>9} {'verdict':>9} {'CPU-s':>6}  details")
    for label, value, target, unit, from_cpu, details in figures:
        verdict = "-" if value is None else ("met" if value <= target else "NOT MET")
        print(f"  {label:<38} {_fmt(value) + unit:>9} {'<= ' + format(target, 'g') + unit:>9} {verdict:>9} "
              f"{_fmt(from_cpu):>6}  {details}")
    print("  CPU-s: the same figure from process CPU seconds (a time as CPU seconds / threads; a ceiling as GFLOP per "
          "CPU-second x threads): steadier than wall clock when other processes load the machine.")


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
    parser.add_argument("--quick", action="store_true", help="320x448 images, 1 run, no warm-up, no memory: a smoke test")
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
        args.height, args.width, args.runs, args.warmup = 320, 448, 1, 0

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
