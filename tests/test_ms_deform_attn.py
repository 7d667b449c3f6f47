"""Multi-scale deformable attention: the fast PyTorch path against the straightforward reference, and loading."""

from __future__ import annotations

import logging
import os

import pytest
import torch

import maskdino_hf.ms_deform_attn as msda
from maskdino_hf.ms_deform_attn import (
    MaskDINOMultiscaleDeformableAttention,
    MultiScaleDeformableAttention,
    load_msda_kernel,
    multi_scale_deformable_attention_pytorch,
    multi_scale_deformable_attention_reference,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a GPU) to run")
LEVELS = ((6, 9), (3, 5), (2, 2), (1, 1))


def make_inputs(
    batch=2, queries=11, heads=3, head_dim=5, points=3, levels=LEVELS, dtype=torch.float64, spread=(-0.25, 1.25), seed=0
):
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(h * w for h, w in levels)
    value = torch.randn(batch, tokens, heads, head_dim, generator=generator, dtype=torch.float64)
    low, high = spread
    locations = torch.rand(batch, queries, heads, len(levels), points, 2, generator=generator, dtype=torch.float64)
    locations = locations * (high - low) + low  # some points land outside their map
    weights = torch.rand(batch, queries, heads, len(levels), points, generator=generator, dtype=torch.float64)
    shapes = torch.tensor(levels, dtype=torch.int64)
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    return value.to(dtype), shapes, [tuple(level) for level in levels], starts, locations.to(dtype), weights.to(dtype)


def border_locations(levels, batch, heads, points, dtype=torch.float64):
    """Locations on pixel centres, on the map edges, exactly one pixel outside and far outside, for every level."""
    per_level = []
    for height, width in levels:

        def axis(size):
            pixels = torch.tensor(
                [-2.0, -1.0, -0.75, -0.5, 0.0, 0.5, size - 1.0, size - 0.5, size - 0.25, size, size + 1.0]
            )
            return (pixels + 0.5) / size  # loc such that loc * size - 0.5 == pixel

        xs, ys = axis(width), axis(height)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="ij"), dim=-1).reshape(-1, 2)
        per_level.append(grid)
    count = per_level[0].shape[0]
    stacked = torch.stack(per_level, dim=1)  # (count, levels, 2)
    locations = stacked.view(1, count, 1, len(levels), 1, 2).expand(batch, count, heads, len(levels), points, 2)
    return locations.to(dtype).contiguous()


def run_both(value, shapes, shapes_list, starts, locations, weights, grad_seed=1):
    """Outputs and input gradients of the fast path and of the reference for the same upstream gradient."""
    results = []
    for impl in ("fast", "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
        if impl == "fast":
            output = multi_scale_deformable_attention_pytorch(leaves[0], shapes, starts, leaves[1], leaves[2])
        else:
            output = multi_scale_deformable_attention_reference(leaves[0], shapes_list, leaves[1], leaves[2])
        grad = torch.randn(output.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
        output.backward(grad.to(output.dtype))
        results.append((output.detach(), *(leaf.grad for leaf in leaves)))
    return results


def assert_relative(actual, expected, rtol):
    """max |actual - expected| <= rtol * max |expected| (relative to the tensor's scale)."""
    scale = expected.abs().max().clamp_min(1e-30)
    error = (actual.double() - expected.double()).abs().max()
    assert error <= rtol * scale, f"relative error {float(error / scale):.3e} > {rtol:.1e}"


@pytest.mark.parametrize("batch", [1, 3])
def test_fast_path_matches_reference_float64(batch):
    inputs = make_inputs(batch=batch)
    fast, reference = run_both(*inputs)
    assert fast[0].shape == reference[0].shape == (batch, 11, 3 * 5)
    for actual, expected in zip(fast, reference):  # output, grad value, grad locations, grad weights
        assert_relative(actual, expected, 1e-6)
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)


def test_fast_path_matches_reference_float32():
    inputs = make_inputs(dtype=torch.float32, queries=40, head_dim=8)
    fast, reference = run_both(*inputs)
    for actual, expected in zip(fast, reference):
        assert actual.dtype == torch.float32
        assert_relative(actual, expected, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_steps_of_bags_equal_one_step(dtype, monkeypatch):
    """The op runs in steps of `_CPU_CHUNK_BAGS` (backward: `_CPU_BACKWARD_CHUNK_BAGS`) bags (image, query, head); steps that cut images and heads anywhere
    give the same output and gradients as one step, bit for bit (same arithmetic per bag, same sort order)."""
    value, shapes, _, starts, locations, weights = make_inputs(batch=3, dtype=dtype)
    results = []
    for chunk in (7, 1 << 20):
        monkeypatch.setattr(msda, "_CPU_CHUNK_BAGS", chunk)
        monkeypatch.setattr(msda, "_CPU_BACKWARD_CHUNK_BAGS", chunk)
        leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
        output = multi_scale_deformable_attention_pytorch(leaves[0], shapes, starts, leaves[1], leaves[2])
        output.backward(torch.ones_like(output))
        with torch.inference_mode():
            inference = multi_scale_deformable_attention_pytorch(value, shapes, starts, locations, weights)
        assert output.dtype == inference.dtype == dtype and torch.equal(output.detach(), inference)
        results.append((output.detach(), *(leaf.grad for leaf in leaves)))
    for chunked, whole in zip(*results):
        torch.testing.assert_close(chunked, whole, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_points_on_borders_and_outside(dtype):
    value, shapes, shapes_list, starts, _, _ = make_inputs(dtype=dtype, heads=2, points=2)
    locations = border_locations(shapes_list, batch=2, heads=2, points=2, dtype=dtype)
    generator = torch.Generator().manual_seed(3)
    weights = torch.rand(locations.shape[:-1], generator=generator, dtype=torch.float64).to(dtype)
    fast, reference = run_both(value, shapes, shapes_list, starts, locations, weights)
    for actual, expected in zip(fast, reference):
        assert_relative(actual, expected, 1e-6 if dtype == torch.float32 else 1e-12)
    # A point far outside every map samples nothing and gets no location gradient.
    far = locations.clone()
    far[..., 0] = -1.0
    fast, reference = run_both(value, shapes, shapes_list, starts, far, weights)
    assert fast[0].abs().max() == 0 and fast[2].abs().max() == 0 and fast[3].abs().max() == 0
    assert reference[0].abs().max() == 0


def test_gradcheck_float64():
    value, shapes, _, starts, locations, weights = make_inputs(
        batch=2, queries=3, heads=2, head_dim=3, points=2, levels=((3, 4), (2, 2))
    )
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]

    def fn(value, locations, weights):
        return multi_scale_deformable_attention_pytorch(value, shapes, starts, locations, weights)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision(dtype):
    value, shapes, shapes_list, starts, locations, weights = make_inputs(dtype=dtype, queries=20, head_dim=8)
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
    output = multi_scale_deformable_attention_pytorch(leaves[0], shapes, starts, leaves[1], leaves[2])
    assert output.dtype == dtype
    output.float().square().sum().backward()
    assert all(leaf.grad.dtype == dtype and torch.isfinite(leaf.grad).all() for leaf in leaves)
    expected = multi_scale_deformable_attention_reference(
        value.double(), shapes_list, locations.double(), weights.double()
    )
    assert_relative(output, expected, 2e-2)


def test_op_module_and_layer_use_fast_path():
    value, shapes, shapes_list, starts, locations, weights = make_inputs(dtype=torch.float32)
    op = MultiScaleDeformableAttention()
    assert op.msda_backend == "pytorch"
    expected = multi_scale_deformable_attention_reference(value, shapes_list, locations, weights)
    for im2col_step in (1, 64):  # ignored by the PyTorch path; any batch size works
        assert_relative(op(value, shapes, shapes_list, starts, locations, weights, im2col_step), expected, 1e-6)

    layer = MaskDINOMultiscaleDeformableAttention(hidden_size=16, num_levels=2, num_heads=2, num_points=2)
    hidden = torch.randn(2, 5, 16)
    encoder = torch.randn(2, 6 * 9 + 3 * 5, 16)
    reference_points = torch.rand(2, 5, 2, 2)
    output, attention = layer(
        hidden,
        encoder_hidden_states=encoder,
        reference_points=reference_points,
        spatial_shapes=shapes[:2],
        spatial_shapes_list=shapes_list[:2],
        level_start_index=starts[:2],
    )
    assert output.shape == (2, 5, 16) and attention.shape == (2, 5, 2, 2, 2)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own imports (torch.jit internals)
def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    value, shapes, _, starts, locations, weights = make_inputs(
        dtype=torch.float32, batch=1, queries=6, heads=2, head_dim=4, points=2, levels=((4, 5), (2, 3))
    )
    compiled = torch.compile(multi_scale_deformable_attention_pytorch, fullgraph=True, dynamic=False)
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
    output = compiled(leaves[0], shapes, starts, leaves[1], leaves[2])
    eager_leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
    eager = multi_scale_deformable_attention_pytorch(eager_leaves[0], shapes, starts, eager_leaves[1], eager_leaves[2])
    torch.testing.assert_close(output, eager, rtol=1e-5, atol=1e-6)
    output.sum().backward()
    eager.sum().backward()
    for leaf, eager_leaf in zip(leaves, eager_leaves):
        torch.testing.assert_close(leaf.grad, eager_leaf.grad, rtol=1e-5, atol=1e-5)


def _our_log_records(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "maskdino_hf.ms_deform_attn"]


def _no_network(monkeypatch):
    import kernels
    import kernels.layer.layer as kernels_layer

    def refuse(*args, **kwargs):
        raise AssertionError("the MSDA loader must not reach the Hub here")

    for module in (kernels, kernels_layer):
        monkeypatch.setattr(module, "get_kernel", refuse)
    monkeypatch.setattr(kernels_layer.LayerRepository, "load", refuse)


def test_loader_falls_back_on_cpu_with_one_log_line(caplog, monkeypatch):
    for name in ("MASKDINO_FORCE_PYTORCH_MSDA", "MASKDINO_MSDA_LOCAL_PATH", "MASKDINO_MSDA_REPO_ID"):
        monkeypatch.delenv(name, raising=False)
    _no_network(monkeypatch)
    layer = MaskDINOMultiscaleDeformableAttention(hidden_size=16, num_levels=2, num_heads=2, num_points=2)
    with caplog.at_level(logging.INFO):
        assert load_msda_kernel(layer) is layer
    records = _our_log_records(caplog)
    assert len(records) == 1 and "PyTorch" in records[0] and "cpu" in records[0], records
    assert layer.attn.msda_backend == "pytorch" and "forward" not in layer.attn.__dict__


def test_env_var_forces_pytorch(caplog, monkeypatch, tmp_path):
    _no_network(monkeypatch)
    monkeypatch.setenv("MASKDINO_FORCE_PYTORCH_MSDA", "1")
    layer = MaskDINOMultiscaleDeformableAttention(hidden_size=16, num_levels=2, num_heads=2, num_points=2)
    with caplog.at_level(logging.INFO):
        load_msda_kernel(layer, local_path=tmp_path, device="cuda")
    records = _our_log_records(caplog)
    assert len(records) == 1 and "MASKDINO_FORCE_PYTORCH_MSDA" in records[0], records
    assert layer.attn.msda_backend == "pytorch"


def test_unloadable_local_build_falls_back_with_one_warning(caplog, monkeypatch, tmp_path):
    monkeypatch.delenv("MASKDINO_FORCE_PYTORCH_MSDA", raising=False)
    _no_network(monkeypatch)
    layer = MaskDINOMultiscaleDeformableAttention(hidden_size=16, num_levels=2, num_heads=2, num_points=2)
    with caplog.at_level(logging.INFO):
        load_msda_kernel(layer, local_path=tmp_path / "missing")
    records = _our_log_records(caplog)
    assert len(records) == 1 and "PyTorch" in records[0] and "unavailable" in records[0], records
    assert layer.attn.msda_backend == "pytorch" and "forward" not in layer.attn.__dict__


def test_no_network_at_import():
    import subprocess
    import sys

    code = (
        "import socket\n"
        "def refuse(*a, **k): raise AssertionError('network use at import')\n"
        "socket.socket.connect = refuse\nsocket.create_connection = refuse\nsocket.getaddrinfo = refuse\n"
        "import maskdino_hf.ms_deform_attn\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# ---------------------------------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_path_on_cuda_matches_reference(dtype):
    inputs = [t.cuda() if torch.is_tensor(t) else t for t in make_inputs(dtype=dtype)]
    value, shapes, shapes_list, starts, locations, weights = inputs
    output = multi_scale_deformable_attention_pytorch(value, shapes, starts, locations, weights)
    expected = multi_scale_deformable_attention_reference(
        value.double(), shapes_list, locations.double(), weights.double()
    )
    assert_relative(output, expected, 1e-5 if dtype == torch.float32 else 2e-2)


@needs_cuda
def test_fast_path_on_cuda_never_synchronises():
    value, shapes, _, starts, locations, weights = [
        t.cuda() if torch.is_tensor(t) else t for t in make_inputs(dtype=torch.float32)
    ]
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        output = multi_scale_deformable_attention_pytorch(leaves[0], shapes, starts, leaves[1], leaves[2])
        output.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(leaf.grad is not None for leaf in leaves)


@needs_cuda
def test_loader_on_cuda_uses_kernel_or_logs_fallback(caplog, monkeypatch):
    monkeypatch.delenv("MASKDINO_FORCE_PYTORCH_MSDA", raising=False)
    layer = MaskDINOMultiscaleDeformableAttention(hidden_size=64, num_levels=2, num_heads=2, num_points=2).cuda()
    with caplog.at_level(logging.INFO):
        load_msda_kernel(layer)
    records = _our_log_records(caplog)
    assert len(records) == 1, records
    value, shapes, shapes_list, starts, locations, weights = [
        t.cuda() if torch.is_tensor(t) else t
        for t in make_inputs(dtype=torch.float32, heads=2, head_dim=32, levels=((6, 9), (3, 5)))
    ]
    output = layer.attn(value, shapes, shapes_list, starts, locations, weights, 64)
    expected = multi_scale_deformable_attention_reference(value, shapes_list, locations, weights)
    assert_relative(output, expected, 1e-4)


def test_module_constants():
    assert msda.DEFAULT_MSDA_REPO_ID == "kernels-community/deformable-detr"
    assert msda.FORCE_PYTORCH_ENV == "MASKDINO_FORCE_PYTORCH_MSDA"


@pytest.mark.parametrize("coordinates", [2, 4])
def test_layer_fused_projections_equal_the_parent_forward(coordinates):
    """The layer's own forward (one matmul for sampling offsets and attention weights) equals Transformers' Deformable
    DETR forward on the same module, outputs and gradients, and keeps the parent's state-dict keys."""
    from transformers.models.deformable_detr.modeling_deformable_detr import (
        DeformableDetrMultiscaleDeformableAttention,
    )

    torch.manual_seed(0)
    layer = MaskDINOMultiscaleDeformableAttention(hidden_size=16, num_levels=2, num_heads=2, num_points=2).double()
    for parameter in layer.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    assert sorted(layer.state_dict()) == sorted(
        f"{name}.{kind}" for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
        for kind in ("weight", "bias")
    )
    _, shapes, shapes_list, starts, _, _ = make_inputs(levels=((6, 9), (3, 5)))
    kwargs = dict(
        hidden_states=torch.randn(2, 5, 16, dtype=torch.float64),
        encoder_hidden_states=torch.randn(2, 6 * 9 + 3 * 5, 16, dtype=torch.float64),
        position_embeddings=torch.randn(2, 5, 16, dtype=torch.float64),
        reference_points=torch.rand(2, 5, 2, coordinates, dtype=torch.float64),
        spatial_shapes=shapes,
        spatial_shapes_list=shapes_list,
        level_start_index=starts,
    )
    results = []
    for forward in (layer.forward, DeformableDetrMultiscaleDeformableAttention.forward.__get__(layer)):
        layer.zero_grad()
        output, attention = forward(**kwargs)
        output.square().sum().backward()
        results.append((output, attention, *(parameter.grad.clone() for parameter in layer.parameters())))
    for ours, parent in zip(*results):
        torch.testing.assert_close(ours, parent, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("coordinates", [2, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_value_projection_after_the_sampling_equals_the_parent_forward(coordinates, masked):
    """At inference, with few queries on many tokens, the layer samples the unprojected tokens and projects each
    head's sample (the bias weighted by the sampled coverage): the same outputs as Transformers' Deformable DETR
    forward, which projects every token first, with sampling points outside the maps and padded tokens."""
    from transformers.models.deformable_detr.modeling_deformable_detr import (
        DeformableDetrMultiscaleDeformableAttention,
    )

    torch.manual_seed(0)
    layer = MaskDINOMultiscaleDeformableAttention(hidden_size=16, num_levels=2, num_heads=2, num_points=2).double()
    for parameter in layer.parameters():
        torch.nn.init.normal_(parameter, std=1.0)  # offsets of several cells: many points fall outside the maps
    _, shapes, shapes_list, starts, _, _ = make_inputs(levels=((6, 9), (3, 5)))
    tokens = 6 * 9 + 3 * 5
    attention_mask = torch.rand(2, tokens) > 0.3 if masked else None
    kwargs = dict(
        hidden_states=torch.randn(2, 5, 16, dtype=torch.float64),
        attention_mask=attention_mask,
        encoder_hidden_states=torch.randn(2, tokens, 16, dtype=torch.float64),
        position_embeddings=torch.randn(2, 5, 16, dtype=torch.float64),
        reference_points=torch.rand(2, 5, 2, coordinates, dtype=torch.float64),
        spatial_shapes=shapes,
        spatial_shapes_list=shapes_list,
        level_start_index=starts,
    )
    parent = DeformableDetrMultiscaleDeformableAttention.forward.__get__(layer)
    calls = []
    layer.attn.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
    with torch.no_grad():
        assert layer.projects_after_sampling(kwargs["encoder_hidden_states"], 5)  # 5 queries x 2 heads x 3 <= 69
        output, attention = layer(**kwargs)
        assert calls == [(2, tokens, 1, 16), (2, tokens, 1, 1)]  # the tokens, then the map of ones (coverage)
        expected, expected_attention = parent(**kwargs)
    torch.testing.assert_close(output, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(attention, expected_attention, rtol=1e-10, atol=1e-12)



@pytest.mark.parametrize("memory_dtype", [torch.float32, torch.bfloat16])
def test_value_projection_after_the_sampling_under_bfloat16_autocast(memory_dtype):
    """Under CPU bfloat16 autocast the late projection takes float32 weights with a float32 or bfloat16 memory and
    gives the projection-first result to bfloat16 precision."""
    torch.manual_seed(0)
    layer = MaskDINOMultiscaleDeformableAttention(hidden_size=32, num_levels=2, num_heads=4, num_points=2).eval()
    _, shapes, shapes_list, starts, _, _ = make_inputs(levels=((12, 10), (6, 5)))
    kwargs = dict(
        hidden_states=torch.randn(2, 3, 32),
        encoder_hidden_states=torch.randn(2, 150, 32).to(memory_dtype),
        reference_points=torch.rand(2, 3, 2, 4),
        spatial_shapes=shapes,
        spatial_shapes_list=shapes_list,
        level_start_index=starts,
    )
    outputs = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for ratio in (3, 10**9):  # 3 x 4 heads x 3 queries <= 150 tokens: late; then projection first
            layer.late_projection_ratio = ratio
            assert layer.projects_after_sampling(kwargs["encoder_hidden_states"], 3) == (ratio == 3)
            outputs.append(layer(**kwargs)[0])
    late, first = outputs
    assert late.dtype == first.dtype == torch.bfloat16
    torch.testing.assert_close(late.float(), first.float(), rtol=0.02, atol=0.02)

def test_value_projection_comes_first_in_training_and_for_the_encoder_self_attention():
    """The late projection is an inference path for few queries: recorded calls (its value gradient over all
    channels would cost more) and as many queries as tokens keep the projection of every token."""
    layer = MaskDINOMultiscaleDeformableAttention(hidden_size=256, num_levels=4, num_heads=8, num_points=4)
    memory = torch.randn(1, 18070, 256)
    assert not layer.projects_after_sampling(memory, 300)  # weights require gradients, grad mode on
    with torch.no_grad():
        assert layer.projects_after_sampling(memory, 300)
        assert not layer.projects_after_sampling(memory, 18070)
    layer.requires_grad_(False)
    assert layer.projects_after_sampling(memory, 300)
    assert not layer.projects_after_sampling(memory.requires_grad_(), 300)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encoder_sampling_locations_are_bit_identical_to_the_broadcast_formula(dtype):
    """`reference + offset / (width, height)` over contiguous rows gives exactly the six-dimensional broadcast's
    values (same operations on the same operands), for float32 and bfloat16 offsets (autocast) and offsets that are
    a view of the fused projection's output."""
    torch.manual_seed(0)
    layer = MaskDINOMultiscaleDeformableAttention(hidden_size=32, num_levels=3, num_heads=4, num_points=2)
    shapes = torch.tensor([[10, 13], [5, 7], [3, 4]])
    reference = torch.rand(2, 11, 3, 2)
    fused = torch.randn(2, 11, 4 * 3 * 2 * 2 + 4 * 3 * 2).to(dtype) * 5
    offsets = fused[..., : 4 * 3 * 2 * 2].view(2, 11, 4, 3, 2, 2)  # a strided view, as in the forward
    expected = reference[:, :, None, :, None, :] + offsets / shapes.flip(-1)[None, None, None, :, None, :]
    result = layer._locations_from_points(reference, offsets, shapes)
    assert result.dtype == expected.dtype and result.shape == expected.shape
    assert torch.equal(result, expected)
