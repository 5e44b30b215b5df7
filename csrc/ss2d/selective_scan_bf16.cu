// The CUDA selective scan for __nv_bfloat16 input (one translation unit per dtype, so nvcc builds them
// in parallel). The kernels are in selective_scan_kernel.cuh.
#include "ss2d/selective_scan_kernel.cuh"

namespace pyssm {

cudaError_t selective_scan_fwd_bf16(const SelectiveScanParams& p, cudaStream_t stream) {
  return scan::fwd<__nv_bfloat16>(p, stream);
}

cudaError_t selective_scan_bwd_bf16(const SelectiveScanBwdParams& p, cudaStream_t stream) {
  return scan::bwd<__nv_bfloat16>(p, stream);
}

}  // namespace pyssm
