// A CPU emulation of the parts of the CUDA execution model that pyssm's SS2D-family kernels use,
// so their sources, compiled by a host compiler with PYSSM_CUDA_EMULATION defined, run without a
// GPU: blocks one after another, each block's threads as std::threads, __syncthreads as a
// barrier, dynamic shared memory poisoned (all bits set: NaN in float and double) before each
// block, fp32 / fp64 atomicAdd as atomic read-modify-writes.
//
// What it checks: indexing, tiling, tails, the algorithm, which element every thread reads and
// writes, shared memory read before it is written, barrier counts (a thread skipping a barrier
// the others reach deadlocks). What it does not: warp-level behaviour (no shuffles or
// tensor-core instructions; kernels that use them are not emulated), the GPU memory model, the
// hardware's own arithmetic, timing. A pass here is not a pass on a GPU.
//
// Force-included (g++ -include cuda_emulation.h) before any kernel source.
#pragma once

#include <cuda_runtime_api.h>  // dim3, uint3, cudaError_t; __global__ etc. as host attributes

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <thread>
#include <utility>
#include <vector>

namespace cuda_emulation {

inline thread_local uint3 thread_idx;
inline uint3 block_idx;
inline dim3 block_dim, grid_dim;
inline std::barrier<>* block_barrier = nullptr;

// The kernels' `extern __shared__` arrays (one per kernel namespace), registered by the harness
// that defines them: poisoned before every block, and the bound on a launch's dynamic size.
struct SharedRegion {
  unsigned char* data;
  size_t bytes;
};
inline std::vector<SharedRegion> shared_regions;
inline bool add_shared_region(unsigned char* data, size_t bytes) {
  shared_regions.push_back({data, bytes});
  return true;
}

template <typename... Params, typename... Args>
cudaError_t run(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  for (const SharedRegion& r : shared_regions)
    if (smem > r.bytes) return cudaErrorInvalidValue;
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0)
    return cudaErrorInvalidConfiguration;
  grid_dim = grid;
  block_dim = block;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        block_idx = {bx, by, bz};
        for (const SharedRegion& r : shared_regions) std::memset(r.data, 0xff, r.bytes);
        std::barrier<> barrier(threads);
        block_barrier = &barrier;
        std::vector<std::thread> team;
        team.reserve(threads);
        for (unsigned t = 0; t < threads; ++t) {
          team.emplace_back([&, t] {
            thread_idx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            kernel(args...);
            barrier.arrive_and_drop();  // an exited thread no longer holds the others back
          });
        }
        for (std::thread& th : team) th.join();
        block_barrier = nullptr;
      }
  return cudaSuccess;
}

}  // namespace cuda_emulation

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
