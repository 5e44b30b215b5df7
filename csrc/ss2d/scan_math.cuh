// The arithmetic the SS2D-family scan kernels share (selective_scan, the fused ss2d forward and
// backward): the accumulation type, widening loads, exp / log1p / expm1 in that type, softplus and its
// derivative. Device code only, no warp-level operations.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace pyssm {
namespace scan {

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log1p_(float x) { return log1pf(x); }
__device__ __forceinline__ double log1p_(double x) { return log1p(x); }
__device__ __forceinline__ float expm1_(float x) { return expm1f(x); }
__device__ __forceinline__ double expm1_(double x) { return expm1(x); }

// softplus without a threshold (float64 stays exact), and its derivative
template <typename acc_t>
__device__ __forceinline__ acc_t softplus(acc_t x) {
  return (x > acc_t(0) ? x : acc_t(0)) + log1p_(exp_(-(x > acc_t(0) ? x : -x)));
}
template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + exp_(-x));
}

}  // namespace scan
}  // namespace pyssm
