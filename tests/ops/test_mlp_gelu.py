"""mlp_gelu (a whole MLP, fc1 -> exact GELU -> fc2, with its own backward) against float64, on
the Triton kernels (compiled on a GPU; Triton's interpreter on CPU tensors elsewhere) and the
reference. Uninitialised memory is NaN-filled (tests/conftest.py), so an element of a, h or da
the kernels leave unwritten fails."""

import pytest
import torch
import torch.nn.functional as F
from float64_bound import as_multiplied, assert_within_twice_torchs
from triton_params import PARAMS

from pyssm.ops import mlp_gelu_triton
from pyssm.ops.linear_gelu import activate
from pyssm.ops.mlp_gelu import mlp_gelu, mlp_gelu_reference

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# (leading dims of x, C, H, C2): one of each; odd sizes below a tile; the hidden layer over one
# 128 tile; C from 256 on (the backward's K step is C: the 64-wide step, a partial last one);
# rows over one 64 tile with a narrower output than input
SHAPES = [((1,), 1, 1, 1), ((3, 5), 7, 9, 7), ((2, 3), 24, 130, 24), ((3,), 300, 20, 300),
          ((1, 131), 33, 40, 17)]


def _inputs(lead, C, H, C2, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, C, generator=g).to(dtype).to(device)
    w1 = (torch.randn(H, C, generator=g) / C ** 0.5).to(device)
    b1 = (torch.randn(H, generator=g) * 0.5).to(device)
    w2 = (torch.randn(C2, H, generator=g) / H ** 0.5).to(device)
    b2 = (torch.randn(C2, generator=g) * 0.5).to(device)
    return x, w1, b1, w2, b2


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("lead,C,H,C2", SHAPES)
@pytest.mark.parametrize("dtype", [FP32, BF16, FP16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_and_gradients_against_float64(device, backend, lead, C, H, C2, dtype,
                                               with_bias):
    x, w1, b1, w2, b2 = _inputs(lead, C, H, C2, device, dtype)
    b1, b2 = (b1, b2) if with_bias else (None, None)
    leaves = [t.requires_grad_() for t in (x, w1, b1, w2, b2) if t is not None]
    got = mlp_gelu(x, w1, b1, w2, b2, backend=backend)
    own = mlp_gelu_reference(x, w1, b1, w2, b2)  # torch's ops, same roundings
    leaves64 = [t.detach().cpu().double().requires_grad_() for t in leaves]
    x64, w164 = leaves64[:2]
    b164, w264, b264 = leaves64[2:] if with_bias else (None, leaves64[2], None)
    h = F.gelu(F.linear(x64, as_multiplied(w164, dtype), as_multiplied(b164, dtype)))
    exact = F.linear(h, as_multiplied(w264, dtype), as_multiplied(b264, dtype))
    assert got.shape == (*lead, C2) and got.dtype == dtype
    assert_within_twice_torchs(got, own, exact, leaves, leaves64,
                               grad_rel=max(1e-5, torch.finfo(dtype).eps))


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("lead,C,H,C2", [SHAPES[1], SHAPES[2]])
@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("activation", ["gelu_tanh", "quick_gelu"])
def test_other_activations_against_float64(device, backend, lead, C, H, C2, dtype, activation):
    """SigLIP's tanh GELU and CLIP's quick GELU, forward and every gradient, as the exact
    GELU's are held."""
    x, w1, b1, w2, b2 = _inputs(lead, C, H, C2, device, dtype, seed=6)
    leaves = [t.requires_grad_() for t in (x, w1, b1, w2, b2)]
    got = mlp_gelu(x, w1, b1, w2, b2, activation=activation, backend=backend)
    own = mlp_gelu_reference(x, w1, b1, w2, b2, activation=activation)
    leaves64 = [t.detach().cpu().double().requires_grad_() for t in leaves]
    m = [as_multiplied(t, dtype) for t in leaves64[1:]]
    exact = F.linear(activate(F.linear(leaves64[0], m[0], m[1]), activation), m[2], m[3])
    assert_within_twice_torchs(got, own, exact, leaves, leaves64,
                               grad_rel=max(1e-5, torch.finfo(dtype).eps))


@pytest.mark.parametrize("device,backend", PARAMS[::2])
def test_backward_pass_rounds_da_once_and_sums_the_bias_grad(device, backend):
    """The backward pass alone: each da is the float64 (dy W2)_ij GELU'(a_ij) of the same bf16
    dy, W2 and a, rounded once to bf16 (within one bf16 ulp, as the float32 sum can move a value
    across a rounding boundary, and float32's own error), torch's two roundings (dh, then da)
    are never closer on the whole, and the bias gradient's row-tile sums are those of the
    float32 da."""
    g = torch.Generator().manual_seed(5)
    M, C, H = 70, 40, 96
    dy = torch.randn(M, C, generator=g).to(BF16)
    w2 = (torch.randn(C, H, generator=g) / H ** 0.5).to(BF16)
    a = (2 * torch.randn(M, H, generator=g)).to(BF16)
    da, db = mlp_gelu_triton.backward(dy.to(device), w2.to(device), a.to(device))
    assert da.dtype == BF16 and da.shape == (M, H)
    assert db.dtype == FP32 and db.shape == (2, H)  # (70 rows: two 64-row tiles)
    a64 = a.double().requires_grad_()
    (gelu_grad,) = torch.autograd.grad(F.gelu(a64).sum(), a64)
    dh = dy.double() @ w2.double()
    exact = dh * gelu_grad
    got = da.cpu().double()
    # one bf16 ulp, and float32's own error in the product and in GELU' (near its zero at
    # a = -0.75 the product is small and float32's absolute error is what is left)
    ulp = torch.finfo(BF16).eps * exact.abs().clamp_min(torch.finfo(BF16).tiny)
    fp32 = 4 * torch.finfo(FP32).eps * (dy.double().abs() @ w2.double().abs())
    assert ((got - exact).abs() <= ulp + fp32).all()
    twice = torch.ops.aten.gelu_backward(dh.to(BF16), a).double()
    assert (got - exact).abs().sum() < (twice - exact).abs().sum()
    # the bias gradient's tiles: rows 0-63 and 64-69 summed before rounding, float32's error
    tiles = torch.stack([exact[:64].sum(0), exact[64:].sum(0)])
    bound = 64 * torch.finfo(FP32).eps * (fp32.sum(0) + exact.abs().sum(0))
    assert ((db.cpu().double() - tiles).abs() <= bound).all()


@pytest.mark.parametrize("device,backend", PARAMS[::2])
def test_against_torchs_autocast_mlp(device, backend):
    """bf16 x, float32 parameters (an encoder's under autocast): the output and every gradient
    as close to float64 as fc1 -> GELU -> fc2 with torch's bf16 roundings (2x and a floor)."""
    x, w1, b1, w2, b2 = _inputs((2, 29), 48, 192, 48, device, BF16, seed=7)
    leaves = [t.requires_grad_() for t in (x, w1, b1, w2, b2)]
    got = mlp_gelu(x, w1, b1, w2, b2, backend=backend)
    r = [t.to(BF16) for t in (w1, b1, w2, b2)]  # autocast's casts, differentiable
    torchs = F.linear(F.gelu(F.linear(x, r[0], r[1])), r[2], r[3])
    leaves64 = [t.detach().cpu().double().requires_grad_() for t in leaves]
    m = [as_multiplied(t, BF16) for t in leaves64[1:]]
    exact = F.linear(F.gelu(F.linear(leaves64[0], m[0], m[1])), m[2], m[3])
    assert_within_twice_torchs(got, torchs, exact, leaves, leaves64,
                               grad_rel=torch.finfo(BF16).eps)


@pytest.mark.parametrize("device,backend", PARAMS[::2])
@pytest.mark.parametrize("wants", ["x", "weights", "fc2"])
def test_gradients_only_where_asked(device, backend, wants):
    """A frozen MLP (x's gradient alone), frozen input (the parameters'), or fc2 alone (the
    backward skips the products nobody asked for): those gradients, bit for bit the ones it
    gives when every gradient is asked for."""
    x, w1, b1, w2, b2 = _inputs((3, 7), 24, 40, 20, device, BF16, seed=8)
    every = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
    cot = torch.randn(3, 7, 20, device=device).to(BF16)
    want = torch.autograd.grad(mlp_gelu(*every, backend=backend), every, cot)
    asked = {"x": [0], "weights": [1, 2, 3, 4], "fc2": [3, 4]}[wants]
    leaves = [t.clone().requires_grad_(i in asked) for i, t in enumerate((x, w1, b1, w2, b2))]
    y = mlp_gelu(*leaves, backend=backend)
    got = torch.autograd.grad(y, [leaves[i] for i in asked], cot)
    for i, g in zip(asked, got):
        torch.testing.assert_close(g, want[i], rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", PARAMS[::2])
def test_strided_input_and_a_strided_cotangent(device, backend):
    """x read through its row stride; a cotangent that is not contiguous (a transpose's)."""
    x, w1, b1, w2, b2 = _inputs((6, 20), 24, 40, 24, device, BF16, seed=2)
    wide = torch.cat([x, x], dim=-1)[..., 24:]
    assert not wide.is_contiguous()
    w1.requires_grad_()
    want = mlp_gelu(x, w1, b1, w2, b2, backend=backend)
    torch.testing.assert_close(mlp_gelu(wide, w1, b1, w2, b2, backend=backend), want,
                               rtol=0, atol=0)
    cot = torch.randn(24, 6, 20, device=device).to(BF16).permute(1, 2, 0)
    (g,) = torch.autograd.grad(want, w1, cot)
    (g_contig,) = torch.autograd.grad(mlp_gelu(x, w1, b1, w2, b2, backend=backend), w1,
                                      cot.contiguous())
    torch.testing.assert_close(g, g_contig, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", PARAMS[::2])
def test_opcheck_and_compile(device, backend):
    x, w1, b1, w2, b2 = _inputs((3, 5), 16, 24, 8, device, BF16)
    x, w1, b1, w2, b2 = (t.requires_grad_() for t in (x, w1, b1, w2, b2))
    op = torch.ops.pyssm.mlp_gelu_triton.default
    torch.library.opcheck(op, (x.reshape(15, 16), w1, b1, w2, b2, "gelu"))
    torch.library.opcheck(op, (x.reshape(15, 16), w1, None, w2, None, "gelu_tanh"))

    def fn(x):
        return mlp_gelu(x, w1, b1, w2, b2, backend=backend).float().sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), fn(x))


@pytest.mark.parametrize("backend", [None, "triton", "reference"])
def test_bad_arguments(backend):
    x, w1, w2 = torch.randn(2, 5, 4), torch.randn(6, 4), torch.randn(3, 6)
    with pytest.raises(ValueError, match="x must have at least one dimension"):
        mlp_gelu(torch.tensor(1.0), w1, None, w2, None, backend=backend)
    with pytest.raises(ValueError, match=r"fc1_weight must have shape \(H, 4\)"):
        mlp_gelu(x, torch.randn(6, 3), None, w2, None, backend=backend)
    with pytest.raises(ValueError, match=r"fc2_weight must have shape \(C2, 6\)"):
        mlp_gelu(x, w1, None, torch.randn(3, 5), None, backend=backend)
    with pytest.raises(ValueError, match="fc2_weight must have 2 dimensions"):
        mlp_gelu(x, w1, None, torch.randn(3, 6, 1), None, backend=backend)
    with pytest.raises(ValueError, match="fc1_bias must have shape"):
        mlp_gelu(x, w1, torch.randn(5), w2, None, backend=backend)
    with pytest.raises(ValueError, match="fc2_bias must have shape"):
        mlp_gelu(x, w1, None, w2, torch.randn(6), backend=backend)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        mlp_gelu(x.long(), w1, None, w2, None, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        mlp_gelu(x, w1, None, w2, None, backend="cuda")
    with pytest.raises(ValueError, match="activation must be one of"):
        mlp_gelu(x, w1, None, w2, None, activation="silu", backend=backend)


def test_triton_refuses_float64_and_auto_takes_the_reference():
    x, w1, w2 = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4), torch.randn(2, 5)
    if mlp_gelu_triton.triton is not None:
        with pytest.raises(TypeError, match="float64 runs on backend='reference'"):
            mlp_gelu(x, w1, None, w2, None, backend="triton")
    want = F.gelu(x @ w1.double().t()) @ w2.double().t()
    torch.testing.assert_close(mlp_gelu(x, w1, None, w2, None), want)
