// The fused CUDA SS2D forward for double input (one translation unit per dtype, so nvcc builds
// them in parallel). The kernels are in ss2d_kernel.cuh
// (v2) and ss2d_n1_kernel.cuh (v3, d_state 1).
#include "ss2d/ss2d_n1_kernel.cuh"

namespace pyssm {

cudaError_t ss2d_fwd_fp64(const Ss2dParams& p, cudaStream_t stream) {
  return ss2d::fwd<double>(p, stream);
}

}  // namespace pyssm
