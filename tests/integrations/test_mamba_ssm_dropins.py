"""mamba_ssm's selective_scan_fn signature on pyssm."""

import naive
import pytest
import torch
import torch.nn.functional as F

from pyssm.integrations.mamba_ssm import selective_scan_fn

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


def test_unsupported_parts_say_so():
    u, delta, A = inputs()
    B = torch.randn(2, 3, 11, dtype=F64)
    with pytest.raises(NotImplementedError, match="return_last_state"):
        selective_scan_fn(u, delta, A, B, B, return_last_state=True)
    with pytest.raises(NotImplementedError, match="complex"):
        selective_scan_fn(u, delta, A.to(torch.complex128), B, B)
    with pytest.raises(ValueError, match="z must have the shape of u"):
        selective_scan_fn(u, delta, A, B, B, z=u[:, :2])
