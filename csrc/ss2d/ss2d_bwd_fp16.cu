// The fused CUDA SS2D backward for __half input (one translation unit per dtype, so nvcc builds
// them in parallel). The kernels are in ss2d_bwd_kernel.cuh.
#include "ss2d/ss2d_bwd_n1_kernel.cuh"

namespace pyssm {

cudaError_t ss2d_bwd_fp16(const Ss2dBwdParams& p, cudaStream_t stream) {
  return ss2d_bwd::bwd<__half>(p, stream);
}

}  // namespace pyssm
