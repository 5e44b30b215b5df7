// The CUDA selective scan for __half input (one translation unit per dtype, so nvcc builds them
// in parallel). The kernels are in selective_scan_kernel.cuh.
#include "ss2d/selective_scan_kernel.cuh"

namespace pyssm {

cudaError_t selective_scan_fwd_fp16(const SelectiveScanParams& p, cudaStream_t stream) {
  return scan::fwd<__half>(p, stream);
}

cudaError_t selective_scan_bwd_fp16(const SelectiveScanBwdParams& p, cudaStream_t stream) {
  return scan::bwd<__half>(p, stream);
}

}  // namespace pyssm
