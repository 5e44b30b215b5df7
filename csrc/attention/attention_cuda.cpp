// Torch side of attention on CUDA tensors. Forward: the flash kernel (flash_kernel.cuh) for
// fp16 / bf16 and head_dim 32, 64, 72, 80, 96, 128; anything else (float32, float64, other
// head sizes) runs the composed ATen path of attention_cpu.cpp. Backward: the composed path
// for now (it recomputes the probabilities from lse, in chunks of sequences).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "attention/attention_composed.h"
#include "attention/flash.cuh"
#include "checks.h"

namespace pyssm {
namespace {

using Launch = cudaError_t (*)(const FlashParams&, cudaStream_t);

Launch launcher(at::ScalarType t, int64_t d) {
#define PYSSM_FLASH_CASE(tag, hd) \
  if (d == hd) return flash_fwd_##tag##_hd##hd;
#define PYSSM_FLASH_CASES(tag)                                                         \
  PYSSM_FLASH_CASE(tag, 32) PYSSM_FLASH_CASE(tag, 64) PYSSM_FLASH_CASE(tag, 72)        \
  PYSSM_FLASH_CASE(tag, 80) PYSSM_FLASH_CASE(tag, 96) PYSSM_FLASH_CASE(tag, 128)
  if (t == at::kHalf) {
    PYSSM_FLASH_CASES(fp16)
  } else if (t == at::kBFloat16) {
    PYSSM_FLASH_CASES(bf16)
  }
#undef PYSSM_FLASH_CASES
#undef PYSSM_FLASH_CASE
  return nullptr;
}

// contiguous, and 16-byte aligned for the kernel's vector loads
at::Tensor for_kernel(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 == 0 ? c : c.clone();
}

std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& v, bool causal,
                                                  std::optional<double> softmax_scale,
                                                  const std::optional<at::Tensor>& cu_seqlens,
                                                  std::optional<int64_t> max_seqlen) {
  const AttnSizes s = check_attention_args(q, k, v, cu_seqlens, max_seqlen);
  const Launch launch = launcher(q.scalar_type(), s.head_dim);
  if (launch == nullptr || s.batch > 65535 || s.heads > 65535) {
    return attention_composed(q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen);
  }
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = for_kernel(q), kc = for_kernel(k), vc = for_kernel(v);
  at::Tensor out = at::empty(qc.sizes(), qc.options());
  at::Tensor lse = s.varlen ? at::empty({s.heads, q.size(0)}, q.options().dtype(at::kFloat))
                            : at::empty({s.batch, s.heads, s.seqlen_q},
                                        q.options().dtype(at::kFloat));
  at::Tensor cu;
  if (s.varlen) cu = cu_seqlens->contiguous();
  const double scale =
      softmax_scale ? *softmax_scale : 1.0 / std::sqrt(static_cast<double>(s.head_dim));
  FlashParams p{};
  p.q = qc.const_data_ptr();
  p.k = kc.const_data_ptr();
  p.v = vc.const_data_ptr();
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  p.cu_seqlens = s.varlen ? cu.const_data_ptr<int>() : nullptr;
  p.batch = s.batch;
  p.heads = s.heads;
  p.heads_k = s.heads_k;
  p.seqlen_q = s.seqlen_q;
  p.seqlen_k = s.seqlen_k;
  p.total_q = s.varlen ? q.size(0) : s.batch * s.seqlen_q;
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.causal = causal;
  const cudaError_t err = launch(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "attention CUDA launch failed: ", cudaGetErrorString(err));
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyssm, CUDA, m) {
  m.impl("attention", &attention_cuda);
  m.impl("attention_backward", &attention_backward_composed);
}

}  // namespace pyssm
