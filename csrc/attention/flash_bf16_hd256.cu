// The CUDA flash-attention forward for __nv_bfloat16, head_dim 256 (one translation unit per dtype and
// head size, so nvcc builds them in parallel). The kernel is in flash_kernel.cuh.
#include "attention/flash_kernel.cuh"

namespace pyssm {

cudaError_t flash_fwd_bf16_hd256(const FlashParams& p, cudaStream_t stream) {
  return flash::fwd<__nv_bfloat16, 256>(p, stream);
}

}  // namespace pyssm
