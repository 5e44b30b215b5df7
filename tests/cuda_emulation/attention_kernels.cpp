// The flash-attention CUDA kernels compiled for the CPU emulation (cuda_emulation.h: warps,
// shuffles and mma.sync emulated), behind a C interface that test_attention_kernels.py calls
// through ctypes: the real launchers and kernel code, nothing rewritten.
#include "attention/flash_bwd_kernel.cuh"
#include "attention/flash_decode_kernel.cuh"
#include "attention/flash_kernel.cuh"
#include "attention/flash_bwd_sm90_kernel.cuh"
#include "attention/flash_sm90_kernel.cuh"

namespace {

// sizes: batch, heads, heads_k, seqlen_q, seqlen_k, total_q, total_k; cu_k: the keys' own
// packed offsets, or null; used: seqused_k (dense), or null; lead: leftpad_k (dense), or null;
// mask: causal (0 / 1), window_left, window_right (-1: none), as the op takes them
template <typename P>
void set_sizes(P& p, const int64_t* sizes, const int* cu, const int* cu_k, const int* used,
               const int* lead, float scale, const int64_t* mask) {
  p.cu_seqlens = cu;
  p.cu_seqlens_k = cu_k;
  p.seqused_k = used;
  p.leftpad_k = lead;
  p.batch = sizes[0];
  p.heads = sizes[1];
  p.heads_k = sizes[2];
  p.seqlen_q = sizes[3];
  p.seqlen_k = sizes[4];
  p.total_q = sizes[5];
  p.total_k = sizes[6];
  p.scale_log2 = scale * 1.4426950408889634f;
  pyssm::set_window(p, mask[0] != 0, mask[1], mask[2]);
}

template <typename T>
cudaError_t fwd(int head_dim, const pyssm::FlashParams& p) {
  switch (head_dim) {
    case 32: return pyssm::flash::fwd<T, 32>(p, nullptr);
    case 64: return pyssm::flash::fwd<T, 64>(p, nullptr);
    case 72: return pyssm::flash::fwd<T, 72>(p, nullptr);
    case 80: return pyssm::flash::fwd<T, 80>(p, nullptr);
    case 96: return pyssm::flash::fwd<T, 96>(p, nullptr);
    case 128: return pyssm::flash::fwd<T, 128>(p, nullptr);
    case 256: return pyssm::flash::fwd<T, 256>(p, nullptr);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t decode(int head_dim, const pyssm::FlashParams& p, const pyssm::FlashSplit& split) {
  switch (head_dim) {
    case 32: return pyssm::flash_decode::fwd<T, 32>(p, split, nullptr);
    case 64: return pyssm::flash_decode::fwd<T, 64>(p, split, nullptr);
    case 72: return pyssm::flash_decode::fwd<T, 72>(p, split, nullptr);
    case 80: return pyssm::flash_decode::fwd<T, 80>(p, split, nullptr);
    case 96: return pyssm::flash_decode::fwd<T, 96>(p, split, nullptr);
    case 128: return pyssm::flash_decode::fwd<T, 128>(p, split, nullptr);
    case 256: return pyssm::flash_decode::fwd<T, 256>(p, split, nullptr);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t fwd_sm90(int head_dim, const pyssm::FlashParams& p) {
  switch (head_dim) {
    case 64: return pyssm::flash_sm90::fwd<T, 64>(p, nullptr);
    case 72: return pyssm::flash_sm90::fwd<T, 72>(p, nullptr);
    case 80: return pyssm::flash_sm90::fwd<T, 80>(p, nullptr);
    case 96: return pyssm::flash_sm90::fwd<T, 96>(p, nullptr);
    case 128: return pyssm::flash_sm90::fwd<T, 128>(p, nullptr);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t bwd(int head_dim, const pyssm::FlashBwdParams& p) {
  switch (head_dim) {
    case 32: return pyssm::flash_bwd::bwd<T, 32>(p, nullptr);
    case 64: return pyssm::flash_bwd::bwd<T, 64>(p, nullptr);
    case 72: return pyssm::flash_bwd::bwd<T, 72>(p, nullptr);
    case 80: return pyssm::flash_bwd::bwd<T, 80>(p, nullptr);
    case 96: return pyssm::flash_bwd::bwd<T, 96>(p, nullptr);
    case 128: return pyssm::flash_bwd::bwd<T, 128>(p, nullptr);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t bwd_sm90(int head_dim, const pyssm::FlashBwdParams& p) {
  switch (head_dim) {
    case 64: return pyssm::flash_bwd_sm90::bwd<T, 64>(p, nullptr);
    case 72: return pyssm::flash_bwd_sm90::bwd<T, 72>(p, nullptr);
    case 80: return pyssm::flash_bwd_sm90::bwd<T, 80>(p, nullptr);
    case 96: return pyssm::flash_bwd_sm90::bwd<T, 96>(p, nullptr);
    case 128: return pyssm::flash_bwd_sm90::bwd<T, 128>(p, nullptr);
  }
  return cudaErrorInvalidValue;
}

// q, k, v and their layouts (strides: q's token, head and batch strides, then k's and v's)
template <typename P>
void set_inputs(P& p, const void* q, const void* k, const void* v, const int64_t* strides) {
  p.q = q;
  p.k = k;
  p.v = v;
  p.q_layout = {strides[0], strides[1], strides[2]};
  p.kv_layout = {strides[3], strides[4], strides[5]};
}

// The forwards' FlashParams from emu_flash_fwd_any's / emu_flash_decode_any's arguments
pyssm::FlashParams fwd_params(const void* q, const void* k, const void* v,
                              const int64_t* strides, void* out, float* lse, const int* cu,
                              const int* cu_k, const int* used, const int* lead,
                              const int64_t* sizes, float scale, const int64_t* mask,
                              float softcap) {
  pyssm::FlashParams p{};
  set_inputs(p, q, k, v, strides);
  p.out = out;
  p.lse = lse;
  set_sizes(p, sizes, cu, cu_k, used, lead, scale, mask);
  pyssm::set_scale(p, scale, softcap);
  return p;
}

}  // namespace

extern "C" {

// dtype: 2 float16, 3 bfloat16; sm90: the Hopper forward (flash_sm90_kernel.cuh: TMA,
// mbarriers and wgmma emulated) instead of the portable one; strides: q's token, head and
// batch strides, then k's and v's (FlashParams' q_layout, kv_layout); sizes: set_sizes';
// softcap: 0, or the scores' cap (set_scale).
int emu_flash_fwd_any(int sm90, int dtype, int head_dim, const void* q, const void* k,
                      const void* v, const int64_t* strides, void* out, float* lse, const int* cu,
                      const int* cu_k, const int* used, const int* lead, const int64_t* sizes,
                      float scale, const int64_t* mask, float softcap) {
  const pyssm::FlashParams p =
      fwd_params(q, k, v, strides, out, lse, cu, cu_k, used, lead, sizes, scale, mask, softcap);
  if (dtype == 2) return int(sm90 ? fwd_sm90<__half>(head_dim, p) : fwd<__half>(head_dim, p));
  if (dtype == 3)
    return int(sm90 ? fwd_sm90<__nv_bfloat16>(head_dim, p) : fwd<__nv_bfloat16>(head_dim, p));
  return int(cudaErrorInvalidValue);
}

// The flash-decoding forward (flash_decode_kernel.cuh): arguments as emu_flash_fwd_any's, then
// the split over keys: splits chunks of `chunk` keys, their workspace (out_part, lse_part: may
// be null with one chunk); softcap last.
int emu_flash_decode_any(int dtype, int head_dim, const void* q, const void* k, const void* v,
                         const int64_t* strides, void* out, float* lse, const int* cu,
                         const int* cu_k, const int* used, const int* lead,
                         const int64_t* sizes, float scale, const int64_t* mask, int64_t splits,
                         int64_t chunk, float* out_part, float* lse_part, float softcap) {
  const pyssm::FlashParams p =
      fwd_params(q, k, v, strides, out, lse, cu, cu_k, used, lead, sizes, scale, mask, softcap);
  const pyssm::FlashSplit split{splits, chunk, out_part, lse_part};
  if (dtype == 2) return int(decode<__half>(head_dim, p, split));
  if (dtype == 3) return int(decode<__nv_bfloat16>(head_dim, p, split));
  return int(cudaErrorInvalidValue);
}

// The split flash_decode_plan chooses (flash.cuh), as attention_cuda.cpp calls it: into
// plan[0] (chunks) and plan[1] (keys a chunk)
void emu_flash_decode_plan(int64_t batch, int64_t heads_k, int64_t seqlen_k, int sms,
                           int64_t* plan) {
  const pyssm::FlashSplit s = pyssm::flash_decode_plan(batch, heads_k, seqlen_k, sms);
  plan[0] = s.splits;
  plan[1] = s.chunk;
}

// sm90: the Hopper backward instead of the portable one, adding dQ by TMA reduce-adds (1) or
// by atomics (2); strides: q's and k's and v's layouts as the forward's, then the token strides
// of dq and of dk and dv (FlashBwdParams' dq_row, dkv_row); softcap as emu_flash_fwd_any's
int emu_flash_bwd_any(int sm90, int dtype, int head_dim, const void* q, const void* k,
                      const void* v, const int64_t* strides, const void* out, const void* dout,
                      void* dq, void* dk, void* dv, const float* lse, const float* dlse,
                      float* delta, float* dq_accum, const int* cu, const int* cu_k,
                      const int* used, const int* lead, const int64_t* sizes, float scale,
                      const int64_t* mask, float softcap) {
  pyssm::FlashBwdParams p{};
  set_inputs(p, q, k, v, strides);
  p.out = out;
  p.dout = dout;
  p.dq = dq;
  p.dk = dk;
  p.dv = dv;
  p.dq_row = strides[6];
  p.dkv_row = strides[7];
  p.lse = lse;
  p.dlse = dlse;
  p.delta = delta;
  p.dq_accum = dq_accum;
  p.scale = scale;
  p.dq_atomics = sm90 == 2;
  set_sizes(p, sizes, cu, cu_k, used, lead, scale, mask);
  pyssm::set_scale(p, scale, softcap);
  if (sm90) {
    if (dtype == 2) return int(bwd_sm90<__half>(head_dim, p));
    if (dtype == 3) return int(bwd_sm90<__nv_bfloat16>(head_dim, p));
    return int(cudaErrorInvalidValue);
  }
  if (dtype == 2) return int(bwd<__half>(head_dim, p));
  if (dtype == 3) return int(bwd<__nv_bfloat16>(head_dim, p));
  return int(cudaErrorInvalidValue);
}

}  // extern "C"
