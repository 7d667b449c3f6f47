"""The fast inference path (channels-last pixel values, or autocast): the backbone's frozen batch norms folded into
its convolutions, every map channels-last from the input to the pixel decoder, and the encoder layers computed a
chunk of tokens at a time. It computes the same function as the official (channels-first, unfolded) path; only float rounding
differs. State dicts are unchanged, and the forward stays export- and fullgraph-compile-friendly."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import OpLog, needs_onednn, tiny_config
from torch import nn
from transformers.backbone_utils import load_backbone

from maskdino_hf import MaskDINOForUniversalSegmentation
from maskdino_hf.modeling_maskdino import (
    MaskDINOConvNormLayer,
    MaskDINOFrozenBatchNorm2d,
    MaskDINOPixelDecoderEncoderLayer,
    inference_linear,
    is_channels_last,
)

ATOL = 1e-4
CHANNELS_LAST = torch.channels_last


def _calibrate_batch_norms(model: nn.Module, pixel_values: torch.Tensor, seed: int = 0) -> None:
    """Give every frozen norm the statistics of its own input on `pixel_values` (as a trained backbone's are) and
    random affine parameters, instead of the identity norms of a fresh model, so that folding is exercised on
    activations of order one."""
    generator = torch.Generator().manual_seed(seed)

    def calibrate(norm: MaskDINOFrozenBatchNorm2d, args: tuple) -> None:
        channels = norm.weight.shape[0]
        norm.running_mean.copy_(args[0].mean((0, 2, 3)))
        norm.running_var.copy_(args[0].var((0, 2, 3)))
        norm.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
        norm.bias.copy_(torch.randn(channels, generator=generator) * 0.2)

    norms = [module for module in model.modules() if isinstance(module, MaskDINOFrozenBatchNorm2d)]
    hooks = [norm.register_forward_pre_hook(calibrate) for norm in norms]
    with torch.no_grad():
        model(pixel_values)
    for hook in hooks:
        hook.remove()


def _model(**overrides) -> MaskDINOForUniversalSegmentation:
    torch.manual_seed(0)
    model = MaskDINOForUniversalSegmentation(tiny_config(**overrides)).eval()
    _calibrate_batch_norms(model.model.backbone, _pixels())
    return model


def _pixels(batch: int = 2, height: int = 64, width: int = 96) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))


def _max_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    assert ours.shape == reference.shape
    return (ours.float() - reference.float()).abs().max().item()


def test_a_folded_conv_norm_layer_equals_the_unfolded_affine_path():
    """One layer (with a conv bias too): folded (channels-last, no grad) against conv then the training-mode
    affine norm (gradients on) and against conv then `F.batch_norm` (channels-first inference)."""
    torch.manual_seed(0)
    layer = MaskDINOConvNormLayer(
        nn.Conv2d(16, 24, kernel_size=3, stride=2, padding=1, bias=True), MaskDINOFrozenBatchNorm2d(24), nn.ReLU()
    )
    inputs = torch.randn(2, 16, 20, 28)
    _calibrate_batch_norms(layer, inputs)
    with torch.no_grad():
        folded = layer(inputs.contiguous(memory_format=CHANNELS_LAST))
        unfolded = layer(inputs)
    affine = layer(inputs.clone().requires_grad_(True))
    assert affine.requires_grad, "the gradient path must stay conv -> affine norm"
    assert is_channels_last(folded)
    assert folded.abs().max() > 0.1
    assert _max_error(folded, affine.detach()) <= 1e-5
    assert _max_error(folded, unfolded) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_first_inference_norm_is_f_batch_norm_written_in_place(dtype):
    """Channels-first inference normalises the convolution's output where it lies: the same bits as
    `F.batch_norm` (the official features depend on them), no second map; with a gradient it stays autograd's."""
    torch.manual_seed(0)
    norm = MaskDINOFrozenBatchNorm2d(24)
    _calibrate_batch_norms(norm, torch.randn(2, 24, 9, 13))
    norm.to(dtype)
    inputs = torch.randn(2, 24, 9, 13, dtype=dtype)
    expected = torch.nn.functional.batch_norm(
        inputs, norm.running_mean, norm.running_var, norm.weight, norm.bias, training=False, eps=1e-5
    )
    written = inputs.clone()
    with torch.no_grad():
        result = norm.normalize_(written)
    assert result.data_ptr() == written.data_ptr()
    assert torch.equal(result, expected)
    tracked = inputs.clone().requires_grad_(True)
    normalised = norm.normalize_(tracked)
    assert normalised.requires_grad and torch.equal(tracked.detach(), inputs), "the input of a tracked map is kept"
    if dtype == torch.float32:  # the affine formula of the gradient path rounds differently in bfloat16
        torch.testing.assert_close(normalised.detach(), expected, atol=1e-5, rtol=0)


def test_folded_backbone_equals_the_unfolded_affine_path():
    """The whole backbone: the fast path's features (folded, channels-last) against the training path's (gradients
    flowing through the affine norms), to 1e-4."""
    model = _model()
    pixel_values = _pixels()
    backbone = model.model.backbone
    with torch.no_grad():
        fast = backbone(pixel_values.contiguous(memory_format=CHANNELS_LAST)).feature_maps
    slow = backbone(pixel_values.clone().requires_grad_(True)).feature_maps
    assert len(fast) == 4
    for index, (ours, reference) in enumerate(zip(fast, slow)):
        assert reference.requires_grad
        assert is_channels_last(ours), f"feature map {index} left channels-last"
        assert reference.abs().max() > 0.1
        assert _max_error(ours, reference.detach()) <= ATOL, f"feature map {index}"


def test_channels_last_pixel_values_give_the_channels_first_outputs():
    """The whole model with channels-last input equals the default (official arithmetic) path to 1e-4, and its
    backbone and mask features stay channels-last end to end: no backbone or pixel-decoder convolution sees a
    channels-first map."""
    model = _model()
    pixel_values = _pixels()
    seen = []
    convolutions = [
        module
        for part in (model.model.backbone, model.model.pixel_decoder)
        for module in part.modules()
        if isinstance(module, (nn.Conv2d, MaskDINOConvNormLayer))
    ]
    hooks = [
        module.register_forward_pre_hook(lambda module, args: seen.append(is_channels_last(args[0])))
        for module in convolutions
    ]
    with torch.no_grad():
        fast = model.model(pixel_values.contiguous(memory_format=CHANNELS_LAST))
        for hook in hooks:
            hook.remove()
        official = model.model(pixel_values)
    assert seen and all(seen), f"{seen.count(False)} of {len(seen)} convolutions got channels-first maps"
    assert all(is_channels_last(feature) for feature in fast.backbone_features)
    assert is_channels_last(fast.mask_features)
    assert _max_error(fast.mask_features, official.mask_features) <= ATOL
    for name in ("class_logits", "mask_logits", "box_predictions"):
        assert _max_error(getattr(fast, name)[-1], getattr(official, name)[-1]) <= ATOL, name


def test_backbone_state_dict_keys_and_values_are_unchanged():
    """The conv + norm wrappers keep Transformers' ResNet parameter names: the backbone's state dict has exactly the
    keys of `load_backbone(config)` (less the frozen norms' `num_batches_tracked`), loads from it, and saves the
    loaded values back unchanged."""
    config = tiny_config()
    model = MaskDINOForUniversalSegmentation(config)
    assert any(isinstance(module, MaskDINOConvNormLayer) for module in model.model.backbone.modules())
    torch.manual_seed(3)
    reference = {
        key: value for key, value in load_backbone(config).state_dict().items() if not key.endswith("num_batches_tracked")
    }
    assert set(model.model.backbone.state_dict()) == set(reference)
    model.model.backbone.load_state_dict(reference)
    for key, value in model.model.backbone.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_the_fast_path_follows_weight_changes():
    """Nothing folded is cached: after `load_state_dict` and after `.to(float64)` the fast path still equals the
    unfolded one."""
    model = _model()
    backbone = model.model.backbone
    pixel_values = _pixels(batch=1)
    state = {key: value.clone() for key, value in backbone.state_dict().items()}
    with torch.no_grad():
        before = backbone(pixel_values.contiguous(memory_format=CHANNELS_LAST)).feature_maps[-1]
        for key, value in state.items():
            if key.endswith("normalization.weight"):
                value.mul_(0.8)
        backbone.load_state_dict(state)
        after = backbone(pixel_values.contiguous(memory_format=CHANNELS_LAST)).feature_maps[-1]
        official = backbone(pixel_values).feature_maps[-1]
        assert _max_error(after, before) > 1e-2, "the new norm weights were not used"
        assert _max_error(after, official) <= ATOL
        backbone.to(torch.float64)
        double = backbone(pixel_values.double().contiguous(memory_format=CHANNELS_LAST)).feature_maps[-1]
    assert double.dtype == torch.float64
    assert _max_error(double, official) <= ATOL


def test_channels_last_swin_backbone_runs_and_matches():
    """Swin has no batch norms to fold; channels-last input still runs and gives the channels-first outputs."""
    backbone_config = dict(
        model_type="swin", image_size=96, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    model = _model(backbone_config=backbone_config)
    assert not any(isinstance(module, MaskDINOConvNormLayer) for module in model.modules())
    pixel_values = _pixels(batch=1)
    with torch.no_grad():
        fast = model(pixel_values.contiguous(memory_format=CHANNELS_LAST))
        official = model(pixel_values)
    for name in ("class_queries_logits", "masks_queries_logits", "pred_boxes"):
        assert _max_error(getattr(fast, name), getattr(official, name)) <= ATOL, name


def test_chunked_encoder_feed_forward_equals_the_training_formula():
    """The inference feed-forward (token chunks over a batch of 2, activation in place, written into one
    preallocated output) equals the whole-tensor training path."""
    torch.manual_seed(0)
    layer = MaskDINOPixelDecoderEncoderLayer(tiny_config()).eval()
    layer.token_chunk_size = 7  # several chunks, the last one partial, crossing the image boundary
    states = torch.randn(2, 30, 32)
    with torch.no_grad():
        chunked = layer.feed_forward_with_residual(states)
    whole = states + layer.fc2(layer.activation(layer.fc1(states)))
    assert chunked.shape == states.shape
    assert _max_error(chunked, whole.detach()) <= 1e-6
    assert _max_error(chunked, states) > 1e-3


def _encoder_layer_inputs(model: MaskDINOForUniversalSegmentation, pixel_values: torch.Tensor) -> tuple:
    captured = []
    hook = model.model.pixel_decoder.layers[0].register_forward_pre_hook(lambda layer, args: captured.append(args))
    with torch.no_grad():
        model(pixel_values)
    hook.remove()
    return captured[0][:6]  # without output_attentions


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bfloat16-autocast"])
def test_encoder_layer_inference_in_token_chunks_equals_the_whole_tensor_layer(autocast):
    """At inference the encoder layer projects the value of all tokens once, then attends and transforms chunks of
    tokens (here 7: the last chunk partial, one crossing the boundary between the two images). Its states, and its
    attention weights when asked for, equal those of the whole-tensor layer that autograd records."""
    model = _model()
    layer = model.model.pixel_decoder.layers[0]
    inputs = _encoder_layer_inputs(model, _pixels())
    num_tokens = inputs[0].shape[1]
    layer.token_chunk_size = 7
    assert num_tokens % 7 and num_tokens > 2 * 7
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        with torch.no_grad():
            chunked, chunked_weights = layer(*inputs, output_attentions=True)
            states_only, no_weights = layer(*inputs)
        whole, whole_weights = layer(*inputs)
    assert whole.requires_grad and not chunked.requires_grad
    assert chunked.dtype == whole.dtype and chunked_weights.dtype == whole_weights.dtype
    assert no_weights is None and torch.equal(states_only, chunked)
    assert _max_error(chunked, whole.detach()) <= (1e-5 if not autocast else 0.0)
    assert _max_error(chunked_weights, whole_weights.detach()) <= (1e-6 if not autocast else 0.0)
    assert _max_error(chunked, inputs[0]) > 1e-2


def test_model_outputs_do_not_depend_on_the_encoder_token_chunks():
    """Chunks of 5 tokens give the model's outputs of one chunk per layer (the default at these sizes)."""
    model = _model()
    pixel_values = _pixels()
    with torch.no_grad():
        reference = model(pixel_values)
        for layer in model.model.pixel_decoder.layers:
            layer.token_chunk_size = 5
        chunked = model(pixel_values)
    for name in ("class_queries_logits", "masks_queries_logits", "pred_boxes"):
        assert _max_error(getattr(chunked, name), getattr(reference, name)) <= 1e-5, name


def test_fast_path_compiles_without_graph_breaks_and_exports():
    """The folded channels-last path traces as one graph (`fullgraph=True`: no host synchronisation) and exports
    under `torch.no_grad()`, both equal to eager."""
    model = _model()
    pixel_values = _pixels(batch=1).contiguous(memory_format=CHANNELS_LAST)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager = model(pixel_values)
        graph = compiled(pixel_values)
        exported = torch.export.export(model.model.backbone, (pixel_values,))
        exported_maps = exported.module()(pixel_values).feature_maps
        eager_maps = model.model.backbone(pixel_values).feature_maps
    for name in ("class_queries_logits", "masks_queries_logits", "pred_boxes"):
        assert _max_error(getattr(graph, name), getattr(eager, name)) <= ATOL, name
    for ours, reference in zip(exported_maps, eager_maps):
        assert _max_error(ours, reference) <= ATOL


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_autocast_takes_the_folded_path(dtype):
    """Under autocast the model converts its input to channels-last once, so the backbone folds its norms: the
    features come out channels-last and close to fp32."""
    model = _model()
    pixel_values = _pixels(batch=1)
    with torch.no_grad():
        reference = model.model(pixel_values).backbone_features
        with torch.autocast("cpu", dtype=dtype):
            features = model.model(pixel_values).backbone_features
    for ours, official in zip(features, reference):
        assert is_channels_last(ours)
        error = _max_error(ours, official) / official.abs().max().item()
        assert error < 0.05


@needs_onednn
@pytest.mark.parametrize("activation", [None, nn.ReLU(), nn.GELU()])
def test_inference_linear_takes_onednn_in_float32_on_the_cpu_with_the_plain_values(activation):
    """At float32 CPU inference the feed-forward's linears run oneDNN's matmul (the ReLU fused into it), with the
    values of `activation(linear(x))` up to float32 summation order."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    rows = torch.randn(300, 64)
    with torch.no_grad():
        expected = linear(rows) if activation is None else activation(linear(rows))
    with torch.inference_mode(), OpLog() as log:
        output = inference_linear(rows, linear, activation)
    assert "mkldnn._linear_pointwise.default" in log.ops
    assert ("aten.relu_.default" in log.ops) is False  # the ReLU is fused, nothing runs after the matmul for it
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("case", ["autocast", "bfloat16", "gradients"])
def test_inference_linear_keeps_the_plain_expression_outside_float32_cpu_inference(case):
    """Under autocast (bfloat16 matmuls), in another dtype, and when gradients flow (the oneDNN op has no backward),
    the plain linear runs, with its values and gradients."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    rows = torch.randn(300, 64)
    if case == "bfloat16":
        linear, rows = linear.to(torch.bfloat16), rows.to(torch.bfloat16)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if case == "autocast" else contextlib.nullcontext()
    grad_mode = torch.enable_grad() if case == "gradients" else torch.no_grad()
    with grad_mode, context:
        expected = torch.relu(linear(rows))
        with OpLog() as log:
            output = inference_linear(rows, linear, nn.ReLU())
    assert not any("mkldnn._linear_pointwise" in op for op in log.ops)
    assert torch.equal(output, expected) and output.dtype == expected.dtype
    if case == "gradients":
        output.sum().backward()
        assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0
