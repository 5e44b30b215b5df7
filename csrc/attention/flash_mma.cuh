// mma.sync helpers of the flash-attention forward (flash_kernel.cuh) and backward
// (flash_bwd_kernel.cuh): ldmatrix and the pair loads; the packing and the m16n8k16 product
// (with its fragment layouts) are in mma_sync.cuh, shared with the SS2D family.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cp_async.cuh"
#include "kernel_launch.cuh"  // (under PYSSM_CUDA_EMULATION: the emulated ldmatrix)
#include "mma_sync.cuh"

namespace pyssm {
namespace flash {

using ::pyssm::mma;
using ::pyssm::Pack;

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: four 8 x 8 matrices of 16-bit elements;
// lanes 8i..8i+7 give the addresses of matrix i's rows (16 bytes each, 16-byte aligned).
// Register i of lane l = 4 g + t: rows g, columns 2t..2t+1 of matrix i; with kTrans, rows 2t and
// 2t+1 of column g (matrix i transposed), which is an mma B fragment of a row-major tile.
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#ifdef PYSSM_CUDA_EMULATION
  cuda_emulation::ldmatrix_x4(r, row, kTrans);
#else
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  }
#endif
}

// ldmatrix .x2: matrices 0 and 1 only (lanes 0-15 give the row addresses; the other lanes'
// addresses are not read).
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
#ifdef PYSSM_CUDA_EMULATION
  cuda_emulation::ldmatrix_x2(r, row, kTrans);
#else
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr));
  }
#endif
}

// two consecutive elements as one 32-bit register (zero where the column is past `limit`)
template <typename T>
__device__ __forceinline__ uint32_t load_pair(const T* row, int col, int limit) {
  if (col + 1 < limit) return *reinterpret_cast<const uint32_t*>(row + col);
  const float lo = col < limit ? Pack<T>::to_float(row[col]) : 0.f;
  return Pack<T>::pack(lo, 0.f);
}

}  // namespace flash
}  // namespace pyssm
