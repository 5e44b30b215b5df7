// Torch side of the CUDA cross_scan / cross_merge: checks, allocation, stream, launch.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "ss2d/cross_scan.cuh"

namespace pyssm {
namespace {

DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return DType::kFloat64;
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", t);
  }
}

at::Tensor cross_scan_cuda(const at::Tensor& x_in) {
  check_cross_scan_input(x_in);
  const at::Tensor x = x_in.contiguous();
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor out = at::empty({B, 4, C, H * W}, x.options());
  const CrossScanParams p{x.const_data_ptr(), out.mutable_data_ptr(), B, C, H, W,
                          kernel_dtype(x.scalar_type())};
  const cudaError_t err = cross_scan_cuda_launch(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "cross_scan CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

at::Tensor cross_merge_cuda(const at::Tensor& ys_in) {
  check_cross_merge_input(ys_in);
  const at::Tensor ys = ys_in.contiguous();
  const c10::cuda::CUDAGuard guard(ys.device());
  const int64_t B = ys.size(0), C = ys.size(2), H = ys.size(3), W = ys.size(4);
  at::Tensor out = at::empty({B, C, H * W}, ys.options());
  const CrossScanParams p{ys.const_data_ptr(), out.mutable_data_ptr(), B, C, H, W,
                          kernel_dtype(ys.scalar_type())};
  const cudaError_t err = cross_merge_cuda_launch(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "cross_merge CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyssm, CUDA, m) {
  m.impl("cross_scan", &cross_scan_cuda);
  m.impl("cross_merge", &cross_merge_cuda);
}

}  // namespace pyssm
