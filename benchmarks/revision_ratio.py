#!/usr/bin/env python
"""Speed of this checkout against an earlier revision, measured in the same run: the "ratio to before" of a change.

    python benchmarks/revision_ratio.py --before 0926804            # R50 release config, 800x1088, batch 1
    python benchmarks/revision_ratio.py --before HEAD~3 --runs 7 --model swinl

Each side runs in its own worker process holding its own model (the released configuration, random weights, the
same seed; built by that side's own `benchmarks/inference.py`). The workers take turns, one end-to-end inference at a
time (processor + forward + instance post-processing, fp32, `torch.inference_mode`), so that a change of background
load hits both alike. The medians and the ratio after / before are printed. `--before` is checked out with
`git worktree` into a temporary folder (removed at the end); `--before-src` takes an existing checkout instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import importlib.util, json, sys, time
import numpy as np, torch
torch.set_num_threads(int(sys.argv[3]))
spec = importlib.util.spec_from_file_location("bench_inference", sys.argv[1] + "/benchmarks/inference.py")
bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
model, processor = bench.build_maskdino(sys.argv[2], torch.device("cpu"))
height, width = int(sys.argv[4]), int(sys.argv[5])
image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)

def once():
    start = time.perf_counter()
    with torch.inference_mode():
        inputs = processor([image], return_tensors="pt")
        outputs = model(inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
        result = processor.post_process_instance_segmentation(outputs, target_sizes=[(height, width)])
    assert len(result[0]["scores"]) > 0
    return time.perf_counter() - start

once()
print("ready", flush=True)
for line in sys.stdin:
    print(json.dumps(once()), flush=True)
"""


def start_worker(source: Path, args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(source / "src"))
    command = [sys.executable, "-c", WORKER, str(source), args.model, str(args.threads), str(args.height),
               str(args.width)]
    worker = subprocess.Popen(command, cwd=source, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if worker.stdout.readline().strip() != "ready":
        raise SystemExit(f"the worker for {source} did not start (exit status {worker.wait()})")
    return worker


def time_once(worker: subprocess.Popen) -> float:
    worker.stdin.write("run\n")
    worker.stdin.flush()
    return float(json.loads(worker.stdout.readline()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--before", help="git revision to compare against")
    where.add_argument("--before-src", type=Path, help="a checkout of the earlier revision")
    parser.add_argument("--model", choices=("r50", "swinl"), default="r50")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1088)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        before = args.before_src
        if before is None:
            before = Path(scratch) / "before"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before],
                           check=True, capture_output=True)
        try:
            workers = {"before": start_worker(before, args), "after": start_worker(ROOT, args)}
            times = {name: [] for name in workers}
            for _ in range(args.runs):
                for name, worker in workers.items():
                    times[name].append(time_once(worker))
            for worker in workers.values():
                worker.stdin.close()
                worker.wait()
        finally:
            if args.before_src is None:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)],
                               capture_output=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    label = args.before or str(args.before_src)
    print(f"{args.model}, {args.height}x{args.width}, batch 1, fp32, {args.threads} threads, {args.runs} interleaved runs"
          " (processor + forward + instance post-processing)")
    for name, values in times.items():
        print(f"  {name:6s} median {medians[name]:.3f} s   runs {' '.join(f'{v:.2f}' for v in values)}")
    print(f"after / before ({label}) = {medians['after'] / medians['before']:.3f}")


if __name__ == "__main__":
    main()
