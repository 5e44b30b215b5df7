// Argument checks shared by pyssm's C++ entry points. Each names the argument and what was
// expected, and maps to the Python exception a caller would expect (ValueError for shapes,
// TypeError for dtypes, RuntimeError for devices).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

namespace pyssm {

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + ")";
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name,
                   " must be a floating-point tensor (float64, float32, float16 or bfloat16), got ",
                   t.scalar_type());
}

inline void check_rank(const at::Tensor& t, int64_t rank, const char* name, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == rank, name, " must have ", rank, " dimensions ", layout, ", got shape ",
                    shape_str(t));
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name,
                        const char* layout) {
  TORCH_CHECK_VALUE(t.sizes() == expected, name, " must have shape ", expected, " ", layout,
                    ", got ", shape_str(t));
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; all tensors must be on the same device");
}

// cross_scan's x (B, C, H, W) and cross_merge's ys (B, 4, C, H, W), for every device.
inline void check_cross_scan_input(const at::Tensor& x) {
  check_floating(x, "x");
  check_rank(x, 4, "x", "(B, C, H, W)");
}
inline void check_cross_merge_input(const at::Tensor& ys) {
  check_floating(ys, "ys");
  check_rank(ys, 5, "ys", "(B, 4, C, H, W)");
  TORCH_CHECK_VALUE(ys.size(1) == 4, "ys must have shape (B, 4, C, H, W) (4 directions), got ",
                    shape_str(ys));
}

// The dtype every pyssm kernel accumulates in: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace pyssm
