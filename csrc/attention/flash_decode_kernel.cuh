// CUDA flash-decoding forward (sm_80 and newer: mma.sync m16n8k16, fp32 accumulation): few
// queries against many keys, the shape of a decoding step. The prefill forward
// (flash_kernel.cuh) gives a block 64 or 128 query rows of one head: a decoding step fills one
// of them, each of a group's heads reads the same K / V tiles again, and one block walks all of
// a sequence's keys in turn while most of the GPU idles when batch x heads is small.
// Here a block of 4 warps takes one (sequence, KV head, chunk of keys):
// - its 16 query rows are the group's heads times the sequence's queries (row r: query r / G,
//   head hk G + r % G, G = heads / heads_k), so every K / V tile is read once per group;
// - the chunk's 64-key tiles come through shared memory in two stages by cp.async (as the
//   prefill forward's); each warp takes 16 keys of a tile, with an online softmax of its own;
//   at the end the four warps' (max, sum, output) merge through shared memory;
// - with one chunk (split.splits == 1) the block writes out and lse; with several, each block
//   writes its rows' normalised partial output and lse (log2 domain) into workspace and
//   flash_decode_combine merges them. The chunks split the keys the sequence's queries see
//   (from its first query's first under a window to its last query's end), so a sliding
//   window over a long cache splits only the window's keys.
// Causal and window masks are aligned bottom-right, per query (row r sees keys j <= r / G +
// Sk - Sq + window_right and j >= r / G + Sk - Sq - window_left).
#pragma once

#include <cmath>
#include <cstdint>

#include "attention/flash.cuh"
#include "attention/flash_mma.cuh"
#include "attention/flash_seq.cuh"

namespace pyssm {
namespace flash_decode {

using flash::ldmatrix_x4;
using flash::load_pair;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = int(kFlashDecodeRows);   // one 16-row mma tile
constexpr int kBlockN = int(kFlashDecodeTile);  // keys per tile, 16 a warp
static_assert(kBlockN == 16 * kWarps, "each warp takes 16 keys of a tile");

template <typename T, int kHeadDim>
struct Traits {
  static constexpr int kPadDim = (kHeadDim + 15) / 16 * 16;  // the Q K^T reduction length
  static constexpr int kKSteps = kPadDim / 16;
  static constexpr int kOTiles = (kHeadDim / 8 + 1) / 2 * 2;  // O columns in 8-wide tiles, even
  static constexpr int kOCols = kOTiles * 8;                  // <= kPadDim (72: 80, zeros past 72)
  static constexpr int kSmemStride = kPadDim + 8;             // +16 bytes: no bank conflicts
  static constexpr int kChunks = kPadDim / 8;                 // 16-byte chunks per smem row
  static constexpr int kTileElems = kBlockN * kSmemStride;    // one K or V tile
  static constexpr size_t kTileBytes = size_t(2 * 2 * kTileElems) * sizeof(T);  // 2 stages
  // the warps' merge, after the last tile: per warp and row the max, the sum and the output
  static constexpr int kMergeStride = kOCols + 4;
  static constexpr size_t kMergeBytes =
      size_t(kWarps) * kRows * (2 + kMergeStride) * sizeof(float);
  static constexpr size_t kSmem = kTileBytes > kMergeBytes ? kTileBytes : kMergeBytes;
  static_assert(kHeadDim % 8 == 0, "head_dim must be a multiple of 8");
  static_assert(kOCols <= kPadDim, "O's column tiles stay inside the zero-padded tile");
  static_assert(sizeof(T) == 2 && kSmem == flash_decode_smem(kHeadDim),
                "flash.cuh's flash_decode_smem, which run_decode checks, is this block's");
};

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads)
    flash_decode_kernel(const FlashParams p, const FlashSplit split) {
  using Tr = Traits<T, kHeadDim>;
  PYSSM_DYNAMIC_SMEM(smem);
  T* const tiles = reinterpret_cast<T*>(smem);  // stage s: K at 2 s, V at 2 s + 1 (x kTileElems)

  const int part = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;  // part: the chunk of keys
  const flash::SeqSpan seq = flash::seq_span(p, b);
  const int64_t Sq = seq.Sq, Sk = seq.Sk;
  const int64_t G = p.heads / p.heads_k;
  // the keys the sequence's queries see: from its first query's first to its last one's end
  const int64_t key_begin = flash::first_key(seq, p, 0);
  const int64_t key_end = flash::keys_to_visit(seq, p, Sq - 1);
  const int64_t n_begin = key_begin + int64_t(part) * split.chunk;
  if (Sq == 0) return;  // (before any barrier: the whole block)
  if (split.splits > 1 && n_begin >= key_end) return;  // combine reads no chunk past key_end
  // the last chunk takes every key left (a sequence longer than seqlen_k is still whole)
  const bool last = part + 1 >= split.splits;
  const int64_t n_end = !last && n_begin + split.chunk < key_end ? n_begin + split.chunk : key_end;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  // this thread's rows g and g + 8: query r / G of head hk G + r % G, if r / G < Sq
  const int64_t query[2] = {g / G, (g + 8) / G};
  const int64_t head[2] = {hk * G + g % G, hk * G + (g + 8) % G};
  const bool ok[2] = {query[0] < Sq, query[1] < Sq};

  const T* q = static_cast<const T*>(p.q) + flash::head_start(p, p.q_layout, b, seq.q_start, 0);
  const int64_t kv_off = flash::kv_head_start(p, seq, b, hk);
  const T* k = static_cast<const T*>(p.k) + kv_off;
  const T* v = static_cast<const T*>(p.v) + kv_off;
  const int64_t kv_row = p.kv_layout.row;

  // Q as A fragments, one per 16-wide step of the reduction
  uint32_t qf[Tr::kKSteps][4];
  {
    const T* q0 = q + (ok[0] ? query[0] * p.q_layout.row + head[0] * p.q_layout.head : 0);
    const T* q1 = q + (ok[1] ? query[1] * p.q_layout.row + head[1] * p.q_layout.head : 0);
#pragma unroll
    for (int st = 0; st < Tr::kKSteps; ++st) {
      const int c = st * 16 + 2 * t;
      qf[st][0] = ok[0] ? load_pair(q0, c, kHeadDim) : 0u;
      qf[st][1] = ok[1] ? load_pair(q1, c, kHeadDim) : 0u;
      qf[st][2] = ok[0] ? load_pair(q0, c + 8, kHeadDim) : 0u;
      qf[st][3] = ok[1] ? load_pair(q1, c + 8, kHeadDim) : 0u;
    }
  }

  float o[Tr::kOTiles][4];
#pragma unroll
  for (int n = 0; n < Tr::kOTiles; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};  // log2 domain; lane partials

  // K and V rows [n0, n0 + kBlockN) into stage `stage`; rows past the sequence and the
  // columns that pad head_dim are zero-filled (P V must see zeros under masked keys)
  auto load_tiles = [&](int64_t n0, int stage) {
    T* kt = tiles + (2 * stage) * Tr::kTileElems;
    T* vt = kt + Tr::kTileElems;
    for (int i = threadIdx.x; i < kBlockN * Tr::kChunks; i += kThreads) {
      const int r = i / Tr::kChunks, c = (i % Tr::kChunks) * 8;
      const bool in = n0 + r < Sk && c < kHeadDim;
      const int64_t at = in ? (n0 + r) * kv_row + c : 0;
      cp_async_16(kt + r * Tr::kSmemStride + c, k + at, in);
      cp_async_16(vt + r * Tr::kSmemStride + c, v + at, in);
    }
  };
  const int mat = lane / 8, mrow = lane % 8;  // ldmatrix: matrix lane / 8 takes row lane % 8

  const int64_t n_tiles = n_end > n_begin ? (n_end - n_begin + kBlockN - 1) / kBlockN : 0;
  if (n_tiles > 0) load_tiles(n_begin, 0);
  cp_async_commit();
  for (int64_t it = 0; it < n_tiles; ++it) {
    const int64_t n0 = n_begin + it * kBlockN;
    if (it + 1 < n_tiles) load_tiles(n0 + kBlockN, int((it + 1) & 1));
    cp_async_commit();   // (an empty group on the last tile)
    cp_async_wait<1>();  // this thread's copies of tile `it` have landed
    __syncthreads();     // and everyone else's
    const T* k_tile = tiles + (2 * (it & 1)) * Tr::kTileElems;
    const T* v_tile = k_tile + Tr::kTileElems;

    // S = Q K^T for the warp's 16 keys [n0 + 16 warp, +16): one ldmatrix.x4 a reduction step
    // gives both 8-key groups' B fragments, matrices (keys +0, dims 16st), (+0, 16st + 8),
    // (+8, 16st), (+8, 16st + 8)
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    const T* krow = k_tile + ((2 * warp + mat / 2) * 8 + mrow) * Tr::kSmemStride + (mat % 2) * 8;
#pragma unroll
    for (int st = 0; st < Tr::kKSteps; ++st) {
      uint32_t bf[4];
      ldmatrix_x4<false>(bf, krow + st * 16);
      mma<T>(s[0], qf[st], bf[0], bf[1]);
      mma<T>(s[1], qf[st], bf[2], bf[3]);
    }

    if (p.softcap_prescale > 0.f) {  // soft-capping: tanh of the scaled scores (set_scale)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = flash::softcap_tanh(s[j][e] * p.softcap_prescale);
    }

    // scale into the log2 domain, mask (past the keys, causal or window per query), online
    // softmax
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t key = n0 + 16 * warp + 8 * j + 2 * t + (e & 1);
        const int half = e >> 1;
        const int64_t d = query[half] + Sk - Sq;
        const bool visible = key < Sk && key <= d + p.window_right && key + p.window_left >= d;
        s[j][e] = visible ? s[j][e] * p.scale_log2 : -INFINITY;
        mx[half] = fmaxf(mx[half], s[j][e]);
      }
    }
    float alpha[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
#pragma unroll
      for (int d = 1; d < 4; d *= 2)  // the 4 lanes of a row
        mx[half] = fmaxf(mx[half], __shfl_xor_sync(0xffffffffu, mx[half], d));
      const float m_new = fmaxf(m_run[half], mx[half]);
      const float use = m_new == -INFINITY ? 0.f : m_new;  // nothing visible yet
      alpha[half] = exp2f(m_run[half] - use);
      m_run[half] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        s[j][2 * half] = exp2f(s[j][2 * half] - use);
        s[j][2 * half + 1] = exp2f(s[j][2 * half + 1] - use);
        sum += s[j][2 * half] + s[j][2 * half + 1];
      }
      l_run[half] = l_run[half] * alpha[half] + sum;
    }
#pragma unroll
    for (int n = 0; n < Tr::kOTiles; ++n) {
      o[n][0] *= alpha[0];
      o[n][1] *= alpha[0];
      o[n][2] *= alpha[1];
      o[n][3] *= alpha[1];
    }
    // P (16 rows x the warp's 16 keys) is one A fragment
    uint32_t pf[4] = {Pack<T>::pack(s[0][0], s[0][1]), Pack<T>::pack(s[0][2], s[0][3]),
                      Pack<T>::pack(s[1][0], s[1][1]), Pack<T>::pack(s[1][2], s[1][3])};

    // O += P V: one ldmatrix.x4.trans gives two 8-column tiles' B fragments, matrices
    // (keys +0, columns 16np), (+8, 16np), (+0, 16np + 8), (+8, 16np + 8), transposed
    const T* vrow = v_tile + (16 * warp + (mat % 2) * 8 + mrow) * Tr::kSmemStride + (mat / 2) * 8;
#pragma unroll
    for (int np = 0; np < Tr::kOTiles / 2; ++np) {
      uint32_t bf[4];
      ldmatrix_x4<true>(bf, vrow + np * 16);
      mma<T>(o[2 * np], pf, bf[0], bf[1]);
      mma<T>(o[2 * np + 1], pf, bf[2], bf[3]);
    }
    __syncthreads();  // the next iteration loads tile it + 2 into this stage
  }

  // the four warps' states through shared memory (the tiles are done with: the loop ended on
  // a barrier, and no copy is pending)
  float* const m_s = reinterpret_cast<float*>(smem);  // (warps, rows)
  float* const l_s = m_s + kWarps * kRows;             // (warps, rows)
  float* const o_s = l_s + kWarps * kRows;             // (warps, rows, kMergeStride)
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float l = l_run[half];
#pragma unroll
    for (int d = 1; d < 4; d *= 2) l += __shfl_xor_sync(0xffffffffu, l, d);
    const int r = g + 8 * half;
    if (t == 0) {
      m_s[warp * kRows + r] = m_run[half];
      l_s[warp * kRows + r] = l;
    }
    float* orow = o_s + (warp * kRows + r) * Tr::kMergeStride + 2 * t;
#pragma unroll
    for (int n = 0; n < Tr::kOTiles; ++n) {
      orow[n * 8] = o[n][2 * half];
      orow[n * 8 + 1] = o[n][2 * half + 1];
    }
  }
  __syncthreads();

  constexpr float kLn2 = 0.6931471805599453f;
  const bool direct = split.splits <= 1;
  // rows x column pairs over the block's threads
  for (int i = threadIdx.x; i < kRows * (kHeadDim / 2); i += kThreads) {
    const int r = i / (kHeadDim / 2), c = (i % (kHeadDim / 2)) * 2;
    const int64_t qi = r / G;
    if (qi >= Sq) continue;
    const int64_t h = hk * G + r % G;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, m_s[w * kRows + r]);
    float l = 0.f, o0 = 0.f, o1 = 0.f;
    if (m != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float wt = exp2f(m_s[w * kRows + r] - m);
        const float* ow = o_s + (w * kRows + r) * Tr::kMergeStride + c;
        l += wt * l_s[w * kRows + r];
        o0 += wt * ow[0];
        o1 += wt * ow[1];
      }
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const float lse2 = l > 0.f ? m + log2f(l) : -INFINITY;
    const int64_t tok = seq.q_start + qi;
    if (direct) {
      T* dst = static_cast<T*>(p.out) + (tok * p.heads + h) * kHeadDim + c;
      *reinterpret_cast<uint32_t*>(dst) = Pack<T>::pack(o0 * inv, o1 * inv);
      if (c == 0) {
        // dense (batch, heads, seqlen_q); packed (heads, total)
        const int64_t at =
            p.cu_seqlens ? h * p.total_q + tok : (int64_t(b) * p.heads + h) * Sq + qi;
        p.lse[at] = lse2 == -INFINITY ? -INFINITY : lse2 * kLn2;
      }
    } else {
      float* dst =
          split.out_part + ((int64_t(part) * p.total_q + tok) * p.heads + h) * kHeadDim + c;
      dst[0] = o0 * inv;
      dst[1] = o1 * inv;
      if (c == 0) split.lse_part[(int64_t(part) * p.heads + h) * p.total_q + tok] = lse2;
    }
  }
}

// Merges the chunks' partial outputs: one warp per (query, head) of a sequence, its lanes over
// head_dim's column pairs. Reads the chunks the decode kernel ran (those before the sequence's
// last visible key); a row no chunk saw gets out 0, lse -inf, as the prefill forward's.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads)
    flash_decode_combine(const FlashParams p, const FlashSplit split) {
  const int b = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t pair = int64_t(blockIdx.x) * kWarps + warp;
  const flash::SeqSpan seq = flash::seq_span(p, b);
  const int64_t qi = pair / p.heads, h = pair % p.heads;
  if (qi >= seq.Sq) return;  // (no barriers in this kernel)
  const int64_t key_begin = flash::first_key(seq, p, 0);
  const int64_t key_end = flash::keys_to_visit(seq, p, seq.Sq - 1);
  const int64_t need = key_end > key_begin ? (key_end - key_begin + split.chunk - 1) / split.chunk
                                           : 0;
  const int64_t ran = need < split.splits ? need : split.splits;
  const int64_t tok = seq.q_start + qi;

  float m = -INFINITY;
  for (int64_t c = 0; c < ran; ++c)
    m = fmaxf(m, split.lse_part[(c * p.heads + h) * p.total_q + tok]);
  float l = 0.f;
  float acc[(kHeadDim + 63) / 64][2] = {};
  if (m != -INFINITY) {
    for (int64_t c = 0; c < ran; ++c) {
      const float wt = exp2f(split.lse_part[(c * p.heads + h) * p.total_q + tok] - m);
      l += wt;
      const float* src = split.out_part + ((c * p.total_q + tok) * p.heads + h) * kHeadDim;
#pragma unroll
      for (int j = 0; j < (kHeadDim + 63) / 64; ++j) {
        const int col = j * 64 + 2 * lane;
        if (col < kHeadDim) {
          acc[j][0] += wt * src[col];
          acc[j][1] += wt * src[col + 1];
        }
      }
    }
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;
  T* out = static_cast<T*>(p.out) + (tok * p.heads + h) * kHeadDim;
#pragma unroll
  for (int j = 0; j < (kHeadDim + 63) / 64; ++j) {
    const int col = j * 64 + 2 * lane;
    if (col < kHeadDim)
      *reinterpret_cast<uint32_t*>(out + col) = Pack<T>::pack(acc[j][0] * inv, acc[j][1] * inv);
  }
  if (lane == 0) {
    constexpr float kLn2 = 0.6931471805599453f;
    const int64_t at =
        p.cu_seqlens ? h * p.total_q + tok : (int64_t(b) * p.heads + h) * seq.Sq + qi;
    p.lse[at] = l > 0.f ? (m + log2f(l)) * kLn2 : -INFINITY;
  }
}

template <typename T, int kHeadDim>
cudaError_t fwd(const FlashParams& p, const FlashSplit& split, cudaStream_t stream) {
  if (p.batch == 0 || p.heads == 0 || p.seqlen_q == 0) return cudaSuccess;
  if (!flash_decode_fits(p.heads, p.heads_k, p.seqlen_q) || p.batch > 65535 ||
      p.heads_k > 65535 || split.splits < 1 || split.splits > 65535 || split.chunk < 1 ||
      split.chunk % kBlockN != 0 ||
      (split.splits > 1 && (split.out_part == nullptr || split.lse_part == nullptr)))
    return cudaErrorInvalidValue;
#ifndef PYSSM_CUDA_EMULATION
  if constexpr (Traits<T, kHeadDim>::kSmem > 99 * 1024) {
    // head_dim 256's two stages of 64-key tiles (132 KB) pass sm_86's and sm_89's most a
    // block (99 KB): there the prefill forward takes the call (attention_cuda.cpp)
    int device = 0, most = 0;
    const cudaError_t got = cudaGetDevice(&device);
    if (got != cudaSuccess) return got;
    const cudaError_t asked =
        cudaDeviceGetAttribute(&most, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (asked != cudaSuccess) return asked;
    if (Traits<T, kHeadDim>::kSmem > size_t(most)) return cudaErrorNotSupported;
  }
#endif
  const dim3 grid(unsigned(split.splits), unsigned(p.heads_k), unsigned(p.batch));
  cudaError_t err = launch_kernel(flash_decode_kernel<T, kHeadDim>, grid, dim3(kThreads),
                                  Traits<T, kHeadDim>::kSmem, stream, p, split);
  if (err != cudaSuccess || split.splits <= 1) return err;
  const dim3 merge_grid(unsigned((p.seqlen_q * p.heads + kWarps - 1) / kWarps),
                        unsigned(p.batch));
  return launch_kernel(flash_decode_combine<T, kHeadDim>, merge_grid, dim3(kThreads), 0, stream,
                       p, split);
}

}  // namespace flash_decode
}  // namespace pyssm
