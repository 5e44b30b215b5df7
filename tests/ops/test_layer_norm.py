"""layer_norm (residual add + LayerNorm + GELU + output cast) against float64, on the Triton kernels
(compiled on a GPU; Triton's interpreter on CPU tensors elsewhere) and the reference."""

import os

import pytest
import torch
from triton_params import PARAMS

from pyssm.ops import layer_norm_triton
from pyssm.ops.layer_norm import layer_norm, layer_norm_reference

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


# (rows, N): odd row counts, N below, at and above a power of two, VMamba's and ViT's widths
SHAPES = [((1,), 1), ((37,), 7), ((3, 5, 7), 96), ((2, 13), 130), ((9,), 768), ((3,), 1000)]


def _inputs(lead, n, device, dtype, res_dtype, affine, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n, generator=g).to(dtype).to(device)
    r = None
    if res_dtype is not None:
        r = (torch.randn(*lead, n, generator=g) * 2 + 0.5).to(res_dtype).to(device)
    w = (torch.randn(n, generator=g) * 0.5 + 1).to(device) if affine else None
    b = (torch.randn(n, generator=g) * 0.1).to(device) if affine else None
    return x, r, w, b


def _f64(t):
    return None if t is None else t.detach().cpu().double()


def _err(a, b):
    return (a.detach().cpu().double() - b).abs().max().item() if a.numel() else 0.0


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("lead,n", SHAPES)
@pytest.mark.parametrize("dtype,res_dtype,out_dtype,activation",
                         [(FP32, None, None, None), (BF16, FP32, BF16, None),
                          (FP16, FP16, None, None), (BF16, BF16, FP32, None),
                          (FP32, FP32, FP16, None),
                          # VMamba's stem (bf16 conv output in, bf16 for the next conv out)
                          (BF16, None, BF16, "gelu"), (FP32, None, None, "gelu"),
                          (FP16, FP32, FP32, "gelu")])
@pytest.mark.parametrize("affine", [True, False])
def test_forward_and_gradients_against_float64(device, backend, lead, n, dtype, res_dtype,
                                               out_dtype, activation, affine):
    x, r, w, b = _inputs(lead, n, device, dtype, res_dtype, affine)
    leaves = [t.requires_grad_() for t in (x, r, w, b) if t is not None]
    kw = dict(residual=r, out_dtype=out_dtype, return_residual=r is not None,
              activation=activation)
    got = layer_norm(x, w, b, 1e-5, backend=backend, **kw)
    torch_own = layer_norm_reference(x, w, b, 1e-5, **kw)  # torch's ops in the same dtypes
    exact = layer_norm_reference(_f64(x), _f64(w), _f64(b), 1e-5, residual=_f64(r),
                                 return_residual=r is not None, activation=activation)
    got, torch_own, exact = [v if isinstance(v, tuple) else (v,) for v in (got, torch_own, exact)]
    want_dtype = out_dtype or (x.dtype if r is None else torch.promote_types(x.dtype, r.dtype))
    assert got[0].dtype == want_dtype and got[0].shape == x.shape
    for g, t, e in zip(got, torch_own, exact):
        assert torch.isfinite(g).all()
        # at most 2x torch's own error in the same dtypes, plus a floor of float32 rounding
        assert _err(g, e) <= 2 * _err(t, e) + 1e-5 * (1 + e.abs().max().item())
    # gradients: a random cotangent for every output, float64 autograd through the reference
    cot = [torch.randn(v.shape, generator=torch.Generator().manual_seed(1)).double() for v in exact]
    inputs64 = [_f64(t).requires_grad_() for t in (x, r, w, b) if t is not None]
    it = iter(inputs64)
    x64, r64, w64, b64 = [next(it) if t is not None else None for t in (x, r, w, b)]
    exact = layer_norm_reference(x64, w64, b64, 1e-5, residual=r64, return_residual=r is not None,
                                 activation=activation)
    exact = exact if isinstance(exact, tuple) else (exact,)
    want = torch.autograd.grad(sum((o * c).sum() for o, c in zip(exact, cot)), inputs64)

    def grads(outs):
        return torch.autograd.grad(
            sum((o.double().cpu() * c).sum() for o, c in zip(outs, cot)), leaves)

    got_g = grads(got)
    own_g = grads(torch_own)
    for g, t, e, leaf in zip(got_g, own_g, want, leaves):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        assert torch.isfinite(g).all()
        assert _err(g, e) <= 2 * _err(t, e) + 1e-5 * (1 + e.abs().max().item())


@pytest.mark.parametrize("device,backend", PARAMS)
def test_large_offsets_stay_accurate(device, backend):
    """Rows of mean 1e4 and spread 1 (normalising them subtracts a large mean) and rows of
    magnitude 1e4: finite and accurate."""
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(5, 96, generator=g) + 1e4, torch.randn(5, 96, generator=g) * 1e4])
    w = torch.randn(96, generator=g)
    got = layer_norm(x.to(device).requires_grad_(), w.to(device), None, backend=backend)
    exact = layer_norm_reference(x.double(), w.double())
    assert torch.isfinite(got).all()
    assert _err(got, exact) < 2e-3 * (1 + exact.abs().max().item())


@pytest.mark.parametrize("device,backend", PARAMS)
def test_empty_rows_and_layouts(device, backend):
    w = torch.randn(6, device=device)
    empty = layer_norm(torch.randn(0, 6, device=device), w, backend=backend)
    assert empty.shape == (0, 6)
    # a channels-last (B, C, H, W) tensor permuted to (B, H, W, C): a view, not a copy
    x = torch.randn(2, 6, 5, 3, device=device).contiguous(memory_format=torch.channels_last)
    xl = x.permute(0, 2, 3, 1)
    got = layer_norm(xl, w, backend=backend).permute(0, 3, 1, 2)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.cpu().double(),
                               layer_norm_reference(_f64(xl), _f64(w)).permute(0, 3, 1, 2),
                               atol=1e-5, rtol=1e-5)
    # a transposed (non-unit-stride) input
    xt = torch.randn(6, 9, device=device).t()
    torch.testing.assert_close(layer_norm(xt, backend=backend).cpu().double(),
                               layer_norm_reference(_f64(xt)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,backend", PARAMS[::2])
def test_deterministic(device, backend):
    """No atomics: the weight and bias gradients are per-program partial sums added by torch."""
    x, r, w, b = _inputs((300,), 96, device, BF16, FP32, True, seed=5)
    outs = []
    for _ in range(2):
        leaves = [t.detach().requires_grad_() for t in (x, r, w, b)]
        y, s = layer_norm(leaves[0], leaves[2], leaves[3], residual=leaves[1],
                          return_residual=True, backend=backend)
        outs.append((y, s, *torch.autograd.grad((y.float() ** 2).sum() + s.sum(), leaves)))
    for a, c in zip(*outs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("device,backend", PARAMS[::2])
def test_opcheck_and_compile(device, backend):
    x, r, w, b = _inputs((7,), 10, device, BF16, FP32, True)
    x, r, w, b = (t.requires_grad_() for t in (x, r, w, b))
    for args in ((x, r, w, b, 1e-5, BF16, True, False), (x, None, w, None, 1e-6, FP32, False, False),
                 (x, None, w, b, 1e-5, BF16, False, True), (x, r, None, None, 1e-5, FP32, True, True)):
        torch.library.opcheck(torch.ops.pyssm.layer_norm_triton.default, args)

    def fn(x, r):
        y, s = layer_norm(x, w, b, residual=r, out_dtype=BF16, return_residual=True,
                          backend=backend)
        return y.float().sum() + s.sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, r), fn(x, r))


@pytest.mark.parametrize("backend", [None, "triton", "reference"])
def test_bad_arguments(backend):
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="weight must have shape"):
        layer_norm(x, torch.ones(5), backend=backend)
    with pytest.raises(ValueError, match="residual must have shape"):
        layer_norm(x, residual=torch.ones(4, 5), backend=backend)
    with pytest.raises(ValueError, match="return_residual=True needs a residual"):
        layer_norm(x, return_residual=True, backend=backend)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        layer_norm(x.long(), backend=backend)
    with pytest.raises(TypeError, match="out_dtype must be a floating-point dtype"):
        layer_norm(x, out_dtype=torch.int32, backend=backend)
    with pytest.raises(ValueError, match="activation must be None or 'gelu'"):
        layer_norm(x, activation="relu", backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        layer_norm(x, backend="cuda")


def test_triton_refuses_float64_and_auto_takes_the_reference():
    x = torch.randn(3, 4, dtype=torch.float64)
    if layer_norm_triton.available():
        with pytest.raises(TypeError, match="float64 runs on backend='reference'"):
            layer_norm(x, backend="triton")
    # automatic: the reference on CPU tensors, float64 included
    torch.testing.assert_close(layer_norm(x), layer_norm_reference(x))


@pytest.mark.skipif(not layer_norm_triton.available(), reason="no triton")
def test_kernels_compile_for_gpus_without_spills():
    """bench/triton_compile.py: the kernel variants layer_norm, depthwise_conv2d, linear_gelu,
    linear_residual_, mlp_gelu, mlp_residual_ and layer_norm_linear launch, compiled by Triton
    for sm_80 and sm_90 (no GPU needed), without register spills: the interpreter cannot catch
    a construct the GPU compiler rejects (it caught linear_gelu's module-level float
    constant)."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).parents[2] / "bench" / "triton_compile.py"
    run = subprocess.run([sys.executable, str(script), "--arch", "80,90"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # 2 archs x (5 widths x 2 dtypes x 2 layer_norm kernels + 2 stem widths x 2 dtypes x 2
    # layer_norm + GELU kernels + 4 channel counts x 2 dtypes x 3 + 4 fc1 shapes x 2 dtypes x
    # 3 (linear_gelu; mlp_gelu forward and backward) + 2 of those shapes in bf16 x 2 more
    # activations x 3 + 4 fc2 shapes x 2 dtypes + 5 mlp_residual shapes in bf16, 2 more
    # activations and one fp32 + 6 layer_norm_linear shapes in bf16 and one fp32 + 4
    # norm_mlp_residual shapes in bf16, 2 more activations, 2 fp32 and 2 bf16 outputs)
    assert run.stdout.count("| sm_") == 242


@pytest.mark.parametrize("device,backend", PARAMS[::2])
def test_saves_no_more_than_torch_for_backward(device, backend):
    """A bf16 branch into a float32 stream: the op keeps the float32 sum (what torch's
    LayerNorm keeps after torch's add), not both of its inputs."""
    x, r, w, b = _inputs((64,), 96, device, BF16, FP32, True)
    x, r, w, b = (t.requires_grad_() for t in (x, r, w, b))

    def saved_bytes(fn):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(total)

    ours = saved_bytes(lambda: layer_norm(x, w, b, residual=r, out_dtype=BF16,
                                          return_residual=True, backend=backend))
    theirs = saved_bytes(lambda: layer_norm(x, w, b, residual=r, out_dtype=BF16,
                                            return_residual=True, backend="reference"))
    assert 64 * 96 * 4 <= ours <= theirs
