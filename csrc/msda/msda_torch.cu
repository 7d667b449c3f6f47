// PyTorch glue for the MSDA kernels: argument checks, allocation, dtype dispatch and stream selection.
// The kernels themselves live in msda_kernels.cuh / msda_kernels.cu and do not depend on ATen.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>
#include <tuple>

#include "msda_launch.h"

namespace {

// ATen scalar type -> CUDA scalar type used by the kernels.
template <typename T>
struct CudaScalar {
  using type = T;
};
template <>
struct CudaScalar<at::Half> {
  using type = __half;
};
template <>
struct CudaScalar<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
const typename CudaScalar<T>::type* cptr(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaScalar<T>::type*>(t.const_data_ptr<T>());
}

template <typename T>
typename CudaScalar<T>::type* mptr(at::Tensor& t) {
  return reinterpret_cast<typename CudaScalar<T>::type*>(t.mutable_data_ptr<T>());
}

struct Sizes {
  int batch, spatial, heads, channels, levels, queries, points;
};

int checked_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), "maskdino_msda: ", what, " (", v,
              ") does not fit in a 32-bit int");
  return static_cast<int>(v);
}

void check_tensor(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), "maskdino_msda: `", name, "` must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == device, "maskdino_msda: `", name, "` is on ", t.device(), " but `value` is on ", device);
  TORCH_CHECK(t.is_contiguous(), "maskdino_msda: `", name,
              "` must be contiguous (call .contiguous() first); got sizes ", t.sizes(), " and strides ",
              t.strides());
}

Sizes check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_loc, const at::Tensor& attn_weight) {
  const at::Device device = value.device();
  check_tensor(value, "value", device);
  check_tensor(spatial_shapes, "spatial_shapes", device);
  check_tensor(level_start_index, "level_start_index", device);
  check_tensor(sampling_loc, "sampling_locations", device);
  check_tensor(attn_weight, "attention_weights", device);

  const auto dtype = value.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "maskdino_msda: `value` must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(sampling_loc.scalar_type() == dtype, "maskdino_msda: `sampling_locations` dtype (",
              sampling_loc.scalar_type(), ") must match `value` dtype (", dtype, ")");
  TORCH_CHECK(attn_weight.scalar_type() == dtype, "maskdino_msda: `attention_weights` dtype (",
              attn_weight.scalar_type(), ") must match `value` dtype (", dtype, ")");
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong, "maskdino_msda: `spatial_shapes` must be int64, got ",
              spatial_shapes.scalar_type());
  TORCH_CHECK(level_start_index.scalar_type() == at::kLong,
              "maskdino_msda: `level_start_index` must be int64, got ", level_start_index.scalar_type());

  TORCH_CHECK(value.dim() == 4, "maskdino_msda: `value` must be (batch, spatial, heads, channels), got sizes ",
              value.sizes());
  TORCH_CHECK(sampling_loc.dim() == 6 && sampling_loc.size(5) == 2,
              "maskdino_msda: `sampling_locations` must be (batch, queries, heads, levels, points, 2), got sizes ",
              sampling_loc.sizes());
  TORCH_CHECK(attn_weight.dim() == 5,
              "maskdino_msda: `attention_weights` must be (batch, queries, heads, levels, points), got sizes ",
              attn_weight.sizes());

  Sizes s;
  s.batch = checked_int(value.size(0), "batch");
  s.spatial = checked_int(value.size(1), "number of value tokens");
  s.heads = checked_int(value.size(2), "heads");
  s.channels = checked_int(value.size(3), "channels per head");
  s.queries = checked_int(sampling_loc.size(1), "queries");
  s.levels = checked_int(sampling_loc.size(3), "levels");
  s.points = checked_int(sampling_loc.size(4), "points");

  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == s.levels && spatial_shapes.size(1) == 2,
              "maskdino_msda: `spatial_shapes` must be (levels=", s.levels, ", 2), got sizes ",
              spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == s.levels,
              "maskdino_msda: `level_start_index` must be (levels=", s.levels, ",), got sizes ",
              level_start_index.sizes());
  TORCH_CHECK(sampling_loc.size(0) == s.batch && sampling_loc.size(2) == s.heads,
              "maskdino_msda: `sampling_locations` sizes ", sampling_loc.sizes(),
              " do not match batch / heads of `value` ", value.sizes());
  TORCH_CHECK(attn_weight.size(0) == s.batch && attn_weight.size(1) == s.queries && attn_weight.size(2) == s.heads &&
                  attn_weight.size(3) == s.levels && attn_weight.size(4) == s.points,
              "maskdino_msda: `attention_weights` sizes ", attn_weight.sizes(),
              " do not match `sampling_locations` sizes ", sampling_loc.sizes());
  // The number of points in a batch element must be addressable (the kernels use 64-bit offsets elsewhere).
  checked_int(static_cast<int64_t>(s.queries) * s.heads * s.levels * s.points, "points per batch element");
  return s;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "maskdino_msda: ", what, " kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                                  const at::Tensor& attn_weight, int64_t im2col_step) {
  // im2col_step is accepted for signature compatibility only: the kernel handles the whole batch in one launch.
  (void)im2col_step;
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
  const c10::cuda::CUDAGuard device_guard(value.device());
  at::Tensor output = at::empty({value.size(0), sampling_loc.size(1), value.size(2) * value.size(3)}, value.options());
  if (output.numel() == 0) return output;
  if (s.levels == 0 || s.points == 0) return output.zero_();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "maskdino_msda_forward", [&] {
    check_launch(maskdino_msda::launch_msda_forward(cptr<scalar_t>(value), spatial_shapes.const_data_ptr<int64_t>(),
                                                    level_start_index.const_data_ptr<int64_t>(),
                                                    cptr<scalar_t>(sampling_loc), cptr<scalar_t>(attn_weight),
                                                    mptr<scalar_t>(output), s.batch, s.spatial, s.heads, s.channels,
                                                    s.levels, s.queries, s.points, stream),
                 "forward");
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc, const at::Tensor& attn_weight, const at::Tensor& grad_output,
    int64_t im2col_step) {
  (void)im2col_step;
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
  check_tensor(grad_output, "grad_output", value.device());
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type(), "maskdino_msda: `grad_output` dtype (",
              grad_output.scalar_type(), ") must match `value` dtype (", value.scalar_type(), ")");
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == s.batch && grad_output.size(1) == s.queries &&
                  grad_output.size(2) == static_cast<int64_t>(s.heads) * s.channels,
              "maskdino_msda: `grad_output` must be (batch, queries, heads * channels) = (", s.batch, ", ", s.queries,
              ", ", static_cast<int64_t>(s.heads) * s.channels, "), got sizes ", grad_output.sizes());
  const c10::cuda::CUDAGuard device_guard(value.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const bool reduced = value.scalar_type() == at::kHalf || value.scalar_type() == at::kBFloat16;
  // Atomic accumulation happens in float (double for double inputs); half / bfloat16 are cast back at the end.
  at::Tensor grad_value_acc = at::zeros(value.sizes(), value.options().dtype(reduced ? at::kFloat : value.scalar_type()));
  at::Tensor grad_loc = at::empty_like(sampling_loc);
  at::Tensor grad_attn = at::empty_like(attn_weight);
  if (grad_attn.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "maskdino_msda_backward", [&] {
      using acc_t = typename maskdino_msda::AccType<typename CudaScalar<scalar_t>::type>::type;
      check_launch(maskdino_msda::launch_msda_backward(
                       cptr<scalar_t>(value), spatial_shapes.const_data_ptr<int64_t>(),
                       level_start_index.const_data_ptr<int64_t>(), cptr<scalar_t>(sampling_loc),
                       cptr<scalar_t>(attn_weight), cptr<scalar_t>(grad_output),
                       grad_value_acc.mutable_data_ptr<acc_t>(), mptr<scalar_t>(grad_loc), mptr<scalar_t>(grad_attn),
                       s.batch, s.spatial, s.heads, s.channels, s.levels, s.queries, s.points, stream),
                   "backward");
    });
  }
  at::Tensor grad_value = reduced ? grad_value_acc.to(value.scalar_type()) : grad_value_acc;
  return std::make_tuple(grad_value, grad_loc, grad_attn);
}
