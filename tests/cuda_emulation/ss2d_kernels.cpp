// The SS2D-family CUDA kernels compiled for the CPU emulation (cuda_emulation.h), behind a C
// interface that tests/cuda_emulation/test_ss2d_kernels.py calls through ctypes: the real
// launchers (template dispatch, argument checks) and the real kernel code, nothing rewritten.
#include "ss2d/cross_scan.cu"
#include "ss2d/selective_scan_kernel.cuh"
#include "ss2d/ss2d_bwd_n1_kernel.cuh"
#include "ss2d/ss2d_n1_kernel.cuh"
#include "ss2d/ss2d_xproj_kernel.cuh"

namespace {

// dtype codes: 0 float64, 1 float32, 2 float16, 3 bfloat16
template <template <typename> class Fn, typename P>
int by_dtype(int dtype, const P& p) {
  switch (dtype) {
    case 0: return int(Fn<double>::call(p));
    case 1: return int(Fn<float>::call(p));
    case 2: return int(Fn<__half>::call(p));
    case 3: return int(Fn<__nv_bfloat16>::call(p));
  }
  return int(cudaErrorInvalidValue);
}
template <typename T>
struct ScanFwd {
  static cudaError_t call(const pyssm::SelectiveScanParams& p) {
    return pyssm::scan::fwd<T>(p, nullptr);
  }
};
template <typename T>
struct ScanBwd {
  static cudaError_t call(const pyssm::SelectiveScanBwdParams& p) {
    return pyssm::scan::bwd<T>(p, nullptr);
  }
};
// sizes: batch, height, width, dim, rank, dstate, chunk_len, chunks (Ss2dParams and
// Ss2dBwdParams name them alike)
template <typename P>
P ss2d_params(const int64_t* sizes) {
  P p{};
  p.batch = sizes[0];
  p.height = sizes[1];
  p.width = sizes[2];
  p.dim = sizes[3];
  p.rank = sizes[4];
  p.dstate = sizes[5];
  p.chunk_len = sizes[6];
  p.chunks = sizes[7];
  return p;
}

template <typename T>
struct Fwd {
  static cudaError_t call(const pyssm::Ss2dParams& p) { return pyssm::ss2d::fwd<T>(p, nullptr); }
};
template <typename T>
struct Bwd {
  static cudaError_t call(const pyssm::Ss2dBwdParams& p) {
    return pyssm::ss2d_bwd::bwd<T>(p, nullptr);
  }
};
}  // namespace

extern "C" {

int emu_cross_scan(int dtype, const void* in, void* out, int64_t B, int64_t C, int64_t H,
                   int64_t W, int merge) {
  const pyssm::CrossScanParams p{in, out, B, C, H, W, pyssm::DType(dtype)};
  return int(merge ? pyssm::cross_merge_cuda_launch(p, nullptr)
                   : pyssm::cross_scan_cuda_launch(p, nullptr));
}

// selective_scan: u, delta, B, C in the input dtype; A, D, bias (D, bias may be null), out and
// every gradient in the accumulation type. sizes: batch, channels, length, groups, dstate.
// With dout null only the forward runs. channels_per_block: the backward's (0: its own choice).
// last_state: where the forward writes the state after the last position, or null; dlast: the
// backward's gradient of it, or null.
int emu_selective_scan(int dtype, const void* u, const void* delta, const void* A, const void* B,
                       const void* C, const void* D, const void* bias, void* out,
                       void* last_state, const int64_t* sizes, int softplus, const void* dout,
                       const void* dlast, void* du, void* ddelta, void* dA_part, void* dB,
                       void* dC, void* dD_part, void* dbias_part, void* carries,
                       int64_t channels_per_block) {
  pyssm::SelectiveScanParams p{};
  p.u = u;
  p.delta = delta;
  p.A = A;
  p.B = B;
  p.C = C;
  p.D = D;
  p.delta_bias = bias;
  p.out = out;
  p.last_state = last_state;
  p.batch = sizes[0];
  p.channels = sizes[1];
  p.length = sizes[2];
  p.groups = sizes[3];
  p.dstate = sizes[4];
  p.delta_softplus = softplus != 0;
  if (dout == nullptr) return by_dtype<ScanFwd>(dtype, p);
  pyssm::SelectiveScanBwdParams b{};
  b.fwd = p;
  b.dout = dout;
  b.dlast_state = dlast;
  b.du = du;
  b.ddelta = ddelta;
  b.dA_part = dA_part;
  b.dB = dB;
  b.dC = dC;
  b.dD_part = dD_part;
  b.dbias_part = dbias_part;
  b.carries = carries;
  b.channels_per_block = channels_per_block;
  return by_dtype<ScanBwd>(dtype, b);
}

int64_t emu_selective_scan_carries(const int64_t* sizes) {
  pyssm::SelectiveScanParams p{};
  p.batch = sizes[0];
  p.channels = sizes[1];
  p.length = sizes[2];
  p.dstate = sizes[4];
  return pyssm::selective_scan_carry_elems(p);
}

// n1: the d_state-1 kernel (v3) instead of the general one (v2); states (B, 4,
// ss2d_state_tiles(L), D) or null: where v3 writes the state entering each tile
int emu_ss2d_fwd(int dtype, const void* x, const void* z, const void* dt_w, const void* dt_b,
                 const void* A, const void* Ds, void* y, void* scratch, const int64_t* sizes,
                 int n1, void* states) {
  auto p = ss2d_params<pyssm::Ss2dParams>(sizes);
  p.n1 = n1 != 0;
  p.states = states;
  p.x = x;
  p.z = z;
  p.dt_w = dt_w;
  p.dt_b = dt_b;
  p.A = A;
  p.Ds = Ds;
  p.y = y;
  p.scratch = scratch;
  return by_dtype<Fwd>(dtype, p);
}

int64_t emu_ss2d_fwd_scratch(const int64_t* sizes) {
  return pyssm::ss2d_scratch_elems(ss2d_params<pyssm::Ss2dParams>(sizes));
}

int emu_ss2d_bwd(int dtype, const void* x, const void* dy, int dy_acc, const void* z,
                 const void* dt_w, const void* dt_b, const void* A, const void* Ds, void* dx,
                 void* dz, void* partial, void* dpre, void* scratch, const int64_t* sizes,
                 int n1, const void* states) {
  auto p = ss2d_params<pyssm::Ss2dBwdParams>(sizes);
  p.n1 = n1 != 0;  // 1: v3's main kernel after v1's summary; 2: v3's summary too
  p.n1_summary = n1 == 2;
  p.states = states;  // the forward's (one chunk), or null
  p.x = x;
  p.dy = dy;
  p.dy_acc = dy_acc != 0;
  p.z = z;
  p.dt_w = dt_w;
  p.dt_b = dt_b;
  p.A = A;
  p.Ds = Ds;
  p.dx = dx;
  p.dz = dz;
  p.partial = partial;
  p.dpre = dpre;  // v3 over dt_rank 16 only
  p.scratch = scratch;
  return by_dtype<Bwd>(dtype, p);
}

int64_t emu_ss2d_bwd_scratch(const int64_t* sizes) {
  return pyssm::ss2d_bwd_scratch_elems(ss2d_params<pyssm::Ss2dBwdParams>(sizes));
}

// x_proj on tensor cores (Ss2dXprojParams): dtype 2 (float16) or 3 (bfloat16) is x's. add null:
// the forward (a = x in dtype, out fp32); otherwise the backward (a fp32, out in dtype). With
// out_fp32 the backward's kernel writes fp32 instead (its products unrounded, for the test).
// a_split: the backward's bf16 hi / lo copy of a, or null.
int emu_ss2d_xproj(int dtype, const void* a, const float* w, const float* add, void* out,
                   void* a_split, int64_t rows, int64_t dim, int64_t cols, int out_fp32) {
  const pyssm::Ss2dXprojParams p{a, w, add, out, a_split, rows, dim, cols};
  if (out_fp32) {
    const int64_t blocks = (rows + pyssm::ss2d_xproj::kRows - 1) / pyssm::ss2d_xproj::kRows *
                           ((cols + pyssm::ss2d_xproj::kCols - 1) / pyssm::ss2d_xproj::kCols);
    return int(pyssm::launch_kernel(pyssm::ss2d_xproj::xproj_kernel<float, float>,
                                    dim3(unsigned(blocks)), dim3(pyssm::ss2d_xproj::kWarps * 32),
                                    0, nullptr, p));
  }
  if (dtype == 2) return int(pyssm::ss2d_xproj::launch<__half>(p, nullptr));
  if (dtype == 3) return int(pyssm::ss2d_xproj::launch<__nv_bfloat16>(p, nullptr));
  return int(cudaErrorInvalidValue);
}

int64_t emu_ss2d_bwd_tile(int64_t dstate) { return pyssm::ss2d_bwd_tile(dstate); }
int64_t emu_ss2d_state_tiles(int64_t length) { return pyssm::ss2d_state_tiles(length); }
int64_t emu_ss2d_threads(int64_t dim) { return pyssm::ss2d_threads(dim); }

}  // extern "C"
