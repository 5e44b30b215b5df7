// The one schema block of pyssm. Kernels register per device in csrc/<family>/*_cpu.cpp and
// csrc/<family>/*_cuda.cpp; Python wrappers, fake (meta) functions and autograd live in
// pyssm/ops/<op>.py.
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

extern "C" {
// `import pyssm._C` loads this library, which registers the ops below as a side effect. The
// module itself is empty: Python reaches the ops through torch.ops.pyssm.*.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(pyssm, m) {
  // (B, C, H, W) -> (B, 4, C, H*W), direction k in scan order (DESIGN.md table).
  m.def("cross_scan(Tensor x) -> Tensor");
  // (B, 4, C, H, W) in scan order -> (B, C, H*W), summed over directions in pixel order.
  m.def("cross_merge(Tensor ys) -> Tensor");

  // u, delta: (batch, K*D, L); A: (K*D, N); B, C: (batch, K, N, L); D, delta_bias: (K*D,).
  m.def(
      "selective_scan(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? delta_bias, bool delta_softplus, bool out_float32) -> Tensor");
  // selective_scan, and the state after the last position, (batch, K*D, N) in the accumulation
  // type (float32; float64 for float64 u): mamba's return_last_state.
  m.def(
      "selective_scan_with_state(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, "
      "Tensor? D, Tensor? delta_bias, bool delta_softplus, bool out_float32) "
      "-> (Tensor, Tensor)");
  // Gradients of u, delta, A, B, C, D, delta_bias (the last two empty when absent).
  // dlast_state: the gradient of selective_scan_with_state's last state, or None.
  m.def(
      "selective_scan_backward(Tensor dout, Tensor u, Tensor delta, Tensor A, Tensor B, "
      "Tensor C, Tensor? D, Tensor? delta_bias, bool delta_softplus, "
      "Tensor? dlast_state=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // x: (B, H, W, D) or, with channels_first, (B, D, H, W); output in the same layout.
  m.def(
      "ss2d(Tensor x, Tensor x_proj_weight, Tensor dt_projs_weight, Tensor dt_projs_bias, "
      "Tensor A_logs, Tensor Ds, bool channels_first, bool out_float32) -> Tensor");
  // ss2d, and the state entering every 64-position tile of each direction's scan, (B, 4,
  // ceil(H*W / 64), D) in the accumulation type, where the fused CUDA forward keeps them (an
  // empty tensor elsewhere): for ss2d_backward, which then skips its summary pass (training).
  m.def(
      "ss2d_with_states(Tensor x, Tensor x_proj_weight, Tensor dt_projs_weight, "
      "Tensor dt_projs_bias, Tensor A_logs, Tensor Ds, bool channels_first, bool out_float32) "
      "-> (Tensor, Tensor)");
  // Gradients of x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds. states:
  // ss2d_with_states' second output, or None / empty.
  m.def(
      "ss2d_backward(Tensor dout, Tensor x, Tensor x_proj_weight, Tensor dt_projs_weight, "
      "Tensor dt_projs_bias, Tensor A_logs, Tensor Ds, bool channels_first, "
      "Tensor? states=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // q: (B, Sq, H, d), k, v: (B, Sk, Hk, d) with H % Hk == 0, row b using its first
  // seqused_k[b] keys where seqused_k (int32, B) is given; packed (T, H, d) with cu_seqlens
  // (int32, nseq + 1), k and v (Tk, Hk, d) with their own offsets where cu_seqlens_k is given.
  // Query i sees key j when i + Sk - Sq - window_left <= j <= i + Sk - Sq + window_right (a
  // bound of -1 absent; causal: window_right 0). softcap > 0 caps the scores:
  // S = softcap tanh(scale q k^T / softcap) (Gemma 2's). Returns (out like q, lse (B, H, Sq) or
  // (H, T)).
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, bool causal, float? softmax_scale, "
      "Tensor? cu_seqlens, int? max_seqlen, Tensor? cu_seqlens_k=None, int? max_seqlen_k=None, "
      "Tensor? seqused_k=None, Tensor? leftpad_k=None, int window_left=-1, "
      "int window_right=-1, float softcap=0.0) -> (Tensor, Tensor)");
  // dlse (optional) is the gradient of the lse output.
  m.def(
      "attention_backward(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, bool causal, float? softmax_scale, Tensor? cu_seqlens, int? max_seqlen, "
      "Tensor? cu_seqlens_k=None, int? max_seqlen_k=None, Tensor? seqused_k=None, "
      "Tensor? leftpad_k=None, int window_left=-1, int window_right=-1, float softcap=0.0) "
      "-> (Tensor, Tensor, Tensor)");
  // The same with q, k, v packed in one qkv: (B, S, 3, H, d), or (T, 3, H, d) with cu_seqlens
  // (a fused qkv projection, unreshaped); the backward returns dqkv, qkv's shape.
  m.def(
      "attention_qkvpacked(Tensor qkv, bool causal, float? softmax_scale, Tensor? cu_seqlens, "
      "int? max_seqlen) -> (Tensor, Tensor)");
  m.def(
      "attention_qkvpacked_backward(Tensor dout, Tensor? dlse, Tensor qkv, Tensor out, "
      "Tensor lse, bool causal, float? softmax_scale, Tensor? cu_seqlens, int? max_seqlen) "
      "-> Tensor");
}

namespace {

// Under torch.autocast, pyssm's ops take their inputs as they are and run with autocast off:
// they choose their own precision (fp32 state and accumulation), and a matmul inside a kernel
// must not be recast. (Before this, the fused CUDA ss2d under bf16 autocast got its x_proj
// GEMM back in bf16 and read it as float32, past its end: found by compute-sanitizer on the
// H200, 2026-11-28.) Called again from the top with the autocast keys excluded, so autograd
// still records the op.
void without_autocast(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.callBoxed(stack);
}

}  // namespace

#define PYSSM_NO_AUTOCAST(key)                                                              \
  TORCH_LIBRARY_IMPL(pyssm, key, m) {                                                       \
    for (const char* op : {"cross_scan", "cross_merge", "selective_scan",                   \
                           "selective_scan_with_state", "selective_scan_backward", "ss2d",  \
                           "ss2d_with_states",                                              \
                           "ss2d_backward", "attention", "attention_backward",              \
                           "attention_qkvpacked", "attention_qkvpacked_backward"}) {        \
      m.impl(op, torch::CppFunction::makeFromBoxedFunction<&without_autocast>());           \
    }                                                                                       \
  }
PYSSM_NO_AUTOCAST(AutocastCPU)
PYSSM_NO_AUTOCAST(AutocastCUDA)
#undef PYSSM_NO_AUTOCAST
