"""The converter maps every official key, reads configs safely, and refuses what does not fit."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, case_dir, checkpoint_path

from maskdino_hf import MaskDINOConfig, MaskDINOForUniversalSegmentation, MaskDINOImageProcessor
from maskdino_hf.convert_maskdino_to_hf import (
    ConversionError,
    check_against_model,
    config_from_official,
    convert_checkpoint,
    convert_state_dict,
    load_official_checkpoint,
    load_official_config,
    processor_kwargs_from_official,
)

MANIFESTS = sorted(path for path in (FIXTURES / "manifests").glob("*.json") if path.name != "index.json")


def test_there_are_eight_release_manifests():
    assert len(MANIFESTS) == 8


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda path: path.stem)
def test_every_released_checkpoint_maps_completely(manifest):
    data = json.loads(manifest.read_text())
    config = config_from_official(data["cfg"])
    official = {key: torch.empty(shape, device="meta") for key, shape in data["state_dict"].items()}
    converted = convert_state_dict(official, config)
    with torch.device("meta"):
        model = MaskDINOForUniversalSegmentation(config)
    check_against_model(converted, model)  # 0 unmapped, 0 missing, 0 shape mismatches
    learnable = sum(parameter.numel() for parameter in model.parameters())
    expected = data["num_parameters_unique"]
    if data["cfg"]["MODEL"].get("RESNETS", {}).get("NORM") not in (None, "FrozenBN") and "Swin" not in data["cfg"]["MODEL"]["BACKBONE"]["NAME"]:
        # SyncBN backbones (Cityscapes) train their batch-norm affine; ours keeps backbone batch norms frozen.
        expected -= sum(
            torch.Size(shape).numel() for key, shape in data["state_dict"].items()
            if key.startswith("backbone.") and key.endswith(("norm.weight", "norm.bias"))
        )
    assert learnable == expected


def test_base_chain_is_resolved_relative_to_each_file(tmp_path):
    (tmp_path / "configs" / "coco").mkdir(parents=True)
    (tmp_path / "configs" / "Base.yaml").write_text(
        "MODEL:\n  SEM_SEG_HEAD:\n    NUM_CLASSES: 80\n    CONVS_DIM: 64\n  MaskDINO:\n    DEC_LAYERS: 9\n"
    )
    (tmp_path / "configs" / "coco" / "child.yaml").write_text(
        "_BASE_: ../Base.yaml\nMODEL:\n  MaskDINO:\n    DEC_LAYERS: 3\n    INITIALIZE_BOX_TYPE: bitmask\n"
    )
    cfg = load_official_config(tmp_path / "configs" / "coco" / "child.yaml")
    config = config_from_official(cfg)
    assert (config.decoder_layers, config.feature_size, config.num_labels) == (3, 64, 80)
    assert config.initialize_box_type == "bitmask"


def test_convert_writes_a_folder_that_loads_offline(tmp_path):
    case = "instance_r50_mask2box"
    convert_checkpoint(checkpoint_path(case), case_dir(case) / "config.yaml", tmp_path)
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in tmp_path.iterdir()}
    model = MaskDINOForUniversalSegmentation.from_pretrained(tmp_path)
    processor = MaskDINOImageProcessor.from_pretrained(tmp_path)
    assert model.config.initialize_box_type == "mask2box" and model.config.num_queries == 20
    assert processor.size == {"shortest_edge": 128, "longest_edge": 224}
    assert processor.size_divisibility == 32


def test_command_line_convert(tmp_path):
    case = "semantic_r50_ade"
    result = subprocess.run(
        [sys.executable, "-m", "maskdino_hf.cli", "convert", "--checkpoint", str(checkpoint_path(case)),
         "--config", str(case_dir(case) / "config.yaml"), "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["semantic_ce_loss"] is True and config["feature_order"] == "high2low"


class NotATensor:
    pass


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"weight": torch.zeros(1)}, "extra": NotATensor()}, path)
    with pytest.raises(ConversionError, match="weights-only"):
        load_official_checkpoint(path)


def test_corrupt_checkpoint_is_refused(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ConversionError, match="could not be read"):
        load_official_checkpoint(path)


def test_pickle_payload_never_runs(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "payload.pth"
    with open(path, "wb") as handle:
        pickle.dump({"model": Payload()}, handle)
    with pytest.raises(ConversionError):
        load_official_checkpoint(path)
    assert not marker.exists()


def test_checkpoint_for_a_different_config_is_refused():
    official = load_official_checkpoint(checkpoint_path("instance_r50_mask2box"))
    config = config_from_official(load_official_config(case_dir("semantic_r50_ade") / "config.yaml"))
    converted = convert_state_dict(official, config)
    with torch.device("meta"):
        model = MaskDINOForUniversalSegmentation(config)
    with pytest.raises(ConversionError, match="different config"):
        check_against_model(converted, model)


def test_unknown_keys_are_listed():
    official = load_official_checkpoint(checkpoint_path("instance_r50_mask2box"))
    official["sem_seg_head.predictor.something_new.weight"] = torch.zeros(2)
    config = config_from_official(load_official_config(case_dir("instance_r50_mask2box") / "config.yaml"))
    with pytest.raises(ConversionError, match="something_new"):
        convert_state_dict(official, config)


def test_unknown_box_init_in_yaml_is_refused(tmp_path):
    cfg = load_official_config(case_dir("instance_r50_mask2box") / "config.yaml")
    cfg["MODEL"]["MaskDINO"]["INITIALIZE_BOX_TYPE"] = "polygon"
    with pytest.raises(Exception, match="initialize_box_type must be one of"):
        config_from_official(cfg)


POSTPROCESSING_FIELDS = (
    "instance_on", "panoptic_on", "semantic_on", "test_topk_per_image", "object_mask_threshold", "overlap_threshold",
    "panoptic_temperature", "panoptic_transform_eval", "focus_on_box", "semantic_postprocessing_before_inference",
    "size_divisibility",
)
DEMO = Path(__file__).resolve().parents[1] / "src" / "maskdino_hf" / "demo"


def test_config_written_with_postprocessing_fields_still_loads_without_them(tmp_path):
    saved = json.loads((DEMO / "config.json").read_text())
    # A config.json as the converter and train.py wrote it before the processor owned post-processing.
    legacy = dict(saved, instance_on=True, panoptic_on=True, semantic_on=False, test_topk_per_image=30,
                  object_mask_threshold=0.25, overlap_threshold=0.8, panoptic_temperature=0.06,
                  panoptic_transform_eval=True, focus_on_box=False, semantic_postprocessing_before_inference=False,
                  size_divisibility=32)
    assert set(POSTPROCESSING_FIELDS) <= set(legacy)
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "config.json").write_text(json.dumps(legacy))
    config = MaskDINOConfig.from_pretrained(tmp_path / "legacy")
    assert config.num_labels == len(saved["id2label"])
    config.save_pretrained(tmp_path)
    rewritten = json.loads((tmp_path / "config.json").read_text())
    assert not set(POSTPROCESSING_FIELDS) & set(rewritten)
    assert not any(hasattr(MaskDINOConfig(test_topk_per_image=7), name) for name in POSTPROCESSING_FIELDS)


def test_converter_writes_postprocessing_settings_into_the_processor_only(tmp_path):
    case = "semantic_r50_ade"
    convert_checkpoint(checkpoint_path(case), case_dir(case) / "config.yaml", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    processor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert not set(POSTPROCESSING_FIELDS) & set(config)
    # The yaml's own values (MODEL.MaskDINO.TEST of the ADE20K semantic config).
    settings = (processor["object_mask_threshold"], processor["instance_on"], processor["semantic_on"])
    assert settings == (0.8, False, True)
    assert processor["size"]["shortest_edge"] == 128


def test_settings_missing_from_the_yaml_keep_the_processor_defaults():
    cfg = load_official_config(case_dir("semantic_r50_ade") / "config.yaml")
    del cfg["MODEL"]["MaskDINO"]["TEST"]
    del cfg["INPUT"]["MAX_SIZE_TEST"]
    kwargs = processor_kwargs_from_official(cfg, config_from_official(cfg))
    assert not {"object_mask_threshold", "instance_on", "panoptic_temperature"} & set(kwargs)
    processor = MaskDINOImageProcessor(**kwargs)
    assert processor.object_mask_threshold == MaskDINOImageProcessor().object_mask_threshold
    assert processor.size == {"shortest_edge": 128, "longest_edge": MaskDINOImageProcessor().size["longest_edge"]}
