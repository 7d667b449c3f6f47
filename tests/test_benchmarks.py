"""The benchmark scripts run end to end (small settings) and print their tables: they are how the speed and precision
figures in the README are produced, so they must not rot. Their figures are not checked here (timings belong to the
benchmarks, not to tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> str:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


@pytest.mark.parametrize("script, args, expected", [
    ("inference.py", ["--quick", "--no-baseline"], [
        "ours fp32", "bf16/fp32", "r50        1    320x448", "decoder + heads", "Definition of done",
        "our fp32 forward / fp32 matmul floor", "our bf16 forward / fp32 forward", "worst-case panoptic post-processing",
    ]),
    ("msda.py", ["--quick", "--repeats", "1"], ["encoder  forward", "speed-up"]),
    ("bf16_agreement.py", ["--images", "3"], ["held-out metrics", "segm_AP", "score >= 0.5", "bf16-rounded input"]),
    ("deploy.py", ["--models", "demo", "--variants", "eager", "--runs", "1"], ["| demo | cpu | 288x320 | eager |"]),
    ("allocator.py", ["--quick"], ["default glibc allocator", "keep_freed_memory()", "kept / default inference time"]),
    ("training.py", ["--quick"], ["256x256  fp32", "ours/M2F", "fp32 matmul floors", "GFLOP ours/M2F", "needs our step at"]),
])
def test_benchmark_script_runs_and_prints_its_table(script, args, expected):
    output = run(script, *args)
    for text in expected:
        assert text in output, (script, text, output[-2000:])


def test_bf16_timings_are_skipped_with_the_reason_where_the_cpu_emulates_bfloat16(monkeypatch):
    """On an AVX2-only x86 CPU a bfloat16 2048^3 matmul took a minute (a scalar fallback): the benchmarks' bf16
    timings would measure that fallback and run for hours, so they are skipped there, saying why."""
    import argparse
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("inference_benchmark", ROOT / "benchmarks" / "inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cpu, args = torch.device("cpu"), argparse.Namespace(no_bf16=False)
    avx2 = {"architecture": "x86_64", "cpu_name": "AMD EPYC", "avx2": True}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(avx2))
    assert "AMD EPYC" in module.bf16_skipped(args, cpu)
    assert module.bf16_skipped(argparse.Namespace(no_bf16=True), cpu) == "--no-bf16"
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {**avx2, "avx512_bf16": True})
    assert module.bf16_skipped(args, cpu) is None
