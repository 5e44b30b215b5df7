"""What pyssm's Triton kernels share: the optional import, the decorator, the device check and
float32 -> output-dtype rounding.

On CPU tensors the kernels run in Triton's interpreter, which Triton chooses when it is imported
with TRITON_INTERPRET=1 (tests/conftest.py sets it on machines without a GPU). The interpreter
is slow, and it checks the indexing and arithmetic, not the GPU's behaviour or speed.
"""

from __future__ import annotations

import os

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


def check_device(device: torch.device, op: str) -> None:
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(
            f"pyssm.ops.{op}: backend='triton' on CPU tensors runs Triton's interpreter, which "
            f"needs TRITON_INTERPRET=1 in the environment before triton is first imported "
            f"(tests/conftest.py sets it on machines without a GPU)")
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
