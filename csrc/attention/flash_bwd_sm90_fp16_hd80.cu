// The Hopper flash-attention backward for __half, head_dim 80. The kernel is in
// flash_bwd_sm90_kernel.cuh.
#include "attention/flash_bwd_sm90_kernel.cuh"

namespace pyssm {

PYSSM_SM90_LAUNCHER(flash_bwd_sm90_fp16_hd80, FlashBwdParams,
                    (flash_bwd_sm90::bwd<__half, 80>))

}  // namespace pyssm
