"""quantvla_kernels: int4 packing, integer GEMMs (W8A8, W4A8, W4A4), fused norm+quantize.

Import-light: the Triton kernels are imported (and compiled) only when the Triton backend is
first used, so CPU-only users never need a GPU toolchain.  See ops.py for the math contract.
"""

from . import ops  # noqa: F401 - the compatibility module (quantvla_kernels.ops.<name>)
from .dispatch import BACKENDS, backend_scope, resolve_backend, set_default_backend
from .gemm import gemm_w4a4, gemm_w4a8, gemm_w8a8, linear_w4a8, linear_w8a8
from .norm import adaptive_rmsnorm
from .quantize import norm_shift_supported, quantize_per_token, rmsnorm_quantize
from .tiles import gemm_config, load_tuned_configs, m_bucket, set_autotune, tuned_configs
from .packing import PACK_GROUP, pack_int4, unpack_int4
from .torch_math import group_multiplied_codes

__all__ = [
    "BACKENDS",
    "adaptive_rmsnorm",
    "PACK_GROUP",
    "backend_scope",
    "gemm_config",
    "gemm_w4a4",
    "gemm_w4a8",
    "gemm_w8a8",
    "group_multiplied_codes",
    "linear_w4a8",
    "linear_w8a8",
    "load_tuned_configs",
    "tuned_configs",
    "m_bucket",
    "norm_shift_supported",
    "pack_int4",
    "quantize_per_token",
    "resolve_backend",
    "rmsnorm_quantize",
    "set_autotune",
    "set_default_backend",
    "unpack_int4",
]
