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
  and one weighted row-sum (`embedding_bag`) produces the output. No Python loop over heads or levels, no host
  synchronisation, works in bfloat16 and under `torch.compile`, equal to the reference. On CPU without gradients it
  runs one image and a few thousand queries at a time (`_msda_cpu_inference`), which keeps its working set in cache.
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
# Fast PyTorch path
# ---------------------------------------------------------------------------------------------------------------------

# Elements of the (bags x corners x head_dim) intermediates the eager backward materialises per chunk.
_CPU_CHUNK_ELEMENTS = 1 << 19
_ACCELERATOR_CHUNK_ELEMENTS = 1 << 25
# Queries per step of the CPU inference path.
_CPU_INFERENCE_QUERIES = 4096


def _stack_corners(pairs, combine, shape, dtype, device) -> torch.Tensor:
    """torch.stack([combine(a, b) for a, b in pairs], dim=1), written in place when nothing needs autograd / tracing."""
    if torch.compiler.is_compiling() or any(torch.is_tensor(t) and t.requires_grad for pair in pairs for t in pair):
        return torch.stack([combine(a, b) for a, b in pairs], dim=1)
    out = torch.empty(shape, dtype=dtype, device=device)  # saves the stack's extra copy (out= has no autograd)
    for index, (a, b) in enumerate(pairs):
        combine(a, b, out=out[:, index])
    return out


def _corner_rows_and_weights(
    value_spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    num_value_tokens: int,
    num_heads: int,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of value.view(batch * tokens * heads, head_dim) and weights of the 4 bilinear corners of every point.

    Returns rows (int32, or int64 for huge inputs) and weights (compute_dtype), both (batch * queries * heads,
    4 * levels * points): one bag per output row of (batch, queries, heads, head_dim), ordered (corner, level, point)
    inside the bag. A corner outside its level's map gets weight 0 (and some valid row): grid_sample's zero padding.

    Everything is computed on (bags, levels * points) tensors with the per-level constants expanded to
    (levels * points,), so every elementwise op runs over long contiguous rows (tiny broadcast inner dimensions are
    several times slower on CPU).
    """
    batch_size, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    device = sampling_locations.device
    num_bags = batch_size * num_queries * num_heads
    per_bag = num_levels * num_points
    num_rows = batch_size * num_value_tokens * num_heads
    # int32 halves the index traffic in eager mode (with a margin for out-of-map corners); traced graphs keep int64,
    # which every backend accepts for gathers (ONNX requires it).
    index_dtype = torch.int32 if num_rows < 2**30 and not torch.compiler.is_compiling() else torch.int64
    shapes = value_spatial_shapes.to(device=device, dtype=torch.int64)

    def per_point(level_values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # (levels,) -> (levels * points,)
        return (
            level_values.to(device=device, dtype=dtype)
            .view(num_levels, 1)
            .expand(num_levels, num_points)
            .reshape(per_bag)
        )

    locations = sampling_locations.to(compute_dtype).reshape(num_bags, per_bag, 2)
    axes = []
    for axis, sizes in ((0, shapes[:, 1]), (1, shapes[:, 0])):  # x runs over the width, y over the height
        size_index = per_point(sizes, index_dtype)
        # Pixel coordinate exactly as grid_sample(align_corners=False) computes it on CPU:
        # grid = 2 * loc - 1, pixel = (grid + 1) * size / 2 - 0.5.
        grid = 2 * locations[:, :, axis] - 1
        pixel = (grid + 1) * (per_point(sizes, compute_dtype) / 2) - 0.5
        low = pixel.floor()
        frac_high = pixel - low
        frac_low = 1 - frac_high
        low = low.to(index_dtype)
        low_inside = ((low >= 0) & (low < size_index)).to(compute_dtype)
        high_inside = ((low >= -1) & (low < size_index - 1)).to(compute_dtype)
        axes.append((low, frac_low * low_inside, frac_high * high_inside))
    (x_low, weight_x_low, weight_x_high), (y_low, weight_y_low, weight_y_high) = axes
    attention = attention_weights.to(compute_dtype).reshape(num_bags, per_bag)
    weight_y_low = weight_y_low * attention
    weight_y_high = weight_y_high * attention

    corner_weights = (
        (weight_y_low, weight_x_low),
        (weight_y_low, weight_x_high),
        (weight_y_high, weight_x_low),
        (weight_y_high, weight_x_high),
    )
    weights = _stack_corners(corner_weights, torch.mul, (num_bags, 4, per_bag), compute_dtype, device)

    widths = per_point(shapes[:, 1], index_dtype)
    token = y_low * widths + x_low + per_point(level_start_index, index_dtype)  # token of the (y0, x0) corner
    batch_offset = torch.arange(batch_size, device=device, dtype=index_dtype) * (num_value_tokens * num_heads)
    head_offset = torch.arange(num_heads, device=device, dtype=index_dtype)
    bag_offset = batch_offset.view(batch_size, 1, 1, 1) + head_offset.view(1, 1, num_heads, 1)
    row_low = (token.view(batch_size, num_queries, num_heads, per_bag) * num_heads + bag_offset).view(num_bags, per_bag)
    row_step = widths * num_heads  # one image row down
    corner_rows = ((row_low, 0), (row_low, num_heads), (row_low, row_step), (row_low, row_step + num_heads))
    rows = _stack_corners(corner_rows, torch.add, (num_bags, 4, per_bag), index_dtype, device)
    rows = rows.view(num_bags, 4 * per_bag).clamp_(0, num_rows - 1)
    return rows, weights.view(num_bags, 4 * per_bag)


class _WeightedRowSum(torch.autograd.Function):
    """out[i] = sum_k weights[i, k] * table[rows[i, k]], with a backward that never materialises all gathered rows."""

    @staticmethod
    def forward(rows: torch.Tensor, table: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")

    @staticmethod
    def setup_context(ctx, inputs, output):
        rows, table, weights = inputs
        ctx.save_for_backward(rows, table, weights)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        rows, table, weights = ctx.saved_tensors
        need_table, need_weights = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_output = grad_output.contiguous()
        num_bags, corners = rows.shape
        dim = table.shape[1]
        budget = _CPU_CHUNK_ELEMENTS if table.device.type == "cpu" else _ACCELERATOR_CHUNK_ELEMENTS
        chunk = max(1, budget // max(1, corners * dim))
        grad_table = torch.zeros_like(table) if need_table else None
        grad_weights = torch.empty_like(weights) if need_weights else None
        for start in range(0, num_bags, chunk):
            stop = min(num_bags, start + chunk)
            # int64: int32 indices take slow paths in index_add_ / index_select
            rows_chunk = rows[start:stop].reshape(-1).long()
            grad_chunk = grad_output[start:stop]
            if need_weights:
                gathered = table.index_select(0, rows_chunk).view(stop - start, corners, dim)
                torch.bmm(gathered, grad_chunk.unsqueeze(-1), out=grad_weights[start:stop].unsqueeze(-1))
            if need_table:
                contribution = weights[start:stop].unsqueeze(-1) * grad_chunk.unsqueeze(1)
                grad_table.index_add_(0, rows_chunk, contribution.view(-1, dim))
        return None, grad_table, grad_weights


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


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors)


def _msda_cpu_inference(
    value: torch.Tensor,
    value_spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """CPU inference: one image and `_CPU_INFERENCE_QUERIES` queries at a time, with the same rows and weights as
    all at once (in float32 and float64 the same result, bit for bit). The gathered table is then one image's (cache-sized at COCO resolution) and the corner arithmetic
    runs on cache-sized intermediates. Measured on the R50 encoder at 800x1088, 2 threads: at batch 4 the op takes
    0.56 s per layer instead of 0.98 s; at batch 1 about the same as all at once.

    bfloat16 values (autocast) are gathered as they are, with the float32 corner weights rounded to bfloat16;
    `embedding_bag` accumulates in float32, so the result is within two bfloat16 roundings of the float32-table one,
    and the op is ~9% faster on the Swin-L encoder (5 levels). Positions and weights are always computed in float32."""
    batch_size, num_value_tokens, num_heads, head_dim = value.shape
    num_queries = sampling_locations.shape[1]
    table_dtype = value.dtype if value.dtype == torch.bfloat16 else compute_dtype
    table = value.to(table_dtype).reshape(batch_size, num_value_tokens * num_heads, head_dim)
    output = value.new_empty(batch_size, num_queries, num_heads * head_dim)
    for image in range(batch_size):
        for start in range(0, num_queries, _CPU_INFERENCE_QUERIES):
            stop = min(num_queries, start + _CPU_INFERENCE_QUERIES)
            rows, weights = _corner_rows_and_weights(
                value_spatial_shapes,
                level_start_index,
                sampling_locations[image : image + 1, start:stop],
                attention_weights[image : image + 1, start:stop],
                num_value_tokens,
                num_heads,
                compute_dtype,
            )
            sampled = nn.functional.embedding_bag(
                rows, table[image], per_sample_weights=weights.to(table_dtype), mode="sum"
            )
            output[image, start:stop] = sampled.view(stop - start, num_heads * head_dim)
    return output


def multi_scale_deformable_attention_pytorch(
    value: torch.Tensor,
    value_spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """MSDA for all heads and levels at once (see the module docstring); same inputs / output as the reference.

    Only tensors are used for the level geometry (`value_spatial_shapes`, `level_start_index`), so nothing is read
    back to the host. Half and bfloat16 inputs are computed in float32 and the output is cast back. Inputs are
    checked by `_check_msda_inputs`.
    """
    _check_msda_inputs(value, value_spatial_shapes, level_start_index, sampling_locations, attention_weights)
    batch_size, num_value_tokens, num_heads, head_dim = value.shape
    num_queries = sampling_locations.shape[1]
    compute_dtype = torch.float32 if value.dtype in (torch.float16, torch.bfloat16) else value.dtype
    if value.device.type == "cpu" and not torch.compiler.is_compiling() and not _needs_grad(
        value, sampling_locations, attention_weights
    ):
        return _msda_cpu_inference(value, value_spatial_shapes, level_start_index, sampling_locations,
                                   attention_weights, compute_dtype)
    rows, weights = _corner_rows_and_weights(
        value_spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        num_value_tokens,
        num_heads,
        compute_dtype,
    )
    table = value.to(compute_dtype).reshape(batch_size * num_value_tokens * num_heads, head_dim)
    if torch.compiler.is_compiling():
        # Under torch.compile the gather + weighted sum is fused by the compiler (nothing is materialised).
        output = (table[rows] * weights.unsqueeze(-1)).sum(1)
    else:
        output = _WeightedRowSum.apply(rows, table, weights)
    return output.view(batch_size, num_queries, num_heads * head_dim).to(value.dtype)


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
