// The CUDA selective scan for float input (one translation unit per dtype, so nvcc builds them
// in parallel). The kernels are in selective_scan_kernel.cuh.
#include "ss2d/selective_scan_kernel.cuh"

namespace pyssm {

cudaError_t selective_scan_fwd_fp32(const SelectiveScanParams& p, cudaStream_t stream) {
  return scan::fwd<float>(p, stream);
}

cudaError_t selective_scan_bwd_fp32(const SelectiveScanBwdParams& p, cudaStream_t stream) {
  return scan::bwd<float>(p, stream);
}

}  // namespace pyssm
