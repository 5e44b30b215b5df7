// Fused CUDA SS2D backward (DESIGN.md "ss2d"), v1. Per direction k, channel d, state n, in the
// pixel order of direction k (DESIGN.md):
//   dt_l = softplus(bias + w . zdt_l),  a_l = exp(dt_l A),  h_l = a_l h_{l-1} + dt_l u_l B_l
//   y_l += C_l . h_l + Ds u_l;          adjoint g_l = dL/dh_l = dy_l C_l + a_{l+1} g_{l+1}
// Nothing per step is stored: the states are recomputed tile by tile. Like the forward, a
// thread owns one channel (channels-last x and dy: every tile load is coalesced in every
// direction) and each direction's scan is cut into chunks so any batch fills the GPU.
//
// Kernels, in launch order (tests/ops/ss2d_bwd_model.py is the float64 model of exactly this,
// checked against autograd):
//  1. summary: each chunk walked forward from a zero state: the state entering every tile (from
//     zero) and the dt summed before it; the chunk's decay exp(A sum dt), its end state from zero
//     and its adjoint summary sum_l (prod_{m <= l} a_m) dy_l C_l.
//  2. carry: the state entering each chunk (left to right) and the adjoint entering it from the
//     right (right to left), one thread per (batch, direction, channel, state).
//  3. main: tiles from the chunk's last to its first. A tile's x, dy and z rows are staged in
//     shared memory; the forward is recomputed inside the tile from the state entering it, with
//     dt and h of every position kept in shared memory; dC is summed over the block's channels;
//     the positions are walked backwards (du added into dx: the four directions meet there, so
//     fp32 atomics; dA, dDs, dbias in registers; the dB terms and dpre written over h and dt);
//     then dB and the dt part of dz (dpre times dt_projs_weight) are summed over the channels
//     per position, and each thread adds its dt_projs_weight gradient for the tile into
//     registers (d_state 1, dt_rank <= 16; written into its slots of `partial` once, at the
//     chunk's end) or into those slots. Several channel blocks (D > 128) add into dz with
//     atomics; one writes.
#pragma once

#include "kernel_launch.cuh"
#include "ss2d/scan_math.cuh"  // scan::Acc, widen, exp_, expm1_, softplus
#include "ss2d/ss2d.cuh"
#include "ss2d/ss2d_kernel.cuh"            // ss2d::pixel

namespace pyssm {
namespace ss2d_bwd {

using scan::Acc;
using scan::exp_;
using scan::expm1_;
using scan::softplus;
using scan::widen;

// dt_rank up to which the main kernel keeps a channel's dt_projs_weight gradient in registers
// for the whole chunk (written once), at d_state 1 (VMamba v2's); larger ranks and states add it
// into `partial` every tile (ptxas, sm_90a: at d_state 1 the registers cost 2 of 96; at 4, 8,
// 16 they took 86, 126, 168 to 138, 162, 210)
template <int kMaxN>
constexpr int reg_rank() { return kMaxN == 1 ? 16 : 0; }

// What every kernel of the backward knows about its block: (channel group, chunk, batch x dir).
template <typename T>
struct Block {
  using acc_t = typename Acc<T>::type;
  int64_t H, W, L, D, R, N, zw, b, chunk, d, d0, channels, l_begin, l_end, tiles;
  int k;
  bool active;

  __device__ Block(const Ss2dBwdParams& p, int64_t tile) {
    H = p.height;
    W = p.width;
    L = H * W;
    D = p.dim;
    R = p.rank;
    N = p.dstate;
    zw = R + 2 * N;
    b = blockIdx.z / 4;
    k = int(blockIdx.z % 4);
    chunk = blockIdx.y;
    d0 = int64_t(blockIdx.x) * blockDim.x;
    d = d0 + threadIdx.x;
    active = d < D;
    channels = D - d0 < blockDim.x ? D - d0 : blockDim.x;
    l_begin = chunk * p.chunk_len;
    l_end = l_begin + p.chunk_len < L ? l_begin + p.chunk_len : L;
    tiles = (l_end - l_begin + tile - 1) / tile;
  }
  // (b, k, chunk) row of the per-chunk arrays, and the thread's channel in them
  __device__ int64_t bkc(const Ss2dBwdParams& p) const { return (b * 4 + k) * p.chunks + chunk; }
  __device__ int64_t dd() const { return active ? d : 0; }
};

template <typename acc_t>
__device__ __forceinline__ acc_t* summary(const Ss2dBwdParams& p, int part) {
  return static_cast<acc_t*>(p.scratch) + part * ss2d_bwd_summary_elems(p);
}
enum Part { kDecay = 0, kLocal = 1, kAdjLocal = 2, kStateIn = 3, kAdjIn = 4 };

// The state entering each tile from zero (N per channel), then the dt summed before it.
template <typename acc_t>
__device__ __forceinline__ acc_t* tile_states(const Ss2dBwdParams& p) {
  return static_cast<acc_t*>(p.scratch) + 5 * ss2d_bwd_summary_elems(p);
}
template <typename acc_t>
__device__ __forceinline__ acc_t* tile_dts(const Ss2dBwdParams& p, int64_t tile) {
  return tile_states<acc_t>(p) +
         p.batch * 4 * p.chunks * (p.chunk_len / tile) * p.dim * p.dstate;
}

// The tile staged in dynamic shared memory by both kernels (ss2d.cuh: ss2d_bwd_stage_bytes):
// z rows (kTile x zw), then x and dy (kTile x stride each, stride = threads + 1); `end` is
// where the main kernel's own arrays begin.
template <typename acc_t, int kTile>
struct StagedTile {
  int64_t stride;
  acc_t *zs, *xs, *dys, *end;
  __device__ StagedTile(unsigned char* smem, int64_t zw) {
    stride = blockDim.x + 1;
    zs = reinterpret_cast<acc_t*>(smem);
    xs = zs + kTile * zw;
    dys = xs + kTile * stride;
    end = dys + kTile * stride;
  }
};

// The pixels of positions [l0, l0 + count) of direction k into pix_s (threads < count; the
// caller synchronises before reading them).
template <typename T>
__device__ __forceinline__ void tile_pixels(const Block<T>& blk, int64_t l0, int count,
                                            int* pix_s) {
  if (int(threadIdx.x) < count)
    pix_s[threadIdx.x] = ss2d::pixel(blk.k, int(l0) + threadIdx.x, int(blk.H), int(blk.W));
}

// Stage positions [l0, l0 + count) of direction k (pixels in pix_s): z rows, and x, dy of the
// block's channels (rows of `stride` values), in the accumulation type. Independent coalesced
// loads: x and dy a channel per thread.
template <typename T>
__device__ __forceinline__ void stage_tile(const Ss2dBwdParams& p, const Block<T>& blk,
                                           const int* pix_s, int count, int64_t stride,
                                           typename Acc<T>::type* zs, typename Acc<T>::type* xs,
                                           typename Acc<T>::type* dys) {
  using acc_t = typename Acc<T>::type;
  const acc_t* z = static_cast<const acc_t*>(p.z) + blk.b * blk.L * 4 * blk.zw;
  const int zw = int(blk.zw);
  for (int i = threadIdx.x; i < count * zw; i += blockDim.x) {
    const int j = i / zw, c = i - j * zw;
    zs[i] = z[(int64_t(pix_s[j]) * 4 + blk.k) * blk.zw + c];
  }
  const int64_t base = blk.b * blk.L * blk.D + blk.d0;
  const T* x = static_cast<const T*>(p.x) + base;
  const int c = threadIdx.x;
  if (c >= blk.channels) return;
  for (int j = 0; j < count; ++j) {
    const int64_t at = int64_t(pix_s[j]) * blk.D + c;
    xs[j * stride + c] = widen(x[at]);
    dys[j * stride + c] = p.dy_acc ? (static_cast<const acc_t*>(p.dy) + base)[at]
                                   : widen((static_cast<const T*>(p.dy) + base)[at]);
  }
}

// The thread's channel constants for direction k.
template <typename acc_t, int kMaxN>
struct Channel {
  const acc_t* w;  // dt_projs_weight row (R)
  acc_t bias, Ds, A[kMaxN];

  __device__ Channel(const Ss2dBwdParams& p, int k, int64_t d, int64_t D, int64_t R, int64_t N,
                     bool active) {
    const int64_t kd = k * D + (active ? d : 0);
    w = static_cast<const acc_t*>(p.dt_w) + kd * R;
    bias = active ? static_cast<const acc_t*>(p.dt_b)[kd] : acc_t(0);
    Ds = active ? static_cast<const acc_t*>(p.Ds)[kd] : acc_t(0);
#pragma unroll
    for (int n = 0; n < kMaxN; ++n) A[n] = n < N ? static_cast<const acc_t*>(p.A)[kd * N + n] : acc_t(0);
  }
  __device__ __forceinline__ acc_t dt(const acc_t* zj, int64_t R) const {
    acc_t pre = bias;
    for (int64_t r = 0; r < R; ++r) pre += w[r] * zj[r];
    return softplus(pre);
  }
};

// 1. chunk summaries and tile states
template <typename T, int kMaxN, int kTile>
__global__ void summary_kernel(const Ss2dBwdParams p) {
  using acc_t = typename Acc<T>::type;
  PYSSM_DYNAMIC_SMEM(smem_raw);
  const Block<T> blk(p, kTile);
  __shared__ int pix_s[kTile];  // the tile's pixels
  const StagedTile<acc_t, kTile> tile(smem_raw, blk.zw);
  const int64_t stride = tile.stride;
  acc_t *zs = tile.zs, *xs = tile.xs, *dys = tile.dys;
  const Channel<acc_t, kMaxN> ch(p, blk.k, blk.d, blk.D, blk.R, blk.N, blk.active);
  const int64_t N = blk.N, R = blk.R, c = threadIdx.x;

  acc_t h[kMaxN], P[kMaxN], adj[kMaxN];
#pragma unroll
  for (int n = 0; n < kMaxN; ++n) h[n] = 0, P[n] = 1, adj[n] = 0;
  acc_t dtacc = 0;
  const int64_t tpc = p.chunk_len / kTile;
  for (int64_t t = 0; t < blk.tiles; ++t) {
    const int64_t l0 = blk.l_begin + t * kTile;
    const int count = int(blk.l_end - l0 < kTile ? blk.l_end - l0 : kTile);
    if (blk.active) {
      const int64_t at = (blk.bkc(p) * tpc + t) * blk.D + blk.d;
#pragma unroll
      for (int n = 0; n < kMaxN; ++n)
        if (n < N) tile_states<acc_t>(p)[at * N + n] = h[n];
      tile_dts<acc_t>(p, kTile)[at] = dtacc;
    }
    __syncthreads();  // the previous tile is consumed
    tile_pixels(blk, l0, count, pix_s);
    __syncthreads();
    stage_tile<T>(p, blk, pix_s, count, stride, zs, xs, dys);
    __syncthreads();
    if (!blk.active) continue;
#pragma unroll 4  // the steps' dt, softplus and exp overlap; only h and P are serial chains
    for (int j = 0; j < count; ++j) {
      const acc_t* zj = zs + j * blk.zw;
      const acc_t u = xs[j * stride + c], dy = dys[j * stride + c];
      const acc_t dt = ch.dt(zj, R);
      dtacc += dt;
#pragma unroll
      for (int n = 0; n < kMaxN; ++n) {
        if (n >= N) break;
        const acc_t a = exp_(dt * ch.A[n]);
        h[n] = a * h[n] + dt * u * zj[R + n];
        P[n] *= a;
        adj[n] += P[n] * dy * zj[R + N + n];
      }
    }
  }
  if (blk.active) {
    const int64_t at = (blk.bkc(p) * blk.D + blk.d) * N;
#pragma unroll
    for (int n = 0; n < kMaxN; ++n) {
      if (n >= N) break;
      summary<acc_t>(p, kDecay)[at + n] = exp_(ch.A[n] * dtacc);
      summary<acc_t>(p, kLocal)[at + n] = h[n];
      summary<acc_t>(p, kAdjLocal)[at + n] = adj[n];
    }
  }
}

// 2. the state entering each chunk, and the adjoint entering it from the right
template <typename acc_t>
__global__ void carry_kernel(const Ss2dBwdParams p) {
  const int64_t D = p.dim, N = p.dstate;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.batch * 4 * D * N) return;
  const int64_t n = i % N, d = (i / N) % D, bk = i / (N * D);
  auto at = [&](int64_t c) { return ((bk * p.chunks + c) * D + d) * N + n; };
  acc_t h = 0;
  for (int64_t c = 0; c < p.chunks; ++c) {
    summary<acc_t>(p, kStateIn)[at(c)] = h;
    h = summary<acc_t>(p, kDecay)[at(c)] * h + summary<acc_t>(p, kLocal)[at(c)];
  }
  acc_t q = 0;
  for (int64_t c = p.chunks - 1; c >= 0; --c) {
    summary<acc_t>(p, kAdjIn)[at(c)] = q;
    q = summary<acc_t>(p, kAdjLocal)[at(c)] + summary<acc_t>(p, kDecay)[at(c)] * q;
  }
}

// Adds v into dz: a plain add when the block is the only one holding these channels' sums.
template <typename acc_t>
__device__ __forceinline__ void add_dz(acc_t* at, acc_t v, bool shared) {
  if (shared) {
    atomicAdd(at, v);
  } else {
    *at += v;
  }
}

// 3. the gradients
template <typename T, int kMaxN, int kTile>
__global__ void main_kernel(const Ss2dBwdParams p) {
  using acc_t = typename Acc<T>::type;
  PYSSM_DYNAMIC_SMEM(smem_raw);
  const Block<T> blk(p, kTile);
  __shared__ int pix_s[kTile];  // the tile's pixels
  const StagedTile<acc_t, kTile> tile(smem_raw, blk.zw);
  const int64_t stride = tile.stride;             // x / dy rows
  const int64_t hstride = kTile * kMaxN + 1;      // a channel's h (then dB terms) row
  const int64_t tstride = kTile + 1;              // a channel's dt (then dpre) row
  acc_t *zs = tile.zs, *xs = tile.xs, *dys = tile.dys;
  acc_t* hs = tile.end;                           // (threads, hstride)
  acc_t* dts = hs + blockDim.x * hstride;         // (threads, tstride)
  const Channel<acc_t, kMaxN> ch(p, blk.k, blk.d, blk.D, blk.R, blk.N, blk.active);
  const int64_t N = blk.N, R = blk.R, D = blk.D, zw = blk.zw, c = threadIdx.x;
  const bool shared_dz = gridDim.x > 1;
  acc_t* dz = static_cast<acc_t*>(p.dz) + blk.b * blk.L * 4 * zw;
  acc_t* dx = static_cast<acc_t*>(p.dx) + blk.b * blk.L * D;
  const int64_t planes = N + 2 + R;
  acc_t* part = static_cast<acc_t*>(p.partial) + blk.bkc(p) * planes * D + blk.dd();
  const acc_t* dt_w = static_cast<const acc_t*>(p.dt_w) + (blk.k * D + blk.d0) * R;

  const int64_t sat = (blk.bkc(p) * D + blk.dd()) * N;  // the thread's chunk summaries
  acc_t h_chunk[kMaxN], carry[kMaxN], dA[kMaxN];
#pragma unroll
  for (int n = 0; n < kMaxN; ++n) {
    const bool on = n < N && blk.active;
    h_chunk[n] = on ? summary<acc_t>(p, kStateIn)[sat + n] : acc_t(0);
    carry[n] = on ? summary<acc_t>(p, kAdjIn)[sat + n] : acc_t(0);  // a_{j+1} g_{j+1}
    dA[n] = 0;
  }
  acc_t dD = 0, dbias = 0;
  // the dt_projs_weight gradient of the thread's channel over the chunk: in registers for
  // dt_rank up to kRegRank (VMamba's are 6 to 12; see reg_rank), else added into its slots
  // every tile
  constexpr int kRegRank = reg_rank<kMaxN>();
  acc_t dtw[kRegRank > 0 ? kRegRank : 1];
#pragma unroll
  for (int r = 0; r < kRegRank; ++r) dtw[r] = 0;
  const bool dtw_in_registers = R <= kRegRank;
  const int64_t tpc = p.chunk_len / kTile;

  for (int64_t t = blk.tiles - 1; t >= 0; --t) {
    const int64_t l0 = blk.l_begin + t * kTile;
    const int count = int(blk.l_end - l0 < kTile ? blk.l_end - l0 : kTile);
    __syncthreads();  // the previous tile's shared memory is consumed
    tile_pixels(blk, l0, count, pix_s);
    __syncthreads();
    stage_tile<T>(p, blk, pix_s, count, stride, zs, xs, dys);
    __syncthreads();

    // the state entering the tile, then the forward inside it
    acc_t h_in[kMaxN];
    if (blk.active) {
      const int64_t at = (blk.bkc(p) * tpc + t) * D + blk.d;
      const acc_t dtpre = tile_dts<acc_t>(p, kTile)[at];
      acc_t h[kMaxN];
#pragma unroll
      for (int n = 0; n < kMaxN; ++n) {
        h_in[n] = n < N ? tile_states<acc_t>(p)[at * N + n] + exp_(ch.A[n] * dtpre) * h_chunk[n]
                        : acc_t(0);
        h[n] = h_in[n];
      }
#pragma unroll 4
      for (int j = 0; j < count; ++j) {
        const acc_t* zj = zs + j * zw;
        const acc_t u = xs[j * stride + c];
        const acc_t dt = ch.dt(zj, R);
        dts[c * tstride + j] = dt;
#pragma unroll
        for (int n = 0; n < kMaxN; ++n) {
          if (n >= N) break;
          h[n] = exp_(dt * ch.A[n]) * h[n] + dt * u * zj[R + n];
          hs[c * hstride + j * kMaxN + n] = h[n];
        }
      }
    }
    __syncthreads();

    // dC_j[n] = sum over the block's channels of dy_j h_j[n]
    const int n32 = int(N), nr32 = int(N + R), channels = int(blk.channels);
    for (int i = threadIdx.x; i < count * n32; i += blockDim.x) {
      const int j = i / n32, n = i - j * n32;
      acc_t s = 0;
      for (int cc = 0; cc < channels; ++cc)
        s += dys[j * stride + cc] * hs[cc * hstride + j * kMaxN + n];
      add_dz(dz + (int64_t(pix_s[j]) * 4 + blk.k) * zw + R + N + n, s,
             shared_dz);
    }
    __syncthreads();

    // the positions backwards
    if (blk.active) {
#pragma unroll 4
      for (int j = count - 1; j >= 0; --j) {
        const acc_t* zj = zs + j * zw;
        const acc_t u = xs[j * stride + c], dy = dys[j * stride + c];
        const acc_t dt = dts[c * tstride + j];
        acc_t bsum = 0, ddt = 0;
#pragma unroll
        for (int n = 0; n < kMaxN; ++n) {
          if (n >= N) break;
          const acc_t a = exp_(dt * ch.A[n]);
          const acc_t hprev = j > 0 ? hs[c * hstride + (j - 1) * kMaxN + n] : h_in[n];
          const acc_t g = dy * zj[R + N + n] + carry[n];
          bsum += g * zj[R + n];
          ddt += g * (ch.A[n] * a * hprev + zj[R + n] * u);
          dA[n] += g * dt * a * hprev;
          hs[c * hstride + j * kMaxN + n] = g * dt * u;  // the dB term (h_j is no longer read)
          carry[n] = a * g;
        }
        dD += dy * u;
        const acc_t dpre = ddt * -expm1_(-dt);  // softplus'(pre) = sigmoid(pre) = 1 - exp(-dt)
        dbias += dpre;
        dts[c * tstride + j] = dpre;
        atomicAdd(dx + int64_t(pix_s[j]) * D + blk.d, ch.Ds * dy + dt * bsum);
      }
    }
    __syncthreads();

    // dB_j[n] and the dt part of dz, summed over the block's channels
    for (int i = threadIdx.x; i < count * nr32; i += blockDim.x) {
      const int j = i / nr32, q = i - j * nr32;
      acc_t s = 0;
      if (q < N) {
        for (int cc = 0; cc < channels; ++cc) s += hs[cc * hstride + j * kMaxN + q];
      } else {
        const int64_t r = q - N;
        for (int cc = 0; cc < channels; ++cc) s += dts[cc * tstride + j] * dt_w[cc * R + r];
      }
      add_dz(dz + (int64_t(pix_s[j]) * 4 + blk.k) * zw + (q < N ? R + q : q - N),
             s, shared_dz);
    }
    // the tile's dt_projs_weight gradient
    if (blk.active) {
      if (dtw_in_registers) {
#pragma unroll
        for (int r = 0; r < kRegRank; ++r) {
          if (r >= R) break;
          for (int j = 0; j < count; ++j) dtw[r] += dts[c * tstride + j] * zs[j * zw + r];
        }
      } else {
        for (int64_t r = 0; r < R; ++r) {
          acc_t s = 0;
          for (int j = 0; j < count; ++j) s += dts[c * tstride + j] * zs[j * zw + r];
          part[(N + 2 + r) * D] += s;
        }
      }
    }
  }
  if (blk.active) {
#pragma unroll
    for (int n = 0; n < kMaxN; ++n)
      if (n < N) part[n * D] = dA[n];
    part[N * D] = dD;
    part[(N + 1) * D] = dbias;
    if (dtw_in_registers) {
#pragma unroll
      for (int r = 0; r < kRegRank; ++r)
        if (r < R) part[(N + 2 + r) * D] = dtw[r];
    }
  }
}

template <typename T, int kMaxN>
cudaError_t launch(const Ss2dBwdParams& p, cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  constexpr int kTile = int(ss2d_bwd_tile(kMaxN));
  if (p.chunk_len % kTile != 0) return cudaErrorInvalidValue;
  const int threads = ss2d_threads(p.dim);
  const dim3 grid(unsigned((p.dim + threads - 1) / threads), unsigned(p.chunks),
                  unsigned(p.batch * 4));
  const size_t stage = ss2d_bwd_stage_bytes(p.dim, p.rank, p.dstate, sizeof(acc_t));
  const size_t smem = ss2d_bwd_smem_bytes(p.dim, p.rank, p.dstate, sizeof(acc_t));
  cudaError_t err = launch_kernel(summary_kernel<T, kMaxN, kTile>, grid, dim3(threads), stage,
                                  stream, p);
  if (err != cudaSuccess) return err;
  const int64_t n = p.batch * 4 * p.dim * p.dstate;
  err = launch_kernel(carry_kernel<acc_t>, dim3(unsigned((n + 255) / 256)), dim3(256), 0, stream,
                      p);
  if (err != cudaSuccess) return err;
  return launch_kernel(main_kernel<T, kMaxN, kTile>, grid, dim3(threads), smem, stream, p);
}

}  // namespace ss2d_bwd
}  // namespace pyssm
