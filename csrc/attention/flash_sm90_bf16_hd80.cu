// The Hopper flash-attention forward for __nv_bfloat16, head_dim 80 (one translation unit per dtype
// and head size). The kernel is in flash_sm90_kernel.cuh; PYSSM_SM90A says the build has
// sm_90a code (CMakeLists.txt), without which the kernel body is empty.
#include "attention/flash_sm90_kernel.cuh"

namespace pyssm {

cudaError_t flash_fwd_sm90_bf16_hd80(const FlashParams& p, cudaStream_t stream) {
#ifdef PYSSM_SM90A
  return flash_sm90::fwd<__nv_bfloat16, 80>(p, stream);
#else
  (void)p;
  (void)stream;
  return cudaErrorNotSupported;
#endif
}

}  // namespace pyssm
