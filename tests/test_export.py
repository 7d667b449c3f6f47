"""The inference forward pass exports: `torch.export.export`, and ONNX through `maskdino_hf.export.export_onnx`
(`torch.onnx.export(..., dynamo=True)`, also `maskdino-hf export`) run by ONNX Runtime (`MaskDINOOnnxModel`); both equal
eager PyTorch to 1e-4.

A tiny randomly initialised model (Transformers' init keeps its activations O(1)) on one 128x160 image. The outputs
are a ModelOutput with tuples, so `MaskDINOInferenceModule` wraps the model to return (class_queries_logits,
masks_queries_logits, pred_boxes). ONNX needs `onnx`, `onnxruntime` and `onnxscript` (the export extra, also in the
test extra).
"""

from __future__ import annotations

import pytest
import torch

from maskdino_hf import MaskDINOConfig, MaskDINOForUniversalSegmentation, MaskDINOImageProcessor, cli
from maskdino_hf.export import OUTPUT_NAMES, MaskDINOInferenceModule, MaskDINOOnnxModel

ATOL = 1e-4


def _tiny_config() -> MaskDINOConfig:
    return MaskDINOConfig(
        num_labels=5,
        backbone_config=dict(
            model_type="resnet", embedding_size=8, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
            layer_type="bottleneck", out_features=["stage1", "stage2", "stage3", "stage4"],
        ),
        feature_size=32, mask_feature_size=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=32,
        decoder_layers=2, decoder_ffn_dim=32, num_queries=10,
    )


@pytest.fixture(scope="module")
def model_and_inputs():
    torch.manual_seed(0)
    model = MaskDINOInferenceModule(MaskDINOForUniversalSegmentation(_tiny_config()).eval()).eval()
    pixel_values = torch.randn(1, 3, 128, 160, generator=torch.Generator().manual_seed(1))
    inputs = (pixel_values, torch.ones(1, 128, 160, dtype=torch.long))
    with torch.no_grad():
        expected = model(*inputs)
    return model, inputs, expected


def _assert_close(outputs, expected) -> None:
    assert len(outputs) == len(expected)
    for name, ours, reference in zip(OUTPUT_NAMES, outputs, expected):
        ours = torch.as_tensor(ours)
        assert ours.shape == reference.shape, f"{name}: shape {tuple(ours.shape)} vs eager {tuple(reference.shape)}"
        error = (ours.float() - reference.float()).abs().max().item()
        assert error <= ATOL, f"{name}: max abs error {error:.3g} > {ATOL}"


def test_torch_export_matches_eager(model_and_inputs):
    model, inputs, expected = model_and_inputs
    exported = torch.export.export(model, inputs)
    with torch.no_grad():
        outputs = exported.module()(*inputs)
    _assert_close(outputs, expected)


def test_onnx_export_runs_in_onnxruntime_and_matches_eager(model_and_inputs, tmp_path):
    """`maskdino-hf export` (`export_onnx`) of a saved model; `MaskDINOOnnxModel` runs the file in ONNX Runtime."""
    for package in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(package, reason=f"ONNX export needs {package!r} (pip install 'maskdino-hf[export]')")
    model, (pixel_values, pixel_mask), expected = model_and_inputs
    model.model.save_pretrained(tmp_path / "model")
    MaskDINOImageProcessor(num_labels=5).save_pretrained(tmp_path / "model")
    path = tmp_path / "onnx" / "maskdino.onnx"
    argv = ["export", "--model", str(tmp_path / "model"), "--output", str(path), "--height", "128", "--width", "160"]
    assert cli.main(argv) == 0
    runner = MaskDINOOnnxModel(path, providers=["CPUExecutionProvider"])
    outputs = runner(pixel_values, pixel_mask=pixel_mask)
    _assert_close([getattr(outputs, name) for name in OUTPUT_NAMES], expected)
    with pytest.raises(ValueError, match="pad_size"):
        runner(torch.zeros(1, 3, 128, 192))
