"""Convert official Mask DINO checkpoints (detectron2 `.pth` + yaml) into `MaskDINOForUniversalSegmentation` folders.

The yaml is read with its `_BASE_` chain (paths relative to each file) or as a fully dumped config; the `.pth` is
read with `torch.load(weights_only=True)`, so nothing but tensors is ever unpickled. Every official key is mapped;
any key left unmapped, any model key left missing, or any shape that differs stops the conversion with the list.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path

import torch
import yaml

from .configuration_maskdino import MaskDINOConfig
from .dataset_categories import COCO_NUM_THINGS, COCO_PANOPTIC_CATEGORIES
from .modeling_maskdino import fpn_feature_names
from .official_config_keys import OFFICIAL_CONFIG_LEAVES


# Official modules that appear under several names in the state dict (shared, so all aliases hold the same tensor).
_ALIASES = (
    (re.compile(r"^sem_seg_head\.predictor\.(?:decoder\.)?bbox_embed\.\d+\."), "sem_seg_head.predictor._bbox_embed."),
    (re.compile(r"^sem_seg_head\.predictor\.decoder\.norm\."), "sem_seg_head.predictor.decoder_norm."),
)
_DROPPED = ("criterion.empty_weight",)


class ConversionError(ValueError):
    """The checkpoint or config cannot be converted; the message lists what is wrong."""


def _deep_merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _official_nodes() -> set[str]:
    """Every config node of the official config (those holding leaves and all their parents)."""
    nodes = set()
    for node in OFFICIAL_CONFIG_LEAVES:
        parts = node.split(".") if node else []
        nodes.update(".".join(parts[:length]) for length in range(len(parts) + 1))
    return nodes


def _check_official_type(name: str, value, expected: type | None, path: str | Path) -> None:
    """detectron2's type rule: the official type, None on either side, or a list for a tuple; an int is also taken
    for a float (where detectron2 is stricter). A bool is not an int and a string is not a number or a flag."""
    if expected is None or value is None or type(value) is expected:
        return
    if expected is float and type(value) is int or expected is list and isinstance(value, tuple):
        return
    raise ConversionError(
        f"{path}: config key {name!r} must be of type {expected.__name__} as in the official config, got "
        f"{type(value).__name__} {value!r}"
    )


def check_official_keys(data: dict, path: str | Path, node: str = "") -> None:
    """Refuse keys that the official config does not have, and values of another type, as detectron2's merge does (a
    typo would otherwise convert silently with the default, `TWO_STAGE: "false"` would read as true). The error names
    the key, the file and the closest official keys or the expected type."""
    nodes = _official_nodes()
    for key, value in data.items():
        name = f"{node}.{key}" if node else str(key)
        if name in nodes and isinstance(value, dict):
            check_official_keys(value, path, name)
            continue
        if name not in nodes and key in OFFICIAL_CONFIG_LEAVES.get(node, {}):
            _check_official_type(name, value, OFFICIAL_CONFIG_LEAVES[node][key], path)
            continue
        if name in nodes:
            raise ConversionError(f"{path}: config key {name!r} is a node of the official config, expected a mapping")
        children = [other for other in nodes if other and other.rpartition(".")[0] == node]
        candidates = [f"{node}.{leaf}" if node else leaf for leaf in OFFICIAL_CONFIG_LEAVES.get(node, {})] + children
        close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ConversionError(
            f"{path}: unknown config key {name!r}, which the official Mask DINO config does not have{hint}"
        )


def load_official_config(path: str | Path, _seen: tuple = ()) -> dict:
    """Read an official yaml, resolving `_BASE_` chains relative to each file. Keys the official config does not
    have are refused (see `check_official_keys`)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConversionError(f"_BASE_ cycle through {path}")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ConversionError(f"{path} is not a detectron2 yaml mapping")
    base = data.pop("_BASE_", None)
    check_official_keys(data, path)
    if base is None:
        return data
    return _deep_merge(load_official_config(path.parent / base, _seen + (path,)), data)


def _get(cfg: dict, dotted: str, default=None):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _backbone_config(cfg: dict) -> dict:
    name = _get(cfg, "MODEL.BACKBONE.NAME", "build_resnet_backbone")
    out_features = ["stage1", "stage2", "stage3", "stage4"]
    if "Swin" in name:
        return {
            "model_type": "swin",
            "image_size": _get(cfg, "MODEL.SWIN.PRETRAIN_IMG_SIZE", 224),
            "patch_size": _get(cfg, "MODEL.SWIN.PATCH_SIZE", 4),
            "embed_dim": _get(cfg, "MODEL.SWIN.EMBED_DIM", 96),
            "depths": list(_get(cfg, "MODEL.SWIN.DEPTHS", [2, 2, 6, 2])),
            "num_heads": list(_get(cfg, "MODEL.SWIN.NUM_HEADS", [3, 6, 12, 24])),
            "window_size": _get(cfg, "MODEL.SWIN.WINDOW_SIZE", 7),
            "mlp_ratio": float(_get(cfg, "MODEL.SWIN.MLP_RATIO", 4.0)),
            "qkv_bias": bool(_get(cfg, "MODEL.SWIN.QKV_BIAS", True)),
            "hidden_dropout_prob": float(_get(cfg, "MODEL.SWIN.DROP_RATE", 0.0)),
            "attention_probs_dropout_prob": float(_get(cfg, "MODEL.SWIN.ATTN_DROP_RATE", 0.0)),
            "drop_path_rate": float(_get(cfg, "MODEL.SWIN.DROP_PATH_RATE", 0.3)),
            "use_absolute_embeddings": bool(_get(cfg, "MODEL.SWIN.APE", False)),
            "out_features": out_features,
        }
    if "resnet" not in name:
        raise ConversionError(f"unsupported backbone {name!r}: expected detectron2 ResNet or D2SwinTransformer")
    depth = _get(cfg, "MODEL.RESNETS.DEPTH", 50)
    depths = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}
    if depth not in depths:
        raise ConversionError(f"unsupported ResNet depth {depth} (bottleneck ResNets 50/101/152)")
    if _get(cfg, "MODEL.RESNETS.NUM_GROUPS", 1) != 1:
        raise ConversionError("grouped (ResNeXt) backbones are not supported by Transformers' ResNet")
    if _get(cfg, "MODEL.RESNETS.RES5_DILATION", 1) != 1:
        raise ConversionError("dilated res5 is not supported")
    res2 = _get(cfg, "MODEL.RESNETS.RES2_OUT_CHANNELS", 256)
    bottleneck = _get(cfg, "MODEL.RESNETS.WIDTH_PER_GROUP", 64)
    if res2 != 4 * bottleneck:
        raise ConversionError(
            f"RES2_OUT_CHANNELS ({res2}) must be 4 x WIDTH_PER_GROUP ({bottleneck}) for Transformers' bottleneck"
        )
    return {
        "model_type": "resnet",
        "embedding_size": _get(cfg, "MODEL.RESNETS.STEM_OUT_CHANNELS", 64),
        "hidden_sizes": [res2 * 2**i for i in range(4)],
        "depths": depths[depth],
        "layer_type": "bottleneck",
        "downsample_in_bottleneck": bool(_get(cfg, "MODEL.RESNETS.STRIDE_IN_1X1", False)),
        "out_features": out_features,
    }


def _known_stuff_labels(cfg: dict, num_classes: int) -> list[int]:
    """The stuff classes of a config whose data set says them: none for instance/semantic models, 80..132 for COCO
    panoptic (133 classes). Any other panoptic model needs them given: guessing would make every class a thing."""
    datasets = " ".join(_get(cfg, "DATASETS.TRAIN", []) or [])
    if not (_get(cfg, "MODEL.MaskDINO.TEST.PANOPTIC_ON", False) or "panoptic" in datasets):
        return []
    if "coco" in datasets and num_classes == len(COCO_PANOPTIC_CATEGORIES):
        return list(range(COCO_NUM_THINGS, num_classes))
    raise ConversionError(
        f"panoptic config (DATASETS.TRAIN {datasets!r}, NUM_CLASSES {num_classes}) with an unknown thing/stuff "
        "split: pass the stuff class ids with --stuff-labels (e.g. --stuff-labels 80,81,82; stuff_labels=[...] in "
        "Python), or an empty --stuff-labels '' if every class is a thing"
    )


def config_from_official(
    cfg: dict, stuff_labels: list[int] | None = None, id2label: dict[int, str] | None = None
) -> MaskDINOConfig:
    """Build a `MaskDINOConfig` from an official (merged) detectron2 config dict."""
    num_classes = _get(cfg, "MODEL.SEM_SEG_HEAD.NUM_CLASSES")
    if num_classes is None:
        raise ConversionError("the config has no MODEL.SEM_SEG_HEAD.NUM_CLASSES: is it a Mask DINO config?")
    md = lambda key, default=None: _get(cfg, f"MODEL.MaskDINO.{key}", default)  # noqa: E731
    head = lambda key, default=None: _get(cfg, f"MODEL.SEM_SEG_HEAD.{key}", default)  # noqa: E731
    test_on = lambda key: bool(md(f"TEST.{key}", False))  # noqa: E731
    if stuff_labels is None:
        stuff_labels = _known_stuff_labels(cfg, num_classes)
    if id2label is None:
        id2label = {index: f"LABEL_{index}" for index in range(num_classes)}
    if len(id2label) != num_classes:
        raise ConversionError(f"id2label has {len(id2label)} names for NUM_CLASSES={num_classes}")
    semantic_on = test_on("SEMANTIC_ON")
    dn = md("DN", "seg")
    return MaskDINOConfig(
        backbone_config=_backbone_config(cfg),
        id2label={int(k): v for k, v in id2label.items()},
        label2id={v: int(k) for k, v in id2label.items()},
        hidden_size=md("HIDDEN_DIM", 256),
        feature_size=head("CONVS_DIM", 256),
        mask_feature_size=head("MASK_DIM", 256),
        encoder_layers=head("TRANSFORMER_ENC_LAYERS", 6),
        encoder_attention_heads=md("NHEADS", 8),
        encoder_ffn_dim=head("DIM_FEEDFORWARD", 1024),
        decoder_layers=md("DEC_LAYERS", 9),
        decoder_attention_heads=8,
        decoder_ffn_dim=md("DIM_FEEDFORWARD", 2048),
        num_queries=md("NUM_OBJECT_QUERIES", 300),
        encoder_in_features=list(head("DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES", ["res3", "res4", "res5"])),
        num_feature_levels=head("TOTAL_NUM_FEATURE_LEVELS", 4),
        feature_order=head("FEATURE_ORDER", "low2high"),
        common_stride=head("COMMON_STRIDE", 4),
        enforce_input_projection=bool(md("ENFORCE_INPUT_PROJ", False)),
        dropout=float(md("DROPOUT", 0.0)),
        two_stage=bool(md("TWO_STAGE", True)),
        initial_pred=bool(md("INITIAL_PRED", True)),
        initialize_box_type=md("INITIALIZE_BOX_TYPE", "no"),
        learn_tgt=bool(md("LEARN_TGT", False)),
        # The decoder's test reads `~PANOPTIC_ON`, which is always truthy: only SEMANTIC_ON and the loss flag count.
        semantic_ce_loss=semantic_on and bool(md("SEMANTIC_CE_LOSS", False)),
        denoising=dn if dn in ("seg", "det") else "no",
        denoising_noise_scale=float(md("DN_NOISE_SCALE", 0.4)),
        denoising_num=md("DN_NUM", 100),
        stuff_labels=list(stuff_labels),
        panoptic_box_loss=bool(md("PANO_BOX_LOSS", False)),
        class_weight=float(md("CLASS_WEIGHT", 4.0)),
        mask_weight=float(md("MASK_WEIGHT", 5.0)),
        dice_weight=float(md("DICE_WEIGHT", 5.0)),
        box_weight=float(md("BOX_WEIGHT", 5.0)),
        giou_weight=float(md("GIOU_WEIGHT", 2.0)),
        no_object_weight=float(md("NO_OBJECT_WEIGHT", 0.1)),
        cost_class_weight=float(md("COST_CLASS_WEIGHT", 4.0)),
        cost_mask_weight=float(md("COST_MASK_WEIGHT", 5.0)),
        cost_dice_weight=float(md("COST_DICE_WEIGHT", 5.0)),
        cost_box_weight=float(md("COST_BOX_WEIGHT", 5.0)),
        cost_giou_weight=float(md("COST_GIOU_WEIGHT", 2.0)),
        train_num_points=md("TRAIN_NUM_POINTS", 112 * 112),
        oversample_ratio=float(md("OVERSAMPLE_RATIO", 3.0)),
        importance_sample_ratio=float(md("IMPORTANCE_SAMPLE_RATIO", 0.75)),
        deep_supervision=bool(md("DEEP_SUPERVISION", True)),
    )


# Image-processor setting <- official yaml key. A key the yaml lacks keeps the processor's own default.
_PROCESSOR_SETTINGS = {
    "size_divisibility": "MODEL.MaskDINO.SIZE_DIVISIBILITY",
    "image_mean": "MODEL.PIXEL_MEAN",
    "image_std": "MODEL.PIXEL_STD",
    "test_topk_per_image": "TEST.DETECTIONS_PER_IMAGE",
    "object_mask_threshold": "MODEL.MaskDINO.TEST.OBJECT_MASK_THRESHOLD",
    "overlap_threshold": "MODEL.MaskDINO.TEST.OVERLAP_THRESHOLD",
    "panoptic_temperature": "MODEL.MaskDINO.TEST.PANO_TEMPERATURE",
    "panoptic_transform_eval": "MODEL.MaskDINO.TEST.PANO_TRANSFORM_EVAL",
    "focus_on_box": "MODEL.MaskDINO.TEST.TEST_FOUCUS_ON_BOX",
    "semantic_postprocessing_before_inference": "MODEL.MaskDINO.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE",
    "instance_on": "MODEL.MaskDINO.TEST.INSTANCE_ON",
    "panoptic_on": "MODEL.MaskDINO.TEST.PANOPTIC_ON",
    "semantic_on": "MODEL.MaskDINO.TEST.SEMANTIC_ON",
}
_SIZE_SETTINGS = {"shortest_edge": "INPUT.MIN_SIZE_TEST", "longest_edge": "INPUT.MAX_SIZE_TEST"}


def processor_kwargs_from_official(cfg: dict, config: MaskDINOConfig) -> dict:
    """Image-processor settings of the official test path and post-processing, plus the classes from `config`."""
    if _get(cfg, "INPUT.FORMAT", "RGB") != "RGB":
        raise ConversionError(f"INPUT.FORMAT {_get(cfg, 'INPUT.FORMAT')!r}: only RGB models are supported")
    kwargs = {name: _get(cfg, key) for name, key in _PROCESSOR_SETTINGS.items() if _get(cfg, key) is not None}
    size = {name: _get(cfg, key) for name, key in _SIZE_SETTINGS.items() if _get(cfg, key) is not None}
    if size:
        from .image_processing_maskdino import MaskDINOImageProcessor

        kwargs["size"] = {**MaskDINOImageProcessor().size, **size}
    kwargs["num_labels"] = config.num_labels
    kwargs["stuff_labels"] = list(config.stuff_labels)
    return kwargs


def load_official_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an official `.pth` safely: tensors only (`weights_only=True`), model weights under `model` or at top."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle refuses non-tensor objects, or the file is corrupt
        raise ConversionError(
            f"{path} could not be read as a weights-only checkpoint (it holds objects other than tensors, or is "
            f"corrupt); refusing to unpickle it: {error}"
        ) from error
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    if not isinstance(data, dict) or not data:
        raise ConversionError(f"{path} holds no state dict (expected a mapping of names to tensors)")
    not_tensors = [key for key, value in data.items() if not torch.is_tensor(value)]
    if not_tensors:
        raise ConversionError(f"{path} has entries that are not tensors: {not_tensors[:10]}")
    return data


def _resnet_key(rest: str) -> str | None:
    if match := re.fullmatch(r"stem\.conv1\.(weight|norm\.\w+)", rest):
        leaf = match.group(1)
        return "embedder.embedder." + ("convolution.weight" if leaf == "weight" else leaf.replace("norm.", "normalization."))
    if match := re.fullmatch(r"res(\d)\.(\d+)\.(shortcut|conv(\d))\.(weight|norm\.\w+)", rest):
        stage, block, part, conv, leaf = match.groups()
        prefix = f"encoder.stages.{int(stage) - 2}.layers.{block}."
        prefix += "shortcut." if part == "shortcut" else f"layer.{int(conv) - 1}."
        return prefix + ("convolution.weight" if leaf == "weight" else leaf.replace("norm.", "normalization."))
    return None


_SWIN_BLOCK = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.relative_position_bias_table": "attention.relative_position_bias.relative_position_bias_table",
    "attn.proj": "attention.o_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def _swin_keys(rest: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
    """detectron2 Swin keys to Transformers' `SwinBackbone` (the fused qkv projection is split in three)."""
    if match := re.fullmatch(r"patch_embed\.(proj|norm)\.(\w+)", rest):
        part, leaf = match.groups()
        target = "embeddings.patch_embeddings.projection" if part == "proj" else "embeddings.norm"
        return [(f"swin.{target}.{leaf}", tensor)]
    if match := re.fullmatch(r"norm(\d)\.(\w+)", rest):
        return [(f"hidden_states_norms.stage{int(match.group(1)) + 1}.{match.group(2)}", tensor)]
    if match := re.fullmatch(r"layers\.(\d+)\.downsample\.(.+)", rest):
        return [(f"swin.encoder.layers.{match.group(1)}.downsample.{match.group(2)}", tensor)]
    if match := re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)", rest):
        stage, block, inner = match.groups()
        prefix = f"swin.encoder.layers.{stage}.blocks.{block}."
        if inner == "attn.relative_position_index":
            return []  # a constant of the window size, rebuilt by the model
        if qkv := re.fullmatch(r"attn\.qkv\.(weight|bias)", inner):
            return [
                (f"{prefix}attention.{name}.{qkv.group(1)}", part)
                for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0))
            ]
        for official, ours in _SWIN_BLOCK.items():
            if inner == official or inner.startswith(official + "."):
                return [(prefix + ours + inner[len(official):], tensor)]
    return None


def _pixel_decoder_key(rest: str, config: MaskDINOConfig) -> str | None:
    num_backbone_levels = len(config.encoder_in_features)
    num_fpn = len(fpn_feature_names(config))
    if match := re.fullmatch(r"input_proj\.(\d+)\.(\d)\.(\w+)", rest):
        index, sub, leaf = int(match.group(1)), match.group(2), match.group(3)
        if index < num_backbone_levels:
            return f"input_projections.{index}.{sub}.{leaf}"
        return f"extra_projections.{index - num_backbone_levels}.{sub}.{leaf}"
    if rest == "transformer.level_embed":
        return "level_embed"
    if match := re.fullmatch(r"transformer\.encoder\.layers\.(\d+)\.(\w+)\.(.+)", rest):
        layer, module, leaf = match.groups()
        names = {"self_attn": "self_attn", "norm1": "self_attn_layer_norm", "linear1": "fc1", "linear2": "fc2",
                 "norm2": "final_layer_norm"}
        return f"layers.{layer}.{names[module]}.{leaf}" if module in names else None
    if match := re.fullmatch(r"mask_features\.(\w+)", rest):
        return f"mask_projection.{match.group(1)}"
    if match := re.fullmatch(r"(adapter|layer)_(\d+)\.(weight|norm\.\w+)", rest):
        kind, number, leaf = match.groups()
        position = num_fpn - int(number)
        group = "lateral_convs" if kind == "adapter" else "output_convs"
        return f"{group}.{position}." + ("0.weight" if leaf == "weight" else leaf.replace("norm.", "1."))
    return None


def _predictor_key(rest: str) -> str | None:
    direct = ("enc_output.", "enc_output_norm.", "class_embed.", "label_enc.", "mask_embed.", "query_feat.",
              "query_embed.")
    if rest.startswith(direct):
        return rest
    if match := re.fullmatch(r"input_proj\.(\d+)\.(\w+)", rest):
        return f"input_projections.{match.group(1)}.{match.group(2)}"
    if rest.startswith("decoder_norm."):
        return "layer_norm." + rest[len("decoder_norm."):]
    if rest.startswith("_bbox_embed."):
        return "bbox_embed." + rest[len("_bbox_embed."):]
    if rest.startswith("decoder.ref_point_head."):
        return rest[len("decoder."):]
    if match := re.fullmatch(r"decoder\.layers\.(\d+)\.(\w+)\.(.+)", rest):
        layer, module, leaf = match.groups()
        names = {"cross_attn": "encoder_attn", "norm1": "encoder_attn_layer_norm", "self_attn": "self_attn",
                 "norm2": "self_attn_layer_norm", "linear1": "fc1", "linear2": "fc2", "norm3": "final_layer_norm"}
        return f"layers.{layer}.{names[module]}.{leaf}" if module in names else None
    return None


def convert_state_dict(
    official: dict[str, torch.Tensor], config: MaskDINOConfig, prefix: str = "model."
) -> dict[str, torch.Tensor]:
    """Map every official key to ours. Aliases of shared modules must hold equal tensors and become one key."""
    converted: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    canonical: dict[str, str] = {}
    for key, tensor in official.items():
        if key in _DROPPED or key.endswith("num_batches_tracked"):
            continue
        source = key
        for pattern, replacement in _ALIASES:
            source = pattern.sub(replacement, source)
        if source != key:
            if source in official and not tensor.is_meta and not torch.equal(official[source], tensor):
                raise ConversionError(f"{key} should alias {source} (a shared module) but their values differ")
            canonical[key] = source
            if source in official:
                continue
        targets: list[tuple[str, torch.Tensor]] | None = None
        if source.startswith("backbone."):
            rest = source[len("backbone."):]
            if (ours := _resnet_key(rest)) is not None:
                targets = [("backbone." + ours, tensor)]
            elif (swin := _swin_keys(rest, tensor)) is not None:
                targets = [("backbone." + name, value) for name, value in swin]
        elif source.startswith("sem_seg_head.pixel_decoder."):
            ours = _pixel_decoder_key(source[len("sem_seg_head.pixel_decoder."):], config)
            targets = None if ours is None else [("pixel_decoder." + ours, tensor)]
        elif source.startswith("sem_seg_head.predictor."):
            ours = _predictor_key(source[len("sem_seg_head.predictor."):])
            targets = None if ours is None else [("decoder." + ours, tensor)]
        if targets is None:
            unmapped.append(key)
            continue
        for name, value in targets:
            converted[prefix + name] = value.contiguous()
    if unmapped:
        raise ConversionError(f"{len(unmapped)} official keys have no counterpart: {_preview(unmapped)}")
    return converted


def check_against_model(converted: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Refuse a conversion that leaves model keys missing or disagrees in shape."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    mismatched = [
        f"{key}: checkpoint {tuple(converted[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(converted))
        if converted[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        raise ConversionError(
            "the checkpoint does not fit the model built from its config (is it for a different config?): "
            f"{len(missing)} missing {_preview(missing)}, {len(unexpected)} unmapped {_preview(unexpected)}, "
            f"{len(mismatched)} shape mismatches {_preview(mismatched)}"
        )


def _preview(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}]"


def model_from_official(official: dict[str, torch.Tensor], config: MaskDINOConfig):
    """The model of `config` holding the official weights, after checking every key and shape (see
    `check_against_model`). Weights are not randomly initialised first: every parameter comes from the checkpoint."""
    from transformers.initialization import no_init_weights

    from .modeling_maskdino import MaskDINOForUniversalSegmentation

    converted = convert_state_dict(official, config)
    with torch.device("meta"):
        skeleton = MaskDINOForUniversalSegmentation(config)
    check_against_model(converted, skeleton)
    with no_init_weights():
        model = MaskDINOForUniversalSegmentation(config)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def convert_checkpoint(
    checkpoint_path: str | Path,
    config_path: str | Path,
    output_dir: str | Path | None = None,
    stuff_labels: list[int] | None = None,
    id2label: dict[int, str] | None = None,
):
    """Convert an official checkpoint; returns `(model, processor)` and saves both to `output_dir` when given."""
    from .image_processing_maskdino import MaskDINOImageProcessor

    cfg = load_official_config(config_path)
    config = config_from_official(cfg, stuff_labels=stuff_labels, id2label=id2label)
    model = model_from_official(load_official_checkpoint(checkpoint_path), config)
    processor = MaskDINOImageProcessor(**processor_kwargs_from_official(cfg, config))
    if output_dir is not None:
        output_dir = Path(output_dir)
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
    return model, processor


__all__ = [
    "ConversionError",
    "check_against_model",
    "check_official_keys",
    "config_from_official",
    "convert_checkpoint",
    "convert_state_dict",
    "load_official_checkpoint",
    "load_official_config",
    "model_from_official",
    "processor_kwargs_from_official",
]
