// The Hopper flash-attention backward for __nv_bfloat16, head_dim 64. The kernel is in
// flash_bwd_sm90_kernel.cuh; without sm_90a code in the build (PYSSM_SM90A) the launcher
// reports "not supported".
#include "attention/flash_bwd_sm90_kernel.cuh"

namespace pyssm {

cudaError_t flash_bwd_sm90_bf16_hd64(const FlashBwdParams& p, cudaStream_t stream) {
#ifdef PYSSM_SM90A
  return flash_bwd_sm90::bwd<__nv_bfloat16, 64>(p, stream);
#else
  (void)p;
  (void)stream;
  return cudaErrorNotSupported;
#endif
}

}  // namespace pyssm
