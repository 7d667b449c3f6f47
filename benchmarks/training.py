#!/usr/bin/env python
"""Training-step benchmark of Mask DINO against Transformers' Mask2Former (ResNet-50), interleaved in one run.

One step = forward with the loss + backward (no optimizer), in training mode, random weights, nothing downloaded:

* ours: the released R50 instance model (``build_maskdino("r50")`` of ``benchmarks/inference.py``), its loss from
  ``mask_labels`` / ``class_labels`` (denoising, matcher and PointRend points included);
* baseline: ``Mask2FormerForUniversalSegmentation`` with a ResNet-50 backbone (``build_mask2former``), its loss from
  the same ``mask_labels`` / ``class_labels``.

Both get the same batch: ``--batch-size`` random images of ``size x size`` (512: the issue's setting; 1024: the
size of the official LSJ crops) with ``--instances`` rectangular instances each. Per configuration (size, precision,
gradient checkpointing) the two models take turns, one step at a time, so that background load hits both alike;
the medians of ``--runs`` steps after ``--warmup`` steps, the peak memory of one step (CUDA: allocator peak; CPU:
process RSS high-water mark, and its increase over the level before the step; measured on the last warm-up step)
and the ratio ours / baseline are printed. Mask2Former does not support gradient checkpointing in Transformers: with ``--checkpointing on`` our
checkpointed step is compared with its plain step (marked ``*``).

For fp32, each model's step is also counted once with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
convolutions, attention; forward, loss and backward) and set against its floor: the step's FLOPs at the fp32 matmul
ceiling measured in the same run (a large ``torch.mm``, as in ``benchmarks/inference.py``). The last line says how
fast our step would have to run for the ratio to reach 1.0, as a multiple of that ceiling: where the two steps' FLOPs
differ more than their efficiencies can, the ratio is bounded by the FLOPs, not by the code.

    python benchmarks/training.py                                    # 512x512, fp32, no checkpointing
    python benchmarks/training.py --sizes 512 1024 --precisions fp32 bf16 --checkpointing off on
    python benchmarks/training.py --quick                            # 256x256, 1 run: a smoke test

On the CPU, glibc returns freed blocks over 32 MB (and the top of its heap) to the system and each step faults them
in again; prefix the command with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736`` to keep them in the
process. Both models then run faster, Mask2Former more than ours, so the ratio grows: on 3 December 2026 the fp32
row at 512 gave ours 12.87 s and Mask2Former 10.67 s (1.21) with the default allocator, 9.51 s and 6.16 s (1.54) with
the variables (Mask2Former's step: 1.5-1.8 million page faults with the default allocator, ours 0.03-0.45 million).
The ratio the issue asks for compares both under the default allocator, as a user's script runs them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import sys
from pathlib import Path

import torch

from maskdino_hf.predict import slow_bfloat16_reason

ROOT = Path(__file__).resolve().parent


def _inference_benchmark():
    """`benchmarks/inference.py` as a module: its model builders and memory meters are the ones used here."""
    spec = importlib.util.spec_from_file_location("maskdino_inference_benchmark", ROOT / "inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _inference_benchmark()


def make_batch(batch_size: int, size: int, instances: int, num_labels: int, device: torch.device, seed: int = 0):
    """Random normalised pixels and `instances` random rectangles per image (masks, labels)."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch_size, 3, size, size, generator=generator)
    mask_labels, class_labels = [], []
    for _ in range(batch_size):
        masks = torch.zeros(instances, size, size)
        for index in range(instances):
            top, left = torch.randint(0, size // 2, (2,), generator=generator).tolist()
            height, width = torch.randint(size // 16, size // 2, (2,), generator=generator).tolist()
            masks[index, top : top + height, left : left + width] = 1
        mask_labels.append(masks.to(device))
        class_labels.append(torch.randint(0, num_labels, (instances,), generator=generator).to(device))
    return pixel_values.to(device), mask_labels, class_labels


def training_step(model, pixel_values, mask_labels, class_labels, device: torch.device, bf16: bool):
    """A function running one forward with loss and backward; gradients are dropped afterwards."""

    def step():
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            loss = model(pixel_values, mask_labels=mask_labels, class_labels=class_labels).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def count_step_flops(step) -> float:
    """FLOPs of one step (forward, loss and backward) as `FlopCounterMode` counts them (oneDNN's linear included)."""
    from torch.utils.flop_counter import FlopCounterMode

    bench.register_onednn_linear_flops()
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def bench_config(args, models: dict, size: int, bf16: bool, checkpointing: bool, device: torch.device) -> dict:
    steps = {}
    for name, model in models.items():
        supported = model.supports_gradient_checkpointing
        if checkpointing and supported:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif model.is_activation_checkpointing:
            model.activation_checkpointing_disable()
        batch = make_batch(args.batch_size, size, args.instances, model.config.num_labels, device)
        steps[name] = (training_step(model, *batch, device, bf16), checkpointing and not supported)
    times = {name: [] for name in steps}
    memory = {}
    for warmup in range(max(args.warmup, 1)):
        for name, (step, _) in steps.items():
            if warmup == max(args.warmup, 1) - 1:  # the last warm-up step (or an extra one) gives the memory peak
                memory[name] = bench.peak_memory(step, device)
            else:
                step()
    for _ in range(args.runs):
        for name, (step, _) in steps.items():
            times[name].append(bench.timed(step, device))
    # Counted after the timed steps, so that the memory figures stay those of a first step.
    flops = {name: None if bf16 else count_step_flops(step) for name, (step, _) in steps.items()}
    return {
        name: {"time": statistics.median(times[name]), "memory": memory[name], "plain": plain, "flops": flops[name]}
        for name, (_, plain) in steps.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512], help="square crop sizes (1024: LSJ crops)")
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32"])
    parser.add_argument("--checkpointing", nargs="+", choices=("off", "on"), default=["off"])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--instances", type=int, default=5, help="instances per image")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-baseline", action="store_true", help="skip Mask2Former")
    parser.add_argument("--quick", action="store_true", help="256x256, 1 run, no warm-up: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.runs, args.warmup = [256], 1, 0
    for name in ("batch_size", "instances", "runs", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    bad_sizes = [size for size in args.sizes if size < 64 or size % 32]
    if bad_sizes:
        parser.error(f"--sizes must be multiples of 32 of at least 64, got {bad_sizes}")

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    ours, _ = bench.build_maskdino("r50", device)
    models = {"ours": ours.train()}
    if not args.no_baseline:
        models["mask2former"] = bench.build_mask2former(device)[0].train()

    print(f"training step (forward + loss + backward), batch {args.batch_size}, {args.instances} instances per image, "
          f"device {device}" + (f", {args.threads} threads" if device.type == "cpu" else ""))
    print(bench.load_info())
    memory_kind = "CUDA allocator peak" if device.type == "cuda" else "process RSS peak (+ increase during the step)"
    print(f"medians of {args.runs} steps after {args.warmup} warm-up steps; memory: {memory_kind}, GiB")
    header = f"{'size':>9}  {'precision':9}  {'ckpt':4}  {'ours s':>8}  {'ours GiB':>14}"
    if not args.no_baseline:
        header += f"  {'M2F s':>8}  {'M2F GiB':>14}  {'ours/M2F':>8}"
    print(header)
    floors = []
    slow_bf16 = slow_bfloat16_reason(device.type) if "bf16" in args.precisions else None
    if slow_bf16 is not None:
        print(f"bf16 skipped: {slow_bf16} (its steps would measure the fallback)")
    for size in args.sizes:
        for precision in args.precisions:
            if precision == "bf16" and slow_bf16 is not None:
                continue
            for checkpointing in args.checkpointing:
                result = bench_config(args, models, size, precision == "bf16", checkpointing == "on", device)
                if precision == "fp32":
                    floors.append((f"{size}x{size}", checkpointing, result))
                line = f"{f'{size}x{size}':>9}  {precision:9}  {checkpointing:4}"
                for name in models:
                    peak, increase = result[name]["memory"]
                    mark = "*" if result[name]["plain"] else " "
                    line += f"  {result[name]['time']:>7.2f}{mark}  {peak:>6.2f} (+{increase:5.2f})"
                if not args.no_baseline:
                    line += f"  {result['ours']['time'] / result['mask2former']['time']:>8.2f}"
                print(line, flush=True)
    if not args.no_baseline and "on" in args.checkpointing:
        print("* Mask2Former has no gradient checkpointing in Transformers: its plain step is shown")
    if floors:
        print_floors(floors, models, device)


def print_floors(floors: list[tuple[str, str, dict]], models: dict, device: torch.device) -> None:
    """Each fp32 step against its matmul floor, and the speed our step would need for a ratio of 1.0."""
    record = {}
    for _ in range(3):
        bench.matmul_ceiling(torch.float32, device, record)
    ceiling = statistics.median(record["wall"])
    print(f"\nfp32 matmul floors: step GFLOP (FlopCounterMode: matmuls, convolutions, attention; forward, loss and "
          f"backward) / fp32 matmul ceiling {ceiling:.0f} GFLOP/s (torch.mm, this run)")
    header = f"{'size':>9}  {'ckpt':4}"
    for name in models:
        label = "ours" if name == "ours" else "M2F"
        header += f"  {label + ' GFLOP':>10}  {'floor s':>7}  {'time/floor':>10}"
    if "mask2former" in models:
        header += f"  {'GFLOP ours/M2F':>14}"
    print(header)
    for size, checkpointing, result in floors:
        line = f"{size:>9}  {checkpointing:4}"
        for name in models:
            giga = result[name]["flops"] / 1e9
            floor = giga / ceiling
            line += f"  {giga:>10.1f}  {floor:>7.2f}  {result[name]['time'] / floor:>10.2f}"
        if "mask2former" in models:
            line += f"  {result['ours']['flops'] / result['mask2former']['flops']:>14.2f}"
        print(line)
    if "mask2former" in models:
        for size, checkpointing, result in floors:
            needed = result["ours"]["flops"] / 1e9 / result["mask2former"]["time"]
            print(f"ours/M2F = 1.0 at {size} (checkpointing {checkpointing}) needs our step at {needed:.0f} GFLOP/s, "
                  f"{needed / ceiling:.2f}x the fp32 matmul ceiling (Mask2Former's step runs at "
                  f"{result['mask2former']['flops'] / 1e9 / result['mask2former']['time']:.0f} GFLOP/s)")


if __name__ == "__main__":
    sys.exit(main())
