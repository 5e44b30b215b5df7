// CPU entry points of the SS2D family, shared by its translation units (ss2d composes the
// cross-scan and selective-scan kernels). Argument checks happen inside each.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace pyssm {

at::Tensor cross_scan_cpu(const at::Tensor& x);
at::Tensor cross_merge_cpu(const at::Tensor& ys);

at::Tensor selective_scan_cpu(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                              const at::Tensor& B, const at::Tensor& C,
                              const std::optional<at::Tensor>& D,
                              const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                              bool out_float32);

std::tuple<at::Tensor, at::Tensor> selective_scan_with_state_cpu(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const std::optional<at::Tensor>& D,
    const std::optional<at::Tensor>& delta_bias, bool delta_softplus, bool out_float32);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
selective_scan_backward_cpu(const at::Tensor& dout, const at::Tensor& u, const at::Tensor& delta,
                            const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                            const std::optional<at::Tensor>& D,
                            const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                            const std::optional<at::Tensor>& dlast_state);

}  // namespace pyssm
