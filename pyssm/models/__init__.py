"""Vision encoders on pyssm's ops: VMamba (v2 and vanilla) and ViT, timm-style."""

from pyssm.models.registry import (create_encoder, list_encoders, load_checkpoint,
                                   register_encoder)

__all__ = ["create_encoder", "list_encoders", "load_checkpoint", "register_encoder"]
