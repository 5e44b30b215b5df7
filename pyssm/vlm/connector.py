"""Connectors: visual tokens (B, T, vision_dim) -> LM embeddings (B, T, lm_dim).

    linear          Linear(d, D)
    mlp2x_gelu      Linear(d, D), GELU, Linear(D, D)                          (LLaVA-1.5)
    fused-gelu-mlp  Linear(d, 4d), GELU, Linear(4d, D), GELU, Linear(D, D)    (Prismatic's
                    3-layer connector, which stabilises detection-tuned encoders)

With ``standardize=True`` each kind starts with ``Standardize``: the frozen encoder's tokens
shifted and scaled per channel to zero mean and unit variance over the training images, with
statistics fit once and then fixed (MAE's linear probe puts a BatchNorm without affine before
its head for the same reason: encoders' features differ in offset and scale, which a short
training run should not have to learn away, and which would then weigh in a comparison of
encoders).
"""

from __future__ import annotations

import torch
from torch import nn


class Standardize(nn.Module):
    """(x - mean) / std per channel, with ``mean`` and ``std`` fit by ``fit`` (buffers: they
    are saved and loaded with the connector). Unfit, it raises rather than pass tokens on
    unchanged."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.fitted = False

    @torch.no_grad()
    def fit(self, tokens: torch.Tensor) -> Standardize:
        """Statistics of ``tokens`` (..., dim) over everything but the channel dimension,
        accumulated in float64."""
        if tokens.shape[-1] != self.mean.shape[0] or tokens.numel() == 0:
            raise ValueError(f"tokens must be (..., {self.mean.shape[0]}) and not empty, got "
                             f"{tuple(tokens.shape)}")
        flat = tokens.reshape(-1, tokens.shape[-1]).double()
        self.mean.copy_(flat.mean(0))
        self.std.copy_(flat.std(0, correction=0) + self.eps)
        self.fitted = True
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.fitted = prefix + "mean" in state_dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fitted:
            raise RuntimeError("the connector standardises tokens with statistics that were "
                               "never fit: call fit(tokens) on the training images' tokens "
                               "(VisionLanguageModel.fit_token_statistics) or load them")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

CONNECTORS = ("linear", "mlp2x_gelu", "fused-gelu-mlp")


def build_connector(kind: str, vision_dim: int, lm_dim: int,
                    standardize: bool = False) -> nn.Sequential:
    if kind == "linear":
        layers = [nn.Linear(vision_dim, lm_dim)]
    elif kind == "mlp2x_gelu":
        layers = [nn.Linear(vision_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim)]
    elif kind == "fused-gelu-mlp":
        layers = [nn.Linear(vision_dim, 4 * vision_dim), nn.GELU(),
                  nn.Linear(4 * vision_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim)]
    else:
        raise ValueError(f"connector must be one of {CONNECTORS}, got {kind!r}")
    if standardize:
        layers.insert(0, Standardize(vision_dim))
    return nn.Sequential(*layers)


def connector_dims(connector: nn.Sequential) -> tuple[int, int]:
    """(vision_dim, lm_dim) a connector maps between."""
    linears = [m for m in connector if isinstance(m, nn.Linear)]
    return linears[0].in_features, linears[-1].out_features
