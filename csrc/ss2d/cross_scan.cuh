// Launcher interface of the CUDA cross_scan / cross_merge kernels (csrc/ss2d/cross_scan.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "kernel_types.h"

namespace pyssm {

struct CrossScanParams {
  const void* in;   // cross_scan: x (B, C, H, W); cross_merge: ys (B, 4, C, H, W), contiguous
  void* out;        // cross_scan: (B, 4, C, H*W); cross_merge: (B, C, H*W), contiguous
  int64_t batch, channels, height, width;
  DType dtype;
};

cudaError_t cross_scan_cuda_launch(const CrossScanParams& p, cudaStream_t stream);
cudaError_t cross_merge_cuda_launch(const CrossScanParams& p, cudaStream_t stream);

}  // namespace pyssm
