// Fused CUDA SS2D forward v3: the d_state-1 fast path (VMamba v2's configurations).
//
// v2 (ss2d_kernel.cuh) gives each channel one thread that walks a whole chunk of positions, so
// a batch that fills the GPU with chains still needs ~16 blocks per SM to hide their latency,
// and the scan runs in two passes over every position (chunk summaries, then y): the softplus
// and exp of every step are computed twice. v3 splits positions across the warps of a block
// instead: a block is 32 channels (one per lane) x 8 warps, a tile 64 positions, each warp
// 8 consecutive positions of it. A tile is
//   1. loaded into shared memory (pixel table, z rows, x for the block's channels: coalesced,
//      16-byte vectors where aligned),
//   2. sweep 1: each thread forms delta, exp(delta A) and delta u B for its 8 positions (kept
//      in registers) and their composition (product of decays, state from zero),
//   3. the 8 warps' compositions chained through shared memory, in order, from the state the
//      previous tile left (every thread chains all 8, so no thread waits for another's carry),
//   4. sweep 2: each thread reruns its 8 steps from its entering state with multiply-adds only
//      and writes y to a shared tile,
//   5. the tile of y added to global y with 16-byte atomics (red.global.add.v4.f32, sm_90),
//      one row of 32 channels per 8 threads, instead of one 4-byte atomic per thread and step.
// A batch whose blocks fill the GPU runs each direction's whole scan in one block, one pass;
// smaller batches cut the scan into chunks as v2 does (pass 0 records each chunk's decay and
// end state, ss2d_carry_kernel chains them, pass 1 writes y), so a batch of 1 still fills it.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cp_async.cuh"
#include "ss2d/ss2d_kernel.cuh"  // pixel, scratch_part, ss2d_carry_kernel, launch (v2), Acc

namespace pyssm {
namespace ss2d {

constexpr int kN1Lanes = kSs2dN1Lanes;  // channels per block, one per lane
constexpr int kN1Warps = kSs2dN1Warps;  // position segments per tile, one per warp
constexpr int kN1Steps = kSs2dN1Steps;  // positions per warp and tile
constexpr int kN1Tile = kN1Warps * kN1Steps;
static_assert(kN1Tile == kSs2dN1Tile, "tile = warps x steps");

// 16 bytes of the accumulation type, for vector shared-memory loads of z rows.
template <typename acc_t>
struct alignas(16) Vec16 {
  static constexpr int n = 16 / int(sizeof(acc_t));
  acc_t v[n];
};
template <typename acc_t>
struct alignas(2 * sizeof(acc_t)) Pair {
  acc_t first, second;
};

// y += v (4 consecutive floats): one 16-byte atomic on sm_90, four otherwise.
__device__ __forceinline__ void add4(float* y, const float4& v) {
#if defined(PYSSM_CUDA_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
  atomicAdd(reinterpret_cast<float4*>(y), v);
#else
  atomicAdd(y, v.x);
  atomicAdd(y + 1, v.y);
  atomicAdd(y + 2, v.z);
  atomicAdd(y + 3, v.w);
#endif
}

// What the d_state-1 kernels (this forward, ss2d_bwd_n1_kernel.cuh's backward) share: a
// block's tiles of 64 positions of one direction, 32 channels wide, staged in shared memory.
constexpr int kN1Threads = kN1Lanes * kN1Warps;

// The z rows of `count` pixels (direction k) into a stage of rows `zstride` wide: dt's R
// values, padding to rpad (zeroed once by n1_zero_padding), then B and C; cp.async copies of
// the accumulation type's size, in the caller's commit group.
template <typename acc_t>
__device__ __forceinline__ void n1_load_z(acc_t* zst, const acc_t* z, const int* pix, int count,
                                          int k, int R, int rpad, int zstride, int tid) {
  const int zw = R + 2;
  for (int e = tid; e < count * zw; e += kN1Threads) {
    const int j = e / zw, c = e - j * zw;
    cp_async_small<int(sizeof(acc_t))>(zst + j * zstride + (c < R ? c : rpad + c - R),
                                       z + (int64_t(pix[j]) * 4 + k) * zw + c);
  }
}
// Zeroes the padding of `rows` z rows (never copied over, so once before the first tile).
template <typename acc_t>
__device__ __forceinline__ void n1_zero_padding(acc_t* zs, int rows, int R, int rpad,
                                                int zstride, int tid) {
  for (int e = tid; e < rows * zstride; e += kN1Threads) {
    const int c = e % zstride;
    if ((c >= R && c < rpad) || c >= rpad + 2) zs[e] = acc_t(0);
  }
}
// Adds a staged tile (count rows of 32) into the block's channels of `count` pixels' rows of
// a (L, D) array: 16-byte atomics where `vec` (float, rows 16-byte aligned), 4-byte otherwise.
template <typename acc_t>
__device__ __forceinline__ void n1_add_rows(acc_t* out, const acc_t* tile, const int* pix,
                                            int count, int64_t D, int64_t d0, int channels,
                                            bool vec, int tid) {
  if (vec) {
    constexpr int kPerRow = kN1Lanes / 4;
    for (int e = tid; e < count * kPerRow; e += kN1Threads) {
      const int j = e / kPerRow, c = (e % kPerRow) * 4;
      if (c < channels) {
        const acc_t* v = tile + j * kN1Lanes + c;
        add4(reinterpret_cast<float*>(out + int64_t(pix[j]) * D + d0 + c),
             make_float4(float(v[0]), float(v[1]), float(v[2]), float(v[3])));
      }
    }
  } else {
    for (int e = tid; e < count * kN1Lanes; e += kN1Threads) {
      const int j = e / kN1Lanes, c = e % kN1Lanes;
      if (c < channels) atomicAdd(out + int64_t(pix[j]) * D + d0 + c, tile[e]);
    }
  }
}
// bias + w . (a z row's dt part), w in registers (kMaxR of them, zero past R; the row zero
// there too), the row read as 16-byte vectors.
template <int kMaxR, typename acc_t>
__device__ __forceinline__ acc_t n1_pre(const acc_t* row, const acc_t (&w)[kMaxR], acc_t bias) {
  constexpr int kVec = Vec16<acc_t>::n;
  acc_t pre = bias;
#pragma unroll
  for (int q = 0; q < kMaxR / kVec; ++q) {
    const Vec16<acc_t> zv = reinterpret_cast<const Vec16<acc_t>*>(row)[q];
#pragma unroll
    for (int e = 0; e < kVec; ++e) pre += w[q * kVec + e] * zv.v[e];
  }
  return pre;
}

// Blocks an SM should hold: 3 (80 registers a thread) in fp32 accumulation, where ptxas fits
// every variant but the 16- and 32-wide register weights in that (those take 2: up to 128);
// fp64 takes what it needs.
template <typename acc_t, int kMaxR>
constexpr int n1_min_blocks() {
  return sizeof(acc_t) != 4 ? 1 : kMaxR == 16 || kMaxR == 32 ? 2 : 3;
}

// kMaxR: dt_projs_weight rows in registers for dt_rank up to kMaxR (8, 16, 32); 0 keeps them in
// shared memory (any dt_rank). kPass 0: chunk summaries; 1: y.
template <typename T, int kMaxR, int kPass>
__global__ void __launch_bounds__(kN1Lanes* kN1Warps,
                                  (n1_min_blocks<typename Acc<T>::type, kMaxR>()))
    ss2d_n1_kernel(const Ss2dParams p) {
  using acc_t = typename Acc<T>::type;
  constexpr int kVec = Vec16<acc_t>::n;  // accumulation-type elements in 16 bytes
  constexpr int kXVec = 16 / int(sizeof(T));
  PYSSM_DYNAMIC_SMEM(smem_raw);
  const int64_t H = p.height, W = p.width, L = H * W, D = p.dim;
  const int R = int(p.rank), zw = R + 2;
  const Ss2dN1Layout lay = ss2d_n1_layout(R, sizeof(T), sizeof(acc_t));
  // compile-time where dt_projs_weight is in registers (the layout pads dt to kMaxR there)
  const int rpad = kMaxR > 0 ? kMaxR : lay.rpad;
  const int zstride = kMaxR > 0 ? kMaxR + kVec : lay.zstride;
  acc_t* zs = reinterpret_cast<acc_t*>(smem_raw + lay.z);       // (2, tile, zstride)
  acc_t* ys = reinterpret_cast<acc_t*>(smem_raw + lay.y);       // (tile, 32)
  acc_t* seg = reinterpret_cast<acc_t*>(smem_raw + lay.seg);    // (warps, 32, 2)
  acc_t* dtw_s = reinterpret_cast<acc_t*>(smem_raw + lay.dtw);  // (rpad, 32)
  T* xs = reinterpret_cast<T*>(smem_raw + lay.x);               // (2, tile, 32)
  __shared__ int pix_s[3][kN1Tile];  // the pixels of tiles t, t + 1, t + 2 (by t % 3)

  const int tid = threadIdx.x, lane = tid % kN1Lanes, warp = tid / kN1Lanes;
  const int64_t b = blockIdx.z / 4;
  const int k = blockIdx.z % 4;
  const int64_t chunk = blockIdx.y;
  const int64_t d0 = int64_t(blockIdx.x) * kN1Lanes;
  const int channels = int(D - d0 < kN1Lanes ? D - d0 : kN1Lanes);
  const int64_t d = d0 + lane;
  const bool active = lane < channels;
  const int64_t l_begin = chunk * p.chunk_len;
  const int64_t l_end = l_begin + p.chunk_len < L ? l_begin + p.chunk_len : L;
  const int tiles = int((l_end - l_begin + kN1Tile - 1) / kN1Tile);

  const T* x = static_cast<const T*>(p.x) + b * L * D;
  const acc_t* z = static_cast<const acc_t*>(p.z) + b * L * 4 * zw;
  acc_t* y = static_cast<acc_t*>(p.y) + b * L * D;
  const acc_t* dt_w = static_cast<const acc_t*>(p.dt_w) + (k * D + (active ? d : d0)) * R;
  const acc_t bias = active ? static_cast<const acc_t*>(p.dt_b)[k * D + d] : acc_t(0);
  const acc_t Dk = active ? static_cast<const acc_t*>(p.Ds)[k * D + d] : acc_t(0);
  const acc_t A = active ? static_cast<const acc_t*>(p.A)[k * D + d] : acc_t(0);
  const int64_t state_at = ((b * 4 + k) * p.chunks + chunk) * D + (active ? d : d0);
  // 16-byte paths: x rows and y rows start 16-byte aligned and hold whole vectors
  const bool x_vec = D % kXVec == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0;
  const bool y_vec = std::is_same<acc_t, float>::value && D % 4 == 0 &&
                     reinterpret_cast<uintptr_t>(p.y) % 16 == 0;

  auto tile_pixels = [&](int t) {
    const int64_t l0 = l_begin + int64_t(t) * kN1Tile;
    if (tid < kN1Tile && l0 + tid < l_end)
      pix_s[t % 3][tid] = pixel(k, int(l0) + tid, int(H), int(W));
  };
  auto tile_count = [&](int t) {
    const int64_t left = l_end - l_begin - int64_t(t) * kN1Tile;
    return int(left < kN1Tile ? left : kN1Tile);
  };
  // tile t's z rows and x into stage t % 2, as one commit group of cp.async copies (x by
  // plain loads when its rows are not whole 16-byte vectors)
  auto load_tile = [&](int t) {
    const int count = tile_count(t);
    const int* pix = pix_s[t % 3];
    n1_load_z(zs + (t % 2) * kN1Tile * zstride, z, pix, count, k, R, rpad, zstride, tid);
    // (the same loops as the backward's x and dy loads; through a shared helper, ptxas spilled
    // 4-8 bytes here and 4-24 more there)
    T* xst = xs + (t % 2) * kN1Tile * kN1Lanes;
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
    cp_async_commit();
  };

  // before the first tile: the z rows' zero padding (never copied over), dt_projs_weight
  acc_t w[kMaxR > 0 ? kMaxR : 1];
  if constexpr (kMaxR > 0) {
#pragma unroll
    for (int r = 0; r < kMaxR; ++r) w[r] = r < R ? dt_w[r] : acc_t(0);
  } else {
    for (int r = warp; r < rpad; r += kN1Warps)
      dtw_s[r * kN1Lanes + lane] = r < R && active ? dt_w[r] : acc_t(0);
  }
  n1_zero_padding(zs, 2 * kN1Tile, R, rpad, zstride, tid);
  if (tiles > 0) tile_pixels(0);
  if (tiles > 1) tile_pixels(1);
  __syncthreads();
  if (tiles > 0) load_tile(0);

  acc_t carry = (kPass == 1 && p.chunks > 1 && active) ? scratch_part<acc_t>(p, 2)[state_at]
                                                       : acc_t(0);
  acc_t decay = 1;  // pass 0: the product of the chunk's decays
  for (int t = 0; t < tiles; ++t) {
    const int count = tile_count(t);
    const acc_t* zst = zs + (t % 2) * kN1Tile * zstride;
    const T* xst = xs + (t % 2) * kN1Tile * kN1Lanes;
    __syncthreads();  // tile t + 1's pixels are written; its stage and y are free
    if (t + 1 < tiles) load_tile(t + 1);
    else cp_async_commit();  // an empty group: the wait below is the same on the last tile
    cp_async_wait<1>();      // this thread's copies of tile t have landed
    __syncthreads();         // and everyone's

    // sweep 1: this warp's positions from a zero state; decay and delta u B kept. Every lane
    // computes every step (no branches); positions past the tile and lanes past the channels
    // read stale shared memory and are then made the identity step (decay 1, input 0).
    acc_t a[kN1Steps], bu[kN1Steps];
    acc_t P = 1, Hs = 0;
#pragma unroll
    for (int i = 0; i < kN1Steps; ++i) {
      const int j = warp * kN1Steps + i;
      const acc_t* row = zst + j * zstride;
      const acc_t u = widen(xst[j * kN1Lanes + lane]);
      acc_t dt = bias;
      if constexpr (kMaxR > 0) {
        dt = n1_pre(row, w, bias);
      } else {
        for (int q = 0; q < rpad / kVec; ++q) {
          const Vec16<acc_t> zv = reinterpret_cast<const Vec16<acc_t>*>(row)[q];
#pragma unroll
          for (int e = 0; e < kVec; ++e) dt += dtw_s[(q * kVec + e) * kN1Lanes + lane] * zv.v[e];
        }
      }
      dt = softplus(dt);
      const bool step = active && j < count;
      a[i] = step ? exp_(dt * A) : acc_t(1);
      bu[i] = step ? dt * u * row[rpad] : acc_t(0);
      P *= a[i];
      Hs = a[i] * Hs + bu[i];
    }
    // pass 1 with p.states: the state entering tile t, for the backward (warp 0's lanes: a
    // row of 32 channels), its address from the parameters and the block's indices (not held
    // in registers over the loop)
    if (kPass == 1 && p.states != nullptr && tid < channels) {
      const int64_t tile = int64_t(blockIdx.y) * (p.chunk_len / kN1Tile) + t;
      static_cast<acc_t*>(p.states)[(int64_t(blockIdx.z) * ss2d_state_tiles(p.height * p.width) +
                                     tile) * p.dim + int64_t(blockIdx.x) * kN1Lanes + tid] = carry;
    }
    // the warps' segments in order: the state entering this warp's positions and the next tile
    Pair<acc_t>* pairs = reinterpret_cast<Pair<acc_t>*>(seg);
    pairs[warp * kN1Lanes + lane] = Pair<acc_t>{P, Hs};
    __syncthreads();
    acc_t h = carry, h_in = carry;
#pragma unroll
    for (int s = 0; s < kN1Warps; ++s) {
      if (s == warp) h_in = h;
      const Pair<acc_t> ps = pairs[s * kN1Lanes + lane];
      h = ps.first * h + ps.second;
      if (kPass == 0) decay *= ps.first;
    }
    carry = h;
    if (t + 2 < tiles) tile_pixels(t + 2);
    if constexpr (kPass == 1) {
      // sweep 2: y of this warp's positions, C and u read again from the stage
      h = h_in;
#pragma unroll
      for (int i = 0; i < kN1Steps; ++i) {
        const int j = warp * kN1Steps + i;
        h = a[i] * h + bu[i];
        if (j < count)  // (lanes past the channels write values nobody reads)
          ys[j * kN1Lanes + lane] =
              zst[j * zstride + rpad + 1] * h + Dk * widen(xst[j * kN1Lanes + lane]);
      }
      __syncthreads();
      // the tile of y into global y, a row of the block's channels at each pixel
      n1_add_rows(y, ys, pix_s[t % 3], count, D, d0, channels, y_vec, tid);
    }
  }
  if (kPass == 0 && active && warp == 0) {
    scratch_part<acc_t>(p, 0)[state_at] = decay;  // the chunk's decay
    scratch_part<acc_t>(p, 1)[state_at] = carry;  // its end state from zero
  }
}

template <typename T, int kMaxR>
cudaError_t launch_n1(const Ss2dParams& p, cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  const dim3 grid(unsigned((p.dim + kN1Lanes - 1) / kN1Lanes), unsigned(p.chunks),
                  unsigned(p.batch * 4));
  const dim3 block(kN1Lanes * kN1Warps);
  const size_t smem = ss2d_n1_layout(int(p.rank), sizeof(T), sizeof(acc_t)).bytes;
  if (p.chunks > 1) {
    cudaError_t err = launch_kernel(ss2d_n1_kernel<T, kMaxR, 0>, grid, block, smem, stream, p);
    if (err != cudaSuccess) return err;
    const int64_t n = p.batch * 4 * p.dim;
    err = launch_kernel(ss2d_carry_kernel<acc_t>, dim3(unsigned((n + 255) / 256)), dim3(256), 0,
                        stream, p);
    if (err != cudaSuccess) return err;
  }
  return launch_kernel(ss2d_n1_kernel<T, kMaxR, 1>, grid, block, smem, stream, p);
}

// Every fused forward: v3 where p.n1 asks for it (d_state 1), v2 otherwise.
template <typename T>
cudaError_t fwd(const Ss2dParams& p, cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  if (p.batch * p.height * p.width * p.dim == 0) return cudaSuccess;
  if (p.dstate < 1 || p.dstate > kSs2dMaxState || p.chunks < 1 || p.chunk_len < 1 ||
      p.batch * 4 > 65535 || p.chunks > 65535 || p.height * p.width >= (int64_t(1) << 31))
    return cudaErrorInvalidValue;
  if (p.states != nullptr && (!p.n1 || p.chunk_len % kN1Tile != 0))
    return cudaErrorInvalidValue;  // (the states are v3's, at its tiles)
  if (p.n1) {
    if (p.dstate != 1 || p.rank < 1 ||
        ss2d_n1_layout(int(p.rank), sizeof(T), sizeof(acc_t)).bytes > kSs2dN1MaxSmem)
      return cudaErrorInvalidValue;
    if (p.rank <= 8) return launch_n1<T, 8>(p, stream);
    if (p.rank <= 16) return launch_n1<T, 16>(p, stream);
    if (p.rank <= 32) return launch_n1<T, 32>(p, stream);
    return launch_n1<T, 0>(p, stream);
  }
  if (ss2d_smem_bytes(p.dim, p.rank, p.dstate, sizeof(T), sizeof(acc_t)) > kSs2dMaxSmem)
    return cudaErrorInvalidValue;
  if (p.dstate == 1) return launch<T, 1>(p, stream);
  if (p.dstate <= 4) return launch<T, 4>(p, stream);
  if (p.dstate <= 8) return launch<T, 8>(p, stream);
  return launch<T, 16>(p, stream);
}

}  // namespace ss2d
}  // namespace pyssm
