"""Multi-scale deformable attention (MSDA), the sampling op of the pixel decoder and of the DINO decoder.

`MultiScaleDeformableAttention` is the op alone: its forward signature is the one a compiled hub kernel
(`kernels`' `use_kernel_forward_from_hub`) replaces. `MaskDINOMultiscaleDeformableAttention` is the layer with its
projections; it reuses Transformers' Deformable DETR layer and only swaps in this op.
"""

from __future__ import annotations

import torch
from kernels import use_kernel_forward_from_hub
from torch import nn
from transformers.models.deformable_detr.modeling_deformable_detr import DeformableDetrMultiscaleDeformableAttention


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
        value_level = value_list[level].flatten(2).transpose(1, 2).reshape(batch_size * num_heads, head_dim, height, width)
        grid_level = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(
            nn.functional.grid_sample(value_level, grid_level, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    weights = attention_weights.transpose(1, 2).reshape(batch_size * num_heads, 1, num_queries, num_levels * num_points)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return output.view(batch_size, num_heads * head_dim, num_queries).transpose(1, 2).contiguous()


@use_kernel_forward_from_hub("MultiScaleDeformableAttention")
class MultiScaleDeformableAttention(nn.Module):
    """The MSDA op; a hub kernel layer of the same name replaces `forward` on CUDA."""

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
        return multi_scale_deformable_attention_reference(
            value, value_spatial_shapes_list, sampling_locations, attention_weights
        )


class MaskDINOMultiscaleDeformableAttention(DeformableDetrMultiscaleDeformableAttention):
    """Deformable DETR's MSDA layer (same parameters and math), built from sizes rather than a DETR config."""

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
