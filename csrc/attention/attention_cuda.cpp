// Torch side of attention on CUDA tensors. The flash kernels (forward flash_kernel.cuh, backward
// flash_bwd_kernel.cuh) take fp16 / bf16 and head_dim 32, 64, 72, 80, 96, 128, and the forward
// 256 too; anything else (float32, float64, other head sizes, the backward at 256) runs the
// composed ATen path of attention_cpu.cpp. On an sm_90 GPU the forward and the backward at
// head_dim 64, 72, 80, 96 and 128 take the Hopper kernels (flash_sm90_kernel.cuh,
// flash_bwd_sm90_kernel.cuh) unless the environment says PYSSM_FLASH_SM90=0. A forward with
// few queries a group of heads (seqlen_q x heads / heads_k <= 16: decoding) takes the
// flash-decoding kernel (flash_decode_kernel.cuh) before either, unless the environment says
// PYSSM_FLASH_DECODE=0. Soft-capping (softcap > 0) runs in every kernel (set_scale, flash.cuh).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "attention/attention_composed.h"
#include "attention/flash.cuh"
#include "checks.h"

namespace pyssm {
namespace {

using Launch = cudaError_t (*)(const FlashParams&, cudaStream_t);
using BwdLaunch = cudaError_t (*)(const FlashBwdParams&, cudaStream_t);
using DecodeLaunch = cudaError_t (*)(const FlashParams&, const FlashSplit&, cudaStream_t);

// the forward's (Launch), the backward's (BwdLaunch) or the flash-decoding forward's
// (DecodeLaunch) launcher, or null
template <typename L>
L launcher(at::ScalarType t, int64_t d) {
  constexpr bool fwd = std::is_same_v<L, Launch>, decode = std::is_same_v<L, DecodeLaunch>;
#define PYSSM_FLASH_CASE(tag, hd) \
  if (d == hd) {                                                                           \
    if constexpr (fwd) return flash_fwd_##tag##_hd##hd;                                    \
    else if constexpr (decode) return flash_decode_fwd_##tag##_hd##hd;                     \
    else return flash_bwd_##tag##_hd##hd;                                                  \
  }
#define PYSSM_FLASH_CASES(tag)                                                         \
  PYSSM_FLASH_CASE(tag, 32) PYSSM_FLASH_CASE(tag, 64) PYSSM_FLASH_CASE(tag, 72)        \
  PYSSM_FLASH_CASE(tag, 80) PYSSM_FLASH_CASE(tag, 96) PYSSM_FLASH_CASE(tag, 128)
  if (t == at::kHalf) {
    PYSSM_FLASH_CASES(fp16)
    if (d == 256) {  // (the forwards only)
      if constexpr (fwd) return flash_fwd_fp16_hd256;
      else if constexpr (decode) return flash_decode_fwd_fp16_hd256;
    }
  } else if (t == at::kBFloat16) {
    PYSSM_FLASH_CASES(bf16)
    if (d == 256) {
      if constexpr (fwd) return flash_fwd_bf16_hd256;
      else if constexpr (decode) return flash_decode_fwd_bf16_hd256;
    }
  }
#undef PYSSM_FLASH_CASES
#undef PYSSM_FLASH_CASE
  return nullptr;
}

// Whether the flash-decoding forward takes the calls it fits (few queries a group of heads:
// flash_decode_fits): PYSSM_FLASH_DECODE not "0" (read at every call, so a test or the
// benchmark can compare it with the prefill kernels)
bool decode_allowed() {
  const char* env = std::getenv("PYSSM_FLASH_DECODE");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

// Runs the flash-decoding forward where it fits and is allowed, with its split over keys and
// that split's workspace; cudaErrorNotSupported where it does not take the call
cudaError_t run_decode(const FlashParams& p, const at::Tensor& q, const AttnSizes& s,
                       cudaStream_t stream) {
  if (!flash_decode_fits(s.heads, s.heads_k, s.seqlen_q) || !decode_allowed())
    return cudaErrorNotSupported;
  const DecodeLaunch decode = launcher<DecodeLaunch>(q.scalar_type(), s.head_dim);
  if (decode == nullptr) return cudaErrorNotSupported;
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(q.device().index());
  // (before the workspace: head_dim 256's tiles pass sm_86's and sm_89's most a block)
  if (flash_decode_smem(s.head_dim) > props->sharedMemPerBlockOptin) return cudaErrorNotSupported;
  const int sms = props->multiProcessorCount;
  FlashSplit split = flash_decode_plan(
      s.batch, s.heads_k, flash_decode_keys(s.seqlen_q, s.seqlen_k, p.window_left), sms);
  at::Tensor out_part, lse_part;  // (freed after the launch: the allocator orders by stream)
  if (split.splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    out_part = at::empty({split.splits, p.total_q, s.heads, s.head_dim}, f32);
    lse_part = at::empty({split.splits, s.heads, p.total_q}, f32);
    split.out_part = out_part.mutable_data_ptr<float>();
    split.lse_part = lse_part.mutable_data_ptr<float>();
  }
  return decode(p, split, stream);
}

// Whether the Hopper kernels may run for this call: an sm_90 GPU and PYSSM_FLASH_SM90 not "0"
// (read at every call, so a test can compare both paths)
bool sm90_allowed(const at::Tensor& q) {
  const char* env = std::getenv("PYSSM_FLASH_SM90");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(q.device().index());
  return prop->major == 9 && prop->minor == 0;
}

// The Hopper backward adds dQ by TMA reduce-adds (v2), or with PYSSM_FLASH_SM90_DQ=atomic by
// fp32 atomics (v1: the benchmark's comparison, and the fallback if v2 fails on a device)
bool dq_by_atomics() {
  const char* env = std::getenv("PYSSM_FLASH_SM90_DQ");
  return env != nullptr && std::strcmp(env, "atomic") == 0;
}

// The Hopper `dir` (fwd or bwd) launcher for q's dtype and head_dim d (64-128), or null
#define PYSSM_SM90_LAUNCHER_FOR(dir, q, d)                                                   \
  do {                                                                                       \
    if (!flash_sm90_head_dim(d) || !sm90_allowed(q)) return nullptr;                         \
    const bool half = (q).scalar_type() == at::kHalf;                                        \
    if (!half && (q).scalar_type() != at::kBFloat16) return nullptr;                         \
    switch (d) {                                                                             \
      case 64: return half ? flash_##dir##_sm90_fp16_hd64 : flash_##dir##_sm90_bf16_hd64;    \
      case 72: return half ? flash_##dir##_sm90_fp16_hd72 : flash_##dir##_sm90_bf16_hd72;    \
      case 80: return half ? flash_##dir##_sm90_fp16_hd80 : flash_##dir##_sm90_bf16_hd80;    \
      case 96: return half ? flash_##dir##_sm90_fp16_hd96 : flash_##dir##_sm90_bf16_hd96;    \
      case 128: return half ? flash_##dir##_sm90_fp16_hd128 : flash_##dir##_sm90_bf16_hd128; \
    }                                                                                        \
    return nullptr;                                                                          \
  } while (0)

BwdLaunch sm90_bwd_launcher(const at::Tensor& q, int64_t d) {
  PYSSM_SM90_LAUNCHER_FOR(bwd, q, d);
}

Launch sm90_launcher(const at::Tensor& q, int64_t d) {
  PYSSM_SM90_LAUNCHER_FOR(fwd, q, d);
}
#undef PYSSM_SM90_LAUNCHER_FOR

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// contiguous, and 16-byte aligned for the kernel's vector loads
at::Tensor for_kernel(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return aligned16(c) ? c : c.clone();
}

// A (batch, seqlen, heads, d) or packed (tokens, heads, d) tensor as the kernels read it, and
// where its elements lie (flash.cuh's TokenLayout)
struct KernelInput {
  at::Tensor t;
  TokenLayout layout;
};

// t's layout where the kernels can read it in place: head_dim contiguous, and the token, head
// and batch strides multiples of 8 elements (16 bytes: the kernels' vector loads and tensor
// maps), the data 16-byte aligned. A size-1 dimension's stride, which torch leaves free, is
// replaced by its contiguous value (it is never stepped over). q, k and v sliced out of a fused
// qkv projection ((B, N, 3, H, d) unbound) qualify, as do torch's SDPA layout (B, H, N, d)
// transposed and any other layout that keeps head_dim contiguous and 16-byte aligned.
std::optional<TokenLayout> in_place_layout(const at::Tensor& t) {
  const int64_t d = t.size(-1), heads = t.size(-2), tokens = t.size(-3);
  const bool dense = t.dim() == 4;
  TokenLayout l{heads * d, d, tokens * heads * d};  // contiguous
  if (tokens > 1) l.row = t.stride(-3);
  if (heads > 1) l.head = t.stride(-2);
  if (dense && t.size(0) > 1) l.batch = t.stride(0);
  const bool ok = t.stride(-1) == 1 && l.row % 8 == 0 && l.head % 8 == 0 &&
                  l.batch % 8 == 0 && l.row > 0 && l.head > 0 && l.batch > 0 && aligned16(t);
  if (!ok) return std::nullopt;
  return l;
}

// t in place where it can be (in_place_layout), else a contiguous copy
KernelInput kernel_input(const at::Tensor& t) {
  if (const auto l = in_place_layout(t)) return {t, *l};
  const at::Tensor c = for_kernel(t);
  const auto l = in_place_layout(c);
  TORCH_CHECK(l, "attention: a contiguous ", c.sizes(), " input the kernels cannot address");
  return {c, *l};
}

// q's, k's and v's, k and v at one layout (the kernels share it: both copied where theirs
// differ)
std::tuple<KernelInput, KernelInput, KernelInput> kernel_inputs(const at::Tensor& q,
                                                                const at::Tensor& k,
                                                                const at::Tensor& v) {
  KernelInput kin = kernel_input(k), vin = kernel_input(v);
  if (kin.layout != vin.layout) {  // (contiguous copies of one shape share a layout)
    kin = kernel_input(for_kernel(k));
    vin = kernel_input(for_kernel(v));
  }
  return {kernel_input(q), kin, vin};
}

// The token stride of a gradient buffer the backward writes (dq, dk, dv: heads and head_dim
// packed, the tokens of all sequences one stride apart, a dense batch's sequences seqlen
// strides apart), or -1 where it is not so
int64_t packed_token_stride(const at::Tensor& t) {
  const auto l = in_place_layout(t);
  if (!l) return -1;
  const int64_t d = t.size(-1), heads = t.size(-2), tokens = t.size(-3);
  const bool batches = t.dim() == 4 && t.size(0) > 1;
  const int64_t row = tokens == 1 && batches ? l->batch : l->row;
  if (l->head != d || row < heads * d || (batches && l->batch != tokens * row)) return -1;
  return row;
}

// Packed offsets on the device with max_seqlen (and max_seqlen_k for cu_seqlens_k) given: the
// kernels need neither to be read on the host (no device sync a call; see
// check_attention_args). The composed fallback reads them.
bool offsets_unread(const std::optional<at::Tensor>& cu_seqlens,
                    std::optional<int64_t> max_seqlen,
                    const std::optional<at::Tensor>& cu_seqlens_k,
                    std::optional<int64_t> max_seqlen_k) {
  return cu_seqlens && max_seqlen && cu_seqlens->is_cuda() &&
         (!cu_seqlens_k || (max_seqlen_k && cu_seqlens_k->is_cuda()));
}

// The fields FlashParams and FlashBwdParams share: q, k, v, the sizes, scale and masking.
// cu, cu_k: the packed offsets (contiguous), cu_k undefined where the keys share q's; used:
// seqused_k, lead: leftpad_k (contiguous) or undefined.
template <typename Params>
void set_common(Params& p, const KernelInput& q, const KernelInput& k, const KernelInput& v,
                const AttnSizes& s, const at::Tensor& cu, const at::Tensor& cu_k,
                const at::Tensor& used, const at::Tensor& lead, double scale, bool causal,
                int64_t window_left, int64_t window_right) {
  p.q = q.t.const_data_ptr();
  p.k = k.t.const_data_ptr();
  p.v = v.t.const_data_ptr();
  p.q_layout = q.layout;
  p.kv_layout = k.layout;
  p.cu_seqlens = s.varlen ? cu.const_data_ptr<int>() : nullptr;
  p.cu_seqlens_k = s.varlen_k ? cu_k.const_data_ptr<int>() : nullptr;
  p.seqused_k = s.used_k ? used.const_data_ptr<int>() : nullptr;
  p.leftpad_k = s.lead_k ? lead.const_data_ptr<int>() : nullptr;
  p.batch = s.batch;
  p.heads = s.heads;
  p.heads_k = s.heads_k;
  p.seqlen_q = s.seqlen_q;
  p.seqlen_k = s.seqlen_k;
  p.total_q = s.varlen ? q.t.size(0) : s.batch * s.seqlen_q;
  p.total_k = s.varlen ? k.t.size(0) : s.batch * s.seqlen_k;
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  set_window(p, causal, window_left, window_right);
  // the kernels' masks work a sequence's positions out in 32-bit ints (flash.cuh: kNoWindow)
  constexpr int64_t kMaxTokens = int64_t(1) << 30;
  TORCH_CHECK(p.total_q < kMaxTokens && p.total_k < kMaxTokens && p.seqlen_q < kMaxTokens &&
                  p.seqlen_k < kMaxTokens,
              "attention: the CUDA kernels take fewer than 2^30 tokens of q and of k, got ",
              p.total_q, " and ", p.total_k);
}

std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& q, const at::Tensor& k,
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
  const bool read_offsets = !offsets_unread(cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k);
  const AttnSizes s = check_attention_args(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k,
                                           max_seqlen_k, seqused_k, leftpad_k, read_offsets);
  const Launch launch = launcher<Launch>(q.scalar_type(), s.head_dim);
  if (launch == nullptr || s.batch > 65535 || s.heads > 65535) {
    return attention_composed(q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen,
                              cu_seqlens_k, max_seqlen_k, seqused_k, leftpad_k, window_left,
                              window_right, softcap);
  }
  const c10::cuda::CUDAGuard guard(q.device());
  const auto [qr, kr, vr] = kernel_inputs(q, k, v);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = s.varlen ? at::empty({s.heads, q.size(0)}, q.options().dtype(at::kFloat))
                            : at::empty({s.batch, s.heads, s.seqlen_q},
                                        q.options().dtype(at::kFloat));
  at::Tensor cu, cu_k, used, lead;
  if (s.varlen) cu = cu_seqlens->contiguous();
  if (s.varlen_k) cu_k = cu_seqlens_k->contiguous();
  if (s.used_k) used = seqused_k->contiguous();
  if (s.lead_k) lead = leftpad_k->contiguous();
  const double scale =
      softmax_scale ? *softmax_scale : 1.0 / std::sqrt(static_cast<double>(s.head_dim));
  FlashParams p{};
  set_common(p, qr, kr, vr, s, cu, cu_k, used, lead, scale, causal, window_left, window_right);
  set_scale(p, scale, softcap);
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cudaError_t err = run_decode(p, q, s, stream);
  if (err == cudaErrorNotSupported) {
    if (const Launch hopper = sm90_launcher(q, s.head_dim)) err = hopper(p, stream);
  }
  if (err == cudaErrorNotSupported) err = launch(p, stream);
  TORCH_CHECK(err == cudaSuccess, "attention CUDA launch failed: ", cudaGetErrorString(err));
  return {out, lse};
}

// The backward into dq, dk and dv (fresh contiguous tensors, or slices of one fused qkv
// gradient: packed_token_stride's layouts), by the flash kernels where they take the call, else
// composed from ATen ops
void attention_backward_cuda_into(const at::Tensor& dout, const std::optional<at::Tensor>& dlse,
                                  const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& out, const at::Tensor& lse, bool causal,
                                  std::optional<double> softmax_scale,
                                  const std::optional<at::Tensor>& cu_seqlens,
                                  std::optional<int64_t> max_seqlen,
                                  const std::optional<at::Tensor>& cu_seqlens_k,
                                  std::optional<int64_t> max_seqlen_k,
                                  const std::optional<at::Tensor>& seqused_k,
                                  const std::optional<at::Tensor>& leftpad_k,
                                  int64_t window_left, int64_t window_right, double softcap,
                                  const at::Tensor& dq, const at::Tensor& dk,
                                  const at::Tensor& dv) {
  check_window(causal, window_left, window_right);
  check_softcap(softcap);
  const AttnSizes s = check_attention_backward_args(
      dout, dlse, q, k, v, out, lse, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, seqused_k,
      leftpad_k,
      !offsets_unread(cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k));
  const BwdLaunch launch = launcher<BwdLaunch>(q.scalar_type(), s.head_dim);
  const at::ScalarType t = q.scalar_type();
  if (launch == nullptr || s.batch > 65535 || s.heads_k > 65535 || dout.scalar_type() != t ||
      out.scalar_type() != t || lse.scalar_type() != at::kFloat) {
    attention_backward_composed_into(dout, dlse, q, k, v, out, lse, causal, softmax_scale,
                                     cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, seqused_k,
                                     leftpad_k, window_left, window_right, softcap, dq, dk, dv);
    return;
  }
  // raises under torch.use_deterministic_algorithms(True) (warns with warn_only), as torch's
  // own ops that add floats by atomics do (the composed path above is deterministic)
  at::globalContext().alertNotDeterministic(
      "pyssm::attention_backward on CUDA (its flash kernels add dq by float atomics or TMA "
      "reduce-adds; backend='reference' is deterministic)");
  const int64_t dq_row = packed_token_stride(dq), dk_row = packed_token_stride(dk);
  TORCH_CHECK(dq_row > 0 && dk_row > 0 && packed_token_stride(dv) == dk_row,
              "attention backward: gradient buffers the kernels cannot address");
  const c10::cuda::CUDAGuard guard(q.device());
  const auto [qr, kr, vr] = kernel_inputs(q, k, v);
  const at::Tensor oc = for_kernel(out), doc = for_kernel(dout), lc = lse.contiguous();
  at::Tensor dlc;
  if (dlse) dlc = dlse->to(at::kFloat).contiguous();
  at::Tensor cu, cu_k, used, lead;
  if (s.varlen) cu = cu_seqlens->contiguous();
  if (s.varlen_k) cu_k = cu_seqlens_k->contiguous();
  if (s.used_k) used = seqused_k->contiguous();
  if (s.lead_k) lead = leftpad_k->contiguous();
  if (s.used_k || s.lead_k) {  // the kernels write the used keys' gradients only
    dk.zero_();
    dv.zero_();
  }
  at::Tensor delta = at::empty(lc.sizes(), lc.options());
  at::Tensor dq_accum = at::empty(q.sizes(), q.options().dtype(at::kFloat));  // zeroed there
  const double scale =
      softmax_scale ? *softmax_scale : 1.0 / std::sqrt(static_cast<double>(s.head_dim));
  FlashBwdParams p{};
  set_common(p, qr, kr, vr, s, cu, cu_k, used, lead, scale, causal, window_left, window_right);
  set_scale(p, scale, softcap);
  p.scale = static_cast<float>(scale);
  p.out = oc.const_data_ptr();
  p.dout = doc.const_data_ptr();
  p.dq = dq.mutable_data_ptr();
  p.dk = dk.mutable_data_ptr();
  p.dv = dv.mutable_data_ptr();
  p.dq_row = dq_row;
  p.dkv_row = dk_row;
  p.lse = lc.const_data_ptr<float>();
  p.dlse = dlse ? dlc.const_data_ptr<float>() : nullptr;
  p.delta = delta.mutable_data_ptr<float>();
  p.dq_accum = dq_accum.mutable_data_ptr<float>();
  p.dq_atomics = dq_by_atomics();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cudaError_t err = cudaErrorNotSupported;
  if (const BwdLaunch hopper = sm90_bwd_launcher(q, s.head_dim)) err = hopper(p, stream);
  if (err == cudaErrorNotSupported) err = launch(p, stream);
  TORCH_CHECK(err == cudaSuccess, "attention backward CUDA launch failed: ",
              cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    bool causal, std::optional<double> softmax_scale, const std::optional<at::Tensor>& cu_seqlens,
    std::optional<int64_t> max_seqlen, const std::optional<at::Tensor>& cu_seqlens_k,
    std::optional<int64_t> max_seqlen_k, const std::optional<at::Tensor>& seqused_k,
    const std::optional<at::Tensor>& leftpad_k, int64_t window_left, int64_t window_right,
    double softcap) {
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  attention_backward_cuda_into(dout, dlse, q, k, v, out, lse, causal, softmax_scale, cu_seqlens,
                               max_seqlen, cu_seqlens_k, max_seqlen_k, seqused_k, leftpad_k,
                               window_left, window_right, softcap, dq, dk, dv);
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> attention_qkvpacked_cuda(
    const at::Tensor& qkv, bool causal, std::optional<double> softmax_scale,
    const std::optional<at::Tensor>& cu_seqlens, std::optional<int64_t> max_seqlen) {
  const auto [q, k, v] = unbind_qkv(qkv, cu_seqlens);
  return attention_cuda(q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen, std::nullopt,
                        std::nullopt, std::nullopt, std::nullopt, -1, -1, 0.0);
}

// dqkv in qkv's shape: the kernels write dq, dk and dv into its slices
at::Tensor attention_qkvpacked_backward_cuda(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& qkv,
    const at::Tensor& out, const at::Tensor& lse, bool causal,
    std::optional<double> softmax_scale, const std::optional<at::Tensor>& cu_seqlens,
    std::optional<int64_t> max_seqlen) {
  return attention_qkvpacked_backward_by(&attention_backward_cuda_into, dout, dlse, qkv, out, lse,
                                         causal, softmax_scale, cu_seqlens, max_seqlen);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyssm, CUDA, m) {
  m.impl("attention", &attention_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
  m.impl("attention_qkvpacked", &attention_qkvpacked_cuda);
  m.impl("attention_qkvpacked_backward", &attention_qkvpacked_backward_cuda);
}

}  // namespace pyssm
