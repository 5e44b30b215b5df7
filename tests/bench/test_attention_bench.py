"""pyssm/bench/attention.py's decoding, prefix-LM, vision-window and head_dim 256 rows: every
provider computes the same attention (so the table compares like with like), and the decoding
case's byte count is the used keys and values."""

import torch

from pyssm import ops
from pyssm.bench import attention, harness


def test_decode_providers_agree_on_the_cpu():
    (case,) = attention.decode_cases(torch.device("cpu"))
    q, k, v, used = case.make_inputs()
    assert used.tolist()[-1] == k.shape[1] and used.tolist()[0] < k.shape[1]
    outs = {p.name: p.fn(q, k, v, used) for p in case.providers if p.fn is not None}
    assert {"pyssm-gathered", "sdpa-default (masked)"} <= set(outs)
    want = outs["sdpa-default (masked)"]
    for name, out in outs.items():
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5, msg=name)
    keys = int(used.sum())
    assert case.bytes["forward"] == 2 * keys * k.shape[2] * k.shape[3] * k.element_size()


def test_prefix_providers_agree_on_the_cpu():
    (case,) = attention.prefix_cases(torch.device("cpu"))
    q, k, v = case.make_inputs()
    outs = {p.name: p.fn(q, k, v) for p in case.providers if p.fn is not None}
    assert set(outs) == {"pyssm-cpu", "pyssm-cpu-causal", "sdpa-default (masked)"}
    want = outs["sdpa-default (masked)"]
    torch.testing.assert_close(outs["pyssm-cpu"], want, atol=1e-5, rtol=1e-5)
    prefix = case.size["prefix"]   # (the causal floor differs in the prefix only)
    torch.testing.assert_close(outs["pyssm-cpu-causal"][:, prefix:], want[:, prefix:],
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outs["pyssm-cpu-causal"][:, :prefix], want[:, :prefix])


def test_vision_window_providers_agree_on_the_cpu():
    (case,) = attention.vision_window_cases(torch.device("cpu"))
    q, k, v, cu = case.make_inputs()
    outs = {p.name: p.fn(q, k, v, cu) for p in case.providers if p.fn is not None}
    assert set(outs) == {"pyssm-cpu", "pyssm-cpu-per-window", "sdpa-default (per window)"}
    want = outs["sdpa-default (per window)"]
    for name, out in outs.items():
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5, msg=name)
    # (windows, not one sequence: attention over all tokens differs)
    assert not torch.allclose(ops.attention(q[None], k[None], v[None])[0], want, atol=1e-3)


def test_hd256_providers_agree_on_the_cpu():
    """The pieces and the one piece (its budget set while it runs) against SDPA; the pieces
    really are several at the CPU row's size (a budget of the default 2^24 score elements)."""
    for quick in (True, False):
        (case,) = attention.hd256_cases(torch.device("cpu"), quick)
        q, k, v = case.make_inputs()
        outs = {}
        for p in case.providers:
            with harness.env_overrides(p.env):   # (as the harness measures it)
                outs[p.name] = p.fn(q, k, v)
        assert set(outs) == {"pyssm-cpu", "pyssm-cpu-one-piece", "sdpa-default (masked)"}
        for name, out in outs.items():
            torch.testing.assert_close(out, outs["sdpa-default (masked)"], atol=1e-5, rtol=1e-5,
                                       msg=name)
    assert case.size["heads"] * case.size["N"] ** 2 > 2 * (1 << 24)
