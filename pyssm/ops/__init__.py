"""pyssm's ops: each a compiled CPU / CUDA kernel (layer_norm, layer_norm_linear,
depthwise_conv2d, linear_gelu, linear_residual_, mlp_gelu, mlp_residual_, norm_mlp_residual:
Triton kernels) with
a pure-PyTorch reference beside it.

Backends: ``cuda``, ``cpu`` or ``reference``, chosen per call with ``backend=``, globally with
``PYSSM_BACKEND``, or automatically (see ``pyssm.ops._backend``); the Triton ops' are
``triton`` and ``reference`` (see their modules).
"""

from pyssm.ops.attention import attention, attention_qkvpacked, attention_reference
from pyssm.ops.cross_merge import cross_merge, cross_merge_reference
from pyssm.ops.cross_scan import cross_scan, cross_scan_reference
from pyssm.ops.depthwise_conv2d import depthwise_conv2d, depthwise_conv2d_reference
from pyssm.ops.layer_norm import layer_norm, layer_norm_reference
from pyssm.ops.layer_norm_linear import layer_norm_linear, layer_norm_linear_reference
from pyssm.ops.linear_gelu import linear_gelu, linear_gelu_reference
from pyssm.ops.linear_residual import linear_residual_, linear_residual_reference_
from pyssm.ops.mlp_gelu import mlp_gelu, mlp_gelu_reference
from pyssm.ops.mlp_residual import mlp_residual_, mlp_residual_reference_
from pyssm.ops.norm_mlp_residual import norm_mlp_residual, norm_mlp_residual_reference
from pyssm.ops.selective_scan import selective_scan, selective_scan_reference
from pyssm.ops.ss2d import ss2d, ss2d_reference

__all__ = [
    "attention", "attention_qkvpacked", "attention_reference", "cross_merge",
    "cross_merge_reference", "cross_scan", "cross_scan_reference", "depthwise_conv2d",
    "depthwise_conv2d_reference", "layer_norm", "layer_norm_linear",
    "layer_norm_linear_reference", "layer_norm_reference", "linear_gelu",
    "linear_gelu_reference", "linear_residual_", "linear_residual_reference_", "mlp_gelu",
    "mlp_gelu_reference", "mlp_residual_", "mlp_residual_reference_", "norm_mlp_residual",
    "norm_mlp_residual_reference", "selective_scan",
    "selective_scan_reference", "ss2d", "ss2d_reference",
]
