// Launcher interface of the CUDA selective scan (csrc/ss2d/selective_scan_kernel.cuh holds the
// kernels, one selective_scan_<dtype>.cu per input dtype instantiates them). Torch-free.
#pragma once

#include <cuda_runtime_api.h>

#include "kernel_types.h"

namespace pyssm {

// Every pointer is to contiguous memory. u, delta: (batch, channels, L) and B, C:
// (batch, groups, N, L) in the input dtype; A: (channels, N), D and delta_bias: (channels,) in
// the accumulation type (double for float64 input, float otherwise); D, delta_bias may be null.
struct SelectiveScanParams {
  const void *u, *delta, *A, *B, *C, *D, *delta_bias;
  void* out;  // (batch, channels, L), accumulation type
  // (batch, channels, N), accumulation type, or null: where the forward writes the state after
  // the last position (selective_scan_with_state; at L = 0 nothing is written, the caller
  // zeroes it); the kernels without it are instantiated apart
  void* last_state;
  int64_t batch, channels, length, groups, dstate;
  bool delta_softplus;
};

// The backward's extra operands, all in the accumulation type: dout and the outputs du, ddelta
// (batch, channels, L); dA_part (batch, channels, N), dD_part and dbias_part (batch, channels),
// summed over batch by the caller; dB, dC (batch, groups, N, L), zeroed by the caller (the
// channels of a group add into them atomically); carries: scratch of
// selective_scan_carry_elems() elements (the state at the start of every tile).
// channels_per_block: channels of one group a backward block takes (dB and dC summed over them
// on chip, so the atomics into dB, dC drop that many times); 0 picks the most, up to
// kMaxChannelsPerBlock, that still give every SM four blocks. d_state above 4 takes 1.
// dlast_state: the gradient of the forward's last state (batch, channels, N) in the
// accumulation type, or null (no gradient reaches it: the kernels without it are apart).
struct SelectiveScanBwdParams {
  SelectiveScanParams fwd;
  const void *dout, *dlast_state;
  void *du, *ddelta, *dA_part, *dB, *dC, *dD_part, *dbias_part, *carries;
  int64_t channels_per_block;
};
constexpr int kMaxChannelsPerBlock = 8;

// Largest d_state the CUDA kernels take; positions one block scans per step (a tile).
constexpr int64_t kSelectiveScanMaxState = 16;
constexpr int kSelectiveScanTile = 512;

// Elements of the backward's scratch: the state entering each tile, per row and state.
inline int64_t selective_scan_carry_elems(const SelectiveScanParams& p) {
  const int64_t tiles = (p.length + kSelectiveScanTile - 1) / kSelectiveScanTile;
  return p.batch * p.channels * tiles * p.dstate;
}

cudaError_t selective_scan_fwd_fp64(const SelectiveScanParams& p, cudaStream_t stream);
cudaError_t selective_scan_fwd_fp32(const SelectiveScanParams& p, cudaStream_t stream);
cudaError_t selective_scan_fwd_fp16(const SelectiveScanParams& p, cudaStream_t stream);
cudaError_t selective_scan_fwd_bf16(const SelectiveScanParams& p, cudaStream_t stream);
cudaError_t selective_scan_bwd_fp64(const SelectiveScanBwdParams& p, cudaStream_t stream);
cudaError_t selective_scan_bwd_fp32(const SelectiveScanBwdParams& p, cudaStream_t stream);
cudaError_t selective_scan_bwd_fp16(const SelectiveScanBwdParams& p, cudaStream_t stream);
cudaError_t selective_scan_bwd_bf16(const SelectiveScanBwdParams& p, cudaStream_t stream);

}  // namespace pyssm
