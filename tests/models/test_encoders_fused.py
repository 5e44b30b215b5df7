"""The encoders end to end with every pyssm kernel they take, against the same weights on
torch's ops (the reference backends), under bf16 autocast: inference logits, and a training
step's gradients. On a GPU (``-m cuda``, the device check's CUDA tests) the model runs on
``set_backend("cuda")`` with the kernels not yet verified let in (PYSSM_UNVERIFIED_CUDA=1): the
CUDA ss2d and attention, and Triton's norms, convolution, MLP and norm-projection passes, each
taken where the model takes it. Without a GPU the same test runs the C++ CPU kernels and the
Triton kernels in Triton's interpreter, so its wiring is checked before a GPU ever runs it.
Which fused ops ran is read off the dispatcher (tests/dispatched.py)."""

from __future__ import annotations

import pytest
import torch
from dispatched import Dispatched
from triton_params import KERNEL_DEVICES, every_fused_path

from pyssm.models import create_encoder
from pyssm.models.mlp import Mlp
from pyssm.models.norms import LayerNorm
from pyssm.models.vmamba import SS2D

SMALL = {"vmamba_tiny_s1l8": dict(depths=(1, 2, 2, 1), dims=32),
         "vit_tiny_patch16": dict(depth=2)}
# the fused ops each family must take, in inference and in a training step (16-bit autocast)
INFERENCE = {"vmamba_tiny_s1l8": {"norm_mlp_residual_triton", "layer_norm_linear_triton",
                                  "depthwise_conv2d_triton", "layer_norm_triton", "ss2d"},
             "vit_tiny_patch16": {"norm_mlp_residual_triton", "layer_norm_triton",
                                  "attention_qkvpacked"}}
TRAINING = {"vmamba_tiny_s1l8": {"mlp_gelu_triton", "depthwise_conv2d_triton",
                                 "layer_norm_triton", "ss2d_with_states"},
            "vit_tiny_patch16": {"mlp_gelu_triton", "layer_norm_triton", "attention_qkvpacked"}}
DEVICES = KERNEL_DEVICES


@pytest.fixture(autouse=True)
def fused_paths(monkeypatch):
    every_fused_path(monkeypatch)   # (no switch off; the CUDA and Triton kernels let in)


def _models(name: str, device: str) -> tuple[torch.nn.Module, ...]:
    """(the model on pyssm's kernels, the same weights on torch's ops, and in float64 on torch's
    ops), in eval mode (no drop path: the three see the same network), on ``device``."""
    torch.manual_seed(0)
    fast = create_encoder(name, img_size=64, num_classes=10, **SMALL[name]).to(device).eval()
    with torch.no_grad():  # (the norms' affine maps and the layers' biases initialise to 1 and
        for m in fast.modules():  # 0, which a kernel reading them wrongly would not show)
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1, 0.2), m.bias.normal_(0, 0.2)
            elif isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.bias is not None:
                m.bias.normal_(0, 0.1)
    ref = create_encoder(name, img_size=64, num_classes=10, **SMALL[name]).to(device).eval()
    ref.load_state_dict(fast.state_dict())
    exact = create_encoder(name, img_size=64, num_classes=10, **SMALL[name]).double().eval()
    exact.load_state_dict(fast.state_dict())
    kernels = "cuda" if device == "cuda" else "cpu"
    for model, backend in ((fast, kernels), (ref, "reference"), (exact, "reference")):
        if hasattr(model, "set_backend"):
            model.set_backend(backend)
        else:  # (a ViT's backend goes to its Triton ops too: "cpu" gives them torch's ops)
            model.backend = None if backend == "cpu" else backend
    if device == "cpu":  # the Triton ops in the interpreter ("cpu" gives them torch's ops)
        for m in fast.modules():
            if isinstance(m, (LayerNorm, Mlp)):
                m.backend = "triton"
            elif isinstance(m, SS2D):
                m.conv_backend = "triton"
    return fast, ref, exact


def _ran(seen: Dispatched) -> set[str]:
    return set(seen.pyssm_ops())


def _error(t: torch.Tensor | None, exact: torch.Tensor) -> float:
    """The distance of t from the float64 result, relative to that result's norm."""
    return ((t.detach().cpu().double() - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(SMALL))
def test_inference_on_the_fused_kernels(name, device):
    """bf16-autocast inference: the fused ops run, and the logits are within twice the error
    the same model on torch's ops makes against float64 (plus 1%)."""
    fast, ref, exact = _models(name, device)
    x = torch.randn(3, 3, 64, 64, device=device)
    with torch.no_grad():
        with torch.autocast(device, dtype=torch.bfloat16):
            with Dispatched() as seen:
                got = fast(x)
            own = ref(x)
        want = exact(x.cpu().double())
    assert INFERENCE[name] <= _ran(seen), _ran(seen)
    assert torch.isfinite(got).all()
    assert _error(got, want) <= 2 * _error(own, want) + 0.01


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(SMALL))
def test_a_training_step_on_the_fused_kernels(name, device):
    """A bf16-autocast training step (the mean of the logits, backward into every parameter):
    the fused training ops run, and every parameter's gradient is within twice the error the
    same model on torch's ops makes against float64 (plus 1% of its norm)."""
    fast, ref, exact = _models(name, device)
    x = torch.randn(3, 3, 64, 64, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        with Dispatched() as seen:
            loss = fast(x).float().mean()
        own_loss = ref(x).float().mean()
    assert TRAINING[name] <= _ran(seen), _ran(seen)
    got = torch.autograd.grad(loss, list(fast.parameters()), allow_unused=True)
    own = torch.autograd.grad(own_loss, list(ref.parameters()), allow_unused=True)
    want = torch.autograd.grad(exact(x.cpu().double()).mean(), list(exact.parameters()),
                               allow_unused=True)
    for (pname, _), g, o, w in zip(fast.named_parameters(), got, own, want):
        if w is None or not w.any():
            assert g is None or not g.any(), pname
            continue
        assert g is not None and torch.isfinite(g).all(), pname
        assert _error(g, w) <= 2 * _error(o, w) + 0.01, pname
