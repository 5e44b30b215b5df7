// The fused CUDA SS2D forward for __half input (one translation unit per dtype, so nvcc builds
// them in parallel). The kernels are in ss2d_kernel.cuh
// (v2) and ss2d_n1_kernel.cuh (v3, d_state 1); its x_proj on tensor cores in
// ss2d_xproj_kernel.cuh.
#include "ss2d/ss2d_n1_kernel.cuh"
#include "ss2d/ss2d_xproj_kernel.cuh"

namespace pyssm {

cudaError_t ss2d_fwd_fp16(const Ss2dParams& p, cudaStream_t stream) {
  return ss2d::fwd<__half>(p, stream);
}

cudaError_t ss2d_xproj_fp16(const Ss2dXprojParams& p, cudaStream_t stream) {
  return ss2d_xproj::launch<__half>(p, stream);
}

}  // namespace pyssm
