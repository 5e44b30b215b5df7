"""Tiny cases for compute-sanitizer: every op that has a CUDA (or Triton) kernel, once, forward +
backward.

Sizes are small and odd (and a few long enough to span several blocks or chunks) so that
out-of-bounds reads, tail handling and shared-memory races show up. Run under the sanitizer:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
        python bench/sanitize_cases.py
    compute-sanitizer --tool racecheck python bench/sanitize_cases.py

Exits 1 if any case raises; ops without a CUDA kernel are listed and skipped. With --list it
only prints the ops that have a kernel ("none" and why, if none).
PYSSM_SANITIZE_DEVICE=cpu runs the same cases on the CPU kernels (a check of this script).
"""

from __future__ import annotations

import os
import sys

import torch

from pyssm import _extension, ops
from pyssm.bench.harness import env_overrides

DEV = os.environ.get("PYSSM_SANITIZE_DEVICE", "cuda")  # "cpu" to try the cases without a GPU


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEV, dtype=dtype).requires_grad_()


def cross_scan_cases():
    for dtype in (torch.float32, torch.bfloat16):
        yield f"(2, 5, 7, 9) {dtype}", lambda d=dtype: ops.cross_scan(rand(2, 5, 7, 9, dtype=d),
                                                                    backend=DEV)


def cross_merge_cases():
    for dtype in (torch.float32, torch.bfloat16):
        yield f"(2, 4, 5, 7, 9) {dtype}", lambda d=dtype: ops.cross_merge(
            rand(2, 4, 5, 7, 9, dtype=d), backend=DEV)


def selective_scan_cases():
    for batch, groups, dim, dstate, length, dtype in ((2, 2, 3, 3, 37, torch.float32),
                                                      (1, 4, 5, 1, 2101, torch.bfloat16),
                                                      (1, 1, 4, 16, 700, torch.float16)):
        def run(b=batch, k=groups, d=dim, n=dstate, L=length, dt=dtype):
            return ops.selective_scan(
                rand(b, k * d, L, dtype=dt), rand(b, k * d, L, dtype=dt),
                (-torch.rand(k * d, n, device=DEV) - 0.5).requires_grad_(),
                rand(b, k, n, L, dtype=dt), rand(b, k, n, L, dtype=dt), rand(k * d), rand(k * d),
                delta_softplus=True, backend=DEV)
        yield f"batch {batch} K {groups} D {dim} N {dstate} L {length} {dtype}", run


def selective_scan_with_state_cases():
    # the kernels that write the last state (one thread a row, after a ragged last tile) and
    # start the backward's adjoint from its gradient
    for batch, groups, dim, dstate, length, dtype in ((2, 2, 3, 3, 37, torch.float32),
                                                      (1, 4, 5, 1, 1100, torch.bfloat16)):
        def run(b=batch, k=groups, d=dim, n=dstate, L=length, dt=dtype):
            y, last = ops.selective_scan(
                rand(b, k * d, L, dtype=dt), rand(b, k * d, L, dtype=dt),
                (-torch.rand(k * d, n, device=DEV) - 0.5).requires_grad_(),
                rand(b, k, n, L, dtype=dt), rand(b, k, n, L, dtype=dt), rand(k * d), rand(k * d),
                delta_softplus=True, return_last_state=True, backend=DEV)
            return y.float().sum(-1) + last.sum(-1)
        yield f"batch {batch} K {groups} D {dim} N {dstate} L {length} {dtype}", run


def ss2d_cases():
    # the third: two channel blocks (the backward's dz by atomics) and d_state 16; the second
    # and fourth: the d_state-1 forward (v3), the fourth with dt_projs_weight in shared memory
    # (dt_rank 33) and a partial block of channels, whose backward is v3's over dt_rank 16
    # (dpre written out for the GEMMs); the second and fifth: the x_proj kernel's
    # forward, the fifth its adjoint too (fp16; bf16's, with dz's split, in the autocast case);
    # the sixth a batch whose blocks fill up to 132 SMs at 2 an SM (68 x 4 x 2): the forward
    # keeps its tile states (a partial last tile) and the backward's main kernel runs from them
    for batch, H, W, dim, dstate, rank, dtype in ((2, 7, 9, 6, 2, 3, torch.float32),
                                                  (1, 45, 47, 8, 1, 1, torch.bfloat16),
                                                  (1, 5, 6, 130, 16, 2, torch.float16),
                                                  (1, 9, 11, 40, 1, 33, torch.float32),
                                                  (2, 9, 11, 40, 1, 6, torch.float16),
                                                  (68, 5, 14, 40, 1, 6, torch.bfloat16)):
        def run(b=batch, h=H, w=W, d=dim, n=dstate, r=rank, dt=dtype):
            return ops.ss2d(rand(b, h, w, d, dtype=dt), rand(4, r + 2 * n, d) * 0.3,
                            rand(4, d, r) * 0.3, rand(4, d) * 0.1 - 3, rand(4 * d, n) * 0.1,
                            rand(4 * d), backend=DEV)
        yield f"({batch}, {H}, {W}, {dim}) N {dstate} R {rank} {dtype}", run

    def autocast():
        # a VMamba block's call: channels-first bf16 under autocast (the first device check
        # found the fused kernel reading its x_proj past the end here)
        with torch.autocast(DEV, dtype=torch.bfloat16):
            return ops.ss2d(rand(2, 24, 16, 16, dtype=torch.bfloat16), rand(4, 8, 24) * 0.3,
                            rand(4, 24, 6) * 0.3, rand(4, 24) * 0.1 - 3, rand(96, 1) * 0.1,
                            rand(96), channels_first=True, out_float32=True, backend=DEV)
    yield "(2, 24, 16, 16) channels-first N 1 R 6 under bf16 autocast", autocast


def attention_cases():
    for batch, seqlen, heads, head_dim, causal in ((2, 97, 3, 64, False), (1, 197, 2, 80, True),
                                                   (1, 33, 1, 128, False),
                                                   (1, 70, 2, 256, True)):
        def run(b=batch, n=seqlen, h=heads, d=head_dim, c=causal):
            q, k, v = (rand(b, n, h, d, dtype=torch.bfloat16) for _ in range(3))
            return ops.attention(q, k, v, causal=c, backend=DEV)
        yield f"({batch}, {seqlen}, {heads}, {head_dim}) causal={causal}", run

    def varlen():
        q, k, v = (rand(147, 2, 64, dtype=torch.float16) for _ in range(3))
        cu = torch.tensor([0, 50, 147], device=DEV, dtype=torch.int32)
        return ops.attention(q, k, v, cu_seqlens=cu, max_seqlen=97, backend=DEV)
    yield "varlen (0, 50, 147) fp16", varlen

    def varlen_keys():  # keys at offsets of their own: one query against 200 keys, Sq > Sk
        q = rand(131, 4, 64, dtype=torch.bfloat16)
        k, v = (rand(240, 2, 64, dtype=torch.bfloat16) for _ in range(2))
        cu = torch.tensor([0, 1, 131], device=DEV, dtype=torch.int32)
        cu_k = torch.tensor([0, 200, 240], device=DEV, dtype=torch.int32)
        return ops.attention(q, k, v, cu_seqlens=cu, cu_seqlens_k=cu_k, causal=True,
                             backend=DEV)
    yield "varlen q (0, 1, 131), keys (0, 200, 240) bf16 causal", varlen_keys

    def kv_cache():  # a dense cache of 300 slots used to 0, 1, 130 and 300 keys
        q = rand(4, 3, 4, 128, dtype=torch.bfloat16)
        k, v = (rand(4, 300, 2, 128, dtype=torch.bfloat16) for _ in range(2))
        used = torch.tensor([0, 1, 130, 300], device=DEV, dtype=torch.int32)
        return ops.attention(q, k, v, seqused_k=used, causal=True, backend=DEV)
    yield "seqused_k (0, 1, 130, 300) of 300 bf16 hd128 causal", kv_cache

    def kv_cache_prefill_kernels():  # the same call on the prefill kernels (PYSSM_FLASH_DECODE=0)
        with env_overrides({"PYSSM_FLASH_DECODE": "0"}):
            return kv_cache()
    yield "seqused_k (0, 1, 130, 300) of 300, prefill kernels", kv_cache_prefill_kernels

    def left_padded():  # keys [lead, used) of a 300-slot cache: none, one, past a block, all
        q = rand(4, 17, 4, 64, dtype=torch.bfloat16)
        k, v = (rand(4, 300, 2, 64, dtype=torch.bfloat16) for _ in range(2))
        used = torch.tensor([7, 300, 290, 300], device=DEV, dtype=torch.int32)
        lead = torch.tensor([7, 299, 150, 0], device=DEV, dtype=torch.int32)
        return ops.attention(q, k, v, seqused_k=used, leftpad_k=lead, causal=True, backend=DEV)
    yield "leftpad_k (7, 299, 150, 0) to (7, 300, 290, 300) of 300 bf16 causal", left_padded

    def decode_split():  # flash-decoding split over keys: 8 heads over 2, caches of 3000 slots
        q = rand(3, 1, 8, 96, dtype=torch.float16)
        k, v = (rand(3, 3000, 2, 96, dtype=torch.float16) for _ in range(2))
        used = torch.tensor([0, 1500, 3000], device=DEV, dtype=torch.int32)
        return ops.attention(q, k, v, seqused_k=used, backend=DEV)
    yield "flash-decoding: 1 query x 8 heads / 2, seqused_k (0, 1500, 3000) fp16 hd96", \
        decode_split

    # q, k and v read in place from one fused qkv (a token stride of 3 H d), and the backward's
    # dq, dk, dv written into one gradient of its shape: dense (Hopper and portable paths at
    # head_dim 64 on sm_90, portable at 32) and packed
    for shape, cu in (((2, 97, 3, 3, 64), None), ((1, 70, 3, 2, 32), None),
                      ((147, 3, 2, 72), (0, 50, 147))):
        def qkvpacked(shape=shape, cu=cu):
            offsets = None if cu is None else torch.tensor(cu, device=DEV, dtype=torch.int32)
            return ops.attention_qkvpacked(rand(*shape, dtype=torch.bfloat16), cu_seqlens=offsets,
                                           causal=cu is None, backend=DEV)
        yield f"qkvpacked {shape}" + (f" varlen {cu}" if cu else " causal"), qkvpacked

    if DEV != "cuda":  # (the CPU op reads the offsets and rejects them)
        return

    def offsets_past_the_tokens():  # the op called directly: offsets unread, clamped in kernels
        q, k, v = (rand(150, 2, 64, dtype=torch.bfloat16) for _ in range(3))
        cu = torch.tensor([0, 60, 400, 900], device=DEV, dtype=torch.int32)
        return torch.ops.pyssm.attention(q, k, v, False, None, cu, 340)[0]  # (its backward too)
    yield "varlen offsets (0, 60, 400, 900) past 150 tokens, forward and backward", \
        offsets_past_the_tokens


def layer_norm_cases():
    def fused():
        x, r = rand(37, 130, dtype=torch.bfloat16), rand(37, 130)
        y, s = ops.layer_norm(x, rand(130), rand(130), residual=r, out_dtype=torch.bfloat16,
                              return_residual=True, backend="triton")
        return y.float() + s
    yield "(37, 130) bf16 + fp32 residual", fused
    yield "(37, 48) bf16, GELU (VMamba's stem)", lambda: ops.layer_norm(
        rand(37, 48, dtype=torch.bfloat16), rand(48), rand(48), out_dtype=torch.bfloat16,
        activation="gelu", backend="triton")


def depthwise_conv2d_cases():
    yield "(2, 9, 7, 130) bf16, 3 x 3, SiLU", lambda: ops.depthwise_conv2d(
        rand(2, 9, 7, 130, dtype=torch.bfloat16), rand(130, 1, 3, 3), rand(130),
        activation="silu", backend="triton")


def linear_gelu_cases():
    yield "(3, 67, 96) bf16 -> 130 (a partial row tile, a partial N tile)", \
        lambda: ops.linear_gelu(rand(3, 67, 96, dtype=torch.bfloat16), rand(130, 96), rand(130),
                                backend="triton")


def linear_residual_cases():
    def fused():
        s = rand(3, 67, 130)
        with torch.no_grad():
            return ops.linear_residual_(s, rand(3, 67, 96, dtype=torch.bfloat16), rand(130, 96),
                                        rand(130), backend="triton")
    yield "(3, 67, 96) bf16 -> 130 into a float32 sum (partial row and N tiles)", fused


def mlp_gelu_cases():
    yield "(3, 67, 96) bf16 -> 130 -> 96, forward and backward (partial row and N tiles)", \
        lambda: ops.mlp_gelu(rand(3, 67, 96, dtype=torch.bfloat16), rand(130, 96), rand(130),
                             rand(96, 130), rand(96), backend="triton")


def mlp_residual_cases():
    def fused():
        s = rand(3, 67, 100)
        with torch.no_grad():
            return ops.mlp_residual_(s, rand(3, 67, 96, dtype=torch.bfloat16), rand(130, 96),
                                     rand(130), rand(100, 130), rand(100), backend="triton")
    yield ("(3, 67, 96) bf16 -> 130 -> 100 into a float32 sum (partial row, hidden and output "
           "tiles)"), fused

    def wide():
        s = rand(2, 9, 300)
        with torch.no_grad():
            return ops.mlp_residual_(s, rand(2, 9, 40, dtype=torch.bfloat16), rand(70, 40),
                                     rand(70), rand(300, 70), rand(300), backend="triton")
    yield "(2, 9, 40) bf16 -> 70 -> 300 (two 256-wide column tiles)", wide


def layer_norm_linear_cases():
    yield "(3, 67, 100) float32 -> 130 in bf16 (partial row, input and output tiles)", \
        lambda: ops.layer_norm_linear(rand(3, 67, 100), rand(100), rand(100), rand(130, 100),
                                      rand(130), dtype=torch.bfloat16, backend="triton")


def norm_mlp_residual_cases():
    def fused(c, h):
        with torch.no_grad():  # (an inference op: its output a leaf, the backward a no-op)
            return ops.norm_mlp_residual(rand(3, 67, c), rand(3, 67, c, dtype=torch.bfloat16),
                                         rand(c), rand(c), rand(h, c), rand(h), rand(c, h),
                                         rand(c), dtype=torch.bfloat16,
                                         backend="triton").requires_grad_()
    yield ("(3, 67, 100) float32 + bf16 -> 130 -> 100 (partial row block, padded width, "
           "partial hidden step)"), lambda: fused(100, 130)
    yield "(3, 67, 200) float32 + bf16 -> 70 -> 200 (32-row programs, 256 wide)", \
        lambda: fused(200, 70)


CASES = {"cross_scan": cross_scan_cases, "cross_merge": cross_merge_cases,
         "selective_scan": selective_scan_cases,
         "selective_scan_with_state": selective_scan_with_state_cases, "ss2d": ss2d_cases,
         "attention": attention_cases, "layer_norm": layer_norm_cases,
         "depthwise_conv2d": depthwise_conv2d_cases, "linear_gelu": linear_gelu_cases,
         "linear_residual": linear_residual_cases, "mlp_gelu": mlp_gelu_cases,
         "mlp_residual": mlp_residual_cases, "norm_mlp_residual": norm_mlp_residual_cases,
         "layer_norm_linear": layer_norm_linear_cases}
TRITON_OPS = ("layer_norm", "depthwise_conv2d", "linear_gelu", "linear_residual", "mlp_gelu",
              "mlp_residual", "norm_mlp_residual", "layer_norm_linear")


def _runs(op: str) -> bool:
    if op in TRITON_OPS:  # Triton kernels (on CPU tensors only in Triton's interpreter)
        from pyssm.ops import _triton
        return _triton.available() and (DEV == "cuda" or _triton.interpreting())
    return _extension.has_kernel(op, DEV)


def with_kernel() -> list[str]:
    return [op for op in CASES if _runs(op)]


def main() -> int:
    if sys.argv[1:] == ["--list"]:
        print(" ".join(with_kernel()) or f"none (pyssm._C: {_extension.load_error() or 'loaded'})")
        return 0
    torch.manual_seed(0)
    failed = 0
    for op, cases in CASES.items():
        if not _runs(op):
            print(f"skip {op}: no {DEV} kernel")
            continue
        for name, run in cases():
            try:
                out = run()
                out.backward(torch.randn_like(out))
                if DEV == "cuda":
                    torch.cuda.synchronize()
                print(f"ok   {op} {name}", flush=True)
            except Exception as exc:  # report every case, then fail
                failed += 1
                print(f"FAIL {op} {name}: {type(exc).__name__}: {exc}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
