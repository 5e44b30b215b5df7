// CUDA flash-attention forward, Hopper path (sm_90a), v1: TMA loads, wgmma, one producer
// warpgroup and two consumer warpgroups, the softmax of one key tile overlapped with the P V
// product of the one before. Head dims 64 and 128 (multiples of the 64-element swizzle atom);
// the other sizes, and GPUs other than sm_90, run the portable path (flash_kernel.cuh).
//
// Work tiles of 128 query rows of one (sequence, head); a persistent grid of one block per SM
// walks them (below). 384 threads a block:
// - warpgroup 0, the producer: one thread loads a tile's Q once it is free (q_empty), then its
//   K and V tiles of 128 keys into a ring of 2 stages with TMA (tensor maps over (head_dim, heads, tokens, batch), rows
//   past the sequence zero-filled, 128-byte swizzle). A stage's `full` barrier completes when
//   its bytes have landed; its `empty` barrier when both consumers are done reading it. It
//   gives its registers back (setmaxnreg 24).
// - warpgroups 1 and 2, the consumers, 64 query rows each (setmaxnreg 240): per key tile
//   S = Q K^T (wgmma, A and B from shared memory, K-major), mask, online softmax in the log2
//   domain with the scale folded in, P to bf16 / fp16 A fragments in registers, O += P V (wgmma,
//   A from registers, V from shared memory MN-major). The loop issues S for tile j + 1 before
//   O += P V for tile j, waits only for S, computes its softmax while P V runs, then waits for
//   P V, frees the stage and rescales O. The two consumers also interleave with each other.
// Accumulator layout of m64nNk16 (fp32): warp w of the warpgroup holds rows 16w..16w+15; lane
// 4g + t holds, for each 8-column chunk i, d[4i], d[4i+1] = row g, columns 8i + 2t, 8i + 2t + 1
// and d[4i+2], d[4i+3] = row g + 8, the same columns. Two chunks of S (keys 16k..16k+15) are
// the A fragment of P's k-th step, as in the portable path.
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "attention/flash.cuh"
#include "attention/flash_mma.cuh"
#include "attention/flash_seq.cuh"
#include "attention/sm90.cuh"

namespace pyssm {
namespace flash_sm90 {

// A row of Q, K or V in shared memory is two column blocks: the first 64 columns (128 bytes,
// 128-byte swizzle) and the rest, the tail: 72 -> 16 columns (8 of them zeros, loaded past the
// tensor's last column) with the 32-byte swizzle, 80 -> 16 (32-byte), 96 -> 32 (64-byte), 128
// -> 64 (128-byte). Each block has its own tensor map and descriptors.
template <typename T, int kHeadDim>
struct Traits {
  static_assert(kHeadDim == 64 || kHeadDim == 72 || kHeadDim == 80 || kHeadDim == 96 ||
                    kHeadDim == 128,
                "the Hopper path takes head_dim 64, 72, 80, 96 and 128");
  static constexpr int kBlockM = 128;            // query rows per block, 64 per consumer
  static constexpr int kBlockN = 128;            // keys per tile
  static constexpr int kStages = 2;              // K / V ring
  static constexpr int kThreads = 384;           // producer + 2 consumer warpgroups
  static constexpr int kTail = kHeadDim - 64;    // O columns past the first 64 (0, 8, 16, 32, 64)
  static constexpr int kTailCols = kTail == 0 ? 0 : kTail < 16 ? 16 : kTail;  // in shared memory
  static constexpr int kTailSpan = 2 * kTailCols;  // its swizzle span in bytes (32, 64, 128)
  static constexpr int kKSteps = (64 + kTailCols) / 16;  // of the Q K^T reduction
  static constexpr int kMainBytes = 128 * 128;           // 128 rows of the first block: 16 KB
  static constexpr int kTileBytes = kMainBytes + 128 * kTailSpan;  // a Q, K or V tile
  static constexpr int kQ = 0;                             // byte offsets from the aligned base
  static constexpr int kKV = kTileBytes;                   // stage s: K at kKV + 2 s tiles, V next
  static constexpr int kBars = kKV + 2 * kStages * kTileBytes;
  // q_full, q_empty, full[kStages], empty[kStages]; + 1024 to align the base by hand
  static constexpr size_t kSmem = size_t(kBars) + 8 * (2 + 2 * kStages) + 1024;
  static constexpr int kDimChunks = kHeadDim / 8;  // O columns in 8-wide chunks
  static constexpr int kKeyChunks = kBlockN / 8;
  static_assert(kTileBytes % 1024 == 0, "tiles stay aligned to the 128-byte swizzle's atom");
};

// The tensor maps (kernel parameters: TMA reads them from parameter space): the first 64
// columns of q, k, v, and their tail column blocks (unused at head_dim 64)
struct Maps {
  CUtensorMap q, k, v, q_tail, k_tail, v_tail;
};

// One work tile: 128 query rows of one (sequence, head). Tiles are numbered with the row
// block fastest, last row block first (under a causal mask the last ones have the most keys,
// and a persistent grid should start on those), then heads, then sequences.
struct Tile {
  int b, h, m_block, n_first, n_end;  // key tiles [n_first, n_end)
  flash::SeqSpan seq;
  bool valid;  // false: rows past a packed sequence's end (nothing to do)
};
// The key tiles [n_first, n_end) a work tile's rows see: from its first row's first key (a
// window's) to its last row's end, in 32-bit arithmetic (the producer works this out in 24
// registers: flash_seq.cuh's 64-bit helpers spilled there). Fits: sequences are shorter than
// 2^30 tokens and a window bound is below 2^30 or kNoWindow (set_window), so
// |first_row + Sk - Sq| < 2^30 and every sum below stays inside int32.
template <int kBlockM, int kBlockN>
__device__ __forceinline__ void key_tiles(const FlashParams& p, Tile& w) {
  const int Sq = int(w.seq.Sq), Sk = int(w.seq.Sk), diag = w.m_block * kBlockM + Sk - Sq;
  int key_begin = 0, key_end = Sk;
  if (p.window_left < kNoWindow) {
    key_begin = diag - int(p.window_left);
    key_begin = key_begin > 0 ? (key_begin < Sk ? key_begin : Sk) : 0;
  }
  if (p.window_right < kNoWindow) {
    key_end = diag + kBlockM + int(p.window_right);
    key_end = key_end < Sk ? (key_end > 0 ? key_end : 0) : Sk;
  }
  w.n_first = key_begin / kBlockN;
  w.n_end = key_end > key_begin ? (key_end + kBlockN - 1) / kBlockN : w.n_first;
}

// kKeys: with its key tiles (key_tiles) too
template <int kBlockM, int kBlockN, bool kKeys = true>
__device__ __forceinline__ Tile tile_at(const FlashParams& p, int index, int m_blocks) {
  Tile w;
  w.m_block = m_blocks - 1 - index % m_blocks;
  w.h = (index / m_blocks) % int(p.heads);
  w.b = index / (m_blocks * int(p.heads));
  w.seq = flash::seq_span(p, w.b);
  w.valid = int64_t(w.m_block) * kBlockM < w.seq.Sq;
  if (kKeys && w.valid) key_tiles<kBlockM, kBlockN>(p, w);
  return w;
}

// Persistent: a grid of at most one block per SM walks the tiles (blockIdx.x, + gridDim.x,
// ...), so the producer loads the next tile's Q and first K / V while the consumers finish
// this one (at 197 tokens a tile has two key tiles: unhidden loads would cost a third of it).
// The stage ring and its barrier phases run on across tiles (kv_iter counts every K / V tile
// the block has loaded); Q has its own full / empty pair.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(384, 1)
    flash_fwd_sm90_kernel(const FlashParams p, const __grid_constant__ Maps maps) {
#ifdef PYSSM_SM90_DEVICE
  using Tr = Traits<T, kHeadDim>;
  using namespace sm90;
  PYSSM_DYNAMIC_SMEM(raw);
  unsigned char* const smem = raw + ((1024 - smem_u32(raw) % 1024) % 1024);
  uint64_t* const bars = reinterpret_cast<uint64_t*>(smem + Tr::kBars);
  uint64_t* const q_full = bars;
  uint64_t* const q_empty = bars + 1;
  uint64_t* const full = bars + 2;
  uint64_t* const empty = bars + 2 + Tr::kStages;
  auto k_tile = [&](int stage) { return smem + Tr::kKV + 2 * stage * Tr::kTileBytes; };
  auto v_tile = [&](int stage) { return k_tile(stage) + Tr::kTileBytes; };
  const int m_blocks = int((p.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM);
  const int n_work = m_blocks * int(p.heads) * int(p.batch);
  const bool packed = p.cu_seqlens != nullptr;
  const int group = int(p.heads / p.heads_k);

  if (threadIdx.x == 0) {
    mbar_init(q_full, 1);
    mbar_init(q_empty, 256);  // every consumer thread
    for (int s = 0; s < Tr::kStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 256);
    }
    fence_barrier_init();
  }
  __syncthreads();

  const int wg = threadIdx.x / 128;
  if (wg == 0) {  // producer
    setmaxnreg_dec<24>();
    if (threadIdx.x == 0) {
      int kv_iter = 0, tile_iter = 0;
      for (int index = blockIdx.x; index < n_work; index += gridDim.x) {
        // (its key tiles worked out after Q's load is issued: fewer values live at once, in
        // this thread's 24 registers)
        Tile w = tile_at<Tr::kBlockM, Tr::kBlockN, false>(p, index, m_blocks);
        if (!w.valid) continue;
        // TMA coordinates (column, head, token, batch): packed sequences index the one
        // "batch" of all tokens from their start; dense batches their own from token 0 (keys
        // from their first, k_lead)
        const int q_row = int(packed ? w.seq.q_start : 0) + w.m_block * Tr::kBlockM;
        const int k_row = int(packed ? w.seq.k_start : flash::k_lead(p, w.seq, w.b));
        const int batch = packed ? 0 : w.b;
        const int hk = w.h / group;
        mbar_wait(q_empty, (tile_iter & 1) ^ 1);  // the consumers are done with the last Q
        mbar_arrive_expect_tx(q_full, Tr::kTileBytes);
        tma_load_4d(smem + Tr::kQ, &maps.q, 0, w.h, q_row, batch, q_full);
        if (Tr::kTail)
          tma_load_4d(smem + Tr::kQ + Tr::kMainBytes, &maps.q_tail, 64, w.h, q_row, batch, q_full);
        key_tiles<Tr::kBlockM, Tr::kBlockN>(p, w);
        // (a running row and a count down: the fewest registers, this thread has 24)
        int row = k_row + w.n_first * Tr::kBlockN;
        for (int j = w.n_end - w.n_first; j > 0; --j, ++kv_iter, row += Tr::kBlockN) {
          const int s = kv_iter % Tr::kStages;
          mbar_wait(&empty[s], ((kv_iter / Tr::kStages) & 1) ^ 1);
          mbar_arrive_expect_tx(&full[s], 2 * Tr::kTileBytes);
          tma_load_4d(k_tile(s), &maps.k, 0, hk, row, batch, &full[s]);
          tma_load_4d(v_tile(s), &maps.v, 0, hk, row, batch, &full[s]);
          if (Tr::kTail) {
            tma_load_4d(k_tile(s) + Tr::kMainBytes, &maps.k_tail, 64, hk, row, batch, &full[s]);
            tma_load_4d(v_tile(s) + Tr::kMainBytes, &maps.v_tail, 64, hk, row, batch, &full[s]);
          }
        }
        ++tile_iter;
      }
    }
    return;
  }
  setmaxnreg_inc<240>();

  // consumer `cw` (0 or 1) takes rows 64 cw + [0, 64) of every tile
  const int cw = wg - 1, tid = threadIdx.x % 128;
  const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const uint32_t q_addr = smem_u32(smem + Tr::kQ);  // this consumer's 64 rows: 64 cw rows on
  float o[kHeadDim / 2], s[Tr::kBlockN / 2];
  uint32_t pa[Tr::kBlockN / 16][4];
  auto qk = [&](int stage) {  // s = Q K^T, issued and committed
    const uint32_t k_addr = smem_u32(k_tile(stage));
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < Tr::kKSteps; ++ks) {  // 4 steps in the first block, then the tail
      const bool tail = ks >= 4;
      const int span = tail ? Tr::kTailSpan : 128;
      const uint32_t off = tail ? Tr::kMainBytes + (ks - 4) * 32 : ks * 32;
      const uint32_t q_off = tail ? Tr::kMainBytes + 64 * cw * Tr::kTailSpan + (ks - 4) * 32
                                  : 64 * cw * 128 + ks * 32;
      wgmma_ss<Tr::kBlockN, T>(s, make_desc_k(q_addr + q_off, span), make_desc_k(k_addr + off, span),
                               ks > 0);
    }
    wgmma_commit();
  };
  auto pv = [&](int stage) {  // o += P V, issued and committed
    const uint32_t v_addr = smem_u32(v_tile(stage));
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < Tr::kBlockN / 16; ++ks) {  // 16 keys a step
      if constexpr (Tr::kTail == 64) {  // both blocks in one product, the second kMainBytes on
        wgmma_rs<kHeadDim, T>(o, pa[ks], make_desc_mn(v_addr + ks * 16 * 128, Tr::kMainBytes), 1);
      } else {
        wgmma_rs<64, T>(*reinterpret_cast<float(*)[32]>(o), pa[ks],
                        make_desc_mn(v_addr + ks * 16 * 128, 0), 1);
        if constexpr (Tr::kTail > 0)
          wgmma_rs<Tr::kTail, T>(*reinterpret_cast<float(*)[Tr::kTail / 2]>(o + 32), pa[ks],
                                 make_desc_mn(v_addr + Tr::kMainBytes + ks * 16 * Tr::kTailSpan,
                                              0, Tr::kTailSpan),
                                 1);
      }
    }
    wgmma_commit();
  };
  auto to_a_fragments = [&] {
#pragma unroll
    for (int k = 0; k < Tr::kBlockN / 16; ++k) {
      pa[k][0] = flash::Pack<T>::pack(s[8 * k], s[8 * k + 1]);
      pa[k][1] = flash::Pack<T>::pack(s[8 * k + 2], s[8 * k + 3]);
      pa[k][2] = flash::Pack<T>::pack(s[8 * k + 4], s[8 * k + 5]);
      pa[k][3] = flash::Pack<T>::pack(s[8 * k + 6], s[8 * k + 7]);
    }
  };

  int kv_iter = 0, tile_iter = 0;
  for (int index = blockIdx.x; index < n_work; index += gridDim.x) {
    const Tile w = tile_at<Tr::kBlockM, Tr::kBlockN>(p, index, m_blocks);
    if (!w.valid) continue;
    const int64_t first_row = int64_t(w.m_block) * Tr::kBlockM + 64 * cw;
    const int64_t row0 = first_row + 16 * warp + g, row1 = row0 + 8;
    // The key tiles inside every row's keys need no mask: from the first at or past its last
    // row's first key to the last ending by its first row's end.
    const int64_t last_row = first_row + 63 < w.seq.Sq ? first_row + 63 : w.seq.Sq - 1;
    const int unmasked_from =
        int((flash::first_key(w.seq, p, last_row) + Tr::kBlockN - 1) / Tr::kBlockN);
    const int unmasked_to = int(flash::keys_to_visit(w.seq, p, first_row) / Tr::kBlockN);
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f}, alpha[2];
    // softmax of key tile j: probabilities into s (scaled by the new running max),
    // row sums into l_run, and in alpha the factors that rescale O
    auto softmax = [&](int j) {
      if (p.softcap_prescale > 0.f) {  // soft-capping: tanh of the scaled scores (set_scale)
#pragma unroll
        for (int i = 0; i < Tr::kBlockN / 2; ++i)
          s[i] = flash::softcap_tanh(s[i] * p.softcap_prescale);
      }
      if (j < unmasked_from || j >= unmasked_to) {
        // each of this thread's rows sees the tile's keys [lo, hi] (from n0; past the keys
        // folded in), as ints (a sequence is shorter than 2^30 tokens: the host checks),
        // worked out on the masked tiles only: two 32-bit compares a score
        const int64_t n0 = int64_t(j) * Tr::kBlockN;
        const int lo0 = int(flash::first_key(w.seq, p, row0) - n0);
        const int hi0 = int(flash::keys_to_visit(w.seq, p, row0) - n0) - 1;
        const int lo1 = int(flash::first_key(w.seq, p, row1) - n0);
        const int hi1 = int(flash::keys_to_visit(w.seq, p, row1) - n0) - 1;
#pragma unroll
        for (int i = 0; i < Tr::kKeyChunks; ++i)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = 8 * i + 2 * t + (e & 1);
            const bool visible = e < 2 ? key >= lo0 && key <= hi0 : key >= lo1 && key <= hi1;
            s[4 * i + e] = visible ? s[4 * i + e] * p.scale_log2 : -INFINITY;
          }
      } else {
#pragma unroll
        for (int i = 0; i < Tr::kBlockN / 2; ++i) s[i] *= p.scale_log2;
      }
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int i = 0; i < Tr::kKeyChunks; ++i) {
        mx[0] = fmaxf(mx[0], fmaxf(s[4 * i], s[4 * i + 1]));
        mx[1] = fmaxf(mx[1], fmaxf(s[4 * i + 2], s[4 * i + 3]));
      }
#pragma unroll
      for (int half = 0; half < 2; ++half) {
#pragma unroll
        for (int d = 1; d < 4; d *= 2)
          mx[half] = fmaxf(mx[half], __shfl_xor_sync(0xffffffffu, mx[half], d));
        const float m_new = fmaxf(m_run[half], mx[half]);
        const float use = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet
        alpha[half] = exp2f(m_run[half] - use);
        m_run[half] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < Tr::kKeyChunks; ++i) {
          s[4 * i + 2 * half] = exp2f(s[4 * i + 2 * half] - use);
          s[4 * i + 2 * half + 1] = exp2f(s[4 * i + 2 * half + 1] - use);
          sum += s[4 * i + 2 * half] + s[4 * i + 2 * half + 1];
        }
        l_run[half] = l_run[half] * alpha[half] + sum;  // a row's 4 lanes add up at the end
      }
    };

#pragma unroll
    for (int i = 0; i < kHeadDim / 2; ++i) o[i] = 0.f;
    mbar_wait(q_full, tile_iter & 1);
    if (w.n_end > w.n_first) {
      // key tile j's place in the stage ring: base + j (tile indices, not a count from the
      // first: no register for the first tile's index over the loop)
      const int base = kv_iter - w.n_first;
      mbar_wait(&full[kv_iter % Tr::kStages], (kv_iter / Tr::kStages) & 1);
      qk(kv_iter % Tr::kStages);
      wgmma_wait<0>();
      fence_operands(s);
      softmax(w.n_first);  // (O is still zero: nothing to rescale)
      to_a_fragments();
      // every key tile but the last: S of the next tile is issued before P V of this one, and
      // its softmax runs while P V does (no branch on "is there a next tile" in the loop: with
      // one, ptxas could not follow the wgmma groups and serialised them)
      for (int j = w.n_first; j + 1 < w.n_end; ++j) {
        const int it = base + j;
        const int stage = it % Tr::kStages, ns = (it + 1) % Tr::kStages;
        mbar_wait(&full[ns], ((it + 1) / Tr::kStages) & 1);
        qk(ns);
        pv(stage);
        wgmma_wait<1>();  // S of tile j + 1 (P V of tile j may still run)
        fence_operands(s);
        softmax(j + 1);
        fence_operands(s);
        // The wait for P V behind a branch that is always taken (batch > 0 here): in one basic
        // block with the softmax, ptxas scheduled the wait first and the softmax's shuffles and
        // exponentials after it, which undid the overlap (seen in the SASS).
        if (p.batch > 0) wgmma_wait<0>();  // P V of tile j: its stage is free, O may be rescaled, P rewritten
        fence_operands(o);
        mbar_arrive(&empty[stage]);
#pragma unroll
        for (int i = 0; i < Tr::kDimChunks; ++i) {
          o[4 * i] *= alpha[0];
          o[4 * i + 1] *= alpha[0];
          o[4 * i + 2] *= alpha[1];
          o[4 * i + 3] *= alpha[1];
        }
        to_a_fragments();
      }
      const int last = (base + w.n_end - 1) % Tr::kStages;
      pv(last);
      wgmma_wait<0>();
      fence_operands(o);
      mbar_arrive(&empty[last]);
      kv_iter = base + w.n_end;
    }
    mbar_arrive(q_empty);  // Q is no longer read: the producer may load the next tile's
    ++tile_iter;

    // O / l and the log-sum-exp (dense (batch, heads, seqlen_q); packed (heads, total))
    T* out = static_cast<T*>(p.out);
    constexpr float kLn2 = 0.6931471805599453f;
    const int64_t base =
        packed ? w.h * p.total_q + w.seq.q_start : (int64_t(w.b) * p.heads + w.h) * w.seq.Sq;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float l = l_run[half];
#pragma unroll
      for (int d = 1; d < 4; d *= 2) l += __shfl_xor_sync(0xffffffffu, l, d);
      const int64_t r = half ? row1 : row0;
      if (r >= w.seq.Sq) continue;
      const float inv = l > 0.f ? 1.f / l : 0.f;
      T* dst = out + ((w.seq.q_start + r) * p.heads + w.h) * kHeadDim + 2 * t;
#pragma unroll
      for (int i = 0; i < Tr::kDimChunks; ++i)
        *reinterpret_cast<uint32_t*>(dst + 8 * i) =
            flash::Pack<T>::pack(o[4 * i + 2 * half] * inv, o[4 * i + 2 * half + 1] * inv);
      if (t == 0) p.lse[base + r] = l > 0.f ? (m_run[half] + log2f(l)) * kLn2 : -INFINITY;
    }
  }
#endif  // PYSSM_SM90_DEVICE
}

// Launcher: the tensor maps, then the kernel. q, k, v as FlashParams says (their layouts,
// 16-byte aligned); returns cudaErrorNotSupported where the Hopper path cannot
// run (no sm_90a code in this build, no driver entry point, more tokens than 32-bit TMA
// coordinates hold), so the caller takes the portable path.
template <typename T, int kHeadDim>
cudaError_t fwd(const FlashParams& p, cudaStream_t stream) {
  using Tr = Traits<T, kHeadDim>;
  if (p.batch == 0 || p.heads == 0 || p.seqlen_q == 0) return cudaSuccess;
  if (p.heads_k < 1 || p.heads % p.heads_k != 0 || p.batch > 65535 || p.heads > 65535)
    return cudaErrorInvalidValue;
  const bool packed = p.cu_seqlens != nullptr;
  const uint64_t q_tokens = packed ? uint64_t(p.total_q) : uint64_t(p.seqlen_q);
  const uint64_t k_tokens = packed ? uint64_t(p.total_k) : uint64_t(p.seqlen_k);
  const uint64_t batches = packed ? 1 : uint64_t(p.batch);
  if (q_tokens + Tr::kBlockM > (uint64_t(1) << 31) ||
      k_tokens + Tr::kBlockN > (uint64_t(1) << 31) || k_tokens == 0)
    return cudaErrorNotSupported;
  Maps maps;
  const uint64_t hq = uint64_t(p.heads), hk = uint64_t(p.heads_k);
  const TokenLayout &ql = p.q_layout, &kvl = p.kv_layout;
  auto make = [&](CUtensorMap* map, const void* base, uint64_t heads, const TokenLayout& l,
                  uint64_t tokens, int cols) {
    return sm90::make_token_map<T>(map, base, kHeadDim, heads, l, tokens, batches, cols, 128);
  };
  cudaError_t err = make(&maps.q, p.q, hq, ql, q_tokens, 64);
  if (err == cudaSuccess) err = make(&maps.k, p.k, hk, kvl, k_tokens, 64);
  if (err == cudaSuccess) err = make(&maps.v, p.v, hk, kvl, k_tokens, 64);
  if (Tr::kTail) {
    if (err == cudaSuccess) err = make(&maps.q_tail, p.q, hq, ql, q_tokens, Tr::kTailCols);
    if (err == cudaSuccess) err = make(&maps.k_tail, p.k, hk, kvl, k_tokens, Tr::kTailCols);
    if (err == cudaSuccess) err = make(&maps.v_tail, p.v, hk, kvl, k_tokens, Tr::kTailCols);
  } else {
    maps.q_tail = maps.k_tail = maps.v_tail = maps.q;  // (not read)
  }
  if (err != cudaSuccess) return err;
  // a persistent grid: one block per SM, or one per tile when there are fewer
  int device = 0, sms = 0;
  err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t n_work = (p.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM * p.heads * p.batch;
  if (n_work > INT32_MAX) return cudaErrorNotSupported;
  const dim3 grid(unsigned(n_work < sms ? n_work : sms));
  return launch_kernel(flash_fwd_sm90_kernel<T, kHeadDim>, grid, dim3(Tr::kThreads), Tr::kSmem,
                       stream, p, maps);
}

}  // namespace flash_sm90
}  // namespace pyssm
