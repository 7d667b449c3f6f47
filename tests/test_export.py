"""The inference forward pass exports: `torch.export.export`, and ONNX through `torch.onnx.export(..., dynamo=True)`
run by onnxruntime; both equal eager PyTorch to 1e-4.

A tiny randomly initialised model (Transformers' init keeps its activations O(1)) on one 128x160 image. The outputs are
a ModelOutput with tuples, so the model is wrapped to return (class_queries_logits, masks_queries_logits,
pred_boxes). ONNX needs `onnx`, `onnxruntime` and `onnxscript` (in the test extra).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from maskdino_hf import MaskDINOConfig, MaskDINOForUniversalSegmentation

ATOL = 1e-4
OUTPUT_NAMES = ("class_queries_logits", "masks_queries_logits", "pred_boxes")


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


class ExportableMaskDINO(nn.Module):
    """The forward pass with plain tensor outputs."""

    def __init__(self, model: MaskDINOForUniversalSegmentation):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        outputs = self.model(pixel_values)
        return outputs.class_queries_logits, outputs.masks_queries_logits, outputs.pred_boxes


@pytest.fixture(scope="module")
def model_and_inputs():
    torch.manual_seed(0)
    model = ExportableMaskDINO(MaskDINOForUniversalSegmentation(_tiny_config()).eval()).eval()
    pixel_values = torch.randn(1, 3, 128, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(pixel_values)
    return model, pixel_values, expected


def _assert_close(outputs, expected) -> None:
    assert len(outputs) == len(expected)
    for name, ours, reference in zip(OUTPUT_NAMES, outputs, expected):
        ours = torch.as_tensor(ours)
        assert ours.shape == reference.shape, f"{name}: shape {tuple(ours.shape)} vs eager {tuple(reference.shape)}"
        error = (ours.float() - reference.float()).abs().max().item()
        assert error <= ATOL, f"{name}: max abs error {error:.3g} > {ATOL}"


def test_torch_export_matches_eager(model_and_inputs):
    model, pixel_values, expected = model_and_inputs
    exported = torch.export.export(model, (pixel_values,))
    with torch.no_grad():
        outputs = exported.module()(pixel_values)
    _assert_close(outputs, expected)


def test_onnx_export_runs_in_onnxruntime_and_matches_eager(model_and_inputs, tmp_path):
    import onnx  # noqa: F401  (the test extra installs the ONNX stack; missing it is a failure, not a skip)
    import onnxruntime
    import onnxscript  # noqa: F401
    model, pixel_values, expected = model_and_inputs
    program = torch.onnx.export(model, (pixel_values,), dynamo=True, verbose=False)
    path = tmp_path / "maskdino.onnx"
    program.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: pixel_values.numpy()})
    _assert_close([torch.from_numpy(output) for output in outputs], expected)
