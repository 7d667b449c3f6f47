"""Mask DINO training objective against the official training fixtures.

Each training fixture holds one official training forward: the predictions (`outputs.safetensors`), the targets as
the official `prepare_targets` built them, every random draw in call order, every matcher call's assignment and cost
matrix, and every raw and weighted loss term. The draws the model consumes (denoising noise) are skipped; the rest
are replayed through `ReplayRandomSource` in the order the loss asks for them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from maskdino_hf.configuration_maskdino import MaskDINOConfig
from transformers.utils import ModelOutput

from maskdino_hf.loss_maskdino import (
    LayerPredictions,
    MaskDINOHungarianMatcher,
    MaskDINOLoss,
    maskdino_weight_dict,
    pair_wise_sigmoid_cross_entropy_cost,
    sample_target_masks,
)
from maskdino_hf.modeling_maskdino import MaskDINODenoisingOutput, MaskDINOModelOutput
from maskdino_hf.random_source import MaskDINORandomSource, ReplayRandomSource


FIXTURES = Path(__file__).parent / "fixtures" / "official"
TRAINING_CASES = ("instance_r50_mask2box", "panoptic_r50_batch", "panoptic_decoupled_box")
# stuff classes of each case (case READMEs); only panoptic_decoupled_box trains with PANO_BOX_LOSS True
STUFF_LABELS = {
    "instance_r50_mask2box": [],
    "panoptic_r50_batch": [7, 8, 9, 10],
    "panoptic_decoupled_box": [80, 81, 82, 83],
}
PANOPTIC_BOX_LOSS = {"instance_r50_mask2box": False, "panoptic_r50_batch": False, "panoptic_decoupled_box": True}
# official names of LayerPredictions' class_logits, mask_logits, box_predictions in the fixtures
PREDICTION_KEYS = ("pred_logits", "pred_masks", "pred_boxes")


class TrainingFixture:
    def __init__(self, case: str):
        folder = FIXTURES / case / "training"
        self.case = case
        self.info = json.loads((folder / "training.json").read_text())
        self.outputs_raw = load_file(folder / "outputs.safetensors")
        self.inputs = load_file(folder / "inputs.safetensors")
        self.draws = load_file(folder / "random_draws.safetensors")
        self.matching = load_file(folder / "matching.safetensors")
        self.losses = load_file(folder / "losses.safetensors")
        contrast = folder / "contrast_PANO_BOX_LOSS_False.safetensors"
        self.contrast_losses = load_file(contrast) if contrast.exists() else None
        self.batch_size, _, self.num_labels = self.outputs_raw["final.pred_logits"].shape
        self.num_aux = sum(1 for key in self.outputs_raw if key.startswith("aux") and key.endswith(".pred_logits"))

    def config(self, **overrides) -> MaskDINOConfig:
        kwargs = {
            "num_labels": self.num_labels,
            "decoder_layers": self.num_aux,  # INITIAL_PRED: one auxiliary prediction per decoder layer
            "train_num_points": 64,
            "stuff_labels": STUFF_LABELS[self.case],
            "panoptic_box_loss": PANOPTIC_BOX_LOSS[self.case],
        }
        kwargs.update(overrides)
        return MaskDINOConfig(**kwargs)

    def layer(self, prefix: str) -> LayerPredictions:
        return LayerPredictions(*(self.outputs_raw[f"{prefix}.{key}"].clone() for key in PREDICTION_KEYS))

    def outputs(self, denoising: bool = True) -> MaskDINOModelOutput:
        """The recorded official predictions as the model returns them: every prediction layer (the initial one
        first, the final one last), the selected proposals and (unless `denoising=False`) the denoising queries."""
        layers = [self.layer(f"aux{i}") for i in range(self.num_aux)] + [self.layer("final")]
        dn_layers = [self.layer(f"dn_aux{i}") for i in range(self.num_aux)] + [self.layer("dn_final")]
        denoising_outputs = None
        if denoising:
            denoising_outputs = MaskDINODenoisingOutput(
                known_labels=self.outputs_raw["dn.known_labels"],
                known_boxes=self.outputs_raw["dn.known_boxes"],
                known_indices=self.outputs_raw["dn.known_indice"],
                batch_indices=self.outputs_raw["dn.batch_idx"],
                query_indices=self.outputs_raw["dn.map_known_indice"],
                num_groups=self.info["dn"]["scalar"],
                pad_size=self.info["dn"]["pad_size"],
                class_logits=tuple(layer.class_logits for layer in dn_layers),
                mask_logits=tuple(layer.mask_logits for layer in dn_layers),
                box_predictions=tuple(layer.box_predictions for layer in dn_layers),
            )
        # the interm logits/masks are bit-identical to the initial prediction (aux0), only the boxes are stored
        return MaskDINOModelOutput(
            enc_topk_logits=self.outputs_raw["aux0.pred_logits"].clone(),
            enc_topk_boxes=self.outputs_raw["interm.pred_boxes"].clone(),
            enc_topk_masks=self.outputs_raw["aux0.pred_masks"].clone(),
            class_logits=tuple(layer.class_logits for layer in layers),
            mask_logits=tuple(layer.mask_logits for layer in layers),
            box_predictions=tuple(layer.box_predictions for layer in layers),
            denoising_outputs=denoising_outputs,
        )

    def targets(self) -> list[dict[str, torch.Tensor]]:
        return [
            {
                "labels": self.inputs[f"targets.{b}.labels"],
                "boxes": self.inputs[f"targets.{b}.boxes_cxcywh_norm"],
                "masks": self.inputs[f"targets.{b}.masks_padded"],
            }
            for b in range(self.batch_size)
        ]

    def replay(self, phase_prefix: str | None = None) -> ReplayRandomSource:
        """The recorded draws after the model's denoising noise (or only those of one phase)."""
        records = [r for r in self.info["random_draws"] if r["phase"] != "dn_noise"]
        if phase_prefix is not None:
            records = [r for r in records if r["phase"] == phase_prefix]
        return ReplayRandomSource([self.draws[f"draw.{r['index']:03d}"] for r in records])


_FIXTURE_CACHE: dict[str, TrainingFixture] = {}


def fixture_for(case: str) -> TrainingFixture:
    if case not in _FIXTURE_CACHE:
        _FIXTURE_CACHE[case] = TrainingFixture(case)
    return _FIXTURE_CACHE[case]


def cast_floats(value, dtype):
    if isinstance(value, ModelOutput):
        return type(value)(**{key: cast_floats(item, dtype) for key, item in value.items()})
    if isinstance(value, (list, tuple)):
        return type(value)(cast_floats(item, dtype) for item in value)
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value


def layer_outputs(outputs: MaskDINOModelOutput, layer: str) -> LayerPredictions:
    if layer == "interm":
        return LayerPredictions(outputs.enc_topk_logits, outputs.enc_topk_masks, outputs.enc_topk_boxes)
    index = -1 if layer == "final" else int(layer.removeprefix("aux"))
    return LayerPredictions(outputs.class_logits[index], outputs.mask_logits[index], outputs.box_predictions[index])


def prediction_tensors(outputs: MaskDINOModelOutput) -> list[torch.Tensor]:
    """Every prediction tensor the loss reads: all layers, the proposals and the denoising queries."""
    tensors = [*outputs.class_logits, *outputs.mask_logits, *outputs.box_predictions]
    tensors += [outputs.enc_topk_logits, outputs.enc_topk_masks, outputs.enc_topk_boxes]
    denoising = outputs.denoising_outputs
    if denoising is not None:
        tensors += [*denoising.class_logits, *denoising.mask_logits, *denoising.box_predictions]
    return tensors


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return abs(value.item() - reference.item()) / max(abs(reference.item()), 1e-6)


# ------------------------------------------------------------------------------------------------- matcher
@pytest.mark.parametrize("case", TRAINING_CASES)
def test_matcher_cost_matrices_match_official(case):
    fx = fixture_for(case)
    matcher = MaskDINOHungarianMatcher(fx.config())
    outputs, targets = fx.outputs(), fx.targets()
    weights = fx.info["matcher_cost_weights"]
    assert weights == {"class": 4.0, "mask": 5.0, "dice": 5.0, "bbox": 5.0, "giou": 2.0}
    for call in fx.info["matcher_calls"]:
        layer = call["layer"]
        random_source = fx.replay(f"matcher/{layer}")
        costs = matcher.per_image_costs(layer_outputs(outputs, layer), targets, random_source)
        assert random_source.num_remaining == 0
        for image, cost in enumerate(costs):
            reference = fx.matching[f"cost.{layer}.img{image}"]
            assert cost["total"].shape == reference.shape
            torch.testing.assert_close(cost["total"], reference, atol=1e-4, rtol=0)
            if layer == "final":
                for term in ("class", "mask", "dice", "bbox", "giou"):
                    reference_term = fx.matching[f"cost_terms.final.img{image}.{term}"]
                    torch.testing.assert_close(cost[term], reference_term, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", TRAINING_CASES)
def test_matching_indices_match_official(case):
    fx = fixture_for(case)
    criterion = MaskDINOLoss(fx.config())
    random_source = fx.replay()
    _, matchings = criterion.compute_loss_terms(fx.outputs(), fx.targets(), random_source)
    assert random_source.num_remaining == 0, "every recorded loss-side draw must be consumed, in order"
    assert list(matchings) == [call["layer"] for call in fx.info["matcher_calls"]]
    for call in fx.info["matcher_calls"]:
        for image, (pred_idx, tgt_idx) in enumerate(matchings[call["layer"]]):
            prefix = f"call{call['call']:02d}.{call['layer']}.img{image}"
            assert pred_idx.dtype == tgt_idx.dtype == torch.int64
            assert torch.equal(pred_idx, fx.matching[f"{prefix}.pred_idx"])
            assert torch.equal(tgt_idx, fx.matching[f"{prefix}.tgt_idx"])


# ---------------------------------------------------------------------------------------------- criterion
LOSS_CASES = [(case, None) for case in TRAINING_CASES] + [("panoptic_decoupled_box", False)]


@pytest.mark.parametrize(("case", "panoptic_box_loss"), LOSS_CASES)
def test_loss_terms_match_official(case, panoptic_box_loss):
    fx = fixture_for(case)
    if panoptic_box_loss is None:
        config, reference, total_reference = fx.config(), fx.losses, fx.info["total_loss"]
    else:
        contrast = fx.info["contrast_PANO_BOX_LOSS_False"]
        config = fx.config(panoptic_box_loss=panoptic_box_loss)
        reference, total_reference = fx.contrast_losses, contrast["total_loss_PANO_BOX_LOSS_False"]
    criterion = MaskDINOLoss(config)

    raw, _ = criterion.compute_loss_terms(fx.outputs(), fx.targets(), fx.replay())
    raw_reference = {key.removeprefix("raw."): value for key, value in reference.items() if key.startswith("raw.")}
    assert list(raw) == list(fx.info["losses_raw"])  # same names, same (official) order
    assert set(raw) == set(raw_reference)
    for name, value in raw.items():
        assert relative_error(value, raw_reference[name]) < 1e-4, (name, value.item(), raw_reference[name].item())

    loss, loss_dict = criterion(fx.outputs(), fx.targets(), fx.replay())
    weighted_reference = {k.removeprefix("weighted."): v for k, v in reference.items() if k.startswith("weighted.")}
    assert set(loss_dict) == set(weighted_reference)
    for name, value in loss_dict.items():
        assert criterion.weight_dict[name] == fx.info["weight_dict_applied"][name]
        assert relative_error(value, weighted_reference[name]) < 1e-4, (name, value.item())
    assert abs(loss.item() - total_reference) / total_reference < 1e-4
    assert abs(loss.item() - sum(value.item() for value in loss_dict.values())) < 1e-3


def test_decoupled_box_loss_changes_only_box_terms():
    fx = fixture_for("panoptic_decoupled_box")
    with_decoupled, _ = MaskDINOLoss(fx.config(panoptic_box_loss=True)).compute_loss_terms(
        fx.outputs(), fx.targets(), fx.replay()
    )
    without, _ = MaskDINOLoss(fx.config(panoptic_box_loss=False)).compute_loss_terms(
        fx.outputs(), fx.targets(), fx.replay()
    )
    changed = sorted(name for name in with_decoupled if not torch.equal(with_decoupled[name], without[name]))
    assert changed == sorted(fx.info["contrast_PANO_BOX_LOSS_False"]["changed_terms"])
    assert all(name.startswith(("loss_bbox", "loss_giou")) for name in changed)


def test_decoupled_box_loss_with_only_stuff_targets_is_zero_but_keeps_other_terms():
    fx = fixture_for("panoptic_decoupled_box")
    everything_stuff = fx.config(panoptic_box_loss=True, stuff_labels=list(range(fx.num_labels)))
    raw, _ = MaskDINOLoss(everything_stuff).compute_loss_terms(
        fx.outputs(), fx.targets(), fx.replay()
    )
    for name, value in raw.items():
        if name.startswith(("loss_bbox", "loss_giou")):
            assert value.item() == 0.0, name
        else:
            assert relative_error(value, fx.losses[f"raw.{name}"]) < 1e-4, name


def test_weight_dict_is_built_like_the_official_one():
    fx = fixture_for("instance_r50_mask2box")
    weights = maskdino_weight_dict(fx.config())
    # 5 base + 5 interm, then _dn of those 10, then _{i} copies of all 20 for 3 decoder layers
    assert len(weights) == 20 * (1 + 3)
    assert {name: weights[name] for name in fx.info["weight_dict_applied"]} == fx.info["weight_dict_applied"]
    detection_denoising = maskdino_weight_dict(fx.config(denoising="det"))
    assert "loss_bbox_dn" in detection_denoising and "loss_mask_dn" not in detection_denoising


# ------------------------------------------------------------------------------------------- behaviours
def test_gradients_flow_to_every_prediction():
    fx = fixture_for("instance_r50_mask2box")
    outputs = fx.outputs()
    # the interm logits/masks tensors are separate leaves here, so every prediction tensor is checked
    leaves = [tensor.requires_grad_(True) for tensor in prediction_tensors(outputs)]
    loss, _ = MaskDINOLoss(fx.config())(outputs, fx.targets(), fx.replay())
    loss.backward()
    for leaf in leaves:
        assert leaf.grad is not None
        assert torch.isfinite(leaf.grad).all()
        assert leaf.grad.abs().sum() > 0


def test_batch_without_any_target_gives_finite_loss():
    fx = fixture_for("panoptic_r50_batch")
    # no target anywhere: the model builds no denoising queries (denoising_outputs None), the _dn terms are zeros
    outputs = fx.outputs(denoising=False)
    for logits in (*outputs.class_logits, outputs.enc_topk_logits):
        logits.requires_grad_(True)
    height, width = fx.inputs["targets.0.masks_padded"].shape[-2:]
    targets = [
        {
            "labels": torch.zeros(0, dtype=torch.int64),
            "boxes": torch.zeros(0, 4),
            "masks": torch.zeros(0, height, width),
        }
        for _ in range(fx.batch_size)
    ]
    criterion = MaskDINOLoss(fx.config())
    random_source = MaskDINORandomSource(torch.Generator().manual_seed(0))
    raw, matchings = criterion.compute_loss_terms(outputs, targets, random_source)
    assert all(len(pred) == len(tgt) == 0 for matching in matchings.values() for pred, tgt in matching)
    for name, value in raw.items():
        assert torch.isfinite(value), name
        if not name.startswith("loss_ce"):
            assert value.item() == 0.0, name
    assert raw["loss_ce"].item() > 0
    assert set(raw) == set(fx.info["losses_raw"])  # the zero denoising terms keep the official names
    loss, _ = criterion(outputs, targets)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(outputs.class_logits[-1].grad).all()


def test_bfloat16_predictions_work_without_nan():
    fx = fixture_for("instance_r50_mask2box")
    criterion = MaskDINOLoss(fx.config())
    reference, _ = criterion(fx.outputs(), fx.targets(), fx.replay())
    outputs = cast_floats(fx.outputs(), torch.bfloat16)
    assert outputs.denoising_outputs.class_logits[-1].dtype == torch.bfloat16
    final_masks = outputs.mask_logits[-1].requires_grad_(True)
    loss, loss_dict = criterion(outputs, fx.targets(), fx.replay())
    assert all(torch.isfinite(value) for value in loss_dict.values())
    assert abs(loss.item() - reference.item()) / reference.item() < 0.02  # bf16 rounding of the predictions only
    loss.backward()
    assert final_masks.grad.dtype == torch.bfloat16
    assert torch.isfinite(final_masks.grad.float()).all()


def test_first_aux_layer_has_no_denoising_loss_without_query_selection():
    fx = fixture_for("instance_r50_mask2box")
    outputs = fx.outputs()
    outputs = MaskDINOModelOutput(**{key: value for key, value in outputs.items() if not key.startswith("enc_topk")})
    raw, matchings = MaskDINOLoss(fx.config(two_stage=False, initialize_box_type="no")).compute_loss_terms(
        outputs, fx.targets(), MaskDINORandomSource()
    )
    assert "interm" not in matchings and not any(name.endswith("_interm") for name in raw)
    assert "loss_ce_0" in raw and "loss_ce_dn_0" not in raw and "loss_ce_dn_1" in raw


def test_semantic_ce_loss_weights_the_no_object_class():
    fx = fixture_for("panoptic_r50_batch")
    config = fx.config(semantic_ce_loss=True, no_object_weight=0.1)
    logits = torch.randn(fx.batch_size, 20, fx.num_labels + 1, generator=torch.Generator().manual_seed(0))
    outputs = fx.layer("final")._replace(class_logits=logits)
    criterion = MaskDINOLoss(config)
    indices = [(torch.tensor([3, 5]), torch.tensor([1, 0])), (torch.zeros(0, dtype=torch.int64),) * 2]
    targets = fx.targets()
    loss = criterion.loss_labels(outputs, targets, indices, num_masks=torch.tensor(6.0))["loss_ce"]
    classes = torch.full((fx.batch_size, 20), fx.num_labels)
    classes[0, 3], classes[0, 5] = targets[0]["labels"][1], targets[0]["labels"][0]
    weights = torch.where(classes == fx.num_labels, 0.1, 1.0)
    per_query = F.cross_entropy(logits.transpose(1, 2), classes, reduction="none")
    torch.testing.assert_close(loss, (per_query * weights).sum() / weights.sum())


# ------------------------------------------------------------------------------- fast paths of the loss
def test_target_masks_sampled_in_place_equal_sampling_the_padded_stack_of_copies():
    # the official way: one copied (zero-padded) mask per entry, sampled by grid_sample
    generator = torch.Generator().manual_seed(0)
    targets = [
        {"masks": (torch.rand(3, 40, 48, generator=generator) > 0.5).float()},
        {"masks": (torch.rand(2, 32, 40, generator=generator) > 0.5).float()},  # smaller: zero-padded
        {"masks": torch.zeros(0, 40, 48)},
    ]
    # image 0: a matching (a target left out); image 1: denoising groups (every target three times)
    target_indices = [torch.tensor([2, 0]), torch.tensor([0, 1, 0, 1, 0, 1]), torch.zeros(0, dtype=torch.int64)]
    points = torch.rand(8, 50, 2, generator=generator)
    copies = [F.pad(t["masks"], (0, 48 - t["masks"].shape[-1], 0, 40 - t["masks"].shape[-2])) for t in targets]
    stack = torch.cat([masks[index] for masks, index in zip(copies, target_indices)])
    expected = F.grid_sample(stack[:, None], 2 * points[:, :, None] - 1, align_corners=False)[:, 0, :, 0]
    sampled = sample_target_masks(targets, points, target_indices)
    assert sampled.shape == (8, 50) and sampled.max() > 0
    torch.testing.assert_close(sampled, expected, atol=1e-6, rtol=0)


def test_pair_wise_mask_cost_equals_mask2formers_pair_wise_cross_entropy():
    from transformers.models.mask2former.modeling_mask2former import pair_wise_sigmoid_cross_entropy_loss

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(30, 500, generator=generator) * 8
    labels = (torch.rand(4, 500, generator=generator) > 0.5).float()
    expected = pair_wise_sigmoid_cross_entropy_loss(logits, labels)
    torch.testing.assert_close(pair_wise_sigmoid_cross_entropy_cost(logits, labels), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ random source
def test_random_source_with_generator_is_reproducible():
    first = MaskDINORandomSource(torch.Generator().manual_seed(7))
    second = MaskDINORandomSource(torch.Generator().manual_seed(7))
    torch.testing.assert_close(first.rand(3, 4), second.rand((3, 4)))
    labels = first.randint_like(torch.zeros(5, dtype=torch.int64), 0, 11)
    assert labels.dtype == torch.int64 and labels.shape == (5,)
    assert 0 <= labels.min() and labels.max() < 11
    assert first.rand_like(torch.zeros(2, 4)).shape == (2, 4)


def test_global_random_source_follows_torch_manual_seed():
    torch.manual_seed(123)
    expected = torch.rand(1, 64, 2)
    torch.manual_seed(123)
    torch.testing.assert_close(MaskDINORandomSource().rand(1, 64, 2, device="cpu"), expected)


def test_replay_random_source_checks_order_shape_and_exhaustion():
    replay = ReplayRandomSource([torch.full((2, 3), 0.5), torch.tensor([1, 2], dtype=torch.int64)])
    assert replay.rand(0, 192, 2).shape == (0, 192, 2)  # empty requests need no recorded draw
    torch.testing.assert_close(replay.rand(2, 3, dtype=torch.float64), torch.full((2, 3), 0.5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="shape"):
        replay.randint(0, 11, (3,))
    assert replay.randint(0, 11, (2,)).tolist() == [1, 2]
    assert replay.num_remaining == 0
    with pytest.raises(RuntimeError, match="exhausted"):
        replay.rand(1, 64, 2)
    with pytest.raises(RuntimeError, match="outside"):
        ReplayRandomSource([torch.tensor([12])]).randint(0, 11, (1,))


@pytest.mark.parametrize("make_source", ["global", "generator", "replay"])
def test_rand_blocks_hand_out_the_numbers_of_one_draw(make_source):
    """On the CPU each block is its own draw (so the whole is never in memory), yet the blocks are exactly one
    `rand` of the full shape and leave the stream where that draw would: the official draws stay the official ones."""
    shape = (37, 96, 2)
    if make_source == "replay":
        expected, after = torch.rand(shape), torch.rand(5)
        source = ReplayRandomSource([expected, after])
    elif make_source == "generator":
        source = MaskDINORandomSource(torch.Generator().manual_seed(5))
        reference = torch.Generator().manual_seed(5)
        expected, after = torch.rand(shape, generator=reference), torch.rand(5, generator=reference)
    else:
        torch.manual_seed(5)
        expected, after = torch.rand(shape), torch.rand(5)
        torch.manual_seed(5)
        source = MaskDINORandomSource()
    blocks = list(source.rand_blocks(*shape, block_size=8))
    assert [len(block) for block in blocks] == [8, 8, 8, 8, 5]
    assert torch.equal(torch.cat(blocks), expected)
    assert torch.equal(source.rand(5), after)


def test_uncertainty_points_drawn_by_blocks_equal_those_of_one_official_draw():
    """`sample_points_using_uncertainty` draws its candidates block by block of masks on the CPU; the points are
    those chosen from the official single draw of candidates then uniform points (`draw_point_candidates`)."""
    config = MaskDINOConfig(train_num_points=64)
    loss = MaskDINOLoss(config)
    mask_logits = torch.randn(40, 1, 16, 16)
    torch.manual_seed(11)
    drawn_now = loss.sample_points_using_uncertainty(mask_logits, MaskDINORandomSource())
    next_number = torch.rand(1)
    torch.manual_seed(11)
    draws = loss.draw_point_candidates(40, torch.device("cpu"), MaskDINORandomSource())
    assert draws[0].shape == (40, 192, 2) and draws[1].shape == (40, 16, 2)
    assert torch.equal(drawn_now, loss.sample_points_using_uncertainty(mask_logits, draws=draws))
    assert torch.equal(torch.rand(1), next_number)


@pytest.mark.parametrize("block", [1, 3, 7])
def test_mask_terms_computed_by_blocks_of_masks_equal_one_block(monkeypatch, block):
    """`loss_masks` sums its terms block by block of masks on the CPU (`LOSS_MASK_BLOCK`); blocks that split an
    image's entries or hold entries of two images give the terms and gradients of a single block."""
    import maskdino_hf.loss_maskdino as loss_module

    fx = fixture_for("panoptic_r50_batch")  # a batch of two images, denoising groups included

    def loss_and_grads(mask_block):
        monkeypatch.setattr(loss_module, "LOSS_MASK_BLOCK", mask_block)
        outputs = fx.outputs()
        leaves = [tensor.requires_grad_(True) for tensor in prediction_tensors(outputs)]
        loss, terms = MaskDINOLoss(fx.config())(outputs, fx.targets(), fx.replay())
        loss.backward()
        return terms, [leaf.grad for leaf in leaves]

    whole_terms, whole_grads = loss_and_grads(10**6)
    block_terms, block_grads = loss_and_grads(block)
    assert set(block_terms) == set(whole_terms)
    for name, value in whole_terms.items():
        torch.testing.assert_close(block_terms[name], value, rtol=1e-6, atol=1e-7, msg=name)
    for whole, blocked in zip(whole_grads, block_grads):
        torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=1e-8)


def test_masks_formed_from_the_factors_give_the_terms_and_gradients_of_the_full_mask_logits():
    """With the mask factors (each layer's mask embeddings and one per-pixel embedding), the loss forms the masks
    of the supervised queries of all layers in one product per image (`supervised_masks_of_layers`); its terms and
    the factors' gradients equal those of the loss reading the full mask logits built from the same factors."""
    import dataclasses

    fx = fixture_for("panoptic_r50_batch")  # two images, denoising groups, query selection
    outputs = fx.outputs()
    targets = [fx.targets()[0]] * 2  # the fixture's second image has no target: give both images the first's
    batch_size, _, height, width = outputs.mask_logits[-1].shape
    generator = torch.Generator().manual_seed(0)
    channels = 8

    def embeddings_like(logits):
        return torch.randn(*logits.shape[:2], channels, generator=generator).requires_grad_()

    features = torch.randn(batch_size, channels, height, width, generator=generator).requires_grad_()
    layer_embeddings = [embeddings_like(logits) for logits in outputs.mask_logits]
    dn_embeddings = [embeddings_like(logits) for logits in outputs.denoising_outputs.mask_logits]
    proposal_embeddings = embeddings_like(outputs.enc_topk_masks)
    leaves = [features, proposal_embeddings, *layer_embeddings, *dn_embeddings]

    def terms_and_grads(factored: bool):
        def masks(embeddings):
            return torch.einsum("bqc,bchw->bqhw", embeddings, features)

        denoising = dataclasses.replace(
            outputs.denoising_outputs,
            mask_logits=tuple(masks(embeddings) for embeddings in dn_embeddings),
            mask_embeddings=tuple(dn_embeddings) if factored else None,
        )
        factored_outputs = dataclasses.replace(
            outputs,
            mask_logits=tuple(masks(embeddings) for embeddings in layer_embeddings),
            enc_topk_masks=masks(proposal_embeddings),
            mask_embeddings=tuple(layer_embeddings) if factored else None,
            enc_topk_mask_embeddings=proposal_embeddings if factored else None,
            mask_features=features if factored else None,
            denoising_outputs=denoising,
        )
        random_source = MaskDINORandomSource(torch.Generator().manual_seed(0))
        loss, terms = MaskDINOLoss(fx.config())(factored_outputs, targets, random_source)
        return terms, torch.autograd.grad(loss, leaves)

    full_terms, full_grads = terms_and_grads(factored=False)
    factored_terms, factored_grads = terms_and_grads(factored=True)
    assert set(factored_terms) == set(full_terms)
    assert any(name.startswith("loss_mask_dn") for name in full_terms)
    for name, value in full_terms.items():
        torch.testing.assert_close(factored_terms[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for full, factored in zip(full_grads, factored_grads):
        assert full.abs().sum() > 0
        torch.testing.assert_close(factored, full, rtol=1e-4, atol=1e-7)
