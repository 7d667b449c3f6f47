"""Training objective of Mask DINO: the hybrid Hungarian matcher and the set criterion (paper, Sec. 3.4 and 4).

Mask DINO supervises every query set it produces with the same three groups of terms, classification (sigmoid focal
loss, or softmax cross-entropy for the semantic models), box (L1 + GIoU on normalised cxcywh boxes) and mask
(binary cross-entropy + dice on PointRend-style sampled points):

* the matching queries of the final decoder layer and of every auxiliary layer (the initial prediction from the
  selected queries included), each matched to the ground truth by its own *hybrid* bipartite matching whose cost
  mixes the class, box and mask terms;
* the encoder proposals picked by query selection (`interm`), also matched on their own;
* the denoising groups (unified denoising, `seg` or `det`): query `g * single_pad + j` reconstructs ground-truth
  object `j` of its image, so no matching is needed; their losses are normalised by `num_masks * groups`.

What Transformers already has and is the same math is imported: the focal loss of the DETR family, the dice / point
BCE losses and their pairwise forms from Mask2Former, `center_to_corners_format`. What is Mask
DINO's own lives here: the GIoU with an epsilon in both denominators, the focal *matching* cost, the hybrid matcher
with one random point set per image, PointRend importance sampling that takes its random numbers from a
[`~random_source.MaskDINORandomSource`], the denoising terms and the decoupled box loss of panoptic models
(`config.panoptic_box_loss`: box terms ignore pairs whose ground-truth label is in `config.stuff_labels`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.image_transforms import center_to_corners_format
from transformers.loss.loss_for_object_detection import sigmoid_focal_loss
from transformers.models.mask2former.modeling_mask2former import (
    dice_loss,
    pair_wise_dice_loss,
    sigmoid_cross_entropy_loss,
)
from transformers.utils import is_accelerate_available, is_scipy_available, logging

from .configuration_maskdino import MaskDINOConfig
from .random_source import MaskDINORandomSource


if is_scipy_available():
    from scipy.optimize import linear_sum_assignment

if TYPE_CHECKING:
    from .modeling_maskdino import MaskDINOModelOutput

logger = logging.get_logger(__name__)

# One entry per image: (indices of the matched predictions, indices of their ground-truth objects), int64.
Matching = list[tuple[Tensor, Tensor]]


def prediction_index(indices: Matching, device: torch.device) -> tuple[Tensor, Tensor]:
    """The (image, query) index pairs of a matching's predictions, image after image."""
    batch_idx = torch.cat([torch.full_like(pred, image) for image, (pred, _) in enumerate(indices)])
    pred_idx = torch.cat([pred for pred, _ in indices])
    return batch_idx.to(device), pred_idx.to(device)


class LayerPredictions(NamedTuple):
    """One prediction layer, under the model output's field names: class logits (batch, queries, C), mask logits
    (batch, queries, h, w) (any resolution: they are sampled at normalised coordinates) and sigmoid cxcywh boxes
    (batch, queries, 4) normalised to the padded input.

    Optionally the two factors of the mask logits, the mask embeddings (batch, queries, c) and the per-pixel embedding
    (batch, c, h, w), or its images (c, h, w) as a sequence: with them the mask terms form the masks of the supervised
    queries alone (`supervised_masks_of_layers`), so the backward pass never runs through the full-size masks of the
    other queries. The loss passes the images, split once for all layers: the gradients then add into the same
    per-image buffers, instead of each product stacking a new full-batch gradient (21 of 32 MB per step at 512x512).
    """

    class_logits: Tensor
    mask_logits: Tensor | None
    box_predictions: Tensor
    mask_embeddings: Tensor | None = None
    mask_features: Tensor | Sequence[Tensor] | None = None


def supervised_masks_of_layers(layers: Sequence[LayerPredictions], matchings: Sequence[Matching]) -> list[Tensor]:
    """The mask logits of the predictions `matchings[i]` names in `layers[i]`, image after image as
    `prediction_index` orders them: one (N_i, 1, h, w) float32 tensor per layer.

    The layers that carry the mask factors and share one per-pixel embedding get one product per image over the
    supervised queries of all of them, so the backward pass forms each image's per-pixel-embedding gradient in one
    matmul. Per-layer products would each write a full-size (c, h, w) gradient from a few queries (5 matched ones per
    image) and add it to the others: at 512x512, batch 2, for the 11 matched layers and the 10 denoising layers (100
    queries per image) of the R50 model, forward and backward of these products take 0.62 s against 0.91 s on 2
    cores. Layers without the factors index their full mask logits."""
    sources: list[Tensor | None] = [None] * len(layers)
    groups: dict[int, list[int]] = {}
    for index, layer in enumerate(layers):
        if layer.mask_embeddings is None or layer.mask_features is None:
            batch_idx, pred_idx = prediction_index(matchings[index], layer.class_logits.device)
            sources[index] = layer.mask_logits[batch_idx, pred_idx].float()[:, None]
        else:
            groups.setdefault(id(layer.mask_features), []).append(index)
    for members in groups.values():
        pieces = []  # per image: the supervised masks of each member layer
        for image, features in enumerate(layers[members[0]].mask_features):
            queries = [matchings[index][image][0].to(features.device) for index in members]
            embeddings = torch.cat(
                [layers[index].mask_embeddings[image][rows] for index, rows in zip(members, queries)]
            )
            pieces.append(torch.einsum("qc,chw->qhw", embeddings, features).split([len(rows) for rows in queries]))
        for position, index in enumerate(members):
            sources[index] = torch.cat([image_pieces[position] for image_pieces in pieces]).float()[:, None]
    return sources


COST_TERMS = ("class", "mask", "dice", "bbox", "giou")
# On the CPU: queries per block of the matcher's mask terms (`MaskDINOHungarianMatcher.compute_costs`) and masks per
# block of PointRend's uncertainty sampling (`MaskDINOLoss.sample_points_using_uncertainty`), small enough that the
# blocks' temporaries are reused from the allocator's free lists instead of faulted in afresh. Accelerators, whose
# allocators cache, take one block.
MATCHER_QUERY_BLOCK = 32
UNCERTAINTY_MASK_BLOCK = 16
# Masks per block of the mask terms (`MaskDINOLoss.loss_masks`), on the CPU, for the same reason.
LOSS_MASK_BLOCK = 32
BASE_LOSS_NAMES = ("loss_ce", "loss_mask", "loss_dice", "loss_bbox", "loss_giou")


def generalized_box_iou_with_eps(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """Generalized IoU of corner (x0, y0, x1, y1) boxes, broadcast against each other.

    Mask DINO's variant of the DETR function: `eps` is added to the union and to the enclosing area, so degenerate
    (zero-area) boxes give a finite value. Pass `boxes1[:, None]` and `boxes2[None]` for the pairwise (N, M) matrix,
    or two (N, 4) tensors for the GIoU of each pair. Computed in float32 at least.
    """
    boxes1 = boxes1.float() if boxes1.dtype not in (torch.float32, torch.float64) else boxes1
    boxes2 = boxes2.to(boxes1.dtype)
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    inter_wh = (torch.min(boxes1[..., 2:], boxes2[..., 2:]) - torch.max(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = area1 + area2 - inter
    iou = inter / (union + eps)
    hull_wh = (torch.max(boxes1[..., 2:], boxes2[..., 2:]) - torch.min(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return iou - (hull - union) / (hull + eps)


def focal_class_cost(logits: Tensor, target_labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Matching cost of the sigmoid classifier, (N, num_targets): focal loss of "is the target class" minus focal loss
    of "is not", evaluated at each prediction's probability of each target's class (1e-8 inside the logs)."""
    prob = logits.sigmoid()
    positive = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    negative = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
    return positive[:, target_labels] - negative[:, target_labels]


def maskdino_weight_dict(config: MaskDINOConfig) -> dict[str, float]:
    """Weight of every loss term, built like the official model: base terms, `_interm` (two-stage), `_dn` (of the
    previous keys; `det` denoising has no mask terms), then `_{i}` copies of all of them for i < `decoder_layers`
    (deep supervision). Keys that are never produced (e.g. `loss_ce_interm_dn`) are harmless."""
    weights = {
        "loss_ce": config.class_weight,
        "loss_mask": config.mask_weight,
        "loss_dice": config.dice_weight,
        "loss_bbox": config.box_weight,
        "loss_giou": config.giou_weight,
    }
    if config.two_stage:
        weights.update({f"{name}_interm": value for name, value in list(weights.items())})
    if config.denoising == "seg":
        weights.update({f"{name}_dn": value for name, value in list(weights.items())})
    elif config.denoising == "det":
        weights.update(
            {f"{name}_dn": value for name, value in list(weights.items()) if name not in ("loss_mask", "loss_dice")}
        )
    if config.deep_supervision:
        per_layer = dict(weights)
        for layer in range(config.decoder_layers):
            weights.update({f"{name}_{layer}": value for name, value in per_layer.items()})
    return weights


def pair_wise_sigmoid_cross_entropy_cost(inputs: Tensor, labels: Tensor) -> Tensor:
    """Mean binary cross-entropy of every prediction (rows of `inputs`, logits (N, P)) against every target (rows of
    `labels`, (M, P) in [0, 1]), (N, M). Mask2Former's `pair_wise_sigmoid_cross_entropy_loss` in one softplus and one
    matmul: BCE(x, 1) = BCE(x, 0) - x, so the sum over points is softplus(x).sum() - x @ labels."""
    return (F.softplus(inputs).sum(-1, keepdim=True) - inputs @ labels.T) / inputs.shape[-1]


def point_sample(values: Tensor, points: Tensor) -> Tensor:
    """Bilinear samples of (N, C, H, W) `values` at (N, P, 2) normalised (x, y) points in [0, 1], zero outside:
    (N, C, P). Mask2Former's `sample_point` with `align_corners=False`, with the same arithmetic (`2 * p - 1`) but one
    temporary for the grid instead of two: the point sets (3 x 12544 candidates per supervised mask) are the largest
    tensors of the loss, and on the CPU a fresh one costs more in page faults than the sampling itself."""
    grid = points.mul(2.0).sub_(1.0).unsqueeze(2)
    return F.grid_sample(values, grid, align_corners=False).squeeze(3)


def sample_target_masks(targets: list[dict[str, Tensor]], points: Tensor, target_indices: list[Tensor]) -> Tensor:
    """Target masks bilinearly sampled at normalised points, as `point_sample` on the official zero-padded stack of
    the targets' masks would, without copying a mask per entry.

    `target_indices[b]` names, for each of image b's entries, the target mask it reads (a target may be named many
    times: the denoising groups repeat every target); `points` (sum of entries, P, 2) holds the entries' points,
    image after image. Each image's masks are sampled once, with the points of all entries naming the same target
    stacked side by side. Returns (sum of entries, P) float32 values.
    """
    height = max(target["masks"].shape[-2] for target in targets)
    width = max(target["masks"].shape[-1] for target in targets)
    num_points = points.shape[1]
    values = []
    for target, target_idx, image_points in zip(
        targets, target_indices, points.split([len(index) for index in target_indices])
    ):
        if len(target_idx) == 0:
            continue
        masks = target["masks"].to(device=points.device, dtype=points.dtype)
        if masks.shape[-2:] != (height, width):
            masks = F.pad(masks, (0, width - masks.shape[-1], 0, height - masks.shape[-2]))
        target_idx = target_idx.cpu()
        counts = torch.bincount(target_idx, minlength=len(masks))
        # rank of each entry among the entries naming the same target (0, 1, ... in entry order)
        order = torch.argsort(target_idx, stable=True)
        first_of_target = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(target_idx)
        rank[order] = torch.arange(len(target_idx)) - first_of_target[target_idx[order]]
        target_idx, rank = target_idx.to(points.device), rank.to(points.device)
        grid = image_points.new_zeros(len(masks), int(counts.max()), num_points, 2)
        grid[target_idx, rank] = image_points
        sampled = point_sample(masks[:, None], grid.flatten(1, 2))[:, 0]
        values.append(sampled.view(len(masks), -1, num_points)[target_idx, rank])
    if not values:
        return points.new_zeros(0, num_points)
    return torch.cat(values)


class MaskDINOHungarianMatcher(nn.Module):
    """Hybrid bipartite matching of Mask DINO: class, box and mask costs.

    For each image, the cost between prediction q and ground-truth object t is
    `cost_class_weight * focal_class_cost + cost_box_weight * L1(cxcywh) - cost_giou_weight * GIoU
    + cost_mask_weight * BCE + cost_dice_weight * dice`, the two mask terms evaluated at `train_num_points` random
    points drawn once per image (`random_source.rand(1, P, 2)`, images in batch order) and shared by all its
    predictions and targets. The costs of the whole batch are computed at once, moved to the CPU once, and
    `scipy.optimize.linear_sum_assignment` is solved per image. The official matcher's `panoptic_on` branch is dead
    code in the official model (the matcher is always built without it) and is not reproduced.
    """

    def __init__(self, config: MaskDINOConfig):
        super().__init__()
        self.class_cost = config.cost_class_weight
        self.mask_cost = config.cost_mask_weight
        self.dice_cost = config.cost_dice_weight
        self.bbox_cost = config.cost_box_weight
        self.giou_cost = config.cost_giou_weight
        self.config = config  # focal_alpha, focal_gamma, train_num_points: read where used
        if self.class_cost == 0 and self.mask_cost == 0 and self.dice_cost == 0:
            raise ValueError("cost_class_weight, cost_mask_weight and cost_dice_weight cannot all be 0")

    def draw_points(
        self, batch_size: int, device: torch.device, random_source: MaskDINORandomSource
    ) -> Tensor:
        """The mask points of one matching, (batch, train_num_points, 2): one `rand(1, P, 2)` per image, in image
        order like the official per-image loop."""
        points = [random_source.rand(1, self.config.train_num_points, 2, device=device) for _ in range(batch_size)]
        return torch.cat(points).float()

    @torch.no_grad()
    def compute_costs(
        self,
        outputs: LayerPredictions,
        targets: list[dict[str, Tensor]],
        random_source: MaskDINORandomSource | None = None,
        points: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted cost and its unweighted terms for the whole batch.

        Returns `(cost, terms)`: `cost` is (batch, num_queries, total_targets) with the targets of all images
        concatenated in order (only each image's own block is meaningful), `terms` maps `class`, `mask`, `dice`,
        `bbox`, `giou` to tensors of the same shape. The mask points are `points` ((batch, P, 2), see `draw_points`)
        or drawn from `random_source`.
        """
        logits = outputs.class_logits.float()
        batch_size, num_queries = logits.shape[:2]
        device = logits.device
        if points is None:
            random_source = random_source if random_source is not None else MaskDINORandomSource()
            points = self.draw_points(batch_size, device, random_source)
        pred_boxes = outputs.box_predictions.float().flatten(0, 1)
        pred_masks = outputs.mask_logits.float()

        target_labels = torch.cat([t["labels"] for t in targets]).to(device=device, dtype=torch.int64)
        target_boxes = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=torch.float32)
        sizes = [len(t["labels"]) for t in targets]

        # every target of an image at the image's points
        target_indices = [torch.arange(size) for size in sizes]
        entry_points = points.repeat_interleave(torch.tensor(sizes, device=device), 0, output_size=sum(sizes))
        target_points = sample_target_masks(targets, entry_points, target_indices)
        # The mask terms block by block of queries: the point logits of all queries and their sigmoid and softplus
        # would be the matcher's largest temporaries (30 MB each for 2 x 300 queries), fresh memory at every layer.
        block_costs = []  # (2, B, q, targets) each: BCE and dice
        query_block = MATCHER_QUERY_BLOCK if device.type == "cpu" else num_queries
        for block in pred_masks.split(query_block, dim=1):
            block_points = point_sample(block, points).flatten(0, 1)  # (B*q, P)
            costs = [pair_wise_sigmoid_cross_entropy_cost(block_points, target_points),
                     pair_wise_dice_loss(block_points, target_points)]
            block_costs.append(torch.stack(costs).view(2, batch_size, block.shape[1], -1))
        mask_cost, dice_cost = torch.cat(block_costs, 2).flatten(1, 2)

        terms = {
            "class": focal_class_cost(
                logits.flatten(0, 1), target_labels, self.config.focal_alpha, self.config.focal_gamma
            ),
            "mask": mask_cost,
            "dice": dice_cost,
            "bbox": torch.cdist(pred_boxes, target_boxes, p=1),
            "giou": -generalized_box_iou_with_eps(
                center_to_corners_format(pred_boxes)[:, None], center_to_corners_format(target_boxes)[None]
            ),
        }
        cost = (
            self.class_cost * terms["class"]
            + self.mask_cost * terms["mask"]
            + self.dice_cost * terms["dice"]
            + self.bbox_cost * terms["bbox"]
            + self.giou_cost * terms["giou"]
        )
        shape = (batch_size, num_queries, -1)
        return cost.view(shape), {name: term.view(shape) for name, term in terms.items()}

    @torch.no_grad()
    def match_layers(
        self, layers: list[LayerPredictions], targets: list[dict[str, Tensor]], points: list[Tensor]
    ) -> list[Matching]:
        """Match several prediction layers at once, `points[i]` being layer i's mask points (`draw_points`): the
        costs of all layers are moved to the CPU in one transfer, then each (layer, image) is solved by
        `scipy.optimize.linear_sum_assignment`."""
        costs = [self.compute_costs(layer, targets, points=points_)[0] for layer, points_ in zip(layers, points)]
        flat = torch.cat([cost.flatten() for cost in costs]).cpu()
        costs = [block.view(cost.shape) for block, cost in zip(flat.split([cost.numel() for cost in costs]), costs)]
        sizes = [len(t["labels"]) for t in targets]
        matchings = []
        for cost in costs:
            indices = []
            for image, block in enumerate(cost.split(sizes, -1)):
                if block.shape[-1] == 0:
                    empty = torch.zeros(0, dtype=torch.int64)
                    indices.append((empty, empty.clone()))
                    continue
                pred_idx, tgt_idx = linear_sum_assignment(block[image].numpy())
                indices.append(
                    (torch.as_tensor(pred_idx, dtype=torch.int64), torch.as_tensor(tgt_idx, dtype=torch.int64))
                )
            matchings.append(indices)
        return matchings

    @torch.no_grad()
    def per_image_costs(
        self,
        outputs: LayerPredictions,
        targets: list[dict[str, Tensor]],
        random_source: MaskDINORandomSource | None = None,
    ) -> list[dict[str, Tensor]]:
        """The cost matrices each image's assignment is solved on: per image a dict with `total` (the weighted cost,
        (num_queries, num_targets_of_image)) and the unweighted terms `class`, `mask`, `dice`, `bbox`, `giou`."""
        cost, terms = self.compute_costs(outputs, targets, random_source)
        sizes = [len(t["labels"]) for t in targets]
        blocks = {"total": cost.split(sizes, -1), **{name: term.split(sizes, -1) for name, term in terms.items()}}
        return [{name: block[b][b] for name, block in blocks.items()} for b in range(len(targets))]

    @torch.no_grad()
    def forward(
        self,
        outputs: LayerPredictions,
        targets: list[dict[str, Tensor]],
        random_source: MaskDINORandomSource | None = None,
    ) -> Matching:
        """Match the predictions of one layer to the targets.

        Args:
            outputs: one layer's `class_logits`, `mask_logits` and `box_predictions`.
            targets: one dict per image with `labels` (n,), `boxes` (n, 4) normalised cxcywh and `masks` (n, H, W).
            random_source: where the mask points come from (torch's global RNG by default).

        Returns:
            Per image `(pred_idx, tgt_idx)`, int64 CPU tensors of length min(num_queries, n), `pred_idx` ascending
            (the official layout); empty for an image without targets.
        """
        random_source = random_source if random_source is not None else MaskDINORandomSource()
        points = self.draw_points(outputs.class_logits.shape[0], outputs.class_logits.device, random_source)
        return self.match_layers([outputs], targets, [points])[0]


class MaskDINOLoss(nn.Module):
    """Set criterion of Mask DINO.

    Call it with the model's outputs ([`MaskDINOModelOutput`]), read field by field, and the per-image targets:

    * `outputs.class_logits`, `outputs.mask_logits`, `outputs.box_predictions`: one entry per prediction layer, the
      final decoder layer last, denoising queries removed (with `initial_pred`, entry 0 is the prediction from the
      selected queries before the first decoder layer, entry i after decoder layer i-1); the final layer is matched
      and supervised, the earlier ones too with `deep_supervision`;
    * `outputs.enc_topk_logits`, `enc_topk_masks`, `enc_topk_boxes` (two-stage only): the selected encoder
      proposals (`interm`);
    * `outputs.denoising_outputs` ([`MaskDINODenoisingOutput`], `None` when no denoising queries were built, e.g.
      no image has a target): `num_groups`, `pad_size` and the denoising queries' `class_logits`, `mask_logits`,
      `box_predictions` per layer; denoising query `g * pad_size / num_groups + j` of image b reconstructs
      `targets[b]` object j.
    * `targets`: one dict per image with `labels` (n,) int64, `boxes` (n, 4) cxcywh normalised by the UNPADDED
      image size, `masks` (n, H, W) bool/uint8/float zero-padded to the padded batch size. n may be 0.
    * `random_source`: the source of the matcher and PointRend points (torch's global RNG by default).

    Returns `(loss, loss_dict)`: `loss_dict` holds every produced term multiplied by its weight (`weight_dict`,
    built like the official one), with the official names `loss_{ce,mask,dice,bbox,giou}` plus `_{i}` (auxiliary
    layer i), `_interm`, `_dn`, `_dn_{i}`; `loss` is their sum. [`compute_loss_terms`] gives the unweighted terms
    and the matchings.

    Predictions of any floating dtype are accepted; every term is computed in float32.
    """

    def __init__(self, config: MaskDINOConfig, matcher: MaskDINOHungarianMatcher | None = None):
        super().__init__()
        self.num_labels = config.num_labels
        self.matcher = matcher if matcher is not None else MaskDINOHungarianMatcher(config)
        self.weight_dict = maskdino_weight_dict(config)
        self.denoising = config.denoising
        if config.denoising == "seg":
            self.denoising_losses = ("labels", "masks", "boxes")
        elif config.denoising == "det":
            self.denoising_losses = ("labels", "boxes")
        else:
            self.denoising_losses = ()
        self.deep_supervision = config.deep_supervision
        self.semantic_ce_loss = config.semantic_ce_loss
        self.panoptic_box_loss = config.panoptic_box_loss
        self.config = config  # focal and point-sampling settings: read where used

        empty_weight = torch.ones(config.num_labels + 1)
        empty_weight[-1] = config.no_object_weight
        self.register_buffer("empty_weight", empty_weight)
        stuff_labels = torch.tensor(list(config.stuff_labels), dtype=torch.int64)
        self.register_buffer("stuff_labels", stuff_labels, persistent=False)
        if config.panoptic_box_loss and not config.stuff_labels:
            logger.warning_once("panoptic_box_loss=True but config.stuff_labels is empty: no box term is skipped")

    # ----------------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _matched_targets(targets: list[dict[str, Tensor]], indices: Matching, key: str, device) -> Tensor:
        return torch.cat([t[key][tgt.to(t[key].device)] for t, (_, tgt) in zip(targets, indices)]).to(device)

    def _num_masks(self, targets: list[dict[str, Tensor]], device: torch.device) -> Tensor:
        """Number of target masks in the batch, averaged over processes, at least 1 (a 0-dim float tensor)."""
        num_masks = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if is_accelerate_available():
            from accelerate import PartialState
            from accelerate.utils import reduce

            if distributed or PartialState._shared_state != {}:
                num_masks = reduce(num_masks, reduction="mean")
        elif distributed:
            torch.distributed.all_reduce(num_masks)
            num_masks = num_masks / torch.distributed.get_world_size()
        return num_masks.clamp(min=1)[0]

    def draw_point_candidates(
        self, num_masks: int, device: torch.device, random_source: MaskDINORandomSource
    ) -> tuple[Tensor, Tensor | None]:
        """The random numbers of PointRend point selection for `num_masks` masks: `rand(N, 3P, 2)` candidates, then
        `rand(N, P - int(0.75 P), 2)` uniform points (`None` when there are none; shown for the default ratios)."""
        num_candidates, _, _ = self._point_counts()
        candidates = random_source.rand(num_masks, num_candidates, 2, device=device).float()
        return candidates, self._draw_uniform_points(num_masks, device, random_source)

    def _point_counts(self) -> tuple[int, int, int]:
        """PointRend's candidates, most uncertain points kept, and uniform points per mask."""
        num_points = self.config.train_num_points
        num_uncertain = int(self.config.importance_sample_ratio * num_points)
        return int(num_points * self.config.oversample_ratio), num_uncertain, num_points - num_uncertain

    def _draw_uniform_points(
        self, num_masks: int, device: torch.device, random_source: MaskDINORandomSource
    ) -> Tensor | None:
        _, _, num_random = self._point_counts()
        return random_source.rand(num_masks, num_random, 2, device=device).float() if num_random > 0 else None

    def sample_points_using_uncertainty(
        self,
        mask_logits: Tensor,
        random_source: MaskDINORandomSource | None = None,
        draws: tuple[Tensor, Tensor | None] | None = None,
    ) -> Tensor:
        """PointRend point selection for (N, 1, h, w) mask logits: of the candidates (`draws`, or drawn now as
        `draw_point_candidates` would), keep the `importance_sample_ratio * num_points` most uncertain ones (smallest
        |logit|), then the uniform points. Returns (N, num_points, 2) coordinates in [0, 1]. The kept candidates are
        in no particular order: the losses sum over points."""
        num_masks, device = mask_logits.shape[0], mask_logits.device
        num_candidates, num_uncertain, num_random = self._point_counts()
        # Block by block of masks: the candidates, their grid and logits for all masks at once (60, 60 and 30 MB for
        # the 200 denoising masks of a layer) would be fresh memory at every layer. Drawn here, the candidates come
        # block by block too (`rand_blocks`: the same numbers as one draw).
        mask_block = UNCERTAINTY_MASK_BLOCK if device.type == "cpu" else max(num_masks, 1)
        if draws is not None:
            candidate_blocks = draws[0].split(mask_block)
        else:
            random_source = random_source if random_source is not None else MaskDINORandomSource()
            candidate_blocks = random_source.rand_blocks(
                num_masks, num_candidates, 2, block_size=mask_block, device=device
            )
        points = mask_logits.new_empty(num_masks, num_uncertain + max(num_random, 0), 2, dtype=torch.float32)
        start = 0
        for candidates in candidate_blocks:
            block = slice(start, start + len(candidates))
            certainty = point_sample(mask_logits[block], candidates)[:, 0].abs_()
            top = torch.topk(certainty, k=num_uncertain, dim=1, largest=False, sorted=False).indices
            points[block, :num_uncertain] = candidates.gather(1, top[..., None].expand(-1, -1, 2))
            start += len(candidates)
        extra = draws[1] if draws is not None else self._draw_uniform_points(num_masks, device, random_source)
        if extra is not None:
            points[:, num_uncertain:] = extra
        return points

    # ------------------------------------------------------------------------------------------ loss terms
    def loss_labels(
        self, outputs: LayerPredictions, targets, indices, num_masks, random_source=None
    ) -> dict[str, Tensor]:
        """`loss_ce`: sigmoid focal loss over all queries and classes, `.mean(1).sum() / num_masks * num_queries`;
        with `semantic_ce_loss`, softmax cross-entropy with the no-object class weighted `no_object_weight`."""
        logits = outputs.class_logits.float()
        batch_size, num_queries, num_logits = logits.shape
        batch_idx, pred_idx = prediction_index(indices, logits.device)
        matched_labels = self._matched_targets(targets, indices, "labels", logits.device).long()
        if self.semantic_ce_loss:
            target_classes = torch.full(
                (batch_size, num_queries), self.num_labels, dtype=torch.int64, device=logits.device
            )
            target_classes[batch_idx, pred_idx] = matched_labels
            return {"loss_ce": F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight.to(logits))}
        one_hot = torch.zeros_like(logits)
        one_hot[batch_idx, pred_idx, matched_labels] = 1.0
        loss = sigmoid_focal_loss(logits, one_hot, num_masks, alpha=self.config.focal_alpha, gamma=self.config.focal_gamma)
        return {"loss_ce": loss * num_queries}

    def loss_boxes(
        self, outputs: LayerPredictions, targets, indices, num_masks, random_source=None
    ) -> dict[str, Tensor]:
        """`loss_bbox` (L1 on cxcywh) and `loss_giou` (1 - GIoU) summed over matched pairs / num_masks. With
        `panoptic_box_loss`, pairs whose ground-truth label is a stuff label contribute nothing (the normaliser still
        counts them)."""
        pred_boxes = outputs.box_predictions
        batch_idx, pred_idx = prediction_index(indices, pred_boxes.device)
        source = pred_boxes[batch_idx, pred_idx].float()
        target = self._matched_targets(targets, indices, "boxes", source.device).float()
        l1 = F.l1_loss(source, target, reduction="none").sum(-1)
        giou = 1 - generalized_box_iou_with_eps(center_to_corners_format(source), center_to_corners_format(target))
        if self.panoptic_box_loss and self.stuff_labels.numel():
            labels = self._matched_targets(targets, indices, "labels", source.device)
            is_thing = ~torch.isin(labels, self.stuff_labels.to(labels.device))
            l1 = torch.where(is_thing, l1, torch.zeros_like(l1))
            giou = torch.where(is_thing, giou, torch.zeros_like(giou))
        return {"loss_bbox": l1.sum() / num_masks, "loss_giou": giou.sum() / num_masks}

    def loss_masks(
        self,
        outputs: LayerPredictions,
        targets,
        indices,
        num_masks,
        random_source=None,
        point_draws=None,
        source: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """`loss_mask` (BCE) and `loss_dice` on `train_num_points` points per matched mask, chosen by uncertainty
        (see `sample_points_using_uncertainty`, `point_draws` being its random numbers when drawn already); no
        upsampling, points are in normalised coordinates. `source`: the supervised masks when formed already
        (`supervised_masks_of_layers`)."""
        counts = [len(pred) for pred, _ in indices]
        if source is None:
            source = supervised_masks_of_layers([outputs], [indices])[0]
        with torch.no_grad():
            points = self.sample_points_using_uncertainty(source, random_source, point_draws)
        # Block by block of masks on the CPU: the terms are sums over masks, and one block's temporaries (grids,
        # sampled targets and logits, the losses' intermediates: ~150 MB for the 200 denoising masks of a layer at
        # once) are reused from the allocator's free lists instead of being returned to the system and faulted in
        # again at every layer (1.2-2 s of a 512x512 step on 2 cores).
        mask_block = LOSS_MASK_BLOCK if source.device.type == "cpu" else max(len(source), 1)
        image_ends = list(itertools.accumulate(counts))
        image_starts = [end - count for end, count in zip(image_ends, counts)]
        mask_terms, dice_terms = [], []
        # `split`, not slicing: its backward gathers the blocks' gradients into one tensor, where each slice's
        # would be a zero-filled full-size gradient.
        start = 0
        for block_source, block_points in zip(source.split(mask_block), points.split(mask_block)):
            stop = start + len(block_source)
            # each image's entries in [start, stop): its target indices, in image order as the points are
            block_targets = [
                target_idx[max(start - first, 0) : max(min(stop, end) - first, 0)]
                for (_, target_idx), first, end in zip(indices, image_starts, image_ends)
            ]
            start = stop
            with torch.no_grad():
                point_labels = sample_target_masks(targets, block_points, block_targets)
            point_logits = point_sample(block_source, block_points)[:, 0]
            mask_terms.append(sigmoid_cross_entropy_loss(point_logits, point_labels, num_masks))
            dice_terms.append(dice_loss(point_logits, point_labels, num_masks))
        return {"loss_mask": sum(mask_terms), "loss_dice": sum(dice_terms)}

    def _terms(
        self, kinds, outputs, targets, indices, num_masks, random_source, point_draws=None, source=None
    ) -> dict[str, Tensor]:
        terms = {}
        for kind in kinds:
            if kind == "labels":
                terms.update(self.loss_labels(outputs, targets, indices, num_masks))
            elif kind == "masks":
                terms.update(
                    self.loss_masks(outputs, targets, indices, num_masks, random_source, point_draws, source)
                )
            else:
                terms.update(self.loss_boxes(outputs, targets, indices, num_masks))
        return terms

    def _zero_denoising_terms(self, device) -> dict[str, Tensor]:
        names = ["loss_bbox", "loss_giou", "loss_ce"] + (["loss_mask", "loss_dice"] if self.denoising == "seg" else [])
        return {name: torch.zeros((), device=device) for name in names}

    @staticmethod
    def denoising_indices(targets: list[dict[str, Tensor]], scalar: int, pad_size: int) -> Matching:
        """Fixed assignment of the denoising queries: query `g * single_pad + j` <-> target j, for every group g."""
        if pad_size % scalar:
            raise ValueError(f"denoising pad_size ({pad_size}) must be a multiple of scalar ({scalar})")
        single_pad = pad_size // scalar
        indices = []
        for t in targets:
            num_targets = len(t["labels"])
            target_idx = torch.arange(num_targets, dtype=torch.int64).repeat(scalar)
            group_offsets = torch.arange(scalar, dtype=torch.int64)[:, None] * single_pad
            query_idx = (group_offsets + torch.arange(num_targets, dtype=torch.int64)).flatten()
            indices.append((query_idx, target_idx))
        return indices

    # --------------------------------------------------------------------------------------------- forward
    def compute_loss_terms(
        self,
        outputs: MaskDINOModelOutput,
        targets: list[dict[str, Tensor]],
        random_source: MaskDINORandomSource | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Matching]]:
        """Unweighted loss terms (the official criterion's output) and the matching of every matched layer.

        Returns `(terms, matchings)`; `matchings` maps `final`, `aux{i}` and `interm` to the matcher's output.
        Random draws happen in the official order: final layer (matcher points image by image, then the PointRend
        points of the matched masks), its denoising queries, then for each auxiliary layer the same, then `interm`.
        """
        random_source = random_source if random_source is not None else MaskDINORandomSource()
        device = outputs.class_logits[-1].device
        missing = [key for key in ("labels", "boxes", "masks") for t in targets if key not in t]
        if missing:
            raise ValueError(f"every target needs 'labels', 'boxes' and 'masks'; missing {sorted(set(missing))}")
        num_masks = self._num_masks(targets, device)

        mask_features = None if outputs.mask_features is None else outputs.mask_features.unbind(0)
        embeddings = outputs.mask_embeddings or (None,) * len(outputs.class_logits)
        layers = [
            LayerPredictions(*layer, mask_features)
            for layer in zip(outputs.class_logits, outputs.mask_logits, outputs.box_predictions, embeddings)
        ]
        denoising = outputs.denoising_outputs
        use_denoising = self.denoising != "no" and denoising is not None
        dn_layers = dn_indices = dn_norm = None
        if use_denoising:
            dn_embeddings = denoising.mask_embeddings or (None,) * len(denoising.class_logits)
            dn_layers = [
                LayerPredictions(*layer, mask_features)
                for layer in zip(
                    denoising.class_logits, denoising.mask_logits, denoising.box_predictions, dn_embeddings
                )
            ]
            dn_indices = self.denoising_indices(targets, denoising.num_groups, denoising.pad_size)
            dn_norm = num_masks * denoising.num_groups

        # (name, suffix, predictions, denoising layer or None, denoising suffix), in the official order
        two_stage = outputs.enc_topk_logits is not None
        jobs = [("final", "", layers[-1], -1, "_dn")]
        if self.deep_supervision:
            # without query selection the first auxiliary prediction gets no denoising loss (official behaviour)
            first_denoised = 0 if two_stage else 1
            for layer, aux_outputs in enumerate(layers[:-1]):
                dn_index = layer if layer >= first_denoised else None
                jobs.append((f"aux{layer}", f"_{layer}", aux_outputs, dn_index, f"_dn_{layer}"))
        if two_stage:
            interm = LayerPredictions(
                outputs.enc_topk_logits,
                outputs.enc_topk_masks,
                outputs.enc_topk_boxes,
                outputs.enc_topk_mask_embeddings,
                mask_features,
            )
            jobs.append(("interm", "_interm", interm, None, ""))

        # The supervised masks of all denoising layers at once (their queries are fixed), then every random draw
        # in the official order. The number of matched pairs is known before matching (min(queries, targets) per
        # image), so the matcher points and PointRend candidates of all layers are drawn first; the denoising terms
        # are computed in between, drawing their candidates block by block as they go. All layers are then matched
        # at once, and their supervised masks are formed together.
        denoised = [use_denoising and job[3] is not None for job in jobs]
        dn_jobs = [job[3] for job, with_denoising in zip(jobs, denoised) if with_denoising]
        dn_sources = iter(
            supervised_masks_of_layers([dn_layers[index] for index in dn_jobs], [dn_indices] * len(dn_jobs))
            if "masks" in self.denoising_losses
            else [None] * len(dn_jobs)
        )
        sizes = [len(t["labels"]) for t in targets]
        batch_size = len(targets)
        matcher_points, point_draws, layer_denoising_terms = [], [], []
        for (_, _, layer_outputs, dn_index, _), with_denoising in zip(jobs, denoised):
            matcher_points.append(self.matcher.draw_points(batch_size, device, random_source))
            num_matched = sum(min(layer_outputs.class_logits.shape[1], size) for size in sizes)
            point_draws.append(self.draw_point_candidates(num_matched, device, random_source))
            if with_denoising:
                dn_terms = self._terms(
                    self.denoising_losses, dn_layers[dn_index], targets, dn_indices, dn_norm, random_source,
                    source=next(dn_sources),
                )
            elif self.denoising != "no" and dn_index is not None:
                dn_terms = self._zero_denoising_terms(device)
            else:
                dn_terms = {}
            layer_denoising_terms.append(dn_terms)
        layer_matchings = self.matcher.match_layers([job[2] for job in jobs], targets, matcher_points)
        sources = supervised_masks_of_layers([job[2] for job in jobs], layer_matchings)

        terms: dict[str, Tensor] = {}
        matchings: dict[str, Matching] = {}
        all_kinds = ("labels", "masks", "boxes")
        for (name, suffix, layer_outputs, _, dn_suffix), indices, draws, source, dn_terms in zip(
            jobs, layer_matchings, point_draws, sources, layer_denoising_terms
        ):
            matchings[name] = indices
            layer_terms = self._terms(all_kinds, layer_outputs, targets, indices, num_masks, None, draws, source)
            terms.update({key + suffix: value for key, value in layer_terms.items()})
            terms.update({key + dn_suffix: value for key, value in dn_terms.items()})
        return terms, matchings

    def forward(
        self,
        outputs: MaskDINOModelOutput,
        targets: list[dict[str, Tensor]],
        random_source: MaskDINORandomSource | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and the weighted terms (terms without a weight are dropped, as in the official model)."""
        terms, _ = self.compute_loss_terms(outputs, targets, random_source)
        loss_dict = {name: value * self.weight_dict[name] for name, value in terms.items() if name in self.weight_dict}
        loss = torch.stack(list(loss_dict.values())).sum()
        return loss, loss_dict


__all__ = [
    "MaskDINOHungarianMatcher",
    "MaskDINOLoss",
    "LayerPredictions",
    "generalized_box_iou_with_eps",
    "focal_class_cost",
    "maskdino_weight_dict",
]
