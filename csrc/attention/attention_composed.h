// Attention composed from ATen ops (attention_cpu.cpp): the CPU kernel, and on CUDA the path
// for inputs the flash kernels do not take.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace pyssm {

struct AttnSizes {
  bool varlen;    // packed (cu_seqlens)
  bool varlen_k;  // ... with the keys' own offsets (cu_seqlens_k)
  int64_t batch, seqlen_q, seqlen_k, heads, heads_k, head_dim;
  std::vector<int64_t> starts;    // varlen: cu_seqlens as int64
  std::vector<int64_t> starts_k;  // varlen: the keys' offsets (cu_seqlens_k, or cu_seqlens)
  bool used_k = false;            // dense: seqused_k given (each sequence's first keys)
  std::vector<int64_t> used;      // ... its values, where read (read_key_ranges)
  bool lead_k = false;            // dense: leftpad_k given (each sequence's first key)
  std::vector<int64_t> lead;      // ... its values, where read (read_key_ranges)
};

// Every shape, dtype, device and cu_seqlens check of attention. Packed keys have their own
// offsets where cu_seqlens_k is given (as many sequences as cu_seqlens; k and v then hold its
// last offset's tokens), else q's. With read_offsets (the default) the offsets are copied to
// the host (a device sync for CUDA tensors), checked and kept in `starts` / `starts_k`, and the
// longest query and key sequences set seqlen_q and seqlen_k. Without it (the CUDA kernels, when
// max_seqlen, and max_seqlen_k for cu_seqlens_k, are given) nothing is read: they size the
// grids and `starts` stays empty; pyssm.ops.attention has checked the values (once per tensor)
// and the kernels clamp every offset into [0, total tokens]. seqused_k (dense batches: int32
// (batch,), sequence b attends to its first seqused_k[b] keys) and leftpad_k (likewise; none
// before key leftpad_k[b]) are checked here but never read: the composed path reads them
// (read_key_ranges), the kernels clamp them into [0, seqlen_k] and [0, the end].
AttnSizes check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& cu_seqlens,
                               std::optional<int64_t> max_seqlen,
                               const std::optional<at::Tensor>& cu_seqlens_k,
                               std::optional<int64_t> max_seqlen_k,
                               const std::optional<at::Tensor>& seqused_k,
                               const std::optional<at::Tensor>& leftpad_k,
                               bool read_offsets = true);

// ... and those of attention_backward (dout, out, lse, dlse against q's sizes).
AttnSizes check_attention_backward_args(const at::Tensor& dout,
                                        const std::optional<at::Tensor>& dlse,
                                        const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const at::Tensor& out,
                                        const at::Tensor& lse,
                                        const std::optional<at::Tensor>& cu_seqlens,
                                        std::optional<int64_t> max_seqlen,
                                        const std::optional<at::Tensor>& cu_seqlens_k,
                                        std::optional<int64_t> max_seqlen_k,
                                        const std::optional<at::Tensor>& seqused_k,
                                        const std::optional<at::Tensor>& leftpad_k,
                                        bool read_offsets = true);

// The mask's arguments as the ops take them (flash-attn's window_size): window_left and
// window_right each >= 0 or -1 (no bound); causal is window_right 0, so with causal a
// window_right other than 0 or -1 is an error rather than silently replaced.
inline void check_window(bool causal, int64_t window_left, int64_t window_right) {
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1,
                    "window_left and window_right must be >= 0, or -1 for no bound, got (",
                    window_left, ", ", window_right, ")");
  TORCH_CHECK_VALUE(!causal || window_right <= 0, "causal=True bounds each query's keys at its "
                    "own position (window_right 0), got window_right ", window_right);
}

// Soft-capping (Gemma 2's logit soft-capping): 0 for none, or the cap c > 0 of
// S = c tanh(scale q k^T / c)
inline void check_softcap(double softcap) {
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0,
                    "softcap must be a finite number >= 0 (0: no soft-capping), got ", softcap);
}

std::tuple<at::Tensor, at::Tensor> attention_composed(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v, bool causal,
                                                      std::optional<double> softmax_scale,
                                                      const std::optional<at::Tensor>& cu_seqlens,
                                                      std::optional<int64_t> max_seqlen,
                                                      const std::optional<at::Tensor>& cu_seqlens_k,
                                                      std::optional<int64_t> max_seqlen_k,
                                                      const std::optional<at::Tensor>& seqused_k,
                                                      const std::optional<at::Tensor>& leftpad_k,
                                                      int64_t window_left, int64_t window_right,
                                                      double softcap);

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_composed(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    bool causal, std::optional<double> softmax_scale, const std::optional<at::Tensor>& cu_seqlens,
    std::optional<int64_t> max_seqlen, const std::optional<at::Tensor>& cu_seqlens_k,
    std::optional<int64_t> max_seqlen_k, const std::optional<at::Tensor>& seqused_k,
    const std::optional<at::Tensor>& leftpad_k, int64_t window_left, int64_t window_right,
    double softcap);

// The same, written into dq, dk and dv (q's, k's and v's shapes, any strides)
void attention_backward_composed_into(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    bool causal, std::optional<double> softmax_scale, const std::optional<at::Tensor>& cu_seqlens,
    std::optional<int64_t> max_seqlen, const std::optional<at::Tensor>& cu_seqlens_k,
    std::optional<int64_t> max_seqlen_k,
    const std::optional<at::Tensor>& seqused_k,
    const std::optional<at::Tensor>& leftpad_k, int64_t window_left, int64_t window_right,
    double softcap, const at::Tensor& dq, const at::Tensor& dk,
    const at::Tensor& dv);

// attention_qkvpacked's backward by `into` (attention_backward_composed_into, or the CUDA
// kernels' counterpart): dqkv in qkv's shape, contiguous, with dq, dk and dv written into its
// slices
using AttentionBackwardInto = void (*)(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    bool causal, std::optional<double> softmax_scale, const std::optional<at::Tensor>& cu_seqlens,
    std::optional<int64_t> max_seqlen, const std::optional<at::Tensor>& cu_seqlens_k,
    std::optional<int64_t> max_seqlen_k,
    const std::optional<at::Tensor>& seqused_k,
    const std::optional<at::Tensor>& leftpad_k, int64_t window_left, int64_t window_right,
    double softcap, const at::Tensor& dq, const at::Tensor& dk,
    const at::Tensor& dv);
at::Tensor attention_qkvpacked_backward_by(
    AttentionBackwardInto into, const at::Tensor& dout, const std::optional<at::Tensor>& dlse,
    const at::Tensor& qkv, const at::Tensor& out, const at::Tensor& lse, bool causal,
    std::optional<double> softmax_scale, const std::optional<at::Tensor>& cu_seqlens,
    std::optional<int64_t> max_seqlen);

// q, k and v of a fused qkv: (batch, seqlen, 3, heads, head_dim), or (total_tokens, 3, heads,
// head_dim) with cu_seqlens; views, no copy. The packed ops (attention_qkvpacked and its
// backward) take one tensor so that autograd hands back one gradient for it, which their
// backward writes in place of the three that unbind's backward would stack.
std::tuple<at::Tensor, at::Tensor, at::Tensor> unbind_qkv(
    const at::Tensor& qkv, const std::optional<at::Tensor>& cu_seqlens);

}  // namespace pyssm
