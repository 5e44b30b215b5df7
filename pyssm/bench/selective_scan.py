"""selective_scan alone: pyssm's kernel, the reference and (if installed) mamba_ssm.

GPU: the sizes of ANCHORS.md "The oflex selective-scan kernel alone": K = 4 groups, 384 = 4 x 96
channels, d_state 1, (batch, L) = (64, 3136), (12, 16384), (3, 65536); bf16 u, delta, B, C; fp32
A, D, delta_bias; fp32 out; softplus on delta (as VMamba calls it), with the oflex times beside;
"pyssm-cuda-bwd-v1" (forward+backward rows) is pyssm's backward with one channel a block
(PYSSM_SCAN_CHANNELS_PER_BLOCK=1, every channel adding its own dB, dC atomics) beside the default;
"pyssm-<kernel>-last-state" is the op with return_last_state (the kernels that also write the
state after the last position and, in the backward, start from its gradient, here zeros), whose
cost over the default should be nothing measurable.
CPU (float32): K = 4, 64 channels, d_state 1, (2, 256), (2, 1024), (2, 4096).
"""

from __future__ import annotations


import torch

from pyssm.bench import harness
from pyssm.bench.results import ANCHOR_LABEL
from pyssm import ops

# ANCHORS.md: official VMamba oflex selective-scan kernel, H200, (batch, L) -> mode -> ms.
ANCHOR_MS = {(64, 3136): {"forward": 0.602, "full": 2.452},
             (12, 16384): {"forward": 0.374, "full": 1.771},
             (3, 65536): {"forward": 0.419, "full": 1.925}}
NOTES = [
    "GB/s: u and delta read + y written (fp32 on GPU), once, over the median time; B, C, A and "
    "the per-channel vectors are small beside them (mamba_ssm writes y in bf16: a bit less).",
    f"anchor {ANCHOR_LABEL}: VMamba's oflex kernel (selective_scan_cuda_oflex) at the "
    "same sizes and dtypes; vs anchor = anchor ms / measured ms.",
    "The reference is a Python loop over L; on a GPU it is skipped (too slow to matter).",
]


def scan_inputs(batch, groups, dim, dstate, length, dtype, device):
    """u, delta (batch, K*D, L) and B, C (batch, K, N, L) in ``dtype``; A, D, delta_bias fp32."""
    channels = groups * dim
    return (torch.randn(batch, channels, length, device=device, dtype=dtype),
            (0.5 * torch.randn(batch, channels, length, device=device) - 4).to(dtype),
            -torch.rand(channels, dstate, device=device) - 0.5,
            torch.randn(batch, groups, dstate, length, device=device, dtype=dtype),
            torch.randn(batch, groups, dstate, length, device=device, dtype=dtype),
            torch.ones(channels, device=device),
            0.1 * torch.randn(channels, device=device))


def _mamba_ssm_provider() -> harness.Provider:
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return harness.Provider("mamba_ssm", None, "not installed")
    return harness.Provider("mamba_ssm", lambda u, dt, A, B, C, D, bias: selective_scan_fn(
        u, dt, A, B, C, D, delta_bias=bias, delta_softplus=True))


def _oflex_provider() -> harness.Provider:
    """Official VMamba's oflex kernel (selective_scan_cuda_oflex), called as VMamba's csms6s
    does: fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, nrows=1, oflex=True)[0]."""
    try:
        import selective_scan_cuda_oflex as oflex
    except ImportError:
        return harness.Provider("vmamba-oflex", None, "not installed")
    return harness.Provider("vmamba-oflex", lambda u, dt, A, B, C, D, bias: oflex.fwd(
        u, dt, A, B, C, D, bias, True, 1, True)[0])


def _scan(backend: str, out_float32: bool, last_state: bool = False):
    if last_state:  # (y only: the harness times one output; the state is written all the same)
        return lambda *inputs: ops.selective_scan(*inputs, delta_softplus=True,
                                                  out_float32=out_float32, backend=backend,
                                                  return_last_state=True)[0]
    return lambda *inputs: ops.selective_scan(*inputs, delta_softplus=True,
                                              out_float32=out_float32, backend=backend)


def cases(device: torch.device, quick: bool = False, reference: bool = False):
    kernel, gpu = device.type, device.type == "cuda"
    providers = [harness.pyssm_provider("selective_scan", kernel, _scan(kernel, gpu))]
    with_state = harness.pyssm_provider("selective_scan_with_state", kernel,
                                        _scan(kernel, gpu, last_state=True))
    providers.append(harness.Provider(f"{with_state.name}-last-state", with_state.fn,
                                      with_state.status))
    if gpu and not reference:
        providers.append(harness.Provider("reference", None, "skipped on a GPU (slow)"))
    else:
        providers.append(harness.Provider("reference", _scan("reference", gpu)))
    if gpu:
        # the backward with one channel a block (v1: every channel adds its own dB, dC atomics)
        v1 = harness.pyssm_provider("selective_scan", kernel, _scan(kernel, gpu))
        providers.append(harness.Provider("pyssm-cuda-bwd-v1", v1.fn, v1.status,
                                          modes=("full", "backward"),
                                          env={"PYSSM_SCAN_CHANNELS_PER_BLOCK": "1"}))
        providers += [_mamba_ssm_provider(), _oflex_provider()]
        groups, dim, dtype, sizes = 4, 96, torch.bfloat16, list(ANCHOR_MS)[: 1 if quick else 3]
    else:
        groups, dim, dtype = 4, 16, torch.float32
        sizes = [(2, 256), (2, 1024), (2, 4096)][: 2 if quick else 3]
    out = []
    for batch, length in sizes:
        elems = batch * groups * dim * length
        anchors = ANCHOR_MS.get((batch, length), {}) if gpu else {}
        out.append(harness.Case(
            op="selective_scan",
            size={"batch": batch, "L": length, "K": groups, "channels": groups * dim,
                  "d_state": 1},
            make_inputs=lambda b=batch, n=length: scan_inputs(b, groups, dim, 1, n, dtype, device),
            providers=providers, dtype=str(dtype).removeprefix("torch."),
            bytes={"forward": elems * (2 * dtype.itemsize + (4 if gpu else dtype.itemsize))},
            extra=lambda provider, mode, a=anchors: {"anchor_ms": a.get(mode)}))
    return out
