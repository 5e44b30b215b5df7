"""The bound the Triton ops' tests hold a result to: within twice the error torch's own ops make
in the same dtypes (the op's ``<op>_reference``), against a float64 result, plus a floor of
float32 rounding; and the same for every gradient under one random cotangent."""

from __future__ import annotations

import torch


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference of a (any device and dtype) from b (float64 on the CPU)."""
    return (a.detach().cpu().double() - b).abs().max().item() if a.numel() else 0.0


def assert_within_twice_torchs(got, own, exact, leaves, leaves64, grad_rel: float = 1e-5):
    """got (the op), own (its reference in the same dtypes) and exact (float64, from leaves64,
    float64 copies of leaves): the values, then the gradients to ``leaves`` of all three
    against one random cotangent; ``grad_rel``: the gradients' floor relative to their size."""
    assert torch.isfinite(got).all()
    assert err(got, exact) <= 2 * err(own, exact) + 1e-5 * (1 + exact.abs().max().item())
    cot = torch.randn(exact.shape, generator=torch.Generator().manual_seed(1)).double()
    want = torch.autograd.grad((exact * cot).sum(), leaves64)
    got_g = torch.autograd.grad((got.double().cpu() * cot).sum(), leaves)
    own_g = torch.autograd.grad((own.double().cpu() * cot).sum(), leaves)
    for g, o, e, leaf in zip(got_g, own_g, want, leaves):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        assert torch.isfinite(g).all()
        assert err(g, e) <= 2 * err(o, e) + grad_rel * (1 + e.abs().max().item())


def as_multiplied(t64, dtype):
    """A float64 weight or bias as a linear op multiplies it for x of ``dtype``: rounded to a
    16-bit x's dtype (as autocast rounds F.linear's), its gradient passed through unchanged."""
    if t64 is None or dtype not in (torch.float16, torch.bfloat16):
        return t64
    return t64 + (t64.to(dtype).double() - t64).detach()


def multiplied64(t, dtype):
    """A weight or bias of any dtype and device as a linear op multiplies it for x of
    ``dtype``, in float64 on the CPU (``as_multiplied`` of its float64 copy); None stays None."""
    return None if t is None else as_multiplied(t.detach().cpu().double(), dtype)
