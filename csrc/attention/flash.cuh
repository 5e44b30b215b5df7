// Launcher interface of the CUDA flash attention: forward (flash_kernel.cuh, one
// flash_<dtype>_hd<head_dim>.cu per dtype and head size) and backward (flash_bwd_kernel.cuh,
// flash_bwd_<dtype>_hd<head_dim>.cu). Torch-free.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace pyssm {

// Where one input's elements lie: head_dim contiguous, then `row` elements between consecutive
// tokens, `head` between heads and, in a dense batch, `batch` between sequences (a packed batch
// uses only row and head). Contiguous (tokens, heads, d): {heads d, d, seqlen heads d}; a slice of
// a fused (B, N, 3, H, d) qkv: {3 H d, d, 3 N H d}; torch's SDPA layout (B, H, N, d) transposed:
// {d, N d, H N d}. Every stride a multiple of 8 elements (16 bytes), the data 16-byte aligned.
struct TokenLayout {
  int64_t row, head, batch;
  bool operator==(const TokenLayout&) const = default;
};

// q (tokens, heads, d), k, v (tokens, heads_k, d): fp16 / bf16 at their layouts (k's and v's
// the same), the tokens of sequence b at [start_b, start_b + len_b): start_b = b * seqlen
// (dense batches) or cu_seqlens[b] (packed; the keys at cu_seqlens_k[b] where that is given,
// else at q's offsets); a dense batch with seqused_k uses the first seqused_k[b] of its keys.
// out like q, contiguous. lse: float, (batch, heads, seqlen_q) dense or (heads, total_q) packed.
struct FlashParams {
  const void *q, *k, *v;
  TokenLayout q_layout, kv_layout;
  void* out;
  float* lse;
  const int* cu_seqlens;       // device pointer, or null for a dense batch
  const int* cu_seqlens_k;     // the keys' own offsets (packed), or null: cu_seqlens
  const int* seqused_k;        // dense: keys [0, seqused_k[b]) of sequence b (a KV cache), or null
  int64_t batch, heads, heads_k, seqlen_q, seqlen_k;  // seqlen_*: max_seqlen(_k) packed
  int64_t total_q, total_k;    // tokens of q, of k and v
  float scale_log2;            // softmax_scale * log2(e)
  bool causal;
};

// Backward. q, k, v as FlashParams says (q_layout, kv_layout); out, dout contiguous, q's
// shape; dq like q, dk, dv like k, heads and head_dim packed, their tokens dq_row and dkv_row
// elements apart (views into one fused qkv gradient, or contiguous); lse, dlse (may be null):
// float, lse's layout. Workspace from the caller: delta (float, lse's layout) and dq_accum
// (float, q's shape, contiguous, zero-filled by the launcher). All 16-byte aligned.
struct FlashBwdParams {
  const void *q, *k, *v, *out, *dout;
  TokenLayout q_layout, kv_layout;
  void *dq, *dk, *dv;
  int64_t dq_row, dkv_row;     // of dq, of dk and dv
  const float *lse, *dlse;
  float *delta, *dq_accum;
  const int* cu_seqlens;       // device pointer, or null for a dense batch
  const int* cu_seqlens_k;     // the keys' own offsets (packed), or null: cu_seqlens
  const int* seqused_k;        // dense: keys [0, seqused_k[b]) of sequence b (a KV cache), or null
  int64_t batch, heads, heads_k, seqlen_q, seqlen_k;  // seqlen_*: max_seqlen(_k) packed
  int64_t total_q, total_k;    // tokens of q, of k and v
  float scale;                 // softmax_scale
  float scale_log2;            // softmax_scale * log2(e)
  bool causal;
  bool dq_atomics;             // Hopper backward: dQ by fp32 atomics, not TMA reduce-adds
};

// head sizes with a kernel (others run the composed path)
inline bool flash_supported_head_dim(int64_t d) {
  return d == 32 || d == 64 || d == 72 || d == 80 || d == 96 || d == 128;
}

#define PYSSM_FLASH_DECLARE(tag, hd) \
  cudaError_t flash_fwd_##tag##_hd##hd(const FlashParams& p, cudaStream_t stream); \
  cudaError_t flash_bwd_##tag##_hd##hd(const FlashBwdParams& p, cudaStream_t stream);
#define PYSSM_FLASH_DECLARE_ALL(tag)                                                   \
  PYSSM_FLASH_DECLARE(tag, 32) PYSSM_FLASH_DECLARE(tag, 64) PYSSM_FLASH_DECLARE(tag, 72) \
  PYSSM_FLASH_DECLARE(tag, 80) PYSSM_FLASH_DECLARE(tag, 96) PYSSM_FLASH_DECLARE(tag, 128)
PYSSM_FLASH_DECLARE_ALL(fp16)
PYSSM_FLASH_DECLARE_ALL(bf16)
#undef PYSSM_FLASH_DECLARE_ALL
#undef PYSSM_FLASH_DECLARE

// The forward's Hopper path (flash_sm90_kernel.cuh; flash_sm90_<dtype>_hd<head_dim>.cu), for
// sm_90 GPUs and head_dim 64, 72, 80, 96 and 128. Returns cudaErrorNotSupported where it
// cannot run (a build without sm_90a code, no driver entry point for tensor maps): the caller
// then takes the portable forward.
inline bool flash_sm90_head_dim(int64_t d) {
  return d == 64 || d == 72 || d == 80 || d == 96 || d == 128;
}
#define PYSSM_FLASH_SM90_DECLARE(tag, hd) \
  cudaError_t flash_fwd_sm90_##tag##_hd##hd(const FlashParams& p, cudaStream_t stream);
#define PYSSM_FLASH_SM90_DECLARE_ALL(tag)                                                    \
  PYSSM_FLASH_SM90_DECLARE(tag, 64) PYSSM_FLASH_SM90_DECLARE(tag, 72)                        \
  PYSSM_FLASH_SM90_DECLARE(tag, 80) PYSSM_FLASH_SM90_DECLARE(tag, 96)                        \
  PYSSM_FLASH_SM90_DECLARE(tag, 128)
PYSSM_FLASH_SM90_DECLARE_ALL(fp16)
PYSSM_FLASH_SM90_DECLARE_ALL(bf16)
#undef PYSSM_FLASH_SM90_DECLARE
// The backward's Hopper path (flash_bwd_sm90_kernel.cuh; flash_bwd_sm90_<dtype>_hd<head_dim>.cu),
// the same head sizes and contract.
#define PYSSM_FLASH_SM90_DECLARE(tag, hd) \
  cudaError_t flash_bwd_sm90_##tag##_hd##hd(const FlashBwdParams& p, cudaStream_t stream);
PYSSM_FLASH_SM90_DECLARE_ALL(fp16)
PYSSM_FLASH_SM90_DECLARE_ALL(bf16)
#undef PYSSM_FLASH_SM90_DECLARE
#undef PYSSM_FLASH_SM90_DECLARE_ALL

}  // namespace pyssm
