"""GPU tests of the compiled maskdino_msda ops against a PyTorch reference (grid_sample with zero padding).

The compiled package is taken from, in order: an importable `maskdino_msda` (kernel-builder's test environment), the
build directory named by MASKDINO_MSDA_BUILD (anything `kernels.get_local_kernel` accepts), or csrc/build after
`kernel-builder build-and-copy`. Every test needs CUDA and is skipped without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a GPU) to run the compiled kernel")

CSRC = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def msda():
    module = None
    try:
        import maskdino_msda as module
    except ImportError:
        from kernels import get_local_kernel

        build = os.environ.get("MASKDINO_MSDA_BUILD")
        if build:
            module = get_local_kernel(Path(build))
        elif (CSRC / "build").is_dir():
            module = get_local_kernel(CSRC)
    if module is None:
        pytest.skip("no built maskdino_msda kernel (build csrc/ with kernel-builder or set MASKDINO_MSDA_BUILD)")
    if not module.has_compiled_ops():
        pytest.skip("the maskdino_msda package was loaded without its compiled extension")
    return module


def reference(value, shapes_list, locations, weights):
    """Straightforward MSDA in float64 (one grid_sample per level)."""
    value, locations, weights = value.double(), locations.double(), weights.double()
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = locations.shape
    per_level = value.split([h * w for h, w in shapes_list], dim=1)
    sampled = []
    for level, (height, width) in enumerate(shapes_list):
        image = per_level[level].permute(0, 2, 3, 1).reshape(batch * heads, channels, height, width)
        grid = (2 * locations[:, :, :, level] - 1).transpose(1, 2).reshape(batch * heads, queries, points, 2)
        sampled.append(
            nn.functional.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    stacked = torch.stack(sampled, dim=-2).flatten(-2)
    attention = weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    return (stacked * attention).sum(-1).view(batch, heads * channels, queries).transpose(1, 2).contiguous()


def make_inputs(batch, queries, heads, channels, points, levels, dtype, seed=0, spread=(-0.2, 1.2)):
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(h * w for h, w in levels)
    value = torch.randn(batch, tokens, heads, channels, generator=generator)
    low, high = spread
    locations = torch.rand(batch, queries, heads, len(levels), points, 2, generator=generator) * (high - low) + low
    weights = torch.rand(batch, queries, heads, len(levels), points, generator=generator)
    shapes = torch.tensor(levels, dtype=torch.int64)
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    cuda = lambda t, dt=dtype: t.to(device="cuda", dtype=dt)
    return (
        cuda(value),
        cuda(shapes, torch.int64),
        [tuple(level) for level in levels],
        cuda(starts, torch.int64),
        cuda(locations),
        cuda(weights),
    )


TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
LEVELS = ((13, 17), (7, 9), (4, 5), (2, 3))


def relative_error(actual, expected):
    return float((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def forward_and_grads(function, value, locations, weights, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
    output = function(*leaves)
    output.backward(grad.to(output.dtype))
    return output.detach(), *(leaf.grad for leaf in leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,channels", [(1, 32), (3, 16), (2, 8), (2, 48), (1, 160)])
def test_forward_backward_match_reference(msda, dtype, batch, channels):
    value, shapes, shapes_list, starts, locations, weights = make_inputs(batch, 50, 4, channels, 4, LEVELS, dtype)
    layer = msda.layers.MultiScaleDeformableAttention()
    grad = torch.randn(batch, 50, 4 * channels, device="cuda", dtype=torch.float64)

    kernel = forward_and_grads(
        lambda v, loc, w: layer(v, shapes, shapes_list, starts, loc, w, 64), value, locations, weights, grad
    )
    expected = forward_and_grads(
        lambda v, loc, w: reference(v, shapes_list, loc, w), value.double(), locations.double(), weights.double(), grad
    )
    assert kernel[0].dtype == dtype and kernel[0].shape == (batch, 50, 4 * channels)
    for name, actual, wanted in zip(("output", "grad value", "grad locations", "grad weights"), kernel, expected):
        assert actual.dtype == dtype, name
        assert relative_error(actual, wanted) <= TOLERANCE[dtype], f"{name}: {relative_error(actual, wanted):.2e}"


def test_points_on_borders_and_far_outside(msda):
    shapes_list = [(5, 7), (3, 4)]
    value, shapes, _, starts, _, _ = make_inputs(2, 1, 2, 16, 1, shapes_list, torch.float64)
    per_level = []
    for height, width in shapes_list:

        def axis(size):
            pixels = torch.tensor(
                [-3.0, -1.0, -0.5, 0.0, size - 1.0, size - 0.5, size, size + 2.0], dtype=torch.float64
            )
            return (pixels + 0.5) / size

        grid = torch.stack(torch.meshgrid(axis(width), axis(height), indexing="ij"), dim=-1).reshape(-1, 2)
        per_level.append(grid)
    count = per_level[0].shape[0]
    locations = (
        torch.stack(per_level, dim=1).view(1, count, 1, 2, 1, 2).expand(2, count, 2, 2, 1, 2).contiguous().cuda()
    )
    weights = torch.rand(2, count, 2, 2, 1, dtype=torch.float64, device="cuda")
    grad = torch.randn(2, count, 32, dtype=torch.float64, device="cuda")
    layer = msda.layers.MultiScaleDeformableAttention()
    kernel = forward_and_grads(
        lambda v, loc, w: layer(v, shapes, shapes_list, starts, loc, w, 64), value, locations, weights, grad
    )
    expected = forward_and_grads(lambda v, loc, w: reference(v, shapes_list, loc, w), value, locations, weights, grad)
    for actual, wanted in zip(kernel, expected):
        torch.testing.assert_close(actual, wanted, rtol=1e-9, atol=1e-9)


def test_realistic_encoder_shape(msda):
    levels = ((100, 136), (50, 68), (25, 34), (13, 17))
    queries = sum(h * w for h, w in levels)
    value, shapes, shapes_list, starts, locations, weights = make_inputs(1, queries, 8, 32, 4, levels, torch.float32)
    output = msda.ms_deform_attn_forward(value, shapes, starts, locations, weights, 64)
    assert relative_error(output, reference(value, shapes_list, locations, weights)) <= 1e-5


def test_errors_are_clear(msda):
    value, shapes, _, starts, locations, weights = make_inputs(1, 5, 2, 8, 2, LEVELS, torch.float32)
    with pytest.raises(RuntimeError, match="contiguous"):
        msda.ms_deform_attn_forward(
            value.transpose(1, 2).contiguous().transpose(1, 2), shapes, starts, locations, weights, 64
        )
    with pytest.raises(RuntimeError, match="dtype"):
        msda.ms_deform_attn_forward(value, shapes, starts, locations.half(), weights, 64)
    with pytest.raises(RuntimeError, match="CUDA"):
        msda.ms_deform_attn_forward(value.cpu(), shapes, starts, locations, weights, 64)
    with pytest.raises(RuntimeError, match="int64"):
        msda.ms_deform_attn_forward(value, shapes.int(), starts, locations, weights, 64)


def test_fake_registrations(msda):
    value, shapes, _, starts, locations, weights = make_inputs(2, 7, 2, 8, 2, LEVELS, torch.float32)
    grad = torch.randn(2, 7, 16, device="cuda")
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(
        msda.ops.ms_deform_attn_forward.default, (value, shapes, starts, locations, weights, 64), test_utils=checks
    )
    torch.library.opcheck(
        msda.ops.ms_deform_attn_backward.default,
        (value, shapes, starts, locations, weights, grad, 64),
        test_utils=checks,
    )


def test_torch_compile(msda):
    torch._dynamo.reset()
    value, shapes, shapes_list, starts, locations, weights = make_inputs(2, 30, 4, 32, 4, LEVELS, torch.float32)
    layer = msda.layers.MultiScaleDeformableAttention()

    def run(v, loc, w):
        return layer(v, shapes, shapes_list, starts, loc, w, 64)

    grad = torch.randn(2, 30, 128, device="cuda", dtype=torch.float64)
    eager = forward_and_grads(run, value, locations, weights, grad)
    compiled = forward_and_grads(torch.compile(run, fullgraph=True), value, locations, weights, grad)
    for actual, expected in zip(compiled, eager):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_empty_inputs(msda):
    value, shapes, _, starts, locations, weights = make_inputs(2, 0, 2, 8, 2, LEVELS, torch.float32)
    output = msda.ms_deform_attn_forward(value, shapes, starts, locations, weights, 64)
    assert output.shape == (2, 0, 16)
