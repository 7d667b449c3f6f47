#!/usr/bin/env python
"""Images per second of `maskdino-hf predict` over a folder, this checkout against an earlier revision, in one run.

    python benchmarks/predict_throughput.py --before main --images 32 --rounds 2 \
        --variants before:1 after:1:1 before:4 after:4:0 after:4:1

A folder of `--images` synthetic shapes images (`maskdino_hf.synthetic`, sides 96..224 px, so aspect ratios from
about 1:2 to 2:1) is written once. Each variant, `REVISION:BATCH_SIZE[:LOADER_WORKERS]` (`before` = `--before`,
`after` = this checkout; the workers only exist after), is a process holding the bundled demo model of its own
revision. The processes take turns, each running `predict_files` over the whole folder (panoptic, the demo's task,
overlays and JSON written to a fresh folder), so that a change of background load hits them alike; `--threads`
torch threads each. Printed: every run's images per second, the medians and each variant's median against the
`before` variant of the same batch size. The earlier revision's `src/` is extracted with `git archive`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys, tempfile, time
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[2]))
from maskdino_hf.predict import load_model_and_processor, predict_files
model, processor = load_model_and_processor(None, "cpu")
paths = sorted(Path(sys.argv[1]).iterdir())
options = json.loads(sys.argv[3])
with tempfile.TemporaryDirectory() as out:  # warm-up: lazy imports, first-call allocations
    predict_files(paths[:2], model, processor, out, log=lambda _: None)
print("ready", flush=True)
for line in sys.stdin:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        report = predict_files(paths, model, processor, out, log=lambda _: None, **options)
        seconds = time.perf_counter() - start
    print(json.dumps([seconds, report.num_images]), flush=True)
"""


def write_images(folder: Path, count: int) -> None:
    from maskdino_hf.synthetic import generate_shapes_split

    folder.mkdir()
    for index, image in enumerate(generate_shapes_split(count, image_size=((96, 224), (96, 224)), seed=17,
                                                        split="test")["image"]):
        image.save(folder / f"image_{index:03d}.png")


def extract_src(revision: str, destination: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", revision, "src"], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(destination, filter="data")
    return destination / "src"


def start_worker(src: Path, folder: Path, threads: int, options: dict) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(folder), str(threads), json.dumps(options)],
                              env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if worker.stdout.readline().strip() != "ready":
        raise SystemExit(f"the worker for {src} {options} did not start (exit status {worker.wait()})")
    return worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="main", help="git revision to compare against (default: main)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["before:1", "after:1:1", "before:4", "after:4:1"],
                        help="REVISION:BATCH_SIZE[:LOADER_WORKERS], REVISION before or after")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "images"
        write_images(folder, args.images)
        sources = {"before": extract_src(args.before, Path(scratch) / "before"), "after": ROOT / "src"}
        workers = {}
        for variant in args.variants:
            revision, batch_size, *loader = variant.split(":")
            options = {"batch_size": int(batch_size), **({"num_workers": int(loader[0])} if loader else {})}
            workers[variant] = start_worker(sources[revision], folder, args.threads, options)
        rates: dict[str, list[float]] = {variant: [] for variant in workers}
        for _ in range(args.rounds):
            for variant, worker in workers.items():
                worker.stdin.write("run\n")
                worker.stdin.flush()
                seconds, done = json.loads(worker.stdout.readline())
                rates[variant].append(done / seconds)
                print(f"  {variant:12s} {done} images in {seconds:6.1f} s: {done / seconds:.3f} images/s", flush=True)
        for worker in workers.values():
            worker.stdin.close()
            worker.wait()
    medians = {variant: statistics.median(values) for variant, values in rates.items()}
    print(f"{args.images} synthetic images (96..224 px sides), demo model, panoptic, {args.threads} torch threads, "
          f"{args.rounds} interleaved rounds; before = {args.before}")
    for variant, median in medians.items():
        batch_size = variant.split(":")[1]
        baseline = medians.get(f"before:{batch_size}")
        ratio = f"   x{median / baseline:.3f} images/s of before:{batch_size}" if baseline else ""
        print(f"  {variant:12s} median {median:.3f} images/s{ratio}")


if __name__ == "__main__":
    main()
