// Attention composed from ATen ops, forward and backward, in the accumulation type (float64 for
// float64 inputs, float32 otherwise), in chunks of sequences so the scores stay small. It is
// the CPU kernel, and on CUDA the path for what the flash kernel does not take (float32 /
// float64, other head sizes), forward and backward (attention_cuda.cpp):
//   S = scale q k^T (key j visible to query i when i + Sk - Sq - window_left <= j <=
//   i + Sk - Sq + window_right, a bound of -1 absent, causal: window_right 0; flash-attn's
//   bottom-right alignment), with softcap > 0 S = softcap tanh(scale q k^T / softcap),
//   lse = logsumexp_j S, P = exp(S - lse), o = P v.
// A row that sees no key (causal with Sq > Sk, a window past the keys) gives o = 0 and
// lse = -inf.
// Backward: dv = P^T do, dP = do v^T, dS = P (dP - rowsum(do * o)) (times 1 - (S / softcap)^2,
// tanh's derivative, with soft-capping), dq = scale dS k, dk = scale dS^T q; grouped-query heads
// (H = G * Hk) sum their dk, dv over the group.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string>

#include "attention/attention_composed.h"
#include "checks.h"

namespace pyssm {

namespace {

// One packed offsets tensor (cu_seqlens or cu_seqlens_k): int32 (num_sequences + 1,) on q's
// device
void check_offsets_tensor(const at::Tensor& cu, const at::Tensor& q, const char* name) {
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, name, " must be int32, got ", cu.scalar_type());
  check_rank(cu, 1, name, "(num_sequences + 1,)");
  TORCH_CHECK_VALUE(cu.size(0) >= 1, name, " must hold at least one offset (0)");
  check_same_device(cu, q, name, "q");
}

// An int tensor's values on the host (a device sync for a CUDA tensor)
std::vector<int64_t> host_values(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kCPU, at::kLong).contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  return {p, p + c.numel()};
}

// The offsets read to the host and checked against the `total` tokens of `tensors` (q, or k
// and v) and max_seqlen; returns the longest sequence
int64_t read_offsets_into(std::vector<int64_t>& starts, const at::Tensor& cu, int64_t total,
                          const char* name, const char* tensors,
                          std::optional<int64_t> max_seqlen, const char* max_name) {
  starts = host_values(cu);
  TORCH_CHECK_VALUE(starts.front() == 0, name, " must start at 0, got ", starts.front());
  int64_t longest = 0;
  for (size_t i = 1; i < starts.size(); ++i) {
    TORCH_CHECK_VALUE(starts[i] >= starts[i - 1], name, " must be non-decreasing, got ",
                      starts[i - 1], " then ", starts[i]);
    longest = std::max(longest, starts[i] - starts[i - 1]);
  }
  TORCH_CHECK_VALUE(starts.back() == total, name, " must end at the ", total, " tokens of ",
                    tensors, ", got ", starts.back());
  if (max_seqlen) {
    TORCH_CHECK_VALUE(*max_seqlen >= longest, max_name, " (", *max_seqlen,
                      ") is smaller than the longest sequence in ", name, " (", longest, ")");
  }
  return longest;
}

// max_seqlen / max_seqlen_k where the offsets are not read: given, >= 0
int64_t given_max(std::optional<int64_t> max_seqlen, const char* max_name, const char* name) {
  TORCH_CHECK_VALUE(max_seqlen && *max_seqlen >= 0, max_name, " must be given (>= 0) when ",
                    name, " is not read, got ",
                    max_seqlen ? std::to_string(*max_seqlen) : std::string("None"));
  return *max_seqlen;
}

// seqused_k / leftpad_k: absent, or int32 (batch,) on q's device, for dense batches; whether
// given
bool check_cache_rows(const std::optional<at::Tensor>& t, const char* name, const char* cache,
                      const char* packed_gives, const char* holds, const at::Tensor& q,
                      const AttnSizes& s) {
  if (!t) return false;
  TORCH_CHECK_VALUE(!s.varlen, name, " is for dense batches (", cache, "); packed keys give their ",
                    packed_gives, " in cu_seqlens_k");
  TORCH_CHECK_TYPE(t->scalar_type() == at::kInt, name, " must be int32, got ", t->scalar_type());
  check_rank(*t, 1, name, "(batch,)");
  TORCH_CHECK_VALUE(t->size(0) == s.batch, name, " must hold the ", s.batch, " ", holds,
                    " of the batch, got ", t->size(0));
  check_same_device(*t, q, name, "q");
  return true;
}

}  // namespace

AttnSizes check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& cu_seqlens,
                               std::optional<int64_t> max_seqlen,
                               const std::optional<at::Tensor>& cu_seqlens_k,
                               std::optional<int64_t> max_seqlen_k,
                               const std::optional<at::Tensor>& seqused_k,
                               const std::optional<at::Tensor>& leftpad_k, bool read_offsets) {
  check_floating(q, "q");
  check_floating(k, "k");
  check_floating(v, "v");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "q, k and v must have the same dtype, got ", q.scalar_type(), ", ",
                   k.scalar_type(), " and ", v.scalar_type());
  check_same_device(k, q, "k", "q");
  check_same_device(v, q, "v", "q");
  AttnSizes s;
  s.varlen = cu_seqlens.has_value();
  s.varlen_k = cu_seqlens_k.has_value();
  TORCH_CHECK_VALUE(s.varlen || !s.varlen_k,
                    "cu_seqlens_k is only used with cu_seqlens (the queries' offsets)");
  TORCH_CHECK_VALUE(s.varlen_k || !max_seqlen_k, "max_seqlen_k is only used with cu_seqlens_k");
  if (s.varlen) {
    const char* layout = "(total_tokens, heads, head_dim) when cu_seqlens is given";
    check_rank(q, 3, "q", layout);
    check_rank(k, 3, "k", layout);
    check_rank(v, 3, "v", layout);
    check_offsets_tensor(*cu_seqlens, q, "cu_seqlens");
    s.batch = cu_seqlens->size(0) - 1;
    if (s.varlen_k) {
      check_offsets_tensor(*cu_seqlens_k, q, "cu_seqlens_k");
      TORCH_CHECK_VALUE(cu_seqlens_k->size(0) == cu_seqlens->size(0), "cu_seqlens_k must hold ",
                        cu_seqlens->size(0), " offsets, as cu_seqlens does, got ",
                        cu_seqlens_k->size(0));
    } else {
      TORCH_CHECK_VALUE(k.size(0) == q.size(0) && v.size(0) == q.size(0),
                        "with cu_seqlens (and no cu_seqlens_k), k and v must have the same "
                        "number of tokens as q (", q.size(0), "), got ", k.size(0), " and ",
                        v.size(0));
    }
    if (!read_offsets) {
      s.seqlen_q = given_max(max_seqlen, "max_seqlen", "cu_seqlens");
      s.seqlen_k = s.varlen_k ? given_max(max_seqlen_k, "max_seqlen_k", "cu_seqlens_k")
                              : s.seqlen_q;
    } else {
      s.seqlen_q = read_offsets_into(s.starts, *cu_seqlens, q.size(0), "cu_seqlens", "q",
                                     max_seqlen, "max_seqlen");
      if (s.varlen_k) {
        s.seqlen_k = read_offsets_into(s.starts_k, *cu_seqlens_k, k.size(0), "cu_seqlens_k",
                                       "k and v", max_seqlen_k, "max_seqlen_k");
      } else {
        s.starts_k = s.starts;
        s.seqlen_k = s.seqlen_q;
      }
    }
    s.heads = q.size(1);
    s.heads_k = k.size(1);
    s.head_dim = q.size(2);
  } else {
    const char* layout = "(batch, seqlen, heads, head_dim)";
    check_rank(q, 4, "q", layout);
    check_rank(k, 4, "k", layout);
    check_rank(v, 4, "v", layout);
    TORCH_CHECK_VALUE(!max_seqlen, "max_seqlen is only used with cu_seqlens");
    s.batch = q.size(0);
    s.seqlen_q = q.size(1);
    s.seqlen_k = k.size(1);
    s.heads = q.size(2);
    s.heads_k = k.size(2);
    s.head_dim = q.size(3);
    TORCH_CHECK_VALUE(k.size(0) == s.batch && v.size(0) == s.batch,
                      "q, k and v must have the same batch size, got ", s.batch, ", ", k.size(0),
                      " and ", v.size(0));
  }
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "k and v must have the same shape, got ", shape_str(k),
                    " and ", shape_str(v));
  TORCH_CHECK_VALUE(k.size(-1) == s.head_dim, "k must have head_dim ", s.head_dim,
                    " (the last dim of q), got ", shape_str(k));
  TORCH_CHECK_VALUE(s.heads_k >= 1 && s.heads % s.heads_k == 0, "the ", s.heads_k,
                    " heads of k and v must divide the ", s.heads, " heads of q");
  s.used_k = check_cache_rows(seqused_k, "seqused_k", "a KV cache", "lengths", "key lengths", q,
                              s);
  s.lead_k = check_cache_rows(leftpad_k, "leftpad_k", "a left-padded KV cache", "starts",
                              "first keys", q, s);
  return s;
}

namespace {

// seqused_k's values read to the host (host_values), each checked to be in [0, seqlen_k]
std::vector<int64_t> read_seqused(const at::Tensor& seqused_k, int64_t seqlen_k) {
  std::vector<int64_t> used = host_values(seqused_k);
  for (size_t b = 0; b < used.size(); ++b) {
    TORCH_CHECK_VALUE(used[b] >= 0 && used[b] <= seqlen_k, "seqused_k[", b, "] must be in [0, ",
                      seqlen_k, "] (the keys of k and v), got ", used[b]);
  }
  return used;
}

// The key ranges of a dense batch with seqused_k and / or leftpad_k, read to the host: s.used
// (each sequence's end, seqlen_k without seqused_k) and s.lead (its first key, 0 without
// leftpad_k), each lead checked to be in [0, its end]
void read_key_ranges(AttnSizes& s, const std::optional<at::Tensor>& seqused_k,
                     const std::optional<at::Tensor>& leftpad_k) {
  s.used = seqused_k ? read_seqused(*seqused_k, s.seqlen_k)
                     : std::vector<int64_t>(size_t(s.batch), s.seqlen_k);
  s.lead = leftpad_k ? host_values(*leftpad_k) : std::vector<int64_t>(size_t(s.batch), 0);
  for (size_t b = 0; b < s.lead.size(); ++b) {
    TORCH_CHECK_VALUE(s.lead[b] >= 0 && s.lead[b] <= s.used[b], "leftpad_k[", b,
                      "] must be in [0, ", s.used[b], "] (", seqused_k ? "seqused_k[" : "",
                      seqused_k ? std::to_string(b) + "]" : std::string("the keys of k and v"),
                      "), got ", s.lead[b]);
  }
}

}  // namespace

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
                                        bool read_offsets) {
  const AttnSizes s = check_attention_args(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k,
                                           max_seqlen_k, seqused_k, leftpad_k, read_offsets);
  check_shape(dout, q.sizes(), "dout", "the shape of q");
  check_shape(out, q.sizes(), "out", "the shape of q");
  const std::vector<int64_t> lse_shape =
      s.varlen ? std::vector<int64_t>{s.heads, q.size(0)}
               : std::vector<int64_t>{s.batch, s.heads, s.seqlen_q};
  check_shape(lse, lse_shape, "lse", s.varlen ? "(heads, total_tokens)" : "(batch, heads, seqlen_q)");
  if (dlse) check_shape(*dlse, lse.sizes(), "dlse", "the shape of lse");
  check_same_device(dout, q, "dout", "q");
  check_same_device(out, q, "out", "q");
  check_same_device(lse, q, "lse", "q");
  if (dlse) check_same_device(*dlse, q, "dlse", "q");
  return s;
}

namespace {

// A chunk (b, S, H, d) -> heads-first (b, H, S, d) in acc type, kv heads repeated per group.
at::Tensor heads_first(const at::Tensor& t, int64_t group, at::ScalarType acc) {
  at::Tensor h = t.to(acc).transpose(1, 2);
  return group == 1 ? h : h.repeat_interleave(group, 1);
}

// Scaled, soft-capped, masked scores (b, H, Sq, Sk).
at::Tensor scores(const at::Tensor& qh, const at::Tensor& kh, double scale, bool causal,
                  int64_t window_left, int64_t window_right, double softcap) {
  at::Tensor S = at::matmul(qh * scale, kh.transpose(-1, -2));  // scale the smaller operand
  if (softcap > 0) S = at::tanh(S / softcap) * softcap;
  if (causal) window_right = 0;
  if (window_left >= 0 || window_right >= 0) {
    const int64_t Sq = S.size(-2), Sk = S.size(-1);
    at::Tensor diag = at::arange(Sq, S.options().dtype(at::kLong)).unsqueeze(1) + (Sk - Sq);
    at::Tensor j = at::arange(Sk, S.options().dtype(at::kLong)).unsqueeze(0);
    at::Tensor hidden;
    if (window_right >= 0) hidden = j > diag + window_right;
    if (window_left >= 0) {
      at::Tensor before = j < diag - window_left;
      hidden = hidden.defined() ? hidden.logical_or(before) : before;
    }
    S = S.masked_fill(hidden, -std::numeric_limits<double>::infinity());
  }
  return S;
}

// P = exp(S - lse) with rows that see no key (lse = -inf) set to 0 rather than NaN.
at::Tensor probs(const at::Tensor& S, const at::Tensor& lse) {
  at::Tensor empty_row = at::isneginf(lse);
  at::Tensor lse_safe = at::where(empty_row, at::zeros_like(lse), lse);
  return at::exp(S - lse_safe.unsqueeze(-1));
}

double resolve_scale(std::optional<double> softmax_scale, int64_t head_dim) {
  return softmax_scale ? *softmax_scale : 1.0 / std::sqrt(static_cast<double>(head_dim));
}

// The work is split in chunks that bound the score memory: packed sequences one at a time,
// dense batches kBatchChunk rows at a time (one at a time with seqused_k or leftpad_k, whose
// rows use different keys). chunk() gives chunk i of a (B, S, H, d) or packed (T, H, d)
// tensor of queries as (b, S, H, d), chunk_k() of keys (the used ones: s.used, s.lead read);
// lse_chunk() the (b, H, S) view of lse that matches chunk().
constexpr int64_t kBatchChunk = 16;

int64_t chunk_rows(const AttnSizes& s) { return s.used_k || s.lead_k ? 1 : kBatchChunk; }

int64_t num_chunks(const AttnSizes& s) {
  return s.varlen ? s.batch : (s.batch + chunk_rows(s) - 1) / chunk_rows(s);
}

at::Tensor chunk(const at::Tensor& t, const AttnSizes& s, int64_t i) {
  if (s.varlen) return t.narrow(0, s.starts[i], s.starts[i + 1] - s.starts[i]).unsqueeze(0);
  const int64_t rows = chunk_rows(s);
  return t.narrow(0, i * rows, std::min(rows, s.batch - i * rows));
}

at::Tensor chunk_k(const at::Tensor& t, const AttnSizes& s, int64_t i) {
  if (s.varlen) {
    return t.narrow(0, s.starts_k[i], s.starts_k[i + 1] - s.starts_k[i]).unsqueeze(0);
  }
  at::Tensor c = chunk(t, s, i);
  return s.used_k || s.lead_k ? c.narrow(1, s.lead[i], s.used[i] - s.lead[i]) : c;
}

at::Tensor lse_chunk(const at::Tensor& lse, const AttnSizes& s, int64_t i) {
  if (s.varlen) return lse.narrow(1, s.starts[i], s.starts[i + 1] - s.starts[i]).unsqueeze(0);
  const int64_t rows = chunk_rows(s);
  return lse.narrow(0, i * rows, std::min(rows, s.batch - i * rows));
}

}  // namespace

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
                                                 double softcap) {
  check_window(causal, window_left, window_right);
  check_softcap(softcap);
  AttnSizes s = check_attention_args(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k,
                                     max_seqlen_k, seqused_k, leftpad_k);
  if (seqused_k || leftpad_k) read_key_ranges(s, seqused_k, leftpad_k);
  const at::ScalarType acc = acc_type(q.scalar_type());
  const double scale = resolve_scale(softmax_scale, s.head_dim);
  const int64_t group = s.heads / s.heads_k;
  at::Tensor out = at::empty(q.sizes(), q.options());
  // lse: (B, H, Sq), or (H, total) packed.
  at::Tensor lse = s.varlen ? at::empty({s.heads, q.size(0)}, q.options().dtype(acc))
                            : at::empty({s.batch, s.heads, s.seqlen_q}, q.options().dtype(acc));
  for (int64_t i = 0; i < num_chunks(s); ++i) {
    at::Tensor qh = heads_first(chunk(q, s, i), 1, acc);
    at::Tensor kh = heads_first(chunk_k(k, s, i), group, acc);
    at::Tensor vh = heads_first(chunk_k(v, s, i), group, acc);
    at::Tensor S = scores(qh, kh, scale, causal, window_left, window_right, softcap);
    at::Tensor lse_i = at::logsumexp(S, -1);  // (b, H, Sq)
    at::Tensor P = at::softmax(S, -1);
    if (causal || window_left >= 0 || window_right >= 0) {  // a row that sees no key: 0
      P.masked_fill_(at::isneginf(lse_i).unsqueeze(-1), 0);
    }
    at::Tensor o = at::matmul(P, vh);
    chunk(out, s, i).copy_(o.transpose(1, 2));
    lse_chunk(lse, s, i).copy_(lse_i);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_composed(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, bool causal, std::optional<double> softmax_scale,
    const std::optional<at::Tensor>& cu_seqlens, std::optional<int64_t> max_seqlen,
    const std::optional<at::Tensor>& cu_seqlens_k, std::optional<int64_t> max_seqlen_k,
    const std::optional<at::Tensor>& seqused_k, const std::optional<at::Tensor>& leftpad_k,
    int64_t window_left, int64_t window_right, double softcap) {
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  attention_backward_composed_into(dout, dlse, q, k, v, out, lse, causal, softmax_scale,
                                   cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, seqused_k,
                                   leftpad_k, window_left, window_right, softcap, dq, dk, dv);
  return {dq, dk, dv};
}

void attention_backward_composed_into(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    bool causal, std::optional<double> softmax_scale, const std::optional<at::Tensor>& cu_seqlens,
    std::optional<int64_t> max_seqlen, const std::optional<at::Tensor>& cu_seqlens_k,
    std::optional<int64_t> max_seqlen_k,
    const std::optional<at::Tensor>& seqused_k,
    const std::optional<at::Tensor>& leftpad_k, int64_t window_left, int64_t window_right,
    double softcap, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  check_window(causal, window_left, window_right);
  check_softcap(softcap);
  AttnSizes s = check_attention_backward_args(dout, dlse, q, k, v, out, lse, cu_seqlens,
                                              max_seqlen, cu_seqlens_k, max_seqlen_k, seqused_k,
                                              leftpad_k);
  const at::ScalarType acc = acc_type(q.scalar_type());
  const double scale = resolve_scale(softmax_scale, s.head_dim);
  const int64_t group = s.heads / s.heads_k;
  if (seqused_k || leftpad_k) {  // keys outside a sequence's used ones get no gradient
    read_key_ranges(s, seqused_k, leftpad_k);
    dk.zero_();
    dv.zero_();
  }
  for (int64_t i = 0; i < num_chunks(s); ++i) {
    at::Tensor qh = heads_first(chunk(q, s, i), 1, acc);
    at::Tensor kh = heads_first(chunk_k(k, s, i), group, acc);
    at::Tensor vh = heads_first(chunk_k(v, s, i), group, acc);
    at::Tensor doh = heads_first(chunk(dout, s, i), 1, acc);
    at::Tensor oh = heads_first(chunk(out, s, i), 1, acc);
    const at::Tensor S = scores(qh, kh, scale, causal, window_left, window_right, softcap);
    at::Tensor P = probs(S, lse_chunk(lse, s, i).to(acc));
    // dlse/dS = P, so an lse gradient enters as P * dlse.
    at::Tensor rowdot = (doh * oh).sum(-1, /*keepdim=*/true);
    if (dlse) rowdot = rowdot - lse_chunk(*dlse, s, i).to(acc).unsqueeze(-1);
    at::Tensor dvh = at::matmul(P.transpose(-1, -2), doh);
    at::Tensor dP = at::matmul(doh, vh.transpose(-1, -2));
    at::Tensor dS = P * (dP - rowdot);
    if (softcap > 0) {  // d(c tanh(x / c))/dx = 1 - (S / c)^2; masked scores (-inf, P = 0): 0
      dS = dS * at::where(at::isinf(S), at::zeros_like(S), 1 - (S / softcap).square());
    }
    at::Tensor dqh = at::matmul(dS, kh) * scale;
    at::Tensor dkh = at::matmul(dS.transpose(-1, -2), qh) * scale;
    if (group > 1) {  // (b, H, Sk, d) -> (b, Hk, G, Sk, d) -> sum over the group
      const int64_t b = dkh.size(0), Sk = dkh.size(2);
      dkh = dkh.view({b, s.heads_k, group, Sk, s.head_dim}).sum(2);
      dvh = dvh.view({b, s.heads_k, group, Sk, s.head_dim}).sum(2);
    }
    chunk(dq, s, i).copy_(dqh.transpose(1, 2));
    chunk_k(dk, s, i).copy_(dkh.transpose(1, 2));
    chunk_k(dv, s, i).copy_(dvh.transpose(1, 2));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unbind_qkv(
    const at::Tensor& qkv, const std::optional<at::Tensor>& cu_seqlens) {
  const int64_t dims = cu_seqlens ? 4 : 5;
  TORCH_CHECK_VALUE(qkv.dim() == dims && qkv.size(-3) == 3, "qkv must be ",
                    cu_seqlens ? "(total_tokens, 3, heads, head_dim) with cu_seqlens"
                               : "(batch, seqlen, 3, heads, head_dim)",
                    ", got ", shape_str(qkv));
  return {qkv.select(-3, 0), qkv.select(-3, 1), qkv.select(-3, 2)};
}

at::Tensor attention_qkvpacked_backward_by(
    AttentionBackwardInto into, const at::Tensor& dout, const std::optional<at::Tensor>& dlse,
    const at::Tensor& qkv, const at::Tensor& out, const at::Tensor& lse, bool causal,
    std::optional<double> softmax_scale, const std::optional<at::Tensor>& cu_seqlens,
    std::optional<int64_t> max_seqlen) {
  const auto [q, k, v] = unbind_qkv(qkv, cu_seqlens);
  at::Tensor dqkv = at::empty(qkv.sizes(), qkv.options());
  const auto [dq, dk, dv] = unbind_qkv(dqkv, cu_seqlens);
  into(dout, dlse, q, k, v, out, lse, causal, softmax_scale, cu_seqlens, max_seqlen,
       std::nullopt, std::nullopt, std::nullopt, std::nullopt, -1, -1, 0.0, dq, dk, dv);
  return dqkv;
}

namespace {

std::tuple<at::Tensor, at::Tensor> attention_qkvpacked_composed(
    const at::Tensor& qkv, bool causal, std::optional<double> softmax_scale,
    const std::optional<at::Tensor>& cu_seqlens, std::optional<int64_t> max_seqlen) {
  const auto [q, k, v] = unbind_qkv(qkv, cu_seqlens);
  return attention_composed(q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen,
                            std::nullopt, std::nullopt, std::nullopt, std::nullopt, -1, -1, 0.0);
}

at::Tensor attention_qkvpacked_backward_composed(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& qkv,
    const at::Tensor& out, const at::Tensor& lse, bool causal,
    std::optional<double> softmax_scale, const std::optional<at::Tensor>& cu_seqlens,
    std::optional<int64_t> max_seqlen) {
  return attention_qkvpacked_backward_by(&attention_backward_composed_into, dout, dlse, qkv, out,
                                         lse, causal, softmax_scale, cu_seqlens, max_seqlen);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyssm, CPU, m) {
  m.impl("attention", &attention_composed);
  m.impl("attention_backward", &attention_backward_composed);
  m.impl("attention_qkvpacked", &attention_qkvpacked_composed);
  m.impl("attention_qkvpacked_backward", &attention_qkvpacked_backward_composed);
}

}  // namespace pyssm
