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
//   states (B, 4, ss2d_state_tiles(L), D), v3 only, or null: the state entering every
//     kSs2dN1Tile-position tile of each direction's scan (from its start, carries included),
//     for the backward (Ss2dBwdParams::states), which then skips its summary pass
struct Ss2dParams {
  const void* x;
  const void *z, *dt_w, *dt_b, *A, *Ds;
  void* y;
  void* scratch;
  void* states;
  int64_t batch, height, width, dim, rank, dstate;
  int64_t chunk_len, chunks;  // the scan of each direction is cut into `chunks` pieces
  bool n1;  // the d_state-1 kernel (ss2d_n1_kernel.cuh, v3); false: the general one (v2)
};

constexpr int64_t kSs2dMaxState = 16;

// Chunks that give a grid of ~blocks_per_sm (16) blocks per SM at any batch (1 when the batch
// alone does): a thread's scan is a serial chain, so the SM hides its latency only with many
// warps (4 blocks per SM, the first choice, left VMamba-T's stage 1 at ~17 of 64 warps per SM).
// Each chunk past the first costs a second pass over its positions, so blocks_per_sm 0 (one
// chunk, one pass) is the other side of that trade.
// v3 (channels_per_block 32, blocks of 8 warps) aims at 2 blocks per SM.
inline int64_t ss2d_chunks(int64_t batch, int64_t length, int64_t dim, int sms,
                           int64_t blocks_per_sm = 16, int64_t channels_per_block = 128) {
  const int64_t groups = (dim + channels_per_block - 1) / channels_per_block;
  const int64_t want = blocks_per_sm * int64_t(sms);
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

// v3, the d_state-1 forward: blocks of 32 channels (a lane each) x 8 warps; a tile of 64
// positions, 8 a warp, loaded while the one before is computed. Its dynamic shared memory, in
// the accumulation type unless named:
//   z rows, two stages (2 x tile x zstride): dt (R, zero-padded to rpad: 8, 16, 32, or whole
//     16-byte vectors), B, C, padding to a vector;
//   y (tile x 32); the warps' segment summaries (warps x 32 x 2);
//   dt_projs_weight (rpad x 32) when dt_rank > 32 (registers otherwise);
//   x, two stages (2 x tile x 32, x's type)
constexpr int kSs2dN1Lanes = 32, kSs2dN1Warps = 8, kSs2dN1Steps = 8;
constexpr int kSs2dN1Tile = kSs2dN1Warps * kSs2dN1Steps;
// The tiles of a scan of `length` positions whose entering states the forward v3 keeps.
__host__ __device__ constexpr int64_t ss2d_state_tiles(int64_t length) {
  return (length + kSs2dN1Tile - 1) / kSs2dN1Tile;
}
// the launcher's bound; the op also checks the device's opt-in limit (99 KB on sm_86 / sm_89,
// 163 KB on sm_80, 227 KB on sm_90), taking v2 or the composed core past it
constexpr size_t kSs2dN1MaxSmem = 200 * 1024;
struct Ss2dN1Layout {
  int rpad, zstride;
  size_t z, y, seg, dtw, x, bytes;
};
__host__ __device__ inline Ss2dN1Layout ss2d_n1_layout(int rank, size_t x_bytes,
                                                       size_t acc_bytes) {
  Ss2dN1Layout l{};
  const int vec = int(16 / acc_bytes);
  // 8, 16 or 32 where the kernel holds dt_projs_weight in registers (dt_rank up to 32): then
  // the rows' offsets are compile-time constants
  l.rpad = rank <= 8 ? 8 : rank <= 16 ? 16 : rank <= 32 ? 32 : (rank + vec - 1) / vec * vec;
  l.zstride = l.rpad + vec;
  size_t at = 0;
  l.z = at;
  at += 2 * size_t(kSs2dN1Tile) * size_t(l.zstride) * acc_bytes;
  l.y = at;
  at += size_t(kSs2dN1Tile) * kSs2dN1Lanes * acc_bytes;
  l.seg = at;
  at += size_t(kSs2dN1Warps) * kSs2dN1Lanes * 2 * acc_bytes;
  l.dtw = at;
  if (rank > 32) at += size_t(l.rpad) * kSs2dN1Lanes * acc_bytes;
  l.x = at;
  at += 2 * size_t(kSs2dN1Tile) * kSs2dN1Lanes * x_bytes;
  l.bytes = at;
  return l;
}

inline int64_t ss2d_scratch_elems(const Ss2dParams& p) {
  return p.chunks > 1 ? 3 * p.batch * 4 * p.chunks * p.dim * p.dstate : 0;
}

// The fused backward (csrc/ss2d/ss2d_bwd_kernel.cuh; one ss2d_bwd_<dtype>.cu per input dtype).
// x as in the forward; dy (B, L, D) in the input dtype, or in the accumulation type when
// dy_acc; z, dt_w, dt_b, A, Ds as in the forward. Outputs, all accumulation type, zeroed by the
// caller:
//   dx (B, L, D): the scans' own input gradient (the four directions add into it)
//   dz (B, L, 4, R + 2N): the gradient of z (the caller applies x_proj's adjoint)
//   partial (B, 4, chunks, N + 2 + R, D): per chunk sums of dA (N planes), dDs, dbias, and the
//     dt_projs_weight gradient (R planes); the caller sums over batch and chunks. v3 with
//     dpre: (B, 4, chunks, 3, D), no dt_projs_weight planes, and
//   dpre (4, B, L, D), v3 only, needed over dt_rank kSs2dBwdN1MaxRank (given at or under it, it
//     selects the same variant; null: the register one): the gradient of delta's
//     pre-activation, written in full (not zeroed); the caller adds dpre dt_projs_weight into
//     dz's dt part and forms dt_projs_weight's gradient, dpre^T dt
// scratch: ss2d_bwd_scratch_elems(p) elements (chunk summaries and carries, tile states).
// chunk_len is a whole number of tiles of ss2d_bwd_tile(dstate) positions.
// states: v3 only, with one chunk (chunks 1), or null: the forward's (Ss2dParams::states);
//   given, the main kernel starts each tile from them and the summary and carry launches are
//   skipped (scratch unused, may be null)
struct Ss2dBwdParams {
  const void *x, *dy;
  bool dy_acc;
  const void *z, *dt_w, *dt_b, *A, *Ds;
  const void* states;
  void *dx, *dz, *partial, *dpre, *scratch;
  int64_t batch, height, width, dim, rank, dstate;
  int64_t chunk_len, chunks;
  bool n1;  // the d_state-1 main kernel (ss2d_bwd_n1_kernel.cuh, v3; chunk_len a multiple of
            // kSs2dN1Tile); false: v1's
  bool n1_summary;  // with n1: the summary pass in v3's layout too; false: v1's
};

// Positions per backward tile: the state of every position of a tile lives in shared memory,
// so larger states take shorter tiles.
__host__ __device__ constexpr int64_t ss2d_bwd_max_state(int64_t dstate) {
  return dstate <= 1 ? 1 : dstate <= 4 ? 4 : dstate <= 8 ? 8 : 16;
}
__host__ __device__ constexpr int64_t ss2d_bwd_tile(int64_t dstate) {
  const int64_t n = ss2d_bwd_max_state(dstate);
  return n == 1 ? 16 : n == 16 ? 4 : 8;
}

// Dynamic shared memory of the backward kernels, all in the accumulation type, the rows padded
// by one so that both the per-thread walks and the per-position sums over channels are free of
// bank conflicts. Both kernels stage a tile: z rows (T x (R + 2N)), x and dy (T x (threads + 1)
// each); the main kernel adds h of every position (threads x (T * maxN + 1)) and dt / dpre
// (threads x (T + 1)).
inline size_t ss2d_bwd_stage_bytes(int64_t dim, int64_t rank, int64_t dstate, size_t acc_bytes) {
  const size_t T = size_t(ss2d_bwd_tile(dstate)), thr = size_t(ss2d_threads(dim));
  return acc_bytes * (T * size_t(rank + 2 * dstate) + 2 * T * (thr + 1));
}
inline size_t ss2d_bwd_smem_bytes(int64_t dim, int64_t rank, int64_t dstate, size_t acc_bytes) {
  const size_t T = size_t(ss2d_bwd_tile(dstate)), thr = size_t(ss2d_threads(dim));
  const size_t maxn = size_t(ss2d_bwd_max_state(dstate));
  return ss2d_bwd_stage_bytes(dim, rank, dstate, acc_bytes) +
         acc_bytes * (thr * (T * maxn + 1) + thr * (T + 1));
}

// The d_state-1 backward's main kernel (v3): blocks and tiles as the forward v3's (32 channels
// x 8 warps, 64 positions). Its dynamic shared memory, accumulation type unless named:
//   z rows, two stages (2 x tile x zstride; rpad 8 or 16 as the forward's, whole 16-byte
//   vectors over 16), x (2 x tile x 32, x's type), dy (2 x tile x 32, room for the
//   accumulation type), the warps' segments (warps x 32 x 4), the per-position terms summed
//   over channels (3 x tile x 36: dpre, the dB and dC terms), du (tile x 32), dt_projs_weight
//   (rpad x 32)
constexpr int kSs2dBwdN1RedStride = 36;  // 32 lanes + 4: 16-byte rows, fewer bank conflicts
struct Ss2dBwdN1Layout {
  int rpad, zstride;
  size_t z, x, dy, seg, red, du, w, bytes;
};
__host__ __device__ inline Ss2dBwdN1Layout ss2d_bwd_n1_layout(int rank, size_t x_bytes,
                                                              size_t acc_bytes) {
  Ss2dBwdN1Layout l{};
  const int vec = int(16 / acc_bytes);
  l.rpad = rank <= 8 ? 8 : rank <= 16 ? 16 : (rank + vec - 1) / vec * vec;
  l.zstride = l.rpad + vec;
  const size_t tile = size_t(kSs2dN1Tile), lanes = size_t(kSs2dN1Lanes);
  size_t at = 0;
  l.z = at;
  at += 2 * tile * size_t(l.zstride) * acc_bytes;
  l.dy = at;
  at += 2 * tile * lanes * acc_bytes;
  l.seg = at;
  at += size_t(kSs2dN1Warps) * lanes * 4 * acc_bytes;
  l.red = at;
  at += 3 * tile * size_t(kSs2dBwdN1RedStride) * acc_bytes;
  l.du = at;
  at += tile * lanes * acc_bytes;
  l.w = at;
  at += size_t(l.rpad) * lanes * acc_bytes;
  l.x = at;
  at += 2 * tile * lanes * x_bytes;
  l.bytes = (at + 15) / 16 * 16;
  return l;
}
// dt_rank up to this: dt_projs_weight and its gradient in registers; over it: in shared memory,
// and the dpre output for the caller's GEMMs
constexpr int64_t kSs2dBwdN1MaxRank = 16;

__host__ __device__ inline int64_t ss2d_bwd_summary_elems(const Ss2dBwdParams& p) {
  return p.batch * 4 * p.chunks * p.dim * p.dstate;
}
// Five chunk summaries (decay, end state from zero, adjoint summary, state in, adjoint in),
// then the state entering each tile from zero and the dt summed before it.
inline int64_t ss2d_bwd_scratch_elems(const Ss2dBwdParams& p) {
  const int64_t tiles = p.batch * 4 * p.chunks * (p.chunk_len / ss2d_bwd_tile(p.dstate)) * p.dim;
  return 5 * ss2d_bwd_summary_elems(p) + tiles * (p.dstate + 1);
}

// x_proj on tensor cores for 16-bit x (ss2d_xproj_kernel.cuh; compiled in ss2d_fp16.cu and
// ss2d_bf16.cu), both ways; fp32 unless named:
//   forward (add null): out (rows, cols) = a W^T, with a = x (rows, dim) in x's dtype, out = z;
//   backward:           out (rows, cols) = add + a W^T in x's dtype, with a = dz (rows, dim),
//                       W = x_proj's weight transposed (cols = d_inner, dim = 4 (R + 2N)) and
//                       add = the scans' dx; with a_split (rows, 2 dim) bf16, also a as
//                       bf16 hi (columns 0..dim-1) + lo (dim..2 dim-1), for dW_x's GEMM.
// a's rows and W's contiguous and 16-byte aligned (dim a multiple of 8), cols even; anything
// else returns cudaErrorInvalidValue (the op takes the GEMMs then).
struct Ss2dXprojParams {
  const void* a;
  const float* w;
  const float* add;
  void* out;
  void* a_split;
  int64_t rows, dim, cols;
};
cudaError_t ss2d_xproj_fp16(const Ss2dXprojParams& p, cudaStream_t stream);
cudaError_t ss2d_xproj_bf16(const Ss2dXprojParams& p, cudaStream_t stream);

cudaError_t ss2d_bwd_fp64(const Ss2dBwdParams& p, cudaStream_t stream);
cudaError_t ss2d_bwd_fp32(const Ss2dBwdParams& p, cudaStream_t stream);
cudaError_t ss2d_bwd_fp16(const Ss2dBwdParams& p, cudaStream_t stream);
cudaError_t ss2d_bwd_bf16(const Ss2dBwdParams& p, cudaStream_t stream);

cudaError_t ss2d_fwd_fp64(const Ss2dParams& p, cudaStream_t stream);
cudaError_t ss2d_fwd_fp32(const Ss2dParams& p, cudaStream_t stream);
cudaError_t ss2d_fwd_fp16(const Ss2dParams& p, cudaStream_t stream);
cudaError_t ss2d_fwd_bf16(const Ss2dParams& p, cudaStream_t stream);

}  // namespace pyssm
