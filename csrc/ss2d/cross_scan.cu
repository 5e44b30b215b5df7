// CUDA cross_scan and cross_merge: one thread per (batch, channel, scan position), so every
// write of cross_scan and every read of cross_merge's four directions is at the thread's
// position (coalesced); the column-major directions gather x / scatter into the merged output
// a row apart, which the caches absorb. (cross_scan v1 went the other way, one thread per
// pixel writing the column-major directions a row apart: on the H200 it took 0.52 ms, 2.3x
// torch's own transpose, while cross_merge, which gathers, ran at 1.4 TB/s.)
// These are the plain standalone ops; the fused ss2d kernel never materialises them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernel_launch.cuh"
#include "ss2d/cross_scan.cuh"

namespace pyssm {
namespace {

// Loads widen to the accumulation type (float, or double for double); stores round back.
__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Where element i = ((b * C + c) * L + pixel) of a (B, C, H, W) tensor goes in the four
// directions: the offset of (b, k = 0, c) in (B, 4, C, L), the direction stride C * L, and its
// scan positions l0 (row-major) and l1 (column-major); directions 2, 3 are L-1-l0, L-1-l1.
struct ScanSlot {
  int64_t base, stride, l0, l1;
};

__device__ __forceinline__ ScanSlot scan_slot(int64_t i, int64_t C, int64_t H, int64_t W) {
  const int64_t L = H * W, bc = i / L, pix = i % L, b = bc / C, c = bc % C;
  return {(b * 4 * C + c) * L, C * L, pix, (pix % W) * H + pix / W};
}

// The pixel (row-major index) that column-major scan position l visits: l = w * H + h.
__device__ __forceinline__ int64_t column_major_pixel(int64_t l, int64_t H, int64_t W) {
  return (l % H) * W + l / H;
}

template <typename T>
__global__ void cross_scan_kernel(const T* __restrict__ x_gmem, T* __restrict__ out_gmem,
                                  int64_t total, int64_t C, int64_t H, int64_t W) {
  const int64_t L = H * W;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    // i = (b * C + c) * L + l, a scan position l of plane (b, c)
    const int64_t bc = i / L, l = i % L, b = bc / C, c = bc % C;
    const T* x = x_gmem + bc * L;
    T* out_b = out_gmem + (b * 4 * C + c) * L;
    const int64_t stride = C * L;
    out_b[l] = x[l];
    out_b[stride + l] = x[column_major_pixel(l, H, W)];
    out_b[2 * stride + l] = x[L - 1 - l];
    out_b[3 * stride + l] = x[column_major_pixel(L - 1 - l, H, W)];
  }
}

template <typename T>
__global__ void cross_merge_kernel(const T* __restrict__ ys_gmem, T* __restrict__ out_gmem,
                                   int64_t total, int64_t C, int64_t H, int64_t W) {
  const int64_t L = H * W;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const ScanSlot s = scan_slot(i, C, H, W);
    const T* ys_b = ys_gmem + s.base;
    const auto sum = widen(ys_b[s.l0]) + widen(ys_b[s.stride + s.l1]) +
                     widen(ys_b[2 * s.stride + (L - 1 - s.l0)]) +
                     widen(ys_b[3 * s.stride + (L - 1 - s.l1)]);
    store(out_gmem + i, sum);
  }
}

constexpr int kThreads = 256;

dim3 grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return dim3(static_cast<unsigned>(blocks < 65536 * 32 ? blocks : 65536 * 32));
}

template <typename T>
cudaError_t launch(const CrossScanParams& p, cudaStream_t stream, bool merge) {
  const int64_t total = p.batch * p.channels * p.height * p.width;
  if (total == 0) return cudaSuccess;
  return launch_kernel(merge ? cross_merge_kernel<T> : cross_scan_kernel<T>, grid_for(total),
                       dim3(kThreads), 0, stream, static_cast<const T*>(p.in),
                       static_cast<T*>(p.out), total, p.channels, p.height, p.width);
}

cudaError_t dispatch(const CrossScanParams& p, cudaStream_t stream, bool merge) {
  switch (p.dtype) {
    case DType::kFloat64: return launch<double>(p, stream, merge);
    case DType::kFloat32: return launch<float>(p, stream, merge);
    case DType::kFloat16: return launch<__half>(p, stream, merge);
    case DType::kBFloat16: return launch<__nv_bfloat16>(p, stream, merge);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t cross_scan_cuda_launch(const CrossScanParams& p, cudaStream_t stream) {
  return dispatch(p, stream, /*merge=*/false);
}

cudaError_t cross_merge_cuda_launch(const CrossScanParams& p, cudaStream_t stream) {
  return dispatch(p, stream, /*merge=*/true);
}

}  // namespace pyssm
