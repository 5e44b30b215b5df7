// CUDA flash-attention backward, Hopper path (sm_90a), v3: head_dim 64, 72, 80, 96 and 128.
// TMA loads, wgmma, a producer warpgroup and two consumer warpgroups. The Delta and
// dQ-conversion kernels are the portable backward's (flash_bwd_kernel.cuh); this replaces its
// main kernel.
//
// A block owns 128 keys of one (sequence, kv head): K and V come in once (TMA), and dK, dV
// stay in registers while the block walks the query tiles of 64 rows of every q head of the
// group (those that can see its keys under a causal or window mask). 384 threads:
// - warpgroup 0, the producer (setmaxnreg 24): one thread loads K and V, then each query tile's
//   Q and dO into a ring of 2 stages (q_full / q_empty barriers, as the forward).
// - warpgroups 1 and 2, the consumers (setmaxnreg 240), 64 keys each. Per query tile:
//     S^T = K Q^T and dP^T = V dO^T   (wgmma, A and B from shared memory, K-major; 64 x 64)
//     P^T = exp2(S^T scale log2 e - lse log2 e), masked; dS^T = P^T (dP^T - Delta)
//     dV += P^T dO, dK += dS^T Q      (wgmma, A from registers, B MN-major)
//     dS^T to shared memory (bf16 / fp16, the 128-byte-swizzled MN-major layout), then after a
//     barrier of the 256 consumer threads dQ = dS K (wgmma, A and B MN-major from shared
//     memory) over the block's 128 keys, consumer c taking columns 32c .. 32c + 31 and, past
//     64, its part of the tail: 64 + 8c + [0, 8) at 72 and 80, 64 + 16c + [0, 16) at 96,
//     64 + 32c + [0, 32) at 128 (at 72 consumer 1's are past the tensor: computed from K's
//     zero columns and not added), added into the fp32 dQ accumulator:
//     - by default each part, 64 rows of fp32, is written to shared memory (swizzled rows) and
//       added by a TMA reduce-add (cp.reduce.async.bulk.tensor) that one thread of the
//       consumer issues: the L2 sees rows of 128 (tail: 32 to 128) bytes instead of 8-byte atomics,
//       and the consumer does not wait for them (v2);
//     - with p.dq_atomics (PYSSM_FLASH_SM90_DQ=atomic), red.global.add.v2.f32 from registers
//       (v1).
//   dS^T has two buffers (by tile parity): a consumer writes tile i's while the other may still
//   read tile i - 1's, and the barrier of tile i - 1 guarantees nobody reads tile i - 2's. The
//   dQ tiles have two buffers too: before the barrier of tile i the issuing thread waits until
//   the reduce-adds of tile i - 2 have read their buffer.
// Head sizes past 64 (v3): a row of K, V, Q or dO in shared memory is two column blocks, as in
// the forward (flash_sm90_kernel.cuh): the first 64 columns (128-byte swizzle) and a tail of
// 16 (72: 8 real, the rest zeros loaded past the tensor; 80), 32 (96) or 64 (128) columns with
// its own swizzle, tensor maps and descriptors. One consumer body serves both consumers (the
// parts' widths are the same for both): at 128 a consumer holds dK and dV (128 floats), S^T
// and dP^T (64), lse and Delta (32) and dQ (32), and ptxas fits it in setmaxnreg's 240
// registers (SASS up to R237, no spills); a draft that instantiated the body once per
// consumer spilled there (336 bytes).
// lse and Delta are read from global memory into registers (16 each a thread and tile).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "attention/flash.cuh"
#include "attention/flash_bwd_kernel.cuh"
#include "attention/flash_mma.cuh"
#include "attention/flash_seq.cuh"
#include "attention/sm90.cuh"

namespace pyssm {
namespace flash_bwd_sm90 {

template <typename T, int kHeadDim>
struct Traits {
  static_assert(kHeadDim == 64 || kHeadDim == 72 || kHeadDim == 80 || kHeadDim == 96 ||
                    kHeadDim == 128,
                "the Hopper backward takes head_dim 64, 72, 80, 96 and 128");
  static constexpr int kBlockN = 128;  // keys per block, 64 per consumer
  static constexpr int kBlockM = 64;   // query rows per tile
  static constexpr int kStages = 2;
  static constexpr int kThreads = 384;
  static constexpr int kTail = kHeadDim - 64;  // columns past the first 64 (0, 8, 16, 32, 64)
  static constexpr int kTailCols = kTail == 0 ? 0 : kTail < 16 ? 16 : kTail;  // in shared memory
  static constexpr int kTailSpan = 2 * kTailCols;  // its swizzle span in bytes (32, 64, 128)
  // the dQ tail columns a consumer takes (at 72 consumer 1's 8 lie past the tensor)
  static constexpr int kTailPart = kTail == 0 ? 0 : kTail <= 16 ? 8 : kTail / 2;
  static constexpr int kTailPartSpan = 4 * kTailPart;  // an fp32 row of them: 32, 64, 128 bytes
  static constexpr int kKSteps = (64 + kTailCols) / 16;  // of the head_dim reductions
  static constexpr int kKVMain = kBlockN * 128;       // K or V: 128 rows of the first block
  static constexpr int kKVBytes = kKVMain + kBlockN * kTailSpan;
  static constexpr int kQMain = kBlockM * 128;        // a Q or dO tile's first block
  static constexpr int kQBytes = kQMain + kBlockM * kTailSpan;
  static constexpr int kDsBytes = kBlockN * 128;      // dS^T: 128 keys x 64 queries
  // soft-capping (set_scale) compiled in below head_dim 128: at 128 the consumers have no
  // registers for it (every variant tried spilled 48-236 bytes there, the uncapped path too),
  // so bwd() refuses a capped call and the portable backward takes it
  static constexpr bool kSoftcap = kHeadDim < 128;
  // v2: a dQ buffer: each consumer's 32 columns (64 rows of 128 bytes, 8 KB, consumer c at
  // c 8 KB), then each consumer's tail columns (64 rows of kTailPartSpan bytes)
  static constexpr int kDqMain = kBlockM * 128;
  static constexpr int kDqTailPart = kBlockM * kTailPartSpan;
  static constexpr int kDqBytes = 2 * kDqMain + (kTail ? 2 * kDqTailPart : 0);
  static constexpr int kK = 0, kV = kKVBytes;
  static constexpr int kQ = 2 * kKVBytes;          // stage s: Q at kQ + 2 s kQBytes, dO next
  static constexpr int kDs = kQ + 2 * kStages * kQBytes;  // buffer i at kDs + i kDsBytes
  static constexpr int kDq = kDs + 2 * kDsBytes;          // buffer i at kDq + i kDqBytes
  static constexpr int kBars = kDq + 2 * kDqBytes;
  // kv_full, q_full[kStages], q_empty[kStages]; + 1024 to align the base by hand
  static constexpr size_t kSmem = size_t(kBars) + 8 * (1 + 2 * kStages) + 1024;
  static_assert(kKVBytes % 1024 == 0 && kQBytes % 1024 == 0 && kDqBytes % 1024 == 0,
                "tiles stay aligned to the swizzle atoms");
  static_assert(kSmem <= 227 * 1024, "over sm_90's 227 KB of shared memory a block");
};

struct Maps {
  CUtensorMap k, v, q, dout;  // the first 64 columns; k, v: boxes of 128 rows, q, dout: 64
  CUtensorMap k_tail, v_tail, q_tail, dout_tail;  // the tail columns (unused at head_dim 64)
  CUtensorMap dq, dq_tail;  // v2: the fp32 dQ accumulator, 64 rows x 32 (tail: kTailPart)
};

// The swizzled byte offset of `at` in a tile of rows of `span` bytes (128, 64 or 32), as TMA
// and the wgmma descriptors lay it out (sm90.cuh).
__device__ __forceinline__ uint32_t swizzled(uint32_t at, int span) {
  const uint32_t mask = span == 128 ? 7u : span == 64 ? 3u : 1u;
  return at ^ (((at >> 7) & mask) << 4);
}

template <typename T, int kHeadDim, bool kDqTma>
__global__ void __launch_bounds__(384, 1)
    flash_bwd_sm90_kernel(const FlashBwdParams p, const __grid_constant__ Maps maps) {
#ifdef PYSSM_SM90_DEVICE
  using Tr = Traits<T, kHeadDim>;
  using namespace sm90;
  PYSSM_DYNAMIC_SMEM(raw);
  unsigned char* const smem = raw + ((1024 - smem_u32(raw) % 1024) % 1024);
  uint64_t* const bars = reinterpret_cast<uint64_t*>(smem + Tr::kBars);
  uint64_t* const kv_full = bars;
  uint64_t* const q_full = bars + 1;
  uint64_t* const q_empty = bars + 1 + Tr::kStages;
  auto q_tile = [&](int s) { return smem + Tr::kQ + 2 * s * Tr::kQBytes; };
  auto do_tile = [&](int s) { return q_tile(s) + Tr::kQBytes; };

  const int b = blockIdx.z, hk = blockIdx.y;
  const int64_t n0 = int64_t(blockIdx.x) * Tr::kBlockN;
  const bool packed = p.cu_seqlens != nullptr;
  const flash::SeqSpan seq = flash::seq_span(p, b);
  const int64_t q_start = seq.q_start, Sq = seq.Sq, Sk = seq.Sk;
  if (n0 >= Sk) return;  // the whole block: before any barrier
  const int group = int(p.heads / p.heads_k);
  // the query tiles that see the block's keys: from the one of the first query that sees key
  // n0 (causal, window) to the last query that sees its last key (window)
  const int64_t m_begin = flash::first_query(seq, p, n0, Tr::kBlockM);
  const int64_t m_end = flash::queries_to_visit(seq, p, n0 + Tr::kBlockN - 1);
  const int m_tiles =
      m_begin < m_end ? int((m_end - m_begin + Tr::kBlockM - 1) / Tr::kBlockM) : 0;
  const int n_iters = group * m_tiles;  // (q head, query tile) pairs, q head outer

  if (threadIdx.x == 0) {
    mbar_init(kv_full, 1);
    for (int s = 0; s < Tr::kStages; ++s) {
      mbar_init(&q_full[s], 1);
      mbar_init(&q_empty[s], 256);
    }
    fence_barrier_init();
  }
  __syncthreads();

  const int wg = threadIdx.x / 128;
  // TMA coordinates as in the forward: packed sequences from their first query and key
  const int row0 = int(packed ? q_start : 0);
  const int k_row0 = int(packed ? seq.k_start : flash::k_lead(p, seq, b));
  const int batch = packed ? 0 : b;
  if (wg == 0) {  // producer
    setmaxnreg_dec<24>();
    if (threadIdx.x == 0) {
      mbar_arrive_expect_tx(kv_full, 2 * Tr::kKVBytes);
      tma_load_4d(smem + Tr::kK, &maps.k, 0, hk, k_row0 + int(n0), batch, kv_full);
      tma_load_4d(smem + Tr::kV, &maps.v, 0, hk, k_row0 + int(n0), batch, kv_full);
      if constexpr (Tr::kTail > 0) {
        tma_load_4d(smem + Tr::kK + Tr::kKVMain, &maps.k_tail, 64, hk, k_row0 + int(n0), batch,
                    kv_full);
        tma_load_4d(smem + Tr::kV + Tr::kKVMain, &maps.v_tail, 64, hk, k_row0 + int(n0), batch,
                    kv_full);
      }
      for (int it = 0; it < n_iters; ++it) {
        const int s = it % Tr::kStages;
        const int h = hk * group + it / m_tiles;
        const int m0 = int(m_begin) + (it % m_tiles) * Tr::kBlockM;
        mbar_wait(&q_empty[s], ((it / Tr::kStages) & 1) ^ 1);
        mbar_arrive_expect_tx(&q_full[s], 2 * Tr::kQBytes);
        tma_load_4d(q_tile(s), &maps.q, 0, h, row0 + m0, batch, &q_full[s]);
        tma_load_4d(do_tile(s), &maps.dout, 0, h, row0 + m0, batch, &q_full[s]);
        if constexpr (Tr::kTail > 0) {
          tma_load_4d(q_tile(s) + Tr::kQMain, &maps.q_tail, 64, h, row0 + m0, batch,
                      &q_full[s]);
          tma_load_4d(do_tile(s) + Tr::kQMain, &maps.dout_tail, 64, h, row0 + m0, batch,
                      &q_full[s]);
        }
      }
    }
    return;
  }
  setmaxnreg_inc<240>();

  // consumer cw (0 or 1): keys n0 + 64 cw + [0, 64), dQ columns 32 cw + [0, 32) and
  // 64 + kTailPart cw + [0, kTailPart)
  const int cw = wg - 1;
  const int tid = threadIdx.x % 128;
  const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t key0 = n0 + 64 * cw + 16 * warp + g, key1 = key0 + 8;
  // the queries that see each of this thread's keys, [lo, hi] (int compares in the loop: with
  // the 64-bit bounds written out there the window made ptxas spill 96-180 bytes at hd128)
  int lo0, hi0, lo1, hi1;
  flash::queries_of_key(seq, p, key0, 0, lo0, hi0);
  flash::queries_of_key(seq, p, key1, 0, lo1, hi1);
  const uint32_t k_addr = smem_u32(smem + Tr::kK), v_addr = smem_u32(smem + Tr::kV);
  constexpr float kLog2e = 1.4426950408889634f;

  float dk[kHeadDim / 2], dv[kHeadDim / 2];
#pragma unroll
  for (int i = 0; i < kHeadDim / 2; ++i) dk[i] = dv[i] = 0.f;
  mbar_wait(kv_full, 0);

  // x = A B^T over head_dim for this consumer's 64 rows of `a` (K or V, 128 rows) and the
  // 64 rows of `b` (Q or dO): both K-major, the first block then the tail
  auto products_over_head_dim = [&](float (&x)[32], uint32_t a, uint32_t b) {
#pragma unroll
    for (int ks = 0; ks < Tr::kKSteps; ++ks) {
      const bool tail = ks >= 4;
      const int span = tail ? Tr::kTailSpan : 128;
      const uint32_t a_off = tail ? Tr::kKVMain + 64 * cw * Tr::kTailSpan + (ks - 4) * 32
                                  : 64 * cw * 128 + ks * 32;
      const uint32_t b_off = tail ? Tr::kQMain + (ks - 4) * 32 : ks * 32;
      wgmma_ss<64, T>(x, make_desc_k(a + a_off, span), make_desc_k(b + b_off, span), ks > 0);
    }
  };
  // acc += A B for A (64 x 64 queries, registers) and B = Q or dO MN-major (head_dim columns)
  auto accumulate_over_queries = [&](float (&acc)[kHeadDim / 2], const uint32_t (&a)[4][4],
                                     uint32_t b) {
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
      wgmma_rs<64, T>(*reinterpret_cast<float(*)[32]>(acc), a[ks],
                      make_desc_mn(b + ks * 16 * 128, 0), 1);
      if constexpr (Tr::kTail > 0)
        wgmma_rs<Tr::kTail, T>(*reinterpret_cast<float(*)[Tr::kTail / 2]>(acc + 32), a[ks],
                               make_desc_mn(b + Tr::kQMain + ks * 16 * Tr::kTailSpan, 0,
                                            Tr::kTailSpan),
                               1);
    }
  };

  for (int it = 0; it < n_iters; ++it) {
    const int s = it % Tr::kStages;
    const int h = hk * group + it / m_tiles;
    const int64_t m0 = m_begin + (it % m_tiles) * Tr::kBlockM;
    // lse (log2 domain) and Delta of this thread's 16 query columns: 8i + 2t + {0, 1}
    const int64_t stat = packed ? h * p.total_q + q_start : (int64_t(b) * p.heads + h) * Sq;
    float lse[16], delta[16];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t q = m0 + 8 * i + 2 * t + e;
        lse[2 * i + e] = q < Sq ? p.lse[stat + q] * kLog2e : 0.f;
        delta[2 * i + e] = q < Sq ? p.delta[stat + q] : 0.f;
      }
    const uint32_t q_addr = smem_u32(q_tile(s)), do_addr = smem_u32(do_tile(s));
    mbar_wait<false>(&q_full[s], (it / Tr::kStages) & 1);  // (no register for a bound)

    // S^T and dP^T for this consumer's 64 keys and the tile's 64 queries
    float st[32], dpt[32];
    wgmma_fence();
    products_over_head_dim(st, k_addr, q_addr);
    products_over_head_dim(dpt, v_addr, do_addr);
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(st);
    fence_operands(dpt);

    // P^T and dS^T (element 4i + e: key (e < 2 ? key0 : key1), query m0 + 8i + 2t + (e & 1))
    unsigned char* const ds_buf = smem + Tr::kDs + (it & 1) * Tr::kDsBytes;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = 2 * i + (e & 1);
        const int q = int(m0) + 8 * i + 2 * t + (e & 1);
        const bool visible = e < 2 ? q >= lo0 && q <= hi0 : q >= lo1 && q <= hi1;
        float x = st[4 * i + e], dtanh = 1.f;
        if constexpr (Tr::kSoftcap) {
          if (p.softcap_prescale > 0.f) {  // soft-capping (set_scale): t = tanh, dS (1 - t^2)
            x = flash::softcap_tanh(x * p.softcap_prescale);
            dtanh = 1.f - x * x;
          }
        }
        const float pt = visible ? exp2f(x * p.scale_log2 - lse[c]) : 0.f;
        st[4 * i + e] = pt;
        dpt[4 * i + e] = pt * (dpt[4 * i + e] - delta[c]) * dtanh;
      }
    uint32_t pa[4][4], da[4][4];  // A fragments over the 64 queries, 16 a step
#pragma unroll
    for (int k = 0; k < 4; ++k)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        pa[k][r] = flash::Pack<T>::pack(st[8 * k + 2 * r], st[8 * k + 2 * r + 1]);
        da[k][r] = flash::Pack<T>::pack(dpt[8 * k + 2 * r], dpt[8 * k + 2 * r + 1]);
      }
    // dS^T into shared memory: row = key (this consumer's 64), 64 queries a 128-byte row,
    // swizzled as the MN-major descriptor reads it
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = 64 * cw + 16 * warp + g + 8 * half;
        const uint32_t at = uint32_t(row * 128 + (8 * i + 2 * t) * 2);
        *reinterpret_cast<uint32_t*>(ds_buf + swizzled(at, 128)) = da[i / 2][2 * (i % 2) + half];
      }
    fence_proxy_async();

    // dV += P^T dO, dK += dS^T Q (B MN-major: rows are the queries)
    wgmma_fence();
    accumulate_over_queries(dv, pa, do_addr);
    accumulate_over_queries(dk, da, q_addr);
    wgmma_commit();

    // v2: this consumer's dQ buffer of tile it - 2 has been read by its reduce-adds
    if constexpr (kDqTma) {
      if (tid == 0) bulk_wait_read<1>();
    }
    named_barrier_sync(1, 256);  // both consumers' dS^T is in shared memory

    // dQ = dS K over the block's 128 keys for this consumer's columns: A = dS (dS^T stored,
    // MN-major), B = K's columns (MN-major)
    float dq[16], dq_tail[Tr::kTail ? Tr::kTailPart / 2 : 1];
    const uint32_t ds_addr = smem_u32(ds_buf);
    wgmma_fence();  // (dq's registers were last the previous tile's stores' operands)
#pragma unroll
    for (int ks = 0; ks < Tr::kBlockN / 16; ++ks) {
      const uint64_t a = make_desc_mn(ds_addr + ks * 16 * 128, 0);
      wgmma_ss_tt<32, T>(dq, a, make_desc_mn(k_addr + ks * 16 * 128 + 64 * cw, 0), ks > 0);
      if constexpr (Tr::kTail > 0)
        wgmma_ss_tt<Tr::kTailPart, T>(
            dq_tail, a,
            make_desc_mn(k_addr + Tr::kKVMain + ks * 16 * Tr::kTailSpan + 2 * Tr::kTailPart * cw,
                         0, Tr::kTailSpan),
            ks > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(dq);
    if constexpr (Tr::kTail > 0) fence_operands(dq_tail);
    fence_operands(dk);
    fence_operands(dv);
    mbar_arrive(&q_empty[s]);  // Q and dO are no longer read

    if constexpr (kDqTma) {
      // the parts into shared memory as their maps' boxes (64 rows of 32 columns, 128-byte
      // swizzle; of kTailPart columns, kTailPartSpan-byte), then one thread adds them into
      // the accumulator (rows and columns past the tensor dropped; in a packed batch rows past
      // the sequence are the next one's, and theirs are exact zeros: P = 0)
      unsigned char* const dq_buf = smem + Tr::kDq + (it & 1) * Tr::kDqBytes;
      unsigned char* const main_part = dq_buf + cw * Tr::kDqMain;
      unsigned char* const tail_part = dq_buf + 2 * Tr::kDqMain + cw * Tr::kDqTailPart;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = 16 * warp + g + 8 * half;
#pragma unroll
        for (int i = 0; i < 4; ++i)
          *reinterpret_cast<float2*>(main_part + swizzled(row * 128 + (8 * i + 2 * t) * 4, 128)) =
              make_float2(dq[4 * i + 2 * half], dq[4 * i + 2 * half + 1]);
        if constexpr (Tr::kTail > 0) {
          constexpr int kSpan = Tr::kTailPartSpan;
#pragma unroll
          for (int i = 0; i < Tr::kTailPart / 8; ++i)
            *reinterpret_cast<float2*>(
                tail_part + swizzled(row * kSpan + (8 * i + 2 * t) * 4, kSpan)) =
                make_float2(dq_tail[4 * i + 2 * half], dq_tail[4 * i + 2 * half + 1]);
        }
      }
      fence_proxy_async();
      // the consumer's parts are in shared memory (a constant barrier id: with a computed
      // one ptxas reserves all 16)
      if (cw == 0) named_barrier_sync(2, 128);
      else named_barrier_sync(3, 128);
      if (tid == 0) {
        tma_reduce_add_4d(&maps.dq, 32 * cw, h, row0 + int(m0), batch, main_part);
        if constexpr (Tr::kTail > 0)
          if (64 + Tr::kTailPart * cw < kHeadDim)  // (at 72 consumer 1's do not exist)
            tma_reduce_add_4d(&maps.dq_tail, 64 + Tr::kTailPart * cw, h, row0 + int(m0), batch,
                              tail_part);
        bulk_commit();
      }
    } else {
      const int64_t q_row = p.heads * kHeadDim;
      float* dq_acc = p.dq_accum + ((q_start + m0) * p.heads + h) * kHeadDim;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t r = 16 * warp + g + 8 * half;
        if (m0 + r >= Sq) continue;
#pragma unroll
        for (int i = 0; i < 4; ++i)  // two columns per atomic (red.global.add.v2.f32, sm_90)
          atomicAdd(reinterpret_cast<float2*>(dq_acc + r * q_row + 32 * cw + 8 * i + 2 * t),
                    make_float2(dq[4 * i + 2 * half], dq[4 * i + 2 * half + 1]));
        if constexpr (Tr::kTail > 0)
          if (64 + Tr::kTailPart * cw < kHeadDim)  // (at 72 consumer 1's do not exist)
#pragma unroll
            for (int i = 0; i < Tr::kTailPart / 8; ++i)
              atomicAdd(reinterpret_cast<float2*>(dq_acc + r * q_row + 64 +
                                                  Tr::kTailPart * cw + 8 * i + 2 * t),
                        make_float2(dq_tail[4 * i + 2 * half], dq_tail[4 * i + 2 * half + 1]));
      }
    }
  }
  if constexpr (kDqTma) {
    if (tid == 0) bulk_wait<0>();  // every reduce-add done before the block ends
  }

  // dK (times the softmax scale) and dV
  const int64_t k_start = seq.k_start;
  const int64_t kv_row = p.dkv_row;
  T* dk_out = static_cast<T*>(p.dk) + k_start * kv_row + hk * kHeadDim + 2 * t;
  T* dv_out = static_cast<T*>(p.dv) + k_start * kv_row + hk * kHeadDim + 2 * t;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t key = half ? key1 : key0;
    if (key >= Sk) continue;
#pragma unroll
    for (int i = 0; i < kHeadDim / 8; ++i) {
      *reinterpret_cast<uint32_t*>(dk_out + key * kv_row + 8 * i) = flash::Pack<T>::pack(
          dk[4 * i + 2 * half] * p.scale, dk[4 * i + 2 * half + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dv_out + key * kv_row + 8 * i) =
          flash::Pack<T>::pack(dv[4 * i + 2 * half], dv[4 * i + 2 * half + 1]);
    }
  }
#endif  // PYSSM_SM90_DEVICE
}

// Launcher: the tensor maps, then the portable backward's steps (dQ's accumulator zeroed, Delta)
// before this main kernel and after it (dQ converted). cudaErrorNotSupported where the Hopper
// path cannot run, before anything is launched.
template <typename T, int kHeadDim>
cudaError_t bwd(const FlashBwdParams& p, cudaStream_t stream) {
  using Tr = Traits<T, kHeadDim>;
  if (flash_bwd::bwd_empty(p)) return cudaSuccess;
  if (!flash_bwd::bwd_args_ok(p)) return cudaErrorInvalidValue;
  if (p.softcap_prescale > 0.f && !Tr::kSoftcap) return cudaErrorNotSupported;
  const bool packed = p.cu_seqlens != nullptr;
  const uint64_t q_tokens = packed ? uint64_t(p.total_q) : uint64_t(p.seqlen_q);
  const uint64_t k_tokens = packed ? uint64_t(p.total_k) : uint64_t(p.seqlen_k);
  const uint64_t batches = packed ? 1 : uint64_t(p.batch);
  if (q_tokens + 256 > (uint64_t(1) << 31) || k_tokens + 256 > (uint64_t(1) << 31) ||
      q_tokens == 0 || k_tokens == 0)
    return cudaErrorNotSupported;
  Maps maps;
  const uint64_t hq = uint64_t(p.heads), hk = uint64_t(p.heads_k);
  // q, k and v at their layouts; dout (like dq_accum below) contiguous
  const TokenLayout &ql = p.q_layout, &kvl = p.kv_layout;
  const TokenLayout ol = sm90::contiguous_layout(p.heads, kHeadDim, int64_t(q_tokens));
  auto make = [&](CUtensorMap* map, const void* base, uint64_t heads, const TokenLayout& l,
                  uint64_t tokens, int cols, int rows) {
    return sm90::make_token_map<T>(map, base, kHeadDim, heads, l, tokens, batches, cols, rows);
  };
  constexpr int kM = Tr::kBlockM, kN = Tr::kBlockN, kTc = Tr::kTailCols;
  cudaError_t err = make(&maps.k, p.k, hk, kvl, k_tokens, 64, kN);
  if (err == cudaSuccess) err = make(&maps.v, p.v, hk, kvl, k_tokens, 64, kN);
  if (err == cudaSuccess) err = make(&maps.q, p.q, hq, ql, q_tokens, 64, kM);
  if (err == cudaSuccess) err = make(&maps.dout, p.dout, hq, ol, q_tokens, 64, kM);
  if (Tr::kTail > 0) {
    if (err == cudaSuccess) err = make(&maps.k_tail, p.k, hk, kvl, k_tokens, kTc, kN);
    if (err == cudaSuccess) err = make(&maps.v_tail, p.v, hk, kvl, k_tokens, kTc, kN);
    if (err == cudaSuccess) err = make(&maps.q_tail, p.q, hq, ql, q_tokens, kTc, kM);
    if (err == cudaSuccess) err = make(&maps.dout_tail, p.dout, hq, ol, q_tokens, kTc, kM);
  } else {
    maps.k_tail = maps.v_tail = maps.q_tail = maps.dout_tail = maps.q;  // (not read)
  }
  if (err == cudaSuccess && !p.dq_atomics) {
    err = sm90::make_token_map<float>(&maps.dq, p.dq_accum, kHeadDim, hq, ol, q_tokens,
                                      batches, 32, kM);
    if (err == cudaSuccess && Tr::kTail > 0)
      err = sm90::make_token_map<float>(&maps.dq_tail, p.dq_accum, kHeadDim, hq, ol,
                                        q_tokens, batches, Tr::kTailPart, kM);
    if (Tr::kTail == 0) maps.dq_tail = maps.dq;  // (not read)
  }
  if (err == cudaSuccess) err = flash_bwd::bwd_before<T, kHeadDim>(p, stream);
  if (err != cudaSuccess) return err;
  if (p.seqlen_k > 0) {
    const dim3 grid(unsigned((p.seqlen_k + Tr::kBlockN - 1) / Tr::kBlockN), unsigned(p.heads_k),
                    unsigned(p.batch));
    err = p.dq_atomics
              ? launch_kernel(flash_bwd_sm90_kernel<T, kHeadDim, false>, grid, dim3(Tr::kThreads),
                              Tr::kSmem, stream, p, maps)
              : launch_kernel(flash_bwd_sm90_kernel<T, kHeadDim, true>, grid, dim3(Tr::kThreads),
                              Tr::kSmem, stream, p, maps);
    if (err != cudaSuccess) return err;
  }
  return flash_bwd::bwd_after<T, kHeadDim>(p, stream);
}

}  // namespace flash_bwd_sm90
}  // namespace pyssm
