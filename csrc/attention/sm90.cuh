// Hopper (sm_90a) primitives of the flash-attention Hopper paths (flash_sm90_kernel.cuh,
// flash_bwd_sm90_kernel.cuh): shared-memory mbarriers, TMA tile loads (cp.async.bulk.tensor)
// and fp32 reduce-adds (cp.reduce.async.bulk.tensor) with their bulk groups, tensor maps,
// wgmma matrix descriptors, the wgmma fence / commit / wait, setmaxnreg.
// Under PYSSM_CUDA_EMULATION each one calls its emulation in tests/cuda_emulation, which
// follows the PTX ISA's definitions (descriptor fields, 128-byte swizzle, mbarrier phases,
// transaction counts).
//
// Shared-memory layouts the descriptors describe (the tensor maps' CU_TENSOR_MAP_SWIZZLE_128B,
// _64B or _32B): rows of 64, 32 or 16 fp16 / bf16 elements (128, 64 or 32 bytes, the "span"),
// 8-row atoms; with 128 bytes the 16-byte chunk c of row r is stored at chunk c ^ (r % 8)
// (64: c ^ (r / 2 % 4), 32: c ^ (r / 4 % 2): address bits 4.. XOR bits 7..). Every tile starts
// on its atom's boundary, so the swizzle of the address bits is the swizzle of the tile.
#pragma once

#include <cuda.h>  // CUtensorMap and its enums (types only: the driver is reached at run time)
#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention/flash.cuh"  // TokenLayout
#include "kernel_launch.cuh"  // (under PYSSM_CUDA_EMULATION: the emulation)

#if !defined(PYSSM_CUDA_EMULATION)
#include "attention/wgmma.cuh"
#endif

#if defined(PYSSM_CUDA_EMULATION) || \
    (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL))
#define PYSSM_SM90_DEVICE 1  // the Hopper kernels' bodies are compiled (sm_90a, or emulated)
#endif

// Defines the launcher `name(const Params& p, cudaStream_t stream)` of a Hopper kernel (one per
// dtype and head size, each in its own translation unit): `call(p, stream)` when the build has
// sm_90a code (PYSSM_SM90A, CMakeLists.txt), cudaErrorNotSupported otherwise (the kernel's body
// is empty then, and the caller takes the portable path).
#ifdef PYSSM_SM90A
#define PYSSM_SM90_LAUNCHER(name, Params, call) \
  cudaError_t name(const Params& p, cudaStream_t stream) { return call(p, stream); }
#else
#define PYSSM_SM90_LAUNCHER(name, Params, call) \
  cudaError_t name(const Params&, cudaStream_t) { return cudaErrorNotSupported; }
#endif

namespace pyssm {
namespace sm90 {

#ifdef PYSSM_CUDA_EMULATION
template <int N, typename T>
inline void wgmma_ss(float (&d)[N / 2], uint64_t a, uint64_t b, int scale_d) {
  cuda_emulation::wgmma<T>(d, N, nullptr, a, b, false, scale_d);
}
template <int N, typename T>
inline void wgmma_ss_tt(float (&d)[N / 2], uint64_t a, uint64_t b, int scale_d) {
  cuda_emulation::wgmma<T>(d, N, nullptr, a, b, true, scale_d, true);
}
template <int N, typename T>
inline void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b, int scale_d) {
  cuda_emulation::wgmma<T>(d, N, a, 0, b, true, scale_d);
}
#endif

// ------------------------------------------------------------------------------------------
// device side (the bodies exist only where PYSSM_SM90_DEVICE is defined)
// ------------------------------------------------------------------------------------------
#ifdef PYSSM_SM90_DEVICE

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
#ifdef PYSSM_CUDA_EMULATION
  return cuda_emulation::smem_address(p);
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// mbarrier: `count` arrivals (and any transaction bytes announced) complete a phase.
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
#ifdef PYSSM_CUDA_EMULATION
  cuda_emulation::mbar_init(smem_u32(bar), count);
#else
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
#endif
}
// makes the initialised barriers visible to the async proxy (TMA) and the other threads
// (followed by a __syncthreads)
__device__ __forceinline__ void fence_barrier_init() {
#ifndef PYSSM_CUDA_EMULATION
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
#ifdef PYSSM_CUDA_EMULATION
  cuda_emulation::mbar_arrive(smem_u32(bar), 0);
#else
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
#endif
}
// one arrival, and `bytes` more transaction bytes the phase waits for (the TMA loads' sizes)
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#ifdef PYSSM_CUDA_EMULATION
  cuda_emulation::mbar_arrive(smem_u32(bar), bytes);
#else
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)),
               "r"(bytes)
               : "memory");
#endif
}
// waits until the phase of parity `parity` has completed (a fresh barrier is in phase 0, so
// parity 1 passes at once: the producer's first pass over empty stages). kBounded: a phase
// that never completes (a bug in the pipeline's counts) traps after a few seconds of spinning,
// an error the caller sees, instead of a kernel that never returns; it costs a register, which
// the backward's consumers do not have to spare.
template <bool kBounded = true>
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
#ifdef PYSSM_CUDA_EMULATION
  cuda_emulation::mbar_wait(smem_u32(bar), parity);
#else
  const uint32_t addr = smem_u32(bar);
  uint32_t done = 0;
  for (uint32_t tries = 0; !done; ++tries) {
    if (kBounded && tries == (1u << 27)) __trap();
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.b32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  }
#endif
}

// TMA: the box at element coordinates (c0 innermost .. c3) of `map` into shared memory at
// `dst` (1024-byte aligned), swizzled as the map says, zero-filled outside the tensor; the
// copy's bytes complete a transaction on `bar`.
__device__ __forceinline__ void tma_load_4d(void* dst, const CUtensorMap* map, int c0, int c1,
                                            int c2, int c3, uint64_t* bar) {
#ifdef PYSSM_CUDA_EMULATION
  cuda_emulation::tma_load(smem_u32(dst), map, c0, c1, c2, c3, smem_u32(bar));
#else
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
      "[%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3),
      "r"(smem_u32(bar))
      : "memory");
#endif
}

// TMA reduce-add: the fp32 box at coordinates (c0 .. c3) of `map` += the tile at `src` in
// shared memory (1024-byte aligned, swizzled as the map says); elements outside the tensor are
// dropped. Asynchronous, in this thread's bulk async-group: the tile may be rewritten only
// after bulk_wait_read covers the group, and the thread must wait for it before it exits. The
// threads that wrote the tile make their stores visible to it first (fence_proxy_async, then
// a barrier with the issuing thread).
__device__ __forceinline__ void tma_reduce_add_4d(const CUtensorMap* map, int c0, int c1, int c2,
                                                  int c3, const void* src) {
#ifdef PYSSM_CUDA_EMULATION
  cuda_emulation::tma_reduce_add(map, c0, c1, c2, c3, smem_u32(src));
#else
  asm volatile(
      "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add.tile.bulk_group "
      "[%0, {%2, %3, %4, %5}], [%1];\n" ::"l"(reinterpret_cast<uint64_t>(map)),
      "r"(smem_u32(src)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
#endif
}
// Closes this thread's bulk async-group (the TMA reductions issued since the last one).
__device__ __forceinline__ void bulk_commit() {
#ifdef PYSSM_CUDA_EMULATION
  cuda_emulation::bulk_commit();
#else
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#endif
}
// Returns once at most N of this thread's bulk groups are still reading shared memory
// (their sources may be rewritten) ...
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
#ifdef PYSSM_CUDA_EMULATION
  cuda_emulation::bulk_wait(N);
#else
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
#endif
}
// ... or are pending at all (their writes to global memory done).
template <int N>
__device__ __forceinline__ void bulk_wait() {
#ifdef PYSSM_CUDA_EMULATION
  cuda_emulation::bulk_wait(N);
#else
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Barrier `id` (1-15; 0 is __syncthreads) among `count` threads (a multiple of 32)
__device__ __forceinline__ void named_barrier_sync(int id, int count) {
#ifdef PYSSM_CUDA_EMULATION
  cuda_emulation::named_barrier_sync(id, count);
#else
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
#endif
}
// Makes this thread's ordinary shared-memory stores visible to the async proxy (wgmma operands
// read from shared memory); before the barrier that hands them over.
__device__ __forceinline__ void fence_proxy_async() {
#ifndef PYSSM_CUDA_EMULATION
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// wgmma ordering: fence before the first wgmma that reads registers written by other
// instructions (accumulators rescaled, A fragments packed); commit closes a group; wait<N>
// returns once at most N groups are pending.
__device__ __forceinline__ void wgmma_fence() {
#ifndef PYSSM_CUDA_EMULATION
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef PYSSM_CUDA_EMULATION
  cuda_emulation::wgmma_commit();
#else
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#ifdef PYSSM_CUDA_EMULATION
  cuda_emulation::wgmma_wait(N);
#else
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Keeps the compiler from moving reads of an accumulator across the wait that completes it
// (the asm statements of wgmma name the registers, the wait does not).
template <int N>
__device__ __forceinline__ void fence_operands(float (&r)[N]) {
#ifndef PYSSM_CUDA_EMULATION
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
#endif
}

// Register budget per warpgroup: the producer gives registers back, the consumers take them.
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
#ifndef PYSSM_CUDA_EMULATION
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
#ifndef PYSSM_CUDA_EMULATION
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}

#endif  // PYSSM_SM90_DEVICE

// Matrix descriptors (PTX ISA, "matrix descriptor" of wgmma): start address >> 4 in bits
// 0-13, leading-dimension byte offset >> 4 in 16-29, stride-dimension byte offset >> 4 in
// 32-45, base offset 0 (tiles aligned to their swizzle atom), swizzle mode in 62-63 (1: 128
// bytes, 2: 64, 3: 32). `span`: the swizzled row's bytes, 128, 64 or 32 (64, 32 or 16
// fp16 / bf16 elements); its atom is 8 rows (8 span bytes).
__host__ __device__ constexpr uint64_t swizzle_mode(int span) {
  return span == 128 ? 1 : span == 64 ? 2 : 3;
}
__host__ __device__ constexpr uint64_t make_desc(uint32_t addr, uint32_t lbo, uint32_t sbo,
                                                 int span) {
  return uint64_t((addr >> 4) & 0x3FFF) | (uint64_t((lbo >> 4) & 0x3FFF) << 16) |
         (uint64_t((sbo >> 4) & 0x3FFF) << 32) | (swizzle_mode(span) << 62);
}
// K-major operand (Q as A, K as B): rows of `span` bytes, 8-row groups one atom apart; the 16
// elements of one k-step are 32 bytes into the row (the caller adds 32 bytes a step to `addr`
// within a row). The leading offset is unused by swizzled K-major layouts (1, as the ISA
// assumes).
__host__ __device__ constexpr uint64_t make_desc_k(uint32_t addr, int span = 128) {
  return make_desc(addr, 16, 8 * span, span);
}
// MN-major operand (V as B of P V): rows are the reduction (keys), span / 2 output columns a
// row; the next 8 keys one atom on, the next span / 2 columns `column_block_bytes` on.
__host__ __device__ constexpr uint64_t make_desc_mn(uint32_t addr, uint32_t column_block_bytes,
                                                    int span = 128) {
  return make_desc(addr, column_block_bytes, 8 * span, span);
}

// ------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------

// A 4-d tensor map of fp16, bf16 or fp32 elements (T) for TMA tile copies swizzled over
// `span` bytes (128, 64 or 32): dims innermost first, strides in bytes of dims 1-3 (multiples
// of 16), box in elements (box[0] * sizeof(T) == span). Out-of-bounds elements load as zeros
// and are dropped by stores and reductions.
template <typename T>
cudaError_t make_tensor_map_4d(CUtensorMap* map, const void* base, const uint64_t (&dims)[4],
                               const uint64_t (&strides)[3], const uint32_t (&box)[4],
                               int span) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16> ||
                    std::is_same_v<T, float>,
                "tensor maps of fp16, bf16 or fp32");
#ifdef PYSSM_CUDA_EMULATION
  return cuda_emulation::encode_tensor_map(map, base, int(sizeof(T)), dims, strides, box, span);
#else
  using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                              const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                              const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                              CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static Encode encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      fn = nullptr;
    return reinterpret_cast<Encode>(fn);
  }();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUtensorMapDataType type =
      std::is_same_v<T, float>           ? CU_TENSOR_MAP_DATA_TYPE_FLOAT32
      : std::is_same_v<T, __nv_bfloat16> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                         : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const CUresult r = encode(
      map, type, 4, const_cast<void*>(base), dims, strides, box, element_strides,
      CU_TENSOR_MAP_INTERLEAVE_NONE,
      span == 128 ? CU_TENSOR_MAP_SWIZZLE_128B
      : span == 64 ? CU_TENSOR_MAP_SWIZZLE_64B
                   : CU_TENSOR_MAP_SWIZZLE_32B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  // a layout the driver refuses (a stride it does not take, say): not supported here, so the
  // launchers take the portable kernels (nothing has been launched yet)
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorNotSupported;
#endif
}

// The tensor map of a (batch, tokens, heads, head_dim) tensor of T at layout l (flash.cuh's
// TokenLayout; packed sequences as one batch of all tokens) for boxes of `cols` columns from one
// head and `rows` tokens, swizzled over cols * sizeof(T) bytes.
template <typename T>
cudaError_t make_token_map(CUtensorMap* map, const void* base, int head_dim, uint64_t heads,
                           const TokenLayout& l, uint64_t tokens, uint64_t batches, int cols,
                           int rows) {
  const uint64_t dims[4] = {uint64_t(head_dim), heads, tokens, batches};
  const uint64_t strides[3] = {uint64_t(l.head) * sizeof(T), uint64_t(l.row) * sizeof(T),
                               uint64_t(l.batch) * sizeof(T)};
  const uint32_t box[4] = {uint32_t(cols), 1, uint32_t(rows), 1};
  return make_tensor_map_4d<T>(map, base, dims, strides, box, int(cols * sizeof(T)));
}

// A contiguous (batch, tokens, heads, head_dim) tensor's layout
inline TokenLayout contiguous_layout(int64_t heads, int64_t head_dim, int64_t tokens) {
  return {heads * head_dim, head_dim, tokens * heads * head_dim};
}

}  // namespace sm90
}  // namespace pyssm
