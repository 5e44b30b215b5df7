// CPU selective scan, forward and backward (DESIGN.md "selective_scan"). Per channel c in
// group g = c / (KD / K) and state n:
//   dt_l = softplus(delta_l + bias_c)  (or delta_l + bias_c)
//   h_l  = exp(dt_l A_cn) h_{l-1} + dt_l B_gnl u_l,      y_l = sum_n C_gnl h_l + D_c u_l
// Everything is computed in the accumulation type (float64 for float64 u, float32 otherwise).
// The backward recomputes the states of one channel at a time into a thread-local buffer and
// runs the adjoint recurrence from the end; group-shared gradients (dB, dC) are owned by one
// (batch, group) task and per-channel ones (dA, dD, dbias) are reduced over batch afterwards,
// so no two threads write the same element.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "checks.h"
#include "ss2d/selective_scan_args.h"
#include "ss2d/ss2d_cpu.h"

namespace pyssm {

ScanSizes check_scan_args(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                          const at::Tensor& B, const at::Tensor& C,
                          const std::optional<at::Tensor>& D,
                          const std::optional<at::Tensor>& delta_bias) {
  check_floating(u, "u");
  check_floating(delta, "delta");
  check_floating(A, "A");
  check_floating(B, "B");
  check_floating(C, "C");
  check_rank(u, 3, "u", "(batch, K*D, L)");
  check_rank(delta, 3, "delta", "(batch, K*D, L)");
  check_rank(A, 2, "A", "(K*D, N)");
  check_rank(B, 4, "B", "(batch, K, N, L)");
  check_rank(C, 4, "C", "(batch, K, N, L)");
  ScanSizes s;
  s.batch = u.size(0);
  s.channels = u.size(1);
  s.length = u.size(2);
  s.groups = B.size(1);
  s.dstate = A.size(1);
  check_shape(delta, u.sizes(), "delta", "(batch, K*D, L), the shape of u");
  check_shape(A, {s.channels, s.dstate}, "A", "(K*D, N) with K*D the channels of u");
  TORCH_CHECK_VALUE(s.groups >= 1 && s.channels % s.groups == 0, "B has ", s.groups,
                    " groups (dim 1), which must be >= 1 and divide the ", s.channels,
                    " channels of u");
  check_shape(B, {s.batch, s.groups, s.dstate, s.length}, "B", "(batch, K, N, L)");
  check_shape(C, {s.batch, s.groups, s.dstate, s.length}, "C", "(batch, K, N, L), the shape of B");
  s.per_group = s.channels / s.groups;
  check_same_device(delta, u, "delta", "u");
  check_same_device(A, u, "A", "u");
  check_same_device(B, u, "B", "u");
  check_same_device(C, u, "C", "u");
  if (D) {
    check_floating(*D, "D");
    check_shape(*D, {s.channels}, "D", "(K*D,)");
    check_same_device(*D, u, "D", "u");
  }
  if (delta_bias) {
    check_floating(*delta_bias, "delta_bias");
    check_shape(*delta_bias, {s.channels}, "delta_bias", "(K*D,)");
    check_same_device(*delta_bias, u, "delta_bias", "u");
  }
  return s;
}

at::Tensor new_last_state(const ScanSizes& s, const at::TensorOptions& opts) {
  return s.length == 0 ? at::zeros({s.batch, s.channels, s.dstate}, opts)
                       : at::empty({s.batch, s.channels, s.dstate}, opts);
}

void check_scan_grad_args(const ScanSizes& s, const at::Tensor& u, const at::Tensor& dout,
                          const std::optional<at::Tensor>& dlast_state) {
  check_floating(dout, "dout");
  check_shape(dout, u.sizes(), "dout", "(batch, K*D, L), the shape of u");
  check_same_device(dout, u, "dout", "u");
  if (dlast_state) {
    check_floating(*dlast_state, "dlast_state");
    check_shape(*dlast_state, {s.batch, s.channels, s.dstate}, "dlast_state",
                "(batch, K*D, N), the shape of the last state");
    check_same_device(*dlast_state, u, "dlast_state", "u");
  }
}

namespace {

// softplus(x) = log(1 + e^x) without overflow and without a threshold, so float64 stays exact.
template <typename T>
inline T softplus(T x) {
  return std::max(x, T(0)) + std::log1p(std::exp(-std::abs(x)));
}
template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// The inputs of one scan in the accumulation type, B and C transposed to (batch, K, L, N) so
// the inner loop over states is contiguous.
struct ScanInputs {
  at::Tensor u, delta, A, B, C, D, bias;

  template <typename acc_t>
  auto ptrs() const {
    return std::tuple{u.const_data_ptr<acc_t>(), delta.const_data_ptr<acc_t>(),
                      A.const_data_ptr<acc_t>(), B.const_data_ptr<acc_t>(),
                      C.const_data_ptr<acc_t>(), D.const_data_ptr<acc_t>(),
                      bias.const_data_ptr<acc_t>()};
  }
};

ScanInputs to_acc(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                  const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                  const std::optional<at::Tensor>& delta_bias, at::ScalarType acc) {
  const auto opts = u.options().dtype(acc);
  ScanInputs in;
  in.u = u.to(acc).contiguous();
  in.delta = delta.to(acc).contiguous();
  in.A = A.to(acc).contiguous();
  in.B = B.to(acc).transpose(2, 3).contiguous();
  in.C = C.to(acc).transpose(2, 3).contiguous();
  in.D = D ? D->to(acc).contiguous() : at::zeros({u.size(1)}, opts);
  in.bias = delta_bias ? delta_bias->to(acc).contiguous() : at::zeros({u.size(1)}, opts);
  return in;
}

// last: (batch, KD, N), the state after the last position, or null.
template <typename acc_t>
void scan_forward_kernel(const ScanSizes& s, const ScanInputs& in, acc_t* out, acc_t* last,
                         bool delta_softplus) {
  const int64_t L = s.length, N = s.dstate;
  const auto [u, delta, A, Bm, Cm, D, bias] = in.ptrs<acc_t>();
  at::parallel_for(0, s.batch * s.channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> h(N);
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / s.channels, c = bc % s.channels, g = c / s.per_group;
      const acc_t* u_c = u + bc * L;
      const acc_t* delta_c = delta + bc * L;
      const acc_t* A_c = A + c * N;
      const acc_t* B_g = Bm + (b * s.groups + g) * L * N;
      const acc_t* C_g = Cm + (b * s.groups + g) * L * N;
      acc_t* out_c = out + bc * L;
      std::fill(h.begin(), h.end(), acc_t(0));
      for (int64_t l = 0; l < L; ++l) {
        acc_t dt = delta_c[l] + bias[c];
        if (delta_softplus) dt = softplus(dt);
        const acc_t dtu = dt * u_c[l];
        acc_t y = D[c] * u_c[l];
        for (int64_t n = 0; n < N; ++n) {
          h[n] = std::exp(dt * A_c[n]) * h[n] + dtu * B_g[l * N + n];
          y += C_g[l * N + n] * h[n];
        }
        out_c[l] = y;
      }
      if (last != nullptr) std::copy(h.begin(), h.end(), last + bc * N);
    }
  });
}

struct ScanGrads {
  at::Tensor du, ddelta, dA_part, dB, dC, dD_part, dbias_part;
};

// dlast: (batch, KD, N), the gradient of the last state, or null (none).
template <typename acc_t>
void scan_backward_kernel(const ScanSizes& s, const ScanInputs& in, const acc_t* dout,
                          const acc_t* dlast, ScanGrads& g, bool delta_softplus) {
  const int64_t L = s.length, N = s.dstate;
  const auto [u, delta, A, Bm, Cm, D, bias] = in.ptrs<acc_t>();
  acc_t* du = g.du.mutable_data_ptr<acc_t>();
  acc_t* ddelta = g.ddelta.mutable_data_ptr<acc_t>();
  acc_t* dA = g.dA_part.mutable_data_ptr<acc_t>();      // (batch, KD, N)
  acc_t* dB = g.dB.mutable_data_ptr<acc_t>();           // (batch, K, L, N), zeroed
  acc_t* dC = g.dC.mutable_data_ptr<acc_t>();           // (batch, K, L, N), zeroed
  acc_t* dD = g.dD_part.mutable_data_ptr<acc_t>();      // (batch, KD)
  acc_t* dbias = g.dbias_part.mutable_data_ptr<acc_t>();  // (batch, KD)

  at::parallel_for(0, s.batch * s.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> hs(L * N), dts(L), gh(N), dA_c(N);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / s.groups, grp = bg % s.groups;
      const acc_t* B_g = Bm + bg * L * N;
      const acc_t* C_g = Cm + bg * L * N;
      acc_t* dB_g = dB + bg * L * N;
      acc_t* dC_g = dC + bg * L * N;
      for (int64_t c = grp * s.per_group; c < (grp + 1) * s.per_group; ++c) {
        const int64_t bc = b * s.channels + c;
        const acc_t* u_c = u + bc * L;
        const acc_t* delta_c = delta + bc * L;
        const acc_t* dout_c = dout + bc * L;
        const acc_t* A_c = A + c * N;
        // Recompute the states h_l of this channel.
        for (int64_t l = 0; l < L; ++l) {
          acc_t dt = delta_c[l] + bias[c];
          if (delta_softplus) dt = softplus(dt);
          dts[l] = dt;
          const acc_t dtu = dt * u_c[l];
          for (int64_t n = 0; n < N; ++n) {
            const acc_t prev = l ? hs[(l - 1) * N + n] : acc_t(0);
            hs[l * N + n] = std::exp(dt * A_c[n]) * prev + dtu * B_g[l * N + n];
          }
        }
        // Adjoint recurrence: gh holds dLoss/dh_l (after adding this step's output term),
        // entering the last position with the last state's gradient.
        if (dlast != nullptr)
          std::copy(dlast + bc * N, dlast + (bc + 1) * N, gh.begin());
        else
          std::fill(gh.begin(), gh.end(), acc_t(0));
        std::fill(dA_c.begin(), dA_c.end(), acc_t(0));
        acc_t dD_c = 0, dbias_c = 0;
        for (int64_t l = L - 1; l >= 0; --l) {
          const acc_t dy = dout_c[l], dt = dts[l], uu = u_c[l];
          acc_t du_l = D[c] * dy, ddt = 0;
          dD_c += dy * uu;
          for (int64_t n = 0; n < N; ++n) {
            const acc_t h = hs[l * N + n];
            const acc_t prev = l ? hs[(l - 1) * N + n] : acc_t(0);
            const acc_t decay = std::exp(dt * A_c[n]);
            gh[n] += dy * C_g[l * N + n];
            dC_g[l * N + n] += dy * h;
            ddt += gh[n] * (prev * decay * A_c[n] + B_g[l * N + n] * uu);
            dA_c[n] += gh[n] * prev * decay * dt;
            dB_g[l * N + n] += gh[n] * dt * uu;
            du_l += gh[n] * dt * B_g[l * N + n];
            gh[n] *= decay;
          }
          if (delta_softplus) ddt *= sigmoid(delta_c[l] + bias[c]);
          ddelta[bc * L + l] = ddt;
          du[bc * L + l] = du_l;
          dbias_c += ddt;
        }
        for (int64_t n = 0; n < N; ++n) dA[bc * N + n] = dA_c[n];
        dD[bc] = dD_c;
        dbias[bc] = dbias_c;
      }
    }
  });
}

// The forward, and with `last` also the state after the last position, (batch, KD, N) in the
// accumulation type.
at::Tensor scan_forward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                        const at::Tensor& B, const at::Tensor& C,
                        const std::optional<at::Tensor>& D,
                        const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                        bool out_float32, at::Tensor* last) {
  const ScanSizes s = check_scan_args(u, delta, A, B, C, D, delta_bias);
  const at::ScalarType acc = acc_type(u.scalar_type());
  const at::ScalarType out_dtype = out_float32 ? at::kFloat : u.scalar_type();
  at::Tensor out = at::empty({s.batch, s.channels, s.length}, u.options().dtype(acc));
  if (last != nullptr) *last = new_last_state(s, u.options().dtype(acc));
  if (out.numel() == 0) return out.to(out_dtype);
  const ScanInputs in = to_acc(u, delta, A, B, C, D, delta_bias, acc);
  AT_DISPATCH_FLOATING_TYPES(acc, "selective_scan_cpu", [&] {
    scan_forward_kernel<scalar_t>(s, in, out.mutable_data_ptr<scalar_t>(),
                                  last != nullptr ? last->mutable_data_ptr<scalar_t>() : nullptr,
                                  delta_softplus);
  });
  return out.to(out_dtype);
}

}  // namespace

at::Tensor selective_scan_cpu(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                              const at::Tensor& B, const at::Tensor& C,
                              const std::optional<at::Tensor>& D,
                              const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                              bool out_float32) {
  return scan_forward(u, delta, A, B, C, D, delta_bias, delta_softplus, out_float32, nullptr);
}

std::tuple<at::Tensor, at::Tensor> selective_scan_with_state_cpu(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const std::optional<at::Tensor>& D,
    const std::optional<at::Tensor>& delta_bias, bool delta_softplus, bool out_float32) {
  at::Tensor last;
  at::Tensor out =
      scan_forward(u, delta, A, B, C, D, delta_bias, delta_softplus, out_float32, &last);
  return {out, last};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
selective_scan_backward_cpu(const at::Tensor& dout, const at::Tensor& u, const at::Tensor& delta,
                            const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                            const std::optional<at::Tensor>& D,
                            const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                            const std::optional<at::Tensor>& dlast_state) {
  const ScanSizes s = check_scan_args(u, delta, A, B, C, D, delta_bias);
  check_scan_grad_args(s, u, dout, dlast_state);
  const at::ScalarType acc = acc_type(u.scalar_type());
  const auto opts = u.options().dtype(acc);
  const ScanInputs in = to_acc(u, delta, A, B, C, D, delta_bias, acc);
  const at::Tensor dout_acc = dout.to(acc).contiguous();
  const at::Tensor dlast_acc = dlast_state ? dlast_state->to(acc).contiguous() : at::Tensor();

  ScanGrads g;
  g.du = at::empty({s.batch, s.channels, s.length}, opts);
  g.ddelta = at::empty({s.batch, s.channels, s.length}, opts);
  g.dA_part = at::zeros({s.batch, s.channels, s.dstate}, opts);
  g.dB = at::zeros({s.batch, s.groups, s.length, s.dstate}, opts);
  g.dC = at::zeros({s.batch, s.groups, s.length, s.dstate}, opts);
  g.dD_part = at::zeros({s.batch, s.channels}, opts);
  g.dbias_part = at::zeros({s.batch, s.channels}, opts);
  if (s.batch * s.channels * s.length > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc, "selective_scan_backward_cpu", [&] {
      scan_backward_kernel<scalar_t>(
          s, in, dout_acc.const_data_ptr<scalar_t>(),
          dlast_acc.defined() ? dlast_acc.const_data_ptr<scalar_t>() : nullptr, g,
          delta_softplus);
    });
  }
  at::Tensor dD = D ? g.dD_part.sum(0).to(D->scalar_type()) : at::empty({0}, u.options());
  at::Tensor dbias = delta_bias ? g.dbias_part.sum(0).to(delta_bias->scalar_type())
                                : at::empty({0}, u.options());
  return {g.du.to(u.scalar_type()),
          g.ddelta.to(delta.scalar_type()),
          g.dA_part.sum(0).to(A.scalar_type()),
          g.dB.transpose(2, 3).contiguous().to(B.scalar_type()),
          g.dC.transpose(2, 3).contiguous().to(C.scalar_type()),
          dD,
          dbias};
}

TORCH_LIBRARY_IMPL(pyssm, CPU, m) {
  m.impl("selective_scan", &selective_scan_cpu);
  m.impl("selective_scan_with_state", &selective_scan_with_state_cpu);
  m.impl("selective_scan_backward", &selective_scan_backward_cpu);
}

}  // namespace pyssm
