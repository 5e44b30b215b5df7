// The fused CUDA SS2D backward for __nv_bfloat16 input (one translation unit per dtype, so nvcc builds
// them in parallel). The kernels are in ss2d_bwd_kernel.cuh.
#include "ss2d/ss2d_bwd_n1_kernel.cuh"

namespace pyssm {

cudaError_t ss2d_bwd_bf16(const Ss2dBwdParams& p, cudaStream_t stream) {
  return ss2d_bwd::bwd<__nv_bfloat16>(p, stream);
}

}  // namespace pyssm
