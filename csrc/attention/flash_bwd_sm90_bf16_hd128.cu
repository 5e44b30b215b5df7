// The Hopper flash-attention backward for __nv_bfloat16, head_dim 128. The kernel is in
// flash_bwd_sm90_kernel.cuh.
#include "attention/flash_bwd_sm90_kernel.cuh"

namespace pyssm {

PYSSM_SM90_LAUNCHER(flash_bwd_sm90_bf16_hd128, FlashBwdParams,
                    (flash_bwd_sm90::bwd<__nv_bfloat16, 128>))

}  // namespace pyssm
