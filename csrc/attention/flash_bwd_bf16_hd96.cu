// The CUDA flash-attention backward for __nv_bfloat16, head_dim 96 (one translation unit per dtype and
// head size, so nvcc builds them in parallel). The kernels are in flash_bwd_kernel.cuh.
#include "attention/flash_bwd_kernel.cuh"

namespace pyssm {

cudaError_t flash_bwd_bf16_hd96(const FlashBwdParams& p, cudaStream_t stream) {
  return flash_bwd::bwd<__nv_bfloat16, 96>(p, stream);
}

}  // namespace pyssm
