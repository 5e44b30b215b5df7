// Fused CUDA SS2D backward v3: the d_state-1 path (VMamba v2's configurations). Three
// launches, as v1 (ss2d_bwd_kernel.cuh): a summary pass (the state entering every tile from
// zero and the dt summed before it, each chunk's decay, end state and adjoint summary;
// n1_kernel<..., true>, or v1's summary_kernel when p.n1_summary is false), v1's
// carry kernel (each chunk's entering state and adjoint from the right), the main pass
// (n1_kernel<..., false>). The summary pass is the main kernel's loads, sweep 1 and chains,
// tiles first to last; it writes the tile states where v1's 16-position tiles would have them.
// Given the forward's states (p.states: the state entering every tile, kept by the forward v3
// in training) and one chunk, the main kernel starts each tile from them and runs alone: no
// summary pass (about a fifth of this backward's time by the notes' estimate), no carries.
//
// v1's main kernel gives each channel one thread that walks its chunk's positions backwards,
// with h and dt of a 16-position tile in shared memory: a serial chain per thread, as v2's
// forward had. v3 lays a block out as the forward v3 does: 32 channels (one per lane) x 8
// warps, tiles of 64 positions with 8 consecutive ones a warp, tiles from the chunk's last to
// its first, the next one loaded by cp.async while this one computes. Per tile:
//   1. sweep 1 (each warp over its 8 positions): delta, its softplus and sigmoid, the decay
//      a = exp(delta A) and the input delta u B, kept in registers; the warp's forward
//      composition (product of decays, state from zero) and its adjoint composition from the
//      right (the adjoint a_first g_first it passes left from zero);
//   2. the 8 warps chained through shared memory: the state entering each warp (from the tile's
//      entering state) and the adjoint entering it from the right (from the tile's right
//      neighbour), every thread chaining all 8;
//   3. sweep 2, right to left: g_l = dy_l C_l + a_{l+1} g_{l+1}, h recomputed from the
//      warp's entering state, and the gradients: du (staged, then 16-byte atomics into dx),
//      dA, dDs, dbias and dt_projs_weight summed in registers over the chunk, and the terms
//      of dB, dC and the delta part of dz written per (position, channel);
//   4. those terms summed over the block's 32 channels, 4 threads a position (8 channels
//      each, then two shuffles), into dz (plain adds with one channel block, atomics between
//      several).
// The per-channel sums go through shared memory across the 8 warps once, at the chunk's end.
//
// dt_rank over 16 (kMaxR 0; VMamba-T/S stages 3-4 at 24 and 48, B's at 32 and 64): the
// register variants' dt_projs_weight and its gradient (2 R registers) and the R sums over
// channels a position do not fit. There dt_projs_weight stays in shared memory (sweep 1 reads
// it as the forward's dt_rank > 32 variant does), and sweep 2 writes the gradient of delta's
// pre-activation (dpre) of every (direction, pixel, channel) to p.dpre; the caller forms
// dt_projs_weight's gradient (dpre^T dt) and dz's dt part (dpre dt_projs_weight) from it with
// two batched GEMMs. Step 4 then sums only the dB and dC terms.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cp_async.cuh"
#include "ss2d/ss2d_bwd_kernel.cuh"  // summary_kernel, carry_kernel, summary, tile_states, ...
#include "ss2d/ss2d_n1_kernel.cuh"   // Vec16, Pair, add4, kN1*

namespace pyssm {
namespace ss2d_bwd {

using ss2d::add4;
using ss2d::kN1Lanes;
using ss2d::kN1Steps;
using ss2d::kN1Threads;
using ss2d::kN1Tile;
using ss2d::kN1Warps;
using ss2d::Vec16;

constexpr int kV1Tile = int(ss2d_bwd_tile(1));  // the summary kernel's tile (16 positions)
static_assert(kN1Tile % kV1Tile == 0, "a v3 tile is a whole number of the summary's tiles");

template <typename acc_t>
struct alignas(4 * sizeof(acc_t)) Segment {
  acc_t P, H, S, unused;  // product of decays, state from zero, adjoint passed left from zero
};

// kMaxR: dt_projs_weight and its gradient in registers for dt_rank up to kMaxR (8, 16); 0: in
// shared memory, and dpre written out for the caller's GEMMs (any dt_rank).
// kSummary: the summary pass instead (tiles first to last: the state entering every tile from
// zero and the dt summed before it, at the tiles where v1's summary would write them, and the
// chunk's decay, end state and adjoint summary), which needs only sweep 1 and the chains.
// kGiven (not with kSummary): the main pass from the forward's states (p.states, one chunk), no
// summaries read; a variant of its own so that the summaries' path keeps its registers (the
// runtime choice cost the dt_rank-8 bf16 kernel 12 more bytes of spills each way on sm_90a).
template <typename T, int kMaxR, bool kSummary, bool kGiven = false>
__global__ void __launch_bounds__(kN1Lanes* kN1Warps, (sizeof(typename Acc<T>::type) == 4 ? 2 : 1))
    n1_kernel(const Ss2dBwdParams p) {
  using acc_t = typename Acc<T>::type;
  constexpr int kVec = Vec16<acc_t>::n;
  constexpr int kXVec = 16 / int(sizeof(T));
  constexpr int kRed = kSs2dBwdN1RedStride;
  constexpr bool kWide = kMaxR == 0;  // dt_projs_weight in shared memory, dpre written out
  PYSSM_DYNAMIC_SMEM(smem_raw);
  const int64_t H = p.height, W = p.width, L = H * W, D = p.dim;
  const int R = int(p.rank), zw = R + 2;
  const Ss2dBwdN1Layout lay = ss2d_bwd_n1_layout(R, sizeof(T), sizeof(acc_t));
  // compile-time where dt_projs_weight is in registers (the layout pads dt to kMaxR there)
  const int rpad = kWide ? lay.rpad : kMaxR;
  const int zstride = kWide ? lay.zstride : kMaxR + kVec;
  acc_t* zs = reinterpret_cast<acc_t*>(smem_raw + lay.z);          // (2, tile, zstride)
  T* xs = reinterpret_cast<T*>(smem_raw + lay.x);                  // (2, tile, 32)
  unsigned char* dys = smem_raw + lay.dy;                          // (2, tile, 32) dy's type
  Segment<acc_t>* seg = reinterpret_cast<Segment<acc_t>*>(smem_raw + lay.seg);  // (warps, 32)
  acc_t* red = reinterpret_cast<acc_t*>(smem_raw + lay.red);       // (3, tile, kRed)
  acc_t* dus = reinterpret_cast<acc_t*>(smem_raw + lay.du);        // (tile, 32)
  acc_t* ws = reinterpret_cast<acc_t*>(smem_raw + lay.w);          // (rpad, 32)
  __shared__ int pix_s[3][kN1Tile];  // pixels of the tiles, by iteration % 3

  const int tid = threadIdx.x, lane = tid % kN1Lanes, warp = tid / kN1Lanes;
  const int64_t b = blockIdx.z / 4;
  const int k = blockIdx.z % 4;
  const int64_t chunk = blockIdx.y;
  const int64_t d0 = int64_t(blockIdx.x) * kN1Lanes;
  const int channels = int(D - d0 < kN1Lanes ? D - d0 : kN1Lanes);
  const int64_t d = d0 + lane;
  const bool active = lane < channels;
  const int64_t dd = active ? d : d0;
  const int64_t l_begin = chunk * p.chunk_len;
  const int64_t l_end = l_begin + p.chunk_len < L ? l_begin + p.chunk_len : L;
  const int tiles = int((l_end - l_begin + kN1Tile - 1) / kN1Tile);
  const bool shared_dz = gridDim.x > 1;
  const bool dy_acc = p.dy_acc;
  const int dy_bytes = dy_acc ? int(sizeof(acc_t)) : int(sizeof(T));

  const T* x = static_cast<const T*>(p.x) + b * L * D;
  const unsigned char* dy = static_cast<const unsigned char*>(p.dy) + b * L * D * dy_bytes;
  const acc_t* z = static_cast<const acc_t*>(p.z) + b * L * 4 * zw;
  acc_t* dz = static_cast<acc_t*>(p.dz) + b * L * 4 * zw;
  acc_t* dx = static_cast<acc_t*>(p.dx) + b * L * D;
  const int64_t kd = k * D + dd;
  const acc_t bias = active ? static_cast<const acc_t*>(p.dt_b)[kd] : acc_t(0);
  const acc_t Ds = active ? static_cast<const acc_t*>(p.Ds)[kd] : acc_t(0);
  const acc_t A = active ? static_cast<const acc_t*>(p.A)[kd] : acc_t(0);
  const int64_t bkc = (b * 4 + k) * p.chunks + chunk;
  const int64_t sat = bkc * D + dd;  // the thread's chunk summaries (N = 1)
  const int64_t tpc = p.chunk_len / kV1Tile;
  const bool x_vec = D % kXVec == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0;
  const int dy_vec_elems = 16 / dy_bytes;
  const bool dy_vec = D % dy_vec_elems == 0 && reinterpret_cast<uintptr_t>(p.dy) % 16 == 0;
  const bool dx_vec = std::is_same<acc_t, float>::value && D % 4 == 0 &&
                      reinterpret_cast<uintptr_t>(p.dx) % 16 == 0;

  // iteration it works on tile tiles - 1 - it (the chunk from its last tile to its first)
  auto tile_of = [&](int it) { return kSummary ? it : tiles - 1 - it; };
  auto tile_count = [&](int t) {
    const int64_t left = l_end - l_begin - int64_t(t) * kN1Tile;
    return int(left < kN1Tile ? left : kN1Tile);
  };
  auto tile_pixels = [&](int it) {
    const int t = tile_of(it);
    const int64_t l0 = l_begin + int64_t(t) * kN1Tile;
    if (tid < tile_count(t)) pix_s[it % 3][tid] = ss2d::pixel(k, int(l0) + tid, int(H), int(W));
  };
  // iteration it's z rows, x and dy into stage it % 2: one commit group of cp.async copies
  // (x or dy by plain loads when their rows are not whole 16-byte vectors)
  auto load_tile = [&](int it) {
    const int count = tile_count(tile_of(it));
    const int* pix = pix_s[it % 3];
    acc_t* zst = zs + (it % 2) * kN1Tile * zstride;
    T* xst = xs + (it % 2) * kN1Tile * kN1Lanes;
    unsigned char* dyst = dys + size_t(it % 2) * kN1Tile * kN1Lanes * sizeof(acc_t);
    ss2d::n1_load_z(zst, z, pix, count, k, R, rpad, zstride, tid);
    if (x_vec) {
      constexpr int kPerRow = kN1Lanes / kXVec;
      for (int e = tid; e < count * kPerRow; e += kN1Threads) {
        const int j = e / kPerRow, c = (e % kPerRow) * kXVec;
        if (c < channels)
          cp_async_16(xst + j * kN1Lanes + c, x + int64_t(pix[j]) * D + d0 + c, true);
      }
    } else {
      for (int e = tid; e < count * kN1Lanes; e += kN1Threads) {
        const int j = e / kN1Lanes, c = e % kN1Lanes;
        if (c < channels) xst[e] = x[int64_t(pix[j]) * D + d0 + c];
      }
    }
    if (dy_vec) {
      const int per_row = kN1Lanes / dy_vec_elems;
      for (int e = tid; e < count * per_row; e += kN1Threads) {
        const int j = e / per_row, c = (e % per_row) * dy_vec_elems;
        if (c < channels)
          cp_async_16(dyst + size_t(j * kN1Lanes + c) * dy_bytes,
                      dy + (int64_t(pix[j]) * D + d0 + c) * dy_bytes, true);
      }
    } else {
      for (int e = tid; e < count * kN1Lanes; e += kN1Threads) {
        const int j = e / kN1Lanes, c = e % kN1Lanes;
        if (c < channels) {
          const unsigned char* src = dy + (int64_t(pix[j]) * D + d0 + c) * dy_bytes;
          unsigned char* dst = dyst + size_t(e) * dy_bytes;
          if (dy_acc) *reinterpret_cast<acc_t*>(dst) = *reinterpret_cast<const acc_t*>(src);
          else *reinterpret_cast<T*>(dst) = *reinterpret_cast<const T*>(src);
        }
      }
    }
    cp_async_commit();
  };
  auto dy_at = [&](const unsigned char* dyst, int e) -> acc_t {
    return dy_acc ? reinterpret_cast<const acc_t*>(dyst)[e]
                  : widen(reinterpret_cast<const T*>(dyst)[e]);
  };

  // before the first tile: dt_projs_weight (registers, and shared memory for dz's delta part,
  // zero past R and for lanes past the channels), the z rows' zero padding, the first pixels
  const acc_t* dt_w = static_cast<const acc_t*>(p.dt_w) + kd * R;
  constexpr int kRegs = kWide ? 1 : kMaxR;
  acc_t w[kRegs], dw[kRegs];
#pragma unroll
  for (int r = 0; r < kMaxR; ++r) {
    w[r] = r < R && active ? dt_w[r] : acc_t(0);
    dw[r] = 0;
  }
  // (wide) dpre of this direction's pixels, the block's channels: (4, B, L, D)
  acc_t* dpre_out =
      kWide ? static_cast<acc_t*>(p.dpre) + ((k * p.batch + b) * L) * D + d : nullptr;
  for (int r = warp; r < rpad; r += kN1Warps)
    ws[r * kN1Lanes + lane] = r < R && active ? dt_w[r] : acc_t(0);
  ss2d::n1_zero_padding(zs, 2 * kN1Tile, R, rpad, zstride, tid);
  if (tiles > 0) tile_pixels(0);
  if (tiles > 1) tile_pixels(1);
  __syncthreads();
  if (tiles > 0) load_tile(0);

  // the state entering tile 0 of the chunk: the summary pass's (from zero, with the dt summed
  // before it to carry the chunk's entering state in; 4 of its 16-position tiles a tile), or
  // (kGiven) the forward's, a tile apart (one chunk: nothing enters it from either side)
  static_assert(!(kSummary && kGiven), "the summary pass computes the states");
  const acc_t* given = kGiven ? static_cast<const acc_t*>(p.states) +
                                    (b * 4 + k) * ss2d_state_tiles(L) * D + dd
                              : nullptr;
  acc_t* ts_base = kGiven ? nullptr : tile_states<acc_t>(p) + bkc * tpc * D + dd;
  acc_t* tdt_base = kGiven ? nullptr : tile_dts<acc_t>(p, kV1Tile) + bkc * tpc * D + dd;
  const bool summaries = !kSummary && !kGiven && active;
  const acc_t h_chunk = summaries ? summary<acc_t>(p, kStateIn)[sat] : acc_t(0);
  acc_t carry = summaries ? summary<acc_t>(p, kAdjIn)[sat] : acc_t(0);  // a g, from the right
  acc_t dA = 0, dDs = 0, dbias = 0;
  // the summary pass: the state from zero, the dt summed, the adjoint summary
  // sum_l (prod_{m <= l} a_m) dy_l C_l and the product of decays, from the chunk's start
  acc_t h_run = 0, dt_run = 0, adj_run = 0, P_run = 1;

  for (int it = 0; it < tiles; ++it) {
    const int t = tile_of(it), count = tile_count(t);
    const acc_t* zst = zs + (it % 2) * kN1Tile * zstride;
    const T* xst = xs + (it % 2) * kN1Tile * kN1Lanes;
    const unsigned char* dyst = dys + size_t(it % 2) * kN1Tile * kN1Lanes * sizeof(acc_t);
    __syncthreads();  // the next tile's pixels are written; its stage and the sums are free
    if (it + 1 < tiles) load_tile(it + 1);
    else cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    if (kSummary && active && warp == 0) {
      ts_base[int64_t(t) * (kN1Tile / kV1Tile) * D] = h_run;
      tdt_base[int64_t(t) * (kN1Tile / kV1Tile) * D] = dt_run;
    }
    // the state entering the tile (summary kernel's tile 4t starts where this one does)
    acc_t h_tile = 0;
    if (kGiven && active) {
      h_tile = given[int64_t(t) * D];
    } else if (!kSummary && active) {
      const int64_t at = int64_t(t) * (kN1Tile / kV1Tile) * D;
      h_tile = ts_base[at] + exp_(A * tdt_base[at]) * h_chunk;
    }

    // 1. sweep 1: every lane computes every step; steps past the tile or the channels are
    // made the identity (decay 1, no input, no adjoint source)
    // delta and sigmoid(pre) of each step wait for sweep 2 in the slots of the sums over
    // channels that sweep 2 then writes at the same (position, lane), h before each step
    // likewise: shared memory instead of 24 registers (ptxas spilled at 2 blocks an SM)
    acc_t* red_pre = red;
    acc_t* red_b = red + kN1Tile * kRed;
    acc_t* red_c = red + 2 * kN1Tile * kRed;
    acc_t a[kN1Steps], bu[kN1Steps];
    acc_t P = 1, Hs = 0, S = 0;  // S: the adjoint this warp passes left, from zero on its right
    acc_t Q = 0, dts = 0;        // (summary) sum of (prod of decays so far) dy C; dt summed
#pragma unroll
    for (int i = 0; i < kN1Steps; ++i) {
      const int j = warp * kN1Steps + i;
      const acc_t* row = zst + j * zstride;
      const acc_t u = widen(xst[j * kN1Lanes + lane]);
      acc_t pre;
      if constexpr (kWide) {
        pre = bias;
        for (int q = 0; q < rpad / kVec; ++q) {
          const Vec16<acc_t> zv = reinterpret_cast<const Vec16<acc_t>*>(row)[q];
#pragma unroll
          for (int e = 0; e < kVec; ++e) pre += ws[(q * kVec + e) * kN1Lanes + lane] * zv.v[e];
        }
      } else {
        pre = ss2d::n1_pre(row, w, bias);
      }
      // softplus(pre) and sigmoid(pre) from one exp(-|pre|)
      const acc_t ex = exp_(-(pre > acc_t(0) ? pre : -pre));
      const acc_t dt = (pre > acc_t(0) ? pre : acc_t(0)) + scan::log1p_unit(ex);
      if (!kSummary) {
        red_b[j * kRed + lane] = dt;
        red_pre[j * kRed + lane] = (pre > acc_t(0) ? acc_t(1) : ex) / (acc_t(1) + ex);
      }
      const bool step = active && j < count;
      a[i] = step ? exp_(dt * A) : acc_t(1);
      bu[i] = step ? dt * u * row[rpad] : acc_t(0);
      P *= a[i];
      Hs = a[i] * Hs + bu[i];
      if (kSummary && step) {
        dts += dt;
        Q += P * dy_at(dyst, j * kN1Lanes + lane) * row[rpad + 1];
      }
    }
    if constexpr (kSummary) {
      seg[warp * kN1Lanes + lane] = Segment<acc_t>{P, Hs, Q, dts};
      __syncthreads();
#pragma unroll
      for (int s = 0; s < kN1Warps; ++s) {
        const Segment<acc_t> sg = seg[s * kN1Lanes + lane];
        adj_run += P_run * sg.S;
        P_run *= sg.P;
        h_run = sg.P * h_run + sg.H;
        dt_run += sg.unused;
      }
    }
    if constexpr (!kSummary) {
  #pragma unroll
      for (int i = kN1Steps - 1; i >= 0; --i) {
        const int j = warp * kN1Steps + i;
        const acc_t dyc = active && j < count
                              ? dy_at(dyst, j * kN1Lanes + lane) * zst[j * zstride + rpad + 1]
                              : acc_t(0);
        S = a[i] * (dyc + S);
      }
      seg[warp * kN1Lanes + lane] = Segment<acc_t>{P, Hs, S, acc_t(0)};
      __syncthreads();

      // 2. the state entering this warp (left to right) and the adjoint entering it from the
      // right (right to left); the adjoint leaving the tile to the left carries to the next one
      acc_t hF = h_tile, h_in = h_tile;
  #pragma unroll
      for (int s = 0; s < kN1Warps; ++s) {
        if (s == warp) h_in = hF;
        const Segment<acc_t> sg = seg[s * kN1Lanes + lane];
        hF = sg.P * hF + sg.H;
      }
      acc_t G = carry, g_in = carry;
  #pragma unroll
      for (int s = kN1Warps - 1; s >= 0; --s) {
        if (s == warp) g_in = G;
        const Segment<acc_t> sg = seg[s * kN1Lanes + lane];
        G = sg.S + sg.P * G;
      }
      carry = G;

      // 3. sweep 2, right to left, with h before each step recomputed from h_in
      {
        acc_t h = h_in;
  #pragma unroll
        for (int i = 0; i < kN1Steps; ++i) {
          red_c[(warp * kN1Steps + i) * kRed + lane] = h;  // h before step i
          h = a[i] * h + bu[i];
        }
      }
      acc_t gn = g_in;
  #pragma unroll
      for (int i = kN1Steps - 1; i >= 0; --i) {
        const int j = warp * kN1Steps + i;
        const acc_t* row = zst + j * zstride;
        const acc_t u = widen(xst[j * kN1Lanes + lane]);
        const acc_t dyv = dy_at(dyst, j * kN1Lanes + lane);
        const acc_t Bj = row[rpad];
        const bool step = active && j < count;
        const acc_t g = (step ? dyv * row[rpad + 1] : acc_t(0)) + gn;
        const acc_t dt = red_b[j * kRed + lane], sig = red_pre[j * kRed + lane];
        const acc_t hprev = red_c[j * kRed + lane];
        const acc_t ddt = g * (A * a[i] * hprev + Bj * u);
        const acc_t dpre = step ? ddt * sig : acc_t(0);
        if (step) {
          dA += g * dt * a[i] * hprev;
          dDs += dyv * u;
          dbias += dpre;
  #pragma unroll
          for (int q = 0; q < kMaxR / kVec; ++q) {
            const Vec16<acc_t> zv = reinterpret_cast<const Vec16<acc_t>*>(row)[q];
  #pragma unroll
            for (int e = 0; e < kVec; ++e) dw[q * kVec + e] += dpre * zv.v[e];
          }
          if constexpr (kWide) dpre_out[int64_t(pix_s[it % 3][j]) * D] = dpre;
        }
        if (j < count) {  // lanes past the channels add zeros to the sums over channels
          red_pre[j * kRed + lane] = dpre;
          red_b[j * kRed + lane] = step ? g * dt * u : acc_t(0);
          red_c[j * kRed + lane] = step ? dyv * (a[i] * hprev + bu[i]) : acc_t(0);
          dus[j * kN1Lanes + lane] = Ds * dyv + dt * g * Bj;
        }
        gn = a[i] * g;
      }
      __syncthreads();

      // 4. the per-position terms summed over the block's channels: 4 threads a position, 8
      // channels each, then two shuffles; the 2 + R sums spread over the 4 threads' writes
      {
        const int j = tid / 4, qtr = tid % 4;
        const int jj = j < count ? j : 0;
        // 16-byte loads: rows of kRed (36) values and these 8 start on 16-byte boundaries
        using V = Vec16<acc_t>;
        const V* pre_row = reinterpret_cast<const V*>(red_pre + jj * kRed + qtr * 8);
        const V* b_row = reinterpret_cast<const V*>(red_b + jj * kRed + qtr * 8);
        const V* c_row = reinterpret_cast<const V*>(red_c + jj * kRed + qtr * 8);
        acc_t sums[kMaxR + 2];
        acc_t sb = 0, sc = 0, pv[8];
  #pragma unroll
        for (int q = 0; q < 8 / kVec; ++q) {
          const V bv = b_row[q], cv = c_row[q], prev = pre_row[q];
  #pragma unroll
          for (int e = 0; e < kVec; ++e) {
            sb += bv.v[e];
            sc += cv.v[e];
            pv[q * kVec + e] = prev.v[e];
          }
        }
        sums[kMaxR] = sb;
        sums[kMaxR + 1] = sc;
  #pragma unroll
        for (int r = 0; r < kMaxR; ++r) {
          acc_t s = 0;
          if (r < R) {
            const V* wrow = reinterpret_cast<const V*>(ws + r * kN1Lanes + qtr * 8);
  #pragma unroll
            for (int q = 0; q < 8 / kVec; ++q) {
              const V wv = wrow[q];
  #pragma unroll
              for (int e = 0; e < kVec; ++e) s += pv[q * kVec + e] * wv.v[e];
            }
          }
          sums[r] = s;
        }
  #pragma unroll
        for (int v = 0; v < kMaxR + 2; ++v) {
          sums[v] += __shfl_xor_sync(0xffffffffu, sums[v], 1);
          sums[v] += __shfl_xor_sync(0xffffffffu, sums[v], 2);
        }
        if (j < count) {
          acc_t* dzrow = dz + (int64_t(pix_s[it % 3][j]) * 4 + k) * zw;
  #pragma unroll
          for (int v = 0; v < kMaxR + 2; ++v) {
            const int col = v < kMaxR ? v : R + (v - kMaxR);
            if (v % 4 == qtr && (v >= kMaxR || v < R)) {
              if (shared_dz) atomicAdd(dzrow + col, sums[v]);
              else dzrow[col] += sums[v];
            }
          }
        }
      }
      // du into dx, a row of the block's channels at each pixel
      ss2d::n1_add_rows(dx, dus, pix_s[it % 3], count, D, d0, channels, dx_vec, tid);
    }
    if (it + 2 < tiles) tile_pixels(it + 2);
  }

  if constexpr (kSummary) {
    if (active && warp == 0) {
      summary<acc_t>(p, kDecay)[sat] = exp_(A * dt_run);
      summary<acc_t>(p, kLocal)[sat] = h_run;
      summary<acc_t>(p, kAdjLocal)[sat] = adj_run;
    }
    return;
  }
  // the chunk's per-channel sums: over the 8 warps through shared memory, then one write
  constexpr int kPlanes = 3 + kMaxR;  // dA, dDs, dbias, dt_projs_weight (not when wide)
  __syncthreads();  // the last tile's sums are read
  red[(0 * kN1Warps + warp) * kN1Lanes + lane] = dA;
  red[(1 * kN1Warps + warp) * kN1Lanes + lane] = dDs;
  red[(2 * kN1Warps + warp) * kN1Lanes + lane] = dbias;
#pragma unroll
  for (int r = 0; r < kMaxR; ++r) red[((3 + r) * kN1Warps + warp) * kN1Lanes + lane] = dw[r];
  __syncthreads();
  acc_t* part = static_cast<acc_t*>(p.partial) + bkc * (3 + (kWide ? 0 : R)) * D + d0;
  for (int e = tid; e < kPlanes * kN1Lanes; e += kN1Threads) {
    const int v = e / kN1Lanes, c = e % kN1Lanes;
    if (c >= channels || (v >= 3 && v - 3 >= R)) continue;
    acc_t s = 0;
#pragma unroll
    for (int ww = 0; ww < kN1Warps; ++ww) s += red[(v * kN1Warps + ww) * kN1Lanes + c];
    part[v * D + c] = s;
  }
}

template <typename T, int kMaxR>
cudaError_t launch_n1(const Ss2dBwdParams& p, cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  if (p.chunk_len % kN1Tile != 0) return cudaErrorInvalidValue;
  const dim3 grid(unsigned((p.dim + kN1Lanes - 1) / kN1Lanes), unsigned(p.chunks),
                  unsigned(p.batch * 4));
  const size_t smem = ss2d_bwd_n1_layout(int(p.rank), sizeof(T), sizeof(acc_t)).bytes;
  if (p.states != nullptr) {  // the forward's states: the main kernel alone
    if (p.chunks != 1) return cudaErrorInvalidValue;
    return launch_kernel(n1_kernel<T, kMaxR, false, true>, grid, dim3(kN1Lanes * kN1Warps),
                         smem, stream, p);
  }
  cudaError_t err;
  if (p.n1_summary) {
    err = launch_kernel(n1_kernel<T, kMaxR, true>, grid, dim3(kN1Lanes * kN1Warps), smem,
                        stream, p);
  } else {  // v1's summary (its blocks of up to 128 channels, its 16-position tiles)
    const int threads = ss2d_threads(p.dim);
    const dim3 grid1(unsigned((p.dim + threads - 1) / threads), unsigned(p.chunks),
                     unsigned(p.batch * 4));
    const size_t stage = ss2d_bwd_stage_bytes(p.dim, p.rank, 1, sizeof(acc_t));
    err = launch_kernel(summary_kernel<T, 1, kV1Tile>, grid1, dim3(threads), stage, stream, p);
  }
  if (err != cudaSuccess) return err;
  const int64_t n = p.batch * 4 * p.dim;
  err = launch_kernel(carry_kernel<acc_t>, dim3(unsigned((n + 255) / 256)), dim3(256), 0, stream,
                      p);
  if (err != cudaSuccess) return err;
  return launch_kernel(n1_kernel<T, kMaxR, false>, grid, dim3(kN1Lanes * kN1Warps), smem, stream,
                       p);
}

// Every fused backward: v3 where p.n1 asks for it (d_state 1), v1 otherwise. v3 takes its
// variant with dt_projs_weight in shared memory and dpre out wherever p.dpre is given (the
// benchmark's PYSSM_SS2D_BWD=v3-wide at any dt_rank), and needs it over dt_rank 16.
template <typename T>
cudaError_t bwd(const Ss2dBwdParams& p, cudaStream_t stream) {
  if (p.batch * p.height * p.width * p.dim == 0) return cudaSuccess;
  if (p.dstate < 1 || p.dstate > kSs2dMaxState || p.chunks < 1 || p.chunk_len < 1 ||
      p.batch * 4 > 65535 || p.chunks > 65535 || p.height * p.width >= (int64_t(1) << 31))
    return cudaErrorInvalidValue;
  if (p.states != nullptr && !p.n1) return cudaErrorInvalidValue;  // (v3's, at its tiles)
  if (p.n1) {
    if (p.dstate != 1 || p.rank < 1) return cudaErrorInvalidValue;
    if (p.dpre != nullptr) return launch_n1<T, 0>(p, stream);
    if (p.rank <= 8) return launch_n1<T, 8>(p, stream);
    if (p.rank <= kSs2dBwdN1MaxRank) return launch_n1<T, 16>(p, stream);
    return cudaErrorInvalidValue;  // (over dt_rank 16: dpre needed)
  }
  if (p.dstate == 1) return launch<T, 1>(p, stream);
  if (p.dstate <= 4) return launch<T, 4>(p, stream);
  if (p.dstate <= 8) return launch<T, 8>(p, stream);
  return launch<T, 16>(p, stream);
}

}  // namespace ss2d_bwd
}  // namespace pyssm
