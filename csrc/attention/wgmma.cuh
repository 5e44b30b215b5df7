// wgmma.mma_async wrappers for the Hopper flash-attention kernels (flash_sm90_kernel.cuh, flash_bwd_sm90_kernel.cuh):
// m64nNk16 with fp32 accumulators and fp16 / bf16 operands, N 8, 16, 32, 64 and 128.
//   wgmma_ss<N, T>(d, a, b, scale_d): A and B from shared memory through matrix descriptors
//     (sm90.cuh), both K-major (transpose flags 0).
//   wgmma_ss_tt<N, T>(d, a, b, scale_d): both from shared memory, both MN-major (transpose
//     flags 1: A stored with its M dimension contiguous; the backward's dQ = dS K: N 8 to 32).
//   wgmma_rs<N, T>(d, a, b, scale_d): A from registers (four 32-bit registers a thread, the
//     mma.sync m16n8k16 A layout per warp, warp w holding rows 16w..16w+15), B from shared
//     memory MN-major (transpose flag 1).
// scale_d 0: d = A B; 1: d += A B. d: N / 2 floats a thread, the accumulator layout of
// flash_sm90_kernel.cuh. Only compiled for sm_90a (the caller's guard).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace pyssm {
namespace sm90 {

template <int N, typename T>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t a, uint64_t b, int scale_d);
template <int N, typename T>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b,
                                         int scale_d);
template <int N, typename T>
__device__ __forceinline__ void wgmma_ss_tt(float (&d)[N / 2], uint64_t a, uint64_t b,
                                            int scale_d);

// The specialisations, one macro per N applied to each dtype: the operand lists are long, not
// complicated.
#define PYSSM_WGMMA_N8(T, TY)                                                                      \
  template <>                                                                                      \
  __device__ __forceinline__ void wgmma_ss<8, T>(float (&d)[4], uint64_t a, uint64_t b,            \
                                                 int scale_d) {                                    \
    asm volatile(                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %6, 0;\n"                                                  \
      "wgmma.mma_async.sync.aligned.m64n8k16.f32." TY "." TY " "                                   \
      "{%0, %1, %2, %3}, "                                                                         \
      "%4, %5, p, 1, 1, 0, 0;\n}\n"                                                                \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                             \
      : "l"(a), "l"(b), "r"(scale_d));                                                             \
  }                                                                                                \
  template <>                                                                                      \
  __device__ __forceinline__ void wgmma_rs<8, T>(float (&d)[4], const uint32_t (&a)[4],            \
                                                 uint64_t b, int scale_d) {                        \
    asm volatile(                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"                                                  \
      "wgmma.mma_async.sync.aligned.m64n8k16.f32." TY "." TY " "                                   \
      "{%0, %1, %2, %3}, "                                                                         \
      "{%4, %5, %6, %7}, %8, p, 1, 1, 1;\n}\n"                                                     \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                             \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d));                         \
  }                                                                                                \
  template <>                                                                                      \
  __device__ __forceinline__ void wgmma_ss_tt<8, T>(float (&d)[4], uint64_t a, uint64_t b,         \
                                                   int scale_d) {                                  \
    asm volatile(                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %6, 0;\n"                                                  \
      "wgmma.mma_async.sync.aligned.m64n8k16.f32." TY "." TY " "                                   \
      "{%0, %1, %2, %3}, "                                                                         \
      "%4, %5, p, 1, 1, 1, 1;\n}\n"                                                                \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                             \
      : "l"(a), "l"(b), "r"(scale_d));                                                             \
  }
#define PYSSM_WGMMA_N16(T, TY)                                                                     \
  template <>                                                                                      \
  __device__ __forceinline__ void wgmma_ss<16, T>(float (&d)[8], uint64_t a, uint64_t b,           \
                                                 int scale_d) {                                    \
    asm volatile(                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"                                                 \
      "wgmma.mma_async.sync.aligned.m64n16k16.f32." TY "." TY " "                                  \
      "{%0, %1, %2, %3, %4, %5, %6, %7}, "                                                         \
      "%8, %9, p, 1, 1, 0, 0;\n}\n"                                                                \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]) \
      : "l"(a), "l"(b), "r"(scale_d));                                                             \
  }                                                                                                \
  template <>                                                                                      \
  __device__ __forceinline__ void wgmma_rs<16, T>(float (&d)[8], const uint32_t (&a)[4],           \
                                                 uint64_t b, int scale_d) {                        \
    asm volatile(                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"                                                 \
      "wgmma.mma_async.sync.aligned.m64n16k16.f32." TY "." TY " "                                  \
      "{%0, %1, %2, %3, %4, %5, %6, %7}, "                                                         \
      "{%8, %9, %10, %11}, %12, p, 1, 1, 1;\n}\n"                                                  \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d));                         \
  }                                                                                                \
  template <>                                                                                      \
  __device__ __forceinline__ void wgmma_ss_tt<16, T>(float (&d)[8], uint64_t a, uint64_t b,        \
                                                    int scale_d) {                                 \
    asm volatile(                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"                                                 \
      "wgmma.mma_async.sync.aligned.m64n16k16.f32." TY "." TY " "                                  \
      "{%0, %1, %2, %3, %4, %5, %6, %7}, "                                                         \
      "%8, %9, p, 1, 1, 1, 1;\n}\n"                                                                \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]) \
      : "l"(a), "l"(b), "r"(scale_d));                                                             \
  }
#define PYSSM_WGMMA_N32(T, TY)                                                                     \
  template <>                                                                                      \
  __device__ __forceinline__ void wgmma_ss<32, T>(float (&d)[16], uint64_t a, uint64_t b,          \
                                                 int scale_d) {                                    \
    asm volatile(                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"                                                 \
      "wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY " "                                  \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "                   \
      "%16, %17, p, 1, 1, 0, 0;\n}\n"                                                              \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]) \
      : "l"(a), "l"(b), "r"(scale_d));                                                             \
  }                                                                                                \
  template <>                                                                                      \
  __device__ __forceinline__ void wgmma_rs<32, T>(float (&d)[16], const uint32_t (&a)[4],          \
                                                 uint64_t b, int scale_d) {                        \
    asm volatile(                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"                                                 \
      "wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY " "                                  \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "                   \
      "{%16, %17, %18, %19}, %20, p, 1, 1, 1;\n}\n"                                                \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d));                         \
  }                                                                                                \
  template <>                                                                                      \
  __device__ __forceinline__ void wgmma_ss_tt<32, T>(float (&d)[16], uint64_t a, uint64_t b,       \
                                                    int scale_d) {                                 \
    asm volatile(                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"                                                 \
      "wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY " "                                  \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "                   \
      "%16, %17, p, 1, 1, 1, 1;\n}\n"                                                              \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]) \
      : "l"(a), "l"(b), "r"(scale_d));                                                             \
  }
#define PYSSM_WGMMA_N64(T, TY)                                                                     \
  template <>                                                                                      \
  __device__ __forceinline__ void wgmma_ss<64, T>(float (&d)[32], uint64_t a, uint64_t b,          \
                                                 int scale_d) {                                    \
    asm volatile(                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                 \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " "                                  \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                     \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "          \
      "%32, %33, p, 1, 1, 0, 0;\n}\n"                                                              \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
      : "l"(a), "l"(b), "r"(scale_d));                                                             \
  }                                                                                                \
  template <>                                                                                      \
  __device__ __forceinline__ void wgmma_rs<64, T>(float (&d)[32], const uint32_t (&a)[4],          \
                                                 uint64_t b, int scale_d) {                        \
    asm volatile(                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                 \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " "                                  \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                     \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "          \
      "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                                \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d));                         \
  }                                                                                                \
  template <>                                                                                      \
  __device__ __forceinline__ void wgmma_ss_tt<64, T>(float (&d)[32], uint64_t a, uint64_t b,       \
                                                    int scale_d) {                                 \
    asm volatile(                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                 \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " "                                  \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                     \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "          \
      "%32, %33, p, 1, 1, 1, 1;\n}\n"                                                              \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
      : "l"(a), "l"(b), "r"(scale_d));                                                             \
  }
#define PYSSM_WGMMA_N128(T, TY)                                                                    \
  template <>                                                                                      \
  __device__ __forceinline__ void wgmma_ss<128, T>(float (&d)[64], uint64_t a, uint64_t b,         \
                                                 int scale_d) {                                    \
    asm volatile(                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                 \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " "                                 \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                     \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"            \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"            \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "          \
      "%64, %65, p, 1, 1, 0, 0;\n}\n"                                                              \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
      : "l"(a), "l"(b), "r"(scale_d));                                                             \
  }                                                                                                \
  template <>                                                                                      \
  __device__ __forceinline__ void wgmma_rs<128, T>(float (&d)[64], const uint32_t (&a)[4],         \
                                                 uint64_t b, int scale_d) {                        \
    asm volatile(                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                 \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " "                                 \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                     \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"            \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"            \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "          \
      "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                                \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d));                         \
  }

PYSSM_WGMMA_N8(__half, "f16")
PYSSM_WGMMA_N8(__nv_bfloat16, "bf16")
PYSSM_WGMMA_N16(__half, "f16")
PYSSM_WGMMA_N16(__nv_bfloat16, "bf16")
PYSSM_WGMMA_N32(__half, "f16")
PYSSM_WGMMA_N32(__nv_bfloat16, "bf16")
PYSSM_WGMMA_N64(__half, "f16")
PYSSM_WGMMA_N64(__nv_bfloat16, "bf16")
PYSSM_WGMMA_N128(__half, "f16")
PYSSM_WGMMA_N128(__nv_bfloat16, "bf16")
#undef PYSSM_WGMMA_N8
#undef PYSSM_WGMMA_N16
#undef PYSSM_WGMMA_N32
#undef PYSSM_WGMMA_N64
#undef PYSSM_WGMMA_N128

}  // namespace sm90
}  // namespace pyssm
