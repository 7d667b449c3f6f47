// Declarations of the MSDA kernel launchers. Only the CUDA runtime types are needed here, so both the
// framework glue (msda_torch.cu) and tests can include this without pulling in the kernels themselves.
#pragma once

#include <cuda_runtime_api.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace maskdino_msda {

// Accumulation type: float for half / bfloat16 / float, double for double. The backward pass accumulates the value
// gradient in a buffer of this type.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

template <typename scalar_t>
cudaError_t launch_msda_forward(const scalar_t* value, const int64_t* spatial_shapes, const int64_t* level_start,
                                const scalar_t* sampling_loc, const scalar_t* attn_weight, scalar_t* output,
                                int batch, int spatial, int heads, int channels, int levels, int queries, int points,
                                cudaStream_t stream);

template <typename scalar_t>
cudaError_t launch_msda_backward(const scalar_t* value, const int64_t* spatial_shapes, const int64_t* level_start,
                                 const scalar_t* sampling_loc, const scalar_t* attn_weight,
                                 const scalar_t* grad_output, typename AccType<scalar_t>::type* grad_value,
                                 scalar_t* grad_loc, scalar_t* grad_attn, int batch, int spatial, int heads,
                                 int channels, int levels, int queries, int points, cudaStream_t stream);

}  // namespace maskdino_msda
