"""The converted model reproduces every official intermediate and final output of the fixtures."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CASES, case_dir, converted_model, tiny_config
from safetensors.torch import load_file

from maskdino_hf import MaskDINOForUniversalSegmentation, MaskDINOModel

ATOL = 1e-4


def _close(name: str, ours: torch.Tensor, official: torch.Tensor) -> None:
    assert ours.shape == official.shape, f"{name}: shape {tuple(ours.shape)} vs official {tuple(official.shape)}"
    error = (ours.float() - official.float()).abs().max().item()
    assert error <= ATOL, f"{name}: max abs error {error:.3g} > {ATOL}"


def _run(case: str):
    model, _ = converted_model(case)
    inputs = load_file(case_dir(case) / "inputs.safetensors")
    with torch.no_grad():
        return model.model(inputs["pixel_values"], output_auxiliary_masks=True)


@pytest.mark.parametrize("case", CASES)
def test_backbone_and_pixel_decoder_match_official(case):
    outputs = _run(case)
    backbone = load_file(case_dir(case) / "backbone.safetensors")
    for index, name in enumerate(["res2", "res3", "res4", "res5"]):
        _close(name, outputs.backbone_features[index], backbone[name])
    pixel = load_file(case_dir(case) / "pixel_decoder.safetensors")
    levels = pixel["encoder.spatial_shapes"].shape[0]
    assert len(outputs.multi_scale_features) == levels
    for level in range(levels):
        _close(f"multi_scale_features.{level}", outputs.multi_scale_features[level], pixel[f"multi_scale_features.{level}"])
        assert tuple(outputs.multi_scale_features[level].shape[-2:]) == tuple(pixel["encoder.spatial_shapes"][level].tolist())
    _close("mask_features", outputs.mask_features, pixel["mask_features"])


@pytest.mark.parametrize("case", CASES)
def test_query_selection_and_every_decoder_layer_match_official(case):
    outputs = _run(case)
    official = load_file(case_dir(case) / "decoder.safetensors")
    if "enc.class_logits" in official:
        _close("enc.class_logits", outputs.enc_outputs_class, official["enc.class_logits"])
        finite = torch.isfinite(official["enc.coord_unsigmoid"])
        assert torch.equal(torch.isfinite(outputs.enc_outputs_coord_logits), finite), "invalid proposals differ"
        _close("enc.coord_unsigmoid", outputs.enc_outputs_coord_logits[finite], official["enc.coord_unsigmoid"][finite])
        assert torch.equal(outputs.enc_topk_indices, official["enc.topk_indices"]), "selected queries differ"
        _close("interm.pred_logits", outputs.enc_topk_logits, official["interm.pred_logits"])
        _close("interm.pred_boxes", outputs.enc_topk_boxes, official["interm.pred_boxes"])
        _close("interm.pred_masks", outputs.enc_topk_masks, official["layers.0.pred_masks"])
    _close("dec.init_reference_unsigmoid", outputs.init_reference_points, official["dec.init_reference_unsigmoid"])
    num_layers = sum(1 for key in official if key.endswith(".pred_logits") and key.startswith("layers."))
    assert len(outputs.class_logits) == num_layers
    for layer in range(num_layers):
        _close(f"layers.{layer}.pred_logits", outputs.class_logits[layer], official[f"layers.{layer}.pred_logits"])
        _close(f"layers.{layer}.pred_boxes", outputs.box_predictions[layer], official[f"layers.{layer}.pred_boxes"])
        _close(f"layers.{layer}.pred_masks", outputs.mask_logits[layer], official[f"layers.{layer}.pred_masks"])
    for layer in range(outputs.intermediate_reference_points.shape[1]):
        _close(f"dec.references.{layer}", outputs.intermediate_reference_points[:, layer], official[f"dec.references.{layer}"])
    for layer in range(outputs.intermediate_hidden_states.shape[1]):
        _close(f"dec.hidden_states.{layer}", outputs.intermediate_hidden_states[:, layer], official[f"dec.hidden_states.{layer}"])


@pytest.mark.parametrize("case", ["instance_r50_mask2box", "semantic_r50_ade"])
def test_segmentation_head_outputs_match_official(case):
    model, _ = converted_model(case)
    inputs = load_file(case_dir(case) / "inputs.safetensors")
    official = load_file(case_dir(case) / "decoder.safetensors")
    with torch.no_grad():
        outputs = model(inputs["pixel_values"], pixel_mask=torch.ones_like(inputs["pixel_values"][:, 0], dtype=torch.long))
    _close("pred_logits", outputs.class_queries_logits, official["pred_logits"])
    _close("pred_masks", outputs.masks_queries_logits, official["pred_masks"])
    _close("pred_boxes", outputs.pred_boxes, official["pred_boxes"])
    # One auxiliary entry per earlier layer, the initial prediction first.
    assert len(outputs.auxiliary_outputs) == model.config.decoder_layers
    _close("layers.0.pred_logits", outputs.auxiliary_outputs[0]["class_queries_logits"], official["layers.0.pred_logits"])


def test_torch_compile_gives_equal_outputs():
    """Dynamo captures the whole forward (graph breaks allowed) and the captured graphs compute the official
    outputs. `aot_eager` runs the captured graphs without Inductor's kernel fusion, whose float reassociation
    alone moves logits by ~2e-4 (measured), beyond the 1e-4 equivalence tolerance."""
    model, _ = converted_model("instance_r50_mask2box")
    inputs = load_file(case_dir("instance_r50_mask2box") / "inputs.safetensors")
    official = load_file(case_dir("instance_r50_mask2box") / "decoder.safetensors")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=False, backend="aot_eager")
    with torch.no_grad():
        eager = model(inputs["pixel_values"])
        graph = compiled(inputs["pixel_values"])
    for name, key in (("class_queries_logits", "pred_logits"), ("masks_queries_logits", "pred_masks"), ("pred_boxes", "pred_boxes")):
        _close(name, getattr(graph, name), getattr(eager, name))
        _close(name, getattr(graph, name), official[key])


def test_save_and_load_round_trip_in_safetensors(tmp_path):
    model, _ = converted_model("instance_swin_4scale")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = MaskDINOForUniversalSegmentation.from_pretrained(tmp_path).eval()
    inputs = load_file(case_dir("instance_swin_4scale") / "inputs.safetensors")
    with torch.no_grad():
        first = model(inputs["pixel_values"])
        second = reloaded(inputs["pixel_values"])
    for name in ("class_queries_logits", "masks_queries_logits", "pred_boxes"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name

@pytest.mark.parametrize(
    "pixel_values, message",
    [
        (torch.zeros(1, 4, 64, 64), "3 channels"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "floating point"),
        (torch.zeros(3, 64, 64), "4-d"),
        (torch.zeros(1, 3, 32, 64), "smaller than the coarsest feature stride"),
    ],
)
def test_bad_pixel_values_get_clear_errors(pixel_values, message):
    model = MaskDINOForUniversalSegmentation(tiny_config()).eval()
    with pytest.raises(ValueError, match=message):
        model(pixel_values)


def test_mismatched_pixel_mask_gets_a_clear_error():
    model = MaskDINOForUniversalSegmentation(tiny_config()).eval()
    with pytest.raises(ValueError, match="pixel_mask must have shape"):
        model(torch.zeros(1, 3, 64, 64), pixel_mask=torch.ones(1, 32, 64, dtype=torch.long))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("initialize_box_type", "boxes", "initialize_box_type must be one of"),
        ("feature_order", "sideways", "feature_order must be one of"),
        ("denoising", "heavy", "denoising must be one of"),
        ("hidden_size", 130, "hidden_size must be a multiple of 4"),
        ("hidden_size", 36, "hidden_size \\(36\\) must be divisible by its number of heads \\(8\\)"),
        ("encoder_in_features", ["res9"], "encoder_in_features"),
    ],
)
def test_config_refuses_nonsense(field, value, message):
    with pytest.raises(Exception, match=message):
        tiny_config(**{field: value})


@pytest.mark.parametrize("box_type", ["no", "bitmask", "mask2box"])
def test_every_box_init_type_runs(box_type):
    model = MaskDINOForUniversalSegmentation(tiny_config(initialize_box_type=box_type)).eval()
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 64, 96))
    assert outputs.pred_boxes.shape == (2, 10, 4)
    assert outputs.masks_queries_logits.shape == (2, 10, 16, 24)


def test_whole_forward_compiles_without_graph_breaks():
    """`fullgraph=True` makes Dynamo fail on any graph break: the backbone, pixel decoder, query selection,
    mask-enhanced box init and decoder trace as one graph (no host synchronisation, no data-dependent branches)."""
    model = MaskDINOForUniversalSegmentation(tiny_config()).eval()
    pixel_values = torch.randn(1, 3, 64, 96)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager = model(pixel_values)
        graph = compiled(pixel_values)
    for name in ("class_queries_logits", "masks_queries_logits", "pred_boxes"):
        _close(name, getattr(graph, name), getattr(eager, name))


def _small_model(cls=MaskDINOForUniversalSegmentation, **overrides):
    """The tiny configuration at hidden size 32 (4 decoder heads): under 1M parameters."""
    torch.manual_seed(0)
    return cls(tiny_config(hidden_size=32, decoder_attention_heads=4, **overrides))


def _training_batch():
    generator = torch.Generator().manual_seed(1)
    masks = [(torch.rand(3, 64, 96, generator=generator) > 0.5).float(), (torch.rand(2, 64, 96, generator=generator) > 0.5).float()]
    labels = [torch.tensor([0, 1, 4]), torch.tensor([2, 3])]
    return torch.randn(2, 3, 64, 96, generator=generator), masks, labels


def test_query_selection_without_every_tokens_box_selects_the_same_queries_and_boxes():
    model = _small_model().eval()
    pixel_values = _training_batch()[0]
    with torch.no_grad():
        full = model.model(pixel_values)
        selected = model.model(pixel_values, output_proposal_boxes=False)
        segmentation = model(pixel_values)
    assert full.enc_outputs_coord_logits.shape[:2] == full.enc_outputs_class.shape[:2]
    assert selected.enc_outputs_coord_logits is None
    assert torch.equal(selected.enc_topk_indices, full.enc_topk_indices)
    torch.testing.assert_close(selected.enc_topk_boxes, full.enc_topk_boxes, rtol=0, atol=1e-6)
    expected = torch.gather(full.enc_outputs_coord_logits, 1, full.enc_topk_indices[..., None].expand(-1, -1, 4))
    torch.testing.assert_close(selected.enc_topk_boxes, expected.sigmoid(), rtol=0, atol=1e-6)
    torch.testing.assert_close(segmentation.pred_boxes, full.box_predictions[-1], rtol=0, atol=1e-6)
    torch.testing.assert_close(segmentation.masks_queries_logits, full.mask_logits[-1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("hidden_size, heads", [(32, 4), (40, 8), (48, 2)])
def test_any_hidden_size_divisible_by_the_decoder_heads_runs_forward_and_training(hidden_size, heads):
    model = MaskDINOForUniversalSegmentation(tiny_config(hidden_size=hidden_size, decoder_attention_heads=heads))
    if hidden_size == 32:
        assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert model.model.decoder.ref_point_head.layers[0].in_features == 2 * hidden_size
    model.eval()
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 64, 96))
    assert outputs.pred_boxes.shape == (2, 10, 4) and torch.isfinite(outputs.pred_boxes).all()
    assert outputs.masks_queries_logits.shape == (2, 10, 16, 24)
    model.train()
    pixel_values, masks, labels = _training_batch()
    loss = model(pixel_values, mask_labels=masks, class_labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    gradients = [p.grad for p in model.model.decoder.parameters() if p.requires_grad]
    assert all(g is not None for g in gradients[:5]) and any(g.abs().sum() > 0 for g in gradients if g is not None)


def test_box_sine_embedding_takes_half_the_hidden_size_per_coordinate():
    from maskdino_hf.modeling_maskdino import box_sine_embedding

    boxes = torch.tensor([[0.25, 0.5, 0.1, 0.2]])
    embedded = box_sine_embedding(boxes, 128)
    assert embedded.shape == (1, 512)
    # (y, x, w, h) order; the first feature of each block is sin(coordinate * 2 pi).
    for block, coordinate in enumerate([0.5, 0.25, 0.1, 0.2]):
        assert embedded[0, block * 128].item() == pytest.approx(math.sin(coordinate * 2 * math.pi), abs=1e-6)
        assert embedded[0, block * 128 + 1].item() == pytest.approx(math.cos(coordinate * 2 * math.pi), abs=1e-6)
    assert box_sine_embedding(boxes, 16).shape == (1, 64)


@pytest.mark.parametrize("cls", [MaskDINOModel, MaskDINOForUniversalSegmentation])
def test_output_attentions_returns_encoder_self_and_cross_attention_weights(cls):
    model = _small_model(cls).eval()
    config = model.config
    pixel_values = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        default = model(pixel_values)
        outputs = model(pixel_values, output_attentions=True)
    for name in ("encoder_attentions", "decoder_attentions", "cross_attentions"):
        assert getattr(default, name) is None, name
    tokens = sum(level.shape[-2] * level.shape[-1] for level in model_multi_scale(model, pixel_values))
    assert len(outputs.encoder_attentions) == config.encoder_layers
    assert outputs.encoder_attentions[0].shape == (
        2, tokens, config.encoder_attention_heads, config.num_feature_levels, config.encoder_n_points
    )
    assert len(outputs.decoder_attentions) == len(outputs.cross_attentions) == config.decoder_layers
    assert outputs.decoder_attentions[0].shape == (2, config.decoder_attention_heads, 10, 10)
    assert outputs.cross_attentions[0].shape == (
        2, 10, config.decoder_attention_heads, config.num_feature_levels, config.decoder_n_points
    )
    # Attention weights are distributions over keys (self-attention) and over all sampling points (deformable).
    torch.testing.assert_close(outputs.decoder_attentions[1].sum(-1), torch.ones(2, 4, 10))
    torch.testing.assert_close(outputs.cross_attentions[1].sum((-1, -2)), torch.ones(2, 10, 4))
    torch.testing.assert_close(outputs.encoder_attentions[0].sum((-1, -2)), torch.ones(2, tokens, 4))
    # The written-out self-attention computes what PyTorch's fused path computes.
    head = default if cls is MaskDINOForUniversalSegmentation else None
    if head is not None:
        torch.testing.assert_close(outputs.pred_boxes, default.pred_boxes, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outputs.class_queries_logits, default.class_queries_logits, atol=1e-5, rtol=1e-5)
    # The config default is honoured too.
    model.config.output_attentions = True
    with torch.no_grad():
        assert len(model(pixel_values).decoder_attentions) == config.decoder_layers


def model_multi_scale(model, pixel_values):
    base = model.model if isinstance(model, MaskDINOForUniversalSegmentation) else model
    with torch.no_grad():
        return base(pixel_values).multi_scale_features


@pytest.mark.parametrize("cls", [MaskDINOModel, MaskDINOForUniversalSegmentation])
def test_output_hidden_states_returns_every_encoder_and_decoder_layer(cls):
    model = _small_model(cls).eval()
    config = model.config
    pixel_values = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        default = model(pixel_values)
        outputs = model(pixel_values, output_hidden_states=True)
    assert default.encoder_hidden_states is None and default.decoder_hidden_states is None
    tokens = sum(level.shape[-2] * level.shape[-1] for level in model_multi_scale(model, pixel_values))
    assert len(outputs.encoder_hidden_states) == config.encoder_layers + 1
    assert all(state.shape == (2, tokens, config.feature_size) for state in outputs.encoder_hidden_states)
    assert len(outputs.decoder_hidden_states) == config.decoder_layers + 1
    assert all(state.shape == (2, 10, 32) for state in outputs.decoder_hidden_states)
    # The encoder's last state is the multi-scale features, flattened.
    flat = torch.cat([level.flatten(2).transpose(1, 2) for level in outputs.multi_scale_features], 1)
    torch.testing.assert_close(outputs.encoder_hidden_states[-1], flat, rtol=0, atol=0)
    # The decoder's normed last state is the last intermediate state.
    layer_norm = (model.model if cls is MaskDINOForUniversalSegmentation else model).decoder.layer_norm
    with torch.no_grad():
        torch.testing.assert_close(layer_norm(outputs.decoder_hidden_states[-1]), outputs.intermediate_hidden_states[:, -1])
    assert len(outputs.backbone_features) == 4


def test_return_dict_false_returns_the_fields_in_declared_order():
    for cls in (MaskDINOModel, MaskDINOForUniversalSegmentation):
        model = _small_model(cls).eval()
        pixel_values = torch.randn(1, 3, 64, 96)
        with torch.no_grad():
            as_dict = model(pixel_values, output_attentions=True)
            as_tuple = model(pixel_values, output_attentions=True, return_dict=False)
        assert isinstance(as_tuple, tuple)
        assert len(as_tuple) == len(as_dict.to_tuple()) == len(as_dict.keys())
        for name, value in zip(as_dict.keys(), as_tuple):
            assert type(value) is type(as_dict[name]), name
        names = [field for field in as_dict.__dataclass_fields__ if getattr(as_dict, field) is not None]
        assert list(as_dict.keys()) == names
        model.config.return_dict = False
        with torch.no_grad():
            from_config = model(pixel_values)
        assert isinstance(from_config, tuple) and len(from_config) == len(as_dict.to_tuple()) - 3
    head = MaskDINOForUniversalSegmentation(tiny_config(hidden_size=32, decoder_attention_heads=4)).eval()
    with torch.no_grad():
        first = head(torch.randn(1, 3, 64, 96), return_dict=False)
    assert first[0].shape == (1, 10, 5) and first[2].shape == (1, 10, 4)  # class logits, masks, boxes


def test_returned_states_and_attentions_receive_gradients_from_the_loss():
    model = _small_model().train()
    pixel_values, masks, labels = _training_batch()
    outputs = model(
        pixel_values, mask_labels=masks, class_labels=labels, output_hidden_states=True, output_attentions=True
    )
    watched = {
        "intermediate_hidden_states": outputs.intermediate_hidden_states,
        "encoder_hidden_states[0]": outputs.encoder_hidden_states[0],
        "decoder_hidden_states[1]": outputs.decoder_hidden_states[1],
        "encoder_attentions[0]": outputs.encoder_attentions[0],
        "decoder_attentions[0]": outputs.decoder_attentions[0],
        "cross_attentions[0]": outputs.cross_attentions[0],
        "mask_features": outputs.mask_features,
    }
    for tensor in watched.values():
        tensor.retain_grad()
    # Training with denoising: the returned intermediate states are those of the matching queries only.
    assert outputs.intermediate_hidden_states.shape == (2, model.config.decoder_layers, 10, 32)
    outputs.loss.backward()
    for name, tensor in watched.items():
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0, name


@pytest.mark.parametrize("cls", [MaskDINOModel, MaskDINOForUniversalSegmentation])
def test_unsupported_keywords_are_refused(cls):
    model = _small_model(cls).eval()
    with pytest.raises(TypeError, match="unsupported keyword arguments \\['use_cache'\\]"):
        model(torch.randn(1, 3, 64, 96), use_cache=True)


def test_decoder_returns_typed_outputs_whose_fields_the_model_keeps():
    from maskdino_hf.modeling_maskdino import MaskDINODecoderOutput, MaskDINODenoisingOutput, MaskDINOQuerySelectionOutput

    model = _small_model().train()
    pixel_values, masks, labels = _training_batch()
    targets = model._build_targets(pixel_values, masks, labels, None)
    captured = {}
    handle = model.model.decoder.register_forward_hook(lambda module, args, output: captured.setdefault("out", output))
    outputs = model.model(pixel_values, targets=targets)
    handle.remove()
    decoded = captured["out"]
    assert isinstance(decoded, MaskDINODecoderOutput)
    assert isinstance(decoded.query_selection, MaskDINOQuerySelectionOutput)
    assert isinstance(outputs.denoising_outputs, MaskDINODenoisingOutput)
    for name in ("class_logits", "mask_logits", "box_predictions", "intermediate_hidden_states", "init_reference_points"):
        assert getattr(outputs, name) is getattr(decoded, name), name
    for name in ("enc_topk_logits", "enc_topk_boxes", "enc_topk_masks", "enc_topk_indices", "enc_outputs_class"):
        assert getattr(outputs, name) is getattr(decoded.query_selection, name), name
    denoising = outputs.denoising_outputs
    # 5 targets at most 3 per image, denoising_num 4: one group of 3 queries per image.
    assert (denoising.num_groups, denoising.pad_size) == (1, 3)
    assert len(denoising.class_logits) == len(outputs.class_logits) == model.config.decoder_layers + 1
    assert denoising.class_logits[-1].shape == (2, 3, 5) and denoising.box_predictions[0].shape == (2, 3, 4)
    assert denoising.self_attn_mask.shape == (3 + 10, 3 + 10)


def test_the_model_keeps_one_loss_object_outside_its_state_dict():
    model = _small_model().train()
    pixel_values, masks, labels = _training_batch()
    model(pixel_values, mask_labels=masks, class_labels=labels)
    criterion = model.criterion
    model(pixel_values, mask_labels=masks, class_labels=labels)
    assert model.criterion is criterion
    assert not any(key.startswith("criterion") for key in model.state_dict())
