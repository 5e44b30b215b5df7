// CPU kernels of cross_scan and cross_merge (DESIGN.md "Directions"). For an H x W grid,
// direction k visits pixel (h, w) at scan position
//   l0 = h*W + w,  l1 = w*H + h,  l2 = L-1-l0,  l3 = L-1-l1.
// The two ops are each other's adjoint, so each one's backward is the other.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "ss2d/ss2d_cpu.h"

namespace pyssm {
namespace {

template <typename scalar_t>
void cross_scan_kernel(const scalar_t* x, scalar_t* out, int64_t planes, int64_t C, int64_t H,
                       int64_t W) {
  const int64_t L = H * W;
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      const scalar_t* x_plane = x + bc * L;
      scalar_t* o0 = out + ((b * 4 + 0) * C + c) * L;
      scalar_t* o1 = out + ((b * 4 + 1) * C + c) * L;
      scalar_t* o2 = out + ((b * 4 + 2) * C + c) * L;
      scalar_t* o3 = out + ((b * 4 + 3) * C + c) * L;
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t w = 0; w < W; ++w) {
          const scalar_t v = x_plane[h * W + w];
          const int64_t l0 = h * W + w, l1 = w * H + h;
          o0[l0] = v;
          o1[l1] = v;
          o2[L - 1 - l0] = v;
          o3[L - 1 - l1] = v;
        }
      }
    }
  });
}

template <typename scalar_t>
void cross_merge_kernel(const scalar_t* ys, scalar_t* out, int64_t planes, int64_t C, int64_t H,
                        int64_t W) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t L = H * W;
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      const scalar_t* y0 = ys + ((b * 4 + 0) * C + c) * L;
      const scalar_t* y1 = ys + ((b * 4 + 1) * C + c) * L;
      const scalar_t* y2 = ys + ((b * 4 + 2) * C + c) * L;
      const scalar_t* y3 = ys + ((b * 4 + 3) * C + c) * L;
      scalar_t* o_plane = out + bc * L;
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t w = 0; w < W; ++w) {
          const int64_t l0 = h * W + w, l1 = w * H + h;
          const acc_t s = static_cast<acc_t>(y0[l0]) + static_cast<acc_t>(y1[l1]) +
                          static_cast<acc_t>(y2[L - 1 - l0]) + static_cast<acc_t>(y3[L - 1 - l1]);
          o_plane[l0] = static_cast<scalar_t>(s);
        }
      }
    }
  });
}

}  // namespace

at::Tensor cross_scan_cpu(const at::Tensor& x_in) {
  check_cross_scan_input(x_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor out = at::empty({B, 4, C, H * W}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_scan_cpu", [&] {
    cross_scan_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                B * C, C, H, W);
  });
  return out;
}

at::Tensor cross_merge_cpu(const at::Tensor& ys_in) {
  check_cross_merge_input(ys_in);
  const at::Tensor ys = ys_in.contiguous();
  const int64_t B = ys.size(0), C = ys.size(2), H = ys.size(3), W = ys.size(4);
  at::Tensor out = at::empty({B, C, H * W}, ys.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ys.scalar_type(), "cross_merge_cpu", [&] {
    cross_merge_kernel<scalar_t>(ys.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                 B * C, C, H, W);
  });
  return out;
}

TORCH_LIBRARY_IMPL(pyssm, CPU, m) {
  m.impl("cross_scan", &cross_scan_cpu);
  m.impl("cross_merge", &cross_merge_cpu);
}

}  // namespace pyssm
