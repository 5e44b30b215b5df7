// Launcher interface of the fused CUDA SS2D forward (csrc/ss2d/ss2d_kernel.cuh; one
// ss2d_<dtype>.cu per input dtype). Torch-free.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace pyssm {

// x: (B, L = H*W, D) channels-last in the input dtype. Everything else in the accumulation
// type (double for float64 input, float otherwise), contiguous:
//   z (B, L, 4, R + 2N): x_proj of every pixel for the four directions (dt, B, C), pixel order
//   dt_w (4, D, R), dt_b (4, D), A (4*D, N) = -exp(A_logs), Ds (4*D)
//   y (B, L, D): zeroed by the caller; the four directions add into it
//   scratch: 3 * B * 4 * chunks * D * N elements when chunks > 1 (chunk summaries, carries)
struct Ss2dParams {
  const void* x;
  const void *z, *dt_w, *dt_b, *A, *Ds;
  void* y;
  void* scratch;
  int64_t batch, height, width, dim, rank, dstate;
  int64_t chunk_len, chunks;  // the scan of each direction is cut into `chunks` pieces
};

constexpr int64_t kSs2dMaxState = 16;

// Chunks that give a grid of a few blocks per SM at any batch (1 when the batch alone does).
inline int64_t ss2d_chunks(int64_t batch, int64_t length, int64_t dim, int sms) {
  const int64_t groups = (dim + 127) / 128;
  const int64_t want = 4 * int64_t(sms);
  int64_t chunks = (want + batch * 4 * groups - 1) / (batch * 4 * groups);
  const int64_t most = (length + 63) / 64;  // chunks of 64 positions at least
  if (chunks > most) chunks = most;
  return chunks < 1 ? 1 : chunks;
}

// Threads per block (one per channel, up to 128) and the dynamic shared memory a block uses:
// the z rows (accumulation type) and the x values (input type) of a tile of 32 positions.
constexpr int kSs2dTilePositions = 32;
constexpr size_t kSs2dMaxSmem = 48 * 1024;
inline int ss2d_threads(int64_t dim) { return int(dim >= 128 ? 128 : (dim + 31) / 32 * 32); }
inline size_t ss2d_smem_bytes(int64_t dim, int64_t rank, int64_t dstate, size_t x_bytes,
                              size_t acc_bytes) {
  return size_t(kSs2dTilePositions) *
         (size_t(rank + 2 * dstate) * acc_bytes + size_t(ss2d_threads(dim)) * x_bytes);
}

inline int64_t ss2d_scratch_elems(const Ss2dParams& p) {
  return p.chunks > 1 ? 3 * p.batch * 4 * p.chunks * p.dim * p.dstate : 0;
}

cudaError_t ss2d_fwd_fp64(const Ss2dParams& p, cudaStream_t stream);
cudaError_t ss2d_fwd_fp32(const Ss2dParams& p, cudaStream_t stream);
cudaError_t ss2d_fwd_fp16(const Ss2dParams& p, cudaStream_t stream);
cudaError_t ss2d_fwd_bf16(const Ss2dParams& p, cudaStream_t stream);

}  // namespace pyssm
