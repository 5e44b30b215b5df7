// Attention composed from ATen ops, forward and backward, in the accumulation type (float64 for
// float64 inputs, float32 otherwise), in pieces that keep the scores small (pieces()). It is
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

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

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

// The window's bounds with causal folded in (window_right 0); -1: no bound on that side. A
// bound past 2^40 (beyond any sequence) is taken as 2^40, so sums with positions stay in range.
struct Bounds {
  int64_t left, right;
  bool any() const { return left >= 0 || right >= 0; }
};

Bounds bounds(bool causal, int64_t window_left, int64_t window_right) {
  constexpr int64_t kFar = int64_t(1) << 40;
  return {std::min(window_left, kFar), causal ? 0 : std::min(window_right, kFar)};
}

// One piece of a chunk's work: its queries [row0, row0 + rows) and the keys they can see,
// [col0, col0 + cols) (cols 0: none).
struct Piece {
  int64_t row0, rows, col0, cols;
};

// The largest number of score elements (batch rows x heads x queries x keys) one piece may
// hold: PYSSM_COMPOSED_SCORES, read at every call, else 2^24 (64 MB of float32 scores; the
// forward holds about three such tensors at once, the backward about six).
int64_t score_budget() {
  const char* env = std::getenv("PYSSM_COMPOSED_SCORES");
  if (env == nullptr || *env == '\0') return int64_t(1) << 24;
  char* end = nullptr;
  const long long v = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && v >= 1, "PYSSM_COMPOSED_SCORES must be a positive number "
                    "of score elements, got '", env, "'");
  return v;
}

// A chunk's b x heads x (Sq x Sk) scores cut into pieces of consecutive queries, each with
// only the keys its rows' windows reach (a causal piece stops at its last row's diagonal, a
// sliding window's piece starts at its first row's first key), as many queries a piece as
// keep it within the budget.
std::vector<Piece> pieces(int64_t b, int64_t heads, int64_t Sq, int64_t Sk, Bounds w) {
  std::vector<Piece> out;
  if (Sq == 0) return out;
  // keys a row sees at most; a piece of n rows spans at most n - 1 + width of them
  const int64_t width = w.left >= 0 && w.right >= 0 ? std::min(Sk, w.left + w.right + 1) : Sk;
  const double per_row =
      std::max(1.0, double(score_budget()) / double(std::max<int64_t>(b * heads, 1)));
  const double wm1 = double(std::max<int64_t>(width, 1) - 1);
  // n (n - 1 + width) <= per_row, or n Sk <= per_row (a piece never spans more than Sk);
  // clamped to [1, Sq] before it becomes an integer
  const double fit = std::max((-wm1 + std::sqrt(wm1 * wm1 + 4.0 * per_row)) / 2.0,
                              per_row / double(std::max<int64_t>(Sk, 1)));
  const int64_t n = std::clamp<int64_t>(int64_t(std::min(fit, double(Sq))), 1, Sq);
  const int64_t diag = Sk - Sq;  // row i's keys: [i + diag - left, i + diag + right]
  for (int64_t r = 0; r < Sq; r += n) {
    const int64_t rows = std::min(n, Sq - r);
    const int64_t lo = w.left >= 0 ? std::clamp<int64_t>(r + diag - w.left, 0, Sk) : 0;
    const int64_t hi =
        w.right >= 0 ? std::clamp<int64_t>(r + rows - 1 + diag + w.right + 1, 0, Sk) : Sk;
    out.push_back({r, rows, lo, std::max<int64_t>(hi - lo, 0)});
  }
  return out;
}

// Scaled, soft-capped, masked scores (b, H, rows, cols) of a piece: its queries qh (b, H, rows,
// d) against its keys kh (b, H, cols, d), in a chunk of Sq queries and Sk keys.
at::Tensor scores(const at::Tensor& qh, const at::Tensor& kh, double scale, Bounds w,
                  double softcap, const Piece& piece, int64_t Sq, int64_t Sk) {
  at::Tensor S = at::matmul(qh * scale, kh.transpose(-1, -2));  // scale the smaller operand
  if (softcap > 0) S = at::tanh(S / softcap) * softcap;
  if (w.any()) {
    // in the piece's columns, row i's keys: [i + diag - left, i + diag + right]
    const int64_t rows = S.size(-2), cols = S.size(-1);
    at::Tensor diag = at::arange(rows, S.options().dtype(at::kLong)).unsqueeze(1) +
                      (piece.row0 + Sk - Sq - piece.col0);
    at::Tensor j = at::arange(cols, S.options().dtype(at::kLong)).unsqueeze(0);
    at::Tensor hidden;
    if (w.right >= 0) hidden = j > diag + w.right;
    if (w.left >= 0) {
      at::Tensor before = j < diag - w.left;
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

// The work is split in chunks: packed sequences one at a time, dense batches as many rows at a
// time as keep their scores within the budget (one at a time with seqused_k or leftpad_k, whose
// rows use different keys), and each chunk in pieces of queries (pieces()). chunk() gives
// chunk i of a (B, S, H, d) or packed (T, H, d) tensor of queries as (b, S, H, d), chunk_k()
// of keys (the used ones: s.used, s.lead read); lse_chunk() the (b, H, S) view of lse that
// matches chunk().
int64_t chunk_rows(const AttnSizes& s) {
  if (s.used_k || s.lead_k) return 1;
  const int64_t per_row = std::max<int64_t>(s.heads * s.seqlen_q * s.seqlen_k, 1);
  return std::clamp<int64_t>(score_budget() / per_row, 1, std::max<int64_t>(s.batch, 1));
}

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
  const Bounds w = bounds(causal, window_left, window_right);
  for (int64_t i = 0; i < num_chunks(s); ++i) {
    at::Tensor qh = heads_first(chunk(q, s, i), 1, acc);  // (b, H, Sq, d)
    at::Tensor kh = heads_first(chunk_k(k, s, i), group, acc);
    at::Tensor vh = heads_first(chunk_k(v, s, i), group, acc);
    const int64_t Sq = qh.size(2), Sk = kh.size(2);
    at::Tensor out_i = chunk(out, s, i), lse_i = lse_chunk(lse, s, i);
    for (const Piece& p : pieces(qh.size(0), s.heads, Sq, Sk, w)) {
      at::Tensor o_p = out_i.narrow(1, p.row0, p.rows), lse_p = lse_i.narrow(2, p.row0, p.rows);
      if (p.cols == 0) {  // rows that see no key: 0, lse -inf
        o_p.zero_();
        lse_p.fill_(-std::numeric_limits<double>::infinity());
        continue;
      }
      at::Tensor S = scores(qh.narrow(2, p.row0, p.rows), kh.narrow(2, p.col0, p.cols), scale,
                            w, softcap, p, Sq, Sk);
      at::Tensor lse_s = at::logsumexp(S, -1);  // (b, H, rows)
      at::Tensor P = at::softmax(S, -1);
      if (w.any()) P.masked_fill_(at::isneginf(lse_s).unsqueeze(-1), 0);  // no key seen: 0
      o_p.copy_(at::matmul(P, vh.narrow(2, p.col0, p.cols)).transpose(1, 2));
      lse_p.copy_(lse_s);
    }
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
  const Bounds w = bounds(causal, window_left, window_right);
  for (int64_t i = 0; i < num_chunks(s); ++i) {
    at::Tensor qh = heads_first(chunk(q, s, i), 1, acc);  // (b, H, Sq, d)
    at::Tensor kh = heads_first(chunk_k(k, s, i), group, acc);
    at::Tensor vh = heads_first(chunk_k(v, s, i), group, acc);
    at::Tensor doh = heads_first(chunk(dout, s, i), 1, acc);
    at::Tensor oh = heads_first(chunk(out, s, i), 1, acc);
    at::Tensor lse_i = lse_chunk(lse, s, i).to(acc);
    // dlse/dS = P, so an lse gradient enters as P * dlse.
    at::Tensor rowdot = (doh * oh).sum(-1, /*keepdim=*/true);
    if (dlse) rowdot = rowdot - lse_chunk(*dlse, s, i).to(acc).unsqueeze(-1);
    const int64_t Sq = qh.size(2), Sk = kh.size(2);
    at::Tensor dqh = at::zeros(qh.sizes(), qh.options());
    at::Tensor dkh = at::zeros(kh.sizes(), kh.options());  // (b, H, Sk, d): pieces add in
    at::Tensor dvh = at::zeros(vh.sizes(), vh.options());
    for (const Piece& p : pieces(qh.size(0), s.heads, Sq, Sk, w)) {
      if (p.cols == 0) continue;  // rows that see no key: no gradient
      at::Tensor q_p = qh.narrow(2, p.row0, p.rows), do_p = doh.narrow(2, p.row0, p.rows);
      at::Tensor k_p = kh.narrow(2, p.col0, p.cols), v_p = vh.narrow(2, p.col0, p.cols);
      const at::Tensor S = scores(q_p, k_p, scale, w, softcap, p, Sq, Sk);
      at::Tensor P = probs(S, lse_i.narrow(2, p.row0, p.rows));
      dvh.narrow(2, p.col0, p.cols).add_(at::matmul(P.transpose(-1, -2), do_p));
      at::Tensor dP = at::matmul(do_p, v_p.transpose(-1, -2));
      at::Tensor dS = P * (dP - rowdot.narrow(2, p.row0, p.rows));
      if (softcap > 0) {  // d(c tanh(x / c))/dx = 1 - (S / c)^2; masked scores (-inf, P = 0): 0
        dS = dS * at::where(at::isinf(S), at::zeros_like(S), 1 - (S / softcap).square());
      }
      dqh.narrow(2, p.row0, p.rows).copy_(at::matmul(dS, k_p) * scale);
      dkh.narrow(2, p.col0, p.cols).add_(at::matmul(dS.transpose(-1, -2), q_p), scale);
    }
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
