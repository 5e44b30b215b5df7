// ss2d on CUDA tensors. Forward: the fused kernel (ss2d_kernel.cuh) after one x_proj GEMM;
// shapes it does not take (d_state > 16, a huge batch, a z row too wide for its shared-memory
// tile) run the composed core of ss2d_cpu.cpp instead. Backward: the composed core, whose
// inner ops dispatch to the CUDA cross_scan / selective_scan / cross_merge kernels.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "ss2d/ss2d.cuh"
#include "ss2d/ss2d_composed.h"

namespace pyssm {
namespace {

using Launch = cudaError_t (*)(const Ss2dParams&, cudaStream_t);

Launch launcher(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return ss2d_fwd_fp64;
    case at::kFloat: return ss2d_fwd_fp32;
    case at::kHalf: return ss2d_fwd_fp16;
    case at::kBFloat16: return ss2d_fwd_bf16;
    default: return nullptr;
  }
}

at::Tensor ss2d_cuda(const at::Tensor& x, const at::Tensor& x_proj_weight,
                     const at::Tensor& dt_projs_weight, const at::Tensor& dt_projs_bias,
                     const at::Tensor& A_logs, const at::Tensor& Ds, bool channels_first,
                     bool out_float32) {
  const Ss2dSizes s =
      check_ss2d_args(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, channels_first);
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t acc_bytes = acc == at::kDouble ? 8 : 4;
  const Launch launch = launcher(x.scalar_type());
  const bool fits = launch != nullptr && s.dstate <= kSs2dMaxState && s.batch * 4 <= 65535 &&
                    ss2d_smem_bytes(s.dim, s.rank, s.dstate, x.element_size(),
                                    size_t(acc_bytes)) <= kSs2dMaxSmem;
  if (!fits) {
    return ss2d_composed(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                         channels_first, out_float32);
  }
  const at::ScalarType out_dtype = out_float32 ? at::kFloat : x.scalar_type();
  if (x.numel() == 0) return at::zeros(x.sizes(), x.options().dtype(out_dtype));
  const c10::cuda::CUDAGuard guard(x.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t B = s.batch, D = s.dim, L = s.height * s.width, zw = s.rank + 2 * s.dstate;

  const at::Tensor xl = (channels_first ? x.permute({0, 2, 3, 1}) : x).contiguous();
  // x_proj of every pixel for the four directions, in pixel order: (B * L, 4 * (R + 2N))
  const at::Tensor z =
      at::matmul(xl.reshape({B * L, D}).to(acc), x_proj_weight.to(acc).reshape({4 * zw, D}).t())
          .contiguous();
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
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  p.chunks = ss2d_chunks(B, L, D, sms);
  p.chunk_len = (L + p.chunks - 1) / p.chunks;
  p.chunks = (L + p.chunk_len - 1) / p.chunk_len;
  const at::Tensor scratch = at::empty({ss2d_scratch_elems(p)}, x.options().dtype(acc));
  p.scratch = scratch.numel() ? scratch.mutable_data_ptr() : nullptr;
  const cudaError_t err = launch(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "ss2d CUDA launch failed: ", cudaGetErrorString(err));

  at::Tensor out = y.view({B, s.height, s.width, D});
  if (channels_first) out = out.permute({0, 3, 1, 2});
  return out.to(out_dtype).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(pyssm, CUDA, m) {
  m.impl("ss2d", &ss2d_cuda);
  m.impl("ss2d_backward", &ss2d_backward_composed);
}

}  // namespace pyssm
