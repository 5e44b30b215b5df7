// Starts a kernel: the triple-chevron launch, after raising the kernel's dynamic shared-memory
// limit when it asks for nearly the default 48 KB or more. Every pyssm launcher goes through
// it, so that when PYSSM_CUDA_EMULATION is defined (tests/cuda_emulation: the kernel sources
// compiled by a host compiler), the same kernel code runs on the CPU instead, one std::thread
// per CUDA thread.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <utility>

#ifdef PYSSM_CUDA_EMULATION
#include "cuda_emulation.h"
#endif

// A kernel's dynamic shared memory, as `unsigned char name[]` (16-byte aligned).
#ifdef PYSSM_CUDA_EMULATION
#define PYSSM_DYNAMIC_SMEM(name) unsigned char* name = ::cuda_emulation::dynamic_shared_memory()
#else
#define PYSSM_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace pyssm {

template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, Args&&... args) {
#ifdef PYSSM_CUDA_EMULATION
  (void)stream;
  return cuda_emulation::run(kernel, grid, block, smem, std::forward<Args>(args)...);
#else
  // the default limit of 48 KB counts static shared memory too: raise it with 2 KB to spare
  if (smem + 2048 > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
#endif
}

}  // namespace pyssm
