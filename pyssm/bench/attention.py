"""attention TFLOP/s at ViT token counts: pyssm's kernel against torch SDPA's backends.

GPU (bf16, non-causal, 12 heads, head_dim 64): ViT-B/16 token counts N = 197, 442, 785, 1025,
2305, 4097 (224 ... 1024 px, CLS included); forward at batch round(131072 / N) (~128k tokens)
and forward+backward at round(65536 / N) (~64k), as in ANCHORS.md, whose SDPA numbers sit beside;
head_dim 80 (16 heads, ViT-H) and 128 (8 heads), forward and forward+backward, at N = 1025 and
4097: the issue asks hd80 for 0.9x hd64's TFLOP/s and hd128 for 600 (forward).
SDPA runs with each backend forced (flash, cudnn, efficient) and with torch's own choice
(default), on transposed views (B, H, N, d) of the same (B, N, H, d) tensors. On an sm_90 GPU
pyssm takes its Hopper kernels (forward and backward at head_dim 64 to 128);
"pyssm-cuda-portable" is the same op with them turned off (PYSSM_FLASH_SM90=0), so both paths
sit side by side, and "pyssm-cuda-dq-atomic" (forward+backward rows) the Hopper backward with dQ
added by fp32 atomics (v1, PYSSM_FLASH_SM90_DQ=atomic) beside the default TMA reduce-adds (v2).
CPU (float32): N = 65, 197, batch 2, 4 heads, head_dim 32: pyssm-cpu, reference, SDPA math and
default.

"attention_qkv" rows: the same attention from one fused qkv projection (B, N, 3, H, d), as a ViT
block has it (ViT-B/16 at 224 and 512 px on a GPU; N = 65 on the CPU), each provider taking its
q, k, v (and giving back the projection's gradient) its own way: pyssm-<backend> is
attention_qkvpacked (q, k, v read in place, one gradient of qkv's shape); "pyssm-unbound" the
op on the three unbound views (the same kernels; the backward's three gradients stacked by
unbind's backward); "pyssm-copied" on contiguous copies of them (what the kernels were given
before they read strided inputs); SDPA (the default choice, cuDNN on an H200) as timm calls
it, on qkv permuted to (3, B, H, N, d) and unbound.

"attention_decode" rows: one decoding step of a language model against its KV cache, the
caches filled to different lengths (GPU: bf16, 32 heads over 8 KV heads, head_dim 128, a
4096-slot cache; CPU: float32, small): "pyssm-<backend>" reads the cache in place with
seqused_k (flash_attn_with_kvcache's path, and the transformers backend's for left padding
with leftpad_k, the same kernels; on a GPU the flash-decoding kernel, split over keys);
"pyssm-cuda-prefill-kernels" the same call with the flash-decoding kernel turned off
(PYSSM_FLASH_DECODE=0: the prefill kernels, one head a block); "pyssm-gathered" packs the used
keys first and passes cu_seqlens_k (the transformers backend's path for a padding mask with
holes: the used keys' indices worked out once per mask, then an index_select a layer, which
reads and writes the used cache again); "sdpa-default (masked)" is torch SDPA with the padding
mask over the whole cache, as transformers' sdpa runs it. GB/s counts the used keys and values read once (decoding's floor).

"attention_window" rows: a language model's prefill under a causal sliding window (Mistral's:
each token sees itself and the w - 1 before it; GPU: bf16, 32 heads over 8 KV heads, head_dim
128, N = 8192, w = 1024 and 4096; CPU: float32, small): "pyssm-<backend>" with
window_size=(w - 1, 0), whose kernels visit only the key tiles the window reaches;
"pyssm-<backend>-causal" plain causal attention over the same tokens (the work the window
saves); "sdpa-default (masked)" torch SDPA with the sliding mask as a boolean tensor, as
transformers' sdpa runs such a layer. TFLOP/s count the visible (query, key) pairs only.

"attention_softcap" rows: a causal prefill with Gemma 2's soft-capped scores (c = 50: each
score s becomes c tanh(s / c); GPU: bf16, Gemma 2 27B's 32 heads over 16 KV heads, head_dim
128, N = 4096; CPU: float32, small): "pyssm-<backend>" with softcap=50,
"pyssm-<backend>-uncapped" the same call
without the cap (what capping costs), and "eager (capped)" the scores formed, capped, masked
and softmaxed by torch's ops, as transformers' eager attention runs Gemma 2 (its sdpa cannot
cap). TFLOP/s count the causal (query, key) pairs.

"attention_hd256" rows: a causal prefill at head_dim 256 (Gemma 3 4B's 8 heads over 4 KV heads;
GPU: bf16, N = 8192, plain causal and under its local layers' sliding window of 1024; CPU:
float32, N = 2049 under a window of 256). On a GPU pyssm's forward is the portable flash
kernel (32-key tiles at this head size) and its backward the composed path (ATen matrix
products in float32); on the CPU both are composed. "pyssm-<backend>" as it runs, the composed
path's scores in pieces of queries within a budget (PYSSM_COMPOSED_SCORES, 2^24 elements), each
over only the keys its rows see; "pyssm-<backend>-one-piece" with the budget past any chunk
(all of a sequence's scores at once: the composed path before pieces; on a GPU that changes
the backward only), so the peak memory and the work the pieces save sit side by side;
"sdpa-default" torch SDPA (with the window as a boolean mask). TFLOP/s count the visible
(query, key) pairs only.

"attention_prefix" rows: a prefix-LM prefill as PaliGemma runs its language model (the image
tokens and the prompt, the prefix, attending both ways, the suffix causally; GPU: bf16,
PaliGemma 2 28B's 32 heads over 16 KV heads, head_dim 128, at 896 px: a 4128-token prefix of
4096 image tokens and a 32-token prompt, then a 32-token suffix; CPU: float32, small):
"pyssm-<backend>" is the transformers backend's attention function on the block mask its
mask function makes (pyssm.integrations.transformers: the suffix causally and the prefix both
ways, two packed calls, each over its keys gathered); "pyssm-<backend>-causal" plain causal
attention over the same tokens, in place (about the same pairs); "sdpa-default (masked)" torch
SDPA with the dense boolean mask,
as transformers' sdpa runs PaliGemma. TFLOP/s count the visible (query, key) pairs.

"attention_vision_windows" rows: a Qwen2.5-VL vision tower's windowed attention layer over one
image (GPU: bf16, Qwen2.5-VL-7B's 16 heads of head_dim 80, a 1008 x 1008 px image: 5184
patches in 81 windows of 64; CPU: float32, small), the windows packed along one row:
"pyssm-<backend>" one call with their cu_seqlens (swap_vision_attention's),
"pyssm-<backend>-per-window" one pyssm call a window (what transformers does for any backend
but flash-attn, the "pyssm" attention backend included), and "sdpa-default (per window)" torch
SDPA a window, as transformers' sdpa runs it. TFLOP/s count the pairs within each window.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pyssm.bench import harness
from pyssm.bench.results import ANCHOR_LABEL
from pyssm import ops

# ANCHORS.md, H200, torch 2.11: SDPA TFLOP/s by mode -> N -> backend.
ANCHOR_TFLOPS = {
    "forward": {197: {"flash": 130, "cudnn": 189, "efficient": 72, "default": 191},
                442: {"flash": 199, "cudnn": 276, "efficient": 122, "default": 271},
                785: {"flash": 220, "cudnn": 305, "efficient": 117, "default": 303},
                1025: {"flash": 231, "cudnn": 322, "efficient": 118, "default": 313},
                2305: {"flash": 278, "cudnn": 373, "efficient": 128, "default": 368},
                4097: {"flash": 295, "cudnn": 389, "efficient": 132, "default": 390}},
    "full": {197: {"flash": 74, "cudnn": 118}, 1025: {"flash": 174, "cudnn": 283},
             4097: {"flash": 249, "cudnn": 381}},
}
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH,
                 "default": None}
NOTES = [
    "TFLOP/s: 4 * batch * heads * N^2 * head_dim for forward, 3.5x that for forward+backward.",
    f"anchor {ANCHOR_LABEL}: torch SDPA with the same backend forced; for pyssm rows "
    "the SDPA backend to beat (cuDNN, the default on H200). vs anchor = TFLOP/s / anchor.",
]


def sdpa_provider(backend: str) -> harness.Provider:
    """torch SDPA on (B, H, N, d) views, returning the (B, N, H, d) layout of the inputs."""
    def attend(q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if SDPA_BACKENDS[backend] is None:
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        with sdpa_kernel(SDPA_BACKENDS[backend]):
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    return harness.Provider(f"sdpa-{backend}", attend)


def switched_provider(name: str, env: dict[str, str]) -> harness.Provider:
    """pyssm's CUDA attention with ``env`` set while it is measured, forward and backward
    alike (the kernels read the switches at each call)."""
    base = harness.pyssm_provider("attention", "cuda",
                                  lambda q, k, v: ops.attention(q, k, v, backend="cuda"))
    return harness.Provider(name, base.fn, base.status, env=env)


# On sm_90: the Hopper kernels turned off, and the Hopper backward's dQ added by fp32 atomics
# (v1) rather than TMA reduce-adds (v2, the default); the latter only where a backward runs.
PORTABLE = "pyssm-cuda-portable"
DQ_ATOMIC = "pyssm-cuda-dq-atomic"
# attention_decode rows: the same call with the flash-decoding kernel turned off
PREFILL = "pyssm-cuda-prefill-kernels"


def anchor(mode: str, seqlen: int, provider: str, head_dim: int = 64) -> dict:
    """ANCHORS.md's SDPA TFLOP/s for this row (head_dim 64 only: it has none at 128)."""
    by_backend = ANCHOR_TFLOPS.get(mode, {}).get(seqlen, {}) if head_dim == 64 else {}
    backend = provider.removeprefix("sdpa-") if provider.startswith("sdpa-") else "cudnn"
    return {"anchor_tflops": by_backend.get(backend)}


def cases(device: torch.device, quick: bool = False) -> list[harness.Case]:
    kernel, gpu = device.type, device.type == "cuda"
    providers = [harness.pyssm_provider("attention", kernel,
                                        lambda q, k, v: ops.attention(q, k, v, backend=kernel))]
    if gpu:
        dtype = torch.bfloat16
        if torch.cuda.get_device_capability(device) == (9, 0):
            providers += [switched_provider(PORTABLE, {"PYSSM_FLASH_SM90": "0"}),
                          switched_provider(DQ_ATOMIC, {"PYSSM_FLASH_SM90_DQ": "atomic"})]
        providers += [sdpa_provider(b) for b in ("flash", "cudnn", "efficient", "default")]
        both = {"forward": lambda n: round(131072 / n), "full": lambda n: round(65536 / n)}
        configs = [(12, 64, [197, 1025, 4097] if quick else [197, 442, 785, 1025, 2305, 4097],
                    both),
                   (16, 80, [4097] if quick else [1025, 4097], both),
                   (8, 128, [4097] if quick else [1025, 4097], both)]
    else:
        dtype = torch.float32
        providers += [harness.Provider("reference", lambda q, k, v: ops.attention(
            q, k, v, backend="reference")), sdpa_provider("math"), sdpa_provider("default")]
        configs = [(4, 32, [65] if quick else [65, 197],
                    {"forward": lambda n: 2, "full": lambda n: 2})]
    out = [case for heads, head_dim, seqlens, batches in configs
           for case in _cases_at(device, providers, dtype, heads, head_dim, seqlens, batches)]
    return out + qkv_cases(device, quick) + decode_cases(device, quick) + \
        window_cases(device, quick) + softcap_cases(device, quick) + \
        prefix_cases(device, quick) + vision_window_cases(device, quick) + \
        hd256_cases(device, quick)


def _lm_inputs(device, dtype, batch, n, heads, heads_k, head_dim) -> tuple:
    """q (batch, n, heads, head_dim), k and v (batch, n, heads_k, head_dim): a language
    model's prefill with grouped-query heads."""
    q = torch.randn(batch, n, heads, head_dim, device=device, dtype=dtype)
    return (q, *(torch.randn(batch, n, heads_k, head_dim, device=device, dtype=dtype)
                 for _ in range(2)))


def _lm_case(device: torch.device, op: str, size: dict, providers: list, pairs: int
             ) -> harness.Case:
    """A case of a language model's prefill (``_lm_inputs`` of ``size``: batch, N, heads,
    heads_k, head_dim; bf16 on a GPU, float32 on the CPU), forward and forward+backward,
    TFLOP/s counting ``pairs`` visible (query, key) pairs a row and head."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = [size[k] for k in ("batch", "N", "heads", "heads_k", "head_dim")]
    flops = 4 * size["batch"] * size["heads"] * pairs * size["head_dim"]
    return harness.Case(op=op, size=size, make_inputs=lambda: _lm_inputs(device, dtype, *shape),
                        providers=providers, modes=("forward", "full"),
                        dtype=str(dtype).removeprefix("torch."),
                        flops={"forward": flops, "full": 3.5 * flops})


def _sdpa_causal(window: int | None) -> harness.Provider:
    """torch SDPA, causal ("sdpa-default"), or under a sliding window of ``window`` keys given
    as a boolean mask, as transformers' sdpa runs such a layer ("sdpa-default (masked)")."""
    def attend(q, k, v):
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
        if window is None:
            return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True,
                                                  enable_gqa=True).transpose(1, 2)
        i = torch.arange(q.shape[1], device=q.device)
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask,
                                              enable_gqa=True).transpose(1, 2)

    return harness.Provider("sdpa-default" + ("" if window is None else " (masked)"), attend)


def window_providers(kernel: str, window: int) -> list[harness.Provider]:
    """The attention_window rows' providers (module docstring), each fn(q, k, v) -> like q."""
    windowed = harness.pyssm_provider("attention", kernel, lambda q, k, v: ops.attention(
        q, k, v, causal=True, window_size=(window - 1, 0), backend=kernel))
    return [windowed, _plain_causal(kernel, "causal"), _sdpa_causal(window)]


def _plain_causal(kernel: str, suffix: str) -> harness.Provider:
    """pyssm's plain causal attention, "pyssm-<kernel>-<suffix>": what a window or a cap is
    measured against."""
    return dataclasses.replace(harness.pyssm_provider(
        "attention", kernel, lambda q, k, v: ops.attention(q, k, v, causal=True, backend=kernel)),
        name=f"pyssm-{kernel}-{suffix}")


def window_cases(device: torch.device, quick: bool = False) -> list[harness.Case]:
    gpu = device.type == "cuda"
    batch, n, heads, heads_k, head_dim = (2, 8192, 32, 8, 128) if gpu else (2, 129, 4, 2, 32)
    windows = ([1024] if quick else [1024, 4096]) if gpu else [16]
    return [_lm_case(device, "attention_window",
                     {"N": n, "window": window, "batch": batch, "heads": heads,
                      "heads_k": heads_k, "head_dim": head_dim},
                     window_providers(device.type, window),
                     sum(min(i + 1, window) for i in range(n)))   # visible (query, key) pairs
            for window in windows]


SOFTCAP = 50.0   # Gemma 2's attn_logit_softcapping


def softcap_providers(kernel: str) -> list[harness.Provider]:
    """The attention_softcap rows' providers (module docstring), each fn(q, k, v) -> like q."""
    def eager(q, k, v):
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
        group = qh.shape[1] // kh.shape[1]
        kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
        scores = qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5
        scores = torch.tanh(scores / SOFTCAP) * SOFTCAP
        n = scores.shape[-1]
        hidden = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        probs = scores.masked_fill(hidden, float("-inf")).softmax(-1, dtype=torch.float32)
        return (probs.to(q.dtype) @ vh).transpose(1, 2)

    capped = harness.pyssm_provider("attention", kernel, lambda q, k, v: ops.attention(
        q, k, v, causal=True, softcap=SOFTCAP, backend=kernel))
    return [capped, _plain_causal(kernel, "uncapped"), harness.Provider("eager (capped)", eager)]


def softcap_cases(device: torch.device, quick: bool = False) -> list[harness.Case]:
    gpu = device.type == "cuda"
    batch, n, heads, heads_k, head_dim = (2, 4096, 32, 16, 128) if gpu else (2, 129, 4, 2, 32)
    return [_lm_case(device, "attention_softcap",
                     {"N": n, "softcap": SOFTCAP, "batch": batch, "heads": heads,
                      "heads_k": heads_k, "head_dim": head_dim},
                     softcap_providers(device.type), n * (n + 1) // 2)]


def prefix_providers(kernel: str, prefix: int) -> list[harness.Provider]:
    """The attention_prefix rows' providers (module docstring), each fn(q, k, v) -> like q."""
    from pyssm.integrations import transformers as pyssm_hf

    masks = {}   # (shape, device) -> the block mask, made once: the backend reads it once

    def block_mask(q):
        key = (tuple(q.shape), q.device)
        if key not in masks:
            ids = torch.full(q.shape[:2], -1, device=q.device)
            ids[:, :prefix] = 0
            masks[key] = pyssm_hf.block_mask(ids, None, False, q.shape[0], q.shape[1],
                                             q.shape[1])
        return masks[key]

    module = torch.nn.Module()
    module.is_causal = False   # (as PaliGemma builds its attention: the mask says causal)

    def backend(q, k, v):
        old, pyssm_hf._backend = pyssm_hf._backend, kernel
        try:
            return pyssm_hf.attention_forward(module, *(t.transpose(1, 2) for t in (q, k, v)),
                                              block_mask(q))[0]
        finally:
            pyssm_hf._backend = old

    def sdpa_masked(q, k, v):
        n = q.shape[1]
        i = torch.arange(n, device=q.device)
        mask = (i[None, :] <= i[:, None]) | ((i[None, :] < prefix) & (i[:, None] < prefix))
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), attn_mask=mask,
                                              enable_gqa=True).transpose(1, 2)

    return [harness.pyssm_provider("attention", kernel, backend), _plain_causal(kernel, "causal"),
            harness.Provider("sdpa-default (masked)", sdpa_masked)]


def prefix_cases(device: torch.device, quick: bool = False) -> list[harness.Case]:
    gpu = device.type == "cuda"
    batch, n, prefix, heads, heads_k, head_dim = (2, 4160, 4128, 32, 16, 128) if gpu else \
        (2, 80, 64, 4, 2, 32)
    return [_lm_case(device, "attention_prefix",
                     {"N": n, "prefix": prefix, "batch": batch, "heads": heads,
                      "heads_k": heads_k, "head_dim": head_dim},
                     prefix_providers(device.type, prefix),
                     prefix * prefix + sum(i + 1 for i in range(prefix, n)))]


def vision_window_providers(kernel: str) -> list[harness.Provider]:
    """The attention_vision_windows rows' providers (module docstring), each fn(q, k, v, cu)
    -> like q, q, k and v (tokens, heads, head_dim) and cu the windows' int32 offsets."""
    scale = {}

    def lengths(cu):   # (the windows' sizes, read once: the model splits on the host too)
        if scale.get("cu") is not cu:
            scale.update(cu=cu, lengths=(cu[1:] - cu[:-1]).tolist())
        return scale["lengths"]

    def per_window(q, k, v, cu):
        parts = zip(*(t.split(lengths(cu)) for t in (q, k, v)))
        return torch.cat([ops.attention(*(t[None] for t in part), backend=kernel)[0]
                          for part in parts])

    def sdpa_per_window(q, k, v, cu):
        parts = zip(*(t.transpose(0, 1)[None].split(lengths(cu), dim=2) for t in (q, k, v)))
        return torch.cat([F.scaled_dot_product_attention(*part) for part in parts],
                         dim=2)[0].transpose(0, 1)

    packed = harness.pyssm_provider("attention", kernel, lambda q, k, v, cu: ops.attention(
        q, k, v, cu_seqlens=cu, max_seqlen=max(lengths(cu)), backend=kernel))
    return [packed, dataclasses.replace(harness.pyssm_provider("attention", kernel, per_window),
                                        name=f"pyssm-{kernel}-per-window"),
            harness.Provider("sdpa-default (per window)", sdpa_per_window)]


def vision_window_cases(device: torch.device, quick: bool = False) -> list[harness.Case]:
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    windows, size, heads, head_dim = (81, 64, 16, 80) if gpu else (9, 16, 4, 32)
    tokens = windows * size
    flops = 4 * heads * windows * size * size * head_dim

    def make_inputs():
        q, k, v = (torch.randn(tokens, heads, head_dim, device=device, dtype=dtype)
                   for _ in range(3))
        return q, k, v, torch.arange(0, tokens + 1, size, device=device, dtype=torch.int32)

    return [harness.Case(
        op="attention_vision_windows",
        size={"N": tokens, "windows": windows, "heads": heads, "head_dim": head_dim},
        make_inputs=make_inputs, providers=vision_window_providers(device.type),
        modes=("forward", "full"), dtype=str(dtype).removeprefix("torch."),
        flops={"forward": flops, "full": 3.5 * flops})]


# attention_hd256 rows: "pyssm-<backend>-one-piece" sets the composed path's score budget past
# any chunk, so that it forms all of a chunk's scores at once (the path before pieces)
ONE_PIECE = {"PYSSM_COMPOSED_SCORES": str(1 << 62)}


def hd256_providers(kernel: str, window: int | None) -> list[harness.Provider]:
    """The attention_hd256 rows' providers (module docstring), each fn(q, k, v) -> like q:
    causal, under a sliding window of ``window`` keys (None: none)."""
    left = -1 if window is None else window - 1
    ours = harness.pyssm_provider("attention", kernel, lambda q, k, v: ops.attention(
        q, k, v, causal=True, window_size=(left, 0), backend=kernel))
    return [ours, dataclasses.replace(ours, name=f"pyssm-{kernel}-one-piece", env=ONE_PIECE),
            _sdpa_causal(window)]


def hd256_cases(device: torch.device, quick: bool = False) -> list[harness.Case]:
    gpu = device.type == "cuda"
    if gpu:
        batch, n, heads, heads_k, windows = 1, 8192, 8, 4, [None, 1024]
    else:
        batch, n, heads, heads_k, windows = (1, 257, 2, 1, [64]) if quick else \
            (1, 2049, 8, 4, [256])
    return [_lm_case(device, "attention_hd256",
                     {"N": n, "window": window or n, "batch": batch, "heads": heads,
                      "heads_k": heads_k, "head_dim": 256},
                     hd256_providers(device.type, window),
                     sum(min(i + 1, window or n) for i in range(n)))
            for window in windows]


def decode_providers(kernel: str) -> list[harness.Provider]:
    """The attention_decode rows' providers (module docstring), each fn(q, k_cache, v_cache,
    used) -> (B, Sq, H, d)."""
    packs = {}   # the used keys' flat indices and offsets, once per `used` (a step's mask)

    def gathered(q, k, v, used):
        batch, sq = q.shape[:2]
        if packs.get("used") is not used:
            keep = torch.arange(k.shape[1], device=k.device)[None, :] < used[:, None]
            packs.update(used=used, keys=keep.reshape(-1).nonzero()[:, 0],
                         cu_k=F.pad(used.cumsum(0, dtype=torch.int32), (1, 0)),
                         cu_q=torch.arange(0, (batch + 1) * sq, sq, dtype=torch.int32,
                                           device=q.device))
        kp, vp = (t.reshape(-1, *t.shape[2:]).index_select(0, packs["keys"]) for t in (k, v))
        out = ops.attention(q.reshape(batch * sq, *q.shape[2:]), kp, vp,
                            cu_seqlens=packs["cu_q"], max_seqlen=sq, cu_seqlens_k=packs["cu_k"],
                            max_seqlen_k=k.shape[1], backend=kernel)
        return out.view(q.shape)

    def sdpa_masked(q, k, v, used):
        mask = (torch.arange(k.shape[1], device=k.device)[None, :] < used[:, None])[:, None, None]
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), attn_mask=mask,
                                              enable_gqa=True).transpose(1, 2)

    in_place = harness.pyssm_provider("attention", kernel, lambda q, k, v, used: ops.attention(
        q, k, v, seqused_k=used, backend=kernel))
    prefill = [dataclasses.replace(in_place, name=PREFILL, env={"PYSSM_FLASH_DECODE": "0"})]
    return [in_place, *(prefill if kernel == "cuda" else []),
            dataclasses.replace(harness.pyssm_provider("attention", kernel, gathered),
                                name="pyssm-gathered"),
            harness.Provider("sdpa-default (masked)", sdpa_masked)]


def decode_cases(device: torch.device, quick: bool = False) -> list[harness.Case]:
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    heads, heads_k, head_dim, capacity = (32, 8, 128, 4096) if gpu else (4, 2, 32, 65)
    batches = ([16] if quick else [16, 64]) if gpu else [3]
    out = []
    for batch in batches:
        # lengths spread over the upper half of the cache, the last row full
        used = torch.linspace(capacity // 2, capacity, batch).round().int().tolist()
        keys = sum(used)
        out.append(harness.Case(
            op="attention_decode",
            size={"batch": batch, "cache": capacity, "mean_used": round(keys / batch),
                  "heads": heads, "heads_k": heads_k, "head_dim": head_dim},
            make_inputs=lambda b=batch, u=used: (
                torch.randn(b, 1, heads, head_dim, device=device, dtype=dtype),
                torch.randn(b, capacity, heads_k, head_dim, device=device, dtype=dtype),
                torch.randn(b, capacity, heads_k, head_dim, device=device, dtype=dtype),
                torch.tensor(u, dtype=torch.int32, device=device)),
            providers=decode_providers(device.type), modes=("forward",),
            dtype=str(dtype).removeprefix("torch."),
            flops={"forward": 4 * keys * heads * head_dim},
            bytes={"forward": 2 * keys * heads_k * head_dim * dtype.itemsize}))
    return out


def qkv_providers(kernel: str) -> list[harness.Provider]:
    """The attention_qkv rows' providers (module docstring), each fn(qkv) -> (B, N, H, d)."""
    def sdpa_timm(qkv):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    def pyssm(name, fn):  # ("not built" where pyssm._C has no attention kernel here)
        return dataclasses.replace(harness.pyssm_provider("attention", kernel, fn), name=name)
    return [
        harness.pyssm_provider("attention", kernel,
                               lambda qkv: ops.attention_qkvpacked(qkv, backend=kernel)),
        pyssm("pyssm-unbound", lambda qkv: ops.attention(*qkv.unbind(2), backend=kernel)),
        pyssm("pyssm-copied", lambda qkv: ops.attention(
            *(t.contiguous() for t in qkv.unbind(2)), backend=kernel)),
        harness.Provider("sdpa-default (timm)", sdpa_timm),
    ]


def qkv_cases(device: torch.device, quick: bool = False) -> list[harness.Case]:
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    heads, head_dim = (12, 64) if gpu else (4, 32)
    shapes = [(128, 197), (12, 1025)] if gpu else [(2, 65)]   # (batch, N)
    if quick and gpu:
        shapes = shapes[:1]
    providers = qkv_providers(device.type)
    out = []
    for batch, n in shapes:
        flops = 4 * batch * heads * n * n * head_dim
        qkv_bytes = batch * n * 3 * heads * head_dim * dtype.itemsize
        out.append(harness.Case(
            op="attention_qkv", size={"N": n, "batch": batch, "heads": heads,
                                      "head_dim": head_dim},
            make_inputs=lambda b=batch, n=n: (torch.randn(b, n, 3, heads, head_dim,
                                                          device=device, dtype=dtype),),
            providers=providers, modes=("forward", "full"), dtype=str(dtype).removeprefix("torch."),
            flops={"forward": flops, "full": 3.5 * flops},
            # forward: qkv read, out written; backward: qkv, out and dout read, dqkv written
            bytes={"forward": qkv_bytes * 4 / 3, "full": qkv_bytes * 4}))
    return out


def _cases_at(device, providers, dtype, heads, head_dim, seqlens, batches):
    gpu = device.type == "cuda"
    out = []
    for n in seqlens:
        modes_at = {}  # batch -> the modes timed at that batch
        for mode, batch_of in batches.items():
            modes_at.setdefault(batch_of(n), []).append(mode)
        for batch, modes in modes_at.items():
            flops = 4 * batch * heads * n * n * head_dim
            backward = any(m in ("full", "backward") for m in modes)
            out.append(harness.Case(
                op="attention", size={"N": n, "batch": batch, "heads": heads, "head_dim": head_dim},
                make_inputs=lambda b=batch, n=n: tuple(
                    torch.randn(b, n, heads, head_dim, device=device, dtype=dtype)
                    for _ in range(3)),
                providers=[p for p in providers if backward or p.name != DQ_ATOMIC],
                modes=tuple(modes), dtype=str(dtype).removeprefix("torch."),
                flops={"forward": flops, "full": 3.5 * flops, "backward": 2.5 * flops},
                extra=(lambda provider, m, n=n: anchor(m, n, provider, head_dim)) if gpu else None))
    return out
