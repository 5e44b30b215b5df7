// cp.async (sm_80+): global to shared memory without passing through registers, in commit
// groups, so that a kernel loads its next tile while it computes on this one. Copies land once
// a later cp_async_wait<N>() leaves at most N newer committed groups of this thread pending;
// other threads see them after a barrier that follows the wait. Under PYSSM_CUDA_EMULATION
// (tests/cuda_emulation) a copy lands only at that wait, so reading early reads the poison.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernel_launch.cuh"

namespace pyssm {

// 16 bytes; with `valid` false they are zero-filled and nothing is read. L1 is bypassed (.cg).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
#ifdef PYSSM_CUDA_EMULATION
  cuda_emulation::cp_async(smem, gmem, 16, valid);
#else
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem),
               "r"(valid ? 16 : 0));
#endif
}

// kBytes 4 or 8, aligned to their size (.ca: the only form of these sizes).
template <int kBytes>
__device__ __forceinline__ void cp_async_small(void* smem, const void* gmem) {
  static_assert(kBytes == 4 || kBytes == 8, "cp.async.ca copies 4, 8 or 16 bytes");
#ifdef PYSSM_CUDA_EMULATION
  cuda_emulation::cp_async(smem, gmem, kBytes, true);
#else
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(addr), "l"(gmem),
               "n"(kBytes));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef PYSSM_CUDA_EMULATION
  cuda_emulation::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#ifdef PYSSM_CUDA_EMULATION
  cuda_emulation::cp_async_wait(kPending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

}  // namespace pyssm
