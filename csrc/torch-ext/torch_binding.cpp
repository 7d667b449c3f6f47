// Op registration for the maskdino_msda kernel (kernel-builder layout). `registration.h` is supplied by
// kernel-builder; it defines TORCH_LIBRARY_EXPAND (a TORCH_LIBRARY that expands its namespace macro, which
// kernel-builder sets to a unique, versioned name) and REGISTER_EXTENSION (the Python module init).

#include <torch/library.h>

#include "registration.h"
#include "torch_binding.h"

TORCH_LIBRARY_EXPAND(TORCH_EXTENSION_NAME, ops) {
  ops.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_loc, Tensor attn_weight, int im2col_step) -> Tensor");
  ops.impl("ms_deform_attn_forward", c10::DeviceType::CUDA, &ms_deform_attn_forward);

  ops.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_loc, Tensor attn_weight, Tensor grad_output, int im2col_step) -> (Tensor, Tensor, Tensor)");
  ops.impl("ms_deform_attn_backward", c10::DeviceType::CUDA, &ms_deform_attn_backward);
}

REGISTER_EXTENSION(TORCH_EXTENSION_NAME)
