"""pyssm's Triton kernels compiled ahead of time for GPUs this machine need not have (Triton's
own ptxas), with registers and spills per kernel: what ``-Xptxas -v`` is to the CUDA kernels.

    python bench/triton_compile.py [--arch 80,90]     # exit 1 on a compile error or a spill
    python bench/triton_compile.py --launches PATH [--arch 90]   # exit 1 on a compile error

Each variant is one that ``pyssm.ops.layer_norm`` (with and without its GELU),
``depthwise_conv2d``, ``linear_gelu``, ``linear_residual_``, ``mlp_gelu``, ``mlp_residual_``,
``norm_mlp_residual`` or ``layer_norm_linear`` launches for that row width, channel count or
(K, N) (their tiles) and dtypes. Run without TRITON_INTERPRET (the interpreter's kernels cannot
be compiled); the register counts come from the cubin through Triton's bundled cuobjdump when
it is there.

With ``--launches PATH`` it compiles instead every distinct launch that the CPU tests made in
Triton's interpreter (``pytest --triton-launches=PATH``, tests/triton_launches.py), as a GPU
would be asked for it: the interpreter-only flags (CPU, BY_BITS) off, the same tiles, flags and
argument types. The odd sizes those tests run are the device check's ``-m cuda`` tests' sizes,
so a launch the GPU compiler rejects fails here first. Only compile errors fail that run: a
spill at a test's size is listed, not an error (the model shapes above are where spills count).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET: interpreted kernels cannot be compiled")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pyssm.ops import depthwise_conv2d_triton as DW  # noqa: E402
from pyssm.ops import layer_norm_linear_triton as LNL  # noqa: E402
from pyssm.ops import layer_norm_triton as K  # noqa: E402
from pyssm.ops import linear_gelu_triton as LG  # noqa: E402
from pyssm.ops import linear_residual_triton as LR  # noqa: E402
from pyssm.ops import mlp_gelu_triton as MG  # noqa: E402
from pyssm.ops import mlp_residual_triton as MR  # noqa: E402
from pyssm.ops import norm_mlp_residual_triton as NMR  # noqa: E402
from pyssm.ops.linear_gelu import ACTIVATIONS  # noqa: E402

WIDTHS = (96, 384, 768, 1000, 4096)
STEM_WIDTHS = (48, 64)  # layer_norm + GELU: VMamba-T/S's and VMamba-B's half-width stem
CHANNELS = (96, 192, 384, 768)  # depthwise_conv2d: VMamba's d_inner across stages and sizes
# linear_gelu: the encoders' fc1 (K, N): VMamba-T's stages 1 and 3, ViT-S's, ViT-B's, ViT-L's
FC1 = ((96, 384), (384, 1536), (768, 3072), (1024, 4096))
FC2 = tuple((n, k) for k, n in FC1)  # linear_residual: the same MLPs' fc2
# mlp_residual: (C, H) of the MLPs the encoders fuse whole (up to 256 wide: VMamba-T/S's stages
# 1 and 2, VMamba-B's, ViT-Ti's 192), and 384 (two column tiles, not the encoders' path)
MLPS = ((96, 384), (128, 512), (192, 768), (256, 1024), (384, 1536))
# layer_norm_linear: (K, N) of VMamba's norm -> in_proj and out_norm -> out_proj: VMamba-T
# s1l8's four stages (d_inner = width), and ssm_ratio 2's stage 1 (96 -> 192 -> 96)
NORM_LINEAR = ((96, 96), (192, 192), (384, 384), (768, 768), (96, 192), (192, 96))
# (x, residual / s, y) element types: the encoders' bf16 branch into a float32 stream, and
# float32 throughout
DTYPES = (("bf16", "fp32", "bf16"), ("fp32", "fp32", "fp32"))


def _cuobjdump() -> str | None:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


def _usage(cubin: bytes) -> tuple[int, int] | None:
    """(registers, stack bytes) of the one kernel in ``cubin``, or None without cuobjdump."""
    tool = _cuobjdump()
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _layer_norm(n: int, x: str, s: str, y: str, gelu: bool):
    """layer_norm's forward and backward variants at width n: x, the residual and sum s, y;
    with a residual (summed and stored) or, with ``gelu``, without one and with the GELU."""
    label = f"{x}->{y}" if gelu else f"{x}+{s}->{y}"
    name = "layer_norm+gelu" if gelu else "layer_norm"
    block_m, block_n, warps = K._tiles(n)
    fwd = {"X": f"*{x}", "R": f"*{s}", "W": "*fp32", "B": "*fp32", "Y": f"*{y}", "S": f"*{s}",
           "MEAN": "*fp32", "RSTD": "*fp32", "M": "i32", "N": "i32", "sx": "i32", "sr": "i32",
           "sy": "i32", "ss": "i32", "eps": "fp32"}
    flags = {"HAS_R": not gelu, "HAS_W": True, "HAS_B": True, "STORE_S": not gelu, "GELU": gelu,
             "BLOCK_M": block_m, "BLOCK_N": block_n, "BY_BITS": False}
    yield f"{name} forward", n, label, K._fwd, fwd, flags, warps
    block_m, block_n, warps = K._tiles(n, gelu_backward=gelu)
    bwd = {"X": f"*{x}", "R": f"*{s}", "W": "*fp32", "B": "*fp32", "DY": f"*{y}", "DS": f"*{s}",
           "MEAN": "*fp32", "RSTD": "*fp32", "DX": f"*{x}", "DR": f"*{s}", "DW": "*fp32",
           "DB": "*fp32", "M": "i32", "N": "i32", "rows_per_program": "i32",
           **{k: "i32" for k in ("sx", "sr", "sdy", "sds", "sdx", "sdr")}}
    flags = {"HAS_R": not gelu, "HAS_W": True, "HAS_B": gelu, "HAS_DS": not gelu,
             "STORE_DR": not gelu and x != s, "GELU": gelu, "BLOCK_M": block_m,
             "BLOCK_N": block_n, "BY_BITS": False}
    yield f"{name} backward", n, label, K._bwd, bwd, flags, warps


def variants():
    for n in WIDTHS:
        for x, s, y in DTYPES:
            yield from _layer_norm(n, x, s, y, gelu=False)
    for n in STEM_WIDTHS:  # no residual, the GELU on the affine output
        for x in ("bf16", "fp32"):
            yield from _layer_norm(n, x, x, x, gelu=True)
    for c in CHANNELS:
        for x in ("bf16", "fp32"):
            block_p, block_c, warps = DW._tiles(c, 4)
            tiles = {"K": 3, "BLOCK_P": block_p, "BLOCK_C": block_c}
            dims = {"P": "i32", "H": "i32", "W": "i32", "C": "i32"}
            fwd = {"X": f"*{x}", "Wt": "*fp32", "BIAS": "*fp32", "Y": f"*{x}", **dims}
            flags = {"HAS_BIAS": True, "SILU": True, **tiles, "BY_BITS": False}
            yield "dwconv forward", c, x, DW._fwd, fwd, flags, warps
            g = {"X": f"*{x}", "Wt": "*fp32", "BIAS": "*fp32", "DY": f"*{x}", "G": "*fp32",
                 "DW": "*fp32", "DB": "*fp32", **dims, "pixels_per_program": "i32"}
            block_p, block_c, warps = DW._tiles(c, 2)
            flags = {"HAS_BIAS": True, "SILU": True, "TAPS": 16, "K": 3, "BLOCK_P": block_p,
                     "BLOCK_C": block_c}
            yield "dwconv backward (g, dw)", c, x, DW._bwd_g, g, flags, warps
            dx = {"G": "*fp32", "Wt": "*fp32", "DX": f"*{x}", **dims}
            yield "dwconv backward (dx)", c, x, DW._bwd_dx, dx, {**tiles, "BY_BITS": False}, warps
    for k, n in FC1:
        for x in ("bf16", "fp32"):  # the encoders' bf16; fp32 (IEEE, on the CUDA cores)
            # the exact GELU; in bf16 from width 768 on the tanh and quick GELUs too (SigLIP's,
            # OpenAI CLIP's: the towers the integrations reach)
            for act in (0, 1, 2) if x == "bf16" and k >= 768 else (0,):
                yield from _mlp_variants(k, n, x, act)
    for k, n in FC2:
        for x in ("bf16", "fp32"):  # into a float32 sum
            block_m, block_n, block_k, warps = LG.linear_tiles(n, k, x == "fp32")
            sig = {"X": f"*{x}", "Wt": f"*{x}", "BIAS": f"*{x}", "S": "*fp32", "M": "i32",
                   "N": "i32", "K": "i32", "stride_xm": "i32", "stride_sm": "i32"}
            flags = {"HAS_BIAS": True, "IEEE": x == "fp32", "EVEN_K": k % block_k == 0,
                     "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "CPU": False}
            yield "linear_residual forward", f"{k}->{n}", f"{x}+fp32", LR._fwd, sig, flags, warps
    for k, n in NORM_LINEAR:
        # float32 x (the stream, the ss2d core's output) into a bf16 product; fp32 at 96
        for w in ("bf16", "fp32") if (k, n) == (96, 96) else ("bf16",):
            block_m, block_n, block_k, warps = LNL.tiles(n, w == "fp32")
            sig = {"X": "*fp32", "NW": "*fp32", "NB": "*fp32", "W": f"*{w}", "B": f"*{w}",
                   "Y": f"*{w}", "M": "i32", "K": "i32", "N": "i32", "stride_xm": "i32",
                   "eps": "fp32"}
            flags = {"HAS_NW": True, "HAS_NB": True, "HAS_B": False, "IEEE": w == "fp32",
                     "EVEN_K": k % block_k == 0, "BLOCK_M": block_m, "BLOCK_N": block_n,
                     "BLOCK_K": block_k, "CPU": False}
            yield ("layer_norm_linear forward", f"{k}->{n}", f"fp32->{w}", LNL._fwd, sig, flags,
                   warps)
    for c, h in MLPS:
        # bf16 into a float32 sum (the encoders'), every activation at 96 wide; fp32 at 96
        for x, act in [("bf16", 0)] + ([("bf16", 1), ("bf16", 2), ("fp32", 0)] if c == 96 else []):
            block_m, block_n, block_h, block_c, warps = MR.tiles(c, x == "fp32")
            sig = {"X": f"*{x}", "W1": f"*{x}", "B1": f"*{x}", "W2": f"*{x}", "B2": f"*{x}",
                   "S": "*fp32", "M": "i32", "C": "i32", "H": "i32", "N": "i32",
                   "stride_xm": "i32", "stride_sm": "i32"}
            flags = {"HAS_B1": True, "HAS_B2": True, "IEEE": x == "fp32",
                     "EVEN_C": c % block_c == 0, "EVEN_H": h % block_h == 0, "ACT": act,
                     "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_H": block_h,
                     "BLOCK_C": block_c, "CPU": False}
            name = "" if act == 0 else f" ({ACTIVATIONS[act]})"
            yield (f"mlp_residual forward{name}", f"{c}->{h}->{c}", f"{x}+fp32", MR._fwd, sig,
                   flags, warps)
    for c, h in MLPS[:-1]:  # (norm_mlp_residual's kernel takes rows up to 256 wide)
        # a bf16 branch into the float32 stream, bf16 products (the encoders'), every
        # activation at 96 wide; float32 throughout at 96 and 256 (its two warp counts); the
        # output in bf16 (a VMamba stage's end, for the downsampling) at 96 and 192
        variants = [("bf16", 0, "fp32")] + ([("bf16", 1, "fp32"), ("bf16", 2, "fp32"),
                                             ("fp32", 0, "fp32")] if c == 96 else [])
        variants += [("fp32", 0, "fp32")] if c == 256 else []
        variants += [("bf16", 0, "bf16")] if c in (96, 192) else []
        for w, act, out in variants:
            block_m, block_c, block_h, warps = NMR.tiles(c, w == "fp32")
            sig = {"X": "*fp32", "R": f"*{w}", "NW": "*fp32", "NB": "*fp32", "W1": f"*{w}",
                   "B1": f"*{w}", "W2": f"*{w}", "B2": f"*{w}", "OUT": f"*{out}", "M": "i32",
                   "C": "i32", "H": "i32", "stride_xm": "i32", "stride_rm": "i32",
                   "stride_om": "i32", "eps": "fp32"}
            flags = {"HAS_NW": True, "HAS_NB": True, "HAS_B1": True, "HAS_B2": True,
                     "S_OF_R": False, "IEEE": w == "fp32", "EVEN_C": c == block_c,
                     "EVEN_H": h % block_h == 0, "ACT": act, "BLOCK_M": block_m,
                     "BLOCK_C": block_c, "BLOCK_H": block_h, "CPU": False}
            name = "" if act == 0 else f" ({ACTIVATIONS[act]})"
            yield (f"norm_mlp_residual forward{name}", f"{c}->{h}->{c}", f"fp32+{w}->{out}",
                   NMR._fwd, sig, flags, warps)


def _mlp_variants(k: int, n: int, x: str, act: int):
    """linear_gelu's forward, and mlp_gelu's forward (a written too) and backward (dy, width k,
    times fc2's weight back to the hidden n) in their own tiles, for activation ``act``."""
    name = "" if act == 0 else f" ({ACTIVATIONS[act]})"
    block_m, block_n, block_k, warps = LG.linear_tiles(n, k, x == "fp32")
    tiles = {"IEEE": x == "fp32", "EVEN_K": k % block_k == 0, "ACT": act, "BLOCK_M": block_m,
             "BLOCK_N": block_n, "BLOCK_K": block_k, "CPU": False}
    sig = {"X": f"*{x}", "Wt": f"*{x}", "BIAS": f"*{x}", "Y": f"*{x}", "PRE": f"*{x}",
           "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32"}
    flags = {"HAS_BIAS": True, "STORE_PRE": False, **tiles}
    yield f"linear_gelu forward{name}", f"{k}->{n}", x, LG._fwd, sig, flags, warps
    block_m, block_n, block_k, warps = LG.training_tiles(n, k, x == "fp32")
    tiles = {**tiles, "EVEN_K": k % block_k == 0, "BLOCK_M": block_m, "BLOCK_N": block_n,
             "BLOCK_K": block_k}
    flags = {"HAS_BIAS": True, "STORE_PRE": True, **tiles}
    yield f"mlp_gelu forward (a, h){name}", f"{k}->{n}", x, LG._fwd, sig, flags, warps
    sig = {"DY": f"*{x}", "W2": f"*{x}", "PRE": f"*{x}", "DA": f"*{x}", "DB": "*fp32",
           "M": "i32", "N": "i32", "K": "i32", "stride_dym": "i32"}
    yield f"mlp_gelu backward (da){name}", f"{k}->{n}", x, MG._dgrad, sig, tiles, warps


def _compile(fn, signature: dict, constants: dict, arch: int, options: dict):
    """(registers, stack bytes) of ``fn`` compiled for sm_<arch> (None without cuobjdump), and
    None; or None and the compile error's first line."""
    try:
        compiled = triton.compile(ASTSource(fn, signature, constants),
                                  target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as exc:  # noqa: BLE001 (any compile error is the report)
        return None, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    return _usage(compiled.asm["cubin"]), None


# the launchers pass these True for CPU tensors only (Triton's interpreter); a GPU gets False
INTERPRETER_FLAGS = ("CPU", "BY_BITS")


def _kernel(path: str):
    """'pyssm.ops.layer_norm_triton._bwd' -> that module's kernel (a JITFunction)."""
    module, _, name = path.rpartition(".")
    if not module.startswith("pyssm.ops."):
        raise ValueError(f"a launch names {path!r}, not a kernel in pyssm.ops")
    return getattr(importlib.import_module(module), name)


def compile_launches(path: str, archs: list[int]) -> int:
    """Compiles each launch recorded in ``path`` for each arch; prints the failures and spills
    and a count; returns the number of compile errors (and unrecordable launches)."""
    data = json.loads(Path(path).read_text())
    launches, failed, spilled = data["launches"], 0, 0
    for problem in data.get("unrecordable", []):
        failed += 1
        print(f"| | {problem} | | | | not recorded | |")
    for arch in archs:
        for launch in launches:
            constants = {k: (False if k in INTERPRETER_FLAGS else v)
                         for k, v in launch["constants"].items()}
            fn = _kernel(launch["kernel"])
            types = ", ".join(f"{k}={v}" for k, v in launch["signature"].items()
                              if v != "constexpr")
            flags = ", ".join(f"{k}={v}" for k, v in constants.items()
                              if k not in INTERPRETER_FLAGS)
            options = {"num_warps": launch.get("num_warps") or 4}
            if launch.get("num_stages"):
                options["num_stages"] = launch["num_stages"]
            usage, error = _compile(fn, launch["signature"], constants, arch, options)
            row = f"| sm_{arch} | {launch['kernel']} | {flags} | {types} | {options['num_warps']}"
            if error:
                failed += 1
                print(f"{row} | FAILED: {error[:160]} | |")
            elif usage and usage[1]:
                spilled += 1
                print(f"{row} | {usage[0]} | {usage[1]} |")
    print(f"\n{len(launches)} recorded launches x {len(archs)} archs compiled: {failed} "
          f"failed, {spilled} spilled (listed above)")
    return failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="80,90", help="comma-separated compute capabilities")
    ap.add_argument("--launches", metavar="PATH", default=None,
                    help="compile the launches recorded by pytest --triton-launches=PATH")
    args = ap.parse_args()
    if args.launches:
        print("| arch | kernel | flags | argument types | warps | registers | spill (stack) "
              "bytes |")
        print("|---|---|---|---|---|---|---|")
        return 1 if compile_launches(args.launches,
                                     [int(a) for a in args.arch.split(",")]) else 0
    failed = 0
    print("| arch | kernel | N or C | dtypes | warps | registers | spill (stack) bytes |")
    print("|---|---|---|---|---|---|---|")
    for arch in (int(a) for a in args.arch.split(",")):
        for kernel, n, dtypes, fn, sig, flags, warps in variants():
            signature = {**sig, **{k: "constexpr" for k in flags}}
            usage, error = _compile(fn, signature, flags, arch, {"num_warps": warps})
            if error:
                failed += 1
                print(f"| sm_{arch} | {kernel} | {n} | {dtypes} | {warps} | FAILED: "
                      f"{error[:120]} | |")
                continue
            regs, stack = usage if usage else ("?", "?")
            if usage and stack:
                failed += 1
            print(f"| sm_{arch} | {kernel} | {n} | {dtypes} | {warps} | {regs} | {stack} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
