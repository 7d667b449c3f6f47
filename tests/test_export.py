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
from maskdino_hf.export import OUTPUT_NAMES, MaskDINOInferenceModule, MaskDINOOnnxModel, export_onnx

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


def _inputs(height: int, width: int, padded_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random image batch of one, its last `padded_rows` rows marked as padding."""
    generator = torch.Generator().manual_seed(height * width + padded_rows)
    pixel_values = torch.randn(1, 3, height, width, generator=generator)
    pixel_mask = torch.ones(1, height, width, dtype=torch.long)
    pixel_mask[:, height - padded_rows:] = 0
    return pixel_values, pixel_mask


# Unequal sides, sides that are not multiples of 32, a padded batch, and more encoder tokens than the traced size's
# 426 by more than the encoder's inference chunk of 2048 (3871).
OTHER_SIZES = ((96, 224, 0), (150, 97, 40), (448, 416, 64))


def test_torch_export_matches_eager(model_and_inputs):
    model, inputs, expected = model_and_inputs
    exported = torch.export.export(model, inputs)
    with torch.no_grad():
        outputs = exported.module()(*inputs)
    _assert_close(outputs, expected)


def test_torch_export_with_dynamic_sizes_matches_eager_at_every_size(model_and_inputs):
    """One export with symbolic height and width runs every size as eager does: nothing computed from the input size
    (level shapes, reference points, token counts) is recorded as a constant of the traced size."""
    model, inputs, _ = model_and_inputs
    height, width = torch.export.Dim("height", min=65, max=4096), torch.export.Dim("width", min=65, max=4096)
    exported = torch.export.export(model, inputs, dynamic_shapes={
        "pixel_values": {2: height, 3: width}, "pixel_mask": {1: height, 2: width}})
    for size in OTHER_SIZES:
        other = _inputs(*size)
        with torch.no_grad():
            _assert_close(exported.module()(*other), model(*other))


def test_onnx_export_runs_in_onnxruntime_and_matches_eager(model_and_inputs, tmp_path):
    """`maskdino-hf export` (`export_onnx`) of a saved model; `MaskDINOOnnxModel` runs the file in ONNX Runtime."""
    for package in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(package, reason=f"ONNX export needs {package!r} (pip install 'maskdino-hf[export]')")
    model, (pixel_values, pixel_mask), expected = model_and_inputs
    model.model.save_pretrained(tmp_path / "model")
    MaskDINOImageProcessor(num_labels=5).save_pretrained(tmp_path / "model")
    path = tmp_path / "onnx" / "maskdino.onnx"
    argv = ["export", "--model", str(tmp_path / "model"), "--output", str(path), "--height", "128", "--width", "160",
            "--batch-size", "1"]
    assert cli.main(argv) == 0
    runner = MaskDINOOnnxModel(path, providers=["CPUExecutionProvider"])
    assert runner.input_size == (128, 160) and runner.batch_size == 1
    outputs = runner(pixel_values, pixel_mask=pixel_mask)
    _assert_close([getattr(outputs, name) for name in OUTPUT_NAMES], expected)
    with pytest.raises(ValueError, match="pad_size"):
        runner(torch.zeros(1, 3, 128, 192))
    with pytest.raises(ValueError, match="batches of 1"):
        runner(torch.zeros(2, 3, 128, 160))


def test_onnx_export_for_any_size_runs_every_size_in_onnxruntime(model_and_inputs, tmp_path):
    """`maskdino-hf export` without --height, --width and --batch-size: one file for any input size and batch, equal
    to eager at each; sizes it cannot take are refused with the reason."""
    for package in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(package, reason=f"ONNX export needs {package!r} (pip install 'maskdino-hf[export]')")
    model, inputs, expected = model_and_inputs
    model.model.save_pretrained(tmp_path / "model")
    MaskDINOImageProcessor(num_labels=5).save_pretrained(tmp_path / "model")
    path = tmp_path / "any-size.onnx"
    assert cli.main(["export", "--model", str(tmp_path / "model"), "--output", str(path)]) == 0
    runner = MaskDINOOnnxModel(path, providers=["CPUExecutionProvider"])
    assert runner.input_size is None and runner.batch_size is None
    outputs = runner(*inputs)
    _assert_close([getattr(outputs, name) for name in OUTPUT_NAMES], expected)
    for size in OTHER_SIZES:
        other = _inputs(*size)
        outputs = runner(*other)
        with torch.no_grad():
            _assert_close([getattr(outputs, name) for name in OUTPUT_NAMES], model(*other))
    # a batch of three, the last image padded
    batch = [_inputs(160, 192), _inputs(160, 192, padded_rows=32), _inputs(160, 192, padded_rows=100)]
    pixel_values, pixel_mask = (torch.cat(parts) for parts in zip(*batch))
    outputs = runner(pixel_values, pixel_mask)
    with torch.no_grad():
        _assert_close([getattr(outputs, name) for name in OUTPUT_NAMES], model(pixel_values, pixel_mask))
    with pytest.raises(ValueError, match="from 65 to 8192 px"):
        runner(torch.zeros(1, 3, 64, 160))
    with pytest.raises(ValueError, match="floating point"):  # raw uint8 pixels, not the processor's output
        runner(torch.zeros(1, 3, 128, 160, dtype=torch.uint8))
    with pytest.raises(ValueError, match="pixel_mask must have shape"):
        runner(inputs[0], pixel_mask=torch.ones(1, 128, 128, dtype=torch.long))


def test_export_cli_refuses_one_side_alone(tmp_path, capsys):
    assert cli.main(["export", "--output", str(tmp_path / "m.onnx"), "--height", "128"]) == 2
    assert "both --height and --width" in capsys.readouterr().err


def test_a_model_whose_forward_branches_on_the_size_is_refused_for_any_size_and_exports_for_one(tmp_path):
    """A Swin backbone pads to its windows, so its graph depends on the size: the export for any size is refused
    at once with the reason (never a file that is wrong at other sizes); the export for one size equals eager."""
    for package in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(package, reason=f"ONNX export needs {package!r} (pip install 'maskdino-hf[export]')")
    config = MaskDINOConfig(
        num_labels=5,
        backbone_config=dict(model_type="swin", embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8],
                             window_size=7, out_features=["stage1", "stage2", "stage3", "stage4"]),
        feature_size=32, mask_feature_size=32, encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=32,
        decoder_layers=1, decoder_ffn_dim=32, num_queries=10,
    )
    torch.manual_seed(0)
    model = MaskDINOForUniversalSegmentation(config).eval()
    for size, batch in ((None, None), (None, 1), ((224, 256), None)):
        with pytest.raises(ValueError, match="cannot be exported for any input size and batch.*input_size=") as refused:
            export_onnx(model, tmp_path / "any.onnx", input_size=size, batch_size=batch)
        assert "swin backbone" in str(refused.value)
    assert not (tmp_path / "any.onnx").exists()
    runner = MaskDINOOnnxModel(export_onnx(model, tmp_path / "one.onnx", input_size=(224, 256), batch_size=1),
                               providers=["CPUExecutionProvider"])
    pixel_values = torch.randn(1, 3, 224, 256, generator=torch.Generator().manual_seed(2))
    outputs = runner(pixel_values)
    with torch.no_grad():
        expected = model(pixel_values)
    _assert_close([getattr(outputs, name) for name in OUTPUT_NAMES], [getattr(expected, name) for name in OUTPUT_NAMES])
