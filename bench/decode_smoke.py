"""The flash-decoding attention kernel (csrc/attention/flash_decode_kernel.cuh) once, alone,
before the rest of the device check: a decoding step of 32 heads over 8 KV heads against caches
used to different lengths (split over keys, so its merge kernel runs too), 4 queries under a
causal mask, and packed sequences with keys of their own offsets, fp16 and bf16, against the
reference. The CUDA attention forward gives it every call with seqlen_q x heads / heads_k <= 16
(the transformers backend's decoding steps, flash_attn_with_kvcache), so a hang or fault of a
kernel that has never run must cost one short step: bench/device_check.sh runs this under a
short limit and turns it off (PYSSM_FLASH_DECODE=0) for the later steps when it does not print
"ok".

    python bench/decode_smoke.py       # exit 0: ok or skipped (no CUDA device), 1: failed
"""

from __future__ import annotations

import os
import sys

import torch

from pyssm import ops


def cases(device):
    """(name, q, k, v, keyword arguments) of the smoke's calls."""
    i32 = dict(dtype=torch.int32, device=device)
    for dtype in (torch.bfloat16, torch.float16):
        def rand(*shape, dt=dtype):
            return torch.randn(*shape, device=device, dtype=dt)
        yield (f"{dtype} 1 query x 32 / 8 heads, caches used 0 / 1000 / 3000 of 3000",
               rand(3, 1, 32, 128), rand(3, 3000, 8, 128), rand(3, 3000, 8, 128),
               dict(seqused_k=torch.tensor([0, 1000, 3000], **i32)))
        yield (f"{dtype} 4 queries x 4 / 1 heads causal, 500 keys, head_dim 80",
               rand(2, 4, 4, 80), rand(2, 500, 1, 80), rand(2, 500, 1, 80), dict(causal=True))
        yield (f"{dtype} packed, keys at their own offsets, head_dim 64",
               rand(4, 8, 64), rand(1310, 2, 64), rand(1310, 2, 64),
               dict(cu_seqlens=torch.tensor([0, 1, 4, 4], **i32),
                    cu_seqlens_k=torch.tensor([0, 1200, 1210, 1310], **i32), max_seqlen=3,
                    max_seqlen_k=1200))


def main() -> int:
    device = os.environ.get("PYSSM_DECODE_SMOKE_DEVICE", "cuda")
    if device != "cuda" or not torch.cuda.is_available():
        print("decode smoke: skipped (no CUDA device)")
        return 0
    os.environ["PYSSM_FLASH_DECODE"] = "1"
    torch.manual_seed(0)
    worst = 0.0
    for name, q, k, v, kw in cases(device):
        out, lse = ops.attention(q, k, v, return_lse=True, backend="cuda", **kw)
        want, want_lse = ops.attention(q.double(), k.double(), v.double(), return_lse=True,
                                       backend="reference", **kw)
        torch.cuda.synchronize()
        seen = torch.isfinite(want_lse)
        if not torch.equal(torch.isfinite(lse), seen):
            print(f"decode smoke: FAILED ({name}: lse finite on the wrong rows)")
            return 1
        err = max(((out.double() - want).abs().max() / want.abs().max()).item(),
                  (lse.double() - want_lse)[seen].abs().max().item())
        worst = max(worst, err)
        print(f"{name}: max error {err:.3g}", flush=True)
        if not err < 0.05:  # (NaN fails too)
            print(f"decode smoke: FAILED ({name}: error {err:.3g})")
            return 1
    print(f"decode smoke: ok (max error {worst:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
