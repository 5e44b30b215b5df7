"""Connectors: visual tokens (B, T, vision_dim) -> LM embeddings (B, T, lm_dim).

    linear          Linear(d, D)
    mlp2x_gelu      Linear(d, D), GELU, Linear(D, D)                          (LLaVA-1.5)
    fused-gelu-mlp  Linear(d, 4d), GELU, Linear(4d, D), GELU, Linear(D, D)    (Prismatic's
                    3-layer connector, which stabilises detection-tuned encoders)
"""

from __future__ import annotations

from torch import nn

CONNECTORS = ("linear", "mlp2x_gelu", "fused-gelu-mlp")


def build_connector(kind: str, vision_dim: int, lm_dim: int) -> nn.Sequential:
    if kind == "linear":
        layers = [nn.Linear(vision_dim, lm_dim)]
    elif kind == "mlp2x_gelu":
        layers = [nn.Linear(vision_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim)]
    elif kind == "fused-gelu-mlp":
        layers = [nn.Linear(vision_dim, 4 * vision_dim), nn.GELU(),
                  nn.Linear(4 * vision_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim)]
    else:
        raise ValueError(f"connector must be one of {CONNECTORS}, got {kind!r}")
    return nn.Sequential(*layers)


def connector_dims(connector: nn.Sequential) -> tuple[int, int]:
    """(vision_dim, lm_dim) a connector maps between."""
    linears = [m for m in connector if isinstance(m, nn.Linear)]
    return linears[0].in_features, linears[-1].out_features
