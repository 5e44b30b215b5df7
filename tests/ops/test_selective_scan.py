"""selective_scan against an independent float64 recurrence, forward and backward."""

import naive
import pytest
import torch
from conftest import backend_params

from pyssm import _extension, ops

F64 = torch.float64


def make_inputs(batch, groups, per_group, L, N, device, dtype=F64, with_D=True, with_bias=True,
                requires_grad=False):
    channels = groups * per_group
    u = torch.randn(batch, channels, L, dtype=dtype, device=device)
    delta = torch.randn(batch, channels, L, dtype=dtype, device=device) * 0.5
    A = -torch.rand(channels, N, dtype=torch.float32 if dtype != F64 else F64, device=device) - 0.1
    B = torch.randn(batch, groups, N, L, dtype=dtype, device=device)
    C = torch.randn(batch, groups, N, L, dtype=dtype, device=device)
    D = torch.randn(channels, dtype=A.dtype, device=device) if with_D else None
    bias = torch.randn(channels, dtype=A.dtype, device=device) * 0.5 if with_bias else None
    tensors = [u, delta, A, B, C, D, bias]
    if requires_grad:
        for t in tensors:
            if t is not None:
                t.requires_grad_()
    return tensors


CASES = [  # batch, groups K, channels per group, L, d_state N
    (1, 1, 1, 1, 1), (2, 1, 3, 17, 1), (1, 4, 3, 49, 1), (2, 4, 2, 9, 16), (3, 2, 5, 13, 4),
    (1, 4, 1, 197, 16),
]


@pytest.mark.parametrize("device,backend", backend_params("selective_scan"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}k{}d{}l{}n{}".format(*c))
@pytest.mark.parametrize("softplus", [True, False])
def test_forward_matches_recurrence(device, backend, case, softplus):
    inputs = make_inputs(*case, device=device, with_D=case[0] != 3, with_bias=case[2] != 5)
    out = ops.selective_scan(*inputs, delta_softplus=softplus, backend=backend)
    want = naive.selective_scan(*(t.cpu() if t is not None else None for t in inputs),
                                delta_softplus=softplus)
    assert out.dtype == F64 and out.shape == inputs[0].shape
    torch.testing.assert_close(out.cpu(), want, atol=1e-10, rtol=1e-10)


def assert_gradients_match_reference(inputs, backend):
    """Every gradient of the op equals the reference's autograd (float64 inputs)."""
    leaves = [t for t in inputs if t is not None]
    out = ops.selective_scan(*inputs, delta_softplus=True, backend=backend)
    ref = ops.selective_scan_reference(*inputs, delta_softplus=True)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    want = torch.autograd.grad(ref, leaves, g)
    names = [n for n, t in zip("u delta A B C D delta_bias".split(), inputs) if t is not None]
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=f"d{name}")


@pytest.mark.parametrize("device,backend", backend_params("selective_scan"))
@pytest.mark.parametrize("with_optional", [True, False])
def test_gradients_against_reference_autograd(device, backend, with_optional):
    assert_gradients_match_reference(
        make_inputs(2, 2, 3, 11, 4, device, with_D=with_optional, with_bias=with_optional,
                    requires_grad=True), backend)


@pytest.mark.parametrize("device,backend", [p for p in backend_params("selective_scan")
                                            if p.id == "cuda"])
@pytest.mark.parametrize("per_block", ["1", "3", "8", ""])
@pytest.mark.parametrize("case", [(2, 2, 11, 700, 1), (1, 3, 9, 40, 4), (2, 1, 5, 33, 16)],
                         ids=lambda c: "b{}k{}d{}l{}n{}".format(*c))
def test_cuda_backward_channels_per_block(device, backend, per_block, case, monkeypatch):
    """The CUDA backward sums dB and dC over a block's channels (PYSSM_SCAN_CHANNELS_PER_BLOCK,
    empty: its own choice; 1: one channel a block, v1): every choice, groups of channels that
    do not divide evenly, against the reference's gradients."""
    monkeypatch.setenv("PYSSM_SCAN_CHANNELS_PER_BLOCK", per_block)
    assert_gradients_match_reference(make_inputs(*case, device, requires_grad=True), backend)


@pytest.mark.parametrize("device,backend", backend_params("selective_scan"))
def test_gradcheck(device, backend):
    inputs = make_inputs(1, 2, 2, 5, 3, device, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: ops.selective_scan(*t, delta_softplus=True, backend=backend), tuple(inputs))


@pytest.mark.parametrize("device,backend", backend_params("selective_scan"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("out_float32", [False, True])
def test_low_precision_accumulates_in_fp32(device, backend, dtype, out_float32):
    inputs = make_inputs(2, 4, 3, 64, 1, device, dtype=dtype)
    out = ops.selective_scan(*inputs, delta_softplus=True, out_float32=out_float32,
                             backend=backend)
    assert out.dtype == (torch.float32 if out_float32 else dtype)
    exact = naive.selective_scan(*(t.cpu() for t in inputs), delta_softplus=True)
    err = (out.cpu().double() - exact).abs().max()
    # an fp32-accumulating scan is off from float64 by about one rounding of the output dtype
    rounding = (exact.to(out.dtype).double() - exact).abs().max()
    assert err <= 2 * rounding + 1e-4 * exact.abs().max(), (err, rounding)


@pytest.mark.parametrize("device,backend", backend_params("selective_scan"))
def test_noncontiguous_nan_and_empty(device, backend):
    u, delta, A, B, C, D, bias = make_inputs(2, 2, 3, 10, 2, device)
    u_nc = torch.randn(2, 10, 6, dtype=F64, device=device).transpose(1, 2)
    B_nc = torch.randn(2, 2, 10, 2, dtype=F64, device=device).transpose(2, 3)
    out = ops.selective_scan(u_nc, delta, A, B_nc, C, D, bias, True, backend=backend)
    want = naive.selective_scan(u_nc.cpu(), delta.cpu(), A.cpu(), B_nc.cpu(), C.cpu(), D.cpu(),
                                bias.cpu(), True)
    torch.testing.assert_close(out.cpu(), want, atol=1e-10, rtol=1e-10)
    u2 = u.clone()
    u2[1, 4, 3] = float("nan")
    out = ops.selective_scan(u2, delta, A, B, C, D, bias, True, backend=backend)
    assert out[1, 4, 3:].isnan().all() and not out[0].isnan().any() and not out[1, 4, :3].isnan().any()
    empty = make_inputs(0, 2, 3, 10, 2, device)
    assert ops.selective_scan(*empty, backend=backend).shape == (0, 6, 10)
    zero_len = make_inputs(2, 2, 3, 0, 2, device)
    assert ops.selective_scan(*zero_len, backend=backend).shape == (2, 6, 0)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_inputs(backend):
    u, delta, A, B, C, D, bias = make_inputs(2, 2, 3, 10, 2, "cpu")

    def call(**kw):
        args = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, delta_bias=bias)
        args.update(kw)
        return ops.selective_scan(**args, backend=backend)

    with pytest.raises(ValueError, match=r"delta must have shape \(2, 6, 10\)"):
        call(delta=delta[:, :, :9])
    with pytest.raises(ValueError, match=r"A must have shape \(6, 2\)"):
        call(A=A[:5])
    with pytest.raises(ValueError, match="B has 4 groups .* must be >= 1 and divide the 6 channels"):
        call(B=torch.randn(2, 4, 2, 10, dtype=F64), C=torch.randn(2, 4, 2, 10, dtype=F64))
    with pytest.raises(ValueError, match=r"C must have shape \(2, 2, 2, 10\)"):
        call(C=C[:, :, :1])
    with pytest.raises(ValueError, match=r"B must have 4 dimensions \(batch, K, N, L\)"):
        call(B=B[:, 0])
    with pytest.raises(ValueError, match=r"D must have shape \(6,\)"):
        call(D=D[:4])
    with pytest.raises(ValueError, match=r"delta_bias must have shape \(6,\)"):
        call(delta_bias=bias[None])
    with pytest.raises(TypeError, match="u must be a floating-point tensor"):
        call(u=u.long())
    with pytest.raises(ValueError, match=r"u must have 3 dimensions"):
        call(u=u[0])


def test_direct_op_call_checks_too():
    if not _extension.available():
        pytest.skip("extension not built")
    u, delta, A, B, C, D, bias = make_inputs(2, 2, 3, 10, 2, "cpu")
    with pytest.raises(ValueError, match="B has 4 groups"):
        torch.ops.pyssm.selective_scan(u, delta, A, torch.randn(2, 4, 2, 10, dtype=F64),
                                       torch.randn(2, 4, 2, 10, dtype=F64), D, bias, True, False)
    with pytest.raises(ValueError, match=r"A must have shape \[6, 2\]"):
        torch.ops.pyssm.selective_scan(u, delta, A[:5], B, C, D, bias, True, False)


@pytest.mark.parametrize("device,backend", [p for p in backend_params("selective_scan")
                                            if p.values[1] != "reference"])
@pytest.mark.parametrize("with_optional", [True, False])
def test_opcheck(device, backend, with_optional):
    inputs = make_inputs(2, 2, 3, 7, 2, device, with_D=with_optional, with_bias=with_optional,
                         requires_grad=True)
    torch.library.opcheck(torch.ops.pyssm.selective_scan.default, (*inputs, True, False))


@pytest.mark.slow
@pytest.mark.parametrize("device,backend", [p for p in backend_params("selective_scan")
                                            if p.values[1] != "reference"])
@pytest.mark.parametrize("last_state", [False, True])
def test_compile_fullgraph(device, backend, last_state):
    """y, and with return_last_state (selective_scan_with_state) y and the state combined."""
    inputs = make_inputs(2, 2, 3, 7, 2, device, requires_grad=True)

    def f(*t):
        out = ops.selective_scan(*t, delta_softplus=True, return_last_state=last_state,
                                 backend=backend)
        return out[0].sum(-1, keepdim=True) * out[1] if last_state else out

    compiled = torch.compile(f, fullgraph=True)
    out = compiled(*inputs)
    torch.testing.assert_close(out, f(*inputs))
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(f(*inputs), inputs, g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device,backend", backend_params("selective_scan"))
def test_gradients_match_independent_math(device, backend):
    """Gradients of the op against autograd through the independent float64 recurrence."""
    inputs = make_inputs(2, 2, 2, 7, 3, device, requires_grad=True)
    out = ops.selective_scan(*inputs, delta_softplus=True, backend=backend)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, g)
    cpu_inputs = [t.detach().cpu().requires_grad_() for t in inputs]
    want = torch.autograd.grad(naive.selective_scan(*cpu_inputs, delta_softplus=True), cpu_inputs,
                               g.cpu())
    for name, a, b in zip("u delta A B C D delta_bias".split(), got, want):
        torch.testing.assert_close(a.cpu(), b, atol=1e-10, rtol=1e-10, msg=f"d{name}")


LONG_CASES = [  # lengths past one CUDA tile (512 positions): carries between tiles, ragged ends
    (1, 1, 2, 513, 1), (2, 4, 3, 1300, 5), (1, 2, 2, 4099, 16), (1, 1, 1, 1024, 2),
]


@pytest.mark.parametrize("device,backend", [p for p in backend_params("selective_scan")
                                            if p.id == "cuda"])
@pytest.mark.parametrize("case", LONG_CASES, ids=lambda c: "b{}k{}d{}l{}n{}".format(*c))
def test_long_sequences_forward_and_backward(device, backend, case):
    """CUDA: forward and every gradient at lengths that span several tiles of the kernel,
    against the float64 CPU kernel (itself checked against independent math above)."""
    inputs = make_inputs(*case, device=device, requires_grad=True)
    out = ops.selective_scan(*inputs, delta_softplus=True, backend=backend)
    cpu_inputs = [t.detach().cpu().requires_grad_() for t in inputs]
    want = ops.selective_scan(*cpu_inputs, delta_softplus=True, backend="cpu")
    torch.testing.assert_close(out.detach().cpu(), want.detach(), atol=1e-9, rtol=1e-9)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, g)
    expect = torch.autograd.grad(want, cpu_inputs, g.cpu())
    for name, a, b in zip("u delta A B C D delta_bias".split(), got, expect):
        torch.testing.assert_close(a.cpu(), b, atol=1e-8, rtol=1e-8, msg=f"d{name}")


# return_last_state: selective_scan_with_state ------------------------------------------------

STATE_CASES = [(1, 1, 1, 1, 1), (2, 1, 3, 17, 1), (2, 4, 2, 9, 16), (3, 2, 5, 13, 4)]


@pytest.mark.parametrize("device,backend", backend_params("selective_scan_with_state"))
@pytest.mark.parametrize("case", STATE_CASES, ids=lambda c: "b{}k{}d{}l{}n{}".format(*c))
def test_last_state_matches_recurrence(device, backend, case):
    """The state after the last position, beside the same y, against the float64 recurrence."""
    inputs = make_inputs(*case, device=device)
    y, last = ops.selective_scan(*inputs, delta_softplus=True, return_last_state=True,
                                 backend=backend)
    want_y, want_last = naive.selective_scan(*(t.cpu() for t in inputs), delta_softplus=True,
                                             return_last_state=True)
    batch, groups, per_group, _, N = case
    assert last.shape == (batch, groups * per_group, N) and last.dtype == F64
    torch.testing.assert_close(y.cpu(), want_y, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(last.cpu(), want_last, atol=1e-10, rtol=1e-10)
    # y is the plain op's
    torch.testing.assert_close(y, ops.selective_scan(*inputs, delta_softplus=True,
                                                     backend=backend), atol=0, rtol=0)


@pytest.mark.parametrize("device,backend", backend_params("selective_scan_with_state"))
@pytest.mark.parametrize("used", ["both", "state", "y"])
def test_last_state_gradients_match_independent_math(device, backend, used):
    """Gradients through y and the last state together, through the state alone (y's gradient
    zero) and through y alone, against autograd through the float64 recurrence."""
    inputs = make_inputs(2, 2, 3, 11, 4, device, requires_grad=True)
    y, last = ops.selective_scan(*inputs, delta_softplus=True, return_last_state=True,
                                 backend=backend)
    cpu_inputs = [t.detach().cpu().requires_grad_() for t in inputs]
    want_y, want_last = naive.selective_scan(*cpu_inputs, delta_softplus=True,
                                             return_last_state=True)
    gy, glast = torch.randn_like(y), torch.randn_like(last)
    pairs = {"both": ([y, last], [want_y, want_last], [gy, glast]),
             "state": ([last], [want_last], [glast]), "y": ([y], [want_y], [gy])}[used]
    # (the state alone does not depend on C or D: their gradients are 0, None from autograd
    # through the references)
    got = torch.autograd.grad(pairs[0], inputs, pairs[2], allow_unused=True)
    got = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, got)]
    want = torch.autograd.grad(pairs[1], cpu_inputs, [g.cpu() for g in pairs[2]],
                               allow_unused=True)
    want = [torch.zeros_like(t) if w is None else w for t, w in zip(cpu_inputs, want)]
    for name, a, b in zip("u delta A B C D delta_bias".split(), got, want):
        torch.testing.assert_close(a.cpu(), b, atol=1e-10, rtol=1e-10, msg=f"d{name}")


@pytest.mark.parametrize("device,backend", backend_params("selective_scan_with_state"))
def test_last_state_gradcheck(device, backend):
    inputs = make_inputs(1, 2, 2, 5, 3, device, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: ops.selective_scan(*t, delta_softplus=True, return_last_state=True,
                                      backend=backend), tuple(inputs))


@pytest.mark.parametrize("device,backend", backend_params("selective_scan_with_state"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_last_state_in_the_accumulation_dtype(device, backend, dtype):
    """16-bit and float32 inputs: the state comes in float32, y in u's dtype (or float32)."""
    inputs = make_inputs(2, 4, 3, 64, 1, device, dtype=dtype)
    y, last = ops.selective_scan(*inputs, delta_softplus=True, return_last_state=True,
                                 backend=backend)
    assert y.dtype == dtype and last.dtype == torch.float32
    _, exact = naive.selective_scan(*(t.cpu() for t in inputs), delta_softplus=True,
                                    return_last_state=True)
    err = (last.cpu().double() - exact).abs().max()
    assert err <= 1e-5 * exact.abs().max(), err
    y32, _ = ops.selective_scan(*inputs, delta_softplus=True, out_float32=True,
                                return_last_state=True, backend=backend)
    assert y32.dtype == torch.float32


@pytest.mark.parametrize("device,backend", backend_params("selective_scan_with_state"))
def test_last_state_of_empty_scans(device, backend):
    """No positions: the state is the initial 0; no rows: an empty state."""
    zero_len = make_inputs(2, 2, 3, 0, 2, device, requires_grad=True)
    y, last = ops.selective_scan(*zero_len, return_last_state=True, backend=backend)
    assert y.shape == (2, 6, 0) and last.shape == (2, 6, 2)
    assert torch.equal(last, torch.zeros_like(last))
    if last.requires_grad:  # (the kernels' op; the reference's zeros hang on nothing)
        dA, = torch.autograd.grad(last, [zero_len[2]], torch.ones_like(last))
        assert torch.equal(dA, torch.zeros_like(dA))  # nothing depends on A
    empty = make_inputs(0, 2, 3, 10, 2, device)
    y, last = ops.selective_scan(*empty, return_last_state=True, backend=backend)
    assert y.shape == (0, 6, 10) and last.shape == (0, 6, 2)


@pytest.mark.parametrize("device,backend", [p for p in backend_params("selective_scan_with_state")
                                            if p.id == "cuda"])
@pytest.mark.parametrize("case", LONG_CASES, ids=lambda c: "b{}k{}d{}l{}n{}".format(*c))
def test_last_state_long_sequences(device, backend, case):
    """CUDA: the state leaving the last of several tiles, and its gradient entering there,
    against the float64 CPU kernel."""
    inputs = make_inputs(*case, device=device, requires_grad=True)
    y, last = ops.selective_scan(*inputs, delta_softplus=True, return_last_state=True,
                                 backend=backend)
    cpu_inputs = [t.detach().cpu().requires_grad_() for t in inputs]
    want_y, want_last = ops.selective_scan(*cpu_inputs, delta_softplus=True,
                                           return_last_state=True, backend="cpu")
    torch.testing.assert_close(last.detach().cpu(), want_last.detach(), atol=1e-9, rtol=1e-9)
    gy, glast = torch.randn_like(y), torch.randn_like(last)
    got = torch.autograd.grad([y, last], inputs, [gy, glast])
    expect = torch.autograd.grad([want_y, want_last], cpu_inputs, [gy.cpu(), glast.cpu()])
    for name, a, b in zip("u delta A B C D delta_bias".split(), got, expect):
        torch.testing.assert_close(a.cpu(), b, atol=1e-8, rtol=1e-8, msg=f"d{name}")


def test_backward_checks_the_last_states_gradient():
    if not _extension.available():
        pytest.skip("extension not built")
    u, delta, A, B, C, D, bias = make_inputs(2, 2, 3, 10, 2, "cpu")
    with pytest.raises(ValueError, match=r"dlast_state must have shape \[2, 6, 2\]"):
        torch.ops.pyssm.selective_scan_backward(torch.randn_like(u), u, delta, A, B, C, D, bias,
                                                True, torch.randn(2, 6, 3, dtype=F64))


@pytest.mark.parametrize("device,backend", [p for p in backend_params("selective_scan_with_state")
                                            if p.values[1] != "reference"])
def test_last_state_opcheck(device, backend):
    inputs = make_inputs(2, 2, 3, 7, 2, device, requires_grad=True)
    torch.library.opcheck(torch.ops.pyssm.selective_scan_with_state.default,
                          (*inputs, True, False))
    dout = torch.randn(2, 6, 7, dtype=F64, device=device)
    dlast = torch.randn(2, 6, 2, dtype=F64, device=device)
    torch.library.opcheck(torch.ops.pyssm.selective_scan_backward.default,
                          (dout, *(t.detach() for t in inputs), True, dlast))
