"""pyssm: fast SS2D (VMamba) and attention kernels for the vision encoders of VLMs."""

from pyssm import _extension
from pyssm.ops import attention, cross_merge, cross_scan, selective_scan, ss2d

__version__ = "0.1.0"
extension_status = _extension.status

__all__ = ["attention", "cross_merge", "cross_scan", "extension_status", "selective_scan",
           "ss2d", "__version__"]
