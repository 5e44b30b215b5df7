// The SS2D core composed from pyssm's cross_scan / selective_scan / cross_merge ops and ATen
// matrix products (ss2d_cpu.cpp): registered for CPU there and for CUDA in ss2d_cuda.cpp, until
// the fused CUDA kernel replaces it on the GPU.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace pyssm {

struct Ss2dSizes {
  int64_t batch, dim, height, width, rank, dstate;
};

// The layout of ss2d's output and of x's gradient: channels-last memory when x, given
// channels-first, is stored channels-last (torch.channels_last: the encoders' fast path, no
// copy on either side), contiguous otherwise. The fake kernels (pyssm/ops/ss2d.py) agree.
inline bool ss2d_channels_last_out(const at::Tensor& x, bool channels_first) {
  return channels_first && !x.is_contiguous() &&
         x.is_contiguous(at::MemoryFormat::ChannelsLast);
}
inline at::Tensor ss2d_out_layout(const at::Tensor& t, bool channels_last) {
  return t.contiguous(channels_last ? at::MemoryFormat::ChannelsLast
                                    : at::MemoryFormat::Contiguous);
}

// Every shape, dtype and device check of ss2d, naming the argument and the expected shape.
Ss2dSizes check_ss2d_args(const at::Tensor& x, const at::Tensor& x_proj_weight,
                          const at::Tensor& dt_projs_weight, const at::Tensor& dt_projs_bias,
                          const at::Tensor& A_logs, const at::Tensor& Ds, bool channels_first);

// check_ss2d_args, and dout: floating, x's shape and device.
Ss2dSizes check_ss2d_backward_args(const at::Tensor& dout, const at::Tensor& x,
                                   const at::Tensor& x_proj_weight,
                                   const at::Tensor& dt_projs_weight,
                                   const at::Tensor& dt_projs_bias, const at::Tensor& A_logs,
                                   const at::Tensor& Ds, bool channels_first);

// The forward's states for the backward (ss2d_with_states): (B, 4, ceil(L / kSs2dStateTile),
// D) in the accumulation type, or empty where the fused forward kept none. Given, non-empty,
// anything else is an error naming what was expected.
constexpr int64_t kSs2dStateTile = 64;  // the forward v3's tile (ss2d.cuh: kSs2dN1Tile)
void check_ss2d_states(const std::optional<at::Tensor>& states, const at::Tensor& x,
                       const Ss2dSizes& s);

at::Tensor ss2d_composed(const at::Tensor& x, const at::Tensor& x_proj_weight,
                         const at::Tensor& dt_projs_weight, const at::Tensor& dt_projs_bias,
                         const at::Tensor& A_logs, const at::Tensor& Ds, bool channels_first,
                         bool out_float32);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ss2d_backward_composed(const at::Tensor& dout, const at::Tensor& x,
                       const at::Tensor& x_proj_weight, const at::Tensor& dt_projs_weight,
                       const at::Tensor& dt_projs_bias, const at::Tensor& A_logs,
                       const at::Tensor& Ds, bool channels_first,
                       const std::optional<at::Tensor>& states);

}  // namespace pyssm
