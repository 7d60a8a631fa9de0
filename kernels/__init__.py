"""quantvla_kernels: int4 packing, integer GEMMs (W8A8, W4A8, W4A4), fused norm+quantize.

Import-light: the Triton kernels are compiled only when a Triton backend is first used.
"""
from .packing import PACK_GROUP, pack_int4, unpack_int4

__all__ = ["PACK_GROUP", "pack_int4", "unpack_int4"]
