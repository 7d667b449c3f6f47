"""Multi-scale deformable attention (MSDA), the sampling op of the pixel decoder and of the DINO decoder.

`MultiScaleDeformableAttention` is the op alone: its forward signature is the one a compiled hub kernel
(`kernels`' `use_kernel_forward_from_hub`) replaces. `MaskDINOMultiscaleDeformableAttention` is the layer with its
projections; it reuses Transformers' Deformable DETR layer and only swaps in this op.

Three implementations of the op live here or are loaded from here:

* `multi_scale_deformable_attention_reference`: the straightforward one, a `grid_sample` per level (the official
  PyTorch path). Kept as the numerical reference.
* `multi_scale_deformable_attention_pytorch`: the default forward. All heads and levels are handled at once: the four
  bilinear corners of every sampling point are turned into row indices of the flattened value tensor (using the
  per-level offsets of `level_start_index`) and a per-row weight (bilinear weight x attention weight x validity),
  and one weighted row-sum (`embedding_bag`) produces the output, in steps of `_CPU_CHUNK_BAGS` output rows on CPU
  so the intermediates stay in cache. Its backward (`_DeformableSampling`) is written out: the location and
  attention gradients from three weighted corner sums per point, the value gradient on CPU without a scatter (the
  points sorted by row, `embedding_bag` over the upstream gradient). No Python loop over heads or levels, no host
  synchronisation in the forward, works in bfloat16 and under `torch.compile` (which traces plain ops instead), equal
  to the reference.
* A compiled CUDA kernel (sources under `csrc/`, built with Hugging Face kernel-builder), swapped in on CUDA by
  `load_msda_kernel` through `kernels.kernelize`.

Loading (`load_msda_kernel(model, repo_id=None, revision=None, version=None, local_path=None, ...)`):

* `MASKDINO_FORCE_PYTORCH_MSDA=1` forces the PyTorch path (any kernelized forward is undone).
* On CPU the PyTorch path is used and nothing is downloaded. A `local_path` given explicitly is still honoured on CPU
  (it is local, and kernel packages carry their own CPU fallback), which is how the loader is tested without a GPU.
* On CUDA the kernel comes from `local_path` (a kernel-builder build directory, e.g. `csrc/build` or any directory
  `kernels.get_local_kernel` accepts) when given, else from the Hub: `repo_id` (default `DEFAULT_MSDA_REPO_ID`,
  `kernels-community/deformable-detr`, the trusted repository Transformers' Deformable DETR uses; its layer has this
  op's forward signature) at `revision` / `version` (default version 1).
  Environment overrides: `MASKDINO_MSDA_REPO_ID`, `MASKDINO_MSDA_REVISION`, `MASKDINO_MSDA_LOCAL_PATH`.
  A repository named explicitly (argument or environment) is trusted to run its code; the default one is trusted by
  `kernels` already. Our own build of `csrc/` can be published to a repository and selected this way.
* Any failure (no network, no build for this torch / CUDA / GPU, a layer whose output does not match the PyTorch
  path on a small check) falls back to PyTorch. Exactly one log line from this module states the path taken.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

import torch
from torch import nn
from transformers.models.deformable_detr.modeling_deformable_detr import DeformableDetrMultiscaleDeformableAttention

try:
    from kernels import use_kernel_forward_from_hub
except ImportError:  # `kernels` is optional (e.g. remote code on a machine without it): the PyTorch op is used

    def use_kernel_forward_from_hub(layer_name):
        return lambda cls: cls


logger = logging.getLogger(__name__)

DEFAULT_MSDA_REPO_ID = "kernels-community/deformable-detr"
DEFAULT_MSDA_VERSION = 1
MSDA_LAYER_NAME = "MultiScaleDeformableAttention"
FORCE_PYTORCH_ENV = "MASKDINO_FORCE_PYTORCH_MSDA"
REPO_ID_ENV = "MASKDINO_MSDA_REPO_ID"
REVISION_ENV = "MASKDINO_MSDA_REVISION"
LOCAL_PATH_ENV = "MASKDINO_MSDA_LOCAL_PATH"

_TRUE_VALUES = {"1", "true", "yes", "on"}


def multi_scale_deformable_attention_reference(
    value: torch.Tensor,
    value_spatial_shapes_list: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Straightforward MSDA: one `grid_sample` per level (the official CPU path).

    value: (batch, sum(H*W), heads, head_dim); sampling_locations: (batch, queries, heads, levels, points, 2) in
    [0, 1] (x, y); attention_weights: (batch, queries, heads, levels, points). Returns (batch, queries, heads*head_dim).
    """
    batch_size, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    value_list = value.split([height * width for height, width in value_spatial_shapes_list], dim=1)
    sampling_grids = 2 * sampling_locations - 1
    sampled = []
    for level, (height, width) in enumerate(value_spatial_shapes_list):
        value_level = (
            value_list[level].flatten(2).transpose(1, 2).reshape(batch_size * num_heads, head_dim, height, width)
        )
        grid_level = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(
            nn.functional.grid_sample(
                value_level, grid_level, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )
    weights = attention_weights.transpose(1, 2).reshape(batch_size * num_heads, 1, num_queries, num_levels * num_points)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return output.view(batch_size, num_heads * head_dim, num_queries).transpose(1, 2).contiguous()


# ---------------------------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------------------------

# Bags (rows of the (batch * queries * heads, head_dim) output) per step: on CPU the step's intermediates stay in cache.
# The backward's step materialises three (bags x levels x points, head_dim) sums, hence fewer bags.
_CPU_CHUNK_BAGS = 16384
_CPU_BACKWARD_CHUNK_BAGS = 2048
_ACCELERATOR_CHUNK_BAGS = 1 << 18


class _LevelGeometry(NamedTuple):
    """Per-point constants of the levels, expanded to (levels * points,) so elementwise ops run over long rows."""

    size: torch.Tensor  # (levels * points, 2) width, height (index dtype)
    half_size: torch.Tensor  # (levels * points, 2) size / 2 (compute dtype)
    start: torch.Tensor  # (levels * points,) first token of the level
    corner_shift: torch.Tensor  # (4, levels * points) row offset of each corner from the (y0, x0) one


class _Corners(NamedTuple):
    """The four bilinear corners of every sampling point of a step of bags (corners ordered y0x0, y0x1, y1x0, y1x1)."""

    rows: torch.Tensor  # (bags, 4, levels * points) rows of value.view(batch * tokens * heads, head_dim)
    token: torch.Tensor  # (bags, levels * points) token of the (y0, x0) corner (may lie outside the level)
    weight: tuple[torch.Tensor, ...]  # x low, x high, y low, y high: (bags, levels * points), 0 outside the map
    inside: tuple[torch.Tensor, ...]  # same order: 1 where that pixel is inside the map


def _level_geometry(
    value_spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    num_points: int,
    num_heads: int,
    compute_dtype: torch.dtype,
    index_dtype: torch.dtype,
    device: torch.device,
) -> _LevelGeometry:
    num_levels = value_spatial_shapes.shape[0]

    def per_point(level_values: torch.Tensor) -> torch.Tensor:  # (levels, ...) -> (levels * points, ...)
        level_values = level_values.to(device=device, dtype=index_dtype)
        return level_values.unsqueeze(1).expand(num_levels, num_points, *level_values.shape[1:]).flatten(0, 1)

    size = per_point(value_spatial_shapes.flip(-1))  # (width, height): x runs over the width
    width = size[:, 0]
    corner_shift = torch.stack([torch.zeros_like(width), torch.ones_like(width), width, width + 1]) * num_heads
    return _LevelGeometry(size, size.to(compute_dtype) / 2, per_point(level_start_index), corner_shift)


def _bilinear_corners(
    geometry: _LevelGeometry, locations: torch.Tensor, bag_offset: torch.Tensor, num_heads: int, num_rows: int
) -> _Corners:
    """Corners of `locations` (bags, levels * points, 2) in [0, 1]; `bag_offset` (bags,) is the row of token 0 of the
    bag's image and head. A corner outside its level's map gets weight 0 (and some valid row): grid_sample's zero
    padding. Pixel coordinates are computed exactly as grid_sample(align_corners=False) does on CPU, rounding
    included (the location gradient jumps at pixel borders): grid = 2 * loc - 1, pixel = (grid + 1) * size / 2 - 0.5.
    """
    weights, insides, lows = [], [], []
    for axis in range(2):  # x (over the width), then y; each on contiguous (bags, points) tensors
        size = geometry.size[:, axis]
        pixel = ((2 * locations[:, :, axis].to(geometry.half_size.dtype) - 1) + 1) * geometry.half_size[:, axis] - 0.5
        low = pixel.floor()
        high_weight = pixel - low
        low = low.to(size.dtype)
        inside_low = ((low >= 0) & (low < size)).to(pixel.dtype)
        inside_high = ((low >= -1) & (low < size - 1)).to(pixel.dtype)
        weights += [(1 - high_weight) * inside_low, high_weight * inside_high]
        insides += [inside_low, inside_high]
        lows.append(low)
    token = lows[1] * geometry.size[:, 0] + lows[0] + geometry.start
    row = token * num_heads + bag_offset.unsqueeze(1)
    rows = (row.unsqueeze(1) + geometry.corner_shift).clamp_(0, num_rows - 1)
    return _Corners(rows, token, tuple(weights), tuple(insides))


def _outer_corners(y_sides: tuple[torch.Tensor, torch.Tensor], x_sides: tuple[torch.Tensor, torch.Tensor]):
    """(bags, 4, points): y_sides[i] * x_sides[j] for the corners (y0, x0), (y0, x1), (y1, x0), (y1, x1), written
    in place (no stack copy) when nothing is traced."""
    pairs = [(y, x) for y in y_sides for x in x_sides]
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        return torch.stack([y * x for y, x in pairs], dim=1)
    out = y_sides[0].new_empty(y_sides[0].shape[0], 4, y_sides[0].shape[1])
    for index, (y, x) in enumerate(pairs):
        torch.mul(y, x, out=out[:, index])
    return out


class _Problem(NamedTuple):
    """One MSDA call in the flat layout of the fast path: bag = (image, query, head), point = (level, point)."""

    table: torch.Tensor  # (batch * tokens * heads, head_dim) in the compute dtype
    locations: torch.Tensor  # (bags, levels * points, 2)
    attention: torch.Tensor  # (bags, levels * points)
    geometry: _LevelGeometry
    num_queries: int
    num_heads: int
    num_value_tokens: int

    def steps(self, backward: bool = False):
        """(start, stop, corners) of each step of bags."""
        num_bags = self.attention.shape[0]
        chunk = _CPU_BACKWARD_CHUNK_BAGS if backward else _CPU_CHUNK_BAGS
        chunk = chunk if self.table.device.type == "cpu" else _ACCELERATOR_CHUNK_BAGS
        for start in range(0, num_bags, chunk):
            stop = min(num_bags, start + chunk)
            yield start, stop, self.corners(start, stop)

    def corners(self, start: int, stop: int) -> _Corners:
        bags = torch.arange(start, stop, device=self.table.device, dtype=self.geometry.size.dtype)
        image = bags // (self.num_queries * self.num_heads)
        bag_offset = image * (self.num_value_tokens * self.num_heads) + bags % self.num_heads
        return _bilinear_corners(
            self.geometry, self.locations[start:stop], bag_offset, self.num_heads, self.table.shape[0]
        )


def _problem(value, value_spatial_shapes, level_start_index, sampling_locations, attention_weights, compute_dtype):
    batch_size, num_value_tokens, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    per_bag = num_levels * num_points
    num_rows = batch_size * num_value_tokens * num_heads
    # int32 halves the index traffic in eager mode (with a margin for out-of-map corners); traced graphs keep int64,
    # which every backend accepts for gathers (ONNX requires it).
    index_dtype = torch.int32 if num_rows < 2**30 and not torch.compiler.is_compiling() else torch.int64
    return _Problem(
        table=value.to(compute_dtype).reshape(batch_size * num_value_tokens * num_heads, head_dim),
        locations=sampling_locations.reshape(-1, per_bag, 2),
        attention=attention_weights.to(compute_dtype).reshape(-1, per_bag),
        geometry=_level_geometry(
            value_spatial_shapes, level_start_index, num_points, num_heads, compute_dtype, index_dtype, value.device
        ),
        num_queries=num_queries,
        num_heads=num_heads,
        num_value_tokens=num_value_tokens,
    )


def _corner_weights(corners: _Corners, attention: torch.Tensor) -> torch.Tensor:
    """(bags, 4, points) bilinear weight x attention weight of every corner."""
    x_low, x_high, y_low, y_high = corners.weight
    return _outer_corners((y_low * attention, y_high * attention), (x_low, x_high))


def _sample(problem: _Problem) -> torch.Tensor:
    """(bags, head_dim): per step of bags, the corners and one weighted row-sum (`embedding_bag`) over the table."""
    num_bags = problem.attention.shape[0]
    output = problem.table.new_empty(num_bags, problem.table.shape[1])
    for start, stop, corners in problem.steps():
        weights = _corner_weights(corners, problem.attention[start:stop])
        output[start:stop] = nn.functional.embedding_bag(
            corners.rows.view(stop - start, -1), problem.table, per_sample_weights=weights.view(stop - start, -1),
            mode="sum",
        )
    return output


def _scatter_add_rows(
    problem: _Problem,
    weights: torch.Tensor,
    tokens: torch.Tensor,
    grad: torch.Tensor,
    levels: list[tuple[int, int]] | None,
) -> torch.Tensor:
    """grad_table[rows[i, c, p]] += weights[i, c, p] * grad[i] for all bags i, corners c and points p.

    On CPU (`levels` known on the host) without a scatter: the points are sorted by the row of their (y0, x0) corner
    (one sort for the four corners), one `embedding_bag` per corner sums the weighted rows of `grad` of every run of
    equal rows, and the four sums are added to the table shifted by the corner's offset, level by level. Level l
    owns the sort keys of its (y0, x0) tokens from one row and one pixel before its first token to its last; a point
    whose corners all lie outside its map (all weights 0) is given a key of that range. Elsewhere (`levels` None)
    `index_add_` per step, which accelerators do with atomics."""
    num_bags, head_dim = grad.shape
    grad_table = torch.zeros_like(problem.table)
    if levels is None:
        for start, stop, corners in problem.steps(backward=True):
            contribution = weights[start:stop].unsqueeze(-1) * grad[start:stop].view(-1, 1, 1, head_dim)
            grad_table.index_add_(0, corners.rows.view(-1), contribution.view(-1, head_dim))
        return grad_table
    device = tokens.device
    num_heads, per_bag = problem.num_heads, tokens.shape[1]
    batch_size = num_bags // (problem.num_queries * num_heads)
    num_points = per_bag // len(levels)
    key_sizes = [height * width + width + 1 for height, width in levels]
    key_starts = [sum(key_sizes[:level]) for level in range(len(levels))]
    token_starts = [sum(height * width for height, width in levels[:level]) for level in range(len(levels))]
    keys_per_image = sum(key_sizes)

    def per_point(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, device=device).repeat_interleave(num_points)

    first = per_point(key_starts)
    key = tokens + per_point([k - t + w + 1 for k, t, (_, w) in zip(key_starts, token_starts, levels)])
    key = torch.minimum(torch.maximum(key, first), first + per_point(key_sizes) - 1)
    bags = torch.arange(num_bags, device=device)
    key_offset = (bags // (problem.num_queries * num_heads)) * (keys_per_image * num_heads) + bags % num_heads
    key = key * num_heads + key_offset.unsqueeze(1)
    sorted_keys, order = key.view(-1).sort()  # int64: the keys of a batch may exceed int32
    bag_of_entry = order // per_bag
    offsets = torch.searchsorted(sorted_keys, torch.arange(batch_size * keys_per_image * num_heads, device=device))
    sorted_weights = weights.transpose(0, 1).reshape(4, -1).gather(1, order.expand(4, -1))
    grad_tokens = grad_table.view(batch_size, problem.num_value_tokens, num_heads, head_dim)
    for corner, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        summed = nn.functional.embedding_bag(
            bag_of_entry, grad, offsets, mode="sum", per_sample_weights=sorted_weights[corner]
        ).view(batch_size, keys_per_image, num_heads, head_dim)
        for (height, width), token_start, key_start in zip(levels, token_starts, key_starts):
            shift = key_start + width + 1 - dy * width - dx
            grad_tokens[:, token_start : token_start + height * width] += summed[:, shift : shift + height * width]
    return grad_table


def _sample_backward(
    problem: _Problem, grad: torch.Tensor, need_table: bool, need_points: bool, levels: list[tuple[int, int]] | None
):
    """Gradients of `_sample` for the upstream (bags, head_dim) `grad`: table, locations (bags, levels * points, 2)
    and attention (bags, levels * points), each None when not needed.

    Per step of bags, three weighted sums of each point's four corner rows (`embedding_bag`): the bilinear sample and
    its derivatives in x and y, dotted with the bag's gradient (`bmm`). The first is the attention gradient, the
    other two times the attention weight and the map size the location gradient."""
    num_bags, per_bag = problem.attention.shape
    head_dim = problem.table.shape[1]
    grad_locations = problem.table.new_empty(num_bags, per_bag, 2) if need_points else None
    grad_attention = problem.table.new_empty(num_bags, per_bag) if need_points else None
    weights = problem.table.new_empty(num_bags, 4, per_bag) if need_table else None
    tokens = problem.attention.new_empty(num_bags, per_bag, dtype=torch.int64) if need_table else None
    for start, stop, corners in problem.steps(backward=True):
        attention = problem.attention[start:stop]
        if need_table:
            weights[start:stop] = _corner_weights(corners, attention)
            tokens[start:stop] = corners.token
        if not need_points:
            continue
        x_low, x_high, y_low, y_high = corners.weight
        inside_x_low, inside_x_high, inside_y_low, inside_y_high = corners.inside
        steps = stop - start
        coefficients = problem.table.new_empty(steps, 3, per_bag, 4)  # bags of the 4 corners of one point
        for index, (y_sides, x_sides) in enumerate((
            ((y_low, y_high), (x_low, x_high)),  # the bilinear sample
            ((y_low, y_high), (-inside_x_low, inside_x_high)),  # its derivative in x
            ((-inside_y_low, inside_y_high), (x_low, x_high)),  # in y
        )):
            coefficients[:, index] = _outer_corners(y_sides, x_sides).transpose(1, 2)
        rows = corners.rows.transpose(1, 2).unsqueeze(1).expand(steps, 3, per_bag, 4)
        sampled = nn.functional.embedding_bag(
            rows.reshape(-1, 4), problem.table, per_sample_weights=coefficients.view(-1, 4), mode="sum"
        )
        dots = torch.linalg.vecdot(sampled.view(steps, 3, per_bag, head_dim), grad[start:stop].view(steps, 1, 1, -1))
        grad_attention[start:stop] = dots[:, 0]
        # d pixel / d location = size; the sample is scaled by the attention weight.
        torch.mul(dots[:, 1:].transpose(1, 2), attention.unsqueeze(-1) * (2 * problem.geometry.half_size),
                  out=grad_locations[start:stop])
    grad_table = _scatter_add_rows(problem, weights, tokens, grad, levels) if need_table else None
    return grad_table, grad_locations, grad_attention


def sampling_dtype(value: torch.Tensor) -> torch.dtype:
    """The dtype the PyTorch path samples `value` in: float32 for half and bfloat16 values, else their own."""
    return torch.float32 if value.dtype in (torch.float16, torch.bfloat16) else value.dtype


class _DeformableSampling(torch.autograd.Function):
    """The eager fast path: `_sample` forward, `_sample_backward` backward (no autograd graph of the corner
    arithmetic, nothing of size bags x corners x head_dim kept). Computed in float32 for half inputs."""

    @staticmethod
    def forward(ctx, value, value_spatial_shapes, level_start_index, sampling_locations, attention_weights):
        batch_size, _, num_heads, head_dim = value.shape
        num_queries = sampling_locations.shape[1]
        with torch.autocast(value.device.type, enabled=False):
            # Detached: embedding_bag then runs its forward-only kernel.
            problem = _problem(value.detach(), value_spatial_shapes, level_start_index, sampling_locations.detach(),
                               attention_weights.detach(), sampling_dtype(value))
            output = _sample(problem)
        ctx.save_for_backward(value, value_spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return output.view(batch_size, num_queries, num_heads * head_dim).to(value.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        value, value_spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        need_table = ctx.needs_input_grad[0]
        need_points = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        compute_dtype = sampling_dtype(value)
        levels = None
        if value_spatial_shapes.device.type == "cpu" and value.device.type == "cpu":
            levels = [(height, width) for height, width in value_spatial_shapes.tolist()]
        with torch.autocast(value.device.type, enabled=False):
            problem = _problem(value.detach(), value_spatial_shapes, level_start_index, sampling_locations.detach(),
                               attention_weights.detach(), compute_dtype)
            grad = grad_output.to(compute_dtype).reshape(-1, value.shape[-1]).contiguous()
            grad_table, grad_locations, grad_attention = _sample_backward(problem, grad, need_table, need_points,
                                                                          levels)
        if grad_table is not None:
            grad_table = grad_table.view(value.shape).to(value.dtype)
        if grad_locations is not None:
            grad_locations = grad_locations.view(sampling_locations.shape).to(sampling_locations.dtype)
            grad_attention = grad_attention.view(attention_weights.shape).to(attention_weights.dtype)
        return grad_table, None, None, grad_locations, grad_attention


def multi_scale_deformable_attention_pytorch(
    value: torch.Tensor,
    value_spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """MSDA for all heads and levels at once (see the module docstring); same inputs / output as the reference.

    Only tensors are used for the level geometry (`value_spatial_shapes`, `level_start_index`), so nothing is read
    back to the host in the forward. Half and bfloat16 inputs are computed in float32 and the output is cast back.
    Inputs are checked by `_check_msda_inputs`.
    """
    _check_msda_inputs(value, value_spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if not torch.compiler.is_compiling():
        return _DeformableSampling.apply(
            value, value_spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    # Traced (torch.compile / export): the gather + weighted sum in plain ops, which the compiler fuses and
    # differentiates itself.
    batch_size, _, num_heads, head_dim = value.shape
    problem = _problem(value, value_spatial_shapes, level_start_index, sampling_locations, attention_weights,
                       sampling_dtype(value))
    num_bags = problem.attention.shape[0]
    corners = problem.corners(0, num_bags)
    weights = _corner_weights(corners, problem.attention)
    output = (problem.table[corners.rows.view(num_bags, -1)] * weights.view(num_bags, -1, 1)).sum(1)
    return output.view(batch_size, -1, num_heads * head_dim).to(value.dtype)


def _check_msda_inputs(
    value: torch.Tensor,
    value_spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    """Refuse inputs whose shapes disagree, naming the argument, its shape and the expected one.

    Shapes are compared always (Python arithmetic, nothing read from a device). The contents of
    `value_spatial_shapes` and `level_start_index` (the tokens they claim, the level offsets) are checked only when
    they are on the CPU and nothing is being compiled or traced, so no device is ever synchronised; on accelerators
    the model's `MultiScaleDeformableAttention.forward` checks the Python list of shapes instead."""
    if value.ndim != 4:
        raise ValueError(f"value must have shape (batch, tokens, heads, head_dim), got {tuple(value.shape)}")
    batch_size, num_tokens, num_heads, _ = value.shape
    if sampling_locations.ndim != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "sampling_locations must have shape (batch, queries, heads, levels, points, 2), got "
            f"{tuple(sampling_locations.shape)}"
        )
    if sampling_locations.shape[0] != batch_size or sampling_locations.shape[2] != num_heads:
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} must have value's batch ({batch_size}) and heads "
            f"({num_heads}) in dims 0 and 2"
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"attention_weights must have shape (batch, queries, heads, levels, points) = "
            f"{tuple(sampling_locations.shape[:-1])} like sampling_locations, got {tuple(attention_weights.shape)}"
        )
    num_levels = sampling_locations.shape[3]
    if value_spatial_shapes.shape != (num_levels, 2):
        raise ValueError(
            f"value_spatial_shapes must have shape (levels, 2) = ({num_levels}, 2), got "
            f"{tuple(value_spatial_shapes.shape)}"
        )
    if level_start_index.shape != (num_levels,):
        raise ValueError(
            f"level_start_index must have shape (levels,) = ({num_levels},), got {tuple(level_start_index.shape)}"
        )
    on_cpu = value_spatial_shapes.device.type == "cpu" and level_start_index.device.type == "cpu"
    if not on_cpu or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return
    shapes = [tuple(shape) for shape in value_spatial_shapes.tolist()]
    _check_spatial_shapes_list(value, shapes, "value_spatial_shapes")
    starts = [0]
    for height, width in shapes[:-1]:
        starts.append(starts[-1] + height * width)
    if level_start_index.tolist() != starts:
        raise ValueError(
            f"level_start_index {level_start_index.tolist()} disagrees with value_spatial_shapes, whose levels start "
            f"at {starts}"
        )


def _check_spatial_shapes_list(
    value: torch.Tensor, shapes: list[tuple[int, int]], name: str = "value_spatial_shapes_list"
) -> None:
    """The levels' (height, width) must be positive and hold exactly value's tokens (pure Python, no device read)."""
    claimed = sum(height * width for height, width in shapes)
    if claimed != value.shape[1] or any(height < 1 or width < 1 for height, width in shapes):
        raise ValueError(
            f"{name} {[tuple(shape) for shape in shapes]} claims {claimed} tokens but value has {value.shape[1]}: "
            "every level's (height, width) must be positive and their height * width sum to value.shape[1]"
        )


@use_kernel_forward_from_hub(MSDA_LAYER_NAME)
class MultiScaleDeformableAttention(nn.Module):
    """The MSDA op; a hub kernel layer of the same name replaces `forward` (see `load_msda_kernel`)."""

    # Which implementation `forward` runs for this instance; set by `load_msda_kernel`.
    msda_backend = "pytorch"

    def forward(
        self,
        value: torch.Tensor,
        value_spatial_shapes: torch.Tensor,
        value_spatial_shapes_list: list[tuple[int, int]],
        level_start_index: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
        im2col_step: int,
    ) -> torch.Tensor:
        _check_spatial_shapes_list(value, value_spatial_shapes_list)
        return multi_scale_deformable_attention_pytorch(
            value, value_spatial_shapes, level_start_index, sampling_locations, attention_weights
        )


class MaskDINOMultiscaleDeformableAttention(DeformableDetrMultiscaleDeformableAttention):
    """Deformable DETR's MSDA layer (same parameters, state-dict keys and math), built from sizes rather than a DETR
    config. Its forward runs the two projections of the query (`sampling_offsets`, `attention_weights`) as one matmul
    and hands `value_proj`'s output to the op as a view, without a copy; at inference with few queries on many tokens
    (the DINO decoder) it projects the sampled vectors instead of the tokens (`projects_after_sampling`)."""

    def __init__(self, hidden_size: int, num_levels: int, num_heads: int, num_points: int):
        nn.Module.__init__(self)
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden size {hidden_size} must be divisible by the number of heads {num_heads}")
        self.attn = MultiScaleDeformableAttention()
        self.im2col_step = 64
        self.d_model = hidden_size
        self.n_levels = num_levels
        self.n_heads = num_heads
        self.n_points = num_points
        self.sampling_offsets = nn.Linear(hidden_size, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(hidden_size, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(hidden_size, hidden_size)
        self.output_proj = nn.Linear(hidden_size, hidden_size)
        self.disable_custom_kernels = False
        # See `projects_after_sampling`. R50 decoder at 800x1088 (300 queries x 8 heads, 18,070 tokens): 0.29 s
        # against 0.40 s for its nine layers in float32 on 2 CPU cores; break-even near a ratio of 2.
        self.late_projection_ratio = 3

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        position_embeddings: torch.Tensor | None = None,
        reference_points: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        spatial_shapes_list: list[tuple[int, int]] | None = None,
        level_start_index: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The parent's forward; returns the output (batch, queries, hidden) and the attention weights (batch,
        queries, heads, levels, points). `value` is `project_value(encoder_hidden_states, attention_mask)` when the
        caller already has it (the encoder attends a chunk of queries at a time to the same value). The fused query
        projection concatenates the two weights at every call (cheap beside the matmul, and always in step with the
        parameters)."""
        if position_embeddings is not None:
            hidden_states = hidden_states + position_embeddings
        batch_size, num_queries, _ = hidden_states.shape
        sequence_length = (value if value is not None else encoder_hidden_states).shape[1]
        if sum(height * width for height, width in spatial_shapes_list) != sequence_length:
            raise ValueError(
                f"spatial_shapes_list {list(spatial_shapes_list)} does not hold the {sequence_length} tokens of "
                "encoder_hidden_states"
            )
        weight = torch.cat([self.sampling_offsets.weight, self.attention_weights.weight])
        bias = torch.cat([self.sampling_offsets.bias, self.attention_weights.bias])
        sampling_offsets, attention_weights = nn.functional.linear(hidden_states, weight, bias).split(
            [self.sampling_offsets.out_features, self.attention_weights.out_features], -1
        )
        sampling_offsets = sampling_offsets.view(batch_size, num_queries, self.n_heads, self.n_levels, self.n_points, 2)
        # In at least float32, the precision the sampling is computed in (and CUDA autocast's softmax dtype).
        attention_weights = nn.functional.softmax(
            attention_weights.view(batch_size, num_queries, self.n_heads, self.n_levels * self.n_points), -1,
            dtype=torch.promote_types(attention_weights.dtype, torch.float32),
        ).view(batch_size, num_queries, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            sampling_locations = self._locations_from_points(reference_points, sampling_offsets, spatial_shapes)
        elif reference_points.shape[-1] == 4:
            sampling_locations = (
                reference_points[:, :, None, :, None, :2]
                + sampling_offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {tuple(reference_points.shape)}")
        if value is None and self.projects_after_sampling(encoder_hidden_states, num_queries):
            output = self._sample_then_project(
                encoder_hidden_states, attention_mask, spatial_shapes, spatial_shapes_list, level_start_index,
                sampling_locations, attention_weights,
            )
        else:
            if value is None:
                value = self.project_value(encoder_hidden_states, attention_mask)
            output = self.attn(
                value,
                spatial_shapes,
                spatial_shapes_list,
                level_start_index,
                sampling_locations,
                attention_weights,
                self.im2col_step,
            )
        return self.output_proj(output), attention_weights

    def projects_after_sampling(self, encoder_hidden_states: torch.Tensor, num_queries: int) -> bool:
        """Whether this call applies `value_proj` to the sampled vectors (`_sample_then_project`) rather than to every
        token: at inference, when the tokens outnumber the queries' head samples `late_projection_ratio` times over
        (the DINO decoder's 300 queries on an image's encoder memory; never the encoder's self-attention, whose
        queries are the tokens). When gradients flow, the op's value gradient over all channels costs more than the
        projection it saves, so training keeps the projection first."""
        records = torch.is_grad_enabled() and (
            encoder_hidden_states.requires_grad or self.value_proj.weight.requires_grad
        )
        return not records and num_queries * self.n_heads * self.late_projection_ratio <= encoder_hidden_states.shape[1]

    def _sample_then_project(
        self,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        spatial_shapes: torch.Tensor,
        spatial_shapes_list: list[tuple[int, int]],
        level_start_index: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
    ) -> torch.Tensor:
        """The op's output (batch, queries, hidden) with the value projection moved after the sampling.

        Sampling is linear, so `sample(W_h x + b_h) = W_h sample(x) + b_h coverage`, per head h: each (query, head)
        samples the unprojected tokens (all channels, as one head of the op), its head's rows of `value_proj` are then
        applied to that one vector, and the bias is weighted by the coverage, the same sampling of a map of ones
        (the attention weights times the bilinear weights that fall inside the maps; zero padding leaves out the
        rest). The same function as `project_value` then the op, with queries x hidden^2 instead of tokens x hidden^2
        multiply-adds for the projection."""
        batch_size, num_queries = attention_weights.shape[:2]
        heads, head_dim = self.n_heads, self.d_model // self.n_heads
        tokens = encoder_hidden_states[:, :, None, :]
        ones = tokens.new_ones(*tokens.shape[:3], 1)
        if attention_mask is not None:
            tokens = tokens.masked_fill(~attention_mask[..., None, None], 0.0)
            ones = ones.masked_fill(~attention_mask[..., None, None], 0.0)
        # Each (query, head) becomes a query of a one-head op over all channels.
        locations = sampling_locations.reshape(batch_size, num_queries * heads, 1, self.n_levels, self.n_points, 2)
        weights = attention_weights.reshape(batch_size, num_queries * heads, 1, self.n_levels, self.n_points)
        sampled, coverage = (
            self.attn(table, spatial_shapes, spatial_shapes_list, level_start_index, locations, weights,
                      self.im2col_step).view(batch_size, num_queries, heads, -1)
            for table in (tokens, ones)
        )
        # One (queries, hidden) x (hidden, head_dim) matmul per head; `matmul` (not `einsum`) so that autocast casts
        # both operands.
        per_head = sampled.permute(2, 0, 1, 3).reshape(heads, batch_size * num_queries, -1)
        projected = torch.matmul(per_head, self.value_proj.weight.view(heads, head_dim, -1).transpose(1, 2))
        projected = projected.view(heads, batch_size, num_queries, head_dim).permute(1, 2, 0, 3)
        projected = projected + coverage * self.value_proj.bias.view(heads, head_dim)
        return projected.reshape(batch_size, num_queries, self.d_model)

    def project_value(
        self, encoder_hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The value the queries sample, (batch, tokens, heads, head_dim): `value_proj` of the attended tokens (zero
        where `attention_mask` is False), as a view of the projection's output."""
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        value = self.value_proj(encoder_hidden_states)
        if attention_mask is not None:
            value = value.masked_fill(~attention_mask[..., None], 0.0)
        return value.view(batch_size, sequence_length, self.n_heads, self.d_model // self.n_heads)

    def _locations_from_points(
        self, reference_points: torch.Tensor, sampling_offsets: torch.Tensor, spatial_shapes: torch.Tensor
    ) -> torch.Tensor:
        """`reference + offset / (width, height)` of each level, the same operations on the same operands as the
        six-dimensional broadcast, but over (levels x points x 2)-long contiguous rows: CPU broadcasting with a
        2-long inner dimension is about 5x slower, which was 0.1-0.15 s of an 800x1088 forward."""
        batch_size, num_queries = sampling_offsets.shape[:2]
        row = self.n_levels * self.n_points * 2
        offset_normalizer = spatial_shapes.flip(-1)[:, None, :].expand(self.n_levels, self.n_points, 2).reshape(row)
        reference = reference_points[:, :, :, None, :].expand(batch_size, num_queries, self.n_levels, self.n_points, 2)
        reference = reference.reshape(batch_size, num_queries, 1, row)
        offsets = sampling_offsets.reshape(batch_size, num_queries, self.n_heads, row)
        return (reference + offsets / offset_normalizer).view(sampling_offsets.shape)


# ---------------------------------------------------------------------------------------------------------------------
# Loading a compiled kernel
# ---------------------------------------------------------------------------------------------------------------------


def _msda_modules(model: nn.Module) -> list[MultiScaleDeformableAttention]:
    return [module for module in model.modules() if isinstance(module, MultiScaleDeformableAttention)]


def _use_pytorch(ops: list[MultiScaleDeformableAttention]) -> None:
    for op in ops:
        op.__dict__.pop("forward", None)  # undo a kernelized forward: the class forward is the PyTorch path
        op.msda_backend = "pytorch"


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _kernel_has_compiled_ops(op: MultiScaleDeformableAttention) -> bool | None:
    """`has_compiled_ops()` of the kernel package whose layer now provides `op.forward` (None if it does not say)."""
    module_name = getattr(getattr(op.forward, "__func__", None), "__module__", None) or ""
    package = sys.modules.get(module_name.rpartition(".")[0])
    probe = getattr(package, "has_compiled_ops", None)
    return bool(probe()) if callable(probe) else None


def _check_layer(op: MultiScaleDeformableAttention, device: torch.device) -> None:
    """Run the swapped-in forward on a small problem (points outside the maps included) against the PyTorch path."""
    generator = torch.Generator().manual_seed(0)
    shapes_list = [(6, 5), (3, 3)]
    batch, queries, heads, head_dim, points = 2, 7, 2, 8, 3
    tokens = sum(height * width for height, width in shapes_list)
    value = torch.randn(batch, tokens, heads, head_dim, generator=generator)
    locations = torch.rand(batch, queries, heads, len(shapes_list), points, 2, generator=generator) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, len(shapes_list), points, generator=generator)
    shapes = torch.tensor(shapes_list, dtype=torch.int64)
    starts = torch.tensor([0, shapes_list[0][0] * shapes_list[0][1]], dtype=torch.int64)
    value, locations, weights, shapes, starts = (t.to(device) for t in (value, locations, weights, shapes, starts))
    with torch.no_grad():
        output = op(value, shapes, shapes_list, starts, locations, weights, 64)
        expected = multi_scale_deformable_attention_pytorch(value, shapes, starts, locations, weights)
    if output.shape != expected.shape or not torch.allclose(output.float(), expected, rtol=1e-3, atol=1e-4):
        raise RuntimeError("the kernel's output does not match the PyTorch implementation on a small check")


@dataclass(frozen=True)
class _KernelSource:
    """Where a kernel layer comes from: a local build, or a Hub repository at a revision or version."""

    local_path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None
    version: int | None = None
    trusted: bool = False

    def __str__(self) -> str:
        if self.local_path is not None:
            return f"local build {self.local_path}"
        pin = f"revision {self.revision}" if self.revision is not None else f"version {self.version}"
        return f"{self.repo_id} ({pin})"


def _pytorch_reason(ops: list[MultiScaleDeformableAttention], device: torch.device, local_path) -> str | None:
    """Why the PyTorch path is taken without trying a kernel (forced, no op, no CUDA), or None."""
    if os.environ.get(FORCE_PYTORCH_ENV, "").strip().lower() in _TRUE_VALUES:
        return f"forced by {FORCE_PYTORCH_ENV}=1"
    if not ops:
        return "no MultiScaleDeformableAttention op in the model"
    if local_path is None and device.type != "cuda":
        return f"model on {device.type}; the compiled kernel needs CUDA"
    return None


def _resolve_source(repo_id, revision, version, local_path, trust_remote_code) -> _KernelSource:
    """The kernel source from the arguments, then the environment, then the defaults; the trust policy: a
    repository named explicitly (argument or environment) is trusted unless `trust_remote_code` says otherwise."""
    if local_path is not None:
        return _KernelSource(local_path=Path(local_path))
    explicit_repo = repo_id is not None or bool(os.environ.get(REPO_ID_ENV))
    repo_id = repo_id or os.environ.get(REPO_ID_ENV) or DEFAULT_MSDA_REPO_ID
    revision = revision or os.environ.get(REVISION_ENV) or None
    if revision is None and version is None:
        version = DEFAULT_MSDA_VERSION
    trusted = explicit_repo if trust_remote_code is None else bool(trust_remote_code)
    return _KernelSource(None, repo_id, revision, None if revision is not None else version, trusted)


def _kernelize(kernels, ops: list[MultiScaleDeformableAttention], source: _KernelSource, device: torch.device,
               training: bool, compile: bool) -> None:
    """Swaps each op's forward for the kernel layer of `source` (the `kernels` package's repositories and
    `kernelize`)."""
    if source.local_path is not None:
        repository = kernels.LocalLayerRepository(source.local_path.expanduser().resolve(), layer_name=MSDA_LAYER_NAME)
    else:
        repository = kernels.LayerRepository(
            source.repo_id,
            layer_name=MSDA_LAYER_NAME,
            revision=source.revision,
            version=source.version,
            trust_remote_code=[source.repo_id] if source.trusted else False,
        )
    mode = kernels.Mode.TRAINING if training else kernels.Mode.INFERENCE
    if compile:
        mode = mode | kernels.Mode.TORCH_COMPILE
    with kernels.use_kernel_mapping({MSDA_LAYER_NAME: {device.type: repository}}, inherit_mapping=False):
        for op in ops:
            kernels.kernelize(op, mode=mode, device=device.type, use_fallback=kernels.KernelizeFallback.NONE)


def _fall_back(ops: list[MultiScaleDeformableAttention], reason: str, warn: bool) -> None:
    """The PyTorch path for every op, with the module's one log line."""
    _use_pytorch(ops)
    (logger.warning if warn else logger.info)("MSDA: using the PyTorch implementation (%s).", reason)


def load_msda_kernel(
    model: nn.Module,
    repo_id: str | None = None,
    revision: str | None = None,
    version: int | None = None,
    local_path: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    trust_remote_code: bool | None = None,
    compile: bool = False,
    verify: bool = True,
) -> nn.Module:
    """Swap the forward of every `MultiScaleDeformableAttention` in `model` for a compiled kernel layer when possible.

    Args:
        model: a module containing MSDA ops (moved to its device first; the device is read from its parameters
            unless `device` is given).
        repo_id / revision / version: Hub kernel repository (default `DEFAULT_MSDA_REPO_ID`, env `MASKDINO_MSDA_REPO_ID`)
            and its revision (env `MASKDINO_MSDA_REVISION`) or kernel version (default 1 when neither is given).
        local_path: a local kernel build directory (env `MASKDINO_MSDA_LOCAL_PATH`); used instead of the Hub (offline).
        trust_remote_code: allow a repository outside the organisations `kernels` trusts. Default: trusted when the
            repository was named explicitly (argument or environment).
        compile: kernelize for use under `torch.compile` (`Mode.TORCH_COMPILE`).
        verify: compare the swapped-in forward with the PyTorch path on a small problem before keeping it.

    Returns the model. Each op's `msda_backend` attribute records the path taken ("pytorch" or "kernel: ...");
    exactly one log line says the same. Environment `MASKDINO_FORCE_PYTORCH_MSDA=1` forces the PyTorch path.
    Steps: resolve (`_pytorch_reason`, `_resolve_source`), load (`_kernelize`), verify (`_check_layer`,
    `_kernel_has_compiled_ops`), fall back (`_fall_back`).
    """
    ops = _msda_modules(model)
    device = torch.device(device) if device is not None else _model_device(model)
    local_path = local_path if local_path is not None else os.environ.get(LOCAL_PATH_ENV) or None
    reason = _pytorch_reason(ops, device, local_path)
    if reason is not None:
        _fall_back(ops, reason, warn=False)
        return model
    try:
        import kernels
    except ImportError as error:
        _fall_back(ops, f"the `kernels` package is unavailable: {error}", warn=True)
        return model
    source = _resolve_source(repo_id, revision, version, local_path, trust_remote_code)
    try:
        _kernelize(kernels, ops, source, device, model.training, compile)
        if verify:
            _check_layer(ops[0], device)
    except Exception as error:  # noqa: BLE001  (no network, no build for this system, import error, mismatch)
        detail = " ".join(str(error).split()) or type(error).__name__
        _fall_back(ops, f"kernel from {source} unavailable on {device.type}: {type(error).__name__}: {detail[:300]}",
                   warn=True)
        return model
    compiled = _kernel_has_compiled_ops(ops[0])
    if compiled is False and device.type == "cuda":  # loaded without its compiled extension: slower than ours
        _fall_back(ops, f"the kernel package from {source} has no compiled op for this system", warn=True)
        return model
    for op in ops:
        op.msda_backend = f"kernel: {source}"
    note = " (package without its compiled op: it runs its PyTorch path)" if compiled is False else ""
    logger.info("MSDA: using the kernel layer from %s on %s for %d op(s)%s.", source, device.type, len(ops), note)
    return model


__all__ = [
    "DEFAULT_MSDA_REPO_ID",
    "MaskDINOMultiscaleDeformableAttention",
    "MultiScaleDeformableAttention",
    "load_msda_kernel",
    "multi_scale_deformable_attention_pytorch",
    "multi_scale_deformable_attention_reference",
]
