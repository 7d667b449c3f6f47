// Multi-scale deformable attention (MSDA): forward and backward CUDA kernels.
//
// This header needs only the CUDA runtime (no ATen / PyTorch headers), so the kernels can be compiled and
// checked on a machine that has nvcc but no CUDA build of PyTorch (see tests/test_kernel_build.py).
//
// Layouts (all contiguous, row-major):
//   value              (batch, spatial, heads, channels)        spatial = sum over levels of H_l * W_l
//   spatial_shapes     (levels, 2) int64, rows (H_l, W_l)
//   level_start        (levels,)   int64, offset of level l along `spatial`
//   sampling_loc       (batch, queries, heads, levels, points, 2)  normalised (x, y) in [0, 1]
//   attn_weight        (batch, queries, heads, levels, points)
//   output             (batch, queries, heads, channels)        == (batch, queries, heads * channels)
//
// Sampling follows grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False): the pixel coordinate of
// a location is loc * size - 0.5, and every bilinear corner that falls outside the map contributes zero (to the
// output and to every gradient).
//
// Work decomposition: one "lane group" of G threads (G a power of two <= 32, G >= channels when channels <= 32)
// handles one (batch, query, head) triple; lane j of the group owns channels j, j + G, j + 2G, ... The sampling
// location and weight of a point are the same for the whole group, so they are loaded once per lane (broadcast
// reads), and the per-point reductions over channels needed by the backward pass are shuffle reductions inside
// the group. Accumulation is done in `float` for half / bfloat16 / float and in `double` for double.

#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "msda_launch.h"

// The per-group bodies below are plain functions of (group, lane). With MASKDINO_MSDA_EMULATION defined they compile
// as host code, and a CPU harness (csrc/tests/emulate_msda.cpp, run by tests/test_kernel_build.py) runs them lane by
// lane, providing `group_sum` and `atomic_accumulate` itself; this checks the kernels' indexing and math without a GPU.
#if defined(MASKDINO_MSDA_EMULATION)
#define MSDA_DEVICE inline
#define MSDA_LDG(pointer) (*(pointer))
#else
#define MSDA_DEVICE __device__ __forceinline__
#define MSDA_LDG(pointer) __ldg(pointer)
#endif

namespace maskdino_msda {

// ----------------------------------------------------------------------------------------------------------------
// Scalar helpers (explicit intrinsics only: PyTorch builds define __CUDA_NO_HALF_CONVERSIONS__ and friends).
// ----------------------------------------------------------------------------------------------------------------

MSDA_DEVICE float load_acc(const float* p) { return MSDA_LDG(p); }
MSDA_DEVICE double load_acc(const double* p) { return MSDA_LDG(p); }
MSDA_DEVICE float load_acc(const __half* p) { return __half2float(MSDA_LDG(p)); }
MSDA_DEVICE float load_acc(const __nv_bfloat16* p) { return __bfloat162float(MSDA_LDG(p)); }

MSDA_DEVICE void store_from_acc(float* p, float v) { *p = v; }
MSDA_DEVICE void store_from_acc(double* p, double v) { *p = v; }
MSDA_DEVICE void store_from_acc(__half* p, float v) { *p = __float2half_rn(v); }
MSDA_DEVICE void store_from_acc(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

MSDA_DEVICE float floor_acc(float v) { return floorf(v); }
MSDA_DEVICE double floor_acc(double v) { return floor(v); }

#if !defined(MASKDINO_MSDA_EMULATION)
// Sum of `v` over the G lanes of this thread's group. Every lane of the warp must call this (the caller never
// branches around it), which keeps the full-warp mask valid.
template <int G, typename T>
__device__ __forceinline__ T group_sum(T v) {
#pragma unroll
  for (int offset = G / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset, G);
  }
  return v;
}

__device__ __forceinline__ void atomic_accumulate(float* p, float v) { atomicAdd(p, v); }
__device__ __forceinline__ void atomic_accumulate(double* p, double v) { atomicAdd(p, v); }
#endif

// Bilinear footprint of one sampling point on one level: the four corner offsets (in elements of the value
// tensor, relative to the level's first row for this batch / head), their validity and their weights.
template <typename acc_t>
struct Footprint {
  int64_t offset[4];  // (y0, x0), (y0, x1), (y1, x0), (y1, x1)
  bool valid[4];
  acc_t weight[4];
  acc_t fy, fx;       // fractional parts, needed for the location gradient
  bool any;           // at least one corner inside the map
};

template <typename acc_t>
MSDA_DEVICE Footprint<acc_t> make_footprint(acc_t loc_x, acc_t loc_y, int height, int width,
                                                           int64_t row_stride) {
  Footprint<acc_t> fp;
  const acc_t x = loc_x * static_cast<acc_t>(width) - static_cast<acc_t>(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(height) - static_cast<acc_t>(0.5);
  // Some corner is inside iff x in [-1, W) and y in [-1, H). NaN fails these tests and samples nothing. The
  // comparisons also keep the float->int conversions below in range.
  fp.any = (x >= static_cast<acc_t>(-1)) && (x < static_cast<acc_t>(width)) && (y >= static_cast<acc_t>(-1)) &&
           (y < static_cast<acc_t>(height));
  if (!fp.any) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      fp.offset[k] = 0;
      fp.valid[k] = false;
      fp.weight[k] = 0;
    }
    fp.fx = 0;
    fp.fy = 0;
    return fp;
  }
  const acc_t xf = floor_acc(x);
  const acc_t yf = floor_acc(y);
  const int x0 = static_cast<int>(xf);
  const int y0 = static_cast<int>(yf);
  const int x1 = x0 + 1;
  const int y1 = y0 + 1;
  fp.fx = x - xf;
  fp.fy = y - yf;
  const acc_t gx = static_cast<acc_t>(1) - fp.fx;
  const acc_t gy = static_cast<acc_t>(1) - fp.fy;
  const bool x0_in = x0 >= 0;
  const bool x1_in = x1 < width;
  const bool y0_in = y0 >= 0;
  const bool y1_in = y1 < height;
  fp.valid[0] = y0_in && x0_in;
  fp.valid[1] = y0_in && x1_in;
  fp.valid[2] = y1_in && x0_in;
  fp.valid[3] = y1_in && x1_in;
  fp.weight[0] = gy * gx;
  fp.weight[1] = gy * fp.fx;
  fp.weight[2] = fp.fy * gx;
  fp.weight[3] = fp.fy * fp.fx;
  const int64_t r0 = static_cast<int64_t>(y0) * width;
  const int64_t r1 = r0 + width;
  fp.offset[0] = (r0 + x0) * row_stride;
  fp.offset[1] = (r0 + x1) * row_stride;
  fp.offset[2] = (r1 + x0) * row_stride;
  fp.offset[3] = (r1 + x1) * row_stride;
  return fp;
}

// Lanes per (batch, query, head) group: the smallest power of two >= channels, capped at a warp.
inline int lane_group_size(int channels) {
  int g = 1;
  while (g < channels && g < 32) g *= 2;
  return g;
}

// ----------------------------------------------------------------------------------------------------------------
// Forward
// ----------------------------------------------------------------------------------------------------------------

// One (batch, query, head) group: lane `lane` accumulates channels lane, lane + G, ... of the output row.
template <typename scalar_t, int G>
MSDA_DEVICE void msda_forward_group(const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
                                    const int64_t* __restrict__ level_start, const scalar_t* __restrict__ sampling_loc,
                                    const scalar_t* __restrict__ attn_weight, scalar_t* __restrict__ output,
                                    int spatial, int heads, int channels, int levels, int queries, int points,
                                    int64_t group, int lane) {
  using acc_t = typename AccType<scalar_t>::type;
  const int head = static_cast<int>(group % heads);
  const int64_t b = group / (static_cast<int64_t>(queries) * heads);
  const int64_t row_stride = static_cast<int64_t>(heads) * channels;  // elements between two spatial positions
  const scalar_t* value_bh = value + b * spatial * row_stride + static_cast<int64_t>(head) * channels;
  const int64_t point_base = group * levels * points;  // index of (b, q, head, level 0, point 0)

  constexpr int kMaxChunks = 4;  // channels <= 4 * G are held in registers; larger head dims loop in chunks
  for (int c_begin = 0; c_begin < channels; c_begin += kMaxChunks * G) {
    acc_t acc[kMaxChunks];
#pragma unroll
    for (int k = 0; k < kMaxChunks; ++k) acc[k] = 0;

    for (int l = 0; l < levels; ++l) {
      const int height = static_cast<int>(MSDA_LDG(spatial_shapes + 2 * l));
      const int width = static_cast<int>(MSDA_LDG(spatial_shapes + 2 * l + 1));
      const scalar_t* value_l = value_bh + MSDA_LDG(level_start + l) * row_stride;
      for (int p = 0; p < points; ++p) {
        const int64_t idx = point_base + static_cast<int64_t>(l) * points + p;
        const acc_t a = load_acc(attn_weight + idx);
        const Footprint<acc_t> fp = make_footprint<acc_t>(load_acc(sampling_loc + 2 * idx),
                                                          load_acc(sampling_loc + 2 * idx + 1), height, width,
                                                          row_stride);
        if (!fp.any) continue;
#pragma unroll
        for (int k = 0; k < kMaxChunks; ++k) {
          const int c = c_begin + k * G + lane;
          if (c < channels) {
            acc_t sampled = 0;
#pragma unroll
            for (int corner = 0; corner < 4; ++corner) {
              if (fp.valid[corner]) sampled += fp.weight[corner] * load_acc(value_l + fp.offset[corner] + c);
            }
            acc[k] += a * sampled;
          }
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kMaxChunks; ++k) {
      const int c = c_begin + k * G + lane;
      if (c < channels) store_from_acc(output + group * channels + c, acc[k]);
    }
  }
}

#if !defined(MASKDINO_MSDA_EMULATION)
template <typename scalar_t, int G>
__global__ void __launch_bounds__(256) msda_forward_kernel(
    const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start, const scalar_t* __restrict__ sampling_loc,
    const scalar_t* __restrict__ attn_weight, scalar_t* __restrict__ output, int batch, int spatial, int heads,
    int channels, int levels, int queries, int points) {
  const int64_t num_groups = static_cast<int64_t>(batch) * queries * heads;
  const int64_t group = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G;
  if (group >= num_groups) return;  // no shuffles in the forward pass, so idle lanes may leave
  msda_forward_group<scalar_t, G>(value, spatial_shapes, level_start, sampling_loc, attn_weight, output, spatial,
                                  heads, channels, levels, queries, points, group,
                                  static_cast<int>(threadIdx.x % G));
}
#endif

// ----------------------------------------------------------------------------------------------------------------
// Backward
// ----------------------------------------------------------------------------------------------------------------

// grad_value is accumulated into a zero-initialised buffer of the accumulation type (float for half / bfloat16 /
// float, double for double) with atomics; the host casts it back to the value dtype. grad_loc and grad_attn are
// written exactly once per point, by lane 0 of the owning group.
// One (batch, query, head) group. An inactive group (past the end of the grid) still runs the loop with zero
// contributions so that every lane of the warp takes part in the shuffle reductions; it never reads or writes memory.
template <typename scalar_t, int G>
MSDA_DEVICE void msda_backward_group(const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
                                     const int64_t* __restrict__ level_start,
                                     const scalar_t* __restrict__ sampling_loc,
                                     const scalar_t* __restrict__ attn_weight,
                                     const scalar_t* __restrict__ grad_output,
                                     typename AccType<scalar_t>::type* __restrict__ grad_value,
                                     scalar_t* __restrict__ grad_loc, scalar_t* __restrict__ grad_attn, int spatial,
                                     int heads, int channels, int levels, int queries, int points, int64_t group,
                                     int lane, bool active) {
  using acc_t = typename AccType<scalar_t>::type;
  if (!active) group = 0;
  const int head = static_cast<int>(group % heads);
  const int64_t b = group / (static_cast<int64_t>(queries) * heads);
  const int64_t row_stride = static_cast<int64_t>(heads) * channels;
  const int64_t value_offset_bh = b * spatial * row_stride + static_cast<int64_t>(head) * channels;
  const int64_t point_base = group * levels * points;

  for (int l = 0; l < levels; ++l) {
    const int height = static_cast<int>(MSDA_LDG(spatial_shapes + 2 * l));
    const int width = static_cast<int>(MSDA_LDG(spatial_shapes + 2 * l + 1));
    const int64_t level_offset = value_offset_bh + MSDA_LDG(level_start + l) * row_stride;
    for (int p = 0; p < points; ++p) {
      const int64_t idx = point_base + static_cast<int64_t>(l) * points + p;
      acc_t a = 0;
      Footprint<acc_t> fp;
      if (active) {
        a = load_acc(attn_weight + idx);
        fp = make_footprint<acc_t>(load_acc(sampling_loc + 2 * idx), load_acc(sampling_loc + 2 * idx + 1), height,
                                   width, row_stride);
      } else {
        fp = make_footprint<acc_t>(static_cast<acc_t>(-2), static_cast<acc_t>(-2), 1, 1, row_stride);
      }

      // Per-lane partial sums over this lane's channels of:
      //   d out / d a   = sampled value,
      //   d out / d x   (pixel units) and d out / d y (pixel units), both already multiplied by a.
      acc_t part_attn = 0, part_x = 0, part_y = 0;
      if (fp.any) {
        const acc_t gx = static_cast<acc_t>(1) - fp.fx;
        const acc_t gy = static_cast<acc_t>(1) - fp.fy;
        for (int c = lane; c < channels; c += G) {
          const acc_t g = load_acc(grad_output + group * channels + c);
          const acc_t ga = g * a;
          acc_t v[4];
#pragma unroll
          for (int corner = 0; corner < 4; ++corner) {
            v[corner] = fp.valid[corner] ? load_acc(value + level_offset + fp.offset[corner] + c) : acc_t(0);
            if (fp.valid[corner]) {
              atomic_accumulate(grad_value + level_offset + fp.offset[corner] + c, fp.weight[corner] * ga);
            }
          }
          const acc_t sampled = fp.weight[0] * v[0] + fp.weight[1] * v[1] + fp.weight[2] * v[2] + fp.weight[3] * v[3];
          part_attn += g * sampled;
          // d sampled / d x = gy * (v01 - v00) + fy * (v11 - v10);  d sampled / d y = gx * (v10 - v00) + fx * (v11 - v01)
          part_x += ga * (gy * (v[1] - v[0]) + fp.fy * (v[3] - v[2]));
          part_y += ga * (gx * (v[2] - v[0]) + fp.fx * (v[3] - v[1]));
        }
      }
      const acc_t sum_attn = group_sum<G>(part_attn);
      const acc_t sum_x = group_sum<G>(part_x);
      const acc_t sum_y = group_sum<G>(part_y);
      if (active && lane == 0) {
        store_from_acc(grad_attn + idx, sum_attn);
        // x = loc_x * W - 0.5, so d / d loc_x = W * d / d x (same for y with H).
        store_from_acc(grad_loc + 2 * idx, sum_x * static_cast<acc_t>(width));
        store_from_acc(grad_loc + 2 * idx + 1, sum_y * static_cast<acc_t>(height));
      }
    }
  }
}

#if !defined(MASKDINO_MSDA_EMULATION)
// grad_value is accumulated into a zero-initialised buffer of the accumulation type (float for half / bfloat16 /
// float, double for double) with atomics; the host casts it back to the value dtype. grad_loc and grad_attn are
// written exactly once per point, by lane 0 of the owning group.
template <typename scalar_t, int G>
__global__ void __launch_bounds__(256) msda_backward_kernel(
    const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start, const scalar_t* __restrict__ sampling_loc,
    const scalar_t* __restrict__ attn_weight, const scalar_t* __restrict__ grad_output,
    typename AccType<scalar_t>::type* __restrict__ grad_value, scalar_t* __restrict__ grad_loc,
    scalar_t* __restrict__ grad_attn, int batch, int spatial, int heads, int channels, int levels, int queries,
    int points) {
  const int64_t num_groups = static_cast<int64_t>(batch) * queries * heads;
  const int64_t group = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G;
  msda_backward_group<scalar_t, G>(value, spatial_shapes, level_start, sampling_loc, attn_weight, grad_output,
                                   grad_value, grad_loc, grad_attn, spatial, heads, channels, levels, queries, points,
                                   group, static_cast<int>(threadIdx.x % G), group < num_groups);
}
#endif

#if !defined(MASKDINO_MSDA_EMULATION)
// ----------------------------------------------------------------------------------------------------------------
// Host-side launchers (plain pointers and a stream; no framework types).
// ----------------------------------------------------------------------------------------------------------------

constexpr int kThreadsPerBlock = 256;

inline unsigned int blocks_for(int64_t num_groups, int group_size) {
  const int64_t threads = num_groups * group_size;
  return static_cast<unsigned int>((threads + kThreadsPerBlock - 1) / kThreadsPerBlock);
}

template <typename scalar_t>
cudaError_t launch_msda_forward(const scalar_t* value, const int64_t* spatial_shapes, const int64_t* level_start,
                                const scalar_t* sampling_loc, const scalar_t* attn_weight, scalar_t* output,
                                int batch, int spatial, int heads, int channels, int levels, int queries, int points,
                                cudaStream_t stream) {
  const int64_t num_groups = static_cast<int64_t>(batch) * queries * heads;
  if (num_groups == 0 || channels == 0) return cudaSuccess;
  const int g = lane_group_size(channels);
  const unsigned int blocks = blocks_for(num_groups, g);
#define MASKDINO_MSDA_FORWARD_CASE(GS)                                                                              \
  case GS:                                                                                                          \
    msda_forward_kernel<scalar_t, GS><<<blocks, kThreadsPerBlock, 0, stream>>>(                                     \
        value, spatial_shapes, level_start, sampling_loc, attn_weight, output, batch, spatial, heads, channels,      \
        levels, queries, points);                                                                                   \
    break;
  switch (g) {
    MASKDINO_MSDA_FORWARD_CASE(1)
    MASKDINO_MSDA_FORWARD_CASE(2)
    MASKDINO_MSDA_FORWARD_CASE(4)
    MASKDINO_MSDA_FORWARD_CASE(8)
    MASKDINO_MSDA_FORWARD_CASE(16)
    default:
      MASKDINO_MSDA_FORWARD_CASE(32)
  }
#undef MASKDINO_MSDA_FORWARD_CASE
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_msda_backward(const scalar_t* value, const int64_t* spatial_shapes, const int64_t* level_start,
                                 const scalar_t* sampling_loc, const scalar_t* attn_weight,
                                 const scalar_t* grad_output, typename AccType<scalar_t>::type* grad_value,
                                 scalar_t* grad_loc, scalar_t* grad_attn, int batch, int spatial, int heads,
                                 int channels, int levels, int queries, int points, cudaStream_t stream) {
  const int64_t num_groups = static_cast<int64_t>(batch) * queries * heads;
  if (num_groups == 0) return cudaSuccess;
  const int g = lane_group_size(channels);
  const unsigned int blocks = blocks_for(num_groups, g);
#define MASKDINO_MSDA_BACKWARD_CASE(GS)                                                                             \
  case GS:                                                                                                          \
    msda_backward_kernel<scalar_t, GS><<<blocks, kThreadsPerBlock, 0, stream>>>(                                    \
        value, spatial_shapes, level_start, sampling_loc, attn_weight, grad_output, grad_value, grad_loc, grad_attn, \
        batch, spatial, heads, channels, levels, queries, points);                                                  \
    break;
  switch (g) {
    MASKDINO_MSDA_BACKWARD_CASE(1)
    MASKDINO_MSDA_BACKWARD_CASE(2)
    MASKDINO_MSDA_BACKWARD_CASE(4)
    MASKDINO_MSDA_BACKWARD_CASE(8)
    MASKDINO_MSDA_BACKWARD_CASE(16)
    default:
      MASKDINO_MSDA_BACKWARD_CASE(32)
  }
#undef MASKDINO_MSDA_BACKWARD_CASE
  return cudaGetLastError();
}

#endif  // !MASKDINO_MSDA_EMULATION

}  // namespace maskdino_msda
