// The CUDA flash-decoding forward for __nv_bfloat16, head_dim 256
// (one translation unit per dtype and head size, so nvcc builds them in parallel). The
// kernels are in flash_decode_kernel.cuh.
#include "attention/flash_decode_kernel.cuh"

namespace pyssm {

cudaError_t flash_decode_fwd_bf16_hd256(const FlashParams& p, const FlashSplit& split,
    cudaStream_t stream) {
  return flash_decode::fwd<__nv_bfloat16, 256>(p, split, stream);
}

}  // namespace pyssm
