"""Layers of the maskdino_msda kernel, in the form `kernels.kernelize` expects.

A layer here replaces the `forward` of a model module with the same layer name, so it must be stateless (no
`__init__`, no members besides `forward` and the `kernels` capability flags) and its `forward` must have the op's
signature: (value, value_spatial_shapes, value_spatial_shapes_list, level_start_index, sampling_locations,
attention_weights, im2col_step).
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops


class MultiScaleDeformableAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the compiled forward / backward ops."""

    @staticmethod
    def forward(value, value_spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step):
        return ops.ms_deform_attn_forward(
            value, value_spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        value, value_spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step = inputs
        ctx.save_for_backward(value, value_spatial_shapes, level_start_index, sampling_locations, attention_weights)
        ctx.im2col_step = im2col_step

    @staticmethod
    def backward(ctx, grad_output):
        value, value_spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = ops.ms_deform_attn_backward(
            value,
            value_spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            grad_output.contiguous(),
            ctx.im2col_step,
        )
        return grad_value, None, None, grad_locations, grad_weights, None


def multi_scale_deformable_attention_torch(
    value: torch.Tensor,
    value_spatial_shapes_list: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """PyTorch implementation (bilinear sampling per level with zero padding), used when the compiled op is absent."""
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    per_level = value.split([height * width for height, width in value_spatial_shapes_list], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (height, width) in enumerate(value_spatial_shapes_list):
        image = per_level[level].permute(0, 2, 3, 1).reshape(batch * heads, channels, height, width)
        grid = grids[:, :, :, level].transpose(1, 2).reshape(batch * heads, queries, points, 2)
        sampled.append(
            nn.functional.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # (batch * heads, channels, queries, levels * points) weighted by (batch * heads, 1, queries, levels * points)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    output = (stacked * weights).sum(-1)
    return output.view(batch, heads * channels, queries).transpose(1, 2).contiguous()


class MultiScaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention op; the compiled CUDA kernel when available, PyTorch otherwise."""

    can_torch_compile = True
    has_backward = True

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
        # The op takes one dtype: mixed inputs (e.g. bfloat16 values with float32 locations under autocast) are
        # computed in the widest one and the output is returned in the value dtype.
        dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype)
        value_c, locations_c, weights_c = (t.to(dtype) for t in (value, sampling_locations, attention_weights))
        if ops is None or not value.is_cuda:
            output = multi_scale_deformable_attention_torch(value_c, value_spatial_shapes_list, locations_c, weights_c)
        else:
            output = MultiScaleDeformableAttentionFunction.apply(
                value_c.contiguous(),
                value_spatial_shapes.to(torch.int64).contiguous(),
                level_start_index.to(torch.int64).contiguous(),
                locations_c.contiguous(),
                weights_c.contiguous(),
                im2col_step,
            )
        return output.to(value.dtype)


__all__ = ["MultiScaleDeformableAttention", "MultiScaleDeformableAttentionFunction"]
