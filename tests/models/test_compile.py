"""The encoders under torch.compile(fullgraph=True): one graph per forward and backward (no graph
break, so no host synchronisation inside), the same outputs and gradients as eager."""

import pytest
import torch

import pyssm.models.vit  # noqa: F401  (registers the vit_* encoders)
from pyssm.models import create_encoder


@pytest.mark.slow
@pytest.mark.parametrize("name,kw", [
    ("vmamba_tiny_s1l8", dict(depths=(1, 1, 1, 1), dims=16)),
    ("vit_small_patch16", dict(depth=2)),
])
def test_encoder_compiles_to_one_graph(name, kw):
    torch.manual_seed(0)
    model = create_encoder(name, img_size=64, **kw).eval()  # eval: no drop-path draws
    x = torch.randn(2, 3, 64, 64)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")

    def run(m):
        out = m(x)
        grads = torch.autograd.grad(out.square().sum(), list(model.parameters()),
                                    allow_unused=True)
        return out.detach(), grads

    want_out, want_grads = run(model)
    got_out, got_grads = run(compiled)
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
