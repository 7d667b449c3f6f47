// Explicit instantiations of the MSDA launchers for the supported dtypes. This translation unit depends on the CUDA
// runtime only, so it builds without a CUDA-enabled PyTorch (the CI compile check relies on that).
#include "msda_kernels.cuh"

namespace maskdino_msda {

#define MASKDINO_MSDA_INSTANTIATE(T)                                                                                \
  template cudaError_t launch_msda_forward<T>(const T*, const int64_t*, const int64_t*, const T*, const T*, T*, int, \
                                              int, int, int, int, int, int, cudaStream_t);                          \
  template cudaError_t launch_msda_backward<T>(const T*, const int64_t*, const int64_t*, const T*, const T*,        \
                                               const T*, AccType<T>::type*, T*, T*, int, int, int, int, int, int,   \
                                               int, cudaStream_t);

MASKDINO_MSDA_INSTANTIATE(float)
MASKDINO_MSDA_INSTANTIATE(double)
MASKDINO_MSDA_INSTANTIATE(__half)
MASKDINO_MSDA_INSTANTIATE(__nv_bfloat16)

#undef MASKDINO_MSDA_INSTANTIATE

}  // namespace maskdino_msda
