"""pyssm/bench/ss2d_module.py: the SS2D module's cases (the module run with the harness's copy
of its parameters, so that backward reaches them; the GPU cases listed without a GPU, with
the official module's times as anchors)."""

import torch

from pyssm.bench import harness, ss2d_module


def test_the_module_runs_on_the_given_parameters_and_backward_reaches_them():
    case = ss2d_module.cases(torch.device("cpu"), quick=True)[0]
    assert [p.name for p in case.providers] == ["pyssm"]
    x, *params = case.make_inputs()
    module = case.providers[0].fn.__self__.module
    assert x.shape == (2, 96, 8, 8) and x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(case.providers[0].fn(x, *params), module(x))
    params = [p.requires_grad_() for p in params]
    with torch.no_grad():  # other values in the copies: the output follows them
        params[0].mul_(2)
    out = case.providers[0].fn(x, *params)
    assert not torch.allclose(out, module(x))
    grads = torch.autograd.grad(out, params, torch.randn_like(out))
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert len(params) == len(list(module.parameters()))


def test_gpu_cases_list_without_a_gpu_with_the_official_times():
    cases = ss2d_module.cases(torch.device("cuda"), quick=True)
    assert [(c.size["model"], c.size["res"], c.size["batch"], c.size["d_inner"])
            for c in cases] == [("T", 224, 64, 96), ("S", 224, 64, 192)]
    assert [p.name for p in cases[0].providers] == ["pyssm", "pyssm-torch-glue"]
    assert cases[0].providers[1].env == {"PYSSM_TRITON": "0"}
    assert cases[0].extra("pyssm", "forward") == {"anchor_ms": 2.418}
    assert cases[1].extra("pyssm", "full") == {"anchor_ms": 12.730}
    assert len(ss2d_module.cases(torch.device("cuda"))) == 6


def test_rows_on_the_cpu():
    rows = harness.run_cases(ss2d_module.cases(torch.device("cpu"), quick=True),
                             torch.device("cpu"), warmup=1, repeats=2, budget_s=0.5)
    assert {(r["mode"], r["status"]) for r in rows} == {("forward", "ok"), ("backward", "ok"),
                                                       ("full", "ok")}
    assert all(r["ms"] > 0 for r in rows)
