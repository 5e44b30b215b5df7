// CUDA flash-attention backward, portable path (sm_80 and newer: mma.sync m16n8k16, fp32
// accumulation), v2: every mma fragment read from shared memory comes through ldmatrix (v1
// read the column-pair B fragments of three of the five products two 16-bit halves at a time).
// Three kernels (tests/ops/flash_bwd_model.py is a float64 model of them):
//   1. delta: Delta = rowsum(dO * O) - dlse per query row and head (fp32, lse's layout).
//   2. main: one block of 4 warps per (64-key tile, kv head, sequence); each warp owns 16 keys
//      and keeps their dK and dV in registers (fp32) over every q head of the kv head's group
//      and every query tile that can see the keys (causal, windows: the others skipped). Per
//      query tile of kBlockM rows, in registers, transposed so the keys are the mma rows:
//        S^T = K Q^T;  P^T = exp2(S^T scale log2(e) - lse log2(e)) (0 where masked)
//        dV += P^T dO;  dP^T = V dO^T;  dS^T = P^T (dP^T - Delta);  dK += dS^T Q
//      (the C fragments of S^T and dS^T are the A fragments of the next products). dS goes
//      through shared memory for dQ = dS K, which every key tile adds into an fp32 buffer
//      with atomicAdd (so dQ's summation order, and its last bits, vary from run to run).
//   3. dq: dQ = scale dQ_accum in the input dtype.
// head_dim 72 is zero-padded to 80 in shared memory for the reductions over head_dim only.
#pragma once

#include <cmath>
#include <cstdint>

#include "attention/flash.cuh"
#include "attention/flash_mma.cuh"
#include "attention/flash_seq.cuh"

namespace pyssm {
namespace flash_bwd {

using flash::ldmatrix_x2;
using flash::ldmatrix_x4;
using flash::mma;
using flash::Pack;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockN = 16 * kWarps;  // keys per block, 16 per warp
constexpr float kLog2e = 1.4426950408889634f;

template <typename T, int kHeadDim>
struct Traits {
  static constexpr int kBlockM = kHeadDim <= 32 ? 64 : 32;   // query rows per tile
  static constexpr int kPadDim = (kHeadDim + 15) / 16 * 16;  // reduction length over head_dim
  static constexpr int kDSteps = kPadDim / 16;                // its 16-wide mma steps
  static constexpr int kDimTiles = kHeadDim / 8;              // dK, dV, dQ columns, 8 per tile
  static constexpr int kQTiles = kBlockM / 8;                 // S^T columns (queries), 8 per tile
  static constexpr int kQSteps = kBlockM / 16;                // reduction steps over queries
  static constexpr int kStride = kPadDim + 8;                 // smem row, +16 bytes vs conflicts
  static constexpr int kDsStride = kBlockN + 8;
  static constexpr int kChunks = kPadDim / 8;                 // 16-byte chunks per smem row
  static constexpr int kSlabs = kBlockM / 16;                 // dQ: 16-row slabs of the tile,
  static constexpr int kWarpsPerSlab = kWarps / kSlabs;       // each split over this many warps
  // K, V, Q, dO tiles; dS (queries x keys); lse (log2 domain) and Delta per query row
  static constexpr size_t kSmem = size_t(2 * kBlockN + 2 * kBlockM) * kStride * sizeof(T) +
                                  size_t(kBlockM) * kDsStride * sizeof(T) +
                                  2 * kBlockM * sizeof(float);
  // dV += P^T dO and dK += dS^T Q take two reduction steps per B load (ldmatrix.x4) at
  // head_dim 32, one (.x2) above: the pairs' extra registers spilled at 64 on sm_80 and at 128
  static constexpr bool kPairSteps = kHeadDim <= 32;
  static_assert(kHeadDim % 8 == 0, "head_dim must be a multiple of 8");
};

// rows [first, first + rows) of a (tokens, heads, d) tensor (src at the head's first token) into
// smem rows of kStride; zero past `len` rows and past head_dim columns
template <typename T, int kHeadDim>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t row_stride,
                                          int64_t first, int64_t len, int rows) {
  using Tr = Traits<T, kHeadDim>;
  for (int i = threadIdx.x; i < rows * Tr::kChunks; i += kThreads) {
    const int r = i / Tr::kChunks, c = (i % Tr::kChunks) * 8;
    uint4 x = make_uint4(0, 0, 0, 0);
    if (first + r < len && c < kHeadDim)
      x = *reinterpret_cast<const uint4*>(src + (first + r) * row_stride + c);
    *reinterpret_cast<uint4*>(dst + r * Tr::kStride + c) = x;
  }
}

// ldmatrix row addresses (flash_mma.cuh): lane 8i + r gives row r of matrix i.
// A fragment of the 16 x 16 block at (row0, col0) of a row-major tile: matrices (rows 0-7,
// cols 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15).
template <typename T>
__device__ __forceinline__ void a_fragment(uint32_t (&a)[4], const T* tile, int stride, int row0,
                                           int col0, int lane) {
  const int mat = lane / 8, r = lane % 8;
  ldmatrix_x4<false>(a, tile + (row0 + (mat % 2) * 8 + r) * stride + col0 + (mat / 2) * 8);
}
// B fragments of two 8-row groups (rows row0.. and row0 + 8..) of a row-major tile whose rows
// are the product's columns, for the 16-wide step at col0: b[0], b[1] for the first group,
// b[2], b[3] for the second (matrices (0-7, 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15)).
template <typename T>
__device__ __forceinline__ void b_fragments_rows(uint32_t (&b)[4], const T* tile, int stride,
                                                 int row0, int col0, int lane) {
  const int mat = lane / 8, r = lane % 8;
  ldmatrix_x4<false>(b, tile + (row0 + (mat / 2) * 8 + r) * stride + col0 + (mat % 2) * 8);
}
// B fragments of two 16-deep reduction steps (rows row0.. and row0 + 16..) for the 8 columns at
// col0 of a row-major tile whose rows are the reduction: b[0], b[1] for the first step, b[2],
// b[3] for the second (four 8-row matrices, transposed).
template <typename T>
__device__ __forceinline__ void b_fragments_cols(uint32_t (&b)[4], const T* tile, int stride,
                                                 int row0, int col0, int lane) {
  const int mat = lane / 8, r = lane % 8;
  ldmatrix_x4<true>(b, tile + (row0 + mat * 8 + r) * stride + col0);
}

// C[16 x 8*kQTiles] = A B^T with A (16 rows at a, this warp's keys) and B (kQTiles*8 rows at b)
// both row-major in smem of kStride, reduced over the padded head_dim (S^T = K Q^T, dP^T = V dO^T)
template <typename T, int kHeadDim>
__device__ __forceinline__ void rows_times_rows(float (&c)[Traits<T, kHeadDim>::kQTiles][4],
                                                const T* a, const T* b, int lane) {
  using Tr = Traits<T, kHeadDim>;
  static_assert(Tr::kQTiles % 2 == 0, "B fragments come in pairs of 8-row groups");
#pragma unroll
  for (int j = 0; j < Tr::kQTiles; ++j) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;
#pragma unroll
  for (int st = 0; st < Tr::kDSteps; ++st) {
    uint32_t af[4];
    a_fragment(af, a, Tr::kStride, 0, st * 16, lane);
#pragma unroll
    for (int jp = 0; jp < Tr::kQTiles / 2; ++jp) {
      uint32_t bf[4];
      b_fragments_rows(bf, b, Tr::kStride, jp * 16, st * 16, lane);
      mma<T>(c[2 * jp], af, bf[0], bf[1]);
      mma<T>(c[2 * jp + 1], af, bf[2], bf[3]);
    }
  }
}

// acc[16 x head_dim] += X (the C registers of a 16 x kBlockM product, used as A fragments)
// times the kBlockM x head_dim tile at b (smem, kStride): dV += P^T dO, dK += dS^T Q
template <typename T, int kHeadDim>
__device__ __forceinline__ void regs_times_tile(float (&acc)[Traits<T, kHeadDim>::kDimTiles][4],
                                                const float (&x)[Traits<T, kHeadDim>::kQTiles][4],
                                                const T* b, int lane) {
  using Tr = Traits<T, kHeadDim>;
  if constexpr (!Tr::kPairSteps) {
#pragma unroll
    for (int kk = 0; kk < Tr::kQSteps; ++kk) {
      const uint32_t af[4] = {Pack<T>::pack(x[2 * kk][0], x[2 * kk][1]),
                              Pack<T>::pack(x[2 * kk][2], x[2 * kk][3]),
                              Pack<T>::pack(x[2 * kk + 1][0], x[2 * kk + 1][1]),
                              Pack<T>::pack(x[2 * kk + 1][2], x[2 * kk + 1][3])};
      const T* row = b + (kk * 16 + lane % 16) * Tr::kStride;
#pragma unroll
      for (int n = 0; n < Tr::kDimTiles; ++n) {
        uint32_t bf[2];
        ldmatrix_x2<true>(bf, row + n * 8);
        mma<T>(acc[n], af, bf[0], bf[1]);
      }
    }
  } else {
    static_assert(Tr::kQSteps % 2 == 0, "reduction steps come in pairs");
#pragma unroll
    for (int kp = 0; kp < Tr::kQSteps / 2; ++kp) {
      uint32_t af[2][4];
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) {
        const int kk = 2 * kp + h2;
        af[h2][0] = Pack<T>::pack(x[2 * kk][0], x[2 * kk][1]);
        af[h2][1] = Pack<T>::pack(x[2 * kk][2], x[2 * kk][3]);
        af[h2][2] = Pack<T>::pack(x[2 * kk + 1][0], x[2 * kk + 1][1]);
        af[h2][3] = Pack<T>::pack(x[2 * kk + 1][2], x[2 * kk + 1][3]);
      }
#pragma unroll
      for (int n = 0; n < Tr::kDimTiles; ++n) {
        uint32_t bf[4];
        b_fragments_cols(bf, b, Tr::kStride, kp * 32, n * 8, lane);
        mma<T>(acc[n], af[0], bf[0], bf[1]);
        mma<T>(acc[n], af[1], bf[2], bf[3]);
      }
    }
  }
}

// 1. Delta = rowsum(dO * O) - dlse, one thread per (token, head)
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads) flash_bwd_delta_kernel(const FlashBwdParams p) {
  const int64_t r = int64_t(blockIdx.x) * kThreads + threadIdx.x;  // token * heads + head
  if (r >= p.total_q * p.heads) return;
  const T* o = static_cast<const T*>(p.out) + r * kHeadDim;
  const T* d = static_cast<const T*>(p.dout) + r * kHeadDim;
  float acc = 0.f;
#pragma unroll
  for (int c = 0; c < kHeadDim; c += 8) {
    const uint4 ov = *reinterpret_cast<const uint4*>(o + c);
    const uint4 dv = *reinterpret_cast<const uint4*>(d + c);
    const T* oe = reinterpret_cast<const T*>(&ov);
    const T* de = reinterpret_cast<const T*>(&dv);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc += Pack<T>::to_float(oe[e]) * Pack<T>::to_float(de[e]);
  }
  const int64_t token = r / p.heads, h = r % p.heads;
  const int64_t idx = p.cu_seqlens ? h * p.total_q + token  // (heads, total) packed
                                   : ((token / p.seqlen_q) * p.heads + h) * p.seqlen_q +
                                         token % p.seqlen_q;  // (batch, heads, seqlen_q)
  p.delta[idx] = p.dlse ? acc - p.dlse[idx] : acc;
}

// 2. dK, dV of one key tile; dQ added into dq_accum
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads) flash_bwd_kernel(const FlashBwdParams p) {
  using Tr = Traits<T, kHeadDim>;
  constexpr int kM = Tr::kBlockM, S = Tr::kStride;
  PYSSM_DYNAMIC_SMEM(smem);
  T* k_s = reinterpret_cast<T*>(smem);
  T* v_s = k_s + kBlockN * S;
  T* q_s = v_s + kBlockN * S;
  T* do_s = q_s + kM * S;
  T* ds_s = do_s + kM * S;
  float* lse_s = reinterpret_cast<float*>(ds_s + kM * Tr::kDsStride);
  float* delta_s = lse_s + kM;

  const int b = blockIdx.z, hk = blockIdx.y;
  const int64_t n0 = int64_t(blockIdx.x) * kBlockN;
  const flash::SeqSpan seq = flash::seq_span(p, b);
  const int64_t q_start = seq.q_start, k_start = seq.k_start, Sq = seq.Sq, Sk = seq.Sk;
  if (n0 >= Sk) return;  // the whole block: before any barrier
  const int group = int(p.heads / p.heads_k);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int kw = warp * 16;  // this warp's keys in the tile: kw + g and kw + g + 8

  const int o_row = int(p.heads) * kHeadDim;  // out, dout and dq_accum: contiguous
  const int64_t kv_off = flash::kv_head_start(p, seq, b, hk);
  const int64_t kv_row = p.kv_layout.row;
  load_tile<T, kHeadDim>(k_s, static_cast<const T*>(p.k) + kv_off, kv_row, n0, Sk, kBlockN);
  load_tile<T, kHeadDim>(v_s, static_cast<const T*>(p.v) + kv_off, kv_row, n0, Sk, kBlockN);

  float dk[Tr::kDimTiles][4], dv[Tr::kDimTiles][4];
#pragma unroll
  for (int n = 0; n < Tr::kDimTiles; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;

  // the query tiles that see the block's keys: from the one of the first query that sees key
  // n0 (causal, window) to the last query that sees its last key (window)
  // (the end as an int: one register, not two, live over the walk)
  const int64_t m_begin = flash::first_query(seq, p, n0, kM);
  const int m_end = int(flash::queries_to_visit(seq, p, n0 + kBlockN - 1));

  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    const int64_t o_off = (q_start * p.heads + h) * kHeadDim;
    const T* q = static_cast<const T*>(p.q) + flash::head_start(p, p.q_layout, b, q_start, h);
    const T* dout = static_cast<const T*>(p.dout) + o_off;
    float* dq = p.dq_accum + o_off;
    const int64_t stat = p.cu_seqlens ? h * p.total_q + q_start : (int64_t(b) * p.heads + h) * Sq;
    for (int64_t m0 = m_begin; m0 < m_end; m0 += kM) {
      // No barrier needed before these stores: every warp read the previous tile's Q, dO, lse
      // and Delta before the barrier after the dS stores, and the dS of this tile is stored
      // only after the next barrier, which every warp reaches after its previous dQ.
      load_tile<T, kHeadDim>(q_s, q, p.q_layout.row, m0, Sq, kM);
      load_tile<T, kHeadDim>(do_s, dout, o_row, m0, Sq, kM);
      for (int i = threadIdx.x; i < kM; i += kThreads) {
        const bool ok = m0 + i < Sq;
        lse_s[i] = ok ? p.lse[stat + m0 + i] * kLog2e : 0.f;
        delta_s[i] = ok ? p.delta[stat + m0 + i] : 0.f;
      }
      __syncthreads();

      // the tile's queries (from m0) that see each of this thread's keys kw + g, kw + g + 8
      int lo0, hi0, lo1, hi1;
      flash::queries_of_key(seq, p, n0 + kw + g, m0, lo0, hi0);
      flash::queries_of_key(seq, p, n0 + kw + g + 8, m0, lo1, hi1);
      float s[Tr::kQTiles][4];  // S^T, then P^T
      rows_times_rows<T, kHeadDim>(s, k_s + kw * S, q_s, lane);
      if (p.softcap_prescale > 0.f) {  // soft-capping: tanh of the scaled scores (set_scale)
#pragma unroll
        for (int j = 0; j < Tr::kQTiles; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[j][e] = flash::softcap_tanh(s[j][e] * p.softcap_prescale);
      }
#pragma unroll
      for (int j = 0; j < Tr::kQTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = j * 8 + 2 * t + (e & 1);
          const bool visible = e & 2 ? qi >= lo1 && qi <= hi1 : qi >= lo0 && qi <= hi0;
          s[j][e] = visible ? exp2f(s[j][e] * p.scale_log2 - lse_s[qi]) : 0.f;
        }
      }
      regs_times_tile<T, kHeadDim>(dv, s, do_s, lane);  // dV += P^T dO

      float ds[Tr::kQTiles][4];  // dP^T, then dS^T
      rows_times_rows<T, kHeadDim>(ds, v_s + kw * S, do_s, lane);
#pragma unroll
      for (int j = 0; j < Tr::kQTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = j * 8 + 2 * t + (e & 1);
          ds[j][e] = s[j][e] * (ds[j][e] - delta_s[qi]);
          if (p.softcap_prescale > 0.f) {
            // times tanh's derivative 1 - t^2, t worked back from P = exp2(t scale_log2 -
            // lse) rather than kept over dV's products in registers (P = 0: dS is 0)
            const float tc = (log2f(s[j][e]) + lse_s[qi]) / p.scale_log2;
            ds[j][e] *= s[j][e] > 0.f ? 1.f - tc * tc : 0.f;
          }
          ds_s[qi * Tr::kDsStride + kw + g + (e & 2 ? 8 : 0)] = Pack<T>::from_float(ds[j][e]);
        }
      }
      regs_times_tile<T, kHeadDim>(dk, ds, q_s, lane);  // dK += dS^T Q
      __syncthreads();

      // dQ += dS K: warp takes 16 query rows (its slab) and every kWarpsPerSlab-th column tile
      const int slab = warp % Tr::kSlabs, sub = warp / Tr::kSlabs;
      uint32_t af[kBlockN / 16][4];
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk)
        a_fragment(af[kk], ds_s, Tr::kDsStride, slab * 16, kk * 16, lane);
      const int64_t r0 = m0 + slab * 16 + g, r1 = r0 + 8;
      for (int n = sub; n < Tr::kDimTiles; n += Tr::kWarpsPerSlab) {
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int kp = 0; kp < kBlockN / 32; ++kp) {
          uint32_t bf[4];
          b_fragments_cols(bf, k_s, S, kp * 32, n * 8, lane);
          mma<T>(acc, af[2 * kp], bf[0], bf[1]);
          mma<T>(acc, af[2 * kp + 1], bf[2], bf[3]);
        }
        const int col = n * 8 + 2 * t;
        if (r0 < Sq) {
          atomicAdd(dq + r0 * o_row + col, acc[0]);
          atomicAdd(dq + r0 * o_row + col + 1, acc[1]);
        }
        if (r1 < Sq) {
          atomicAdd(dq + r1 * o_row + col, acc[2]);
          atomicAdd(dq + r1 * o_row + col + 1, acc[3]);
        }
      }
    }
  }

  const int64_t dkv_row = p.dkv_row;
  T* dk_out = static_cast<T*>(p.dk) + k_start * dkv_row + hk * kHeadDim;
  T* dv_out = static_cast<T*>(p.dv) + k_start * dkv_row + hk * kHeadDim;
  const int64_t key0 = n0 + kw + g, key1 = key0 + 8;
#pragma unroll
  for (int n = 0; n < Tr::kDimTiles; ++n) {
    const int col = n * 8 + 2 * t;
    if (key0 < Sk) {
      *reinterpret_cast<uint32_t*>(dk_out + key0 * dkv_row + col) =
          Pack<T>::pack(dk[n][0] * p.scale, dk[n][1] * p.scale);
      *reinterpret_cast<uint32_t*>(dv_out + key0 * dkv_row + col) = Pack<T>::pack(dv[n][0], dv[n][1]);
    }
    if (key1 < Sk) {
      *reinterpret_cast<uint32_t*>(dk_out + key1 * dkv_row + col) =
          Pack<T>::pack(dk[n][2] * p.scale, dk[n][3] * p.scale);
      *reinterpret_cast<uint32_t*>(dv_out + key1 * dkv_row + col) = Pack<T>::pack(dv[n][2], dv[n][3]);
    }
  }
}

// 3. dQ = scale dQ_accum, 8 elements per thread; a token's row8 groups of 8 lie contiguous
// in dQ, the tokens dq_row elements apart
template <typename T>
__global__ void __launch_bounds__(256) flash_bwd_dq_kernel(const float* acc, T* dq, int64_t n8,
                                                           int64_t row8, int64_t dq_row,
                                                           float scale) {
  const int64_t i = int64_t(blockIdx.x) * 256 + threadIdx.x;
  if (i >= n8) return;
  const float4 a = reinterpret_cast<const float4*>(acc)[2 * i];
  const float4 b = reinterpret_cast<const float4*>(acc)[2 * i + 1];
  const int64_t token = i / row8;
  *reinterpret_cast<uint4*>(dq + token * dq_row + (i - token * row8) * 8) =
      make_uint4(Pack<T>::pack(a.x * scale, a.y * scale), Pack<T>::pack(a.z * scale, a.w * scale),
                 Pack<T>::pack(b.x * scale, b.y * scale), Pack<T>::pack(b.z * scale, b.w * scale));
}

// The launch's checks and the steps around the main kernel, shared with the Hopper backward
// (flash_bwd_sm90_kernel.cuh): nothing to do for an empty batch; grouped heads must divide;
// before the main kernel dQ's accumulator is zeroed and Delta computed, after it dQ converted.
inline bool bwd_empty(const FlashBwdParams& p) { return p.batch == 0 || p.heads == 0; }
inline bool bwd_args_ok(const FlashBwdParams& p) {
  return p.heads_k >= 1 && p.heads % p.heads_k == 0 && p.batch <= 65535 && p.heads_k <= 65535;
}
template <typename T, int kHeadDim>
cudaError_t bwd_before(const FlashBwdParams& p, cudaStream_t stream) {
  const int64_t rows = p.total_q * p.heads;  // query rows x heads
  cudaError_t err = cudaMemsetAsync(p.dq_accum, 0, size_t(rows) * kHeadDim * sizeof(float), stream);
  if (err != cudaSuccess || rows == 0) return err;
  return launch_kernel(flash_bwd_delta_kernel<T, kHeadDim>,
                       dim3(unsigned((rows + kThreads - 1) / kThreads)), dim3(kThreads), 0, stream,
                       p);
}
template <typename T, int kHeadDim>
cudaError_t bwd_after(const FlashBwdParams& p, cudaStream_t stream) {
  const int64_t n8 = p.total_q * p.heads * kHeadDim / 8;
  if (n8 == 0) return cudaSuccess;
  return launch_kernel(flash_bwd_dq_kernel<T>, dim3(unsigned((n8 + 255) / 256)), dim3(256), 0,
                       stream, static_cast<const float*>(p.dq_accum), static_cast<T*>(p.dq), n8,
                       p.heads * kHeadDim / 8, p.dq_row, p.scale);
}

template <typename T, int kHeadDim>
cudaError_t bwd(const FlashBwdParams& p, cudaStream_t stream) {
  using Tr = Traits<T, kHeadDim>;
  if (bwd_empty(p)) return cudaSuccess;
  if (!bwd_args_ok(p)) return cudaErrorInvalidValue;
  cudaError_t err = bwd_before<T, kHeadDim>(p, stream);
  if (err != cudaSuccess) return err;
  if (p.seqlen_k > 0) {
    const dim3 grid(unsigned((p.seqlen_k + kBlockN - 1) / kBlockN), unsigned(p.heads_k),
                    unsigned(p.batch));
    err = launch_kernel(flash_bwd_kernel<T, kHeadDim>, grid, dim3(kThreads), size_t(Tr::kSmem),
                        stream, p);
    if (err != cudaSuccess) return err;
  }
  return bwd_after<T, kHeadDim>(p, stream);
}

}  // namespace flash_bwd
}  // namespace pyssm
