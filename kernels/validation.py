"""Argument checks shared by the public ops: dtypes, shapes, devices, caller-provided outputs."""

from __future__ import annotations

import math

import torch

from .packing import PACK_GROUP

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROTATION_BLOCKS = (1, 2, 4, 8, 16, 32, 64)
_QMAX = {8: 127, 4: 7}


def _check_tensor(t, name: str, dtypes: tuple, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor ({what}), got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]} ({what}), got {t.dtype}")


def _check_out_dtype(out_dtype) -> torch.dtype:
    out_dtype = torch.float32 if out_dtype is None else out_dtype
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {[str(d) for d in OUT_DTYPES]}, got {out_dtype}")
    return out_dtype


def _check_bits(bits: int) -> int:
    if bits not in _QMAX:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    return bits


def _flatten_act(xq: torch.Tensor, xs: torch.Tensor, name: str):
    if xq.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (..., K)")
    lead = tuple(xq.shape[:-1])
    m = math.prod(lead)
    if xs.numel() != m:
        raise ValueError(
            f"xs must hold one scale per row of {name}: expected {m} values (shape {lead}), got shape {tuple(xs.shape)}"
        )
    return lead, xq.reshape(m, xq.shape[-1]).contiguous(), xs.reshape(m).to(torch.float32).contiguous()


def _check_weight_scales(ws: torch.Tensor, n: int, k: int, group_size: int | None):
    _check_tensor(ws, "ws", (torch.float32, torch.float16, torch.bfloat16), "weight scales")
    if group_size is None:
        if ws.dim() == 2 and ws.shape[1] == 1:
            ws = ws[:, 0]
        if tuple(ws.shape) != (n,):
            raise ValueError(
                f"per-channel ws must have shape ({n},) (one scale per output channel), "
                f"got {tuple(ws.shape)}; pass group_size for group-wise scales"
            )
    else:
        if not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
        g = -(-k // group_size)
        if tuple(ws.shape) != (n, g):
            raise ValueError(
                f"group-wise ws must have shape (N, ceil(K / group_size)) = ({n}, {g}) "
                f"for K={k}, group_size={group_size}; got {tuple(ws.shape)}"
            )
    return ws.to(torch.float32).contiguous()


GROUP_MULT_MAX = 18
"""Largest integer group multiplier (7 x 18 = 126: a 4-bit code times it is still an int8)."""


def _check_group_mult(group_mult, ws: torch.Tensor, n: int, k: int, group_size):
    """Integer group scales: ``group_mult`` uint8 (N, K / group_size), values 1..GROUP_MULT_MAX
    (not checked here: that would read the tensor on every call; QuantLinear checks them when
    they are set), with per-channel ``ws`` (N,). Returns them contiguous."""
    _check_tensor(group_mult, "group_mult", (torch.uint8,), "integer group scales (N, K / group_size)")
    if not isinstance(group_size, int) or group_size <= 0 or k % group_size:
        raise ValueError(f"group_mult needs a group_size that divides K={k}, got {group_size!r}")
    if tuple(group_mult.shape) != (n, k // group_size):
        raise ValueError(
            f"group_mult must have shape (N, K / group_size) = ({n}, {k // group_size}), got {tuple(group_mult.shape)}"
        )
    ws = _check_weight_scales(ws, n, k, None)
    return group_mult.contiguous(), ws


def _check_bias(bias, n: int, device: torch.device):
    if bias is None:
        return None
    _check_tensor(bias, "bias", OUT_DTYPES, "per-output-channel bias")
    if tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if bias.device != device:
        raise ValueError(f"bias is on {bias.device} but the activations are on {device}")
    return bias.contiguous()


def _check_out(out, shape: tuple, dtype: torch.dtype, device: torch.device, name: str = "out"):
    """A caller-provided output (CUDA graphs want fixed buffers): exact shape/dtype, contiguous."""
    if out is None:
        return None
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"{name} must be a {dtype} tensor of shape {tuple(shape)} on {device}, got "
            f"{out.dtype} {tuple(out.shape)} on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return out


def _check_same_device(device: torch.device, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(
                f"{name} is on {t.device} but the activations are on {device}; all operands must be on one device"
            )


def _check_rotation(rotation, k: int, bits: int, device: torch.device):
    if rotation is None:
        return None
    _check_tensor(
        rotation,
        "rotation",
        (torch.float32, torch.float16, torch.bfloat16, torch.float64),
        "orthogonal block rotation (B, B) or (K/B, B, B)",
    )
    if rotation.dim() not in (2, 3) or rotation.shape[-1] != rotation.shape[-2]:
        raise ValueError(
            f"rotation must be (B, B) (shared by all blocks) or (K/B, B, B) (one per "
            f"block), got shape {tuple(rotation.shape)}"
        )
    b = rotation.shape[-1]
    if b not in ROTATION_BLOCKS:
        raise ValueError(f"rotation block size B must be one of {ROTATION_BLOCKS}, got {b}")
    if k % b:
        raise ValueError(f"K={k} must be a multiple of the rotation block size B={b}")
    if rotation.dim() == 3 and rotation.shape[0] != k // b:
        raise ValueError(f"per-block rotation must have K/B = {k // b} blocks, got {rotation.shape[0]}")
    if bits == 4 and ((k % PACK_GROUP) // 2) % b:
        raise ValueError(
            f"with bits=4 the last packing group of K={k} has half-width {(k % PACK_GROUP) // 2}, "
            f"not a multiple of the rotation block B={b}; use a smaller B or K % 128 == 0"
        )
    if rotation.device != device:
        raise ValueError(f"rotation is on {rotation.device} but x is on {device}")
    return rotation


def _check_perm(perm, k: int, device: torch.device):
    if perm is None:
        return None
    _check_tensor(perm, "perm", (torch.int64, torch.int32), "channel permutation (K,)")
    if tuple(perm.shape) != (k,):
        raise ValueError(f"perm must have shape ({k},), got {tuple(perm.shape)}")
    if perm.device != device:
        raise ValueError(f"perm is on {perm.device} but x is on {device}")
    return perm


_EPILOGUE_ACTS = ("gelu_tanh", "silu")


def _check_epilogue(act, gated: bool, residual, lead: tuple, n: int, device, residual_gate=None) -> int:
    """Checks the fused epilogue's arguments; returns the number of output columns (N, or N/2
    for a gated pair layout)."""
    if act is not None and act not in _EPILOGUE_ACTS:
        raise ValueError(f"act must be None or one of {_EPILOGUE_ACTS}, got {act!r}")
    if gated and act is None:
        raise ValueError("gated=True needs an activation (act='gelu_tanh' or 'silu')")
    if gated and n % 2:
        raise ValueError(f"a gated epilogue needs interleaved gate/up pairs: N must be even, got {n}")
    n_out = n // 2 if gated else n
    if residual is not None:
        _check_tensor(residual, "residual", OUT_DTYPES, "the residual added to the output (..., N_out)")
        if tuple(residual.shape) != (*lead, n_out):
            raise ValueError(f"residual must have the output's shape {(*lead, n_out)}, got {tuple(residual.shape)}")
        if residual.device != device:
            raise ValueError(f"residual is on {residual.device}, the activations on {device}")
    if residual_gate is not None:
        if residual is None:
            raise ValueError("residual_gate scales the output before the residual is added: it needs residual=")
        _check_tensor(residual_gate, "residual_gate", OUT_DTYPES, "a per-output-column gate (N_out,)")
        if tuple(residual_gate.shape) != (n_out,):
            raise ValueError(
                f"residual_gate must have shape ({n_out},) (one gate per output column), got {tuple(residual_gate.shape)}"
            )
        if residual_gate.device != device:
            raise ValueError(f"residual_gate is on {residual_gate.device}, the activations on {device}")
    return n_out
