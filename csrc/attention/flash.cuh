// Launcher interface of the CUDA flash attention: forward (flash_kernel.cuh, one
// flash_<dtype>_hd<head_dim>.cu per dtype and head size) and backward (flash_bwd_kernel.cuh,
// flash_bwd_<dtype>_hd<head_dim>.cu). Torch-free.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
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
// else at q's offsets); a dense batch with seqused_k uses the first seqused_k[b] of its keys,
// and with leftpad_k none before key leftpad_k[b] (a left-padded KV cache: keys [leftpad_k[b],
// seqused_k[b] or seqlen_k)). out like q, contiguous. lse: float, (batch, heads, seqlen_q)
// dense or (heads, total_q) packed. The mask: query i of a sequence sees key j when
// i + Sk - Sq - window_left <= j <= i + Sk - Sq + window_right (flash-attn's window_size,
// aligned to the bottom-right corner; causal is window_right 0), each bound kNoWindow where
// it is absent (set_window).
struct FlashParams {
  const void *q, *k, *v;
  TokenLayout q_layout, kv_layout;
  void* out;
  float* lse;
  const int* cu_seqlens;       // device pointer, or null for a dense batch
  const int* cu_seqlens_k;     // the keys' own offsets (packed), or null: cu_seqlens
  const int* seqused_k;        // dense: keys [0, seqused_k[b]) of sequence b (a KV cache), or null
  const int* leftpad_k;        // dense: its first key, leftpad_k[b] (a left-padded cache), or null
  int64_t batch, heads, heads_k, seqlen_q, seqlen_k;  // seqlen_*: max_seqlen(_k) packed
  int64_t total_q, total_k;    // tokens of q, of k and v
  float scale_log2;            // softmax_scale * log2(e), or softcap * log2(e) (set_scale)
  int64_t window_left, window_right;  // >= 0, or kNoWindow
  float softcap_prescale;      // softmax_scale / softcap, or 0: no soft-capping (set_scale)
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
  const int* leftpad_k;        // dense: its first key, leftpad_k[b] (a left-padded cache), or null
  int64_t batch, heads, heads_k, seqlen_q, seqlen_k;  // seqlen_*: max_seqlen(_k) packed
  int64_t total_q, total_k;    // tokens of q, of k and v
  float scale;                 // softmax_scale
  float scale_log2;            // softmax_scale * log2(e), or softcap * log2(e) (set_scale)
  int64_t window_left, window_right;  // as FlashParams'
  float softcap_prescale;      // as FlashParams'
  bool dq_atomics;             // Hopper backward: dQ by fp32 atomics, not TMA reduce-adds
};

// An absent window bound: far past any sequence (the kernels take fewer than 2^30 tokens),
// so sums of it with positions stay far inside int64 where a helper adds it, and a bound
// below it fits in 30 bits, so the Hopper forward's producer works its key range out in int32.
constexpr int64_t kNoWindow = int64_t(1) << 40;
constexpr int64_t kMaxWindow = (int64_t(1) << 30) - 1;  // a larger bound reaches every key

// The mask's bounds from the op's arguments: window_left / window_right >= 0, or -1 for none
// (flash-attn's window_size), a bound past kMaxWindow none as well (it spans any sequence
// the kernels take); causal makes window_right 0.
template <typename Params>
inline void set_window(Params& p, bool causal, int64_t window_left, int64_t window_right) {
  p.window_left = window_left < 0 || window_left > kMaxWindow ? kNoWindow : window_left;
  p.window_right = causal ? 0
                          : (window_right < 0 || window_right > kMaxWindow ? kNoWindow
                                                                            : window_right);
}

// The forwards' scores: S = softmax_scale q k^T, taken into the log2 domain by scale_log2; with
// soft-capping (softcap > 0, Gemma 2's) S = softcap tanh(softmax_scale q k^T / softcap): the
// kernels take each product x to tanh(x softcap_prescale) (flash::softcap_tanh) and softcap
// rides in scale_log2, so the softmax after it and the lse (in S's units) are unchanged. The
// backwards recompute P so, and scale dS by tanh's derivative 1 - t^2 (dS / dx = scale (1 -
// t^2); their final scale is FlashBwdParams' softmax_scale, as without a cap).
template <typename Params>
inline void set_scale(Params& p, double softmax_scale, double softcap) {
  constexpr double kLog2e = 1.4426950408889634;
  p.scale_log2 = static_cast<float>((softcap > 0 ? softcap : softmax_scale) * kLog2e);
  p.softcap_prescale = softcap > 0 ? static_cast<float>(softmax_scale / softcap) : 0.f;
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
// head_dim 256 (Gemma's): the forward only (its backward runs the composed path); the
// flash-decoding forward below takes 256 too
cudaError_t flash_fwd_fp16_hd256(const FlashParams& p, cudaStream_t stream);
cudaError_t flash_fwd_bf16_hd256(const FlashParams& p, cudaStream_t stream);

// Flash-decoding (flash_decode_kernel.cuh; flash_decode_<dtype>_hd<head_dim>.cu): the forward
// for few queries against many keys (a decoding step, speculative or chunked decoding). One
// block takes one (sequence, KV head) and one chunk of its keys; its 16 query rows are the
// group's heads times the sequence's queries (row r: query r / group, head r % group), so a
// group's heads read each K / V tile once. With several chunks, each block writes its rows'
// partial output and log-sum-exp into workspace, and a second kernel merges them.
// Where it applies: seqlen_q x (heads / heads_k) <= 16 (flash_decode_fits); head sizes as the
// portable forward; FlashParams' contract unchanged (out, lse as the forward's).
constexpr int64_t kFlashDecodeRows = 16;
constexpr int64_t kFlashDecodeTile = 64;  // keys per tile; a chunk is a whole number of tiles

struct FlashSplit {
  int64_t splits;    // key chunks per (sequence, KV head): 1 writes out and lse directly
  int64_t chunk;     // keys per chunk, a multiple of kFlashDecodeTile
  float* out_part;   // splits > 1: (splits, total_q, heads, head_dim), each chunk's output
  float* lse_part;   // splits > 1: (splits, heads, total_q), each chunk's lse (log2 domain)
};

// The shared memory a flash-decoding block takes at `head_dim` (16-bit elements): two stages
// of K and V tiles, rows padded to 16 columns plus 8, or the warps' merge if larger
// (flash_decode_kernel.cuh's Traits::kSmem, which asserts it equal). 132 KB at 256: more than
// sm_86's and sm_89's 99 KB a block, where run_decode leaves the step to the prefill forward.
constexpr size_t flash_decode_smem(int64_t head_dim) {
  const int64_t pad = (head_dim + 15) / 16 * 16, o_cols = (head_dim / 8 + 1) / 2 * 2 * 8;
  const size_t tiles = size_t(2 * 2 * kFlashDecodeTile * (pad + 8)) * 2;
  const size_t merge = size_t(4 * kFlashDecodeRows * (2 + o_cols + 4)) * sizeof(float);
  return tiles > merge ? tiles : merge;
}

inline bool flash_decode_fits(int64_t heads, int64_t heads_k, int64_t seqlen_q) {
  return heads_k > 0 && heads % heads_k == 0 && seqlen_q >= 1 &&
         seqlen_q * (heads / heads_k) <= kFlashDecodeRows;
}

// How many chunks: enough blocks for about two waves of `sms` multiprocessors, each chunk at
// least two tiles (128 keys) and at most 128 chunks. seqlen_k: the longest sequence's keys.
inline FlashSplit flash_decode_plan(int64_t batch, int64_t heads_k, int64_t seqlen_k, int sms) {
  const int64_t tiles = (seqlen_k + kFlashDecodeTile - 1) / kFlashDecodeTile;
  const int64_t base = batch * heads_k > 0 ? batch * heads_k : 1;
  int64_t splits = (2 * int64_t(sms > 0 ? sms : 1) + base - 1) / base;
  const int64_t most = (tiles + 1) / 2 < 128 ? (tiles + 1) / 2 : 128;
  if (splits > most) splits = most;
  if (splits < 1) splits = 1;
  const int64_t chunk_tiles = tiles > 0 ? (tiles + splits - 1) / splits : 1;
  splits = tiles > 0 ? (tiles + chunk_tiles - 1) / chunk_tiles : 1;
  return {splits, chunk_tiles * kFlashDecodeTile, nullptr, nullptr};
}

// The keys a plan splits: the most any sequence's queries see between them, seqlen_k, or under
// a window (window_left, set_window's) seqlen_q + window_left (from the first query's first
// key to the last query's end, at most the sequence's keys).
inline int64_t flash_decode_keys(int64_t seqlen_q, int64_t seqlen_k, int64_t window_left) {
  return window_left < kNoWindow && seqlen_q + window_left < seqlen_k ? seqlen_q + window_left
                                                                      : seqlen_k;
}

#define PYSSM_FLASH_DECODE_DECLARE(tag, hd)                                      \
  cudaError_t flash_decode_fwd_##tag##_hd##hd(const FlashParams& p, const FlashSplit& split, \
                                              cudaStream_t stream);
#define PYSSM_FLASH_DECODE_DECLARE_ALL(tag)                                               \
  PYSSM_FLASH_DECODE_DECLARE(tag, 32) PYSSM_FLASH_DECODE_DECLARE(tag, 64)                 \
  PYSSM_FLASH_DECODE_DECLARE(tag, 72) PYSSM_FLASH_DECODE_DECLARE(tag, 80)                 \
  PYSSM_FLASH_DECODE_DECLARE(tag, 96) PYSSM_FLASH_DECODE_DECLARE(tag, 128)             \
  PYSSM_FLASH_DECODE_DECLARE(tag, 256)
PYSSM_FLASH_DECODE_DECLARE_ALL(fp16)
PYSSM_FLASH_DECODE_DECLARE_ALL(bf16)
#undef PYSSM_FLASH_DECODE_DECLARE_ALL
#undef PYSSM_FLASH_DECODE_DECLARE

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
