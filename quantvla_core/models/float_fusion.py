"""Float sibling layers as one GEMM, without a second copy of their weights.

Layers that read the same input (q/k/v, gate/up, every adaptive norm's modulation) are one
matrix product over their concatenated weights: one launch instead of several, and a wider N
that small-M GEMMs (a denoising step has 17-60 rows) use better. The concatenation is built on
first use and the layers' own parameters are then re-pointed to row slices of it, so the model
holds each weight once, ``state_dict`` / checkpoints / ``named_parameters`` are unchanged and
an in-place update of a layer's weight (load_state_dict, ATM folding) is seen by the fused GEMM.

It applies only where it computes the same function as the layers it replaces:
- gradients off (a training step must reach each layer's parameter through autograd);
- plain ``nn.Linear`` (or cpu_linear.OneDNNLinear) layers (quantized ones have their own fusion, quant.qlinear) that nobody
  hooks (calibration and tracing observe each layer's own input and output);
- one dtype and device for all;
- not while torch.compile traces the model (its pointer checks would break the graph).
The cache is dropped and rebuilt whenever a layer or its parameter storage changes (a module
replaced by quantization, ``.to(dtype)``, a reassigned parameter).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .cpu_linear import OneDNNLinear, float_linear, is_dense

_ENABLED = {"on": True}


def set_float_fusion(enabled: bool) -> None:
    """Turn the fused float GEMMs off (every layer runs on its own, as a reference) or on."""
    _ENABLED["on"] = bool(enabled)


def float_fusion_enabled() -> bool:
    return _ENABLED["on"]


def _plain(layer: nn.Module | None) -> bool:
    return (
        type(layer) in (nn.Linear, OneDNNLinear)
        and not layer._forward_hooks
        and not layer._forward_pre_hooks
        and is_dense(layer.weight)
        and is_dense(layer.bias)
    )


def _version(p: torch.Tensor) -> int:
    try:
        return p._version
    except RuntimeError:  # an inference tensor has none
        return -1


def _addresses(layers: Sequence[nn.Linear]) -> tuple:
    """What the concatenation was built from: storage, shape, dtype and version of every
    parameter. The version matters: a parameter re-pointed into the concatenation keeps its own
    counter, so an in-place update through it (loading, ATM / OHB scaling) is seen here, and the
    concatenation - with any prepacked copy of it (cpu_linear) - is rebuilt."""
    return tuple(
        (p.data_ptr(), tuple(p.shape), p.dtype, _version(p))
        for layer in layers
        for p in (layer.weight, layer.bias)
        if p is not None
    )


def fused_float_weights(
    owner: nn.Module, slot: str, layers: Sequence[nn.Module | None]
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight (sum N, K), bias or None) of ``layers`` concatenated along N, cached on ``owner``
    under ``slot``; None where fusing would not compute the same (see the module docstring).
    The first call re-points each layer's weight and bias to slices of the concatenation."""
    if torch.compiler.is_compiling():
        return None  # torch.compile traces the layers as they are (and fuses on its own)
    if not _ENABLED["on"] or torch.is_grad_enabled() or not layers:
        return None
    if not all(_plain(m) for m in layers):
        owner.__dict__.pop(slot, None)  # nothing stale (a replaced layer's weights) stays alive
        return None
    cache = owner.__dict__.get(slot)
    if cache is not None and len(cache[0]) == len(layers) and all(a is b for a, b in zip(cache[0], layers)):
        if cache[1] == _addresses(layers):  # every forward: pointer and shape comparisons only
            return cache[2], cache[3]
    owner.__dict__.pop(slot, None)
    w0 = layers[0].weight
    has_bias = layers[0].bias is not None
    if any(
        m.weight.dtype != w0.dtype
        or m.weight.device != w0.device
        or m.weight.shape[1] != w0.shape[1]
        or (m.bias is not None) != has_bias
        for m in layers
    ):
        return None
    with torch.inference_mode(False), torch.no_grad():  # the parameters must stay normal tensors
        weight = torch.cat([m.weight.detach() for m in layers])
        bias = torch.cat([m.bias.detach() for m in layers]) if has_bias else None
        sizes = [m.weight.shape[0] for m in layers]
        for m, w in zip(layers, weight.split(sizes)):
            m.weight.data = w
        if bias is not None:
            for m, b in zip(layers, bias.split(sizes)):
                m.bias.data = b
    owner.__dict__[slot] = (tuple(layers), _addresses(layers), weight, bias)
    return weight, bias


def fused_float_linear(
    owner: nn.Module, slot: str, layers: Sequence[nn.Module | None], x: torch.Tensor
) -> torch.Tensor | None:
    """``cat([layer(x) for layer in layers], -1)`` as one GEMM, or None (see fused_float_weights)."""
    fused = fused_float_weights(owner, slot, layers)
    if fused is None or fused[0].dtype != x.dtype:
        return None
    return float_linear(x, *fused)
