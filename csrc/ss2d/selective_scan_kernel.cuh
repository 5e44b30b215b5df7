// CUDA selective scan, forward and backward (DESIGN.md "selective_scan"): the kernels, as
// templates over the input type T and the largest d_state kMaxN. Per channel c, state n:
//   h_l = a_l h_{l-1} + b_l,   a_l = exp(dt_l A_cn),   b_l = dt_l B_gnl u_l
//   y_l = sum_n C_gnl h_l + D_c u_l
//
// One block of kThreads threads per (batch, channel) row walks L in tiles of kTile positions;
// thread t owns kItems consecutive positions of a tile (at d_state 1 it loads the next tile's
// inputs before computing this one, so the loads' latency overlaps the compute). A linear
// recurrence is a scan over (a, b) pairs composed as (a1, b1) then (a2, b2) =
// (a1 a2, a2 b1 + b2): each thread composes
// its items, a block scan (warp shuffles, then the kWarps warp totals through shared memory)
// gives each thread the state entering its items, and the state leaving the tile carries into
// the next. State and arithmetic are in acc_t (float; double for double input).
//
// Backward, v2: a block takes up to kMaxChannelsPerBlock channels of one (batch, group). A first
// pass stores, channel by channel, the state entering every tile (`carries`); then tiles run
// from the last to the first, and in each tile the block's channels one after another,
// recomputing h inside the tile from its carry and running the adjoint recurrence backwards
// with the same block scan in reverse thread order:
//   q_l = a_l (dy_l C_l + q_{l+1}),   g_l = dy_l C_l + q_{l+1} = dLoss/dh_l.
// dB and dC, which the channels of a group share, are summed over the block's channels in each
// thread's registers (its positions are the same in every channel) and added with one atomic a
// (state, position) a block: v1 took one channel a block and added every channel's share, 96
// contended atomics a position at VMamba's group size (csrc/ss2d/NOTES.md). d_state above 4
// keeps v1's way (2 N kItems registers of sums would not fit). Per-channel gradients (dA, dD,
// dbias) are summed per tile into shared memory and written once per row.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>

#include "kernel_launch.cuh"
#include "ss2d/scan_math.cuh"
#include "ss2d/selective_scan.cuh"

namespace pyssm {
namespace scan {

constexpr int kThreads = 128;
constexpr int kTile = kSelectiveScanTile;
constexpr int kItems = kTile / kThreads;
static_assert(kItems * kThreads == kTile, "the tile must split evenly over the threads");
constexpr int kWarps = kThreads / 32;

// h -> a h + b
template <typename acc_t>
struct Step {
  acc_t a, b;
};

// first x, then y
template <typename acc_t>
__device__ __forceinline__ Step<acc_t> then(Step<acc_t> x, Step<acc_t> y) {
  return {x.a * y.a, y.a * x.b + y.b};
}

template <typename acc_t>
struct ScanSmem {
  Step<acc_t> warp[kWarps];
};

// The state entering this thread's items, given `mine` (its items composed in scan order) and
// `carry` (the state entering the tile), which it advances to the state leaving the tile.
// kReverse scans from the last thread to the first (the adjoint recurrence). Every thread of
// the block must call it; it ends with a barrier so the shared memory can be reused.
template <bool kReverse, typename acc_t>
__device__ __forceinline__ acc_t block_scan(Step<acc_t> mine, acc_t& carry,
                                           ScanSmem<acc_t>& smem) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  Step<acc_t> incl = mine;  // inclusive scan within the warp, in scan order
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    Step<acc_t> other;
    if (kReverse) {
      other.a = __shfl_down_sync(0xffffffffu, incl.a, d);
      other.b = __shfl_down_sync(0xffffffffu, incl.b, d);
      if (lane + d < 32) incl = then(other, incl);
    } else {
      other.a = __shfl_up_sync(0xffffffffu, incl.a, d);
      other.b = __shfl_up_sync(0xffffffffu, incl.b, d);
      if (lane >= d) incl = then(other, incl);
    }
  }
  Step<acc_t> excl;  // the inclusive scan of the previous lane in scan order
  excl.a = kReverse ? __shfl_down_sync(0xffffffffu, incl.a, 1)
                    : __shfl_up_sync(0xffffffffu, incl.a, 1);
  excl.b = kReverse ? __shfl_down_sync(0xffffffffu, incl.b, 1)
                    : __shfl_up_sync(0xffffffffu, incl.b, 1);
  const bool first_lane = kReverse ? lane == 31 : lane == 0;
  if (first_lane) excl = {acc_t(1), acc_t(0)};
  if (kReverse ? lane == 0 : lane == 31) smem.warp[warp] = incl;  // the warp's total
  __syncthreads();
  acc_t h = carry, h_in = carry;
#pragma unroll
  for (int i = 0; i < kWarps; ++i) {
    const int w = kReverse ? kWarps - 1 - i : i;
    if (w == warp) h_in = excl.a * h + excl.b;
    h = smem.warp[w].a * h + smem.warp[w].b;
  }
  carry = h;
  __syncthreads();
  return h_in;
}

// Adds v over the block into *total (shared memory), one shared atomic a warp.
template <typename acc_t>
__device__ __forceinline__ void block_add(acc_t v, acc_t* total) {
#pragma unroll
  for (int d = 16; d > 0; d /= 2) v += __shfl_down_sync(0xffffffffu, v, d);
  if (threadIdx.x % 32 == 0) atomicAdd(total, v);
}

// What a block needs of its (batch, channel) row.
template <typename T>
struct Row {
  using acc_t = typename Acc<T>::type;
  const T *u, *delta, *B, *C;  // B, C: (N, L) of this row's group
  acc_t D, bias;
  int64_t bc, length, dstate;

  __device__ Row(const SelectiveScanParams& p, int64_t row) {
    bc = row;
    const int64_t b = bc / p.channels, c = bc % p.channels;
    const int64_t g = c / (p.channels / p.groups);
    length = p.length;
    dstate = p.dstate;
    u = static_cast<const T*>(p.u) + bc * length;
    delta = static_cast<const T*>(p.delta) + bc * length;
    B = static_cast<const T*>(p.B) + (b * p.groups + g) * dstate * length;
    C = static_cast<const T*>(p.C) + (b * p.groups + g) * dstate * length;
    D = p.D ? static_cast<const acc_t*>(p.D)[c] : acc_t(0);
    bias = p.delta_bias ? static_cast<const acc_t*>(p.delta_bias)[c] : acc_t(0);
  }

  // The forward's inputs at this thread's items of the tile at t0, as stored (past L: the
  // row's first value, which widen() below never uses): loaded a tile ahead of their use, so
  // that the next tile's loads are in flight while this one is computed.
  template <int kMaxN>
  struct Raw {
    T u[kItems], delta[kItems];
    T B[kMaxN == 1 ? kItems : 1], C[kMaxN == 1 ? kItems : 1];  // d_state 1's B and C too
  };
  template <int kMaxN>
  __device__ void fetch(int64_t t0, Raw<kMaxN>& r) const {
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t l = t0 + threadIdx.x * kItems + i;
      const int64_t at = l < length ? l : 0;
      r.u[i] = u[at];
      r.delta[i] = delta[at];
      if constexpr (kMaxN == 1) {
        r.B[i] = B[at];
        r.C[i] = C[at];
      }
    }
  }
  // u and dt from fetched values; dt = 0 (the identity step) past L
  template <int kMaxN>
  __device__ void widen_raw(int64_t t0, const Raw<kMaxN>& r, acc_t (&uu)[kItems],
                            acc_t (&dt)[kItems], acc_t (&raw)[kItems], bool softplus_on) const {
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t l = t0 + threadIdx.x * kItems + i;
      const bool ok = l < length;
      uu[i] = ok ? widen(r.u[i]) : acc_t(0);
      raw[i] = ok ? widen(r.delta[i]) + bias : acc_t(0);
      dt[i] = ok ? (softplus_on ? softplus(raw[i]) : raw[i]) : acc_t(0);
    }
  }

  // u and dt at this thread's items of the tile at t0; dt = 0 (the identity step) past L
  __device__ void load(int64_t t0, acc_t (&uu)[kItems], acc_t (&dt)[kItems],
                       acc_t (&raw)[kItems], bool softplus_on) const {
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t l = t0 + threadIdx.x * kItems + i;
      const bool ok = l < length;
      uu[i] = ok ? widen(u[l]) : acc_t(0);
      raw[i] = ok ? widen(delta[l]) + bias : acc_t(0);
      dt[i] = ok ? (softplus_on ? softplus(raw[i]) : raw[i]) : acc_t(0);
    }
  }
};

// kLastState: also write the state after the last position (p.last_state).
template <typename T, int kMaxN, bool kLastState>
__global__ void __launch_bounds__(kThreads)
    selective_scan_fwd_kernel(const SelectiveScanParams p) {
  using acc_t = typename Acc<T>::type;
  __shared__ ScanSmem<acc_t> smem;
  const Row<T> row(p, blockIdx.x);
  const acc_t* A = static_cast<const acc_t*>(p.A) + (row.bc % p.channels) * p.dstate;
  acc_t* out = static_cast<acc_t*>(p.out) + row.bc * p.length;
  acc_t Ac[kMaxN], carry[kMaxN];
#pragma unroll
  for (int n = 0; n < kMaxN; ++n) {
    Ac[n] = n < p.dstate ? A[n] : acc_t(0);
    carry[n] = 0;
  }
  // d_state 1 (VMamba v2's) loads the next tile while it computes this one (64 registers, 8
  // blocks an SM); larger states load each tile at its start (at 16, prefetching took 147
  // registers against 80)
  constexpr bool kPrefetch = kMaxN == 1;
  typename Row<T>::template Raw<kMaxN> next, cur;  // next: the tile after this one, in flight
  if (kPrefetch && p.length > 0) row.fetch(0, next);
  for (int64_t t0 = 0; t0 < p.length; t0 += kTile) {
    acc_t uu[kItems], dt[kItems], raw[kItems], y[kItems];
    if constexpr (kPrefetch) {
      cur = next;
      if (t0 + kTile < p.length) row.fetch(t0 + kTile, next);
      row.widen_raw(t0, cur, uu, dt, raw, p.delta_softplus);
    } else {
      row.load(t0, uu, dt, raw, p.delta_softplus);
    }
#pragma unroll
    for (int i = 0; i < kItems; ++i) y[i] = row.D * uu[i];
#pragma unroll
    for (int n = 0; n < kMaxN; ++n) {
      if (n >= p.dstate) break;  // the same for the whole block: no thread skips a barrier
      acc_t a[kItems], bx[kItems];
      Step<acc_t> mine{acc_t(1), acc_t(0)};
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int64_t l = t0 + threadIdx.x * kItems + i;
        a[i] = exp_(dt[i] * Ac[n]);
        if constexpr (kPrefetch)
          bx[i] = l < p.length ? dt[i] * widen(cur.B[i]) * uu[i] : acc_t(0);
        else
          bx[i] = l < p.length ? dt[i] * widen(row.B[n * p.length + l]) * uu[i] : acc_t(0);
        mine = then(mine, Step<acc_t>{a[i], bx[i]});
      }
      acc_t h = block_scan<false>(mine, carry[n], smem);
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int64_t l = t0 + threadIdx.x * kItems + i;
        h = a[i] * h + bx[i];
        if constexpr (kPrefetch) {
          if (l < p.length) y[i] += widen(cur.C[i]) * h;
        } else {
          if (l < p.length) y[i] += widen(row.C[n * p.length + l]) * h;
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t l = t0 + threadIdx.x * kItems + i;
      if (l < p.length) out[l] = y[i];
    }
  }
  if constexpr (kLastState) {  // every thread holds the state leaving the last tile
    if (threadIdx.x == 0) {
      acc_t* last = static_cast<acc_t*>(p.last_state) + row.bc * p.dstate;
#pragma unroll
      for (int n = 0; n < kMaxN; ++n)
        if (n < p.dstate) last[n] = carry[n];
    }
  }
}

// d_state up to this sums dB and dC over a block's channels in registers; larger ones take
// one channel a block and add them with atomics (as v1 did for every d_state).
constexpr int kMaxNSummed = 4;

// Blocks per SM the backward asks ptxas to fit (nvcc 13.0, float accumulation): d_state 1 fits 5
// in 96 registers without spilling (left free it took 128); the others are left free (4: ~187,
// 8: ~167, 16: ~155, against 228 for v1's 16; capped lower, 16 spilled on some archs).
template <typename acc_t>
constexpr int bwd_min_blocks(int max_n) {
  return sizeof(acc_t) == 4 && max_n == 1 ? 5 : 1;
}

// Block: channels c_first .. c_first + nch - 1 of one (batch, group) (bp.channels_per_block of
// them; see the file comment). kLastState: the adjoint enters the last position with the last
// state's gradient (bp.dlast_state) instead of 0.
template <typename T, int kMaxN, bool kLastState>
__global__ void __launch_bounds__(kThreads, bwd_min_blocks<typename Acc<T>::type>(kMaxN))
    selective_scan_bwd_kernel(const SelectiveScanBwdParams bp) {
  using acc_t = typename Acc<T>::type;
  constexpr bool kSummed = kMaxN <= kMaxNSummed;
  const SelectiveScanParams& p = bp.fwd;
  __shared__ ScanSmem<acc_t> smem;
  __shared__ acc_t q_carry_s[kMaxChannelsPerBlock][kMaxN];  // each channel's adjoint carry
  __shared__ acc_t sums_s[kMaxChannelsPerBlock][kMaxN + 2];  // its dA (N), dD, dbias
  const int64_t L = p.length, N = p.dstate, per_group = p.channels / p.groups;
  const int64_t cpb = bp.channels_per_block;
  const int64_t blocks_per_group = (per_group + cpb - 1) / cpb;
  const int64_t bg = blockIdx.x / blocks_per_group;  // b * groups + g
  const int64_t b = bg / p.groups, g = bg % p.groups;
  const int64_t c_first = g * per_group + (blockIdx.x % blocks_per_group) * cpb;
  const int nch = int(per_group - (c_first - g * per_group) < cpb
                          ? per_group - (c_first - g * per_group) : cpb);
  const int64_t tiles = (L + kTile - 1) / kTile;
  acc_t* dB = static_cast<acc_t*>(bp.dB) + bg * N * L;
  acc_t* dC = static_cast<acc_t*>(bp.dC) + bg * N * L;

  // Pass 1, channel by channel: the state entering every tile.
  for (int j = 0; j < nch; ++j) {
    const Row<T> row(p, b * p.channels + c_first + j);
    const acc_t* A = static_cast<const acc_t*>(p.A) + (c_first + j) * N;
    acc_t* carries = static_cast<acc_t*>(bp.carries) + row.bc * tiles * N;
    acc_t Ac[kMaxN], h_carry[kMaxN];
#pragma unroll
    for (int n = 0; n < kMaxN; ++n) {
      Ac[n] = n < N ? A[n] : acc_t(0);
      h_carry[n] = 0;
    }
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t t0 = tile * kTile;
      acc_t uu[kItems], dt[kItems], raw[kItems];
      row.load(t0, uu, dt, raw, p.delta_softplus);
#pragma unroll
      for (int n = 0; n < kMaxN; ++n) {
        if (n >= N) break;
        if (threadIdx.x == 0) carries[tile * N + n] = h_carry[n];
        Step<acc_t> mine{acc_t(1), acc_t(0)};
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          const int64_t l = t0 + threadIdx.x * kItems + i;
          const acc_t bx = l < L ? dt[i] * widen(row.B[n * L + l]) * uu[i] : acc_t(0);
          mine = then(mine, Step<acc_t>{exp_(dt[i] * Ac[n]), bx});
        }
        block_scan<false>(mine, h_carry[n], smem);
      }
    }
  }
  for (int i = threadIdx.x; i < kMaxChannelsPerBlock * kMaxN; i += kThreads) {
    acc_t q_end = 0;  // q past the last position: dLoss/dh_{L-1} from outside the outputs
    if constexpr (kLastState) {
      const int j = i / kMaxN, n = i % kMaxN;
      if (j < nch && n < N)
        q_end = static_cast<const acc_t*>(bp.dlast_state)[(b * p.channels + c_first + j) * N + n];
    }
    (&q_carry_s[0][0])[i] = q_end;
  }
  for (int i = threadIdx.x; i < kMaxChannelsPerBlock * (kMaxN + 2); i += kThreads)
    (&sums_s[0][0])[i] = 0;
  __syncthreads();  // the carries thread 0 wrote, and the zeroed sums

  // Pass 2: tiles from the last, the adjoint running backwards; in each tile the block's
  // channels one after the other, dB and dC summed over them.
  for (int64_t tile = tiles - 1; tile >= 0; --tile) {
    const int64_t t0 = tile * kTile;
    acc_t dB_sum[kSummed ? kMaxN : 1][kItems], dC_sum[kSummed ? kMaxN : 1][kItems];
#pragma unroll
    for (int n = 0; n < (kSummed ? kMaxN : 1); ++n)
#pragma unroll
      for (int i = 0; i < kItems; ++i) dB_sum[n][i] = dC_sum[n][i] = 0;
    for (int j = 0; j < nch; ++j) {
      const Row<T> row(p, b * p.channels + c_first + j);
      const acc_t* A = static_cast<const acc_t*>(p.A) + (c_first + j) * N;
      const acc_t* dout = static_cast<const acc_t*>(bp.dout) + row.bc * L;
      const acc_t* carries = static_cast<const acc_t*>(bp.carries) + row.bc * tiles * N;
      acc_t uu[kItems], dt[kItems], raw[kItems], dy[kItems], du_i[kItems], ddt[kItems];
      row.load(t0, uu, dt, raw, p.delta_softplus);
      acc_t dD = 0;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int64_t l = t0 + threadIdx.x * kItems + i;
        dy[i] = l < L ? dout[l] : acc_t(0);
        du_i[i] = row.D * dy[i];
        ddt[i] = 0;
        dD += dy[i] * uu[i];
      }
#pragma unroll
      for (int n = 0; n < kMaxN; ++n) {
        if (n >= N) break;
        const acc_t An = A[n];
        acc_t a[kItems], Bv[kItems], Cv[kItems], h_prev[kItems], h_cur[kItems];
        Step<acc_t> fwd{acc_t(1), acc_t(0)};
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          const int64_t l = t0 + threadIdx.x * kItems + i;
          a[i] = exp_(dt[i] * An);
          Bv[i] = l < L ? widen(row.B[n * L + l]) : acc_t(0);
          Cv[i] = l < L ? widen(row.C[n * L + l]) : acc_t(0);
          fwd = then(fwd, Step<acc_t>{a[i], dt[i] * Bv[i] * uu[i]});
        }
        acc_t h_tile = carries[tile * N + n];
        acc_t h = block_scan<false>(fwd, h_tile, smem);
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          h_prev[i] = h;
          h = a[i] * h + dt[i] * Bv[i] * uu[i];
          h_cur[i] = h;
        }
        // q_l = a_l (dy_l C_l + q_{l+1}): this thread's items composed from its last to its
        // first
        Step<acc_t> bwd{acc_t(1), acc_t(0)};
#pragma unroll
        for (int i = kItems - 1; i >= 0; --i)
          bwd = then(bwd, Step<acc_t>{a[i], a[i] * dy[i] * Cv[i]});
        acc_t q_carry = q_carry_s[j][n];
        acc_t q = block_scan<true>(bwd, q_carry, smem);  // q_{l+1} after this thread's last item
        if (threadIdx.x == 0) q_carry_s[j][n] = q_carry;  // (read again one tile later)
        acc_t dA = 0;
#pragma unroll
        for (int i = kItems - 1; i >= 0; --i) {
          const int64_t l = t0 + threadIdx.x * kItems + i;
          const acc_t grad_h = dy[i] * Cv[i] + q;  // dLoss/dh_l
          if (l < L) {
            if constexpr (kSummed) {
              dC_sum[n][i] += dy[i] * h_cur[i];
              dB_sum[n][i] += grad_h * dt[i] * uu[i];
            } else {
              atomicAdd(dC + n * L + l, dy[i] * h_cur[i]);
              atomicAdd(dB + n * L + l, grad_h * dt[i] * uu[i]);
            }
            ddt[i] += grad_h * (An * a[i] * h_prev[i] + Bv[i] * uu[i]);
            dA += grad_h * dt[i] * a[i] * h_prev[i];
            du_i[i] += grad_h * dt[i] * Bv[i];
          }
          q = a[i] * grad_h;
        }
        block_add(dA, &sums_s[j][n]);
      }
      acc_t* du = static_cast<acc_t*>(bp.du) + row.bc * L;
      acc_t* ddelta = static_cast<acc_t*>(bp.ddelta) + row.bc * L;
      acc_t dbias = 0;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int64_t l = t0 + threadIdx.x * kItems + i;
        if (l < L) {
          if (p.delta_softplus) ddt[i] *= sigmoid(raw[i]);
          ddelta[l] = ddt[i];
          du[l] = du_i[i];
          dbias += ddt[i];
        }
      }
      block_add(dD, &sums_s[j][kMaxN]);
      block_add(dbias, &sums_s[j][kMaxN + 1]);
    }
    if constexpr (kSummed) {  // one atomic a (state, position) for the block's channels
#pragma unroll
      for (int n = 0; n < kMaxN; ++n) {
        if (n >= N) break;
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          const int64_t l = t0 + threadIdx.x * kItems + i;
          if (l < L) {
            atomicAdd(dC + n * L + l, dC_sum[n][i]);
            atomicAdd(dB + n * L + l, dB_sum[n][i]);
          }
        }
      }
    }
  }
  __syncthreads();  // every warp's shared atomics are in
  // Per-channel sums, written once per row (summed over batch by the caller).
  for (int i = threadIdx.x; i < nch * (N + 2); i += kThreads) {
    const int j = i / int(N + 2), k = i % int(N + 2);
    const int64_t bc = b * p.channels + c_first + j;
    if (k < N)
      static_cast<acc_t*>(bp.dA_part)[bc * N + k] = sums_s[j][k];
    else if (k == N)
      static_cast<acc_t*>(bp.dD_part)[bc] = sums_s[j][kMaxN];
    else
      static_cast<acc_t*>(bp.dbias_part)[bc] = sums_s[j][kMaxN + 1];
  }
}

inline int64_t rows(const SelectiveScanParams& p) { return p.batch * p.channels; }

template <typename T, int kMaxN>
cudaError_t launch_fwd(const SelectiveScanParams& p, cudaStream_t stream) {
  if (p.last_state != nullptr)
    return launch_kernel(selective_scan_fwd_kernel<T, kMaxN, true>, dim3(unsigned(rows(p))),
                         dim3(kThreads), 0, stream, p);
  return launch_kernel(selective_scan_fwd_kernel<T, kMaxN, false>, dim3(unsigned(rows(p))),
                       dim3(kThreads), 0, stream, p);
}

// Channels a backward block takes: the most (up to kMaxChannelsPerBlock, or
// p.channels_per_block when set) that still give every SM a few blocks; one past kMaxNSummed.
template <int kMaxN>
cudaError_t bwd_channels_per_block(const SelectiveScanBwdParams& p, int64_t* out) {
  const SelectiveScanParams& f = p.fwd;
  const int64_t per_group = f.channels / f.groups;
  int64_t cpb = p.channels_per_block;
  if (cpb < 0 || cpb > kMaxChannelsPerBlock) return cudaErrorInvalidValue;
  if (kMaxN > kMaxNSummed) {
    cpb = 1;
  } else if (cpb == 0) {
    int device = 0, sms = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount,
                                                         device);
    if (err != cudaSuccess) return err;
    cpb = kMaxChannelsPerBlock;
    const int64_t groups = f.batch * f.groups;
    while (cpb > 1 && groups * ((per_group + cpb - 1) / cpb) < 4 * int64_t(sms)) cpb /= 2;
  }
  *out = cpb < per_group ? cpb : per_group;
  return cudaSuccess;
}

template <typename T, int kMaxN>
cudaError_t launch_bwd(const SelectiveScanBwdParams& p, cudaStream_t stream) {
  SelectiveScanBwdParams q = p;
  cudaError_t err = bwd_channels_per_block<kMaxN>(p, &q.channels_per_block);
  if (err != cudaSuccess) return err;
  const SelectiveScanParams& f = p.fwd;
  const int64_t per_group = f.channels / f.groups;
  const int64_t blocks =
      f.batch * f.groups * ((per_group + q.channels_per_block - 1) / q.channels_per_block);
  if (blocks > INT_MAX) return cudaErrorInvalidValue;
  if (p.dlast_state != nullptr)
    return launch_kernel(selective_scan_bwd_kernel<T, kMaxN, true>, dim3(unsigned(blocks)),
                         dim3(kThreads), 0, stream, q);
  return launch_kernel(selective_scan_bwd_kernel<T, kMaxN, false>, dim3(unsigned(blocks)),
                       dim3(kThreads), 0, stream, q);
}

// d_state 1 has its own instantiation (no state arrays, no loop); 2..16 round up to 4, 8, 16.
template <typename T>
cudaError_t fwd(const SelectiveScanParams& p, cudaStream_t stream) {
  if (rows(p) == 0 || p.length == 0) return cudaSuccess;
  if (rows(p) > INT_MAX || p.dstate < 1 || p.dstate > kSelectiveScanMaxState)
    return cudaErrorInvalidValue;
  if (p.dstate == 1) return launch_fwd<T, 1>(p, stream);
  if (p.dstate <= 4) return launch_fwd<T, 4>(p, stream);
  if (p.dstate <= 8) return launch_fwd<T, 8>(p, stream);
  return launch_fwd<T, 16>(p, stream);
}

template <typename T>
cudaError_t bwd(const SelectiveScanBwdParams& p, cudaStream_t stream) {
  const SelectiveScanParams& f = p.fwd;
  if (rows(f) == 0 || f.length == 0) return cudaSuccess;
  if (rows(f) > INT_MAX || f.dstate < 1 || f.dstate > kSelectiveScanMaxState)
    return cudaErrorInvalidValue;
  if (f.dstate == 1) return launch_bwd<T, 1>(p, stream);
  if (f.dstate <= 4) return launch_bwd<T, 4>(p, stream);
  if (f.dstate <= 8) return launch_bwd<T, 8>(p, stream);
  return launch_bwd<T, 16>(p, stream);
}

}  // namespace scan
}  // namespace pyssm
