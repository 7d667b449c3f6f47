"""Mask DINO: a unified DETR-style detector and segmenter (Li et al., CVPR 2023).

Parts, in the order of the paper and of the forward pass:
- backbone through `load_backbone` (`AutoBackbone`: ResNet, Swin or timm);
- pixel decoder (`MaskDINOPixelDecoder`): multi-scale deformable-attention encoder plus an FPN-style 1/4-scale
  per-pixel embedding (the mask features);
- unified query selection (`MaskDINODecoder.query_selection`): the top-k encoder tokens predict class, box and
  mask, and become the decoder's queries;
- mask-enhanced box initialisation (`mask_enhanced_box_init`): the selected queries' masks give the initial anchors;
- unified denoising (`MaskDINODecoder.denoising_queries`): noised ground-truth labels and boxes in groups, which
  also reconstruct masks;
- DINO decoder with deformable cross-attention and look-forward-twice box refinement; every layer predicts a class,
  a box and a mask (query embedding · per-pixel embedding).
The loss (hybrid matching and the criterion) lives in `loss_maskdino.py`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, cached_property

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.image_transforms import corners_to_center_format
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.deformable_detr.modeling_deformable_detr import (
    DeformableDetrFrozenBatchNorm2d,
    DeformableDetrMLPPredictionHead,
    inverse_sigmoid,
)
from transformers.models.mask2former.modeling_mask2former import Mask2FormerSinePositionEmbedding
from transformers.models.resnet.modeling_resnet import (
    ResNetBasicLayer,
    ResNetBottleNeckLayer,
    ResNetConvLayer,
    ResNetShortCut,
)
from transformers.utils import ModelOutput
from transformers.backbone_utils import load_backbone

from .configuration_maskdino import BACKBONE_FEATURES, MaskDINOConfig
from .loss_maskdino import MaskDINOLoss
from .ms_deform_attn import MaskDINOMultiscaleDeformableAttention, sampling_dtype
from .random_source import MaskDINORandomSource


@dataclass
class MaskDINOQuerySelectionOutput(ModelOutput):
    r"""
    Unified query selection (two-stage): every encoder token predicts a class and a box, the `num_queries` best
    become the decoder's queries. Q = num_queries, C = classifier width, (h, w) = 1/4 of the padded input.

    enc_outputs_class (`torch.Tensor` of shape (batch, tokens, C)): class logits of every encoder token.
    enc_outputs_coord_logits (`torch.Tensor` of shape (batch, tokens, 4)): their boxes in logit space (+inf for
        proposals touching the border); `None` unless asked for (`output_proposal_boxes`).
    enc_topk_indices (`torch.Tensor` of shape (batch, Q)): the selected tokens, by descending score.
    enc_topk_logits (`torch.Tensor` of shape (batch, Q, C)): class logits of the selected proposals.
    enc_topk_boxes (`torch.Tensor` of shape (batch, Q, 4)): their boxes (sigmoid cxcywh).
    enc_topk_masks (`torch.Tensor` of shape (batch, Q, h, w)): their mask logits.
    enc_topk_mask_embeddings (`torch.Tensor` of shape (batch, Q, mask_feature_size)): their mask embeddings, the
        factor of `enc_topk_masks` beside the per-pixel embedding.
    enc_topk_hidden_states (`torch.Tensor` of shape (batch, Q, hidden)): their encoder states, the content queries.
    enc_topk_coord_logits (`torch.Tensor` of shape (batch, Q, 4)): their boxes in logit space, the anchors.
    """

    enc_outputs_class: torch.Tensor | None = None
    enc_outputs_coord_logits: torch.Tensor | None = None
    enc_topk_indices: torch.Tensor | None = None
    enc_topk_logits: torch.Tensor | None = None
    enc_topk_boxes: torch.Tensor | None = None
    enc_topk_masks: torch.Tensor | None = None
    enc_topk_mask_embeddings: torch.Tensor | None = None
    enc_topk_hidden_states: torch.Tensor | None = None
    enc_topk_coord_logits: torch.Tensor | None = None


@dataclass
class MaskDINODenoisingOutput(ModelOutput):
    r"""
    Unified denoising (training only): the ground-truth labels and boxes of the batch, noised, in `num_groups` groups
    of `pad_size / num_groups` queries (the largest target count of the batch), placed before the matching queries.
    Denoising query `g * pad_size / num_groups + j` of image b reconstructs target j of image b. T = targets of the
    whole batch, N = pad_size + num_queries.

    queries (`torch.Tensor` of shape (batch, pad_size, hidden)): content queries, the embeddings of noised labels.
    reference_points (`torch.Tensor` of shape (batch, pad_size, 4)): their anchors, noised boxes in logit space.
    self_attn_mask (`torch.Tensor` of shape (N, N)): decoder self-attention mask, True = blocked: matching queries
        do not see denoising ones, a group sees only itself and the matching queries.
    known_labels / known_boxes (`torch.Tensor` of shape (num_groups * T,) / (num_groups * T, 4)): the labels and
        boxes before noise, group after group (the official `known_lbs_bboxes`).
    known_indices (`torch.Tensor` of shape (num_groups * T,)): target index within the batch of each of them.
    batch_indices (`torch.Tensor` of shape (T,)): image of each target.
    query_indices (`torch.Tensor` of shape (num_groups * T,)): the denoising query of each of them.
    num_groups (`int`): the number of groups (the official `scalar`). pad_size (`int`): denoising queries per image.
    class_logits / mask_logits / mask_embeddings / box_predictions (`tuple[torch.Tensor]`): the denoising queries'
        predictions of every prediction layer, (batch, pad_size, ...), aligned with the model output's fields of the
        same names.
    """

    queries: torch.Tensor | None = None
    reference_points: torch.Tensor | None = None
    self_attn_mask: torch.Tensor | None = None
    known_labels: torch.Tensor | None = None
    known_boxes: torch.Tensor | None = None
    known_indices: torch.Tensor | None = None
    batch_indices: torch.Tensor | None = None
    query_indices: torch.Tensor | None = None
    num_groups: int | None = None
    pad_size: int | None = None
    class_logits: tuple[torch.Tensor, ...] | None = None
    mask_logits: tuple[torch.Tensor | None, ...] | None = None
    mask_embeddings: tuple[torch.Tensor, ...] | None = None
    box_predictions: tuple[torch.Tensor, ...] | None = None


@dataclass
class MaskDINODecoderOutput(ModelOutput):
    r"""
    Outputs of [`MaskDINODecoder`], field for field those of [`MaskDINOModelOutput`] (see there), with the query
    selection grouped in `query_selection` ([`MaskDINOQuerySelectionOutput`], `None` without two-stage).
    """

    intermediate_hidden_states: torch.Tensor | None = None
    intermediate_reference_points: torch.Tensor | None = None
    init_reference_points: torch.Tensor | None = None
    class_logits: tuple[torch.Tensor, ...] | None = None
    mask_logits: tuple[torch.Tensor | None, ...] | None = None
    mask_embeddings: tuple[torch.Tensor, ...] | None = None
    box_predictions: tuple[torch.Tensor, ...] | None = None
    query_selection: MaskDINOQuerySelectionOutput | None = None
    denoising_outputs: MaskDINODenoisingOutput | None = None
    decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    decoder_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class MaskDINOModelOutput(ModelOutput):
    r"""
    Outputs of [`MaskDINOModel`]. Q = queries (denoising queries excluded), C = classifier width, L = decoder layers,
    (h, w) = 1/4 of the padded input.

    backbone_features (`tuple[torch.Tensor]`): the backbone maps res2..res5, each (batch, channels, H/s, W/s).
    multi_scale_features (`tuple[torch.Tensor]`): the pixel-decoder encoder output per level (encoder level order),
        each (batch, feature_size, H_l, W_l).
    mask_features (`torch.Tensor` of shape (batch, mask_feature_size, h, w)): the per-pixel embedding.
    enc_outputs_class (`torch.Tensor` of shape (batch, tokens, C)): query-selection class logits of every encoder
        token (decoder level order); `None` without two-stage.
    enc_outputs_coord_logits (`torch.Tensor` of shape (batch, tokens, 4)): their boxes in logit space; `None` with
        `output_proposal_boxes=False`.
    enc_topk_indices (`torch.Tensor` of shape (batch, Q)): the selected tokens, by descending score.
    enc_topk_logits (`torch.Tensor` of shape (batch, Q, C)): class logits of the selected proposals.
    enc_topk_boxes (`torch.Tensor` of shape (batch, Q, 4)): their boxes (sigmoid cxcywh, padded-input frame).
    enc_topk_masks (`torch.Tensor` of shape (batch, Q, h, w)): their mask logits.
    enc_topk_mask_embeddings (`torch.Tensor` of shape (batch, Q, mask_feature_size)): their mask embeddings (see
        `mask_embeddings`).
    init_reference_points (`torch.Tensor` of shape (batch, Q, 4)): initial anchors in logit space (after
        mask-enhanced box initialisation when enabled).
    intermediate_hidden_states (`torch.Tensor` of shape (batch, L, Q, hidden)): normed output of every layer.
    intermediate_reference_points (`torch.Tensor` of shape (batch, L + 1, Q, 4)): sigmoid anchors entering each layer
        and after the last one.
    class_logits (`tuple[torch.Tensor]`): L + 1 (with `initial_pred`) tensors (batch, Q, C), initial prediction first.
    mask_logits (`tuple[torch.Tensor | None]`): the same layers' mask logits (batch, Q, h, w); `None` for the
        intermediate layers at inference unless `output_auxiliary_masks=True`.
    mask_embeddings (`tuple[torch.Tensor]`, *optional*): the same layers' mask embeddings (batch, Q,
        mask_feature_size), whose product with `mask_features` is `mask_logits`. Returned with the auxiliary masks
        (training, or `output_auxiliary_masks=True`): the loss forms the masks of the matched queries alone from them.
    box_predictions (`tuple[torch.Tensor]`): the same layers' boxes (batch, Q, 4), sigmoid cxcywh.
    denoising_outputs (`MaskDINODenoisingOutput`, *optional*): the denoising queries, their predictions per layer
        and how they map to the ground truth (training with targets only).
    encoder_hidden_states (`tuple[torch.Tensor]`, *optional*): with `output_hidden_states=True`, the deformable
        encoder's input and every encoder layer's output, `encoder_layers + 1` tensors (batch, tokens, feature_size)
        over all levels (encoder level order).
    encoder_attentions (`tuple[torch.Tensor]`, *optional*): with `output_attentions=True`, every encoder layer's
        deformable attention weights (batch, tokens, encoder_attention_heads, num_feature_levels, encoder_n_points).
    decoder_hidden_states (`tuple[torch.Tensor]`, *optional*): with `output_hidden_states=True`, the decoder's input
        queries and every decoder layer's (un-normed) output, `decoder_layers + 1` tensors (batch, N, hidden), where
        N = Q, or denoising queries first plus Q when training with denoising.
    decoder_attentions (`tuple[torch.Tensor]`, *optional*): with `output_attentions=True`, every decoder layer's
        query self-attention weights (batch, decoder_attention_heads, N, N).
    cross_attentions (`tuple[torch.Tensor]`, *optional*): with `output_attentions=True`, every decoder layer's
        deformable cross-attention weights (batch, N, decoder_attention_heads, num_feature_levels, decoder_n_points).
    """

    backbone_features: tuple[torch.Tensor, ...] | None = None
    multi_scale_features: tuple[torch.Tensor, ...] | None = None
    mask_features: torch.Tensor | None = None
    enc_outputs_class: torch.Tensor | None = None
    enc_outputs_coord_logits: torch.Tensor | None = None
    enc_topk_indices: torch.Tensor | None = None
    enc_topk_logits: torch.Tensor | None = None
    enc_topk_boxes: torch.Tensor | None = None
    enc_topk_masks: torch.Tensor | None = None
    enc_topk_mask_embeddings: torch.Tensor | None = None
    init_reference_points: torch.Tensor | None = None
    intermediate_hidden_states: torch.Tensor | None = None
    intermediate_reference_points: torch.Tensor | None = None
    class_logits: tuple[torch.Tensor, ...] | None = None
    mask_logits: tuple[torch.Tensor | None, ...] | None = None
    mask_embeddings: tuple[torch.Tensor, ...] | None = None
    box_predictions: tuple[torch.Tensor, ...] | None = None
    denoising_outputs: MaskDINODenoisingOutput | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    encoder_attentions: tuple[torch.Tensor, ...] | None = None
    decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    decoder_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class MaskDINOForUniversalSegmentationOutput(ModelOutput):
    r"""
    Outputs of [`MaskDINOForUniversalSegmentation`].

    loss (`torch.Tensor`, *optional*): total weighted loss, when labels are given.
    loss_dict (`dict[str, torch.Tensor]`, *optional*): every weighted loss term by its official name.
    class_queries_logits (`torch.Tensor` of shape (batch, queries, C)): final-layer class logits (C = num_labels,
        plus one no-object logit for `semantic_ce_loss` models).
    masks_queries_logits (`torch.Tensor` of shape (batch, queries, H/4, W/4)): final-layer mask logits at 1/4 of the
        padded input.
    pred_boxes (`torch.Tensor` of shape (batch, queries, 4)): final-layer boxes, sigmoid (cx, cy, w, h) normalised
        to the padded input.
    auxiliary_outputs (`list[dict]`): one dict (`class_queries_logits`, `masks_queries_logits`, `pred_boxes`) per
        earlier layer, the initial prediction first.
    enc_topk_logits / enc_topk_boxes / enc_topk_masks: the encoder's selected proposals (see `MaskDINOModelOutput`).
    mask_features (`torch.Tensor`): the per-pixel embedding.
    intermediate_hidden_states (`torch.Tensor`, *optional*): decoder states, when `output_hidden_states=True`.
    backbone_features / multi_scale_features (*optional*): when `output_hidden_states=True`.
    encoder_hidden_states / decoder_hidden_states (*optional*): per-layer states, when `output_hidden_states=True`;
    encoder_attentions / decoder_attentions / cross_attentions (*optional*): per-layer attention weights, when
        `output_attentions=True` (see `MaskDINOModelOutput`).
    """

    loss: torch.Tensor | None = None
    loss_dict: dict | None = None
    class_queries_logits: torch.Tensor | None = None
    masks_queries_logits: torch.Tensor | None = None
    pred_boxes: torch.Tensor | None = None
    auxiliary_outputs: list[dict] | None = None
    enc_topk_logits: torch.Tensor | None = None
    enc_topk_boxes: torch.Tensor | None = None
    enc_topk_masks: torch.Tensor | None = None
    mask_features: torch.Tensor | None = None
    intermediate_hidden_states: torch.Tensor | None = None
    backbone_features: tuple[torch.Tensor, ...] | None = None
    multi_scale_features: tuple[torch.Tensor, ...] | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    encoder_attentions: tuple[torch.Tensor, ...] | None = None
    decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    decoder_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None


def box_sine_embedding(boxes: torch.Tensor, num_features: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine embedding of normalised (cx, cy, w, h) boxes: `num_features` per coordinate in the order (y, x, w, h).
    The decoder takes `hidden_size // 2` (128 for the official 256), so the four coordinates fill `2 * hidden_size`."""
    dim_t = torch.arange(num_features, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_features)
    scaled = boxes.float()[..., None] * (2 * math.pi) / dim_t
    embedded = torch.stack((scaled[..., 0::2].sin(), scaled[..., 1::2].cos()), dim=-1).flatten(-2)
    x_embed, y_embed, w_embed, h_embed = embedded.unbind(-2)
    return torch.cat((y_embed, x_embed, w_embed, h_embed), dim=-1).to(boxes.dtype)


def mask_boxes(masks: torch.Tensor, box_type: str) -> torch.Tensor:
    """Absolute (x1, y1, x2, y2) boxes around binary masks (..., H, W), vectorised.

    `mask2box` takes the last pixel index as x2/y2 (empty masks: x1 = y1 = 1e8, x2 = y2 = 0); `bitmask` adds one to
    the maxima (empty masks: all zeros). These are the official model's two rules.
    """
    return _projection_boxes(masks.any(dim=-2), masks.any(dim=-1), box_type)


def _projection_boxes(cols: torch.Tensor, rows: torch.Tensor, box_type: str) -> torch.Tensor:
    """`mask_boxes` from the masks' projections: which columns (..., W) and rows (..., H) hold a mask pixel."""
    width, height = cols.shape[-1], rows.shape[-1]
    x_index = torch.arange(width, device=cols.device, dtype=torch.float32)
    y_index = torch.arange(height, device=rows.device, dtype=torch.float32)
    x_max = torch.where(cols, x_index, 0.0).amax(-1)
    y_max = torch.where(rows, y_index, 0.0).amax(-1)
    if box_type == "mask2box":
        x_min = torch.where(cols, x_index, 1e8).amin(-1)
        y_min = torch.where(rows, y_index, 1e8).amin(-1)
        return torch.stack([x_min, y_min, x_max, y_max], dim=-1)
    if box_type == "bitmask":
        x_min = torch.where(cols, x_index, float(width)).amin(-1)
        y_min = torch.where(rows, y_index, float(height)).amin(-1)
        boxes = torch.stack([x_min, y_min, x_max + 1, y_max + 1], dim=-1)
        return torch.where(cols.any(-1, keepdim=True), boxes, 0.0)
    raise ValueError(f"unknown initialize_box_type {box_type!r}")


def mask_enhanced_box_init(mask_logits: torch.Tensor, box_type: str) -> torch.Tensor:
    """Mask-enhanced anchor box initialisation: boxes around the selected queries' masks (logits > 0), as
    normalised (cx, cy, w, h) in logit space."""
    height, width = mask_logits.shape[-2:]
    logits = mask_logits.detach()
    # A column or row holds a pixel with logit > 0 exactly when its maximum is > 0: two max-reductions of the logits
    # cost a sixth of thresholding every pixel and reducing the binary masks twice (300 masks at 200x272 on CPU).
    boxes = _projection_boxes(logits.amax(-2) > 0, logits.amax(-1) > 0, box_type)
    scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=mask_logits.device)
    return inverse_sigmoid(corners_to_center_format(boxes) / scale).to(mask_logits.dtype)


def cell_centers(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(x, y) centres of the cells of a ``height`` x ``width`` map, normalised to (0, 1), row by row: (tokens, 2)
    float32. ``arange`` rather than ``linspace``, so that export keeps symbolic sizes symbolic."""
    grid_y, grid_x = torch.meshgrid(
        torch.arange(height, dtype=torch.float32, device=device),
        torch.arange(width, dtype=torch.float32, device=device),
        indexing="ij",
    )
    return torch.stack([(grid_x + 0.5) / width, (grid_y + 0.5) / height], dim=-1).reshape(-1, 2)


def encoder_output_proposals(
    memory: torch.Tensor, spatial_shapes_list: list[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-stage anchors: one proposal per encoder token, centred on its cell, size 0.05 * 2**level (decoder level
    index, so the first (coarsest) level gets the smallest). Proposals touching the border (any coordinate outside
    (0.01, 0.99)) become +inf and their token is zeroed. Returns (memory, proposals in logit space).
    Not Deformable DETR's `gen_encoder_output_proposals`: that is a model method that also masks padding and applies
    the model's own output projection, while Mask DINO attends to padding and projects afterwards."""
    proposals = []
    for level, (height, width) in enumerate(spatial_shapes_list):
        centers = cell_centers(height, width, memory.device)
        sizes = torch.full_like(centers, 0.05 * (2.0**level))
        proposals.append(torch.cat([centers, sizes], dim=-1))
    proposals = torch.cat(proposals, dim=0)[None].expand(memory.shape[0], -1, -1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals)).masked_fill(~valid, float("inf"))
    memory = memory.masked_fill(~valid, 0.0)
    return memory, proposals.to(memory.dtype)


def _skip_data_checks() -> bool:
    """Checks that read tensor values back to the host are skipped while compiling, exporting or tracing."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _not_binary(values: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor: does `values` hold anything but 0 and 1? Computed on its device (no host read), with the
    cheapest reduction per dtype (elementwise comparisons of int64 maps cost ~50 ms at 512x704 on CPU)."""
    if values.dtype == torch.bool or values.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=values.device)
    if values.is_floating_point():
        return (values * (1 - values)).any()  # exactly 0 for 0 and 1 only; NaN counts as non-zero
    low, high = values.aminmax()
    return (low < 0) | (high > 1)


def check_pixel_tensor(pixel_values: torch.Tensor) -> None:
    """pixel_values must be a floating-point (batch, 3, height, width) tensor."""
    if not torch.is_tensor(pixel_values):
        raise TypeError(
            f"pixel_values must be a torch.Tensor (batch, 3, height, width), got {type(pixel_values).__name__}"
        )
    if pixel_values.ndim != 4:
        raise ValueError(
            f"pixel_values must be a 4-d tensor (batch, 3, height, width), got {tuple(pixel_values.shape)}"
        )
    if pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must have 3 channels (RGB), got {pixel_values.shape[1]}")
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values must be floating point (normalised by the image processor), got {pixel_values.dtype}"
        )


def check_input_size(
    config: MaskDINOConfig, strides: Sequence[int], batch_size: int, height: int, width: int
) -> None:
    """Refuse an input size the model cannot run on (``strides``: :attr:`MaskDINOModel.encoder_strides`): smaller
    than the coarsest stride, a coarsest level GroupNorm cannot normalise, or fewer encoder tokens than
    ``num_queries``. Shared by the model and the ONNX runner (:class:`maskdino_hf.export.MaskDINOOnnxModel`)."""
    min_size = max(strides)
    if min(height, width) < min_size:
        raise ValueError(
            f"input of size {(height, width)} is smaller than the coarsest feature stride ({min_size}); the minimum "
            f"input with this config is {min_size}x{min_size}: resize or pad it first"
        )
    # Every stride-2 stage rounds up, so a level of stride s is ceil(height / s) x ceil(width / s).
    level_sizes = [(-(-height // stride)) * (-(-width // stride)) for stride in strides]
    # GroupNorm(32) needs two values per group over the batch: one channel per group, one image and a 1x1 level fail.
    if batch_size * min(level_sizes) * (config.feature_size // 32) == 1:
        raise ValueError(
            f"a single image of size {(height, width)} leaves the coarsest level (stride {min_size}) with one value per "
            f"GroupNorm group (feature_size={config.feature_size}, 32 groups): with this config a single image must be "
            f"at least {min_size}x{min_size + 1} (one side larger than {min_size}), or pad the batch"
        )
    if config.two_stage and sum(level_sizes) < config.num_queries:
        raise ValueError(
            f"input of size {(height, width)} gives {sum(level_sizes)} encoder tokens, fewer than the "
            f"num_queries={config.num_queries} queries selected from them: use a larger input or fewer queries"
        )


def _check_pixel_inputs(
    pixel_values: torch.Tensor,
    pixel_mask: torch.Tensor | None,
    strides: list[int],
    config: MaskDINOConfig,
    model_dtype: torch.dtype,
) -> None:
    """Refuse pixel inputs the model cannot run on, naming the argument, what was given and what is allowed.

    Shapes: a (batch, 3, height, width) floating-point tensor at least as large as the coarsest encoder stride,
    whose coarsest level GroupNorm can normalise and whose encoder tokens are at least `num_queries`; outside autocast,
    the model's dtype. Values (one host read, skipped under compile/export): finite pixels and a 0/1 `pixel_mask`."""
    check_pixel_tensor(pixel_values)
    if pixel_values.dtype != model_dtype and not torch.is_autocast_enabled(pixel_values.device.type):
        raise ValueError(
            f"pixel_values are {pixel_values.dtype} but the model's weights are {model_dtype}: cast them with "
            "`pixel_values.to(model.dtype)` or run under `torch.autocast`"
        )
    if pixel_mask is not None:
        if not torch.is_tensor(pixel_mask):
            raise TypeError(
                f"pixel_mask must be a torch.Tensor (batch, height, width), got {type(pixel_mask).__name__}"
            )
        if pixel_mask.shape != (pixel_values.shape[0], *pixel_values.shape[-2:]):
            raise ValueError(
                f"pixel_mask must have shape (batch, height, width) = "
                f"{(pixel_values.shape[0], *pixel_values.shape[-2:])}, got {tuple(pixel_mask.shape)}"
            )
        if pixel_mask.is_complex():
            raise TypeError(f"pixel_mask must hold 0/1 (bool, integer or float), got {pixel_mask.dtype}")
    check_input_size(config, strides, pixel_values.shape[0], *pixel_values.shape[-2:])
    if _skip_data_checks():
        return
    # One host read for both value checks. A finite float32 sum means every pixel is finite (NaN or +-Inf propagate).
    problems = torch.isfinite(pixel_values.sum(dtype=torch.float32)).logical_not().reshape(1)
    if pixel_mask is not None:
        problems = torch.cat([problems, _not_binary(pixel_mask).reshape(1)])
    not_finite, *not_binary = problems.tolist()
    count = int((~torch.isfinite(pixel_values)).sum()) if not_finite else 0  # 0: the sum overflowed float32
    if count:
        raise ValueError(
            f"pixel_values has {count} NaN or infinite values; every pixel must be finite (check the image decoding "
            "and normalisation)"
        )
    if not_binary and not_binary[0]:
        values = pixel_mask.unique()[:10].tolist()
        raise ValueError(f"pixel_mask must be 0/1 (1 on real pixels, 0 on padding), got values {values}")


def _check_target_list(name: str, values, batch_size: int) -> None:
    """A target argument is a list (or tuple, or stacked tensor) of one tensor per image."""
    if not isinstance(values, (list, tuple)) and not torch.is_tensor(values):
        raise TypeError(f"{name} must be a list with one tensor per image, got {type(values).__name__}")
    if len(values) != batch_size:
        raise ValueError(f"{name} has {len(values)} entries for a batch of {batch_size} images (one per image)")
    for index, value in enumerate(values):
        if not torch.is_tensor(value):
            raise TypeError(f"{name}[{index}] must be a torch.Tensor, got {type(value).__name__}")


def _check_targets(
    pixel_values: torch.Tensor,
    mask_labels: list[torch.Tensor] | None,
    class_labels: list[torch.Tensor] | None,
    boxes: list[torch.Tensor] | None,
    num_labels: int,
) -> None:
    """Refuse training targets that would train on a meaningless loss, naming the argument, the image and the values.

    Per image: `class_labels` (n,) integer ids in [0, num_labels); `mask_labels` (n, height, width) at the padded
    input size, 0/1 or bool; `boxes` (optional) (n, 4) finite normalised (cx, cy, w, h) inside [0, 1] with
    non-negative sizes. n = 0 (an image with no objects) is valid. The value checks share one host read."""
    if class_labels is None:
        given = [name for name, value in (("mask_labels", mask_labels), ("boxes", boxes)) if value is not None]
        if given:
            raise ValueError(
                f"{' and '.join(given)} given without class_labels: training needs class_labels and mask_labels "
                "(boxes optional); for inference pass none of them"
            )
        return
    check_pixel_tensor(pixel_values)
    if mask_labels is None:
        raise ValueError(
            "class_labels given without mask_labels: training needs both (boxes are optional, computed from the masks)"
        )
    batch_size, height, width = pixel_values.shape[0], *pixel_values.shape[-2:]
    _check_target_list("class_labels", class_labels, batch_size)
    _check_target_list("mask_labels", mask_labels, batch_size)
    if boxes is not None:
        _check_target_list("boxes", boxes, batch_size)
    device = pixel_values.device
    # (description, values, which of them are bad, is any bad): the flags are read together, once, below.
    value_checks: list[tuple[str, torch.Tensor, torch.Tensor | None, torch.Tensor]] = []

    def add(description: str, values: torch.Tensor, bad: torch.Tensor) -> None:
        value_checks.append((description, values, bad, bad.any()))

    for index in range(batch_size):
        labels, masks = class_labels[index], mask_labels[index]
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(
                f"class_labels[{index}] must hold integer class ids (torch.int64), got {labels.dtype}; float ids "
                "would be truncated"
            )
        if labels.ndim != 1:
            raise ValueError(f"class_labels[{index}] must have shape (num_targets,), got {tuple(labels.shape)}")
        if masks.shape != (labels.shape[0], height, width):
            raise ValueError(
                f"mask_labels[{index}] must have shape (num_targets, height, width) = ({labels.shape[0]}, {height}, "
                f"{width}) (one mask per class label, at the padded input size), got {tuple(masks.shape)}"
            )
        if masks.is_complex():
            raise TypeError(f"mask_labels[{index}] must hold 0/1 (bool, integer or float), got {masks.dtype}")
        labels = labels.to(device)
        add(f"class_labels[{index}] must be class ids in 0..{num_labels - 1} (num_labels={num_labels})", labels,
            (labels < 0) | (labels >= num_labels))
        masks = masks.to(device)
        value_checks.append(
            (f"mask_labels[{index}] must be binary (0/1 or bool; divide 0/255 masks by 255)", masks, None,
             _not_binary(masks))
        )
        if boxes is None:
            continue
        box = boxes[index]
        if not box.is_floating_point():
            raise TypeError(f"boxes[{index}] must be floating point normalised (cx, cy, w, h), got {box.dtype}")
        if box.shape != (labels.shape[0], 4):
            raise ValueError(
                f"boxes[{index}] must have shape (num_targets, 4) = ({labels.shape[0]}, 4), got {tuple(box.shape)}"
            )
        box = box.to(device, torch.float32)
        corners = torch.cat([box[:, :2] - box[:, 2:] / 2, box[:, :2] + box[:, 2:] / 2], dim=-1)
        add(f"boxes[{index}] must be finite", box, ~torch.isfinite(box))
        add(f"boxes[{index}] must have non-negative width and height", box[:, 2:], box[:, 2:] < 0)
        add(f"boxes[{index}] must be normalised (cx, cy, w, h) in [0, 1]", box, (box < 0) | (box > 1))
        add(f"boxes[{index}] must lie inside the image: corners (x0, y0, x1, y1) in [0, 1]", corners,
            (corners < -1e-3) | (corners > 1 + 1e-3))
    if _skip_data_checks() or not value_checks:
        return
    failed = torch.stack([flag for *_, flag in value_checks]).tolist()
    for (description, values, bad, _), is_bad in zip(value_checks, failed):
        if is_bad:
            bad = (values != 0) & (values != 1) if bad is None else bad
            shown = values[bad].unique()[:10]
            shown = shown.double().round(decimals=4) if shown.is_floating_point() else shown
            raise ValueError(f"{description}, got {shown.tolist()}")


def activate_in_place(activation: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """`activation(hidden_states)`, overwriting `hidden_states` when the activation is a ReLU (for inference: the
    same values without allocating, and page-faulting, another large map)."""
    return hidden_states.relu_() if isinstance(activation, nn.ReLU) else activation(hidden_states)


def onednn_linear(
    hidden_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, relu: bool = False
) -> torch.Tensor:
    """`hidden_states @ weight.T (+ bias)` for 2-D operands (transposed views allowed), then a ReLU when `relu`:
    through oneDNN's matmul for float32 on the CPU, `addmm` / `mm` elsewhere.

    PyTorch hands float32 CPU matmuls to its BLAS (MKL), and oneDNN only its bfloat16 ones and the convolutions.
    oneDNN's float32 matmul (`mkldnn._linear_pointwise`, the op Inductor emits for CPU linears) ran 2.2x faster on
    the project's 2-core AVX-512 machine (370 against 165 GFLOP/s for the encoder feed-forward's 2048 x 256 x 2048
    and 2048 x 2048 x 256 products; MKL takes a generic path on that AMD CPU) and applies the ReLU in the same pass.
    The same float32 arithmetic in another summation order. Elsewhere (autocast, gradients, another dtype or device,
    traced graphs, a build without oneDNN) `addmm` / `mm`, the ReLU in place."""
    if _takes_onednn(hidden_states, weight):
        return torch.ops.mkldnn._linear_pointwise(hidden_states, weight, bias, "relu" if relu else "none", [], "")
    if bias is None:
        output = torch.mm(hidden_states, weight.t())
    else:
        output = torch.addmm(bias, hidden_states, weight.t())
    return output.relu_() if relu else output


def inference_linear(
    hidden_states: torch.Tensor, linear: nn.Linear, activation: nn.Module | None = None
) -> torch.Tensor:
    """`activation(linear(hidden_states))` for (tokens, features) rows: `onednn_linear`, the ReLU fused or in place,
    another activation after it."""
    is_relu = isinstance(activation, nn.ReLU)
    output = onednn_linear(hidden_states, linear.weight, linear.bias, relu=is_relu)
    return output if activation is None or is_relu else activation(output)


def _takes_onednn(hidden_states: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `onednn_linear` may take oneDNN's float32 matmul for this call: not under autocast (whose matmuls are
    low-precision), nor when gradients flow (the op has no autograd formula)."""
    return (
        hidden_states.device.type == "cpu"
        and hidden_states.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not (torch.is_grad_enabled() and (hidden_states.requires_grad or weight.requires_grad))
        and not torch.compiler.is_compiling()
        and torch.backends.mkldnn.enabled
        and _onednn_float32_matmul_on_this_cpu()
    )


@cache
def _onednn_float32_matmul_on_this_cpu() -> bool:
    """oneDNN's float32 linear is taken on x86 CPUs with AVX2 or AVX-512 (measured on AVX-512 only); builds without
    oneDNN and other architectures (e.g. Arm, where PyTorch's oneDNN runs through the Compute Library) keep the BLAS."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    )


class ChunkedReluFeedForward(torch.autograd.Function):
    """`fc2(relu(fc1(rows)))` of (tokens, dim) rows for training, a chunk of rows at a time in both passes.

    Autograd's expression allocates four (tokens, ffn_dim) maps per layer and step (fc1's output, the ReLU's, and
    their two gradients: 85 MB each at 512x512, batch 2), each freshly mapped and page-faulted on the CPU. Here the
    ReLU output is what the backward pass keeps, as one tensor per chunk (the ReLU in place; 16 MB at the default
    2048 rows: glibc serves blocks that size from its heap, reused step after step, where it maps every block over
    32 MB afresh), and the backward pass forms the hidden gradient a chunk at a time, accumulating the weight
    gradients chunk by chunk (a weight-sized product per chunk, added in place). Every product goes through
    `onednn_linear` (oneDNN's matmul in float32 on the CPU). The same products as autograd's, summed in chunks:
    equal to float rounding.
    """

    @staticmethod
    def forward(ctx, rows, weight1, bias1, weight2, bias2, chunk_size: int):
        output = rows.new_empty(rows.shape[0], weight2.shape[0])
        hidden = []
        for chunk, output_chunk in zip(rows.split(chunk_size), output.split(chunk_size)):
            hidden.append(onednn_linear(chunk, weight1, bias1, relu=True))
            output_chunk.copy_(onednn_linear(hidden[-1], weight2, bias2))
        ctx.save_for_backward(rows, weight1, weight2, *hidden)
        ctx.chunk_size = chunk_size
        return output

    @staticmethod
    def backward(ctx, grad_output):
        rows, weight1, weight2, *hidden = ctx.saved_tensors
        needs_rows, needs_weight1, needs_bias1, needs_weight2, needs_bias2 = ctx.needs_input_grad[:5]
        grad_rows = torch.empty_like(rows) if needs_rows else None
        grad_weight1 = torch.zeros_like(weight1) if needs_weight1 else None
        grad_bias1 = weight1.new_zeros(weight1.shape[0]) if needs_bias1 else None
        grad_weight2 = torch.zeros_like(weight2) if needs_weight2 else None
        grad_bias2 = grad_output.sum(0) if needs_bias2 else None
        for start, hidden_chunk in zip(range(0, rows.shape[0], ctx.chunk_size), hidden):
            chunk = slice(start, start + ctx.chunk_size)
            grad_chunk = grad_output[chunk]
            if needs_weight2:
                grad_weight2 += onednn_linear(grad_chunk.t(), hidden_chunk.t())
            if not (needs_rows or needs_weight1 or needs_bias1):
                continue
            # ReLU's gradient, autograd's own op written over the product: zero where the output is not positive
            # (one pass; `masked_fill_` with a boolean mask took 0.2 s of a 512x512 step).
            grad_hidden = onednn_linear(grad_chunk, weight2.t())
            torch.ops.aten.threshold_backward.grad_input(grad_hidden, hidden_chunk, 0, grad_input=grad_hidden)
            if needs_rows:
                grad_rows[chunk] = onednn_linear(grad_hidden, weight1.t())
            if needs_weight1:
                grad_weight1 += onednn_linear(grad_hidden.t(), rows[chunk].t())
            if needs_bias1:
                grad_bias1 += grad_hidden.sum(0)
        return grad_rows, grad_weight1, grad_bias1, grad_weight2, grad_bias2, None


class MaskDINOPixelDecoderEncoderLayer(GradientCheckpointingLayer):
    """Deformable self-attention over all levels followed by a feed-forward block (post-norm)."""

    def __init__(self, config: MaskDINOConfig):
        super().__init__()
        dim = config.feature_size
        self.self_attn = MaskDINOMultiscaleDeformableAttention(
            dim, config.num_feature_levels, config.encoder_attention_heads, config.encoder_n_points
        )
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(dim, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.activation = ACT2FN[config.activation_function]
        self.dropout = config.dropout
        # Tokens per chunk at inference (the whole layer after the value projection) and of the eager fp32 training
        # feed-forward (2048 x encoder_ffn_dim activations: 16 MB in fp32).
        self.token_chunk_size = 2048

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: torch.Tensor,
        spatial_shapes_list: list[tuple[int, int]],
        level_start_index: torch.Tensor,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the new states and the deformable attention weights (batch, tokens, heads, levels, points); at
        inference the weights only with `output_attentions`."""
        # Traced graphs take the whole-tensor expression: chunks would fix the token count, and compilers fuse it.
        if not (self.training or torch.compiler.is_compiling() or self.records_graph(hidden_states)):
            return self.inference_in_chunks(
                hidden_states, position_embeddings, reference_points, spatial_shapes, spatial_shapes_list,
                level_start_index, output_attentions,
            )
        attended, attention_weights = self.self_attn(
            hidden_states=hidden_states,
            encoder_hidden_states=hidden_states,
            position_embeddings=position_embeddings,
            reference_points=reference_points,
            spatial_shapes=spatial_shapes,
            spatial_shapes_list=spatial_shapes_list,
            level_start_index=level_start_index,
        )
        hidden_states = self.self_attn_layer_norm(
            hidden_states + F.dropout(attended, self.dropout, self.training)
        )
        if self.chunked_training_feed_forward(hidden_states):
            rows = hidden_states.reshape(-1, hidden_states.shape[-1])
            feed_forward = ChunkedReluFeedForward.apply(
                rows, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.token_chunk_size
            ).view_as(hidden_states)
        else:
            activated = F.dropout(self.activation(self.fc1(hidden_states)), self.dropout, self.training)
            feed_forward = self.fc2(activated)
        hidden_states = hidden_states + F.dropout(feed_forward, self.dropout, self.training)
        return self.final_layer_norm(hidden_states), attention_weights

    def records_graph(self, hidden_states: torch.Tensor) -> bool:
        """Whether autograd records this call (gradients flow to the input or to the layer's weights)."""
        return torch.is_grad_enabled() and (
            hidden_states.requires_grad or any(parameter.requires_grad for parameter in self.parameters())
        )

    def inference_in_chunks(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: torch.Tensor,
        spatial_shapes_list: list[tuple[int, int]],
        level_start_index: torch.Tensor,
        output_attentions: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer at inference: the value projection of all tokens, then the rest `token_chunk_size` tokens at a
        time on the CPU (accelerators take one chunk). Everything after the value projection is row-wise (query
        projections, sampling, output projection, norms, feed-forward), so the same values as the whole-tensor
        path; each chunk's temporaries are a few MB that glibc hands out again chunk after chunk, where the
        whole-map temporaries were mapped and page-faulted afresh at every layer (R50 at 800x1088: about 480,000
        page faults per fp32 forward before, 160,000 after; 150,000 and 30,000 under bfloat16 autocast)."""
        value = self.self_attn.project_value(hidden_states)
        batch_size, num_tokens, _ = hidden_states.shape
        chunk_size = self.token_chunk_size if hidden_states.device.type == "cpu" else num_tokens
        if chunk_size < num_tokens:
            # The sampling casts a half-precision value to float32: once per layer here, not once per chunk.
            value = value.to(sampling_dtype(value))
        output = weights = None
        for start in range(0, num_tokens, chunk_size):
            rows = slice(start, start + chunk_size)
            states = hidden_states[:, rows]
            attended, attention_weights = self.self_attn(
                hidden_states=states,
                position_embeddings=position_embeddings[:, rows],
                reference_points=reference_points[:, rows],
                spatial_shapes=spatial_shapes,
                spatial_shapes_list=spatial_shapes_list,
                level_start_index=level_start_index,
                value=value,
            )
            states = self.self_attn_layer_norm(states + attended)
            states = self.final_layer_norm(self.feed_forward_with_residual(states))
            if output is None:
                output = states.new_empty(batch_size, num_tokens, states.shape[-1])
                if output_attentions:
                    weights = attention_weights.new_empty(batch_size, num_tokens, *attention_weights.shape[2:])
            output[:, rows] = states
            if output_attentions:
                weights[:, rows] = attention_weights
        return output, weights

    def chunked_training_feed_forward(self, hidden_states: torch.Tensor) -> bool:
        """Whether the feed-forward block takes `ChunkedReluFeedForward` when gradients flow: ReLU without dropout
        in eager full precision (autocast and traced graphs keep the plain expression, which they cast and fuse)."""
        return (
            isinstance(self.activation, nn.ReLU)
            and (self.dropout == 0 or not self.training)
            and not torch.is_autocast_enabled(hidden_states.device.type)
            and not torch.compiler.is_compiling()
        )

    def feed_forward_with_residual(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`hidden_states + fc2(activation(fc1(hidden_states)))` at inference, in chunks of tokens: the
        (tokens, encoder_ffn_dim) activation (150 MB per image at 800x1088) is never materialised whole, each chunk's
        activation is computed in place, and each chunk's sum with its residual is written straight into one
        preallocated output (no concatenation). Row-wise, so the same values as the whole-tensor expression."""
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])
        output = torch.empty_like(rows)
        for chunk, out in zip(rows.split(self.token_chunk_size), output.split(self.token_chunk_size)):
            torch.add(chunk, inference_linear(inference_linear(chunk, self.fc1, self.activation), self.fc2), out=out)
        return output.view_as(hidden_states)


def fpn_feature_names(config: MaskDINOConfig) -> list[str]:
    """Backbone maps (fine to coarse) that get an FPN lateral: those between the mask stride and the finest encoder
    input, at least one."""
    finest = min(BACKBONE_FEATURES.index(name) for name in config.encoder_in_features)
    num_levels = max(int(math.log2(2 ** (finest + 2)) - math.log2(config.common_stride)), 1)
    return list(BACKBONE_FEATURES[:num_levels])


class MaskDINOPixelDecoder(nn.Module):
    """Multi-scale deformable encoder over the backbone maps (plus strided extra levels) and the 1/4 mask features."""

    def __init__(self, config: MaskDINOConfig, feature_channels: dict[str, int]):
        super().__init__()
        dim = config.feature_size
        self.feature_order = config.feature_order
        encoder_features = sorted(config.encoder_in_features, key=BACKBONE_FEATURES.index)
        # Encoder level order: finest first for 'low2high', coarsest first for 'high2low'.
        self.encoder_features = encoder_features if self.feature_order == "low2high" else encoder_features[::-1]
        self.num_feature_levels = config.num_feature_levels
        num_extra = config.num_feature_levels - len(encoder_features)
        self.input_projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(feature_channels[name], dim, kernel_size=1), nn.GroupNorm(32, dim))
            for name in self.encoder_features
        )
        # Extra coarser levels: strided 3x3 convs chained from the input map with the most channels.
        self.extra_source = max(encoder_features, key=lambda name: feature_channels[name])
        extra_in = feature_channels[self.extra_source]
        self.extra_projections = nn.ModuleList()
        for _ in range(num_extra):
            self.extra_projections.append(
                nn.Sequential(nn.Conv2d(extra_in, dim, kernel_size=3, stride=2, padding=1), nn.GroupNorm(32, dim))
            )
            extra_in = dim
        self.level_embed = nn.Parameter(torch.zeros(config.num_feature_levels, dim))
        self.position_embedding = Mask2FormerSinePositionEmbedding(num_position_features=dim // 2, normalize=True)
        self.layers = nn.ModuleList(MaskDINOPixelDecoderEncoderLayer(config) for _ in range(config.encoder_layers))

        # FPN laterals, coarse to fine (e.g. only res2 for res3..res5 encoder inputs).
        self.fpn_features = fpn_feature_names(config)[::-1]
        self.lateral_convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(feature_channels[name], dim, kernel_size=1, bias=False), nn.GroupNorm(32, dim))
            for name in self.fpn_features
        )
        # The ReLU and the sum before the output conv run in place on group-norm outputs (whose backward does not read
        # them): the same values without two more maps at the largest scale.
        self.output_convs = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=False), nn.GroupNorm(32, dim), nn.ReLU(inplace=True)
            )
            for _ in self.fpn_features
        )
        self.mask_projection = nn.Conv2d(dim, config.mask_feature_size, kernel_size=1)

    def forward(
        self, features: dict[str, torch.Tensor], output_attentions: bool = False, output_hidden_states: bool = False
    ) -> tuple[list[torch.Tensor], torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """Returns the encoder's multi-scale maps, the mask features, and (when asked) the encoder's per-layer
        states (input first) and deformable attention weights."""
        sources = [proj(features[name]) for proj, name in zip(self.input_projections, self.encoder_features)]
        extra = []
        previous = features[self.extra_source]
        for proj in self.extra_projections:
            previous = proj(previous)
            extra.append(previous)
        # Extra levels are coarser than any backbone level.
        sources = sources + extra if self.feature_order == "low2high" else extra[::-1] + sources

        spatial_shapes_list = [(src.shape[2], src.shape[3]) for src in sources]
        batch_size = sources[0].shape[0]
        flat, position = [], []
        for level, src in enumerate(sources):
            flat.append(src.flatten(2).transpose(1, 2))
            pos = self.position_embedding(src.shape, src.device, src.dtype)
            position.append(pos.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1))
        hidden_states = torch.cat(flat, 1)
        position_embeddings = torch.cat(position, 1)
        spatial_shapes = torch.tensor(spatial_shapes_list, dtype=torch.long, device=hidden_states.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        # Each token's cell centre, the same on every level: no padding mask, so every valid ratio is 1. Kept in at
        # least float32 (the official linspace's dtype), so that the sampling locations are too: under bfloat16
        # autocast a bfloat16 location in [0, 1] is off by up to half a pixel at 1/8 of an 800x1088 input.
        centers = torch.cat([cell_centers(*shape, hidden_states.device) for shape in spatial_shapes_list])
        centers = centers.to(torch.promote_types(hidden_states.dtype, centers.dtype))
        reference_points = centers[None, :, None].expand(batch_size, -1, len(sources), -1)
        all_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states, attention_weights = layer(
                hidden_states, position_embeddings, reference_points, spatial_shapes, spatial_shapes_list,
                level_start_index, output_attentions,
            )
            if output_hidden_states:
                all_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attention_weights,)

        sizes = [height * width for height, width in spatial_shapes_list]
        # (batch, height, width, channels) views seen as (batch, channels, height, width): channels-last maps, whose
        # strides every backend's channels-last kernels take (a transpose + reshape gives batch 1 a stride that sends
        # the FPN's upsampling down a path ~10x slower).
        outputs = [
            level.unflatten(1, (height, width)).permute(0, 3, 1, 2)
            for level, (height, width) in zip(hidden_states.split(sizes, dim=1), spatial_shapes_list)
        ]
        multi_scale_features = list(outputs)
        finest = 0 if self.feature_order == "low2high" else -1
        for name, lateral, output_conv in zip(self.fpn_features, self.lateral_convs, self.output_convs):
            # Channels-last, as the encoder's maps: the convolutions at the largest scale (lateral, output and mask
            # projection) then skip oneDNN's layout reorders, and their extra full-size buffers (3x faster at 1/4 of
            # 800x1088 on CPU).
            lateral_map = lateral(features[name].contiguous(memory_format=torch.channels_last))
            upsampled = F.interpolate(outputs[finest], size=lateral_map.shape[-2:], mode="bilinear", align_corners=False)
            outputs.append(output_conv(lateral_map.add_(upsampled)))
        return multi_scale_features, self.mask_projection(outputs[-1]), all_states, all_attentions


class MaskDINODecoderLayer(GradientCheckpointingLayer):
    """DINO decoder layer: query self-attention, deformable cross-attention on the encoder memory, feed-forward."""

    def __init__(self, config: MaskDINOConfig):
        super().__init__()
        dim = config.hidden_size
        heads = config.decoder_attention_heads
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=config.dropout, batch_first=True)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.encoder_attn = MaskDINOMultiscaleDeformableAttention(
            dim, config.num_feature_levels, heads, config.decoder_n_points
        )
        self.encoder_attn_layer_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(dim, config.decoder_ffn_dim)
        self.fc2 = nn.Linear(config.decoder_ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.activation = ACT2FN[config.activation_function]
        self.dropout = config.dropout

    def forward(
        self,
        hidden_states: torch.Tensor,
        query_position: torch.Tensor,
        reference_points: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: torch.Tensor,
        spatial_shapes_list: list[tuple[int, int]],
        level_start_index: torch.Tensor,
        self_attn_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Returns the new states, the self-attention weights (batch, heads, N, N) when `output_attentions`, else
        `None`, and the deformable cross-attention weights (batch, N, heads, levels, points)."""
        query = hidden_states + query_position
        if output_attentions:
            attended, self_attn_weights = self.eager_self_attention(query, hidden_states, self_attn_mask)
        else:
            attended = self.self_attn(query, query, hidden_states, attn_mask=self_attn_mask, need_weights=False)[0]
            self_attn_weights = None
        hidden_states = self.self_attn_layer_norm(hidden_states + F.dropout(attended, self.dropout, self.training))
        attended, cross_attn_weights = self.encoder_attn(
            hidden_states=hidden_states,
            encoder_hidden_states=memory,
            position_embeddings=query_position,
            reference_points=reference_points,
            spatial_shapes=spatial_shapes,
            spatial_shapes_list=spatial_shapes_list,
            level_start_index=level_start_index,
        )
        hidden_states = self.encoder_attn_layer_norm(hidden_states + F.dropout(attended, self.dropout, self.training))
        feed_forward = self.fc2(F.dropout(self.activation(self.fc1(hidden_states)), self.dropout, self.training))
        hidden_states = self.final_layer_norm(hidden_states + F.dropout(feed_forward, self.dropout, self.training))
        return hidden_states, self_attn_weights, cross_attn_weights

    def eager_self_attention(
        self, query: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`self.self_attn` (same parameters, same function) written out, so that the attention weights it
        returns are the ones that weight the values and receive gradients (`nn.MultiheadAttention` returns a copy).
        Used only for `output_attentions=True`; the default path keeps PyTorch's fused attention."""
        attention = self.self_attn
        batch_size, length, dim = query.shape
        heads = attention.num_heads
        weight_q, weight_k, weight_v = attention.in_proj_weight.chunk(3)
        bias_q, bias_k, bias_v = attention.in_proj_bias.chunk(3)

        def split_heads(states: torch.Tensor) -> torch.Tensor:
            return states.view(batch_size, length, heads, dim // heads).transpose(1, 2)

        queries = split_heads(F.linear(query, weight_q, bias_q))
        keys = split_heads(F.linear(query, weight_k, bias_k))
        values = split_heads(F.linear(value, weight_v, bias_v))
        scores = queries @ keys.transpose(-1, -2) / math.sqrt(dim // heads)
        if attn_mask is not None:
            scores = scores.masked_fill(attn_mask, float("-inf"))
        weights = scores.softmax(-1)
        attended = F.dropout(weights, attention.dropout, self.training) @ values
        attended = attention.out_proj(attended.transpose(1, 2).reshape(batch_size, length, dim))
        return attended, weights


class MaskDINODecoder(nn.Module):
    """Query selection, denoising, the DINO decoder and the class/box/mask heads shared by every layer."""

    def __init__(self, config: MaskDINOConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.input_projections = nn.ModuleList(
            nn.Conv2d(config.feature_size, dim, kernel_size=1)
            if config.feature_size != dim or config.enforce_input_projection
            else nn.Identity()
            for _ in range(config.num_feature_levels)
        )
        if config.two_stage:
            self.enc_output = nn.Linear(dim, dim)
            self.enc_output_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        if not config.two_stage or config.learn_tgt:
            self.query_feat = nn.Embedding(config.num_queries, dim)
        if not config.two_stage:
            self.query_embed = nn.Embedding(config.num_queries, 4)
        self.class_embed = nn.Linear(dim, config.num_classifier_outputs)
        self.label_enc = nn.Embedding(config.num_labels, dim)
        self.mask_embed = DeformableDetrMLPPredictionHead(dim, dim, config.mask_feature_size, 3)
        self.bbox_embed = DeformableDetrMLPPredictionHead(dim, dim, 4, 3)
        self.ref_point_head = DeformableDetrMLPPredictionHead(2 * dim, dim, dim, 2)
        # The official decoder normalises each layer's output with this norm and the heads apply it once more.
        self.layer_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(MaskDINODecoderLayer(config) for _ in range(config.decoder_layers))

    def classify(self, states: torch.Tensor) -> torch.Tensor:
        """Class logits; in float32 under autocast, since they are ranked (query selection's and post-processing's
        top-k) and bfloat16 rounding makes many of them tie. A small matmul, so nearly free."""
        if torch.is_autocast_enabled(states.device.type):
            with torch.autocast(states.device.type, enabled=False):
                return self.class_embed(states.float())
        return self.class_embed(states)

    def prediction_heads(
        self, hidden_states: torch.Tensor, mask_features: torch.Tensor, predict_masks: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Class logits, mask logits and mask embeddings of decoder states: the mask logits are the product of the
        query's mask embedding and the per-pixel embedding."""
        normed = self.layer_norm(hidden_states)
        class_logits = self.classify(normed)
        if not predict_masks:
            return class_logits, None, None
        mask_embeddings = self.mask_embed(normed)
        if torch.is_autocast_enabled(mask_features.device.type):
            # Under autocast: a low-precision product returned in float32. Rounding a logit never flips its sign, so
            # the masks thresholded at 0 (mask-enhanced boxes, post-processing) are those of the unrounded product.
            # The per-pixel embedding is channels-last here: read as (batch, pixels, channels) it is a plain matrix.
            batch_size, _, height, width = mask_features.shape
            pixels = mask_features.permute(0, 2, 3, 1).reshape(batch_size, height * width, -1)
            mask_logits = torch.bmm(mask_embeddings, pixels.transpose(1, 2)).float()
            mask_logits = mask_logits.view(batch_size, -1, height, width)
        else:
            mask_logits = torch.einsum("bqc,bchw->bqhw", mask_embeddings, mask_features)
        return class_logits, mask_logits, mask_embeddings

    def query_selection(
        self,
        memory: torch.Tensor,
        spatial_shapes_list: list[tuple[int, int]],
        mask_features: torch.Tensor,
        output_proposal_boxes: bool = True,
    ) -> MaskDINOQuerySelectionOutput:
        """Unified query selection: score every encoder token, keep the top-k as content queries and anchors.

        The box head reads one token at a time, so the selected tokens' boxes are the same whether it runs on every
        token (`output_proposal_boxes`, for `enc_outputs_coord_logits`) or only on the selected ones (which saves
        2.4 of the decoder's 28 GMAC at 800x1088)."""
        memory, proposals = encoder_output_proposals(memory, spatial_shapes_list)
        memory = self.enc_output_norm(self.enc_output(memory))
        class_logits = self.classify(memory)
        topk = torch.topk(class_logits.max(-1).values, self.config.num_queries, dim=1).indices
        selected_memory = torch.gather(memory, 1, topk.unsqueeze(-1).expand(-1, -1, memory.shape[-1]))
        coord_index = topk.unsqueeze(-1).expand(-1, -1, 4)
        coord_logits = None
        if output_proposal_boxes:
            coord_logits = self.bbox_embed(memory) + proposals
            selected_coords = torch.gather(coord_logits, 1, coord_index)
        else:
            selected_coords = self.bbox_embed(selected_memory) + torch.gather(proposals, 1, coord_index)
        topk_logits, topk_masks, topk_embeddings = self.prediction_heads(selected_memory, mask_features)
        return MaskDINOQuerySelectionOutput(
            enc_outputs_class=class_logits,
            enc_outputs_coord_logits=coord_logits,
            enc_topk_indices=topk,
            enc_topk_logits=topk_logits,
            enc_topk_boxes=selected_coords.sigmoid(),
            enc_topk_masks=topk_masks,
            enc_topk_mask_embeddings=topk_embeddings,
            enc_topk_hidden_states=selected_memory,
            enc_topk_coord_logits=selected_coords,
        )

    def denoising_queries(self, targets: list[dict], random_source) -> MaskDINODenoisingOutput | None:
        """Unified denoising: noised ground-truth labels and boxes repeated in groups (predictions not filled yet).

        Returns `None` when no image has a target or the batch has more targets than `denoising_num`.
        """
        config = self.config
        counts = [len(target["labels"]) for target in targets]
        max_count = max(counts) if counts else 0
        if max_count == 0:
            return None
        groups = config.denoising_num // max_count
        if groups == 0:
            return None
        device = self.label_enc.weight.device
        labels = torch.cat([target["labels"] for target in targets]).to(device)
        boxes = torch.cat([target["boxes"] for target in targets]).to(device)
        batch_index = torch.cat(
            [torch.full((count,), index, dtype=torch.long, device=device) for index, count in enumerate(counts)]
        )
        known_labels = labels.repeat(groups)
        known_boxes = boxes.repeat(groups, 1)
        known_batch = batch_index.repeat(groups)
        noised_labels = known_labels.clone()
        noised_boxes = known_boxes.clone()
        scale = config.denoising_noise_scale
        if scale > 0:
            flip = random_source.rand_like(noised_labels.float()) < (scale * 0.5)
            flip_index = torch.nonzero(flip).view(-1)
            new_labels = random_source.randint_like(flip_index, 0, config.num_labels)
            noised_labels.scatter_(0, flip_index, new_labels)
            jitter = torch.cat([noised_boxes[:, 2:] / 2, noised_boxes[:, 2:]], dim=1)
            noise = random_source.rand_like(noised_boxes) * 2 - 1.0
            noised_boxes = (noised_boxes + noise * jitter * scale).clamp(0.0, 1.0)

        pad_size = max_count * groups
        batch_size = len(targets)
        dim = config.hidden_size
        content = torch.zeros(batch_size, pad_size, dim, device=device, dtype=self.label_enc.weight.dtype)
        anchors = torch.zeros(batch_size, pad_size, 4, device=device, dtype=boxes.dtype)
        slot = torch.cat([torch.arange(count, device=device) for count in counts])
        slot = torch.cat([slot + max_count * group for group in range(groups)]).long()
        content[known_batch, slot] = self.label_enc(noised_labels.long())
        anchors[known_batch, slot] = inverse_sigmoid(noised_boxes)

        size = pad_size + config.num_queries
        group_id = torch.arange(size, device=device) // max_count
        is_dn = torch.arange(size, device=device) < pad_size
        # Matching queries cannot see denoising ones; a denoising group sees only itself (and matching queries).
        attn_mask = is_dn[None, :] & (~is_dn[:, None] | (group_id[:, None] != group_id[None, :]))
        return MaskDINODenoisingOutput(
            queries=content,
            reference_points=anchors,
            self_attn_mask=attn_mask,
            known_labels=known_labels,
            known_boxes=known_boxes,
            known_indices=torch.arange(len(labels), device=device).repeat(groups),
            batch_indices=batch_index,
            query_indices=slot,
            num_groups=groups,
            pad_size=pad_size,
        )

    def forward(
        self,
        multi_scale_features: list[torch.Tensor],
        mask_features: torch.Tensor,
        targets: list[dict] | None = None,
        random_source=None,
        output_auxiliary_masks: bool = False,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        output_proposal_boxes: bool = True,
    ) -> MaskDINODecoderOutput:
        config = self.config
        levels = len(multi_scale_features)
        # The decoder reads the levels in reverse encoder order.
        sources = [self.input_projections[levels - 1 - i](multi_scale_features[levels - 1 - i]) for i in range(levels)]
        spatial_shapes_list = [(src.shape[2], src.shape[3]) for src in sources]
        memory = torch.cat([src.flatten(2).transpose(1, 2) for src in sources], 1)
        spatial_shapes = torch.tensor(spatial_shapes_list, dtype=torch.long, device=memory.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        batch_size = memory.shape[0]

        selection = None
        if config.two_stage:
            selection = self.query_selection(memory, spatial_shapes_list, mask_features, output_proposal_boxes)
            content = selection.enc_topk_hidden_states.detach()
            anchors = selection.enc_topk_coord_logits.detach()
            if config.learn_tgt:
                content = self.query_feat.weight[None].expand(batch_size, -1, -1)
            if config.initialize_box_type != "no":
                anchors = mask_enhanced_box_init(selection.enc_topk_masks, config.initialize_box_type)
        else:
            content = self.query_feat.weight[None].expand(batch_size, -1, -1)
            anchors = self.query_embed.weight[None].expand(batch_size, -1, -1)
        init_reference = anchors

        denoising = None
        if self.training and config.denoising != "no" and targets is not None:
            denoising = self.denoising_queries(targets, random_source)
        attn_mask = None
        if denoising is not None:
            content = torch.cat([denoising.queries, content], dim=1)
            anchors = torch.cat([denoising.reference_points.to(anchors.dtype), anchors], dim=1)
            attn_mask = denoising.self_attn_mask

        predict_all_masks = self.training or output_auxiliary_masks
        hidden_states = content
        reference_points = anchors.sigmoid()
        references = [reference_points]
        reference_logits = []
        normed_states = []
        all_states = (hidden_states,) if output_hidden_states else None
        self_attentions = () if output_attentions else None
        cross_attentions = () if output_attentions else None
        for layer in self.layers:
            query_position = self.ref_point_head(box_sine_embedding(reference_points, config.hidden_size // 2))
            hidden_states, self_weights, cross_weights = layer(
                hidden_states,
                query_position,
                reference_points[:, :, None].expand(-1, -1, levels, -1),
                memory,
                spatial_shapes,
                spatial_shapes_list,
                level_start_index,
                attn_mask,
                output_attentions,
            )
            if output_hidden_states:
                all_states += (hidden_states,)
            if output_attentions:
                self_attentions += (self_weights,)
                cross_attentions += (cross_weights,)
            normed_states.append(self.layer_norm(hidden_states))
            # Look forward twice: the reported box uses the normed state, the next layer's anchor the raw one.
            reference_logits.append(inverse_sigmoid(reference_points))
            refined = (self.bbox_embed(hidden_states) + reference_logits[-1]).sigmoid()
            reference_points = refined.detach()
            references.append(refined)

        # The heads read the returned stacked states (denoising queries split off), so gradients reach them. They run
        # on the denoising and the matching queries apart: slicing their outputs afterwards would cost every mask's
        # backward a zero-filled full-size gradient per part.
        intermediate_hidden_states = torch.stack(normed_states, 1)
        pad = denoising.pad_size if denoising is not None else 0
        if denoising is not None:
            denoising_states, intermediate_hidden_states = intermediate_hidden_states.split(
                [pad, intermediate_hidden_states.shape[2] - pad], 2
            )
            parts = [(denoising_states, slice(None, pad)), (intermediate_hidden_states, slice(pad, None))]
        else:
            parts = [(intermediate_hidden_states, slice(None))]
        heads = []  # per part: class logits, mask logits, mask embeddings and boxes, each a list over layers
        for states, queries in parts:
            layers = []
            if config.initial_pred:
                initial = self.prediction_heads(content[:, queries], mask_features, predict_all_masks)
                layers.append((*initial, anchors[:, queries].sigmoid()))
            for index in range(len(self.layers)):
                last = index == len(self.layers) - 1
                layer = self.prediction_heads(states[:, index], mask_features, predict_all_masks or last)
                layer_boxes = (self.bbox_embed(states[:, index]) + reference_logits[index][:, queries]).sigmoid()
                layers.append((*layer, layer_boxes))
            heads.append([list(field) for field in zip(*layers)])
        class_logits, mask_logits, mask_embeddings, boxes = heads[-1]

        if config.initial_pred and config.two_stage and not config.learn_tgt and not predict_all_masks:
            # The initial queries are the selected tokens: their masks are the query-selection masks.
            mask_logits[0] = selection.enc_topk_masks
        if self.training and denoising is None:
            class_logits[-1] = class_logits[-1] + 0.0 * self.label_enc.weight.sum()

        if denoising is not None:
            # Denoising queries come first in the decoder; their predictions are reported apart.
            dn_logits, dn_masks, dn_embeddings, dn_boxes = heads[0]
            references = [value[:, pad:] for value in references]
            denoising = MaskDINODenoisingOutput(
                **denoising,
                class_logits=tuple(dn_logits),
                mask_logits=tuple(dn_masks),
                mask_embeddings=tuple(dn_embeddings),
                box_predictions=tuple(dn_boxes),
            )
        return MaskDINODecoderOutput(
            intermediate_hidden_states=intermediate_hidden_states,
            intermediate_reference_points=torch.stack(references, 1),
            init_reference_points=init_reference,
            class_logits=tuple(class_logits),
            mask_logits=tuple(mask_logits),
            mask_embeddings=tuple(mask_embeddings) if predict_all_masks else None,
            box_predictions=tuple(boxes),
            query_selection=selection,
            denoising_outputs=denoising,
            decoder_hidden_states=all_states,
            decoder_attentions=self_attentions,
            cross_attentions=cross_attentions,
        )


def reject_unsupported_kwargs(model_name: str, kwargs: dict) -> None:
    """Refuse keywords the forward does not use, instead of silently ignoring them."""
    if kwargs:
        raise TypeError(
            f"{model_name}.forward() got unsupported keyword arguments {sorted(kwargs)}; it accepts the inputs in its "
            "signature plus output_attentions, output_hidden_states and return_dict"
        )


@contextmanager
def _progress_bars_unless_asked():
    """Transformers' progress bars ("Loading weights", "Writing model shards") off for one call, unless the
    environment asks for them (`MASKDINO_HF_PROGRESS=1`) or they are already off."""
    from transformers.utils import logging as hf_logging

    if os.environ.get("MASKDINO_HF_PROGRESS", "").lower() in ("1", "true", "yes", "on"):
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class MaskDINOPreTrainedModel(PreTrainedModel):
    config_class = MaskDINOConfig
    config: MaskDINOConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["MaskDINOPixelDecoderEncoderLayer", "MaskDINODecoderLayer"]

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, without progress bars unless `MASKDINO_HF_PROGRESS=1`."""
        with _progress_bars_unless_asked():
            return super().from_pretrained(*args, **kwargs)

    def save_pretrained(self, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, without progress bars unless `MASKDINO_HF_PROGRESS=1`."""
        with _progress_bars_unless_asked():
            return super().save_pretrained(*args, **kwargs)

    def resolve_output_flags(
        self, output_attentions: bool | None, output_hidden_states: bool | None, return_dict: bool | None
    ) -> tuple[bool, bool, bool]:
        """The standard output switches, each falling back to its config default."""
        config = self.config
        return (
            bool(config.output_attentions if output_attentions is None else output_attentions),
            bool(config.output_hidden_states if output_hidden_states is None else output_hidden_states),
            bool(config.return_dict if return_dict is None else return_dict),
        )

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, MaskDINOMultiscaleDeformableAttention):
            nn.init.zeros_(module.sampling_offsets.weight)
            thetas = torch.arange(module.n_heads, dtype=torch.float32) * (2.0 * math.pi / module.n_heads)
            grid = torch.stack([thetas.cos(), thetas.sin()], -1)
            grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(module.n_heads, 1, 1, 2)
            grid = grid.repeat(1, module.n_levels, module.n_points, 1)
            grid = grid * torch.arange(1, module.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
            module.sampling_offsets.bias.copy_(grid.view(-1))
            nn.init.zeros_(module.attention_weights.weight)
            nn.init.zeros_(module.attention_weights.bias)
            nn.init.xavier_uniform_(module.value_proj.weight)
            nn.init.zeros_(module.value_proj.bias)
            nn.init.xavier_uniform_(module.output_proj.weight)
            nn.init.zeros_(module.output_proj.bias)
        elif isinstance(module, MaskDINOPixelDecoder):
            nn.init.normal_(module.level_embed)
        elif isinstance(module, MaskDINODecoder):
            nn.init.zeros_(module.bbox_embed.layers[-1].weight)
            nn.init.zeros_(module.bbox_embed.layers[-1].bias)
        elif isinstance(module, (nn.Linear, nn.Conv2d)) and not getattr(module, "_is_hf_initialized", False):
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
            else:
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            nn.init.xavier_uniform_(module.in_proj_weight)
            nn.init.zeros_(module.in_proj_bias)


class MaskDINOFrozenBatchNorm2d(DeformableDetrFrozenBatchNorm2d):
    """Batch norm with fixed statistics and affine parameters, evaluated as detectron2's `FrozenBatchNorm2d`: an
    affine map when gradients flow, `F.batch_norm` in inference mode otherwise. Both are the same function; keeping
    detectron2's choice makes converted backbones give the official features to the last bit."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.requires_grad:
            return super().forward(hidden_states)
        return F.batch_norm(
            hidden_states, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=1e-5
        )

    def normalize_(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`forward` written over `hidden_states` (a map the caller owns and reads no more) when nothing is traced
        and no gradient is recorded: `F.batch_norm`'s own kernel, whose elementwise pass may write where it reads, so
        the values are the same to the last bit and no second full-size map is allocated (at 800x1088 a res2 map is
        56 MB, fresh pages from the system at every call)."""
        traced = torch.compiler.is_compiling() or torch.jit.is_tracing()
        if traced or (torch.is_grad_enabled() and hidden_states.requires_grad) or not hidden_states.is_contiguous():
            return self(hidden_states)
        torch.ops.aten.native_batch_norm.out(
            hidden_states, self.weight, self.bias, self.running_mean, self.running_var, False, 0.0, 1e-5,
            out=hidden_states, save_mean=hidden_states.new_empty(0), save_invstd=hidden_states.new_empty(0),
        )
        return hidden_states

    def scale_and_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel affine map `x * scale + shift` this norm computes (shapes (channels,))."""
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        return scale, self.bias - self.running_mean * scale


def is_channels_last(hidden_states: torch.Tensor) -> bool:
    """Whether a 4-d map is laid out channels-last and not also channels-first (as maps of 1x1 pixels or 1 channel
    are): the layout that selects the backbone's fast inference path."""
    return hidden_states.is_contiguous(memory_format=torch.channels_last) and not hidden_states.is_contiguous()


class MaskDINOConvNormLayer(nn.Module):
    """A backbone convolution, its frozen batch norm and its activation, under the parameter names of Transformers'
    ResNet layers (`convolution`, `normalization`), so state dicts are unchanged.

    On channels-last maps with no gradient to compute (the fast inference path), the norm is folded into the
    convolution: weight * scale and bias * scale + shift, recomputed from the current values at every call (one pass
    over the weights instead of one over the activations, and nothing cached that could go stale after
    `load_state_dict` or `.to()`). Folding only reorders float rounding, but the fixtures' random R50 amplifies that
    to ~1e-3 by res5, so channels-first maps keep the official conv-then-norm arithmetic; gradients always do.
    """

    def __init__(
        self, convolution: nn.Conv2d, normalization: MaskDINOFrozenBatchNorm2d, activation: nn.Module | None = None
    ):
        super().__init__()
        self.convolution = convolution
        self.normalization = normalization
        self.activation = nn.Identity() if activation is None else activation

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        convolution = self.convolution
        needs_grad = torch.is_grad_enabled() and (hidden_states.requires_grad or convolution.weight.requires_grad)
        if needs_grad:
            return self.activation(self.normalization(convolution(hidden_states)))
        if is_channels_last(hidden_states):
            scale, shift = self.normalization.scale_and_shift()
            bias = shift if convolution.bias is None else torch.addcmul(shift, convolution.bias, scale)
            weight = convolution.weight * scale.view(-1, 1, 1, 1)
            hidden_states = convolution._conv_forward(hidden_states, weight, bias)
        else:
            hidden_states = self.normalization.normalize_(convolution(hidden_states))
        return activate_in_place(self.activation, hidden_states)


def freeze_batch_norms(module: nn.Module) -> None:
    """Replace every `nn.BatchNorm2d` below `module` with `MaskDINOFrozenBatchNorm2d`, keeping its values, every
    Transformers ResNet convolution + norm (+ activation) layer with `MaskDINOConvNormLayer`, which folds the norm on
    the fast inference path, and the residual blocks' final ReLU with an in-place one."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = MaskDINOFrozenBatchNorm2d(child.num_features)
            if child.weight.device != torch.device("meta"):
                for buffer in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, buffer).copy_(getattr(child, buffer).detach())
            setattr(module, name, frozen)
            continue
        freeze_batch_norms(child)
        if isinstance(child, (ResNetConvLayer, ResNetShortCut)):
            layer = MaskDINOConvNormLayer(child.convolution, child.normalization, getattr(child, "activation", None))
            setattr(module, name, layer)
        elif isinstance(child, (ResNetBasicLayer, ResNetBottleNeckLayer)) and type(child.activation) is nn.ReLU:
            # The block's ReLU runs on its own sum (block output + shortcut): in place, the same values without
            # another full-size map per block.
            child.activation = nn.ReLU(inplace=True)


class MaskDINOModel(MaskDINOPreTrainedModel):
    """Backbone, pixel decoder and transformer decoder with its prediction heads."""

    def __init__(self, config: MaskDINOConfig):
        super().__init__(config)
        self.backbone = load_backbone(config)
        if config.freeze_backbone_batch_norms:
            freeze_batch_norms(self.backbone)
        if hasattr(self.backbone, "swin"):
            # Transformers' Swin backbone carries the classifier's final norm, which the feature maps never use.
            self.backbone.swin.layernorm = nn.Identity()
        channels = dict(zip(BACKBONE_FEATURES, self.backbone.channels))
        if len(self.backbone.out_features) != 4:
            raise ValueError(
                f"the backbone must return 4 maps (strides 4, 8, 16, 32 = res2..res5), got {self.backbone.out_features}"
            )
        self.pixel_decoder = MaskDINOPixelDecoder(config, channels)
        self.decoder = MaskDINODecoder(config)
        self.post_init()

    @property
    def encoder_strides(self) -> list[int]:
        """Stride of every encoder level: the backbone maps, then the extra levels, each halving the one before."""
        decoder = self.pixel_decoder
        strides = [2 ** (BACKBONE_FEATURES.index(name) + 2) for name in decoder.encoder_features]
        source = 2 ** (BACKBONE_FEATURES.index(decoder.extra_source) + 2)
        return strides + [source * 2 ** (level + 1) for level in range(len(decoder.extra_projections))]

    @property
    def min_input_size(self) -> int:
        """The coarsest encoder stride: the smallest height and width the model takes."""
        return max(self.encoder_strides)

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        targets: list[dict] | None = None,
        random_source=None,
        output_auxiliary_masks: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_proposal_boxes: bool = True,
        **kwargs,
    ) -> MaskDINOModelOutput | tuple:
        r"""
        pixel_values (`torch.Tensor` of shape (batch, 3, height, width)): normalised images, padded to the size
            divisibility. pixel_mask (`torch.Tensor` of shape (batch, height, width), *optional*): 1 on real pixels;
            validated only, since the official model attends to padded pixels too.
        targets (`list[dict]`, *optional*): per image `labels` and `boxes` (normalised cxcywh), for denoising.
        random_source: where the denoising noise is drawn (see `random_source.py`).
        output_auxiliary_masks (`bool`): also compute the intermediate layers' masks at inference.
        output_attentions / output_hidden_states / return_dict: as in every Transformers model (defaults from the
            config); `return_dict=False` returns `MaskDINOModelOutput.to_tuple()` (fields in declaration order,
            `None` fields left out).
        output_proposal_boxes (`bool`): compute `enc_outputs_coord_logits`, the box of every encoder token (the box
            head on every token; the selected tokens' boxes do not need it).
        """
        reject_unsupported_kwargs(type(self).__name__, kwargs)
        output_attentions, output_hidden_states, return_dict = self.resolve_output_flags(
            output_attentions, output_hidden_states, return_dict
        )
        _check_pixel_inputs(pixel_values, pixel_mask, self.encoder_strides, self.config, self.dtype)
        if torch.is_autocast_enabled(pixel_values.device.type):
            # The fast path: channels-last convolutions skip oneDNN's layout reorders and the backbone's frozen batch
            # norms are folded into its convolutions (`MaskDINOConvNormLayer`); every map stays channels-last from here
            # to the pixel decoder. Taken in fp32 too when pixel_values come channels-last: not by default, because
            # the different rounding moves the random-weight fixtures' res4 by ~1e-4 from the official features.
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        backbone_maps = self.backbone(pixel_values).feature_maps[-4:]
        features = dict(zip(BACKBONE_FEATURES, backbone_maps))
        multi_scale_features, mask_features, encoder_states, encoder_attentions = self.pixel_decoder(
            features, output_attentions, output_hidden_states
        )
        if random_source is None and self.training:
            random_source = MaskDINORandomSource()
        decoded = self.decoder(
            multi_scale_features, mask_features, targets, random_source, output_auxiliary_masks, output_attentions,
            output_hidden_states, output_proposal_boxes,
        )
        selection = decoded.query_selection or MaskDINOQuerySelectionOutput()
        outputs = MaskDINOModelOutput(
            backbone_features=tuple(backbone_maps),
            multi_scale_features=tuple(multi_scale_features),
            mask_features=mask_features,
            enc_outputs_class=selection.enc_outputs_class,
            enc_outputs_coord_logits=selection.enc_outputs_coord_logits,
            enc_topk_indices=selection.enc_topk_indices,
            enc_topk_logits=selection.enc_topk_logits,
            enc_topk_boxes=selection.enc_topk_boxes,
            enc_topk_masks=selection.enc_topk_masks,
            enc_topk_mask_embeddings=selection.enc_topk_mask_embeddings if decoded.mask_embeddings else None,
            init_reference_points=decoded.init_reference_points,
            intermediate_hidden_states=decoded.intermediate_hidden_states,
            intermediate_reference_points=decoded.intermediate_reference_points,
            class_logits=decoded.class_logits,
            mask_logits=decoded.mask_logits,
            mask_embeddings=decoded.mask_embeddings,
            box_predictions=decoded.box_predictions,
            denoising_outputs=decoded.denoising_outputs,
            encoder_hidden_states=encoder_states,
            encoder_attentions=encoder_attentions,
            decoder_hidden_states=decoded.decoder_hidden_states,
            decoder_attentions=decoded.decoder_attentions,
            cross_attentions=decoded.cross_attentions,
        )
        return outputs if return_dict else outputs.to_tuple()


class MaskDINOForUniversalSegmentation(MaskDINOPreTrainedModel):
    """Mask DINO with its loss: instance, panoptic and semantic segmentation and detection from one model.

    Compiled inference: `model.compile(fullgraph=True)` (or `maskdino_hf.export.compile_model(model)`, or
    `torch.compile(model)`) compiles the forward pass with Inductor, on CPU and GPU, as one graph. Keep `dynamic` at
    its default (None) for images of varying sizes: one static compilation, then one with symbolic sizes at the first
    size change; `dynamic=False` when every input has one size. ONNX: `maskdino_hf.export.export_onnx`."""

    def __init__(self, config: MaskDINOConfig):
        super().__init__(config)
        self.model = MaskDINOModel(config)
        self.post_init()

    @cached_property
    def criterion(self) -> MaskDINOLoss:
        """The model's one loss object, built on first use from the config. Kept out of the module tree (a cached
        attribute, not a submodule), so it adds nothing to the state dict; it moves its few constants to the
        predictions' device itself."""
        return MaskDINOLoss(self.config)

    def save_pretrained(self, *args, **kwargs):
        """Save as Transformers does, with `auto_map` also naming this class for the Auto classes the
        image-segmentation and object-detection pipelines load through, so `trust_remote_code` pipelines work."""
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        for auto_class in ("AutoModelForImageSegmentation", "AutoModelForObjectDetection"):
            auto_map.setdefault(auto_class, f"modeling_maskdino.{type(self).__name__}")
        self.config.auto_map = auto_map
        return super().save_pretrained(*args, **kwargs)

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        mask_labels: list[torch.Tensor] | None = None,
        class_labels: list[torch.Tensor] | None = None,
        boxes: list[torch.Tensor] | None = None,
        random_source=None,
        output_auxiliary_masks: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MaskDINOForUniversalSegmentationOutput | tuple:
        r"""
        mask_labels (`list[torch.Tensor]`, *optional*): per image (num_targets, height, width) binary masks at the
            padded input size. class_labels (`list[torch.Tensor]`, *optional*): per image (num_targets,) class ids.
        boxes (`list[torch.Tensor]`, *optional*): per image (num_targets, 4) normalised cxcywh boxes (of the unpadded
            image); computed from the masks when omitted.
        output_attentions / output_hidden_states / return_dict: as in every Transformers model (defaults from the
            config); `return_dict=False` returns `MaskDINOForUniversalSegmentationOutput.to_tuple()`.
        """
        reject_unsupported_kwargs(type(self).__name__, kwargs)
        output_attentions, output_hidden_states, return_dict = self.resolve_output_flags(
            output_attentions, output_hidden_states, return_dict
        )
        _check_targets(pixel_values, mask_labels, class_labels, boxes, self.config.num_labels)
        targets = None
        if class_labels is not None:
            targets = self._build_targets(pixel_values, mask_labels, class_labels, boxes, pixel_mask)
        outputs = self.model(
            pixel_values,
            pixel_mask,
            targets=targets,
            random_source=random_source,
            output_auxiliary_masks=bool(output_auxiliary_masks) or targets is not None,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            output_proposal_boxes=False,  # neither these outputs nor the loss read every token's box
        )
        auxiliary = [
            {"class_queries_logits": logits, "masks_queries_logits": masks, "pred_boxes": box}
            for logits, masks, box in zip(outputs.class_logits[:-1], outputs.mask_logits[:-1], outputs.box_predictions[:-1])
        ]
        loss = loss_dict = None
        if targets is not None:
            loss, loss_dict = self.criterion(outputs, targets, random_source)
        result = MaskDINOForUniversalSegmentationOutput(
            loss=loss,
            loss_dict=loss_dict,
            class_queries_logits=outputs.class_logits[-1],
            masks_queries_logits=outputs.mask_logits[-1],
            pred_boxes=outputs.box_predictions[-1],
            auxiliary_outputs=auxiliary,
            enc_topk_logits=outputs.enc_topk_logits,
            enc_topk_boxes=outputs.enc_topk_boxes,
            enc_topk_masks=outputs.enc_topk_masks,
            mask_features=outputs.mask_features,
            intermediate_hidden_states=outputs.intermediate_hidden_states if output_hidden_states else None,
            backbone_features=outputs.backbone_features if output_hidden_states else None,
            multi_scale_features=outputs.multi_scale_features if output_hidden_states else None,
            encoder_hidden_states=outputs.encoder_hidden_states,
            encoder_attentions=outputs.encoder_attentions,
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
        )
        return result if return_dict else result.to_tuple()

    def _build_targets(self, pixel_values, mask_labels, class_labels, boxes, pixel_mask=None) -> list[dict]:
        """Per-image loss targets (validated by `_check_targets`). Boxes missing from the inputs are the masks' tight
        boxes, normalised by the unpadded image size (read from `pixel_mask`) as the official targets are."""
        targets = []
        for index in range(pixel_values.shape[0]):
            labels = class_labels[index].to(pixel_values.device).long()
            target = {"labels": labels, "masks": mask_labels[index].to(pixel_values.device, pixel_values.dtype)}
            if boxes is not None:
                target["boxes"] = boxes[index].to(pixel_values.device, pixel_values.dtype)
            else:
                height, width = pixel_values.shape[-2:]
                if pixel_mask is not None:
                    valid = pixel_mask[index].bool()
                    height, width = int(valid.any(1).sum()), int(valid.any(0).sum())
                scale = torch.tensor([width, height, width, height], device=pixel_values.device, dtype=torch.float32)
                corners = mask_boxes(target["masks"] > 0.5, "bitmask")
                target["boxes"] = (corners_to_center_format(corners) / scale).to(pixel_values.dtype)
            targets.append(target)
        return targets


__all__ = [
    "MaskDINOModel",
    "MaskDINOForUniversalSegmentation",
    "MaskDINOPreTrainedModel",
    "MaskDINOModelOutput",
    "MaskDINOForUniversalSegmentationOutput",
    "MaskDINODecoderOutput",
    "MaskDINODenoisingOutput",
    "MaskDINOQuerySelectionOutput",
]
