// CUDA flash-attention forward, portable path (sm_80 and newer: mma.sync m16n8k16, fp32
// accumulation), v3. One block of 4 warps takes kBlockM query rows of one (sequence, head);
// each warp owns kMTiles 16-row tiles of them (2 up to head_dim 64: 128 rows a block, so every
// K and V fragment loaded from shared memory feeds two mmas and every K / V tile serves twice
// the rows; 1 above, where the accumulators of two row tiles would not fit in registers). Q
// stays in registers as mma A fragments; K and V tiles of 64 keys go through shared memory in
// two stages: cp.async brings the next tile's K and V while this one is computed, and the mma
// B fragments come out of shared memory with ldmatrix (K as is, V transposed). History: v1
// read V's fragments two 16-bit halves at a time (0.37-0.41x cuDNN on the H200); v2 added
// ldmatrix and cp.async with 16 rows a warp.
// S = Q K^T is computed into registers, masked, turned into probabilities with an online
// softmax in the log2 domain (the scale folded into one multiply), and multiplied into O
// straight from the S registers (the C fragment of one mma is the A fragment of the next).
// Causal and windowed blocks visit only the key tiles their rows see (a window's first tile on),
// and mask only the tiles its edges cross. Head sizes that are not a multiple of 16
// (72) are zero-padded to one in shared memory and registers only for the Q K^T reduction
// (72 -> 80, not 128); O keeps exactly head_dim columns. At head_dim 256 key tiles are 32 wide
// (Traits::kBlockN).

// (mma fragment layouts: flash_mma.cuh)
#pragma once

#include <cmath>
#include <cstdint>

#include "attention/flash.cuh"
#include "attention/flash_mma.cuh"
#include "attention/flash_seq.cuh"

namespace pyssm {
namespace flash {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;

template <typename T, int kHeadDim>
struct Traits {
  static constexpr int kMTiles = kHeadDim <= 64 ? 2 : 1;      // 16-row tiles per warp
  static constexpr int kBlockM = 16 * kMTiles * kWarps;       // query rows per block
  // keys per tile: 64; 32 above head_dim 128 (256: Gemma's), where Q's fragments (64
  // registers a thread) and O's accumulators (128) leave too few for a 64-key tile's scores
  static constexpr int kBlockN = kHeadDim <= 128 ? 64 : 32;
  static constexpr int kPadDim = (kHeadDim + 15) / 16 * 16;  // the Q K^T reduction length
  static constexpr int kKSteps = kPadDim / 16;
  static constexpr int kDimTiles = kHeadDim / 8;              // O columns in 8-wide tiles
  static constexpr int kSmemStride = kPadDim + 8;             // +16 bytes: no bank conflicts
  static constexpr int kChunks = kPadDim / 8;                 // 16-byte chunks per smem row
  static constexpr int kTileElems = kBlockN * kSmemStride;    // one K or V tile
  // two stages of K and V tiles (dynamic shared memory: 69.6 KB at head_dim 128, 67.6 KB at 256)
  static constexpr size_t kSmem = size_t(2 * 2 * kTileElems) * sizeof(T);
  static_assert(kHeadDim % 8 == 0, "head_dim must be a multiple of 8");
};

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads) flash_fwd_kernel(const FlashParams p) {
  using Tr = Traits<T, kHeadDim>;
  constexpr int kM = Tr::kMTiles, kBlockN = Tr::kBlockN;
  PYSSM_DYNAMIC_SMEM(smem);
  T* const tiles = reinterpret_cast<T*>(smem);  // stage s: K at 2 s, V at 2 s + 1 (x kTileElems)

  const int b = blockIdx.z, h = blockIdx.y, m_block = blockIdx.x;
  const SeqSpan seq = seq_span(p, b);
  const int64_t q_start = seq.q_start, Sq = seq.Sq, Sk = seq.Sk;
  if (int64_t(m_block) * Tr::kBlockM >= Sq) return;  // the whole block: before any barrier
  const int64_t hk = h / (p.heads / p.heads_k);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  // this thread's rows: row[mt][0] and row[mt][1] = row[mt][0] + 8 of each of its row tiles
  int64_t row[kM][2];
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
    row[mt][0] = int64_t(m_block) * Tr::kBlockM + (warp * kM + mt) * 16 + g;
    row[mt][1] = row[mt][0] + 8;
  }

  const T* q = static_cast<const T*>(p.q) + head_start(p, p.q_layout, b, q_start, h);
  const int64_t kv_off = kv_head_start(p, seq, b, hk);
  const T* k = static_cast<const T*>(p.k) + kv_off;
  const T* v = static_cast<const T*>(p.v) + kv_off;
  const int64_t kv_row = p.kv_layout.row;

  // Q as A fragments, one set per row tile and 16-wide step of the reduction
  uint32_t qf[kM][Tr::kKSteps][4];
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
    const T* q0 = q + row[mt][0] * p.q_layout.row;
    const T* q1 = q + row[mt][1] * p.q_layout.row;
    const bool ok0 = row[mt][0] < Sq, ok1 = row[mt][1] < Sq;
#pragma unroll
    for (int st = 0; st < Tr::kKSteps; ++st) {
      const int c = st * 16 + 2 * t;
      qf[mt][st][0] = ok0 ? load_pair(q0, c, kHeadDim) : 0u;
      qf[mt][st][1] = ok1 ? load_pair(q1, c, kHeadDim) : 0u;
      qf[mt][st][2] = ok0 ? load_pair(q0, c + 8, kHeadDim) : 0u;
      qf[mt][st][3] = ok1 ? load_pair(q1, c + 8, kHeadDim) : 0u;
    }
  }

  float o[kM][Tr::kDimTiles][4];
  float m_run[kM][2], l_run[kM][2];  // running max (log2 domain) and per-lane partial sums
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
    for (int n = 0; n < Tr::kDimTiles; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
    m_run[mt][0] = m_run[mt][1] = -INFINITY;
    l_run[mt][0] = l_run[mt][1] = 0.f;
  }

  // the keys the block's rows see: [its first row's first, its last row's end); tiles inside
  // [its last row's first, its first row's end) need no mask
  const int64_t first_row = int64_t(m_block) * Tr::kBlockM;
  const int64_t last_row = first_row + Tr::kBlockM - 1;
  const int64_t key_begin = first_key(seq, p, first_row) / kBlockN * kBlockN;
  const int64_t key_end = keys_to_visit(seq, p, last_row);
  const int64_t unmasked_begin = first_key(seq, p, last_row < Sq ? last_row : Sq - 1);
  const int64_t unmasked_end = keys_to_visit(seq, p, first_row);
  const int64_t diag = Sk - Sq;  // row r's keys: [r + diag - window_left, r + diag + window_right]

  // K and V rows [n0, n0 + kBlockN) into stage `stage`, 16 bytes per cp.async; rows past the
  // sequence and the columns that pad head_dim (72 -> 80) are zero-filled (P V must see zeros,
  // not whatever the memory holds, under the zero probabilities of masked keys).
  auto load_tiles = [&](int64_t n0, int stage) {
    T* kt = tiles + (2 * stage) * Tr::kTileElems;
    T* vt = kt + Tr::kTileElems;
    for (int i = threadIdx.x; i < kBlockN * Tr::kChunks; i += kThreads) {
      const int r = i / Tr::kChunks, c = (i % Tr::kChunks) * 8;
      const bool ok = n0 + r < Sk && c < kHeadDim;
      const int64_t at = ok ? (n0 + r) * kv_row + c : 0;
      cp_async_16(kt + r * Tr::kSmemStride + c, k + at, ok);
      cp_async_16(vt + r * Tr::kSmemStride + c, v + at, ok);
    }
  };
  // ldmatrix row addresses of this lane: matrix i = lane / 8 takes its row lane % 8
  const int mat = lane / 8, mrow = lane % 8;

  const int64_t n_tiles = key_end > key_begin ? (key_end - key_begin + kBlockN - 1) / kBlockN : 0;
  if (n_tiles > 0) load_tiles(key_begin, 0);
  cp_async_commit();
  for (int64_t it = 0; it < n_tiles; ++it) {
    const int64_t n0 = key_begin + it * kBlockN;
    if (it + 1 < n_tiles) load_tiles(n0 + kBlockN, int((it + 1) & 1));
    cp_async_commit();     // (an empty group on the last tile)
    cp_async_wait<1>();    // this thread's copies of tile `it` have landed
    __syncthreads();       // and everyone else's
    const T* k_tile = tiles + (2 * (it & 1)) * Tr::kTileElems;
    const T* v_tile = k_tile + Tr::kTileElems;

    // S = Q K^T for this warp's rows and the tile's kBlockN keys. One ldmatrix.x4 gives the B
    // fragments of two 8-key groups for one 16-wide step: matrices (keys 8j.., dims 16st..),
    // (8j.., 16st + 8..), (8j + 8.., 16st..), (8j + 8.., 16st + 8..); each feeds every row tile.
    float s[kM][kBlockN / 8][4];
#pragma unroll
    for (int mt = 0; mt < kM; ++mt)
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
#pragma unroll
    for (int jp = 0; jp < kBlockN / 16; ++jp) {
      const T* krow = k_tile + ((2 * jp + mat / 2) * 8 + mrow) * Tr::kSmemStride + (mat % 2) * 8;
#pragma unroll
      for (int st = 0; st < Tr::kKSteps; ++st) {
        uint32_t bf[4];
        ldmatrix_x4<false>(bf, krow + st * 16);
#pragma unroll
        for (int mt = 0; mt < kM; ++mt) {
          mma<T>(s[mt][2 * jp], qf[mt][st], bf[0], bf[1]);
          mma<T>(s[mt][2 * jp + 1], qf[mt][st], bf[2], bf[3]);
        }
      }
    }

    if (p.softcap_prescale > 0.f) {  // soft-capping: tanh of the scaled scores (set_scale)
#pragma unroll
      for (int mt = 0; mt < kM; ++mt)
#pragma unroll
        for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            s[mt][j][e] = flash::softcap_tanh(s[mt][j][e] * p.softcap_prescale);
    }

    // per row tile: scale into the log2 domain, mask (past the sequence, the causal or window
    // edges) where the tile crosses one, online softmax; then P's A fragments
    const bool masked = n0 < unmasked_begin || n0 + kBlockN > unmasked_end;
    uint32_t pf[kM][kBlockN / 16][4];
#pragma unroll
    for (int mt = 0; mt < kM; ++mt) {
      float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
        if (masked) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int64_t key = n0 + j * 8 + 2 * t + (e & 1);
            const int64_t d = row[mt][e >> 1] + diag;
            const bool visible =
                key < Sk && key <= d + p.window_right && key + p.window_left >= d;
            s[mt][j][e] = visible ? s[mt][j][e] * p.scale_log2 : -INFINITY;
          }
        } else {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][j][e] *= p.scale_log2;
        }
        mx0 = fmaxf(mx0, fmaxf(s[mt][j][0], s[mt][j][1]));
        mx1 = fmaxf(mx1, fmaxf(s[mt][j][2], s[mt][j][3]));
      }
#pragma unroll
      for (int d = 1; d < 4; d *= 2) {  // the 4 lanes of a row
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, d));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, d));
      }
      const float new0 = fmaxf(m_run[mt][0], mx0), new1 = fmaxf(m_run[mt][1], mx1);
      const float use0 = new0 == -INFINITY ? 0.f : new0;  // a row with nothing visible yet
      const float use1 = new1 == -INFINITY ? 0.f : new1;
      const float alpha0 = exp2f(m_run[mt][0] - use0), alpha1 = exp2f(m_run[mt][1] - use1);
      m_run[mt][0] = new0;
      m_run[mt][1] = new1;
      float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
        s[mt][j][0] = exp2f(s[mt][j][0] - use0);
        s[mt][j][1] = exp2f(s[mt][j][1] - use0);
        s[mt][j][2] = exp2f(s[mt][j][2] - use1);
        s[mt][j][3] = exp2f(s[mt][j][3] - use1);
        sum0 += s[mt][j][0] + s[mt][j][1];
        sum1 += s[mt][j][2] + s[mt][j][3];
      }
      l_run[mt][0] = l_run[mt][0] * alpha0 + sum0;  // the lanes of a row add up at the end
      l_run[mt][1] = l_run[mt][1] * alpha1 + sum1;
#pragma unroll
      for (int n = 0; n < Tr::kDimTiles; ++n) {
        o[mt][n][0] *= alpha0;
        o[mt][n][1] *= alpha0;
        o[mt][n][2] *= alpha1;
        o[mt][n][3] *= alpha1;
      }
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        pf[mt][kk][0] = Pack<T>::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pf[mt][kk][1] = Pack<T>::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pf[mt][kk][2] = Pack<T>::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pf[mt][kk][3] = Pack<T>::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
    }

    // O += P V, 16 keys a step, two steps per ldmatrix.x4.trans: V's B fragments for 32 keys
    // of one 8-wide column tile, matrices (keys 32kp.., ), (32kp + 8..), (32kp + 16..),
    // (32kp + 24..), each transposed; each feeds every row tile.
#pragma unroll
    for (int kp = 0; kp < kBlockN / 32; ++kp) {
      const T* vrow = v_tile + (kp * 32 + mat * 8 + mrow) * Tr::kSmemStride;
#pragma unroll
      for (int n = 0; n < Tr::kDimTiles; ++n) {
        uint32_t bf[4];
        ldmatrix_x4<true>(bf, vrow + n * 8);
#pragma unroll
        for (int mt = 0; mt < kM; ++mt) {
          mma<T>(o[mt][n], pf[mt][2 * kp], bf[0], bf[1]);
          mma<T>(o[mt][n], pf[mt][2 * kp + 1], bf[2], bf[3]);
        }
      }
    }
    __syncthreads();  // the next iteration loads tile it + 2 into this stage
  }

  T* out = static_cast<T*>(p.out);
  constexpr float kLn2 = 0.6931471805599453f;
  // dense (batch, heads, seqlen_q); packed (heads, total)
  const int64_t base = p.cu_seqlens ? h * p.total_q + q_start : (int64_t(b) * p.heads + h) * Sq;
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float l = l_run[mt][half];
#pragma unroll
      for (int d = 1; d < 4; d *= 2) l += __shfl_xor_sync(0xffffffffu, l, d);
      const int64_t r = row[mt][half];
      if (r >= Sq) continue;
      const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
      for (int n = 0; n < Tr::kDimTiles; ++n) {
        T* dst = out + ((q_start + r) * p.heads + h) * kHeadDim + n * 8 + 2 * t;
        *reinterpret_cast<uint32_t*>(dst) =
            Pack<T>::pack(o[mt][n][2 * half] * inv, o[mt][n][2 * half + 1] * inv);
      }
      if (t == 0) p.lse[base + r] = l > 0.f ? (m_run[mt][half] + log2f(l)) * kLn2 : -INFINITY;
    }
  }
}

template <typename T, int kHeadDim>
cudaError_t fwd(const FlashParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.heads == 0 || p.seqlen_q == 0) return cudaSuccess;
  if (p.heads_k < 1 || p.heads % p.heads_k != 0 || p.batch > 65535 || p.heads > 65535)
    return cudaErrorInvalidValue;
  constexpr int kBlockM = Traits<T, kHeadDim>::kBlockM;
  const dim3 grid(unsigned((p.seqlen_q + kBlockM - 1) / kBlockM), unsigned(p.heads),
                  unsigned(p.batch));
  return launch_kernel(flash_fwd_kernel<T, kHeadDim>, grid, dim3(kThreads),
                       Traits<T, kHeadDim>::kSmem, stream, p);
}

}  // namespace flash
}  // namespace pyssm
