// Fused CUDA SS2D forward (DESIGN.md "ss2d"), v1: the four directional scans read x in place
// (channels-last, one thread per channel, so every load of a pixel's channels is coalesced
// whatever the direction), form delta from the R-wide dt inside the kernel (no (B, 4D, L)
// delta), and add their outputs straight into one y; no cross-scanned copy of x and no four
// separate outputs exist. x_proj (z = W_x x, per pixel) comes in precomputed (one GEMM).
//
// Latency: a thread's steps are a serial chain, so nothing in it waits on global memory: the
// block first loads the z rows and its channels of x for a tile of 32 positions into shared
// memory (independent, coalesced loads, all in flight together), then each thread scans its
// channel through the tile from shared memory. (v1 read x from global memory at every step,
// a row apart in the column-major directions: on the H200 the forward took 2.13 ms against a
// 0.25-0.5 ms prediction.)
//
// Parallelism at any batch: each direction's scan is cut into `chunks` pieces of chunk_len
// positions. With chunks > 1, pass 0 runs every chunk from a zero state and records its end
// state and its total decay, a small kernel chains those into the state entering every chunk,
// and pass 1 reruns each chunk from its entering state and writes y. With chunks == 1 only
// pass 1 runs. Block: (up to 128 channels) x (one chunk) x (batch, direction).
#pragma once

#include "kernel_launch.cuh"
#include "ss2d/scan_math.cuh"  // scan::Acc, widen, exp_, softplus
#include "ss2d/ss2d.cuh"

namespace pyssm {
namespace ss2d {

using scan::Acc;
using scan::exp_;
using scan::softplus;
using scan::widen;

constexpr int kTilePositions = kSs2dTilePositions;  // positions staged in shared memory at once

// The pixel (row-major index) that direction k visits at scan position l, in 32 bits (the
// launchers refuse H * W >= 2^31). Divisions cost ~15 instructions even so, so the kernels
// compute each tile's pixels once into a small shared table (v2 divided, in 64 bits, at every
// step of the forward's inner loop).
__device__ __forceinline__ int pixel(int k, int l, int H, int W) {
  if (k >= 2) l = H * W - 1 - l;
  if (k % 2 == 0) return l;
  return (l % H) * W + l / H;  // column-major: l = w * H + h
}

template <typename acc_t>
__device__ __forceinline__ acc_t* scratch_part(const Ss2dParams& p, int part) {
  const int64_t size = p.batch * 4 * p.chunks * p.dim * p.dstate;
  return static_cast<acc_t*>(p.scratch) + part * size;
}

// kPass 0: chunk summaries (end state from zero, total decay); 1: y.
template <typename T, int kMaxN, int kPass>
__global__ void ss2d_chunk_kernel(const Ss2dParams p) {
  using acc_t = typename Acc<T>::type;
  PYSSM_DYNAMIC_SMEM(smem_raw);
  const int64_t H = p.height, W = p.width, L = H * W, D = p.dim, R = p.rank, N = p.dstate;
  const int64_t zw = R + 2 * N;
  acc_t* zs = reinterpret_cast<acc_t*>(smem_raw);            // (kTilePositions, R + 2N)
  T* xs = reinterpret_cast<T*>(zs + kTilePositions * zw);    // (kTilePositions, channels)
  const int64_t b = blockIdx.z / 4;
  const int k = blockIdx.z % 4;
  const int64_t chunk = blockIdx.y;
  const int64_t d = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = d < D;
  const int64_t d0 = int64_t(blockIdx.x) * blockDim.x;       // the block's first channel
  const int64_t channels = D - d0 < blockDim.x ? D - d0 : blockDim.x;
  const int64_t l_begin = chunk * p.chunk_len;
  const int64_t l_end = l_begin + p.chunk_len < L ? l_begin + p.chunk_len : L;

  const T* x = static_cast<const T*>(p.x) + b * L * D;
  const acc_t* z = static_cast<const acc_t*>(p.z) + b * L * 4 * zw;
  const acc_t* dt_w = static_cast<const acc_t*>(p.dt_w) + (k * D + (active ? d : 0)) * R;
  const acc_t bias = active ? static_cast<const acc_t*>(p.dt_b)[k * D + d] : acc_t(0);
  const acc_t Dk = active ? static_cast<const acc_t*>(p.Ds)[k * D + d] : acc_t(0);
  const acc_t* A = static_cast<const acc_t*>(p.A) + (k * D + (active ? d : 0)) * N;
  acc_t* y = static_cast<acc_t*>(p.y) + b * L * D;

  // scratch index of (b, k, chunk, d, n)
  const int64_t state_at = (((b * 4 + k) * p.chunks + chunk) * D + (active ? d : 0)) * N;
  acc_t Ak[kMaxN], h[kMaxN];
#pragma unroll
  for (int n = 0; n < kMaxN; ++n) {
    Ak[n] = n < N ? A[n] : acc_t(0);
    h[n] = (kPass == 1 && p.chunks > 1 && n < N && active)
               ? scratch_part<acc_t>(p, 2)[state_at + n]
               : acc_t(0);
  }
  acc_t dt_sum = 0;

  __shared__ int pix_s[kTilePositions];  // the tile's pixels
  const int zw32 = int(zw);
  for (int64_t l0 = l_begin; l0 < l_end; l0 += kTilePositions) {
    const int count = int(l_end - l0 < kTilePositions ? l_end - l0 : kTilePositions);
    __syncthreads();  // the previous tile's pixels, z rows and x are consumed
    if (int(threadIdx.x) < count) pix_s[threadIdx.x] = pixel(k, int(l0) + threadIdx.x, int(H), int(W));
    __syncthreads();
    for (int i = threadIdx.x; i < count * zw32; i += blockDim.x) {
      const int j = i / zw32, c = i - j * zw32;
      zs[i] = z[(int64_t(pix_s[j]) * 4 + k) * zw + c];
    }
    if (int64_t(threadIdx.x) < channels) {  // a channel per thread: coalesced per position
      for (int j = 0; j < count; ++j)
        xs[j * channels + threadIdx.x] = x[int64_t(pix_s[j]) * D + d0 + threadIdx.x];
    }
    __syncthreads();
    if (!active) continue;
    // unrolled so that the steps' dt, softplus and exp, which do not depend on h, overlap:
    // only h = a h + b is a serial chain
#pragma unroll 4
    for (int j = 0; j < count; ++j) {
      const int64_t pix = pix_s[j];
      const acc_t* zj = zs + j * zw;
      const acc_t u = widen(xs[j * channels + threadIdx.x]);
      acc_t dt = bias;
      for (int64_t r = 0; r < R; ++r) dt += dt_w[r] * zj[r];
      dt = softplus(dt);
      dt_sum += dt;
      const acc_t dtu = dt * u;
      acc_t out = Dk * u;
#pragma unroll
      for (int n = 0; n < kMaxN; ++n) {
        if (n >= N) break;
        h[n] = exp_(dt * Ak[n]) * h[n] + dtu * zj[R + n];
        if (kPass == 1) out += zj[R + N + n] * h[n];
      }
      if (kPass == 1) atomicAdd(y + pix * D + d, out);
    }
  }
  if (kPass == 0 && active) {
#pragma unroll
    for (int n = 0; n < kMaxN; ++n) {
      if (n >= N) break;
      scratch_part<acc_t>(p, 0)[state_at + n] = exp_(Ak[n] * dt_sum);  // the chunk's decay
      scratch_part<acc_t>(p, 1)[state_at + n] = h[n];                 // its end state from 0
    }
  }
}

// The state entering each chunk: one thread per (batch, direction, channel, state), in order.
template <typename acc_t>
__global__ void ss2d_carry_kernel(const Ss2dParams p) {
  const int64_t D = p.dim, N = p.dstate;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.batch * 4 * D * N) return;
  const int64_t n = i % N, d = (i / N) % D, bk = i / (N * D);
  const acc_t* decay = scratch_part<acc_t>(p, 0);
  const acc_t* local = scratch_part<acc_t>(p, 1);
  acc_t* carry = scratch_part<acc_t>(p, 2);
  acc_t h = 0;
  for (int64_t c = 0; c < p.chunks; ++c) {
    const int64_t at = ((bk * p.chunks + c) * D + d) * N + n;
    carry[at] = h;
    h = decay[at] * h + local[at];
  }
}

template <typename T, int kMaxN>
cudaError_t launch(const Ss2dParams& p, cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  const int threads = ss2d_threads(p.dim);
  const dim3 grid(unsigned((p.dim + threads - 1) / threads), unsigned(p.chunks),
                  unsigned(p.batch * 4));
  const size_t smem = ss2d_smem_bytes(p.dim, p.rank, p.dstate, sizeof(T), sizeof(acc_t));
  if (p.chunks > 1) {
    cudaError_t err =
        launch_kernel(ss2d_chunk_kernel<T, kMaxN, 0>, grid, dim3(threads), smem, stream, p);
    if (err != cudaSuccess) return err;
    const int64_t n = p.batch * 4 * p.dim * p.dstate;
    err = launch_kernel(ss2d_carry_kernel<acc_t>, dim3(unsigned((n + 255) / 256)), dim3(256), 0,
                        stream, p);
    if (err != cudaSuccess) return err;
  }
  return launch_kernel(ss2d_chunk_kernel<T, kMaxN, 1>, grid, dim3(threads), smem, stream, p);
}

}  // namespace ss2d
}  // namespace pyssm
