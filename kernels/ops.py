"""Public integer ops: activation quantization and W8A8 / W4A8 / W4A4 GEMMs, dispatched by device.

Backends (``backend=`` keyword, or :func:`set_default_backend` / :func:`backend_scope`):

* ``"triton"``  - the Triton kernels (default on CUDA).  On CPU tensors it needs the Triton
  interpreter (``TRITON_INTERPRET=1`` in the environment before these kernels are imported).
* ``"cpu"``     - exact integer math in torch: ``torch._int_mm`` (int32 accumulation) where it
  applies, else float64 matmul, which is exact for these int8 products (default on CPU).
* ``"reference"`` - deliberately plain: unpack everything, float64 matmul, loop over groups.

All backends share one epilogue: ``y = acc.float() * xs[m] * ws[n] (+ bias[n])`` cast to
``out_dtype``; with group-wise weight scales ``y = (sum_g acc_g.float() * ws[n, g]) * xs[m]``;
with integer group scales (``group_mult`` uint8 (N, K / group_size), values 1..18, and ws (N,))
the codes are ``w[n, k] * group_mult[n, k // group_size]`` (still int8: codes in [-7, 7]) and
the per-channel form applies: one int32 accumulator over all of K.
Optionally (``act=``, ``gated=``, ``residual=`` of the GEMMs) the epilogue goes on in fp32:
``y = act(y)`` (GELU-tanh or SiLU), or with ``gated`` ``y = act(y[:, 0::2]) * y[:, 1::2]`` on
interleaved (gate, up) column pairs (N/2 outputs: a fused gate/up MLP projection), then
``y = y * residual_gate[n]`` where given (a gated residual, which needs a residual), then
``y = y + residual``; written once.  The torch backends compute exactly this in torch
(torch_math.finish_output); the Triton kernels and the fused CPU linear use their own exp, so
activations agree within a few float ulps.

Activation quantization (symmetric, per token): ``q = round_half_even(y * QMAX / absmax(y))``
clamped to +-QMAX (127 for 8 bits, 7 for 4 bits), ``scale = absmax / QMAX``; an all-zero row
gets scale 1 and q 0.  ``y`` is built as ``v = x * (offset + w)`` (RMSNorm weight),
``v = v * inv_smooth``, ``v = v[:, perm]``, ``v = v @ R_b`` on each block b of B channels,
``y = v * rstd`` where ``rstd = 1 / sqrt(sum(x^2) / K + eps)``.  Folding into weights (as
``InputTransform.fold_weight`` does): ``W' = rotate(permute(W * s))`` on the K axis, so
``y W'^T`` equals the original ``norm(x) W^T``.

This module holds that math contract and re-exports the ops; the code lives in one module per
job: dispatch.py (backend choice), validation.py (argument checks), torch_math.py (the exact
torch math above), quantize.py (activation quantization), tiles.py (GEMM tile configs and
tuning), gemm.py (the Triton GEMMs and float-input linears), cpu_path.py (QuantLinear's torch-op
CPU path) and cpu_fused.py + cpu_int_linear.cpp (the compiled fused CPU linear).  Read or patch
a module's state (flags such as ``quantize._ROW_BROKEN``) in the module that owns it.
"""

from __future__ import annotations

# Re-exports (names callers and tests use through ``quantvla_kernels.ops``; listed in __all__).
from .cpu_path import _CPU_QMAX, _cpu_qmax_tensor, cpu_int_linear, cpu_quantize_codes, cpu_weight_groups
from .dispatch import (
    BACKENDS,
    _state,
    _triton_modules,
    backend_scope,
    resolve_backend,
    set_default_backend,
    triton_cdiv,
    triton_interpreting,
    triton_next_pow2,
)
from .gemm import (
    FUSE_MAX_M,
    PROLOGUE_ELEMS,
    _disable_w4_swap,
    _gemm_w4,
    _launch_reduce,
    _launch_w4,
    _launch_w8a8,
    _linear,
    _prologue_k,
    gemm_w4a4,
    gemm_w4a8,
    gemm_w8a8,
    linear_w4a8,
    linear_w8a8,
)
from .packing import PACK_GROUP, unpack_int4
from .quantize import (
    _ROT_PREC,
    ROTATION_KERNELS,
    ROW_CHUNK_MAX,
    _disable_row_kernel,
    _launch_row_quant,
    _quantize_impl,
    _quantize_triton,
    _row_chunk,
    _row_kernel_applies,
    norm_shift_supported,
    quantize_per_token,
    rmsnorm_quantize,
)
from .norm import adaptive_rmsnorm
from .tiles import (
    _CFG_KEYS,
    _SMS,
    _TUNED,
    SMEM_BUDGET,
    _candidates,
    _load_env_tuned,
    _num_sms,
    _pick_config,
    _split_for,
    fit_smem,
    gemm_config,
    load_tuned_configs,
    m_bucket,
    set_autotune,
    smem_estimate,
    tuned_configs,
)
from .torch_math import _epilogue, _gemm_torch, _grouped_acc_torch, _int_dot_exact, _quantize_torch, _reference_dot
from .validation import (
    _QMAX,
    OUT_DTYPES,
    ROTATION_BLOCKS,
    _check_bias,
    _check_bits,
    _check_out,
    _check_out_dtype,
    _check_perm,
    _check_rotation,
    _check_same_device,
    _check_tensor,
    _check_weight_scales,
    _flatten_act,
)

__all__ = [
    "adaptive_rmsnorm",
    # the public ops, their settings and helpers (the package exports the main ones too)
    "BACKENDS",
    "FUSE_MAX_M",
    "OUT_DTYPES",
    "PACK_GROUP",
    "PROLOGUE_ELEMS",
    "ROTATION_BLOCKS",
    "ROTATION_KERNELS",
    "ROW_CHUNK_MAX",
    "SMEM_BUDGET",
    "backend_scope",
    "cpu_int_linear",
    "cpu_quantize_codes",
    "cpu_weight_groups",
    "fit_smem",
    "gemm_config",
    "gemm_w4a4",
    "gemm_w4a8",
    "gemm_w8a8",
    "linear_w4a8",
    "linear_w8a8",
    "load_tuned_configs",
    "m_bucket",
    "norm_shift_supported",
    "quantize_per_token",
    "resolve_backend",
    "rmsnorm_quantize",
    "set_autotune",
    "set_default_backend",
    "smem_estimate",
    "triton_cdiv",
    "triton_interpreting",
    "triton_next_pow2",
    "tuned_configs",
    "unpack_int4",
    # internals, for callers and tests that still reach them as quantvla_kernels.ops.<name>
    # (new code imports them from the module that owns them)
    "_CFG_KEYS",
    "_CPU_QMAX",
    "_QMAX",
    "_ROT_PREC",
    "_SMS",
    "_TUNED",
    "_candidates",
    "_check_bias",
    "_check_bits",
    "_check_out",
    "_check_out_dtype",
    "_check_perm",
    "_check_rotation",
    "_check_same_device",
    "_check_tensor",
    "_check_weight_scales",
    "_cpu_qmax_tensor",
    "_disable_row_kernel",
    "_disable_w4_swap",
    "_epilogue",
    "_flatten_act",
    "_gemm_torch",
    "_gemm_w4",
    "_grouped_acc_torch",
    "_int_dot_exact",
    "_launch_reduce",
    "_launch_row_quant",
    "_launch_w4",
    "_launch_w8a8",
    "_linear",
    "_load_env_tuned",
    "_num_sms",
    "_pick_config",
    "_prologue_k",
    "_quantize_impl",
    "_quantize_torch",
    "_quantize_triton",
    "_reference_dot",
    "_row_chunk",
    "_row_kernel_applies",
    "_split_for",
    "_state",
    "_triton_modules",
]
