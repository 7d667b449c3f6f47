"""Benchmark of the multi-scale deformable attention op alone, at the shapes of Mask DINO R50 at 800x1088.

Encoder (pixel decoder, 6 layers): queries = all tokens of the 4 levels at strides 8, 16, 32, 64
(100x136, 50x68, 25x34, 13x17 = 18071 tokens); decoder (9 layers): 300 queries. 8 heads, head_dim 32, 4 levels,
4 points.

CPU (always): the straightforward implementation (one grid_sample per level, the reference) vs. the PyTorch fast
path used by the model, forward (inference, no grad) and forward + backward (the fast path's written-out backward vs.
grid_sample's autograd), with the speed-up ratio. `--before SRC` adds the fast path of another checkout (its
`maskdino_hf/ms_deform_attn.py` under SRC, e.g. `/path/to/old/src`) timed in the same run.
GPU (when CUDA is available): the compiled kernel (if it can be loaded: --kernel-path for a local kernel-builder build
directory, else --repo-id from the Hub) vs. the fallback, forward and forward + backward, with the bytes-moved floor
(minimum bytes each pass must read + write, divided by the measured device-to-device copy bandwidth) beside it.

    python benchmarks/msda.py                # full shapes, CPU with 2 threads (+ GPU if present)
    python benchmarks/msda.py --quick        # small shapes
    python benchmarks/msda.py --before ../main/src   # also an earlier revision of the fast path
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

from maskdino_hf.ms_deform_attn import (
    DEFAULT_MSDA_REPO_ID,
    multi_scale_deformable_attention_pytorch,
    multi_scale_deformable_attention_reference,
)

FULL_LEVELS = [(100, 136), (50, 68), (25, 34), (13, 17)]
QUICK_LEVELS = [(20, 28), (10, 14), (5, 7), (3, 4)]
ENCODER_LAYERS, DECODER_LAYERS = 6, 9


def make_inputs(batch, levels, queries, heads, head_dim, points, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(h * w for h, w in levels)
    value = torch.randn(batch, tokens, heads, head_dim, generator=generator)
    # Reference points in the map plus offsets that leave it sometimes, as in the model.
    locations = torch.rand(batch, queries, heads, len(levels), points, 2, generator=generator) * 1.1 - 0.05
    weights = torch.rand(batch, queries, heads, len(levels) * points, generator=generator).softmax(-1)
    weights = weights.view(batch, queries, heads, len(levels), points)
    shapes = torch.tensor(levels, dtype=torch.int64)
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    cast = lambda t: t.to(device=device, dtype=dtype)
    return cast(value), shapes.to(device), starts.to(device), cast(locations), cast(weights)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device, repeats, warmup=1):
    """(best wall-clock seconds, best process CPU seconds) over `repeats` runs.

    The CPU time (all threads of this process) is printed too because on a shared machine the wall clock also
    measures the other processes."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    walls, cpus = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - start_cpu)
    return min(walls), min(cpus)


def forward_fn(impl, inputs, levels):
    value, shapes, starts, locations, weights = inputs

    def run():
        with torch.no_grad():
            return impl(value, shapes, levels, starts, locations, weights)

    return run


def backward_fn(impl, inputs, levels):
    value, shapes, starts, locations, weights = inputs
    leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
    grad = None

    def run():
        nonlocal grad
        for leaf in leaves:
            leaf.grad = None
        output = impl(leaves[0], shapes, levels, starts, leaves[1], leaves[2])
        if grad is None:
            grad = torch.randn_like(output)
        output.backward(grad)

    return run


def reference_impl(value, shapes, levels, starts, locations, weights):
    return multi_scale_deformable_attention_reference(value, levels, locations, weights)


def fallback_impl(value, shapes, levels, starts, locations, weights):
    return multi_scale_deformable_attention_pytorch(value, shapes, starts, locations, weights)


def load_before(src: str):
    """The fast path of the `ms_deform_attn.py` under `src`, loaded under another module name."""
    path = Path(src) / "maskdino_hf" / "ms_deform_attn.py"
    if not path.is_file():
        raise FileNotFoundError(f"--before {src}: no maskdino_hf/ms_deform_attn.py there ({path})")
    spec = importlib.util.spec_from_file_location("msda_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["msda_before"] = module
    spec.loader.exec_module(module)

    def before_impl(value, shapes, levels, starts, locations, weights):
        return module.multi_scale_deformable_attention_pytorch(value, shapes, starts, locations, weights)

    return before_impl


def ms(seconds):
    return f"{seconds * 1e3:9.2f} ms"


def run_cpu(args, levels, regimes):
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    print(
        f"\n== CPU ({torch.get_num_threads()} threads, {args.dtype}) : straightforward (grid_sample per level) vs fallback =="
    )
    dtype = getattr(torch, args.dtype)
    print("(wall clock, best of --repeats; [process CPU time of all threads] in brackets)")
    before = load_before(args.before) if args.before else None
    totals = {"forward": [0.0, 0.0, 0.0, 0.0], "forward+backward": [0.0, 0.0, 0.0, 0.0]}
    for name, queries, layers in regimes:
        inputs = make_inputs(args.batch, levels, queries, 8, 32, 4, dtype, device)
        for kind, make in (("forward", forward_fn), ("forward+backward", backward_fn)):
            if kind == "forward+backward" and not args.backward:
                continue
            ref_wall, ref_cpu = timeit(make(reference_impl, inputs, levels), device, args.repeats)
            new_wall, new_cpu = timeit(make(fallback_impl, inputs, levels), device, args.repeats)
            for index, seconds in enumerate((ref_wall, new_wall, ref_cpu, new_cpu)):
                totals[kind][index] += layers * seconds
            line = (
                f"{name:8s} {kind:17s} straightforward {ms(ref_wall)} [{ms(ref_cpu)}]  fallback {ms(new_wall)} "
                f"[{ms(new_cpu)}]  speed-up x{ref_wall / new_wall:5.2f} [x{ref_cpu / new_cpu:5.2f}]"
            )
            if before is not None:
                old_wall, old_cpu = timeit(make(before, inputs, levels), device, args.repeats)
                line += (
                    f"  before {ms(old_wall)} [{ms(old_cpu)}]  fallback vs before x{old_wall / new_wall:5.2f} "
                    f"[x{old_cpu / new_cpu:5.2f}]"
                )
            print(line)
    for kind, (ref_wall, new_wall, ref_cpu, new_cpu) in totals.items():
        if ref_wall > 0:
            print(
                f"model ({ENCODER_LAYERS} enc + {DECODER_LAYERS} dec layers) {kind:17s} straightforward "
                f"{ms(ref_wall)} [{ms(ref_cpu)}]  fallback {ms(new_wall)} [{ms(new_cpu)}]  "
                f"speed-up x{ref_wall / new_wall:5.2f} [x{ref_cpu / new_cpu:5.2f}]"
            )


def load_kernel_layer(args):
    """The `MultiScaleDeformableAttention` layer class of a kernel package, or None with a reason."""
    try:
        from pathlib import Path

        from kernels import get_kernel, get_local_kernel

        if args.kernel_path:
            kernel = get_local_kernel(Path(args.kernel_path))
        else:
            kernel = get_kernel(args.repo_id, version=1)
        return kernel.layers.MultiScaleDeformableAttention, None
    except Exception as error:  # noqa: BLE001
        return None, f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"


def copy_bandwidth(device):
    data = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=device)
    out = torch.empty_like(data)
    best, _ = timeit(lambda: out.copy_(data), device, 10, warmup=3)
    return 2 * data.numel() / best


def run_gpu(args, levels, regimes, device=None):
    device = device or torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    bandwidth = copy_bandwidth(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"\n== GPU {device_name} ({args.dtype}); copy bandwidth {bandwidth / 1e9:.0f} GB/s ==")
    layer, reason = load_kernel_layer(args)
    if layer is None:
        print(f"compiled kernel not available ({reason}); timing the fallback only")
    kernel_op = layer() if layer is not None else None
    element = torch.tensor([], dtype=dtype).element_size()

    def kernel_impl(value, shapes, lv, starts, locations, weights):
        return kernel_op(value, shapes, lv, starts, locations, weights, 64)

    for name, queries, _ in regimes:
        inputs = make_inputs(args.batch, levels, queries, 8, 32, 4, dtype, device)
        value, _, _, locations, weights = inputs
        output_elements = args.batch * queries * 8 * 32
        base = (value.numel() + locations.numel() + weights.numel()) * element
        forward_bytes = base + output_elements * element  # read value, locations, weights; write the output
        # backward: read value, locations, weights, grad_output; write grad_value (float accumulator), grad_loc, grad_attn
        backward_bytes = base + output_elements * element + value.numel() * 4
        backward_bytes += (locations.numel() + weights.numel()) * element
        floors = {
            "forward": forward_bytes / bandwidth,
            "forward+backward": (forward_bytes + backward_bytes) / bandwidth,
        }
        for kind, make in (("forward", forward_fn), ("forward+backward", backward_fn)):
            line = f"{name:8s} {kind:17s} bytes-moved floor {ms(floors[kind])}"
            fallback_best, _ = timeit(make(fallback_impl, inputs, levels), device, args.repeats, warmup=2)
            line += f"  fallback {ms(fallback_best)}"
            if kernel_op is not None:
                kernel_best, _ = timeit(make(kernel_impl, inputs, levels), device, args.repeats, warmup=2)
                line += f"  kernel {ms(kernel_best)}  kernel speed-up x{fallback_best / kernel_best:6.2f}"
                line += f"  kernel / floor x{kernel_best / floors[kind]:6.1f}"
            print(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (a 160x224 image)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-backward", dest="backward", action="store_false", help="CPU: forward only")
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--before", default=None, help="src directory of another checkout: its fast path is timed too")
    parser.add_argument("--kernel-path", default=None, help="local kernel-builder build directory for the GPU run")
    parser.add_argument("--repo-id", default=DEFAULT_MSDA_REPO_ID, help="Hub kernel repository for the GPU run")
    args = parser.parse_args()

    levels = QUICK_LEVELS if args.quick else FULL_LEVELS
    encoder_queries = sum(h * w for h, w in levels)
    regimes = [("encoder", encoder_queries, ENCODER_LAYERS), ("decoder", 300, DECODER_LAYERS)]
    print(
        f"levels {levels}, encoder queries {encoder_queries}, decoder queries 300, batch {args.batch}, "
        "heads 8, head_dim 32, 4 points"
    )
    if not args.skip_cpu:
        run_cpu(args, levels, regimes)
    if torch.cuda.is_available():
        run_gpu(args, levels, regimes)
    else:
        print("\n(no CUDA device: GPU kernel benchmark skipped)")


if __name__ == "__main__":
    main()
