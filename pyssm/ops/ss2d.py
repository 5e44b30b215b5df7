"""ss2d: the fused SS2D core of VMamba v2 (DESIGN.md), with the official weight names/shapes
(D = d_inner, R = dt_rank, N = d_state):

    x_proj_weight (4, R + 2N, D), dt_projs_weight (4, D, R), dt_projs_bias (4, D),
    A_logs (4*D, N), Ds (4*D,)

For x (B, H, W, D), or (B, D, H, W) with ``channels_first=True``:

    z_k(p)       = x_proj_weight[k] @ x(p)  ->  dt_k(p) (R), B_k(p) (N), C_k(p) (N)
    delta_k,d(p) = dt_projs_weight[k, d] . dt_k(p)
    y            = cross_merge(selective_scan(cross_scan(x), delta, -exp(A_logs), B, C, Ds,
                                              dt_projs_bias, delta_softplus=True))

The output has the layout of the input: (B, H, W, D), or (B, D, H, W) when channels_first.
Memory: contiguous, except that a channels-first x stored channels-last (torch.channels_last,
as pyssm's VMamba runs) gives a channels-last output and gradient, so that neither side copies.
out_norm and out_proj of the official SS2D module are the encoder's, not this op's.
"""

from __future__ import annotations

import os

import torch

from pyssm import _extension
from pyssm.ops import _backend, _checks
from pyssm.ops.cross_merge import cross_merge_reference
from pyssm.ops.cross_scan import cross_scan_reference
from pyssm.ops.selective_scan import selective_scan_reference


def channels_last_out(x: torch.Tensor, channels_first: bool) -> bool:
    """Whether ss2d's output and x's gradient are stored channels-last (module docstring)."""
    return (channels_first and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last))


def _out_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last if channels_last else
                        torch.contiguous_format)


def ss2d_reference(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, *,
                   channels_first=False, out_float32=False):
    """Pure-PyTorch ss2d, composed from the reference ops. Same arguments as ss2d."""
    acc = _checks.acc_dtype(x.dtype)
    x_bdhw = (x if channels_first else x.permute(0, 3, 1, 2)).to(acc)
    batch, dim, H, W = x_bdhw.shape
    rank, dstate = dt_projs_weight.shape[2], A_logs.shape[1]
    xs = cross_scan_reference(x_bdhw)                                       # (B, 4, D, L)
    z = torch.einsum("kcd,bkdl->bkcl", x_proj_weight.to(acc), xs)           # (B, 4, R+2N, L)
    dt, Bs, Cs = torch.split(z, [rank, dstate, dstate], dim=2)
    delta = torch.einsum("kdr,bkrl->bkdl", dt_projs_weight.to(acc), dt)     # (B, 4, D, L)
    ys = selective_scan_reference(
        xs.reshape(batch, 4 * dim, H * W), delta.reshape(batch, 4 * dim, H * W),
        -torch.exp(A_logs.to(acc)), Bs, Cs, Ds.to(acc), dt_projs_bias.to(acc).reshape(-1),
        delta_softplus=True)
    y = cross_merge_reference(ys.reshape(batch, 4, dim, H, W)).reshape(batch, dim, H, W)
    if not channels_first:
        y = y.permute(0, 2, 3, 1)
    return _out_layout(y.to(torch.float32 if out_float32 else x.dtype),
                       channels_last_out(x, channels_first))


def check_ss2d(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
               channels_first) -> None:
    names = ("x", "x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds")
    tensors = (x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds)
    for t, name in zip(tensors, names):
        _checks.floating(t, name)
    _checks.rank(x, 4, "x", "(B, D, H, W) (channels_first)" if channels_first else "(B, H, W, D)")
    dim = x.shape[1] if channels_first else x.shape[3]
    _checks.rank(dt_projs_weight, 3, "dt_projs_weight", "(4, D, R)")
    rank = dt_projs_weight.shape[2]
    _checks.shape(dt_projs_weight, (4, dim, rank), "dt_projs_weight",
                  "(4, D, R) with D the channels of x")
    _checks.rank(A_logs, 2, "A_logs", "(4*D, N)")
    dstate = A_logs.shape[1]
    _checks.shape(A_logs, (4 * dim, dstate), "A_logs", "(4*D, N) with D the channels of x")
    _checks.shape(x_proj_weight, (4, rank + 2 * dstate, dim), "x_proj_weight",
                  "(4, R + 2N, D) with R from dt_projs_weight and N from A_logs")
    _checks.shape(dt_projs_bias, (4, dim), "dt_projs_bias", "(4, D)")
    _checks.shape(Ds, (4 * dim,), "Ds", "(4*D,)")
    for t, name in zip(tensors[1:], names[1:]):
        _checks.same_device(t, x, name, "x")


def keeps_states(*tensors: torch.Tensor) -> bool:
    """Whether ss2d runs as ``ss2d_with_states``: where autograd records a call (training),
    outside torch.compile (the states' shape depends on the kernel the device runs, which a fake
    cannot know), and PYSSM_SS2D_STATES is not 0 (read at each call; the benchmark's
    ``pyssm-cuda-no-states`` rows). The fused CUDA forward v3 then keeps the state entering
    every 64-position tile (B x 4 x D x L / 64 floats, 1/64 of its float32 output) and the
    backward starts its tiles from them instead of recomputing them in a summary pass."""
    return (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
            and not torch.compiler.is_compiling()
            and os.environ.get("PYSSM_SS2D_STATES", "") != "0")


def ss2d(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, *, channels_first=False,
         out_float32=False, backend=None):
    """The SS2D core of the module docstring; differentiable in x and every weight."""
    check_ss2d(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, channels_first)
    if _backend.resolve("ss2d", x.device, backend) == "reference":
        with _backend.without_autocast(x.device):
            return ss2d_reference(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                                  channels_first=channels_first, out_float32=out_float32)
    args = (x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds)
    if keeps_states(*args):
        return torch.ops.pyssm.ss2d_with_states(*args, channels_first, out_float32)[0]
    return torch.ops.pyssm.ss2d(*args, channels_first, out_float32)


if _extension.available():

    @torch.library.register_fake("pyssm::ss2d")
    def _ss2d_fake(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, channels_first,
                   out_float32):
        check_ss2d(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, channels_first)
        return _out_layout(x.new_empty(x.shape, dtype=torch.float32 if out_float32 else x.dtype),
                           channels_last_out(x, channels_first))

    @torch.library.register_fake("pyssm::ss2d_backward")
    def _ss2d_backward_fake(dout, x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                            channels_first, states=None):
        check_ss2d(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, channels_first)
        _checks.shape(dout, x.shape, "dout", "the shape of x")
        dx = _out_layout(x.new_empty(x.shape), channels_last_out(x, channels_first))
        return (dx, *(torch.empty_like(t, memory_format=torch.contiguous_format) for t in
                      (x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds)))

    def _ss2d_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:6])
        ctx.channels_first = inputs[6]

    def _ss2d_backward(ctx, grad):
        grads = torch.ops.pyssm.ss2d_backward(grad, *ctx.saved_tensors, ctx.channels_first)
        return (*grads, None, None)

    torch.library.register_autograd("pyssm::ss2d", _ss2d_backward, setup_context=_ss2d_setup)

    # ss2d_with_states has no fake: its states are (B, 4, ceil(H*W / 64), D) where the fused
    # CUDA forward keeps them and empty elsewhere, which only the kernel's own choice decides;
    # ss2d() does not call it under torch.compile (keeps_states)
    def _ss2d_states_setup(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(*inputs[:6], output[1])
        ctx.channels_first = inputs[6]

    def _ss2d_states_backward(ctx, grad, _grad_states):
        *saved, states = ctx.saved_tensors
        grads = torch.ops.pyssm.ss2d_backward(grad, *saved, ctx.channels_first, states)
        return (*grads, None, None)

    torch.library.register_autograd("pyssm::ss2d_with_states", _ss2d_states_backward,
                                    setup_context=_ss2d_states_setup)
