"""The encoders' blocks with the residual stream carried unsummed in training
(pyssm.models.residual): the same outputs and gradients as block by block, fewer stream adds
and gradient sums, and the block-by-block path wherever the pairs do not apply."""

from __future__ import annotations

import pytest
import torch
from dispatched import Dispatched
from triton_params import INTERPRETER

from pyssm.models import create_encoder
from pyssm.models import residual as residual_module
from pyssm.models.norms import LayerNorm

# (name, img_size, overrides, blocks): small models of each block kind; blocks, the block
# count, stages of VMamba (2, 1, 3, 1) so that a stage has one block and a stage several
CASES = [
    ("vit_tiny_patch16", 32, dict(depth=3, embed_dim=24, num_heads=2), 3),
    ("vmamba_tiny_s1l8", 64, dict(depths=(2, 1, 3, 1), dims=8), 7),
    ("vmamba_tiny_s1l8", 64, dict(depths=(2, 1, 3, 1), dims=8, norm="ln"), 7),
    ("vmamba_tiny_vanilla", 64, dict(depths=(2, 1, 3, 1), dims=8), 7),
]
IDS = ["vit", "vmamba-channel-first", "vmamba-channel-last", "vmamba-vanilla"]


def _model(name, size, overrides, dtype=torch.float64, drop_path=False):
    torch.manual_seed(0)
    # (VMamba's configs have stochastic depth: off unless asked for, so runs compare)
    kw = dict(drop_path_rate=0.3 if drop_path else 0.0) if name.startswith("vmamba") else {}
    model = create_encoder(name, img_size=size, num_classes=5, **overrides, **kw)
    return model.to(dtype).train()


def _spy(monkeypatch):
    """The blocks run unsummed: one entry a run_unsummed call, its block count."""
    runs = []
    real = residual_module.run_unsummed

    def spy(blocks, x, **kwargs):
        blocks = list(blocks)
        runs.append(len(blocks))
        return real(blocks, x, **kwargs)

    for module in ("pyssm.models.vit", "pyssm.models.vmamba"):
        monkeypatch.setattr(f"{module}.run_unsummed", spy)
    return runs


def _loss_and_grads(model, x):
    x = x.clone().requires_grad_()
    out = model(x)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    loss = (out * cot).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    return out.detach(), torch.autograd.grad(loss, [x, *params])


@pytest.mark.parametrize("name,size,overrides,blocks", CASES, ids=IDS)
def test_unsummed_stream_gives_the_block_by_block_results(name, size, overrides, blocks,
                                                          monkeypatch):
    """float64, training: the logits and the gradients into the input and every parameter
    equal those of the block-by-block forward (PYSSM_RESIDUAL_PAIRS=0, which runs no pair), and
    the pairs ran over every block."""
    runs = _spy(monkeypatch)
    model = _model(name, size, overrides)
    x = torch.randn(2, 3, size, size + 16, dtype=torch.float64)
    got, got_grads = _loss_and_grads(model, x)
    assert sum(runs) == blocks and len(runs) == (1 if name.startswith("vit") else 4)
    monkeypatch.setenv("PYSSM_RESIDUAL_PAIRS", "0")
    runs.clear()
    want, want_grads = _loss_and_grads(model, x)
    assert runs == []
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12 * max(1.0, w.abs().max().item()))


@pytest.mark.parametrize("name,size,overrides,blocks", CASES[1:2] + CASES[3:],
                         ids=IDS[1:2] + IDS[3:])
def test_drop_path_on_both_branches(name, size, overrides, blocks, monkeypatch):
    """Stochastic depth (VMamba's drop_path_rate) with the same random stream: the pairs drop
    the same branches as the block-by-block forward (the same logits)."""
    runs = _spy(monkeypatch)
    model = _model(name, size, overrides, drop_path=True)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    torch.manual_seed(5)
    got = model(x)
    assert sum(runs) == blocks
    monkeypatch.setenv("PYSSM_RESIDUAL_PAIRS", "0")
    torch.manual_seed(5)
    torch.testing.assert_close(got, model(x), rtol=1e-12, atol=1e-12)


def test_vit_tokens_and_intermediates(monkeypatch):
    """ViT's tokens at a tap runs its blocks unsummed where autograd records and sums them
    once (the same tokens); forward_intermediates keeps every block's output, block by block."""
    runs = _spy(monkeypatch)
    name, size, overrides, _ = CASES[0]
    model = _model(name, size, overrides)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    got = model.tokens(x, tap=-2)
    assert runs == [2]
    with torch.no_grad():
        want = model.tokens(x, tap=-2)
    assert runs == [2]  # (nothing recorded: block by block)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    model.forward_intermediates(x, indices=2)
    assert runs == [2]


@pytest.mark.parametrize("name,size,overrides,blocks", CASES[:2], ids=IDS[:2])
def test_block_by_block_where_pairs_do_not_apply(name, size, overrides, blocks, monkeypatch):
    """Nothing recorded (no_grad, or a frozen encoder on an input without a gradient), or a
    forward hook on a block (which then sees every block's summed output): block by block. An
    input that needs a gradient in front of frozen blocks: unsummed."""
    runs = _spy(monkeypatch)
    model = _model(name, size, overrides)
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        model(x)
    model.requires_grad_(False)
    model(x)
    assert runs == []
    model(x.clone().requires_grad_())
    assert sum(runs) == blocks
    runs.clear()
    model.requires_grad_(True)
    block = model.blocks[0] if name.startswith("vit") else model.layers[2].blocks[1]
    seen = []
    handle = block.register_forward_hook(lambda m, args, out: seen.append(out))
    model(x)
    handle.remove()
    assert len(seen) == 1 and torch.is_tensor(seen[0])
    assert sum(runs) == blocks - 3  # (ViT: all 3 blocks; VMamba: the hooked block's stage)


def _adds(seen: Dispatched) -> int:
    return sum(f.overloadpacket in (torch.ops.aten.add, torch.ops.aten.add_) for f in seen.ops)


@INTERPRETER
@pytest.mark.parametrize("name,size,overrides,blocks", CASES[:2], ids=IDS[:2])
def test_fewer_stream_adds_with_the_triton_norms(name, size, overrides, blocks, monkeypatch):
    """float32 with the norms on Triton's kernels (its interpreter here), forward and
    backward: the pairs leave out a stream add and a gradient sum for every block but a stage's
    first (ViT: and its last, summed by the final norm) and give the block-by-block logits and
    gradients (float32's rounding: the gradient sums are made in another order)."""
    model = _model(name, size, overrides, dtype=torch.float32)
    for m in model.modules():
        if isinstance(m, LayerNorm):
            m.backend = "triton"
    x = torch.randn(2, 3, size, size)
    counts, results = [], []
    for pairs in ("1", "0"):
        monkeypatch.setenv("PYSSM_RESIDUAL_PAIRS", pairs)
        with Dispatched() as seen:
            results.append(_loss_and_grads(model, x))
        counts.append(_adds(seen))
    stages = 1 if name.startswith("vit") else 4
    # per block past a stage's first: a forward add and a backward sum fewer (ViT: the last
    # block's add too, which the final norm makes; VMamba: each stage's last sum made once)
    fewer = 2 * (blocks - stages) + (1 if name.startswith("vit") else 0)
    assert counts[1] - counts[0] == fewer, counts
    (got, got_grads), (want, want_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * max(1.0, w.abs().max().item()))
