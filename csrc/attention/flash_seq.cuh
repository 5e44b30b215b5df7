// Where one sequence of a batch lives and which keys its queries see: written once for every
// flash kernel (the portable and Hopper forwards and backwards).
//
// Dense batches: sequence b holds rows [b Sq, (b + 1) Sq) of q and [b Sk, (b + 1) Sk) of k / v,
// of which it uses the first seqused_k[b] keys where seqused_k is given (a KV cache filled to
// different lengths; clamped into [0, Sk], unread on the host like packed offsets), and none
// before key leftpad_k[b] where leftpad_k is given (a left-padded cache; clamped into [0, the
// keys used]): its keys are then the rows [leftpad, used) of its cache (k_lead: leftpad, from
// k_start, which moves by it; a field of its own made ptxas spill in the Hopper forward).
// Packed batches (cu_seqlens): sequence b holds tokens [cu[b], cu[b + 1]) of q, and of k / v
// [cu_k[b], cu_k[b + 1]) with cu_seqlens_k, else the same tokens as q (Sk = Sq). Query i sees
// key j when i + Sk - Sq - window_left <= j <= i + Sk - Sq + window_right (a causal mask:
// window_right 0; an absent bound: kNoWindow): the mask is aligned to the bottom-right
// corner, as flash-attn's is, so a query block that ends early in a longer key sequence
// still sees the keys before it.
//
// The per-score test itself stays written out in each kernel's masking loop (as a
// bool-returning helper, with the backwards' row < Sq, it once cost the backwards 40-90 SASS
// instructions, predicates turned into values: P2R, SEL): the portable forward and decoding
// compare key < Sk && key <= diag + right && key + left >= diag (diag = row + Sk - Sq); the
// Hopper forward and both backwards compare 32-bit positions within the tile against bounds
// worked out per tile (first_key / keys_to_visit, queries_of_key), which spared registers.
#pragma once

#include <cstdint>

#include "attention/flash.cuh"
#include "kernel_launch.cuh"  // (under PYSSM_CUDA_EMULATION: __device__ and friends)

namespace pyssm {
namespace flash {

// tanh(x) for soft-capped scores (set_scale), as 1 - 2 / (e^2x + 1): one exp2 and one
// division (fast math), absolute error about 1e-7 at any x, so a score capped at c moves by
// about c 1e-7 (tanh.approx.f32, relative error 2^-11, would move a score capped at 50 by up to
// 0.025); e^2x overflowing to inf gives 1, underflowing to 0 gives -1.
__device__ __forceinline__ float softcap_tanh(float x) {
  return 1.f - 2.f / (exp2f(x * 2.8853900817779268f) + 1.f);
}

struct SeqSpan {
  int64_t q_start, k_start;  // first token of the sequence in q and in k / v
  int64_t Sq, Sk;            // its query and key lengths
};

// Packed offsets are clamped into [0, total] (and each end to at least its start): the host
// need not read them (pyssm.ops.attention checks them once per tensor), and offsets that are
// wrong anyway give wrong values, never an access out of bounds.
__device__ __forceinline__ void clamped_span(const int* cu, int b, int64_t total,
                                             int64_t& start, int64_t& len) {
  const int64_t lo = cu[b], hi = cu[b + 1];
  start = lo < 0 ? 0 : (lo > total ? total : lo);
  const int64_t end = hi < start ? start : (hi > total ? total : hi);
  len = end - start;
}

template <typename Params>
__device__ __forceinline__ SeqSpan seq_span(const Params& p, int b) {
  if (p.cu_seqlens) {
    SeqSpan s;
    clamped_span(p.cu_seqlens, b, p.total_q, s.q_start, s.Sq);
    if (p.cu_seqlens_k) {
      clamped_span(p.cu_seqlens_k, b, p.total_k, s.k_start, s.Sk);
    } else {
      s.k_start = s.q_start;
      s.Sk = s.Sq;
    }
    return s;
  }
  int64_t used = p.seqlen_k;
  if (p.seqused_k) {
    const int64_t u = p.seqused_k[b];
    used = u < 0 ? 0 : (u < used ? u : used);
  }
  const int64_t l = p.leftpad_k ? p.leftpad_k[b] : 0;
  const int64_t lead = l < 0 ? 0 : (l < used ? l : used);
  return {int64_t(b) * p.seqlen_q, int64_t(b) * p.seqlen_k + lead, p.seqlen_q, used - lead};
}

// A dense sequence's cache rows before its first key (leftpad_k, from k_start); packed 0
template <typename Params>
__device__ __forceinline__ int64_t k_lead(const Params& p, const SeqSpan& s, int b) {
  return p.cu_seqlens ? 0 : s.k_start - int64_t(b) * p.seqlen_k;
}

// Where head h of sequence b's first token (`start`, seq_span's q_start or k_start) lies in an
// input at layout l: a dense batch's sequences at the batch stride, a packed batch's tokens at
// the row stride; the sequence's token i is then i * l.row further.
template <typename Params>
__device__ __forceinline__ int64_t head_start(const Params& p, const TokenLayout& l, int b,
                                              int64_t start, int64_t h) {
  return (p.cu_seqlens ? start * l.row : int64_t(b) * l.batch) + h * l.head;
}

// Where head hk of sequence b's first key lies in k and v (a dense batch's from its k_lead-th
// cache row).
template <typename Params>
__device__ __forceinline__ int64_t kv_head_start(const Params& p, const SeqSpan& s, int b,
                                                 int64_t hk) {
  return head_start(p, p.kv_layout, b, s.k_start, hk) + k_lead(p, s, b) * p.kv_layout.row;
}

// The keys [first_key(first_row), keys_to_visit(last_row)) that the queries [first_row,
// last_row] see between them (with no window: [0, Sk); causal: [0, last_row + Sk - Sq + 1)).
template <typename Params>
__device__ __forceinline__ int64_t keys_to_visit(const SeqSpan& s, const Params& p,
                                                 int64_t last_row) {
  const int64_t limit = last_row + s.Sk - s.Sq + p.window_right + 1;
  return limit < s.Sk ? (limit > 0 ? limit : 0) : s.Sk;
}

template <typename Params>
__device__ __forceinline__ int64_t first_key(const SeqSpan& s, const Params& p,
                                             int64_t first_row) {
  const int64_t first = first_row + s.Sk - s.Sq - p.window_left;
  return first > 0 ? (first < s.Sk ? first : s.Sk) : 0;
}

// The queries that see keys [n0, last_key]: from first_query(n0), rounded down to a multiple
// of `block` (a backward block of keys starts its walk over the queries there), to
// queries_to_visit(last_key) (exclusive).
template <typename Params>
__device__ __forceinline__ int64_t first_query(const SeqSpan& s, const Params& p, int64_t n0,
                                               int64_t block) {
  const int64_t first = n0 - (s.Sk - s.Sq) - p.window_right;
  return first > 0 ? first / block * block : 0;
}

template <typename Params>
__device__ __forceinline__ int64_t queries_to_visit(const SeqSpan& s, const Params& p,
                                                    int64_t last_key) {
  const int64_t limit = last_key - (s.Sk - s.Sq) + p.window_left + 1;
  return limit < s.Sq ? (limit > 0 ? limit : 0) : s.Sq;
}

// The queries [lo, hi] that see key `key` (none past the keys), counted from query `origin`,
// as ints: a backward thread's mask for one of its keys over the query tile at `origin`, two
// 32-bit compares a score (a sequence is shorter than 2^30 tokens: attention_cuda.cpp checks).
// Computed per query tile, where the mask is applied: kept live over the whole walk, the four
// bounds of a thread's two keys made ptxas spill in the portable backward, as did the mask
// written out in 64-bit positions there.
template <typename Params>
__device__ __forceinline__ void queries_of_key(const SeqSpan& s, const Params& p, int64_t key,
                                               int64_t origin, int& lo, int& hi) {
  const int64_t first = key - (s.Sk - s.Sq) - p.window_right;
  const int64_t last = key - (s.Sk - s.Sq) + p.window_left;
  lo = int((first > 0 ? (first < s.Sq ? first : s.Sq) : 0) - origin);
  hi = int((key < s.Sk ? (last < s.Sq - 1 ? (last > -1 ? last : -1) : s.Sq - 1) : -1) - origin);
}

}  // namespace flash
}  // namespace pyssm
