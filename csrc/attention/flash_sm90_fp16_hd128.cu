// The Hopper flash-attention forward for __half, head_dim 128 (one translation unit per dtype
// and head size). The kernel is in flash_sm90_kernel.cuh.
#include "attention/flash_sm90_kernel.cuh"

namespace pyssm {

PYSSM_SM90_LAUNCHER(flash_fwd_sm90_fp16_hd128, FlashParams, (flash_sm90::fwd<__half, 128>))

}  // namespace pyssm
