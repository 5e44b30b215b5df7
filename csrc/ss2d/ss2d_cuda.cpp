// ss2d on CUDA tensors. Forward: the fused kernel (ss2d_n1_kernel.cuh at d_state 1,
// ss2d_kernel.cuh otherwise) after x_proj (on tensor cores for 16-bit x, ss2d_xproj_kernel.cuh;
// a GEMM otherwise).
// Backward: the fused kernels (ss2d_bwd_kernel.cuh; at d_state 1 the main one from
// ss2d_bwd_n1_kernel.cuh) between x_proj (recomputed) and its adjoint (dx on tensor cores for
// 16-bit x; dW_x a bf16 GEMM over dz's bf16 split for bf16 x, an fp32 GEMM otherwise). Shapes
// the kernels do not take (d_state > 16, a huge batch, a tile too large for shared memory) run
// the composed core of ss2d_cpu.cpp instead, whose inner ops dispatch to the CUDA cross_scan /
// selective_scan / cross_merge kernels.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "checks.h"
#include "ss2d/ss2d.cuh"
#include "ss2d/ss2d_composed.h"

namespace pyssm {
static_assert(kSs2dStateTile == kSs2dN1Tile, "ss2d_backward's states check: v3's tiles");
namespace {

using Launch = cudaError_t (*)(const Ss2dParams&, cudaStream_t);
using LaunchBwd = cudaError_t (*)(const Ss2dBwdParams&, cudaStream_t);

Launch launcher(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return ss2d_fwd_fp64;
    case at::kFloat: return ss2d_fwd_fp32;
    case at::kHalf: return ss2d_fwd_fp16;
    case at::kBFloat16: return ss2d_fwd_bf16;
    default: return nullptr;
  }
}

LaunchBwd bwd_launcher(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return ss2d_bwd_fp64;
    case at::kFloat: return ss2d_bwd_fp32;
    case at::kHalf: return ss2d_bwd_fp16;
    case at::kBFloat16: return ss2d_bwd_bf16;
    default: return nullptr;
  }
}

// x in channels-last (B, H, W, D), contiguous.
at::Tensor channels_last(const at::Tensor& x, bool channels_first) {
  return (channels_first ? x.permute({0, 2, 3, 1}) : x).contiguous();
}

using LaunchXproj = cudaError_t (*)(const Ss2dXprojParams&, cudaStream_t);
LaunchXproj xproj_launcher(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return ss2d_xproj_fp16;
    case at::kBFloat16: return ss2d_xproj_bf16;
    default: return nullptr;
  }
}

// PYSSM_SS2D_XPROJ=gemm (read at every call; the benchmark times both): x_proj and its adjoint
// as fp32 GEMMs even for 16-bit x.
bool xproj_gemm() {
  const char* env = std::getenv("PYSSM_SS2D_XPROJ");
  return env != nullptr && std::string(env) == "gemm";
}
bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// x_proj of every pixel for the four directions, in pixel order: (B * L, 4 * (R + 2N)) in the
// accumulation type, from x as (B * L, D) contiguous in its own dtype. 16-bit x with D a multiple
// of 8 takes the tensor-core kernel (ss2d_xproj_kernel.cuh), which reads x as it is; otherwise
// x cast to the accumulation type and a GEMM.
at::Tensor x_proj(const at::Tensor& x, const at::Tensor& x_proj_weight, at::ScalarType acc) {
  const int64_t D = x.size(1);
  const at::Tensor w = x_proj_weight.to(acc).reshape({-1, D});
  const LaunchXproj launch = xproj_launcher(x.scalar_type());
  if (launch != nullptr && !xproj_gemm() && D % 8 == 0 && aligned16(x) && acc == at::kFloat) {
    at::Tensor wc = w.contiguous();
    if (!aligned16(wc)) wc = wc.clone();
    at::Tensor z = at::empty({x.size(0), wc.size(0)}, x.options().dtype(at::kFloat));
    const Ss2dXprojParams p{x.const_data_ptr(), wc.const_data_ptr<float>(), nullptr,
                            z.mutable_data_ptr(), nullptr, x.size(0), D, wc.size(0)};
    const cudaError_t err = launch(p, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "ss2d x_proj CUDA launch failed: ", cudaGetErrorString(err));
    return z;
  }
  return at::matmul(x.to(acc), w.t()).contiguous();
}

// aten::mm.dtype (16-bit inputs, fp32 output; torch 2.8 and later), looked up at run time, so
// that the extension builds and runs on a torch without it (dW_x's fp32 GEMM then).
std::optional<c10::OperatorHandle> mm_out_dtype() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"aten::mm", "dtype"});
  return op;
}

// x_proj's adjoint: dx = dx_scan + dz W_x in x's dtype, and dW_x = dz^T x (4 (R + 2N), D) in
// the accumulation type (undefined where the caller is to compute it), from dz (B * L,
// 4 (R + 2N)) and dx_scan (B * L, D) in the accumulation type, W_x (4 (R + 2N), D) and x as
// (B * L, D) in its dtype. 16-bit x with 4 (R + 2N) a multiple of 8: dx by the tensor-core
// kernel, which reads dx_scan once and writes the sum once, rounded; for bf16 x the kernel also
// writes dz as bf16 hi | lo, and dW_x is one bf16 GEMM of that against x (fp32 out: 2^-16 of
// each product, instead of casting x to fp32 for an fp32 GEMM). Otherwise an addmm into dx_scan
// and a cast.
std::pair<at::Tensor, at::Tensor> x_proj_adjoint(const at::Tensor& dz, const at::Tensor& w,
                                                 at::Tensor& dx_scan, const at::Tensor& x) {
  const at::ScalarType out = x.scalar_type();
  const LaunchXproj launch = xproj_launcher(out);
  if (launch != nullptr && !xproj_gemm() && dz.size(1) % 8 == 0 && dx_scan.size(1) % 2 == 0 &&
      dz.scalar_type() == at::kFloat && aligned16(dz) && aligned16(dx_scan)) {
    const int64_t K = dz.size(1);
    const at::Tensor wt = w.t().contiguous();  // (D, 4 * (R + 2N)), fresh: aligned
    at::Tensor dx = at::empty(dx_scan.sizes(), dx_scan.options().dtype(out));
    const std::optional<c10::OperatorHandle> mm = mm_out_dtype();
    at::Tensor split;
    if (out == at::kBFloat16 && mm.has_value()) {
      split = at::empty({dz.size(0), 2 * K}, dz.options().dtype(at::kBFloat16));
    }
    const Ss2dXprojParams p{dz.const_data_ptr(), wt.const_data_ptr<float>(),
                            dx_scan.const_data_ptr<float>(), dx.mutable_data_ptr(),
                            split.defined() ? split.mutable_data_ptr() : nullptr,
                            dz.size(0), K, dx_scan.size(1)};
    const cudaError_t err = launch(p, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "ss2d x_proj adjoint CUDA launch failed: ",
                cudaGetErrorString(err));
    if (!split.defined()) return {dx, at::Tensor()};
    try {
      const at::Tensor both =
          mm->typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::ScalarType)>().call(
              split.t(), x, at::kFloat);  // (2 K, D): dz_hi^T x over dz_lo^T x
      return {dx, both.narrow(0, 0, K) + both.narrow(0, K, K)};
    } catch (const c10::Error& e) {  // (its checks run before any launch) the caller's GEMM
      TORCH_WARN_ONCE("ss2d backward: aten::mm.dtype refused dW_x's bf16 GEMM (",
                      e.what_without_backtrace(), "); x is cast to float32 for it instead");
      return {dx, at::Tensor()};
    }
  }
  dx_scan.addmm_(dz, w);
  return {dx_scan.to(out), at::Tensor()};
}

// Scan chunks for a grid of a few blocks per SM; chunk_len a multiple of `tile`.
// PYSSM_SS2D_BLOCKS_PER_SM (read at every call) sets the grid aimed at: 0 runs each
// direction's scan as one chunk, in one pass. The default is the kernel's: 16 blocks of up to
// 4 warps for v2 and the backward, 2 of 8 warps for the d_state-1 forward (v3). The benchmark
// times both (pyssm/bench/ss2d.py).
std::pair<int64_t, int64_t> chunking(int64_t B, int64_t L, int64_t D, int64_t tile,
                                     int64_t default_per_sm = 16,
                                     int64_t channels_per_block = 128) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const char* env = std::getenv("PYSSM_SS2D_BLOCKS_PER_SM");
  int64_t per_sm = env != nullptr && *env != '\0' ? std::strtoll(env, nullptr, 10) : default_per_sm;
  if (per_sm < 0) per_sm = default_per_sm;
  const int64_t chunks = ss2d_chunks(B, L, D, sms, per_sm, channels_per_block);
  int64_t chunk_len = (L + chunks - 1) / chunks;
  chunk_len = (chunk_len + tile - 1) / tile * tile;
  return {chunk_len, (L + chunk_len - 1) / chunk_len};
}

// The forward's kernel at d_state 1: v3 (ss2d_n1_kernel.cuh) unless PYSSM_SS2D_FWD=v2 (read
// at every call; the benchmark times both), and only where its shared memory fits.
bool use_n1(const Ss2dSizes& s, size_t x_bytes, size_t acc_bytes) {
  if (s.dstate != 1) return false;
  const char* env = std::getenv("PYSSM_SS2D_FWD");
  if (env != nullptr && std::string(env) == "v2") return false;
  const size_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  const size_t bytes = ss2d_n1_layout(int(s.rank), x_bytes, acc_bytes).bytes;
  return bytes <= kSs2dN1MaxSmem && bytes + 1024 <= optin;  // (+ the static pixel tables)
}

// The forward, and with keep_states the state entering every tile of each scan (Ss2dParams::
// states) where v3 runs each scan as one chunk, the backward's condition for using them;
// elsewhere an empty states tensor (the backward then runs its summary pass).
std::tuple<at::Tensor, at::Tensor> ss2d_forward_cuda(
    const at::Tensor& x, const at::Tensor& x_proj_weight, const at::Tensor& dt_projs_weight,
    const at::Tensor& dt_projs_bias, const at::Tensor& A_logs, const at::Tensor& Ds,
    bool channels_first, bool out_float32, bool keep_states) {
  const Ss2dSizes s =
      check_ss2d_args(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, channels_first);
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t acc_bytes = acc == at::kDouble ? 8 : 4;
  const Launch launch = launcher(x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const bool n1 = launch != nullptr && use_n1(s, x.element_size(), size_t(acc_bytes));
  const bool fits = launch != nullptr && s.dstate <= kSs2dMaxState && s.batch * 4 <= 65535 &&
                    (n1 || ss2d_smem_bytes(s.dim, s.rank, s.dstate, x.element_size(),
                                           size_t(acc_bytes)) <= kSs2dMaxSmem);
  const at::Tensor no_states = at::empty({0}, x.options().dtype(acc));
  if (!fits) {
    return {ss2d_composed(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                          channels_first, out_float32),
            no_states};
  }
  const at::ScalarType out_dtype = out_float32 ? at::kFloat : x.scalar_type();
  if (x.numel() == 0) return {at::zeros(x.sizes(), x.options().dtype(out_dtype)), no_states};
  // raises under torch.use_deterministic_algorithms(True) (warns with warn_only), as torch's
  // own ops that add floats by atomics do: the sums' order, and so their last bits, vary
  at::globalContext().alertNotDeterministic(
      "pyssm::ss2d on CUDA (its kernels add the four scan directions into y by float "
      "atomics; backend='reference' is deterministic)");
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t B = s.batch, D = s.dim, L = s.height * s.width;

  const at::Tensor xl = channels_last(x, channels_first);
  const at::Tensor z = x_proj(xl.reshape({B * L, D}), x_proj_weight, acc);
  const at::Tensor dt_w = dt_projs_weight.to(acc).contiguous();
  const at::Tensor dt_b = dt_projs_bias.to(acc).contiguous();
  const at::Tensor A = (-at::exp(A_logs.to(acc))).contiguous();
  const at::Tensor Ds_acc = Ds.to(acc).contiguous();
  at::Tensor y = at::zeros({B, L, D}, x.options().dtype(acc));

  Ss2dParams p{};
  p.x = xl.const_data_ptr();
  p.z = z.const_data_ptr();
  p.dt_w = dt_w.const_data_ptr();
  p.dt_b = dt_b.const_data_ptr();
  p.A = A.const_data_ptr();
  p.Ds = Ds_acc.const_data_ptr();
  p.y = y.mutable_data_ptr();
  p.batch = B;
  p.height = s.height;
  p.width = s.width;
  p.dim = D;
  p.rank = s.rank;
  p.dstate = s.dstate;
  p.n1 = n1;
  std::tie(p.chunk_len, p.chunks) = n1 ? chunking(B, L, D, kSs2dN1Tile, 2, kSs2dN1Lanes)
                                       : chunking(B, L, D, 1);
  const at::Tensor scratch = at::empty({ss2d_scratch_elems(p)}, x.options().dtype(acc));
  p.scratch = scratch.numel() ? scratch.mutable_data_ptr() : nullptr;
  const at::Tensor states =
      keep_states && n1 && p.chunks == 1
          ? at::empty({B, 4, ss2d_state_tiles(L), D}, x.options().dtype(acc))
          : no_states;
  p.states = states.numel() ? states.mutable_data_ptr() : nullptr;
  const cudaError_t err = launch(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "ss2d CUDA launch failed: ", cudaGetErrorString(err));

  at::Tensor out = y.view({B, s.height, s.width, D});
  // channels-first: a (B, D, H, W) view of the channels-last result, kept without a copy when
  // x itself is stored channels-last (ss2d_channels_last_out)
  if (channels_first) out = out.permute({0, 3, 1, 2});
  return {ss2d_out_layout(out.to(out_dtype), ss2d_channels_last_out(x, channels_first)), states};
}

at::Tensor ss2d_cuda(const at::Tensor& x, const at::Tensor& x_proj_weight,
                     const at::Tensor& dt_projs_weight, const at::Tensor& dt_projs_bias,
                     const at::Tensor& A_logs, const at::Tensor& Ds, bool channels_first,
                     bool out_float32) {
  return std::get<0>(ss2d_forward_cuda(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs,
                                       Ds, channels_first, out_float32, false));
}

std::tuple<at::Tensor, at::Tensor> ss2d_with_states_cuda(
    const at::Tensor& x, const at::Tensor& x_proj_weight, const at::Tensor& dt_projs_weight,
    const at::Tensor& dt_projs_bias, const at::Tensor& A_logs, const at::Tensor& Ds,
    bool channels_first, bool out_float32) {
  return ss2d_forward_cuda(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                           channels_first, out_float32, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ss2d_backward_cuda(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& x_proj_weight,
                   const at::Tensor& dt_projs_weight, const at::Tensor& dt_projs_bias,
                   const at::Tensor& A_logs, const at::Tensor& Ds, bool channels_first,
                   const std::optional<at::Tensor>& states) {
  const Ss2dSizes s = check_ss2d_backward_args(dout, x, x_proj_weight, dt_projs_weight,
                                               dt_projs_bias, A_logs, Ds, channels_first);
  check_ss2d_states(states, x, s);
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const size_t acc_bytes = acc == at::kDouble ? 8 : 4;
  const LaunchBwd launch = bwd_launcher(x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const size_t smem_limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  // d_state 1: v3's summary and main kernels (ss2d_bwd_n1_kernel.cuh), unless
  // PYSSM_SS2D_BWD=v1 (v1's kernels) or v1-summary (v1's summary, v3's main kernel); v3-wide
  // takes v3's variant for dt_rank over 16 (dpre out, the GEMMs) at every dt_rank. Read at
  // every call; the benchmark times all four
  const char* bwd_env = std::getenv("PYSSM_SS2D_BWD");
  const std::string bwd_version = bwd_env != nullptr ? bwd_env : "";
  const bool n1 = launch != nullptr && s.dstate == 1 && bwd_version != "v1" &&
                  ss2d_bwd_n1_layout(int(s.rank), x.element_size(), acc_bytes).bytes + 1024 <=
                      smem_limit &&
                  ss2d_bwd_stage_bytes(s.dim, s.rank, 1, acc_bytes) <= smem_limit;
  const bool fits = launch != nullptr && x.numel() > 0 && s.dstate <= kSs2dMaxState &&
                    s.batch * 4 <= 65535 &&
                    (n1 || ss2d_bwd_smem_bytes(s.dim, s.rank, s.dstate, acc_bytes) <= smem_limit);
  if (!fits) {
    return ss2d_backward_composed(dout, x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs,
                                  Ds, channels_first, std::nullopt);
  }
  at::globalContext().alertNotDeterministic(
      "pyssm::ss2d_backward on CUDA (its kernels add the four directions' gradients into dx "
      "by float atomics; backend='reference' is deterministic)");
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t B = s.batch, D = s.dim, R = s.rank, N = s.dstate, L = s.height * s.width;
  const int64_t zw = R + 2 * N;

  const at::Tensor xl = channels_last(x, channels_first);
  // dy in x's dtype, or in the accumulation type when it comes in another (out_float32)
  const bool dy_acc = dout.scalar_type() != x.scalar_type();
  const at::Tensor dyl = channels_last(dy_acc ? dout.to(acc) : dout, channels_first);
  const at::Tensor x2d = xl.reshape({B * L, D});
  const at::Tensor z = x_proj(x2d, x_proj_weight, acc);
  const at::Tensor dt_w = dt_projs_weight.to(acc).contiguous();
  const at::Tensor dt_b = dt_projs_bias.to(acc).contiguous();
  const at::Tensor A = (-at::exp(A_logs.to(acc))).contiguous();
  const at::Tensor Ds_acc = Ds.to(acc).contiguous();

  Ss2dBwdParams p{};
  p.batch = B;
  p.height = s.height;
  p.width = s.width;
  p.dim = D;
  p.rank = R;
  p.dstate = N;
  p.n1 = n1;
  p.n1_summary = n1 && bwd_version != "v1-summary";
  // the forward's states (v3, one chunk): the main kernel alone, over each whole scan;
  // PYSSM_SS2D_BWD=v1-summary times v1's summary pass, so it runs without them
  const bool given = n1 && states.has_value() && states->numel() > 0 &&
                     bwd_version != "v1-summary";
  std::tie(p.chunk_len, p.chunks) =
      given ? std::pair<int64_t, int64_t>{ss2d_state_tiles(L) * kSs2dN1Tile, 1}
            : chunking(B, L, D, n1 ? kSs2dN1Tile : ss2d_bwd_tile(N));
  const at::TensorOptions opts = x.options().dtype(acc);
  at::Tensor dx = at::zeros({B, L, D}, opts);
  at::Tensor dz = at::zeros({B, L, 4, zw}, opts);
  // v3 over dt_rank 16 (or asked for): dt_projs_weight's gradient by the GEMMs below, from dpre
  const bool wide = n1 && (R > kSs2dBwdN1MaxRank || bwd_version == "v3-wide");
  const int64_t planes = N + 2 + (wide ? 0 : R);
  at::Tensor partial = at::zeros({B, 4, p.chunks, planes, D}, opts);
  const at::Tensor dpre = wide ? at::empty({4, B * L, D}, opts) : at::Tensor();
  const at::Tensor scratch = at::empty({given ? 0 : ss2d_bwd_scratch_elems(p)}, opts);
  const at::Tensor states_c = given ? states->contiguous() : at::Tensor();
  p.x = xl.const_data_ptr();
  p.dy = dyl.const_data_ptr();
  p.dy_acc = dy_acc;
  p.z = z.const_data_ptr();
  p.dt_w = dt_w.const_data_ptr();
  p.dt_b = dt_b.const_data_ptr();
  p.A = A.const_data_ptr();
  p.Ds = Ds_acc.const_data_ptr();
  p.dx = dx.mutable_data_ptr();
  p.dz = dz.mutable_data_ptr();
  p.partial = partial.mutable_data_ptr();
  p.dpre = wide ? dpre.mutable_data_ptr() : nullptr;
  p.scratch = given ? nullptr : scratch.mutable_data_ptr();
  p.states = given ? states_c.const_data_ptr() : nullptr;
  const cudaError_t err = launch(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "ss2d backward CUDA launch failed: ", cudaGetErrorString(err));

  const at::Tensor sums = partial.sum(at::IntArrayRef{0, 2});  // (4, planes, D)
  at::Tensor d_dt_w;  // (4, D, R)
  if (wide) {
    // delta's pre-activation is dt_w . (z's dt part) + bias, per direction and pixel: dz's dt
    // part += dpre dt_w, d dt_w = dpre^T (z's dt part), both batched over the directions
    const at::Tensor dt_in = z.view({B * L, 4, zw}).narrow(2, 0, R).transpose(0, 1);
    dz.view({B * L, 4, zw}).narrow(2, 0, R).add_(at::bmm(dpre, dt_w).transpose(0, 1));
    d_dt_w = at::bmm(dpre.transpose(1, 2), dt_in);
  } else {
    d_dt_w = sums.narrow(1, N + 2, R).transpose(1, 2);
  }

  // z = W_x x per pixel: dx += dz W_x, dW_x = dz^T x
  const at::Tensor dzf = dz.view({B * L, 4 * zw});
  const at::Tensor wx = x_proj_weight.to(acc).reshape({4 * zw, D});
  at::Tensor dx_flat = dx.view({B * L, D});
  auto [dx_x, dwx] = x_proj_adjoint(dzf, wx, dx_flat, x2d);
  if (!dwx.defined()) dwx = at::matmul(dzf.t(), x2d.to(acc));
  const at::Tensor d_x_proj_weight = dwx.view({4, zw, D});
  const at::Tensor dA = sums.narrow(1, 0, N).transpose(1, 2).reshape({4 * D, N});
  const at::Tensor dDs = sums.select(1, N).reshape({4 * D});
  const at::Tensor dbias = sums.select(1, N + 1);

  at::Tensor dx_out = dx_x.view({B, s.height, s.width, D});
  if (channels_first) dx_out = dx_out.permute({0, 3, 1, 2});
  return {ss2d_out_layout(dx_out, ss2d_channels_last_out(x, channels_first)),
          d_x_proj_weight.to(x_proj_weight.scalar_type()),
          d_dt_w.to(dt_projs_weight.scalar_type()).contiguous(),
          dbias.to(dt_projs_bias.scalar_type()).contiguous(),
          (dA * A).to(A_logs.scalar_type()),
          dDs.to(Ds.scalar_type()).contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyssm, CUDA, m) {
  m.impl("ss2d", &ss2d_cuda);
  m.impl("ss2d_with_states", &ss2d_with_states_cuda);
  m.impl("ss2d_backward", &ss2d_backward_cuda);
}

}  // namespace pyssm
