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

}  // namespace pyssm
