"""The compiled inference path: `torch.compile` with Inductor (`maskdino_hf.export.compile_model`, `maskdino-hf
predict --compile`, `maskdino-hf evaluate --compile`) equals eager PyTorch to 1e-4.

The bundled demo model (the smallest trained model: every part of the forward pass, real activations) on its bundled
images, which the processor pads to 160x192 (three of them) and 160x224: the first size compiles static kernels, the
first other one compiles once more with symbolic sizes, and the command-line tests in the same process reuse
Inductor's cache of compiled graphs. The ONNX Runtime path is
tested in tests/test_export.py.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from maskdino_hf import cli
from maskdino_hf.export import compile_model
from maskdino_hf.predict import demo_images, load_model_and_processor
from maskdino_hf.synthetic import make_synthetic_dataset

ATOL = 1e-4
OUTPUT_NAMES = ("class_queries_logits", "masks_queries_logits", "pred_boxes")

pytestmark = [
    pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                       reason="Inductor on CPU needs a C++ compiler (g++ or c++), none found"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # torch.compile's own imports
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def test_compiled_demo_model_matches_eager():
    model, processor = load_model_and_processor(None, "cpu")
    image = Image.open(demo_images()[0]).convert("RGB")
    inputs = processor([image], return_tensors="pt")
    with torch.inference_mode():
        eager = model(**inputs)
    torch._dynamo.reset()
    compiled = compile_model(model)
    assert compiled is model
    with torch.inference_mode():
        outputs = model(**inputs)
    for name in OUTPUT_NAMES:
        ours, reference = getattr(outputs, name), getattr(eager, name)
        assert ours.shape == reference.shape, name
        error = (ours - reference).abs().max().item()
        assert error <= ATOL, f"{name}: compiled differs from eager by {error:.3g} > {ATOL}"


def test_compile_model_refuses_other_models():
    with pytest.raises(TypeError, match="MaskDINOForUniversalSegmentation"):
        compile_model(torch.nn.Linear(2, 2))


def _segments(report: dict) -> dict[int, list[tuple]]:
    return {
        item["image_id"]: [(s["category_id"], s["isthing"], s["score"], s["area"]) for s in item["segments_info"]]
        for item in report["annotations"]
    }


def test_predict_compile_gives_the_results_of_eager(tmp_path):
    """`maskdino-hf predict --compile` on the bundled demo images: the same panoptic segments (classes, scores to
    1e-4, areas) and the same panoptic maps as without `--compile`."""
    reports = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        torch._dynamo.reset()
        assert cli.main(["predict", "--output-dir", str(tmp_path / name), "--device", "cpu", *extra]) == 0
        reports[name] = json.loads((tmp_path / name / "predictions.json").read_text())
    reference, ours = _segments(reports["eager"]), _segments(reports["compiled"])
    assert sorted(ours) == sorted(reference) and len(reference) == len(demo_images())
    assert sum(len(segments) for segments in reference.values()) >= 2 * len(reference)
    for image_id, expected in reference.items():
        assert [s[:2] for s in ours[image_id]] == [s[:2] for s in expected], image_id
        assert np.allclose([s[2] for s in ours[image_id]], [s[2] for s in expected], atol=ATOL), image_id
        # A pixel whose two best masks tie to 1e-4 may go either way: areas agree to 0.5%.
        assert np.allclose([s[3] for s in ours[image_id]], [s[3] for s in expected], rtol=5e-3), image_id
    for item in reports["eager"]["annotations"]:
        expected = np.asarray(Image.open(tmp_path / "eager" / item["file_name"]))
        result = np.asarray(Image.open(tmp_path / "compiled" / item["file_name"]))
        assert result.shape == expected.shape
        assert (result == expected).all(-1).mean() >= 0.995, item["file_name"]


def test_evaluate_compile_gives_the_metrics_of_eager(tmp_path):
    """`maskdino-hf evaluate --compile` with the demo model on synthetic validation images of one size (one
    compiled graph): every metric the eager run reports, to 1e-3 (AP ranks scores, which agree to 1e-4)."""
    make_synthetic_dataset(tmp_path / "data", num_train=1, num_val=3, image_size=(113, 125), seed=5)
    reports = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        torch._dynamo.reset()
        output = tmp_path / f"{name}.json"
        argv = ["evaluate", "--data", str(tmp_path / "data"), "--output", str(output), "--device", "cpu", *extra]
        assert cli.main(argv) == 0
        reports[name] = json.loads(output.read_text())["metrics"]
    reference, ours = reports["eager"], reports["compiled"]
    assert reference["PQ"] > 0.5 and reference["segm_AP"] > 0.3, reference  # a trained model: real predictions
    assert sorted(ours) == sorted(reference)
    for key, value in reference.items():
        if isinstance(value, float):
            assert ours[key] == pytest.approx(value, abs=1e-3), key
