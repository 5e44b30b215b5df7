// Torch side of the CUDA selective scan: checks, dtype conversion of the small operands,
// allocation, stream, launch, and the error check after it.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <optional>
#include <tuple>

#include "checks.h"
#include "ss2d/selective_scan.cuh"
#include "ss2d/selective_scan_args.h"

namespace pyssm {
namespace {

using FwdLaunch = cudaError_t (*)(const SelectiveScanParams&, cudaStream_t);
using BwdLaunch = cudaError_t (*)(const SelectiveScanBwdParams&, cudaStream_t);

std::pair<FwdLaunch, BwdLaunch> launchers(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return {selective_scan_fwd_fp64, selective_scan_bwd_fp64};
    case at::kFloat: return {selective_scan_fwd_fp32, selective_scan_bwd_fp32};
    case at::kHalf: return {selective_scan_fwd_fp16, selective_scan_bwd_fp16};
    case at::kBFloat16: return {selective_scan_fwd_bf16, selective_scan_bwd_bf16};
    default: TORCH_CHECK_TYPE(false, "selective_scan: u must be float64, float32, float16 or "
                              "bfloat16 on CUDA, got ", t);
  }
}

// Channels a backward block takes (dB and dC summed over them on chip): 0, the kernels' own
// choice, unless PYSSM_SCAN_CHANNELS_PER_BLOCK says 1 to 8 (1: v1's one channel a block, the
// benchmark's comparison). Read at every call.
int64_t channels_per_block() {
  const char* env = std::getenv("PYSSM_SCAN_CHANNELS_PER_BLOCK");
  if (env == nullptr || *env == '\0') return 0;
  char* end = nullptr;
  const long v = std::strtol(env, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && v >= 0 && v <= kMaxChannelsPerBlock,
                    "PYSSM_SCAN_CHANNELS_PER_BLOCK must be 0 (automatic) to ",
                    kMaxChannelsPerBlock, ", got '", env, "'");
  return v;
}

// The operands as the kernels read them: u, delta, B, C contiguous in u's dtype; A, D, bias
// contiguous in the accumulation type; the struct owns any converted copies.
struct Operands {
  at::Tensor u, delta, A, B, C, D, bias;
};

Operands prepare(const ScanSizes& s, const at::Tensor& u, const at::Tensor& delta,
                 const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                 const std::optional<at::Tensor>& D,
                 const std::optional<at::Tensor>& delta_bias, at::ScalarType acc) {
  TORCH_CHECK_VALUE(s.dstate <= kSelectiveScanMaxState, "selective_scan on CUDA takes d_state "
                    "(A.shape[1]) up to ", kSelectiveScanMaxState, ", got ", s.dstate);
  const at::ScalarType t = u.scalar_type();
  Operands o;
  o.u = u.contiguous();
  o.delta = delta.to(t).contiguous();
  o.B = B.to(t).contiguous();
  o.C = C.to(t).contiguous();
  o.A = A.to(acc).contiguous();
  if (D) o.D = D->to(acc).contiguous();
  if (delta_bias) o.bias = delta_bias->to(acc).contiguous();
  return o;
}

SelectiveScanParams params(const ScanSizes& s, const Operands& o, bool delta_softplus) {
  SelectiveScanParams p{};
  p.u = o.u.const_data_ptr();
  p.delta = o.delta.const_data_ptr();
  p.A = o.A.const_data_ptr();
  p.B = o.B.const_data_ptr();
  p.C = o.C.const_data_ptr();
  p.D = o.D.defined() ? o.D.const_data_ptr() : nullptr;
  p.delta_bias = o.bias.defined() ? o.bias.const_data_ptr() : nullptr;
  p.batch = s.batch;
  p.channels = s.channels;
  p.length = s.length;
  p.groups = s.groups;
  p.dstate = s.dstate;
  p.delta_softplus = delta_softplus;
  return p;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " CUDA launch failed: ", cudaGetErrorString(err));
}

// The forward, and with `last` (batch, channels, N) in the accumulation type also the state
// after the last position.
at::Tensor scan_forward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                        const at::Tensor& B, const at::Tensor& C,
                        const std::optional<at::Tensor>& D,
                        const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                        bool out_float32, at::Tensor* last) {
  const ScanSizes s = check_scan_args(u, delta, A, B, C, D, delta_bias);
  const c10::cuda::CUDAGuard guard(u.device());
  const at::ScalarType acc = u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::ScalarType out_dtype = out_float32 ? at::kFloat : u.scalar_type();
  const auto [fwd, bwd] = launchers(u.scalar_type());
  at::Tensor out = at::empty({s.batch, s.channels, s.length}, u.options().dtype(acc));
  if (last != nullptr) *last = new_last_state(s, u.options().dtype(acc));
  if (out.numel() == 0) return out.to(out_dtype);
  const Operands o = prepare(s, u, delta, A, B, C, D, delta_bias, acc);
  SelectiveScanParams p = params(s, o, delta_softplus);
  p.out = out.mutable_data_ptr();
  p.last_state = last != nullptr ? last->mutable_data_ptr() : nullptr;
  check_launch(fwd(p, at::cuda::getCurrentCUDAStream()), "selective_scan");
  return out.to(out_dtype);
}

at::Tensor selective_scan_cuda(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                               const at::Tensor& B, const at::Tensor& C,
                               const std::optional<at::Tensor>& D,
                               const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                               bool out_float32) {
  return scan_forward(u, delta, A, B, C, D, delta_bias, delta_softplus, out_float32, nullptr);
}

std::tuple<at::Tensor, at::Tensor> selective_scan_with_state_cuda(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const std::optional<at::Tensor>& D,
    const std::optional<at::Tensor>& delta_bias, bool delta_softplus, bool out_float32) {
  at::Tensor last;
  at::Tensor out =
      scan_forward(u, delta, A, B, C, D, delta_bias, delta_softplus, out_float32, &last);
  return {out, last};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
selective_scan_backward_cuda(const at::Tensor& dout, const at::Tensor& u,
                             const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                             const at::Tensor& C, const std::optional<at::Tensor>& D,
                             const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                             const std::optional<at::Tensor>& dlast_state) {
  const ScanSizes s = check_scan_args(u, delta, A, B, C, D, delta_bias);
  check_scan_grad_args(s, u, dout, dlast_state);
  const c10::cuda::CUDAGuard guard(u.device());
  const at::ScalarType acc = u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = u.options().dtype(acc);
  const auto [fwd, bwd] = launchers(u.scalar_type());
  const Operands o = prepare(s, u, delta, A, B, C, D, delta_bias, acc);
  const at::Tensor dout_acc = dout.to(acc).contiguous();
  const at::Tensor dlast_acc =
      dlast_state ? dlast_state->to(acc).contiguous() : at::Tensor();

  at::Tensor du = at::empty({s.batch, s.channels, s.length}, opts);
  at::Tensor ddelta = at::empty({s.batch, s.channels, s.length}, opts);
  at::Tensor dA_part = at::zeros({s.batch, s.channels, s.dstate}, opts);
  at::Tensor dB = at::zeros({s.batch, s.groups, s.dstate, s.length}, opts);
  at::Tensor dC = at::zeros({s.batch, s.groups, s.dstate, s.length}, opts);
  at::Tensor dD_part = at::zeros({s.batch, s.channels}, opts);
  at::Tensor dbias_part = at::zeros({s.batch, s.channels}, opts);
  if (du.numel() > 0) {
    // raises under torch.use_deterministic_algorithms(True) (warns with warn_only), as torch's
    // own ops that add floats by atomics do
    at::globalContext().alertNotDeterministic(
        "pyssm::selective_scan_backward on CUDA (its kernel sums dA, dB, dC, dD and the bias "
        "gradient by float atomics; backend='reference' is deterministic)");
    SelectiveScanBwdParams p{};
    p.fwd = params(s, o, delta_softplus);
    const at::Tensor carries = at::empty({selective_scan_carry_elems(p.fwd)}, opts);
    p.dout = dout_acc.const_data_ptr();
    p.dlast_state = dlast_acc.defined() ? dlast_acc.const_data_ptr() : nullptr;
    p.du = du.mutable_data_ptr();
    p.ddelta = ddelta.mutable_data_ptr();
    p.dA_part = dA_part.mutable_data_ptr();
    p.dB = dB.mutable_data_ptr();
    p.dC = dC.mutable_data_ptr();
    p.dD_part = dD_part.mutable_data_ptr();
    p.dbias_part = dbias_part.mutable_data_ptr();
    p.carries = carries.mutable_data_ptr();
    p.channels_per_block = channels_per_block();
    check_launch(bwd(p, at::cuda::getCurrentCUDAStream()), "selective_scan_backward");
  }
  at::Tensor dD = D ? dD_part.sum(0).to(D->scalar_type()) : at::empty({0}, u.options());
  at::Tensor dbias = delta_bias ? dbias_part.sum(0).to(delta_bias->scalar_type())
                                : at::empty({0}, u.options());
  return {du.to(u.scalar_type()), ddelta.to(delta.scalar_type()),
          dA_part.sum(0).to(A.scalar_type()), dB.to(B.scalar_type()), dC.to(C.scalar_type()),
          dD, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyssm, CUDA, m) {
  m.impl("selective_scan", &selective_scan_cuda);
  m.impl("selective_scan_with_state", &selective_scan_with_state_cuda);
  m.impl("selective_scan_backward", &selective_scan_backward_cuda);
}

}  // namespace pyssm
