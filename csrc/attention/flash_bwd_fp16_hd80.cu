// The CUDA flash-attention backward for __half, head_dim 80 (one translation unit per dtype and
// head size, so nvcc builds them in parallel). The kernels are in flash_bwd_kernel.cuh.
#include "attention/flash_bwd_kernel.cuh"

namespace pyssm {

cudaError_t flash_bwd_fp16_hd80(const FlashBwdParams& p, cudaStream_t stream) {
  return flash_bwd::bwd<__half, 80>(p, stream);
}

}  // namespace pyssm
