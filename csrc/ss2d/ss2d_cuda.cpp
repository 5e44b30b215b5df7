// ss2d on CUDA tensors: for now the composed SS2D core of ss2d_cpu.cpp, whose inner ops
// dispatch to the CUDA cross_scan / selective_scan / cross_merge kernels and cuBLAS. The fused
// single-pass kernel of DESIGN.md ("why it can be fast") is the next step.
#include <torch/library.h>

#include "ss2d/ss2d_composed.h"

namespace pyssm {

TORCH_LIBRARY_IMPL(pyssm, CUDA, m) {
  m.impl("ss2d", &ss2d_composed);
  m.impl("ss2d_backward", &ss2d_backward_composed);
}

}  // namespace pyssm
