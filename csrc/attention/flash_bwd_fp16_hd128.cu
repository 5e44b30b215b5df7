// The CUDA flash-attention backward for __half, head_dim 128 (one translation unit per dtype and
// head size, so nvcc builds them in parallel). The kernels are in flash_bwd_kernel.cuh.
#include "attention/flash_bwd_kernel.cuh"

namespace pyssm {

cudaError_t flash_bwd_fp16_hd128(const FlashBwdParams& p, cudaStream_t stream) {
  return flash_bwd::bwd<__half, 128>(p, stream);
}

}  // namespace pyssm
