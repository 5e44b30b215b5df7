// A CPU emulation of the parts of the CUDA execution model that pyssm's kernels use, so their
// sources, compiled by a host compiler with PYSSM_CUDA_EMULATION defined, run without a GPU:
// blocks one after another, each block's threads as std::threads, __syncthreads as a barrier,
// warps as groups of 32 of those threads with their own barrier for the warp-collective
// operations (__shfl_*_sync; through flash_mma.cuh, mma.sync m16n8k16 computed from every
// lane's fragments and ldmatrix .x2 / .x4 [.trans] from every lane's row address, by the PTX
// ISA's layouts), cp.async copies that land only at the wait that covers them, static
// __shared__ variables shared by the block (function statics), dynamic shared memory poisoned
// (all bits set: NaN in float and double) before each block, fp32 / fp64 atomicAdd as atomic
// read-modify-writes, cudaMemsetAsync as memset.
//
// What it checks: indexing, tiling, tails, the algorithm, which element every thread reads and
// writes, dynamic shared memory read before it is written (or before its cp.async landed),
// fragment layouts, barrier counts (a thread skipping a barrier the others reach deadlocks). What it does not: the GPU memory
// model and its races, the hardware's own arithmetic (mma sums in double here), timing. A pass
// here is not a pass on a GPU.
//
// Force-included (g++ -include cuda_emulation.h) before any kernel source.
#pragma once

#include <cuda_runtime_api.h>  // dim3, uint3, cudaError_t; __global__ etc. as host attributes
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace cuda_emulation {

inline thread_local uint3 thread_idx;
inline thread_local unsigned linear_tid;
inline uint3 block_idx;
inline dim3 block_dim, grid_dim;
inline std::barrier<>* block_barrier = nullptr;

// Dynamic shared memory: one buffer, poisoned before every block.
constexpr size_t kDynamicSmem = 256 * 1024;
inline unsigned char* dynamic_shared_memory() {
  alignas(16) static unsigned char buffer[kDynamicSmem];
  return buffer;
}

// Warps: a barrier and an exchange slot per lane (wide enough for an mma's fragments).
struct LaneSlot {
  uint64_t word;
  const void* address;
  uint32_t a[4], b[2];
};
struct Warp {
  std::unique_ptr<std::barrier<>> barrier;
  LaneSlot lanes[32];
};
inline std::vector<Warp>* warps = nullptr;
inline Warp& my_warp() { return (*warps)[linear_tid / 32]; }
inline unsigned lane_id() { return linear_tid % 32; }

template <typename V>
V shuffle(V v, int src_lane) {
  static_assert(sizeof(V) <= sizeof(uint64_t), "shuffled values are at most 8 bytes");
  Warp& w = my_warp();
  std::memcpy(&w.lanes[lane_id()].word, &v, sizeof(V));
  w.barrier->arrive_and_wait();
  V out;
  std::memcpy(&out, &w.lanes[src_lane].word, sizeof(V));
  w.barrier->arrive_and_wait();
  return out;
}

template <typename T>
float element(uint32_t pair, int half) {
  T v[2];
  std::memcpy(v, &pair, sizeof(pair));
  if constexpr (std::is_same_v<T, __half>) return __half2float(v[half]);
  else return __bfloat162float(v[half]);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: d += A B for the warp's 16 x 8 tile, each
// lane holding the fragments of flash_mma.cuh's layout (lane = 4 g + t).
template <typename T>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Warp& w = my_warp();
  LaneSlot& mine = w.lanes[lane_id()];
  for (int i = 0; i < 4; ++i) mine.a[i] = a[i];
  mine.b[0] = b0;
  mine.b[1] = b1;
  w.barrier->arrive_and_wait();
  auto A = [&](int row, int col) {  // A[row][col], row < 16, col < 16
    const int g = row % 8, t = (col % 8) / 2, reg = (row >= 8) + 2 * (col >= 8);
    return element<T>(w.lanes[4 * g + t].a[reg], col % 2);
  };
  auto B = [&](int row, int col) {  // B[row][col], row < 16, col < 8
    const int t = (row % 8) / 2;
    return element<T>(w.lanes[4 * col + t].b[row >= 8], row % 2);
  };
  const int g = int(lane_id()) / 4, t = int(lane_id()) % 4;
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >= 2), col = 2 * t + (e % 2);
    double acc = d[e];
    for (int k = 0; k < 16; ++k) acc += double(A(row, k)) * double(B(k, col));
    out[e] = float(acc);
  }
  w.barrier->arrive_and_wait();
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

// ldmatrix.sync.aligned.m8n8.{x2,x4}[.trans].b16 (flash_mma.cuh): lane 8i + r gives row r of
// matrix i; register i of lane 4g + t is row g, columns 2t, 2t+1 (trans: rows 2t, 2t+1 of
// column g).
template <int kCount>
inline void ldmatrix(uint32_t (&r)[kCount], const void* row, bool trans) {
  Warp& w = my_warp();
  w.lanes[lane_id()].address = row;
  w.barrier->arrive_and_wait();
  const int g = int(lane_id()) / 4, t = int(lane_id()) % 4;
  auto at = [&](int matrix, int rr, int col) {  // 16-bit element (rr, col) of a matrix
    uint16_t v;
    std::memcpy(&v, static_cast<const unsigned char*>(w.lanes[8 * matrix + rr].address) + 2 * col,
                2);
    return uint32_t(v);
  };
  for (int i = 0; i < kCount; ++i)
    r[i] = trans ? at(i, 2 * t, g) | (at(i, 2 * t + 1, g) << 16)
                 : at(i, g, 2 * t) | (at(i, g, 2 * t + 1) << 16);
  w.barrier->arrive_and_wait();
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) { ldmatrix(r, row, trans); }
inline void ldmatrix_x2(uint32_t (&r)[2], const void* row, bool trans) { ldmatrix(r, row, trans); }

// cp.async: a thread's copies wait in commit groups and land only at cp_async_wait, so a
// kernel that reads shared memory before waiting reads the poison, as on a GPU it would read
// stale data.
struct AsyncCopy {
  void* dst;
  const void* src;  // null: zero-fill
};
inline thread_local std::vector<AsyncCopy> open_group;
inline thread_local std::vector<std::vector<AsyncCopy>> committed;
inline void cp_async_16(void* dst, const void* src, bool valid) {
  open_group.push_back({dst, valid ? src : nullptr});
}
inline void cp_async_commit() {
  committed.push_back(std::move(open_group));
  open_group.clear();
}
inline void cp_async_wait(int pending) {
  while (int(committed.size()) > pending) {
    for (const AsyncCopy& c : committed.front()) {
      if (c.src) std::memcpy(c.dst, c.src, 16);
      else std::memset(c.dst, 0, 16);
    }
    committed.erase(committed.begin());
  }
}

template <typename... Params, typename... Args>
cudaError_t run(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  if (smem > kDynamicSmem) return cudaErrorInvalidValue;
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0)
    return cudaErrorInvalidConfiguration;
  grid_dim = grid;
  block_dim = block;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        block_idx = {bx, by, bz};
        std::memset(dynamic_shared_memory(), 0xff, kDynamicSmem);
        std::barrier<> barrier(threads);
        block_barrier = &barrier;
        std::vector<Warp> team_warps((threads + 31) / 32);
        for (unsigned w = 0; w < team_warps.size(); ++w)
          team_warps[w].barrier = std::make_unique<std::barrier<>>(
              std::ptrdiff_t(std::min(32u, threads - 32 * w)));
        warps = &team_warps;
        std::vector<std::thread> team;
        team.reserve(threads);
        for (unsigned t = 0; t < threads; ++t) {
          team.emplace_back([&, t] {
            linear_tid = t;
            thread_idx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            open_group.clear();
            committed.clear();
            kernel(args...);
            // an exited thread no longer holds its block or its warp back
            team_warps[t / 32].barrier->arrive_and_drop();
            barrier.arrive_and_drop();
          });
        }
        for (std::thread& th : team) th.join();
        block_barrier = nullptr;
        warps = nullptr;
      }
  return cudaSuccess;
}

}  // namespace cuda_emulation

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#undef __shared__
#define __shared__ static  // one instance per kernel instantiation: shared by the block's threads

#define threadIdx (::cuda_emulation::thread_idx)
#define blockIdx (::cuda_emulation::block_idx)
#define blockDim (::cuda_emulation::block_dim)
#define gridDim (::cuda_emulation::grid_dim)

inline void __syncthreads() { cuda_emulation::block_barrier->arrive_and_wait(); }

inline float atomicAdd(float* address, float v) {
  return std::atomic_ref<float>(*address).fetch_add(v);
}
inline double atomicAdd(double* address, double v) {
  return std::atomic_ref<double>(*address).fetch_add(v);
}

template <typename V>
V __shfl_xor_sync(unsigned, V v, int lane_mask) {
  return cuda_emulation::shuffle(v, int(cuda_emulation::lane_id()) ^ lane_mask);
}
template <typename V>
V __shfl_up_sync(unsigned, V v, unsigned delta) {
  const int lane = int(cuda_emulation::lane_id());
  return cuda_emulation::shuffle(v, lane >= int(delta) ? lane - int(delta) : lane);
}
template <typename V>
V __shfl_down_sync(unsigned, V v, unsigned delta) {
  const int lane = int(cuda_emulation::lane_id());
  return cuda_emulation::shuffle(v, lane + int(delta) < 32 ? lane + int(delta) : lane);
}

// the runtime calls the launchers make
extern "C" inline cudaError_t cudaGetLastError(void) { return cudaSuccess; }
extern "C" inline cudaError_t cudaFuncSetAttribute(const void*, enum cudaFuncAttribute, int) {
  return cudaSuccess;
}
extern "C" inline cudaError_t cudaMemsetAsync(void* p, int value, size_t count, cudaStream_t) {
  std::memset(p, value, count);
  return cudaSuccess;
}
