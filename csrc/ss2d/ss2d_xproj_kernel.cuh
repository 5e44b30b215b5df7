// x_proj of the fused SS2D on tensor cores, for bf16 and fp16 x, both ways:
//   forward:  z (rows, cols) = x W^T, x (rows, dim) in its dtype, W (cols, dim) and z in fp32;
//   backward: dx (rows, cols) = dx_scan + dz W, dz (rows, dim) and dx_scan in fp32, W^T given
//             as (cols, dim) fp32, dx rounded once to x's dtype.
// The forward replaces a cast of x to fp32 (read 2 bytes, write 4 an element) and an fp32 GEMM
// on the CUDA cores (read 4 bytes an element, ~1.2 GFLOP at VMamba-T stage 1): it reads x once,
// as it is. The backward replaces an fp32 addmm into dx_scan (read it, write it back) and the
// cast of the sum to x's dtype: it reads dx_scan once and writes dx once, in x's dtype.
//
// Precision: every fp32 operand (W; dz) is split in registers into hi + lo, both bf16 (hi = the
// value rounded, lo = the rest rounded), which keeps ~16 of its 24 bits. fp16 x is split
// likewise (hi + lo in bf16 is exact for every fp16 value). Each product is taken as hi hi +
// hi lo + lo hi, so both dtypes take the bf16 mma and neither meets a range limit (fp16 weights
// would overflow past 65504). With bf16's unit roundoff u = 2^-8, the rounding of a lo part
// costs u^2 |a w| = 2^-16 |a w| and the dropped lo lo term as much: each product is within
// 2^-16 |x w| for bf16 x, 2^-15 for fp16 x and 3 x 2^-16 for the backward's dz, summed in fp32.
// (z was exact to fp32 through the GEMM; the official VMamba under bf16 autocast rounds x_proj's
// weights and output to bf16, 2^-8.) Nothing is rounded to the input dtype but the backward's
// dx, as the GEMM path did. For bf16 x the backward may also write dz's split (a_split: hi and lo
// side by side, bf16), for the dW_x GEMM on tensor cores.
//
// Layout: a block is 4 warps x 32 rows by 32 columns of the output; a warp holds 2 x 4 m16n8
// fp32 tiles. The reduction runs over dim in steps of 32, each lane loading 8 consecutive
// elements of its rows and of W's; those 8 are the lane's k pairs of two m16n8k16 products (the
// k order within a step is the same permutation for A and B, so the sum is unchanged). Rows of
// A are read coalesced (8 rows x 8 elements x 4 lanes a load), W from L1 (every warp reads it);
// the next step's A is loaded while this one multiplies.
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

// A lane's 8 consecutive elements of an A row (zero past the edges), and the same as 4 bf16
// pairs hi[4] with their remainders lo[4] (none for bf16)
template <typename TA>
struct Eight {
  static_assert(sizeof(TA) == 2, "16-bit A here; fp32 below");
  uint4 v;
  __device__ __forceinline__ void load(const TA* src) { v = *reinterpret_cast<const uint4*>(src); }
  __device__ __forceinline__ void zero() { v = make_uint4(0, 0, 0, 0); }
  __device__ __forceinline__ void pairs(uint32_t (&hi)[4], uint32_t (&lo)[4]) const {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (std::is_same_v<TA, bf16>) {
        hi[i] = w[i];
        lo[i] = 0;
      } else {
        const __half2 h2 = *reinterpret_cast<const __half2*>(&w[i]);
        split(__low2float(h2), __high2float(h2), hi[i], lo[i]);
      }
    }
  }
};
template <>
struct Eight<float> {
  float4 a, b;
  __device__ __forceinline__ void load(const float* src) {
    a = reinterpret_cast<const float4*>(src)[0];
    b = reinterpret_cast<const float4*>(src)[1];
  }
  __device__ __forceinline__ void zero() { a = b = make_float4(0.f, 0.f, 0.f, 0.f); }
  __device__ __forceinline__ void pairs(uint32_t (&hi)[4], uint32_t (&lo)[4]) const {
    split(a.x, a.y, hi[0], lo[0]);
    split(a.z, a.w, hi[1], lo[1]);
    split(b.x, b.y, hi[2], lo[2]);
    split(b.z, b.w, hi[3], lo[3]);
  }
};

// TA: A's type (x's for the forward, float for the backward's dz); TOut: float (the forward's
// z) or x's type (the backward's dx); p.add, when given, added before the rounding to TOut
template <typename TA, typename TOut>
__global__ void __launch_bounds__(kWarps * 32) xproj_kernel(const Ss2dXprojParams p) {
  constexpr bool kSplitA = !std::is_same_v<TA, bf16>;
  // the backward for bf16 x may write dz's split (p.a_split) for dW_x's bf16 GEMM
  constexpr bool kSplitOut = std::is_same_v<TA, float> && std::is_same_v<TOut, bf16>;
  const int lane = int(threadIdx.x) % 32, warp = int(threadIdx.x) / 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t col_tiles = (p.cols + kCols - 1) / kCols;
  // column tiles of one row block run next to each other, so A stays in L2 between them
  const int64_t row0 = int64_t(blockIdx.x) / col_tiles * kRows + warp * kWarpRows;
  const int64_t col0 = int64_t(blockIdx.x) % col_tiles * kCols;
  if (row0 >= p.rows) return;  // (whole warps: nothing below waits for another warp)
  const TA* a_rows = static_cast<const TA*>(p.a);

  // this lane's 8 columns from k0 of its 4 rows (16 m + g + 8 h)
  const auto load_a = [&](int64_t k0, Eight<TA> (&v)[2][2]) {
    const int64_t k = k0 + 8 * t;
#pragma unroll
    for (int m = 0; m < 2; ++m) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t r = row0 + 16 * m + g + 8 * h;
        v[m][h].zero();
        if (k < p.dim && r < p.rows) v[m][h].load(a_rows + r * p.dim + k);
      }
    }
  };
  float acc[2][4][4] = {};
  Eight<TA> v[2][2];
  load_a(0, v);
  for (int64_t k0 = 0; k0 < p.dim; k0 += kStep) {  // the same trip count on every lane
    const int64_t k = k0 + 8 * t;                    // this lane's 8 columns
    const bool k_ok = k < p.dim;                     // (dim % 8 == 0: all 8 or none)
    // A fragments of the two k16 products: [m tile][product][reg]; reg 0 / 1 rows g / g + 8
    // with this lane's first pair of the product's 4, reg 2 / 3 with its second.
    uint32_t ah[2][2][4], al[2][2][4];
#pragma unroll
    for (int m = 0; m < 2; ++m) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint32_t hi[4], lo[4];
        v[m][h].pairs(hi, lo);
        if constexpr (kSplitOut) {  // (one column tile writes it)
          const int64_t r = row0 + 16 * m + g + 8 * h;
          if (p.a_split != nullptr && col0 == 0 && k_ok && r < p.rows) {
            uint4* row =
                reinterpret_cast<uint4*>(static_cast<bf16*>(p.a_split) + r * 2 * p.dim);
            row[k / 8] = make_uint4(hi[0], hi[1], hi[2], hi[3]);
            row[(p.dim + k) / 8] = make_uint4(lo[0], lo[1], lo[2], lo[3]);
          }
        }
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          ah[m][q][h] = hi[2 * q];
          ah[m][q][2 + h] = hi[2 * q + 1];
          al[m][q][h] = lo[2 * q];
          al[m][q][2 + h] = lo[2 * q + 1];
        }
      }
    }
    load_a(k0 + kStep, v);  // the next step's A, in flight while this one multiplies
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      const int64_t c = col0 + 8 * n + g;  // B column g of the n8 tile: W row c
      Eight<float> w;
      w.zero();
      if (k_ok && c < p.cols) w.load(p.w + c * p.dim + k);
      uint32_t bh[4], bl[4];  // pairs (k, k+1), (k+2, k+3), (k+4, k+5), (k+6, k+7)
      w.pairs(bh, bl);
#pragma unroll
      for (int m = 0; m < 2; ++m) {
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          mma<bf16>(acc[m][n], ah[m][q], bh[2 * q], bh[2 * q + 1]);
          mma<bf16>(acc[m][n], ah[m][q], bl[2 * q], bl[2 * q + 1]);
          if constexpr (kSplitA) mma<bf16>(acc[m][n], al[m][q], bh[2 * q], bh[2 * q + 1]);
        }
      }
    }
  }
  // C fragments: c0, c1 at row g, columns 2t, 2t + 1 of the n8 tile; c2, c3 at row g + 8
  TOut* out = static_cast<TOut*>(p.out);
#pragma unroll
  for (int n = 0; n < 4; ++n) {
    const int64_t c = col0 + 8 * n + 2 * t;
    if (c >= p.cols) continue;  // (cols even: c + 1 < cols too)
#pragma unroll
    for (int m = 0; m < 2; ++m) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t r = row0 + 16 * m + g + 8 * h;
        if (r >= p.rows) continue;
        float2 s = make_float2(acc[m][n][2 * h], acc[m][n][2 * h + 1]);
        if (p.add != nullptr) {
          const float2 d = *reinterpret_cast<const float2*>(p.add + r * p.cols + c);
          s = make_float2(d.x + s.x, d.y + s.y);
        }
        if constexpr (std::is_same_v<TOut, float>) {
          *reinterpret_cast<float2*>(out + r * p.cols + c) = s;
        } else {
          *reinterpret_cast<uint32_t*>(out + r * p.cols + c) = Pack<TOut>::pack(s.x, s.y);
        }
      }
    }
  }
}

// T: x's dtype. p.add null: the forward (A = x in T, z in fp32); otherwise the backward (A = dz
// in fp32, dx in T).
template <typename T>
cudaError_t launch(const Ss2dXprojParams& p, cudaStream_t stream) {
  const auto misaligned = [](const void* ptr, uintptr_t n) {
    return reinterpret_cast<uintptr_t>(ptr) % n != 0;
  };
  const bool bwd = p.add != nullptr;
  if (p.rows < 0 || p.dim <= 0 || p.dim % 8 != 0 || p.cols <= 0 || p.cols % 2 != 0 ||
      p.a == nullptr || p.w == nullptr || p.out == nullptr || misaligned(p.a, 16) ||
      misaligned(p.w, 16) || misaligned(p.out, bwd ? 4 : 8) || (bwd && misaligned(p.add, 8)) ||
      misaligned(p.a_split, 16) ||
      (p.a_split != nullptr && !(bwd && std::is_same_v<T, bf16>))) {
    return cudaErrorInvalidValue;
  }
  if (p.rows == 0) return cudaSuccess;
  const int64_t blocks = (p.rows + kRows - 1) / kRows * ((p.cols + kCols - 1) / kCols);
  if (blocks > int64_t(0x7fffffff)) return cudaErrorInvalidValue;
  const dim3 grid{unsigned(blocks)}, block{unsigned(kWarps * 32)};
  if (bwd) return launch_kernel(xproj_kernel<float, T>, grid, block, 0, stream, p);
  return launch_kernel(xproj_kernel<T, float>, grid, block, 0, stream, p);
}

}  // namespace ss2d_xproj
}  // namespace pyssm
