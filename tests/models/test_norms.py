"""The encoders' LayerNorms (pyssm.models.norms): nn.LayerNorm's results and dtypes, the fused
residual add, and the VMamba / ViT blocks with their norms on the Triton kernels (Triton's
interpreter on CPU tensors)."""

import os

import pytest
import torch
from torch import nn

from pyssm.models import create_encoder
from pyssm.models.norms import LayerNorm, LayerNorm2d, triton_backend
from pyssm.ops import layer_norm_triton

BACKENDS = [None, "reference", pytest.param("triton", marks=pytest.mark.skipif(
    not layer_norm_triton.available() or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="no triton, or triton imported without TRITON_INTERPRET=1 (CPU tensors)"))]


def _pair(n, seed=0):
    ours, theirs = LayerNorm(n, eps=1e-6), nn.LayerNorm(n, eps=1e-6)
    with torch.no_grad():
        theirs.weight.normal_(1, 0.2, generator=torch.Generator().manual_seed(seed))
        theirs.bias.normal_(0, 0.2, generator=torch.Generator().manual_seed(seed + 1))
    ours.load_state_dict(theirs.state_dict())  # same keys and shapes
    return ours, theirs


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_is_nn_layer_norm(backend):
    ours, theirs = _pair(24)
    ours.backend = backend
    x = torch.randn(3, 7, 24)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xb = x.bfloat16()
        want = theirs(xb)  # CPU autocast leaves LayerNorm in the input's dtype (CUDA: float32)
        got = ours(xb)
        assert got.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-2)
        # for a matrix product: the autocast dtype, the same values rounded once
        narrow = ours(xb, for_matmul=True)
        assert narrow.dtype == torch.bfloat16
        exact = theirs(xb.float())
        assert (narrow.float() - exact).abs().max() <= exact.abs().max() * 2 ** -8


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_fuses_the_residual(backend):
    ours, theirs = _pair(10)
    ours.backend = backend
    x = torch.randn(5, 10, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(5, 10, requires_grad=True)
    y, s = ours.add(x, r)
    assert s.dtype == torch.float32 and y.dtype == torch.float32
    s_want = x.float() + r
    torch.testing.assert_close(s, s_want)
    torch.testing.assert_close(y, theirs(s_want), atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad((y * y).sum() + s.sum(), (x, r))
    want = torch.autograd.grad((theirs(x.float() + r) ** 2).sum() + (x.float() + r).sum(),
                               (x, r))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_activation_gelu_is_gelu_of_the_norm(backend):
    """norm(x, activation="gelu") is F.gelu(nn.LayerNorm(x)), forward and gradients; for a
    matrix product under autocast, rounded once to the autocast dtype."""
    ours, theirs = _pair(12, seed=2)
    ours.backend = backend
    x = torch.randn(4, 5, 12, requires_grad=True)
    got = ours(x, activation="gelu")
    want = nn.functional.gelu(theirs(x))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    grads = [torch.autograd.grad((y * y).sum(), (x, ours.weight if y is got else theirs.weight,
                                                 ours.bias if y is got else theirs.bias))
             for y in (got, want)]
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        narrow = ours(x.bfloat16(), for_matmul=True, activation="gelu")
    exact = nn.functional.gelu(theirs(x.bfloat16().float())).detach()
    assert narrow.dtype == torch.bfloat16
    assert (narrow.float() - exact).abs().max() <= exact.abs().max() * 2 ** -8


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_2d_on_channels_last(backend):
    ours = LayerNorm2d(6)
    ours.backend = backend
    x = torch.randn(2, 6, 5, 3).contiguous(memory_format=torch.channels_last)
    r = torch.randn(2, 6, 5, 3).contiguous(memory_format=torch.channels_last)
    want = nn.functional.layer_norm((x + r).permute(0, 2, 3, 1), (6,)).permute(0, 3, 1, 2)
    y, s = ours.add(x, r)
    for t in (y, s, ours(x)):
        assert t.shape == x.shape and t.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, x + r)


def test_triton_backend_follows_the_model_backend():
    assert [triton_backend(b) for b in (None, "auto", "cpu", "reference", "cuda")] == [
        None, None, "reference", "reference", "triton"]


@pytest.mark.parametrize("name,size", [("vmamba_tiny_s1l8", 64), ("vmamba_tiny_vanilla", 64),
                                       ("vit_tiny_patch16", 48)])
def test_encoders_with_triton_ops_match_torch_ops(name, size):
    """A whole encoder, forward and parameter gradients, with every LayerNorm (and VMamba's
    depthwise convolutions) on the Triton kernels against the same model on torch's ops."""
    if not layer_norm_triton.available() or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("no triton, or triton imported without TRITON_INTERPRET=1 (CPU tensors)")
    torch.manual_seed(0)
    small = dict(depths=(1, 2, 1, 1), dims=16) if name.startswith("vmamba") else dict(depth=2)
    model = create_encoder(name, img_size=size, num_classes=10, **small)
    model.eval()  # no drop-path draws
    x = torch.randn(2, 3, size, size)
    results = []
    for backend in ("reference", "triton"):
        for m in model.modules():
            if isinstance(m, LayerNorm):
                m.backend = backend
            if hasattr(m, "conv_backend"):
                m.conv_backend = backend
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()
                                       if p.grad is not None}))
    (ref_out, ref_grads), (out, grads) = results
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    assert ref_grads.keys() == grads.keys()
    for k in ref_grads:
        scale = ref_grads[k].abs().max().item() + 1e-6
        assert (grads[k] - ref_grads[k]).abs().max().item() <= 1e-3 * scale, k
