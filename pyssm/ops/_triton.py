"""What pyssm's Triton kernels share: the optional import, the decorator, the device check,
float32 -> output-dtype rounding, the exact GELU, and the tiled product of linear_gelu and
linear_residual.

On CPU tensors the kernels run in Triton's interpreter, which Triton chooses when it is imported
with TRITON_INTERPRET=1 (tests/conftest.py sets it on machines without a GPU). The interpreter
is slow, and it checks the indexing and arithmetic, not the GPU's behaviour or speed.
"""

from __future__ import annotations

import functools
import os
import re

import torch

from pyssm import _extension

try:
    import triton
    import triton.language as tl
except ImportError:  # pyssm works without Triton; its Triton ops then run torch's own ops
    triton = tl = None


def available() -> bool:
    return triton is not None


def jit(fn):
    return triton.jit(fn) if triton is not None else fn


TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("triton", "reference")


def use_triton(op: str, device: torch.device, dtypes: list, backend: str | None) -> bool:
    """Whether a Triton op runs its kernels (True) or its reference (torch's own ops), for
    tensors on ``device`` with ``dtypes`` (the tensors' and the requested output's):
    backend "triton" must run them (an error when it cannot), "reference" never does, and
    None / "auto" runs them on CUDA tensors once verified on a GPU (``_extension.UNVERIFIED_CUDA``;
    ``PYSSM_UNVERIFIED_CUDA=1`` runs them before), unless ``PYSSM_BACKEND=reference`` or
    ``PYSSM_TRITON=0``; float64 always takes the reference."""
    if backend is not None and backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, 'auto' or None, got {backend!r}")
    fits = all(d in TRITON_DTYPES for d in dtypes)
    if backend == "triton":
        if not available():
            raise RuntimeError("backend='triton' needs the triton package, which is not installed")
        if not fits:
            raise TypeError(f"backend='triton' takes float32, float16 and bfloat16 tensors and "
                            f"out_dtype, got {dtypes}; float64 runs on backend='reference'")
        return True
    if (backend == "reference" or os.environ.get("PYSSM_BACKEND", "") == "reference"
            or os.environ.get("PYSSM_TRITON", "") == "0"):
        return False
    return (device.type == "cuda" and fits and available()
            and (op not in _extension.UNVERIFIED_CUDA
                 or os.environ.get("PYSSM_UNVERIFIED_CUDA", "") == "1"))


def rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """t (..., K) as the (M, K) matrix the kernels read through a row stride: a view with unit
    stride along K where t's layout allows one, else a contiguous copy (K of 1 and empty t need
    no unit stride); None stays None."""
    if t is None:
        return None
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 or t2.numel() == 0 else t2.contiguous()


def reduction_programs(device: torch.device, tiles: int, groups: int = 1) -> int:
    """Programs for a backward that reduces weight gradients per program (then torch sums the
    partials): about 4 per SM across ``groups`` program columns (4 on the CPU), at most one per
    tile of rows."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(tiles, 4 * sms // groups))
    return max(1, min(tiles, 4))


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _release(version: str) -> tuple[int, ...]:
    """'3.6.0+git1234' -> (3, 6, 0): the leading numbers of a version string."""
    return tuple(int(n) for n in re.findall(r"\d+", version.split("+")[0])[:3])


def interpreter_problem(triton_version: str | None = None,
                        numpy_version: str | None = None) -> str | None:
    """Why Triton's interpreter cannot run pyssm's kernels with these versions (by default the
    installed ones), or None. Triton before 3.7 turns a kernel's integer arguments into
    one-element arrays and loop bounds into ints with int(array), which NumPy 2.4 refuses
    ("only 0-dimensional arrays can be converted to Python scalars", deep inside the
    interpreter); Triton 3.7 fixed it. Triton 3.6 is the one torch 2.11 pins."""
    if triton_version is None:
        if triton is None:
            return None
        triton_version = triton.__version__
    if numpy_version is None:
        try:
            import numpy
        except ImportError:
            return None
        numpy_version = numpy.__version__
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter cannot run with NumPy {numpy_version} "
                f"(it converts arrays to ints in a way NumPy 2.4 refuses): install "
                f"numpy<2.4, or Triton 3.7 or newer")
    return None


@functools.cache
def _installed_interpreter_problem() -> str | None:
    return interpreter_problem()


def check_device(device: torch.device, op: str) -> None:
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(
            f"pyssm.ops.{op}: backend='triton' on CPU tensors runs Triton's interpreter, which "
            f"needs TRITON_INTERPRET=1 in the environment before triton is first imported "
            f"(tests/conftest.py sets it on machines without a GPU)")
    if device.type == "cpu" and (problem := _installed_interpreter_problem()) is not None:
        raise RuntimeError(f"pyssm.ops.{op}: backend='triton' on CPU tensors: {problem}")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"pyssm.ops.{op}: backend='triton' runs on CUDA tensors (or CPU ones "
                           f"in Triton's interpreter), got tensors on {device}")


@jit
def rounded(v, dtype: tl.constexpr, BY_BITS: tl.constexpr):
    """v (float32) in dtype, rounded to nearest even. Triton's interpreter truncates float32 to
    bfloat16 (its cast drops the low bits whatever the rounding asked for), so there
    (BY_BITS: the launchers pass True for CPU tensors) the rounding is done on the bits; on a
    GPU the conversion instruction rounds."""
    if dtype == tl.float32:
        return v
    elif BY_BITS and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


# float constants a kernel reads must be constexpr: a plain module-level float compiles in the
# interpreter but not for a GPU (bench/triton_compile.py caught one)
SQRT_HALF = tl.constexpr(0.7071067811865476) if tl is not None else 0.7071067811865476
INV_SQRT_2PI = tl.constexpr(0.3989422804014327) if tl is not None else 0.3989422804014327


@jit
def gelu(v):
    """The exact (erf) GELU of float32 v, as torch's ``F.gelu`` (approximate="none")."""
    return 0.5 * v * (1.0 + tl.math.erf(v * SQRT_HALF))


@jit
def gelu_grad(v):
    """d gelu / dv at float32 v: Phi(v) + v phi(v)."""
    return 0.5 * (1.0 + tl.math.erf(v * SQRT_HALF)) + v * INV_SQRT_2PI * tl.exp(-0.5 * v * v)


# the MLP ops' activations (pyssm.ops.linear_gelu.ACTIVATIONS), by index: the exact GELU, its
# tanh approximation (F.gelu(approximate="tanh"): SigLIP's) and x sigmoid(1.702 x) (OpenAI
# CLIP's quick GELU). A constexpr goes on the right of a product: on the left, its __mul__
# wraps the tensor in a constexpr, which tl.exp then refuses.
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654) if tl is not None else 0.7978845608028654
TANH_CUBIC = tl.constexpr(0.044715) if tl is not None else 0.044715
QUICK_SCALE = tl.constexpr(1.702) if tl is not None else 1.702


@jit
def _tanh(v):
    """tanh(v) = 2 sigmoid(2 v) - 1 (the interpreter and the GPU alike; float32's absolute
    error, which the GELU's 0.5 (1 + tanh) absorbs)."""
    return 2.0 * tl.sigmoid(2.0 * v) - 1.0


@jit
def activation(v, ACT: tl.constexpr):
    """The MLP activation ACT (0 gelu, 1 gelu_tanh, 2 quick_gelu) of float32 v."""
    if ACT == 0:
        return gelu(v)
    elif ACT == 1:
        return 0.5 * v * (1.0 + _tanh((v + v * v * v * TANH_CUBIC) * SQRT_2_OVER_PI))
    else:
        return v * tl.sigmoid(v * QUICK_SCALE)


@jit
def activation_grad(v, ACT: tl.constexpr):
    """d activation / dv at float32 v, for ACT as in ``activation``."""
    if ACT == 0:
        return gelu_grad(v)
    elif ACT == 1:
        t = _tanh((v + v * v * v * TANH_CUBIC) * SQRT_2_OVER_PI)
        return 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * SQRT_2_OVER_PI * (
            1.0 + v * v * TANH_CUBIC * 3.0)
    else:
        s = tl.sigmoid(v * QUICK_SCALE)
        return s + v * s * (1.0 - s) * QUICK_SCALE


# ---- the product of linear_gelu and linear_residual ---------------------------------------------

@jit
def program_tile(N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(rows, cols) of this program's BLOCK_M x BLOCK_N output tile, a row of tiles N wide
    taken by neighbours in launch order (so x's rows are read from DRAM once, then the L2)."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    rows = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, cols


@jit
def mma(a, b, acc, IEEE: tl.constexpr, CPU: tl.constexpr):
    """acc + a b: on tensor cores for 16-bit a and b (float32 accumulation), in IEEE float32
    (IEEE: float32 operands, on the CUDA cores), or, in Triton's interpreter (CPU), as float32
    products of the same values (its dot takes no bf16)."""
    if CPU:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@jit
def linear_tile(X, Wt, BIAS, rows, cols, M, N, K, stride_xm, HAS_BIAS: tl.constexpr,
                IEEE: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CPU: tl.constexpr,
                W_KN: tl.constexpr):
    """The float32 tile x[rows] Wt[cols]^T (+ bias[cols]) of x (M, K) with row stride
    stride_xm and Wt (N, K) contiguous (W_KN: Wt is the (K, N) contiguous matrix whose
    transpose is meant, as fc2's weight is for its input gradient): the K loop BLOCK_K at a
    time on tensor cores (16-bit operands), in IEEE float32 (IEEE: float32 x, on the CUDA
    cores), or, in Triton's interpreter (CPU), as float32 products of the same values (its dot
    takes no bf16). Rows and columns past the ends read row / column 0's values (in bounds;
    the callers mask their stores), so only a partial last K step needs a mask."""
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = X + (rows % M).to(tl.int64)[:, None] * stride_xm + ks[None, :]
    if W_KN:
        b_ptrs = Wt + ks.to(tl.int64)[:, None] * N + (cols % N)[None, :]
    else:
        b_ptrs = Wt + (cols % N).to(tl.int64)[None, :] * K + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=ks[None, :] < K - k0, other=0.0)
            b = tl.load(b_ptrs, mask=ks[:, None] < K - k0, other=0.0)
        acc = mma(a, b, acc, IEEE, CPU)
        a_ptrs += BLOCK_K
        if W_KN:
            b_ptrs += BLOCK_K * N
        else:
            b_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    return acc


def linear_tiles(N: int, K: int, fp32: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps). 16-bit x, K < 256 (VMamba's stage-1 and 2 fc1,
    bound by memory): 64 rows x up to 128 outputs, 4 warps (ptxas sm_90: 226 registers, two
    programs an SM, one's loads under the other's GELU and stores). K from 256 on (bound by
    FLOPs at ViT-B's width): 128 x 128 x 64, 8 warps (255 registers, one program an SM, the
    K loop's loads pipelined 3 deep in shared memory); outputs up to 64 wide there (no
    encoder's), 64 rows x 64 on 4 warps (255 registers: 128 rows on 4 warps spilled 64-608 B
    on sm_90 and up to 3 KB on sm_80, found by compiling the tests' launches). Float32 x (IEEE
    products on the CUDA cores, not the encoders' path): 64 x 64 x 16, 4 warps.
    bench/triton_compile.py reports each; the benchmark's linear_gelu and linear_residual
    tables say whether they are the right ones."""
    if fp32:
        return 64, min(64, max(16, triton.next_power_of_2(N))), 16, 4
    block_n = min(128, max(16, triton.next_power_of_2(N)))
    if K < 256:
        return 64, block_n, 32, 4
    return (128, block_n, 64, 8) if block_n == 128 else (64, block_n, 64, 4)


def training_tiles(N: int, K: int, fp32: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of mlp_gelu's two kernels, whose epilogues hold a
    second tile beside the product (the pre-activation stored too; a and GELU'(a)): at
    linear_tiles' 16-bit sizes they spilled 176-448 B a thread on sm_90 (Triton 3.8's ptxas).
    16-bit x, K < 256: 64 x 64 x 32, 8 warps (at 4 the backward, which also sums the bias
    gradient, spilled 8 B on sm_80); from 256 on: 64 x 128 x 32, 8 warps; float32 x as
    linear_tiles. None spills; the registers are bench/triton_compile.py's report."""
    if fp32:
        return linear_tiles(N, K, fp32)
    return 64, min(64 if K < 256 else 128, max(16, triton.next_power_of_2(N))), 32, 8
