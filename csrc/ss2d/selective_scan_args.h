// The argument checks of selective_scan, shared by its CPU and CUDA entry points: every
// shape, dtype and device problem raises with the argument's name and the expected shape.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace pyssm {

struct ScanSizes {
  int64_t batch, channels, length, groups, dstate, per_group;
};

ScanSizes check_scan_args(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                          const at::Tensor& B, const at::Tensor& C,
                          const std::optional<at::Tensor>& D,
                          const std::optional<at::Tensor>& delta_bias);

// The backward's own arguments: dout (the shape of u) and the last state's gradient
// dlast_state (batch, K*D, N) or none.
void check_scan_grad_args(const ScanSizes& s, const at::Tensor& u, const at::Tensor& dout,
                          const std::optional<at::Tensor>& dlast_state);

// The last state's output, (batch, K*D, N) with `opts` (the accumulation type): uninitialised
// for the kernels to write, or zeros where there are no positions (nothing writes it).
at::Tensor new_last_state(const ScanSizes& s, const at::TensorOptions& opts);

}  // namespace pyssm
