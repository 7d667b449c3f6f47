"""Catalogue of bad inputs: each gets a clear error naming the argument, the bad value and what is allowed; unusual
but legitimate inputs keep working.

Areas: the config (construction, `from_dict`, `from_pretrained` of a config.json), the converter's yaml keys and
checkpoint loading, the model's forward (pixel inputs and training targets) and the MSDA op.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import yaml
from conftest import FIXTURES, tiny_config

from maskdino_hf import MaskDINOConfig, MaskDINOForUniversalSegmentation
from maskdino_hf.convert_maskdino_to_hf import ConversionError, load_official_checkpoint, load_official_config
from maskdino_hf.ms_deform_attn import MultiScaleDeformableAttention, multi_scale_deformable_attention_pytorch
from maskdino_hf.official_config_keys import OFFICIAL_CONFIG_LEAVES

# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    # wrong types: strings for numbers or flags, bools for ints
    ({"num_queries": "100"}, TypeError, r"num_queries.*expected int.*'100'"),
    ({"two_stage": "false"}, TypeError, r"two_stage.*expected bool.*'false'"),
    ({"num_queries": True}, TypeError, r"num_queries.*expected int.*bool"),
    ({"class_weight": "4"}, TypeError, r"class_weight"),
    ({"encoder_in_features": "res3"}, TypeError, r"encoder_in_features"),
    ({"stuff_labels": [1.5]}, TypeError, r"stuff_labels"),
    # ranges
    ({"encoder_layers": -1}, ValueError, r"encoder_layers must be non-negative.*-1"),
    ({"feature_size": -64}, ValueError, r"feature_size must be positive.*-64"),
    ({"num_queries": 0}, ValueError, r"num_queries must be positive.*0"),
    ({"decoder_layers": 0}, ValueError, r"decoder_layers must be positive"),
    ({"encoder_attention_heads": 0}, ValueError, r"encoder_attention_heads must be positive"),
    ({"decoder_n_points": -4}, ValueError, r"decoder_n_points must be positive"),
    ({"train_num_points": 0}, ValueError, r"train_num_points must be positive"),
    ({"dropout": 1.5}, ValueError, r"dropout must be in \[0, 1\).*1.5"),
    ({"focal_alpha": 1.5}, ValueError, r"focal_alpha must be in \[0, 1\]"),
    ({"importance_sample_ratio": -0.1}, ValueError, r"importance_sample_ratio must be in \[0, 1\]"),
    ({"oversample_ratio": 0.5}, ValueError, r"oversample_ratio must be at least 1"),
    ({"class_weight": -1.0}, ValueError, r"class_weight must be non-negative"),
    ({"dice_weight": float("nan")}, ValueError, r"dice_weight must be a finite number.*nan"),
    ({"layer_norm_eps": 0.0}, ValueError, r"layer_norm_eps must be positive"),
    ({"denoising_noise_scale": -0.4}, ValueError, r"denoising_noise_scale must be non-negative"),
    ({"common_stride": 3}, ValueError, r"common_stride must be one of \(4, 8, 16, 32\).*3"),
    ({"activation_function": "swish"}, ValueError, r"activation_function must be one of.*'swish'"),
    # names
    ({"feature_order": "sideways"}, ValueError, r"feature_order must be one of"),
    ({"denoising": "heavy"}, ValueError, r"denoising must be one of"),
    ({"encoder_in_features": ["res9"]}, ValueError, r"encoder_in_features must be a non-empty subset"),
    # cross-field consistency
    ({"encoder_in_features": ["res3", "res3"], "num_feature_levels": 3},
     ValueError, r"encoder_in_features has duplicates"),
    ({"num_feature_levels": 2}, ValueError, r"num_feature_levels \(2\) must be at least"),
    ({"feature_size": 48, "encoder_attention_heads": 4}, ValueError, r"feature_size must be a multiple of 32"),
    ({"feature_size": 96, "encoder_attention_heads": 5}, ValueError, r"feature_size \(96\) must be divisible"),
    ({"stuff_labels": [3, 9]}, ValueError, r"stuff_labels \[9\] are outside 0\.\.4"),
    ({"stuff_labels": [3, 3]}, ValueError, r"stuff_labels has duplicates"),
    ({"denoising_num": 0}, ValueError, r"denoising='seg' needs denoising_num >= 1"),
    ({"two_stage": False}, ValueError, r"needs two_stage=True"),
    (
        {"backbone_config": {"model_type": "resnet", "out_features": ["stage4"]}},
        ValueError,
        r"backbone_config.out_features must name 4 maps.*stage4",
    ),
]


@pytest.mark.parametrize("overrides, error, message", BAD_CONFIGS, ids=lambda value: str(value)[:40])
def test_bad_config_is_refused_naming_the_field(overrides, error, message):
    with pytest.raises(error, match=message):
        tiny_config(**overrides)


@pytest.mark.parametrize(
    "id2label, message",
    [({0: "a", 3: "b"}, r"id2label keys must be the class ids 0\.\.1.*\[0, 3\]"), ({}, r"num_labels must be positive")],
)
def test_label_names_must_cover_the_class_ids(id2label, message):
    with pytest.raises(ValueError, match=message):
        MaskDINOConfig(id2label=id2label)


def test_bad_value_assigned_after_construction_is_refused():
    config = tiny_config()
    with pytest.raises(TypeError, match=r"num_queries.*expected int.*'300'"):
        config.num_queries = "300"


@pytest.mark.parametrize(
    "field, value, error, message",
    [("two_stage", "false", TypeError, r"two_stage.*expected bool"),
     ("num_queries", "100", TypeError, r"num_queries.*expected int"),
     ("encoder_layers", -1, ValueError, r"encoder_layers must be non-negative")],
)
def test_bad_config_json_is_refused_by_from_pretrained(tmp_path, field, value, error, message):
    tiny_config().save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data[field] = value
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(error, match=message):
        MaskDINOConfig.from_pretrained(tmp_path)


def test_num_labels_given_to_from_pretrained_reheads_the_config(tmp_path):
    """Transformers' fine-tuning convention: `num_labels` overrides the saved label names (with a warning)."""
    tiny_config().save_pretrained(tmp_path)
    config = MaskDINOConfig.from_pretrained(tmp_path, num_labels=3)
    assert config.num_labels == 3 and sorted(config.id2label) == [0, 1, 2]


def test_bad_dict_is_refused_by_from_dict():
    with pytest.raises(TypeError, match=r"num_queries.*expected int"):
        MaskDINOConfig.from_dict({"num_queries": "100"})


def test_unusual_but_valid_config_values_are_accepted_and_round_trip(tmp_path):
    """Integers for float fields, no deformable encoder layer, no denoising with 0 denoising queries."""
    config = tiny_config(class_weight=4, encoder_layers=0, denoising="no", denoising_num=0, dropout=0)
    config.save_pretrained(tmp_path)
    reloaded = MaskDINOConfig.from_pretrained(tmp_path)
    assert (reloaded.class_weight, reloaded.encoder_layers, reloaded.denoising_num) == (4, 0, 0)
    model = MaskDINOForUniversalSegmentation(reloaded).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 64, 96))
    assert outputs.pred_boxes.shape == (1, 10, 4)


# ----------------------------------------------------------------------------------------------------------------
# Converter
# ----------------------------------------------------------------------------------------------------------------


def _write_yaml(tmp_path, data: dict, name: str = "config.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "data, message",
    [
        ({"MODEL": {"MaskDINO": {"NUM_OBJECT_QUERYS": 100}}},
         r"unknown config key 'MODEL\.MaskDINO\.NUM_OBJECT_QUERYS'.*did you mean MODEL\.MaskDINO\.NUM_OBJECT_QUERIES"),
        ({"MODLE": {"WEIGHTS": ""}}, r"unknown config key 'MODLE'.*did you mean MODEL"),
        ({"SOLVER": {"BASE_LRR": 0.1}}, r"unknown config key 'SOLVER\.BASE_LRR'.*did you mean SOLVER\.BASE_LR"),
        ({"MODEL": {"MaskDINO": 3}}, r"'MODEL\.MaskDINO' is a node of the official config, expected a mapping"),
        ({"MODEL": {"MaskDINO": {"TWO_STAGE": "false"}}},
         r"'MODEL\.MaskDINO\.TWO_STAGE' must be of type bool as in the official config, got str 'false'"),
        ({"MODEL": {"MaskDINO": {"NUM_OBJECT_QUERIES": "100"}}},
         r"'MODEL\.MaskDINO\.NUM_OBJECT_QUERIES' must be of type int.*got str '100'"),
        ({"MODEL": {"SEM_SEG_HEAD": {"NUM_CLASSES": True}}},
         r"'MODEL\.SEM_SEG_HEAD\.NUM_CLASSES' must be of type int.*bool"),
        ({"MODEL": {"PIXEL_MEAN": "123.675"}}, r"'MODEL\.PIXEL_MEAN' must be of type list.*str"),
    ],
)
def test_yaml_key_the_official_config_lacks_is_refused_with_file_and_suggestion(tmp_path, data, message):
    path = _write_yaml(tmp_path, data)
    with pytest.raises(ConversionError, match=message) as caught:
        load_official_config(path)
    assert str(path) in str(caught.value)


def test_yaml_values_of_detectron2_compatible_types_are_accepted(tmp_path):
    """An int for a float key, None for any key, as a partial yaml over the official defaults."""
    path = _write_yaml(tmp_path, {"MODEL": {"MaskDINO": {"CLASS_WEIGHT": 4, "DEC_LAYERS": 3},
                                            "SWIN": {"QK_SCALE": 0.5}, "WEIGHTS": None}})
    assert load_official_config(path)["MODEL"]["MaskDINO"] == {"CLASS_WEIGHT": 4, "DEC_LAYERS": 3}


def test_yaml_typo_in_a_base_file_names_that_file(tmp_path):
    _write_yaml(tmp_path, {"MODEL": {"SEM_SEG_HEAD": {"NUM_CLASSE": 80}}}, "Base.yaml")
    child = _write_yaml(tmp_path, {"_BASE_": "Base.yaml", "MODEL": {"MaskDINO": {"DEC_LAYERS": 3}}}, "child.yaml")
    with pytest.raises(ConversionError, match=r"Base\.yaml: unknown config key 'MODEL\.SEM_SEG_HEAD\.NUM_CLASSE'"):
        load_official_config(child)


def test_official_key_table_is_the_key_set_of_configs_dumped_by_the_official_code():
    def leaves(node: dict, prefix: str = "") -> set[str]:
        found = set()
        for key, value in node.items():
            name = f"{prefix}{key}"
            found |= leaves(value, name + ".") if isinstance(value, dict) and value else {name}
        return found

    table = {f"{node}.{leaf}" if node else leaf for node, names in OFFICIAL_CONFIG_LEAVES.items() for leaf in names}
    paths = sorted(FIXTURES.glob("*/config.yaml"))
    assert len(paths) == 5
    for path in paths:
        assert leaves(yaml.safe_load(path.read_text())) == table, path
        load_official_config(path)  # and every official config loads


class _MarkerPayload:
    """Unpickling this object would create the marker file (an arbitrary call hidden in a checkpoint)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_pickle_payload_inside_a_pth_state_dict_never_runs(tmp_path, writer):
    """A payload among the tensors of a `.pth` (torch's zip format, or detectron2's plain pickle) is never run: the
    converter refuses the file, naming it (tests/test_conversion.py covers a payload at the top of the pickle)."""
    marker = tmp_path / "payload_ran"
    checkpoint = {"model": {"backbone.stem.conv1.weight": torch.zeros(1), "payload": _MarkerPayload(marker)}}
    path = tmp_path / "model_final.pth"
    if writer == "torch.save":
        torch.save(checkpoint, path)
    else:
        path.write_bytes(pickle.dumps(checkpoint))
    with pytest.raises(ConversionError, match=r"model_final\.pth could not be read as a weights-only checkpoint"):
        load_official_checkpoint(path)
    assert not marker.exists()


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*nowhere\.pth"):
        load_official_checkpoint(tmp_path / "nowhere.pth")


# ----------------------------------------------------------------------------------------------------------------
# Forward: pixel inputs
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MaskDINOForUniversalSegmentation(tiny_config()).eval()


def _pixels(height: int = 96, width: int = 64, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(0))


def _with(tensor: torch.Tensor, index: tuple, value: float) -> torch.Tensor:
    tensor = tensor.clone()
    tensor[index] = value
    return tensor


BAD_PIXEL_INPUTS = [
    ({"pixel_values": _with(_pixels(), (0, 1, 5, 5), float("nan"))}, ValueError, r"pixel_values has 1 NaN or infinite"),
    ({"pixel_values": _with(_pixels(), (0, 0, 0, 0), float("inf"))}, ValueError, r"pixel_values has 1 NaN or infinite"),
    ({"pixel_values": _with(_pixels(), (0, 2, 9, 9), -float("inf"))}, ValueError, r"NaN or infinite"),
    ({"pixel_values": _pixels(), "pixel_mask": _with(torch.ones(1, 96, 64, dtype=torch.long), (0, 0, 0), 255)},
     ValueError, r"pixel_mask must be 0/1.*255"),
    ({"pixel_values": _pixels(), "pixel_mask": torch.full((1, 96, 64), 0.5)},
     ValueError, r"pixel_mask must be 0/1.*0\.5"),
    ({"pixel_values": _pixels(), "pixel_mask": torch.ones(1, 64, 96)},
     ValueError, r"pixel_mask must have shape.*\(1, 96, 64\)"),
    ({"pixel_values": _pixels(), "pixel_mask": [[1]]}, TypeError, r"pixel_mask must be a torch.Tensor.*list"),
    ({"pixel_values": torch.zeros(1, 4, 96, 64)}, ValueError, r"3 channels.*got 4"),
    ({"pixel_values": torch.zeros(1, 1, 96, 64)}, ValueError, r"3 channels.*got 1"),
    ({"pixel_values": torch.zeros(3, 96, 64)}, ValueError, r"4-d tensor.*\(3, 96, 64\)"),
    ({"pixel_values": torch.zeros(1, 3, 96, 64, dtype=torch.uint8)}, ValueError, r"floating point.*uint8"),
    ({"pixel_values": _pixels().numpy()}, TypeError, r"pixel_values must be a torch.Tensor.*ndarray"),
    ({"pixel_values": _pixels().double()},
     ValueError, r"pixel_values are torch.float64 but the model's weights are torch.float32"),
    ({"pixel_values": _pixels(32, 64)},
     ValueError, r"smaller than the coarsest feature stride \(64\).*minimum input with this config is 64x64"),
    ({"pixel_values": _pixels(64, 64)},
     ValueError, r"one value per GroupNorm group.*a single image must be at least 64x65"),
]


@pytest.mark.parametrize("inputs, error, message", BAD_PIXEL_INPUTS, ids=lambda value: str(value)[:30])
def test_bad_pixel_inputs_are_refused(model, inputs, error, message):
    with torch.no_grad(), pytest.raises(error, match=message):
        model(**inputs)


def test_more_queries_than_encoder_tokens_names_both_numbers():
    model = MaskDINOForUniversalSegmentation(tiny_config(num_queries=500)).eval()
    with torch.no_grad(), pytest.raises(ValueError, match=r"gives 128 encoder tokens, fewer than the num_queries=500"):
        model(_pixels(96, 64))


@pytest.mark.parametrize("batch, extra", [(1, 1), (2, 0)], ids=["one image one pixel larger", "two images"])
def test_the_advertised_minimum_input_runs(model, batch, extra):
    size = model.model.min_input_size
    with torch.no_grad():
        outputs = model(_pixels(size, size + extra, batch=batch))
    assert outputs.pred_boxes.shape == (batch, 10, 4)
    assert torch.isfinite(outputs.masks_queries_logits).all()


def test_padded_batch_with_a_bool_pixel_mask_runs(model):
    pixel_mask = torch.ones(2, 96, 64, dtype=torch.bool)
    pixel_mask[1, 70:, 40:] = False
    with torch.no_grad():
        outputs = model(_pixels(96, 64, batch=2), pixel_mask=pixel_mask)
    assert outputs.class_queries_logits.shape == (2, 10, 5)
    assert torch.isfinite(outputs.class_queries_logits).all()


def test_empty_batch_gives_empty_outputs(model):
    with torch.no_grad():
        outputs = model(torch.zeros(0, 3, 96, 64), pixel_mask=torch.ones(0, 96, 64, dtype=torch.long))
    assert outputs.pred_boxes.shape == (0, 10, 4)
    assert outputs.class_queries_logits.shape == (0, 10, 5)


def test_bfloat16_autocast_runs(model):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(_pixels(), pixel_mask=torch.ones(1, 96, 64, dtype=torch.long))
    assert torch.isfinite(outputs.pred_boxes.float()).all()


def test_value_checks_do_not_break_compilation(model):
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        outputs = compiled(_pixels(), pixel_mask=torch.ones(1, 96, 64, dtype=torch.long))
    assert outputs.pred_boxes.shape == (1, 10, 4)


# ----------------------------------------------------------------------------------------------------------------
# Forward: training targets
# ----------------------------------------------------------------------------------------------------------------


def _masks(count: int, height: int = 96, width: int = 64) -> torch.Tensor:
    masks = torch.zeros(count, height, width)
    masks[:, 10:40, 8:30] = 1
    return masks


def _targets(**changes) -> dict:
    """A valid batch of two images (the second without objects), with `changes` applied to image 0."""
    targets = {
        "mask_labels": [_masks(2), _masks(0)],
        "class_labels": [torch.tensor([1, 4]), torch.zeros(0, dtype=torch.long)],
        "boxes": [torch.tensor([[0.3, 0.26, 0.34, 0.31], [0.5, 0.5, 0.2, 0.2]]), torch.zeros(0, 4)],
    }
    for name, value in changes.items():
        if value is None:
            targets.pop(name)
        elif isinstance(value, (list, str)):
            targets[name] = value
        else:
            targets[name] = [value, *targets[name][1:]]
    return targets


BAD_TARGETS = [
    ({"class_labels": None, "boxes": None}, ValueError, r"mask_labels given without class_labels"),
    ({"class_labels": None, "mask_labels": None}, ValueError, r"boxes given without class_labels"),
    ({"mask_labels": None}, ValueError, r"class_labels given without mask_labels"),
    ({"class_labels": torch.tensor([1.0, 4.0])}, TypeError, r"class_labels\[0\] must hold integer class ids.*float32"),
    ({"class_labels": torch.tensor([True, False])}, TypeError, r"class_labels\[0\] must hold integer class ids.*bool"),
    ({"class_labels": torch.tensor([1, 5])}, ValueError, r"class_labels\[0\] must be class ids in 0\.\.4.*\[5\]"),
    ({"class_labels": torch.tensor([-1, 2])}, ValueError, r"class_labels\[0\] must be class ids in 0\.\.4.*\[-1\]"),
    ({"class_labels": torch.tensor([[1, 4]])}, ValueError, r"class_labels\[0\] must have shape \(num_targets,\)"),
    ({"class_labels": [1, 4]}, TypeError, r"class_labels\[0\] must be a torch.Tensor.*int"),
    ({"mask_labels": _masks(2) * 255}, ValueError, r"mask_labels\[0\] must be binary.*255"),
    ({"mask_labels": _masks(2) * 0.5}, ValueError, r"mask_labels\[0\] must be binary.*0\.5"),
    ({"mask_labels": _masks(3)}, ValueError, r"mask_labels\[0\] must have shape .* = \(2, 96, 64\).*\(3, 96, 64\)"),
    ({"mask_labels": _masks(2, 48, 32)}, ValueError, r"mask_labels\[0\] must have shape .*\(2, 48, 32\)"),
    ({"mask_labels": [_masks(2)]}, ValueError, r"mask_labels has 1 entries for a batch of 2 images"),
    ({"class_labels": [torch.tensor([1, 4])] * 3}, ValueError, r"class_labels has 3 entries for a batch of 2"),
    ({"class_labels": "cat"}, TypeError, r"class_labels must be a list with one tensor per image, got str"),
    ({"boxes": torch.tensor([[0.3, 0.26, 0.34, 0.31], [1.5, 0.5, 0.2, 0.2]])}, ValueError,
     r"boxes\[0\] must be normalised \(cx, cy, w, h\) in \[0, 1\].*1\.5"),
    ({"boxes": torch.tensor([[0.3, 0.26, -0.34, 0.31], [0.5, 0.5, 0.2, 0.2]])}, ValueError,
     r"boxes\[0\] must have non-negative width and height.*-0\.34"),
    ({"boxes": torch.tensor([[0.3, 0.26, 0.34, 0.31], [float("nan"), 0.5, 0.2, 0.2]])}, ValueError,
     r"boxes\[0\] must be finite.*nan"),
    ({"boxes": torch.tensor([[0.9, 0.5, 0.5, 0.2], [0.5, 0.5, 0.2, 0.2]])}, ValueError,
     r"boxes\[0\] must lie inside the image.*1\.15"),
    ({"boxes": torch.tensor([[0.3, 0.26, 0.34, 0.31]])},
     ValueError, r"boxes\[0\] must have shape \(num_targets, 4\) = \(2, 4\)"),
    ({"boxes": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1]])}, TypeError, r"boxes\[0\] must be floating point"),
]


@pytest.mark.parametrize("changes, error, message", BAD_TARGETS, ids=lambda value: str(value)[:40])
def test_bad_training_targets_are_refused(model, changes, error, message):
    model.train()
    try:
        with pytest.raises(error, match=message):
            model(_pixels(96, 64, batch=2), **_targets(**changes))
    finally:
        model.eval()


@pytest.mark.parametrize(
    "changes",
    [{}, {"boxes": None}, {"mask_labels": [_masks(2).bool(), _masks(0).bool()]},
     {"class_labels": [torch.tensor([1, 4], dtype=torch.int32), torch.zeros(0, dtype=torch.int32)]}],
    ids=["float masks and boxes", "boxes from masks", "bool masks", "int32 labels"],
)
def test_valid_targets_with_an_image_without_objects_train(model, changes):
    model.train()
    try:
        outputs = model(_pixels(96, 64, batch=2), **_targets(**changes))
    finally:
        model.eval()
    assert outputs.loss is not None and torch.isfinite(outputs.loss)
    outputs.loss.backward()
    model.zero_grad()


def test_a_batch_without_any_object_trains(model):
    model.train()
    try:
        outputs = model(_pixels(96, 64, batch=2), mask_labels=[_masks(0), _masks(0)],
                        class_labels=[torch.zeros(0, dtype=torch.long)] * 2)
    finally:
        model.eval()
    assert outputs.loss is not None and torch.isfinite(outputs.loss)


# ----------------------------------------------------------------------------------------------------------------
# MSDA op
# ----------------------------------------------------------------------------------------------------------------

SHAPES = [(8, 8), (4, 4)]


def _msda_inputs(**changes) -> dict:
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "value": torch.randn(2, 80, 4, 8, generator=generator),
        "value_spatial_shapes": torch.tensor(SHAPES),
        "level_start_index": torch.tensor([0, 64]),
        "sampling_locations": torch.rand(2, 10, 4, 2, 3, 2, generator=generator),
        "attention_weights": torch.rand(2, 10, 4, 2, 3, generator=generator),
    }
    inputs.update(changes)
    return inputs


BAD_MSDA_INPUTS = [
    ({"value_spatial_shapes": torch.tensor([(16, 8), (4, 4)])},
     r"value_spatial_shapes \[\(16, 8\), \(4, 4\)\] claims 144 tokens but value has 80"),
    ({"value_spatial_shapes": torch.tensor([(8, 8), (4, 2)])}, r"claims 72 tokens but value has 80"),
    ({"value_spatial_shapes": torch.tensor([(8, 8), (0, 16)]), "value": torch.randn(2, 64, 4, 8)}, r"must be positive"),
    ({"level_start_index": torch.tensor([0, 60])},
     r"level_start_index \[0, 60\] disagrees with value_spatial_shapes.*\[0, 64\]"),
    ({"level_start_index": torch.tensor([0])}, r"level_start_index must have shape \(levels,\) = \(2,\)"),
    ({"value_spatial_shapes": torch.tensor([(8, 8)])},
     r"value_spatial_shapes must have shape \(levels, 2\) = \(2, 2\)"),
    ({"attention_weights": torch.rand(2, 10, 4, 2, 4)}, r"attention_weights must have shape .* = \(2, 10, 4, 2, 3\)"),
    ({"sampling_locations": torch.rand(2, 10, 4, 2, 3)},
     r"sampling_locations must have shape \(batch, queries, heads, levels, points, 2\)"),
    ({"sampling_locations": torch.rand(2, 10, 8, 2, 3, 2), "attention_weights": torch.rand(2, 10, 8, 2, 3)},
     r"must have value's batch \(2\) and heads \(4\)"),
    ({"value": torch.randn(2, 80, 32)}, r"value must have shape \(batch, tokens, heads, head_dim\)"),
]


@pytest.mark.parametrize("changes, message", BAD_MSDA_INPUTS, ids=lambda value: str(value)[:40])
def test_bad_msda_inputs_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        multi_scale_deformable_attention_pytorch(**_msda_inputs(**changes))


def test_msda_op_refuses_a_shapes_list_that_claims_more_tokens_than_value():
    inputs = _msda_inputs()
    with pytest.raises(ValueError, match=r"value_spatial_shapes_list \[\(8, 8\), \(8, 8\)\] claims 128 tokens"):
        MultiScaleDeformableAttention()(
            inputs["value"], inputs["value_spatial_shapes"], [(8, 8), (8, 8)], inputs["level_start_index"],
            inputs["sampling_locations"], inputs["attention_weights"], 64,
        )


def test_msda_op_accepts_consistent_inputs():
    inputs = _msda_inputs()
    output = MultiScaleDeformableAttention()(
        inputs["value"], inputs["value_spatial_shapes"], SHAPES, inputs["level_start_index"],
        inputs["sampling_locations"], inputs["attention_weights"], 64,
    )
    assert output.shape == (2, 10, 32)
    assert torch.isfinite(output).all()
