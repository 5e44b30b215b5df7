"""Vision encoders on pyssm's ops: VMamba (v2 and vanilla) and ViT, timm-style."""

from pyssm.models.registry import (create_encoder, list_encoders, load_checkpoint,
                                   register_encoder)
from pyssm.models import vit, vmamba  # noqa: F401  (registering the factories)

__all__ = ["create_encoder", "list_encoders", "load_checkpoint", "register_encoder"]
