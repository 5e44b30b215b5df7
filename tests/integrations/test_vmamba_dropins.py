"""Official VMamba signatures (cross_scan_fn, cross_merge_fn, selective_scan_fn) on pyssm."""

import naive
import pytest
import torch

from pyssm.integrations import vmamba as pv

F64 = torch.float64


@pytest.mark.parametrize("scans", [0, 1, 2, 3])
@pytest.mark.parametrize("in_cf,out_cf", [(True, True), (True, False), (False, True),
                                          (False, False)])
@pytest.mark.parametrize("H,W", [(3, 5), (4, 4), (1, 7)])
def test_cross_scan_and_merge_layouts(scans, in_cf, out_cf, H, W):
    B, C = 2, 3
    x_cf = torch.randn(B, C, H, W, dtype=F64)
    x = x_cf if in_cf else x_cf.permute(0, 2, 3, 1).contiguous()
    ys = pv.cross_scan_fn(x, in_cf, out_cf, scans=scans)
    ys_cf = ys if out_cf else ys.permute(0, 2, 3, 1)            # -> (B, 4, C, L)
    assert ys_cf.shape == (B, 4, C, H * W)
    if scans == 0:  # the cross2d orders are DESIGN.md's table
        torch.testing.assert_close(ys_cf, naive.cross_scan(x_cf), atol=0, rtol=0)
    if scans == 1:
        assert all(torch.equal(ys_cf[:, k], x_cf.flatten(2)) for k in range(4))
    # merge is the adjoint of scan, and undoes it: merge(scan(x)) = 4 x
    y_cf = torch.randn(B, 4, C, H * W, dtype=F64)
    y_grid = y_cf.reshape(B, 4, C, H, W)
    y_in = y_grid if out_cf else y_grid.permute(0, 3, 4, 1, 2).contiguous()
    merged = pv.cross_merge_fn(y_in, in_cf, out_cf, scans=scans)
    merged_cf = merged if in_cf else merged.transpose(1, 2)    # -> (B, C, L)
    assert merged_cf.shape == (B, C, H * W)
    torch.testing.assert_close((ys_cf * y_cf).sum(), (x_cf.flatten(2) * merged_cf).sum())
    ys_grid = ys_cf.reshape(B, 4, C, H, W)
    back = pv.cross_merge_fn(ys_grid if out_cf else ys_grid.permute(0, 3, 4, 1, 2), in_cf,
                             out_cf, scans=scans)
    torch.testing.assert_close(back if in_cf else back.transpose(1, 2), 4 * x_cf.flatten(2))


@pytest.mark.parametrize("scans", [0, 2, 3])
def test_one_by_one_scans_each_copy_in_its_own_order(scans):
    B, C, H, W = 2, 3, 3, 5
    copies = torch.randn(B, 4, C, H, W, dtype=F64)
    ys = pv.cross_scan_fn(copies, one_by_one=True, scans=scans)
    for k in range(4):
        torch.testing.assert_close(ys[:, k], pv.cross_scan_fn(copies[:, k], scans=scans)[:, k])
    back = pv.cross_merge_fn(ys.reshape(B, 4, C, H, W), one_by_one=True, scans=scans)
    torch.testing.assert_close(back, copies.flatten(3))
    ys_last = pv.cross_scan_fn(copies.permute(0, 3, 4, 1, 2), in_channel_first=False,
                               out_channel_first=False, one_by_one=True, scans=scans)
    torch.testing.assert_close(ys_last, ys.permute(0, 3, 1, 2))


def test_fast_path_equals_torch_path_with_gradients():
    x = torch.randn(2, 3, 4, 6, dtype=F64, requires_grad=True)
    fast = pv.cross_scan_fn(x)
    slow = pv.cross_scan_fn(x, force_torch=True)
    torch.testing.assert_close(fast, slow)
    g = torch.randn_like(fast)
    torch.testing.assert_close(torch.autograd.grad(fast, x, g)[0], torch.autograd.grad(slow, x, g)[0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="scans must be one of"):
        pv.cross_scan_fn(torch.randn(1, 2, 3, 3), scans=4)
    with pytest.raises(ValueError, match=r"x must be \(B, C, H, W\)"):
        pv.cross_scan_fn(torch.randn(2, 3, 3))
    with pytest.raises(ValueError, match="4 directions"):
        pv.cross_merge_fn(torch.randn(1, 3, 2, 3, 3))


@pytest.mark.parametrize("oflex", [True, False])
def test_selective_scan_fn_matches_official_semantics(oflex):
    batch, K, D, N, L = 2, 4, 3, 1, 9
    u = torch.randn(batch, K * D, L, dtype=torch.bfloat16)
    delta = torch.randn(batch, K * D, L, dtype=torch.bfloat16)
    A = -torch.rand(K * D, N) - 0.5
    Bs, Cs = torch.randn(batch, K, N, L), torch.randn(batch, K, N, L)
    Ds, bias = torch.randn(K * D), torch.randn(K * D)
    out = pv.selective_scan_fn(u, delta, A, Bs, Cs, Ds, bias, True, oflex=oflex)
    assert out.dtype == (torch.float32 if oflex else torch.bfloat16)
    want = naive.selective_scan(u, delta, A, Bs, Cs, Ds, bias, delta_softplus=True)
    torch.testing.assert_close(out.double(), want, atol=1e-5 if oflex else 2e-2,
                               rtol=1e-5 if oflex else 2e-2)
    ref = pv.selective_scan_fn(u, delta, A, Bs, Cs, Ds, bias, True, oflex=oflex, backend="torch")
    torch.testing.assert_close(out, ref)
    single = pv.selective_scan_fn(u[:, :D], delta[:, :D], A[:D], Bs[:, 0], Cs[:, 0], oflex=True)
    assert single.shape == (batch, D, L)
