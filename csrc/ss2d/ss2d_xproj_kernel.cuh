// x_proj of the fused SS2D on tensor cores, for bf16 and fp16 x: z = x W^T, with x (rows, dim)
// in the input dtype, W (cols, dim) and z (rows, cols) in fp32. It replaces, for 16-bit x, a cast
// of x to fp32 (read 2 bytes, write 4 an element) followed by an fp32 GEMM on the CUDA cores
// (read 4 bytes an element, ~1.2 GFLOP at VMamba-T stage 1): this reads x once, as it is.
//
// Precision: W is split in registers into hi + lo, both bf16 (hi = W rounded, lo = the rest
// rounded), so each product keeps ~17 bits of W (|error| <= 2^-17 |x w|) and sums in fp32.
// fp16 x is split likewise (hi + lo in bf16 is exact for every fp16 value; the x_lo W_lo term,
// <= 2^-18 |x w|, is dropped), so both dtypes take the bf16 mma and neither meets a range limit
// (fp16 weights would overflow past 65504). Nothing is rounded to the input dtype: z is fp32
// as the GEMM's was, within ~2^-16 relative of it.
//
// Layout: a block is 4 warps x 32 rows by 32 columns of z; a warp holds 2 x 4 m16n8 fp32
// tiles. The reduction runs over dim in steps of 32, each lane loading 8 consecutive elements
// (16 bytes of x, 32 of W) of its rows; those 8 are the lane's k pairs of two m16n8k16 products
// (the k order within a step is the same permutation for A and B, so the sum is unchanged).
// x rows are read coalesced (8 rows x 64 bytes a load), W from L1 (every warp reads it).
#pragma once

#include <cstdint>
#include <type_traits>

#include "mma_sync.cuh"
#include "ss2d/ss2d.cuh"

namespace pyssm {
namespace ss2d_xproj {

constexpr int kWarps = 4, kWarpRows = 32, kCols = 32, kStep = 32;
constexpr int kRows = kWarps * kWarpRows;

using bf16 = __nv_bfloat16;

// (a, b) as a bf16 pair hi and the remainders (a - hi_a, b - hi_b) as a bf16 pair lo
__device__ __forceinline__ void split(float a, float b, uint32_t& hi, uint32_t& lo) {
  const float ha = __bfloat162float(__float2bfloat16_rn(a));
  const float hb = __bfloat162float(__float2bfloat16_rn(b));
  hi = Pack<bf16>::pack(ha, hb);  // exact: ha, hb are bf16 values
  lo = Pack<bf16>::pack(a - ha, b - hb);
}

// 8 consecutive fp16 values (one 16-byte word) as bf16 pairs hi[4] + lo[4], exactly
__device__ __forceinline__ void split8(const uint4& v, uint32_t (&hi)[4], uint32_t (&lo)[4]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __half2 h2 = *reinterpret_cast<const __half2*>(&w[i]);
    split(__low2float(h2), __high2float(h2), hi[i], lo[i]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) xproj_kernel(const Ss2dXprojParams p) {
  constexpr bool kSplitX = !std::is_same_v<T, bf16>;
  const int lane = int(threadIdx.x) % 32, warp = int(threadIdx.x) / 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t col_tiles = (p.cols + kCols - 1) / kCols;
  // column tiles of one row block run next to each other, so x stays in L2 between them
  const int64_t row0 = int64_t(blockIdx.x) / col_tiles * kRows + warp * kWarpRows;
  const int64_t col0 = int64_t(blockIdx.x) % col_tiles * kCols;
  if (row0 >= p.rows) return;  // (whole warps: nothing below waits for another warp)
  const T* x = static_cast<const T*>(p.x);

  // this lane's 8 columns from k0 of its 4 rows (16 m + g + 8 h), zero past the edges
  const auto load_x = [&](int64_t k0, uint4 (&v)[2][2]) {
    const int64_t k = k0 + 8 * t;
#pragma unroll
    for (int m = 0; m < 2; ++m) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t r = row0 + 16 * m + g + 8 * h;
        v[m][h] = make_uint4(0, 0, 0, 0);
        if (k < p.dim && r < p.rows) v[m][h] = *reinterpret_cast<const uint4*>(x + r * p.dim + k);
      }
    }
  };
  float acc[2][4][4] = {};
  uint4 v[2][2];
  load_x(0, v);
  for (int64_t k0 = 0; k0 < p.dim; k0 += kStep) {  // the same trip count on every lane
    const int64_t k = k0 + 8 * t;                    // this lane's 8 columns
    const bool k_ok = k < p.dim;                     // (dim % 8 == 0: all 8 or none)
    // A fragments of the two k16 products: [m tile][product][reg]; reg 0 / 1 rows g / g + 8
    // with this lane's first pair of the product's 4, reg 2 / 3 with its second.
    uint32_t a[2][2][4], al[2][2][4];
#pragma unroll
    for (int m = 0; m < 2; ++m) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if constexpr (kSplitX) {
          uint32_t hi[4], lo[4];
          split8(v[m][h], hi, lo);
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            a[m][q][h] = hi[2 * q];
            a[m][q][2 + h] = hi[2 * q + 1];
            al[m][q][h] = lo[2 * q];
            al[m][q][2 + h] = lo[2 * q + 1];
          }
        } else {
          a[m][0][h] = v[m][h].x;
          a[m][0][2 + h] = v[m][h].y;
          a[m][1][h] = v[m][h].z;
          a[m][1][2 + h] = v[m][h].w;
        }
      }
    }
    load_x(k0 + kStep, v);  // the next step's x, in flight while this one multiplies
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      const int64_t c = col0 + 8 * n + g;  // B column g of the n8 tile: W row c
      float4 w0 = make_float4(0.f, 0.f, 0.f, 0.f), w1 = w0;
      if (k_ok && c < p.cols) {
        w0 = *reinterpret_cast<const float4*>(p.w + c * p.dim + k);
        w1 = *reinterpret_cast<const float4*>(p.w + c * p.dim + k + 4);
      }
      uint32_t bh[4], bl[4];  // pairs (k, k+1), (k+2, k+3), (k+4, k+5), (k+6, k+7)
      split(w0.x, w0.y, bh[0], bl[0]);
      split(w0.z, w0.w, bh[1], bl[1]);
      split(w1.x, w1.y, bh[2], bl[2]);
      split(w1.z, w1.w, bh[3], bl[3]);
#pragma unroll
      for (int m = 0; m < 2; ++m) {
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          mma<bf16>(acc[m][n], a[m][q], bh[2 * q], bh[2 * q + 1]);
          mma<bf16>(acc[m][n], a[m][q], bl[2 * q], bl[2 * q + 1]);
          if constexpr (kSplitX) mma<bf16>(acc[m][n], al[m][q], bh[2 * q], bh[2 * q + 1]);
        }
      }
    }
  }
  // C fragments: c0, c1 at row g, columns 2t, 2t + 1 of the n8 tile; c2, c3 at row g + 8
#pragma unroll
  for (int n = 0; n < 4; ++n) {
    const int64_t c = col0 + 8 * n + 2 * t;
    if (c >= p.cols) continue;  // (cols even: c + 1 < cols too)
#pragma unroll
    for (int m = 0; m < 2; ++m) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t r = row0 + 16 * m + g + 8 * h;
        if (r < p.rows) {
          *reinterpret_cast<float2*>(p.z + r * p.cols + c) =
              make_float2(acc[m][n][2 * h], acc[m][n][2 * h + 1]);
        }
      }
    }
  }
}

template <typename T>
cudaError_t launch(const Ss2dXprojParams& p, cudaStream_t stream) {
  const auto misaligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16; };
  if (p.rows < 0 || p.dim <= 0 || p.dim % 8 != 0 || p.cols <= 0 || p.cols % 2 != 0 ||
      p.x == nullptr || p.w == nullptr || p.z == nullptr || misaligned(p.x) ||
      misaligned(p.w) || reinterpret_cast<uintptr_t>(p.z) % 8 != 0) {
    return cudaErrorInvalidValue;
  }
  if (p.rows == 0) return cudaSuccess;
  const int64_t blocks = (p.rows + kRows - 1) / kRows * ((p.cols + kCols - 1) / kCols);
  if (blocks > int64_t(0x7fffffff)) return cudaErrorInvalidValue;
  return launch_kernel(xproj_kernel<T>, dim3(unsigned(blocks)), dim3(kWarps * 32), 0, stream, p);
}

}  // namespace ss2d_xproj
}  // namespace pyssm
