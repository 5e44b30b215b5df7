"""mamba_ssm's selective_scan_fn and selective_state_update signatures on pyssm."""

import naive
import pytest
import torch
import torch.nn.functional as F

from pyssm.integrations.mamba_ssm import selective_scan_fn, selective_state_update

F64 = torch.float64


def inputs(batch=2, D=4, N=3, L=11):
    return (torch.randn(batch, D, L, dtype=F64), torch.randn(batch, D, L, dtype=F64) * 0.5,
            -torch.rand(D, N, dtype=F64) - 0.2)


@pytest.mark.parametrize("layout", ["batch_N_L", "batch_G_N_L", "D_N"])
def test_b_c_layouts_and_gate(layout):
    u, delta, A = inputs()
    batch, D, L = u.shape
    N = A.shape[1]
    if layout == "batch_N_L":
        B, C = torch.randn(batch, N, L, dtype=F64), torch.randn(batch, N, L, dtype=F64)
        Bg, Cg = B[:, None], C[:, None]
    elif layout == "batch_G_N_L":
        B, C = torch.randn(batch, 2, N, L, dtype=F64), torch.randn(batch, 2, N, L, dtype=F64)
        Bg, Cg = B, C
    else:  # fixed per channel: D groups of one channel each
        B, C = torch.randn(D, N, dtype=F64), torch.randn(D, N, dtype=F64)
        Bg = B[None, :, :, None].expand(batch, D, N, L)
        Cg = C[None, :, :, None].expand(batch, D, N, L)
    Dv, z, bias = torch.randn(D, dtype=F64), torch.randn(batch, D, L, dtype=F64), torch.randn(D, dtype=F64)
    out = selective_scan_fn(u, delta, A, B, C, Dv, z=z, delta_bias=bias, delta_softplus=True)
    want = naive.selective_scan(u, delta, A, Bg, Cg, Dv, bias, True) * F.silu(z)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    assert out.dtype == u.dtype


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_prefill_then_decode_steps_equal_the_whole_scan(backend):
    """mamba's generation: selective_scan_fn over a prefix with return_last_state, then
    selective_state_update one position at a time from that state, gives the outputs of one
    scan over the whole sequence (and its final state)."""
    batch, D, N, L, prefix = 2, 5, 3, 13, 7
    u, delta, A = inputs(batch, D, N, L)
    B, C = torch.randn(batch, N, L, dtype=F64), torch.randn(batch, N, L, dtype=F64)
    Dv, z, bias = (torch.randn(D, dtype=F64), torch.randn(batch, D, L, dtype=F64),
                   torch.randn(D, dtype=F64))
    whole, whole_state = selective_scan_fn(u, delta, A, B, C, Dv, z=z, delta_bias=bias,
                                           delta_softplus=True, return_last_state=True,
                                           backend=backend)
    want = naive.selective_scan(u, delta, A, B[:, None], C[:, None], Dv, bias, True) * F.silu(z)
    torch.testing.assert_close(whole, want, atol=1e-10, rtol=1e-10)
    out, state = selective_scan_fn(u[..., :prefix], delta[..., :prefix], A, B[..., :prefix],
                                   C[..., :prefix], Dv, z=z[..., :prefix], delta_bias=bias,
                                   delta_softplus=True, return_last_state=True, backend=backend)
    assert state.shape == (batch, D, N) and state.dtype == F64
    steps = [selective_state_update(state, u[..., t], delta[..., t], A, B[..., t], C[..., t],
                                    Dv, z=z[..., t], dt_bias=bias, dt_softplus=True)
             for t in range(prefix, L)]
    torch.testing.assert_close(torch.cat([out, torch.stack(steps, -1)], -1), want, atol=1e-10,
                               rtol=1e-10)
    torch.testing.assert_close(state, whole_state, atol=1e-10, rtol=1e-10)


def test_decode_step_with_heads_groups_and_a_cache():
    """The heads layout (state (batch, H, D, N), B and C per group of heads) and
    state_batch_indices (the rows of a larger cache): each head against its own step in the
    plain layout, the cache's other rows untouched."""
    batch, H, G, D, N = 2, 4, 2, 3, 5
    cache = torch.randn(5, H, D, N, dtype=F64)
    rows = torch.tensor([3, 1])
    x, dt, z = (torch.randn(batch, H, D, dtype=F64) for _ in range(3))
    A = -torch.rand(H, D, N, dtype=F64)
    B, C = torch.randn(batch, G, N, dtype=F64), torch.randn(batch, G, N, dtype=F64)
    Dv, bias = torch.randn(H, D, dtype=F64), torch.randn(H, D, dtype=F64)
    before = cache.clone()
    out = selective_state_update(cache, x, dt, A, B, C, Dv, z=z, dt_bias=bias, dt_softplus=True,
                                 state_batch_indices=rows)
    assert out.shape == (batch, H, D)
    for h in range(H):
        g = h // (H // G)
        state = before[rows, h].clone()
        want = selective_state_update(state, x[:, h], dt[:, h], A[h], B[:, g], C[:, g], Dv[h],
                                      z=z[:, h], dt_bias=bias[h], dt_softplus=True)
        torch.testing.assert_close(out[:, h], want, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(cache[rows, h], state, atol=1e-12, rtol=1e-12)
    others = torch.tensor([0, 2, 4])
    assert torch.equal(cache[others], before[others])


def test_decode_step_against_the_recurrence_in_low_precision():
    """A bf16 step: computed in float32 from the float32 state, one rounding of the output."""
    batch, D, N = 3, 6, 4
    g = torch.Generator().manual_seed(5)
    state = torch.randn(batch, D, N, generator=g)
    x, dt = (torch.randn(batch, D, generator=g).bfloat16() for _ in range(2))
    A = -torch.rand(D, N, generator=g)
    B, C = (torch.randn(batch, N, generator=g).bfloat16() for _ in range(2))
    exact_state = state.double()
    step = F.softplus(dt.double(), threshold=30.0)
    exact_state = (torch.exp(step[..., None] * A.double()) * exact_state
                   + (step * x.double())[..., None] * B.double()[:, None])
    exact = (exact_state * C.double()[:, None]).sum(-1)
    out = selective_state_update(state, x, dt, A, B, C, dt_softplus=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(state.double(), exact_state, atol=1e-5, rtol=1e-5)
    # one rounding to bf16 (a relative 2^-9 at most) over float32 arithmetic
    torch.testing.assert_close(out.double(), exact, rtol=2.0 ** -8, atol=1e-5)


def test_decode_step_bad_shapes_say_which():
    state, x = torch.randn(2, 4, 3), torch.randn(2, 4)
    A, B = -torch.rand(4, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"state must be \(batch, D, N\)"):
        selective_state_update(state[:, :3], x, x, A, B, B)
    with pytest.raises(ValueError, match="A must be"):
        selective_state_update(state, x, x, A[:3], B, B)
    with pytest.raises(ValueError, match="dt must have the shape of x"):
        selective_state_update(state, x, x[:1], A, B, B)
    with pytest.raises(ValueError, match="C must be"):
        selective_state_update(state, x, x, A, B, B[:, :2])
    with pytest.raises(ValueError, match="D must be"):
        selective_state_update(state, x, x, A, B, B, D=torch.randn(3))
    with pytest.raises(ValueError, match="G dividing H"):
        selective_state_update(torch.randn(2, 4, 4, 3), torch.randn(2, 4, 4), torch.randn(2, 4, 4),
                               -torch.rand(4, 4, 3), torch.randn(2, 3, 3), torch.randn(2, 3, 3))


def test_unsupported_parts_say_so():
    u, delta, A = inputs()
    B = torch.randn(2, 3, 11, dtype=F64)
    with pytest.raises(NotImplementedError, match="complex"):
        selective_scan_fn(u, delta, A.to(torch.complex128), B, B)
    with pytest.raises(ValueError, match="z must have the shape of u"):
        selective_scan_fn(u, delta, A, B, B, z=u[:, :2])
