"""A training forward of the converted model, with the official random draws replayed, gives the official
denoising queries, predictions and losses; gradients reach every trainable parameter."""

from __future__ import annotations

import pytest
import torch
from conftest import STUFF_LABELS, OpLog, case_dir, checkpoint_path, needs_onednn
from safetensors.torch import load_file

from maskdino_hf.convert_maskdino_to_hf import convert_checkpoint
from maskdino_hf.random_source import ReplayRandomSource

TRAINING_CASES = ["instance_r50_mask2box", "panoptic_r50_batch", "panoptic_decoupled_box"]
MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


def _batch(case: str):
    inputs = load_file(case_dir(case) / "training" / "inputs.safetensors")
    count = len([key for key in inputs if key.startswith("image.")])
    images = [(inputs[f"image.{i}"].float() - MEAN) / STD for i in range(count)]
    height = -(-max(image.shape[1] for image in images) // 32) * 32
    width = -(-max(image.shape[2] for image in images) // 32) * 32
    pixel_values = torch.zeros(count, 3, height, width)
    for index, image in enumerate(images):
        pixel_values[index, :, : image.shape[1], : image.shape[2]] = image
    return (
        pixel_values,
        [inputs[f"targets.{i}.masks_padded"].float() for i in range(count)],
        [inputs[f"targets.{i}.labels"] for i in range(count)],
        [inputs[f"targets.{i}.boxes_cxcywh_norm"] for i in range(count)],
    )


def _draws(case: str) -> list[torch.Tensor]:
    draws = load_file(case_dir(case) / "training" / "random_draws.safetensors")
    return [draws[key] for key in sorted(draws)]


def _train_forward(case: str, panoptic_box_loss: bool | None = None):
    model, _ = convert_checkpoint(checkpoint_path(case), case_dir(case) / "config.yaml", stuff_labels=STUFF_LABELS.get(case))
    if panoptic_box_loss is not None:
        model.config.panoptic_box_loss = panoptic_box_loss
    model.train()
    pixel_values, masks, labels, boxes = _batch(case)
    source = ReplayRandomSource(_draws(case))
    outputs = model(pixel_values, mask_labels=masks, class_labels=labels, boxes=boxes, random_source=source)
    assert source.num_remaining == 0, "every recorded draw is consumed, in order"
    return model, outputs


@pytest.mark.parametrize("case", TRAINING_CASES)
def test_training_losses_match_official(case):
    _, outputs = _train_forward(case)
    official = load_file(case_dir(case) / "training" / "losses.safetensors")
    weighted = {key[len("weighted."):]: value for key, value in official.items() if key.startswith("weighted.")}
    assert set(outputs.loss_dict) == set(weighted)
    for name, value in weighted.items():
        ours = outputs.loss_dict[name].detach()
        assert torch.allclose(ours, value, rtol=1e-4, atol=1e-6), f"{name}: {ours.item()} vs {value.item()}"
    total = sum(weighted.values())
    assert torch.allclose(outputs.loss.detach(), total, rtol=1e-4)


def test_decoupled_box_loss_off_matches_the_official_contrast():
    case = "panoptic_decoupled_box"
    _, outputs = _train_forward(case, panoptic_box_loss=False)
    official = load_file(case_dir(case) / "training" / "contrast_PANO_BOX_LOSS_False.safetensors")
    weighted = {key[len("weighted."):]: value for key, value in official.items() if key.startswith("weighted.")}
    for name, value in weighted.items():
        assert torch.allclose(outputs.loss_dict[name].detach(), value, rtol=1e-4, atol=1e-6), name


def test_denoising_queries_match_official():
    case = "instance_r50_mask2box"
    model, _ = convert_checkpoint(checkpoint_path(case), case_dir(case) / "config.yaml")
    model.train()
    pixel_values, masks, labels, boxes = _batch(case)
    source = ReplayRandomSource(_draws(case))
    targets = model._build_targets(pixel_values, masks, labels, boxes)
    outputs = model.model(pixel_values, targets=targets, random_source=source)
    official = load_file(case_dir(case) / "training" / "outputs.safetensors")
    denoising = outputs.denoising_outputs
    pad = denoising.pad_size
    assert torch.equal(denoising.self_attn_mask, official["dec.self_attn_mask"].bool())
    assert torch.equal(denoising.query_indices, official["dn.map_known_indice"])
    assert torch.equal(denoising.known_labels, official["dn.known_labels"])
    torch.testing.assert_close(
        denoising.reference_points, official["dec.init_reference_unsigmoid"][:, :pad], atol=1e-4, rtol=0
    )
    torch.testing.assert_close(denoising.queries, official["dec.init_tgt"][:, :pad], atol=1e-4, rtol=0)
    layers = list(zip(denoising.class_logits, denoising.mask_logits, denoising.box_predictions))
    for layer, (logits, masks_, box) in enumerate(layers):
        name = "dn_final" if layer == len(layers) - 1 else f"dn_aux{layer}"
        torch.testing.assert_close(logits, official[f"{name}.pred_logits"], atol=1e-4, rtol=0)
        torch.testing.assert_close(box, official[f"{name}.pred_boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(masks_, official[f"{name}.pred_masks"], atol=1e-4, rtol=0)
    torch.testing.assert_close(outputs.class_logits[-1], official["final.pred_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(outputs.mask_logits[-1], official["final.pred_masks"], atol=1e-4, rtol=0)


def test_gradients_reach_every_trainable_parameter():
    model, outputs = _train_forward("instance_r50_mask2box")
    outputs.loss.backward()
    frozen = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and (parameter.grad is None or not torch.isfinite(parameter.grad).all()):
            frozen.append(name)
    assert not frozen, f"no gradient for {frozen[:10]}"


def test_loss_from_mask_embeddings_equals_loss_from_full_masks():
    """The loss forms only the supervised queries' masks, from their mask embeddings and the per-pixel embedding; its
    terms and every parameter's gradient are those of indexing the full mask logits (the official way)."""
    case = "instance_r50_mask2box"
    model, _ = convert_checkpoint(checkpoint_path(case), case_dir(case) / "config.yaml")
    model.train()
    pixel_values, masks, labels, boxes = _batch(case)
    targets = model._build_targets(pixel_values, masks, labels, boxes)
    results = []
    for factored in (True, False):
        model.zero_grad()
        source = ReplayRandomSource(_draws(case))
        outputs = model.model(pixel_values, targets=targets, random_source=source)
        assert outputs.mask_embeddings is not None and outputs.denoising_outputs.mask_embeddings is not None
        if not factored:
            outputs.mask_embeddings = outputs.enc_topk_mask_embeddings = None
            outputs.denoising_outputs.mask_embeddings = None
        loss, terms = model.criterion(outputs, targets, source)
        loss.backward()
        gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((terms, gradients))
    (terms, gradients), (full_terms, full_gradients) = results
    assert set(terms) == set(full_terms)
    for name, value in full_terms.items():
        torch.testing.assert_close(terms[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert set(gradients) == set(full_gradients)
    for name, value in full_gradients.items():
        scale = value.abs().max().item()
        torch.testing.assert_close(gradients[name], value, rtol=1e-3, atol=1e-4 * scale + 1e-9, msg=name)


@pytest.mark.parametrize("frozen", [(), ("rows",), ("weight1", "bias1", "weight2", "bias2")])
def test_chunked_relu_feed_forward_equals_autograd(frozen):
    """The training feed-forward, chunked in both passes, gives autograd's output and gradients (float64, chunks of
    5 rows over 37 with a ragged last one), also when some inputs need no gradient."""
    from maskdino_hf.modeling_maskdino import ChunkedReluFeedForward

    generator = torch.Generator().manual_seed(0)
    inputs = {
        "rows": torch.randn(37, 8, generator=generator, dtype=torch.float64),
        "weight1": torch.randn(16, 8, generator=generator, dtype=torch.float64),
        "bias1": torch.randn(16, generator=generator, dtype=torch.float64),
        "weight2": torch.randn(8, 16, generator=generator, dtype=torch.float64),
        "bias2": torch.randn(8, generator=generator, dtype=torch.float64),
    }
    grad_output = torch.randn(37, 8, generator=generator, dtype=torch.float64)
    results = []
    for chunked in (True, False):
        leaves = {name: value.clone().requires_grad_(name not in frozen) for name, value in inputs.items()}
        if chunked:
            output = ChunkedReluFeedForward.apply(*leaves.values(), 5)
        else:
            hidden = torch.relu(leaves["rows"] @ leaves["weight1"].T + leaves["bias1"])
            output = hidden @ leaves["weight2"].T + leaves["bias2"]
        output.backward(grad_output)
        results.append((output.detach(), {name: leaf.grad for name, leaf in leaves.items()}))
    (output, grads), (expected, expected_grads) = results
    assert (expected > 0).any() and (expected < 0).any()
    torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12)
    for name, expected_grad in expected_grads.items():
        if name in frozen:
            assert grads[name] is None
        else:
            torch.testing.assert_close(grads[name], expected_grad, rtol=1e-12, atol=1e-12, msg=name)



@needs_onednn
def test_chunked_relu_feed_forward_in_float32_runs_its_products_through_onednn():
    """In float32 on the CPU the training feed-forward's six products per chunk (two forward, four backward, on
    transposed operands) go through oneDNN's matmul, with autograd's output and gradients to float32 precision."""
    from maskdino_hf.modeling_maskdino import ChunkedReluFeedForward

    generator = torch.Generator().manual_seed(0)
    inputs = {
        "rows": torch.randn(300, 32, generator=generator),
        "weight1": torch.randn(128, 32, generator=generator) * 0.2,
        "bias1": torch.randn(128, generator=generator),
        "weight2": torch.randn(32, 128, generator=generator) * 0.1,
        "bias2": torch.randn(32, generator=generator),
    }
    grad_output = torch.randn(300, 32, generator=generator)
    leaves = {name: value.clone().requires_grad_() for name, value in inputs.items()}
    with OpLog() as log:
        output = ChunkedReluFeedForward.apply(*leaves.values(), 64)
        output.backward(grad_output)
    assert log.ops.count("mkldnn._linear_pointwise.default") == 5 * 6  # 5 chunks of 64 rows over 300
    assert not any(op.startswith(("aten.mm", "aten.addmm")) for op in log.ops)
    reference = {name: value.double().requires_grad_() for name, value in inputs.items()}
    expected = torch.relu(reference["rows"] @ reference["weight1"].T + reference["bias1"])
    expected = expected @ reference["weight2"].T + reference["bias2"]
    expected.backward(grad_output.double())
    torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-5)
    for name, leaf in leaves.items():
        torch.testing.assert_close(leaf.grad.double(), reference[name].grad, rtol=1e-5, atol=1e-4, msg=name)

def test_encoder_layer_trains_through_the_chunked_feed_forward(monkeypatch):
    """An encoder layer in training takes the chunked feed-forward (several chunks here) and gives the plain
    expression's states and gradients; under autocast it keeps the plain expression."""
    from maskdino_hf import MaskDINOConfig
    from maskdino_hf.modeling_maskdino import ChunkedReluFeedForward, MaskDINOPixelDecoderEncoderLayer

    config = MaskDINOConfig(
        feature_size=32,
        encoder_ffn_dim=64,
        encoder_attention_heads=4,
        num_feature_levels=1,
        encoder_in_features=["res5"],
    )
    torch.manual_seed(0)
    layer = MaskDINOPixelDecoderEncoderLayer(config).train()
    layer.token_chunk_size = 7
    shapes = [(5, 6)]
    states = torch.randn(2, 30, 32)
    position = torch.randn(2, 30, 32)
    reference = torch.rand(2, 30, 1, 2)
    calls = []
    original = ChunkedReluFeedForward.apply
    monkeypatch.setattr(ChunkedReluFeedForward, "apply", lambda *args: calls.append(1) or original(*args))

    def run(chunked: bool):
        monkeypatch.setattr(type(layer), "chunked_training_feed_forward", lambda self, hidden: chunked)
        layer.zero_grad()
        inputs = states.clone().requires_grad_(True)
        output, _ = layer(inputs, position, reference, torch.tensor(shapes), shapes, torch.tensor([0]))
        output.square().sum().backward()
        return output.detach(), inputs.grad, {name: p.grad.clone() for name, p in layer.named_parameters()}

    output, input_grad, grads = run(True)
    assert calls
    expected, expected_input_grad, expected_grads = run(False)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(input_grad, expected_input_grad, rtol=1e-5, atol=1e-6)
    for name, value in expected_grads.items():
        torch.testing.assert_close(grads[name], value, rtol=1e-4, atol=1e-5, msg=name)
    monkeypatch.undo()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer.chunked_training_feed_forward(states)
    assert layer.chunked_training_feed_forward(states)
