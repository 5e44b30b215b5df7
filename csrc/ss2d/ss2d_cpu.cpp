// SS2D core (DESIGN.md "ss2d") composed from pyssm's cross-scan and selective-scan ops and ATen
// matrix products, all in the accumulation type. The ops are called through the dispatcher, so
// the same code runs on CPU tensors (registered here) and on CUDA tensors (ss2d_cuda.cpp):
//   xs = cross_scan(x)                          (B, 4, D, L)
//   z  = x_proj_weight[k] @ xs[:, k]            (B, 4, R + 2N, L) -> dt (R), Bs (N), Cs (N)
//   delta = dt_projs_weight[k] @ dt             (B, 4, D, L)
//   y  = cross_merge(selective_scan(xs, delta, -exp(A_logs), Bs, Cs, Ds, dt_projs_bias, softplus))
// The backward recomputes the forward intermediates and applies the chain rule by hand.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "checks.h"
#include "ss2d/ss2d_composed.h"

namespace pyssm {

Ss2dSizes check_ss2d_args(const at::Tensor& x, const at::Tensor& x_proj_weight,
                          const at::Tensor& dt_projs_weight, const at::Tensor& dt_projs_bias,
                          const at::Tensor& A_logs, const at::Tensor& Ds, bool channels_first) {
  check_floating(x, "x");
  check_floating(x_proj_weight, "x_proj_weight");
  check_floating(dt_projs_weight, "dt_projs_weight");
  check_floating(dt_projs_bias, "dt_projs_bias");
  check_floating(A_logs, "A_logs");
  check_floating(Ds, "Ds");
  check_rank(x, 4, "x", channels_first ? "(B, D, H, W) (channels_first)" : "(B, H, W, D)");
  Ss2dSizes s;
  s.batch = x.size(0);
  s.dim = channels_first ? x.size(1) : x.size(3);
  s.height = channels_first ? x.size(2) : x.size(1);
  s.width = channels_first ? x.size(3) : x.size(2);
  check_rank(dt_projs_weight, 3, "dt_projs_weight", "(4, D, R)");
  s.rank = dt_projs_weight.size(2);
  check_shape(dt_projs_weight, {4, s.dim, s.rank}, "dt_projs_weight",
              "(4, D, R) with D the channels of x");
  check_rank(A_logs, 2, "A_logs", "(4*D, N)");
  s.dstate = A_logs.size(1);
  check_shape(A_logs, {4 * s.dim, s.dstate}, "A_logs", "(4*D, N) with D the channels of x");
  check_shape(x_proj_weight, {4, s.rank + 2 * s.dstate, s.dim}, "x_proj_weight",
              "(4, R + 2N, D) with R from dt_projs_weight and N from A_logs");
  check_shape(dt_projs_bias, {4, s.dim}, "dt_projs_bias", "(4, D)");
  check_shape(Ds, {4 * s.dim}, "Ds", "(4*D,)");
  check_same_device(x_proj_weight, x, "x_proj_weight", "x");
  check_same_device(dt_projs_weight, x, "dt_projs_weight", "x");
  check_same_device(dt_projs_bias, x, "dt_projs_bias", "x");
  check_same_device(A_logs, x, "A_logs", "x");
  check_same_device(Ds, x, "Ds", "x");
  return s;
}

Ss2dSizes check_ss2d_backward_args(const at::Tensor& dout, const at::Tensor& x,
                                   const at::Tensor& x_proj_weight,
                                   const at::Tensor& dt_projs_weight,
                                   const at::Tensor& dt_projs_bias, const at::Tensor& A_logs,
                                   const at::Tensor& Ds, bool channels_first) {
  const Ss2dSizes s =
      check_ss2d_args(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, channels_first);
  check_floating(dout, "dout");
  check_shape(dout, x.sizes(), "dout", "the shape of x");
  check_same_device(dout, x, "dout", "x");
  return s;
}

namespace {

// pyssm's own ops, through the dispatcher: the kernel for the tensors' device.
at::Tensor cross_scan_op(const at::Tensor& x) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyssm::cross_scan", "")
                             .typed<at::Tensor(const at::Tensor&)>();
  return op.call(x);
}

at::Tensor cross_merge_op(const at::Tensor& ys) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyssm::cross_merge", "")
                             .typed<at::Tensor(const at::Tensor&)>();
  return op.call(ys);
}

at::Tensor selective_scan_op(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                             const at::Tensor& B, const at::Tensor& C,
                             const std::optional<at::Tensor>& D,
                             const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                             bool out_float32) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pyssm::selective_scan", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, bool, bool)>();
  return op.call(u, delta, A, B, C, D, delta_bias, delta_softplus, out_float32);
}

using Grads7 =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Grads7 selective_scan_backward_op(const at::Tensor& dout, const at::Tensor& u,
                                  const at::Tensor& delta, const at::Tensor& A,
                                  const at::Tensor& B, const at::Tensor& C,
                                  const std::optional<at::Tensor>& D,
                                  const std::optional<at::Tensor>& delta_bias,
                                  bool delta_softplus) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pyssm::selective_scan_backward", "")
          .typed<Grads7(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                        bool, const std::optional<at::Tensor>&)>();
  return op.call(dout, u, delta, A, B, C, D, delta_bias, delta_softplus, std::nullopt);
}

// The forward intermediates that both directions need, in the accumulation type.
struct Ss2dTrace {
  at::Tensor xs;     // (B, 4, D, L) scan-ordered input
  at::Tensor z;      // (B, 4, R + 2N, L)
  at::Tensor Bs, Cs; // (B, 4, N, L) each, contiguous slices of z
  at::Tensor delta;  // (B, 4*D, L)
  at::Tensor A;      // (4*D, N)
};

Ss2dTrace trace_forward(const Ss2dSizes& s, const at::Tensor& x, const at::Tensor& x_proj_weight,
                        const at::Tensor& dt_projs_weight, const at::Tensor& A_logs,
                        bool channels_first, at::ScalarType acc) {
  const int64_t L = s.height * s.width;
  at::Tensor x_bdhw = channels_first ? x : x.permute({0, 3, 1, 2});
  Ss2dTrace t;
  t.xs = cross_scan_op(x_bdhw.to(acc).contiguous());
  t.z = at::matmul(x_proj_weight.to(acc), t.xs);
  at::Tensor dt = t.z.narrow(2, 0, s.rank);
  t.delta = at::matmul(dt_projs_weight.to(acc), dt).reshape({s.batch, 4 * s.dim, L});
  t.Bs = t.z.narrow(2, s.rank, s.dstate).contiguous();
  t.Cs = t.z.narrow(2, s.rank + s.dstate, s.dstate).contiguous();
  t.A = -at::exp(A_logs.to(acc));
  return t;
}

}  // namespace

at::Tensor ss2d_composed(const at::Tensor& x, const at::Tensor& x_proj_weight,
                    const at::Tensor& dt_projs_weight, const at::Tensor& dt_projs_bias,
                    const at::Tensor& A_logs, const at::Tensor& Ds, bool channels_first,
                    bool out_float32) {
  const Ss2dSizes s =
      check_ss2d_args(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, channels_first);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the inner ops: kernels only
  const at::ScalarType acc = acc_type(x.scalar_type());
  const at::ScalarType out_dtype = out_float32 ? at::kFloat : x.scalar_type();
  const int64_t L = s.height * s.width;
  if (x.numel() == 0) return at::zeros(x.sizes(), x.options().dtype(out_dtype));

  const Ss2dTrace t =
      trace_forward(s, x, x_proj_weight, dt_projs_weight, A_logs, channels_first, acc);
  at::Tensor ys = selective_scan_op(t.xs.reshape({s.batch, 4 * s.dim, L}), t.delta, t.A, t.Bs,
                                     t.Cs, Ds.to(acc), dt_projs_bias.to(acc).reshape({4 * s.dim}),
                                     /*delta_softplus=*/true, /*out_float32=*/false);
  at::Tensor y = cross_merge_op(ys.view({s.batch, 4, s.dim, s.height, s.width}))
                     .view({s.batch, s.dim, s.height, s.width});
  if (!channels_first) y = y.permute({0, 2, 3, 1});
  return ss2d_out_layout(y.to(out_dtype), ss2d_channels_last_out(x, channels_first));
}

void check_ss2d_states(const std::optional<at::Tensor>& states, const at::Tensor& x,
                       const Ss2dSizes& s) {
  if (!states.has_value() || states->numel() == 0) return;
  const int64_t L = s.height * s.width;
  const std::vector<int64_t> want{s.batch, 4, (L + kSs2dStateTile - 1) / kSs2dStateTile, s.dim};
  TORCH_CHECK(states->sizes() == at::IntArrayRef(want), "ss2d_backward: states must be ",
              "ss2d_with_states' second output, (B, 4, ceil(H*W / ", kSs2dStateTile, "), D) = ",
              at::IntArrayRef(want), " for x of ", x.sizes(), ", or empty; got ",
              states->sizes());
  TORCH_CHECK(states->scalar_type() == acc_type(x.scalar_type()),
              "ss2d_backward: states must be ", acc_type(x.scalar_type()), " (x is ",
              x.scalar_type(), "); got ", states->scalar_type());
  TORCH_CHECK(states->device() == x.device(), "ss2d_backward: states must be on x's device (",
              x.device(), "); got ", states->device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ss2d_backward_composed(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& x_proj_weight,
                  const at::Tensor& dt_projs_weight, const at::Tensor& dt_projs_bias,
                  const at::Tensor& A_logs, const at::Tensor& Ds, bool channels_first,
                  const std::optional<at::Tensor>& states) {
  const Ss2dSizes s = check_ss2d_backward_args(dout, x, x_proj_weight, dt_projs_weight,
                                               dt_projs_bias, A_logs, Ds, channels_first);
  check_ss2d_states(states, x, s);  // (checked, then not needed: the composed core recomputes)
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::ScalarType acc = acc_type(x.scalar_type());
  const int64_t L = s.height * s.width;
  if (x.numel() == 0) {
    return {at::zeros(x.sizes(), x.options()), at::zeros_like(x_proj_weight),
            at::zeros_like(dt_projs_weight), at::zeros_like(dt_projs_bias), at::zeros_like(A_logs),
            at::zeros_like(Ds)};
  }

  const Ss2dTrace t =
      trace_forward(s, x, x_proj_weight, dt_projs_weight, A_logs, channels_first, acc);

  // cross_merge's adjoint is cross_scan.
  at::Tensor dy = (channels_first ? dout : dout.permute({0, 3, 1, 2})).to(acc).contiguous();
  at::Tensor dys = cross_scan_op(dy).reshape({s.batch, 4 * s.dim, L});
  auto [dxs_scan, ddelta, dA, dBs, dCs, dDs, dbias] = selective_scan_backward_op(
      dys, t.xs.reshape({s.batch, 4 * s.dim, L}), t.delta, t.A, t.Bs, t.Cs, Ds.to(acc),
      dt_projs_bias.to(acc).reshape({4 * s.dim}), /*delta_softplus=*/true);

  // A = -exp(A_logs)  =>  dA_logs = dA * A.
  at::Tensor dA_logs = dA * t.A;
  // delta[b, k] = W_dt[k] @ dt[b, k]
  at::Tensor dt = t.z.narrow(2, 0, s.rank);
  at::Tensor ddelta4 = ddelta.view({s.batch, 4, s.dim, L});
  at::Tensor d_dt_projs_weight = at::matmul(ddelta4, dt.transpose(2, 3)).sum(0);  // (4, D, R)
  at::Tensor d_dt = at::matmul(dt_projs_weight.to(acc).transpose(1, 2), ddelta4);  // (B,4,R,L)
  // z[b, k] = W_x[k] @ xs[b, k]
  at::Tensor dz = at::cat({d_dt, dBs, dCs}, 2);                                   // (B,4,R+2N,L)
  at::Tensor d_x_proj_weight = at::matmul(dz, t.xs.transpose(2, 3)).sum(0);        // (4,R+2N,D)
  at::Tensor dxs = at::matmul(x_proj_weight.to(acc).transpose(1, 2), dz) +
                   dxs_scan.view({s.batch, 4, s.dim, L});
  // cross_scan's adjoint is cross_merge.
  at::Tensor dx = cross_merge_op(dxs.view({s.batch, 4, s.dim, s.height, s.width}))
                      .view({s.batch, s.dim, s.height, s.width});
  if (!channels_first) dx = dx.permute({0, 2, 3, 1});
  return {ss2d_out_layout(dx.to(x.scalar_type()), ss2d_channels_last_out(x, channels_first)),
          d_x_proj_weight.to(x_proj_weight.scalar_type()),
          d_dt_projs_weight.to(dt_projs_weight.scalar_type()),
          dbias.view({4, s.dim}).to(dt_projs_bias.scalar_type()),
          dA_logs.to(A_logs.scalar_type()),
          dDs.to(Ds.scalar_type())};
}

// ss2d_with_states on the CPU: the composed core keeps no states (the empty tensor).
std::tuple<at::Tensor, at::Tensor> ss2d_with_states_composed(
    const at::Tensor& x, const at::Tensor& x_proj_weight, const at::Tensor& dt_projs_weight,
    const at::Tensor& dt_projs_bias, const at::Tensor& A_logs, const at::Tensor& Ds,
    bool channels_first, bool out_float32) {
  at::Tensor y = ss2d_composed(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                               channels_first, out_float32);
  return {y, at::empty({0}, x.options().dtype(acc_type(x.scalar_type())))};
}

TORCH_LIBRARY_IMPL(pyssm, CPU, m) {
  m.impl("ss2d", &ss2d_composed);
  m.impl("ss2d_with_states", &ss2d_with_states_composed);
  m.impl("ss2d_backward", &ss2d_backward_composed);
}

}  // namespace pyssm
