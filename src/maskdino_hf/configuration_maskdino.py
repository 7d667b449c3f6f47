"""Configuration of Mask DINO: every behaviour switch of the official model as a typed field.

Defaults are those of the official R50 COCO instance configuration with hidden size 256, encoder FFN 2048,
three backbone scales plus one downsampled level (``maskdino_R50_bs16_50ep_3s_dowsample1_2048.yaml``).
"""

import functools
import importlib
import math

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import logging

INITIALIZE_BOX_TYPES = ("no", "bitmask", "mask2box")
FEATURE_ORDERS = ("low2high", "high2low")
DENOISING_TYPES = ("seg", "det", "no")
BACKBONE_FEATURES = ("res2", "res3", "res4", "res5")
# Post-processing settings that configs written before the image processor owned them still carry.
LEGACY_POSTPROCESSING_FIELDS = (
    "instance_on",
    "panoptic_on",
    "semantic_on",
    "test_topk_per_image",
    "object_mask_threshold",
    "overlap_threshold",
    "panoptic_temperature",
    "panoptic_transform_eval",
    "focus_on_box",
    "semantic_postprocessing_before_inference",
    "size_divisibility",
)

COMMON_STRIDES = (4, 8, 16, 32)
ACTIVATIONS = ("relu", "gelu")

# Allowed ranges of the numeric fields, checked by `validate_allowed_values` (the types by `@strict`).
_POSITIVE = (
    "hidden_size", "feature_size", "mask_feature_size", "encoder_attention_heads", "encoder_ffn_dim",
    "encoder_n_points", "decoder_layers", "decoder_attention_heads", "decoder_ffn_dim", "decoder_n_points",
    "num_queries", "num_feature_levels", "train_num_points", "layer_norm_eps",
)
_NON_NEGATIVE = (
    "encoder_layers", "denoising_num", "denoising_noise_scale", "class_weight", "mask_weight",
    "dice_weight", "box_weight", "giou_weight", "no_object_weight", "cost_class_weight", "cost_mask_weight",
    "cost_dice_weight", "cost_box_weight", "cost_giou_weight", "focal_gamma", "init_std",
)
_PROBABILITIES = ("focal_alpha", "importance_sample_ratio")

logger = logging.get_logger(__name__)


def _plain_validation_errors(cls):
    """Make `@strict`'s failures plain `TypeError` / `ValueError`.

    `@strict` wraps a wrong type (`TypeError`) or a refused value (`ValueError`) in a `StrictDataclassError`, which
    is neither; callers catching `ValueError`/`TypeError` would miss it. The original error, which names the field,
    the value and what is allowed, is raised instead (construction, `from_dict`/`from_pretrained`, assignment and
    `validate()`)."""

    def plain(method):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            except StrictDataclassError as error:
                if isinstance(error.__cause__, (TypeError, ValueError)):
                    raise error.__cause__ from None
                raise

        return wrapper

    for name in ("__init__", "__setattr__", "validate"):
        setattr(cls, name, plain(getattr(cls, name)))
    return cls


@_plain_validation_errors
@strict
class MaskDINOConfig(PreTrainedConfig):
    r"""
    Configuration of [`MaskDINOModel`] and [`MaskDINOForUniversalSegmentation`].

    Model:
        backbone_config: backbone given to `load_backbone` (`AutoBackbone`); a ResNet-50 with the official
            detectron2 layout (stride in the 3x3 conv, frozen batch norm) by default. Its `out_features` must be
            `stage1..stage4` (ResNet/Swin) so that they map to `res2..res5`.
        hidden_size: width of the decoder and of the query-selection heads; a multiple of 4 divisible by
            `decoder_attention_heads`. The sine query embedding takes `hidden_size // 2` features per box coordinate
            (the official 128 at 256).
        feature_size: width of the pixel decoder (`SEM_SEG_HEAD.CONVS_DIM`).
        mask_feature_size: width of the per-pixel embedding (`SEM_SEG_HEAD.MASK_DIM`).
        encoder_layers / encoder_attention_heads / encoder_ffn_dim / encoder_n_points: the multi-scale deformable
            encoder of the pixel decoder.
        decoder_layers / decoder_attention_heads / decoder_ffn_dim / decoder_n_points: the DINO decoder. The
            official decoder always uses 8 heads whatever `NHEADS` says; keep 8 for official checkpoints.
        num_queries: number of selected queries (`NUM_OBJECT_QUERIES`).
        encoder_in_features: backbone maps fed to the deformable encoder.
        num_feature_levels: total encoder levels, the extra ones made by strided convs (`TOTAL_NUM_FEATURE_LEVELS`).
        feature_order: `low2high` puts the finest map first in the encoder, `high2low` the coarsest.
        common_stride: stride of the mask features (4).
        two_stage: unified query selection from encoder tokens; otherwise learned queries.
        initial_pred: predict from the selected queries before the first decoder layer.
        initialize_box_type: mask-enhanced box initialisation, `mask2box`, `bitmask` or `no`.
        learn_tgt: learned content queries instead of the selected encoder tokens.
        semantic_ce_loss: softmax classifier with a no-object logit (semantic models).
        denoising: unified denoising type `seg`, `det` or `no`; `denoising_noise_scale`, `denoising_num`.
        stuff_labels: class ids that are "stuff" (no instances); used by panoptic inference and decoupled box loss.
        panoptic_box_loss: decoupled box prediction: box losses skip stuff classes.
    Loss (see `loss_maskdino.py`): `class_weight`, `mask_weight`, `dice_weight`, `box_weight`, `giou_weight`,
        `no_object_weight`, the matcher's `cost_*` weights, `train_num_points`, `oversample_ratio`,
        `importance_sample_ratio`, `focal_alpha`, `focal_gamma`.
    Post-processing settings (tasks, thresholds, top-k, padding multiple) belong to [`MaskDINOImageProcessor`];
    the same names in an older `config.json` are accepted and dropped (`LEGACY_POSTPROCESSING_FIELDS`).

    Every field is validated on construction, `from_pretrained`/`from_dict` and assignment: a wrong type (a string
    for a number, a bool for an int) raises `TypeError`; an out-of-range value or fields that disagree raise
    `ValueError`, naming the field, the value and what is allowed.
    """

    model_type = "maskdino"
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="resnet",
            init_kwargs={
                "embedding_size": 64,
                "hidden_sizes": [256, 512, 1024, 2048],
                "depths": [3, 4, 6, 3],
                "layer_type": "bottleneck",
                "downsample_in_bottleneck": False,
                "out_features": ["stage1", "stage2", "stage3", "stage4"],
            },
        ),
    }
    attribute_map = {"d_model": "hidden_size"}

    backbone_config: dict | PreTrainedConfig | None = None
    freeze_backbone_batch_norms: bool = True

    hidden_size: int = 256
    feature_size: int = 256
    mask_feature_size: int = 256
    encoder_layers: int = 6
    encoder_attention_heads: int = 8
    encoder_ffn_dim: int = 2048
    encoder_n_points: int = 4
    decoder_layers: int = 9
    decoder_attention_heads: int = 8
    decoder_ffn_dim: int = 2048
    decoder_n_points: int = 4
    num_queries: int = 300
    encoder_in_features: list[str] | tuple[str, ...] = ("res3", "res4", "res5")
    num_feature_levels: int = 4
    feature_order: str = "low2high"
    common_stride: int = 4
    enforce_input_projection: bool = False
    dropout: float | int = 0.0
    activation_function: str = "relu"
    layer_norm_eps: float | int = 1e-5

    two_stage: bool = True
    initial_pred: bool = True
    initialize_box_type: str = "mask2box"
    learn_tgt: bool = False
    semantic_ce_loss: bool = False

    denoising: str = "seg"
    denoising_noise_scale: float | int = 0.4
    denoising_num: int = 100

    stuff_labels: list[int] | tuple[int, ...] = ()
    panoptic_box_loss: bool = False

    class_weight: float | int = 4.0
    mask_weight: float | int = 5.0
    dice_weight: float | int = 5.0
    box_weight: float | int = 5.0
    giou_weight: float | int = 2.0
    no_object_weight: float | int = 0.1
    cost_class_weight: float | int = 4.0
    cost_mask_weight: float | int = 5.0
    cost_dice_weight: float | int = 5.0
    cost_box_weight: float | int = 5.0
    cost_giou_weight: float | int = 2.0
    focal_alpha: float | int = 0.25
    focal_gamma: float | int = 2.0
    train_num_points: int = 112 * 112
    oversample_ratio: float | int = 3.0
    importance_sample_ratio: float | int = 0.75
    deep_supervision: bool = True

    init_std: float | int = 0.02

    def __post_init__(self, **kwargs):
        dropped = [name for name in LEGACY_POSTPROCESSING_FIELDS if name in kwargs]
        for name in dropped:
            kwargs.pop(name)
        if dropped:
            logger.debug(f"MaskDINOConfig ignores {dropped}: post-processing settings live in the image processor")
        super().__post_init__(**kwargs)
        self.encoder_in_features = list(self.encoder_in_features)
        self.stuff_labels = sorted(int(label) for label in self.stuff_labels)

    def validate_allowed_values(self):
        """Refuse out-of-range numbers and unknown names field by field (`@strict` has checked the types)."""
        for name in _POSITIVE + _NON_NEGATIVE + _PROBABILITIES + ("dropout", "oversample_ratio"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in _NON_NEGATIVE:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative (0 or more), got {getattr(self, name)}")
        for name in _PROBABILITIES:
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.oversample_ratio < 1:
            raise ValueError(
                f"oversample_ratio must be at least 1 (points sampled per kept point), got {self.oversample_ratio}"
            )
        if self.common_stride not in COMMON_STRIDES:
            raise ValueError(f"common_stride must be one of {COMMON_STRIDES}, got {self.common_stride}")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"activation_function must be one of {ACTIVATIONS}, got {self.activation_function!r}")
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be positive, got {self.num_labels} (id2label={self.id2label})")

    def validate_architecture(self):
        """Refuse values the model cannot run with, naming the field and what is allowed."""
        if self.initialize_box_type not in INITIALIZE_BOX_TYPES:
            raise ValueError(
                f"initialize_box_type must be one of {INITIALIZE_BOX_TYPES}, got {self.initialize_box_type!r}"
            )
        if self.feature_order not in FEATURE_ORDERS:
            raise ValueError(f"feature_order must be one of {FEATURE_ORDERS}, got {self.feature_order!r}")
        if self.denoising not in DENOISING_TYPES:
            raise ValueError(f"denoising must be one of {DENOISING_TYPES}, got {self.denoising!r}")
        unknown = [name for name in self.encoder_in_features if name not in BACKBONE_FEATURES]
        if unknown or not self.encoder_in_features:
            raise ValueError(
                f"encoder_in_features must be a non-empty subset of {BACKBONE_FEATURES}, got {self.encoder_in_features}"
            )
        if self.num_feature_levels < len(self.encoder_in_features):
            raise ValueError(
                f"num_feature_levels ({self.num_feature_levels}) must be at least the number of encoder_in_features "
                f"({len(self.encoder_in_features)})"
            )
        if self.hidden_size % 4:
            raise ValueError(
                f"hidden_size must be a multiple of 4 (the sine query embedding has hidden_size / 2 sin-cos features "
                f"per box coordinate), got {self.hidden_size}"
            )
        for name in ("feature_size", "hidden_size"):
            heads = self.encoder_attention_heads if name == "feature_size" else self.decoder_attention_heads
            if getattr(self, name) % heads:
                raise ValueError(f"{name} ({getattr(self, name)}) must be divisible by its number of heads ({heads})")
        if self.feature_size % 32:
            raise ValueError(f"feature_size must be a multiple of 32 (GroupNorm(32)), got {self.feature_size}")
        if self.initialize_box_type != "no" and not (self.two_stage and self.initial_pred):
            raise ValueError(
                "initialize_box_type "
                f"{self.initialize_box_type!r} needs two_stage=True and initial_pred=True (got two_stage="
                f"{self.two_stage}, initial_pred={self.initial_pred})"
            )
        if not self.two_stage and self.initialize_box_type != "no":
            raise ValueError("learned queries (two_stage=False) need initialize_box_type='no'")
        if self.num_queries < 1 or self.decoder_layers < 1:
            raise ValueError("num_queries and decoder_layers must be positive")
        bad_stuff = [label for label in self.stuff_labels if not 0 <= label < self.num_labels]
        if bad_stuff:
            raise ValueError(f"stuff_labels {bad_stuff} are outside 0..{self.num_labels - 1} (num_labels)")

    @classmethod
    def from_release(cls, name: str) -> "MaskDINOConfig":
        """The configuration of a released official checkpoint, e.g. `maskdino-r50-coco-instance` (see
        `maskdino_hf.releases.RELEASES`). Imported by name so that the remote-code copy of this file needs no more."""
        return importlib.import_module("maskdino_hf.releases").release_config(name)

    def validate_consistency(self):
        """Refuse fields that disagree with each other, naming both sides."""
        if len(set(self.encoder_in_features)) != len(self.encoder_in_features):
            raise ValueError(f"encoder_in_features has duplicates: {self.encoder_in_features}")
        out_features = getattr(self.backbone_config, "out_features", None)
        if out_features is not None and len(out_features) != len(BACKBONE_FEATURES):
            raise ValueError(
                f"backbone_config.out_features must name 4 maps (strides 4, 8, 16, 32 = {BACKBONE_FEATURES}) from "
                f"which encoder_in_features and the mask features are taken, got {out_features}"
            )
        if self.denoising != "no" and self.denoising_num < 1:
            raise ValueError(
                f"denoising={self.denoising!r} needs denoising_num >= 1 denoising queries, got {self.denoising_num}; "
                "set denoising='no' to train without denoising"
            )
        if len(set(self.stuff_labels)) != len(self.stuff_labels):
            raise ValueError(f"stuff_labels has duplicates: {self.stuff_labels}")
        ids = sorted(int(key) for key in self.id2label)
        if ids != list(range(len(ids))):
            raise ValueError(f"id2label keys must be the class ids 0..{len(ids) - 1}, got {ids}")

    @property
    def num_classifier_outputs(self) -> int:
        """Width of the class head: one extra no-object logit for the softmax (semantic) classifier."""
        return self.num_labels + 1 if self.semantic_ce_loss else self.num_labels

    @property
    def thing_labels(self) -> list[int]:
        stuff = set(self.stuff_labels)
        return [label for label in range(self.num_labels) if label not in stuff]


__all__ = ["MaskDINOConfig"]
