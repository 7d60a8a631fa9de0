"""fp32 linear layers on the CPU through oneDNN instead of the BLAS ``F.linear`` picks.

PyTorch's CPU ``F.linear`` in fp32 calls MKL's sgemm (x86 wheels), which on this AMD CPU was
slow: at the shapes of a denoising step (17-60 rows) it was 1.4-2x slower than oneDNN's
inner-product on this machine's Zen 5 (17x256x640: 51 vs 31 us, 51x384x640: 163 vs 80 us,
2 threads). oneDNN is part of every x86 PyTorch build and picks its kernel from the CPU's ISA;
bf16 linears already go through it. The results are fp32 GEMMs of their own summation order
(differences of a few fp32 ulps against MKL, tested).

oneDNN costs ~10 us per call whatever the size (MKL: ~2-3 us), so it runs only GEMMs of at
least 2^20 multiply-adds (M * N * K), where it wins (measured crossover ~0.7M on this
machine: 16x4x256 is 3.5 us on MKL vs 12.5 on oneDNN, 17x384x256 31 vs 23 us).

Used only where it computes the same function: fp32 on the CPU with gradients off (oneDNN's
op has no autograd) and outside torch.compile's tracing; everywhere else it is ``F.linear``.
The Policy switches a CPU model's float ``nn.Linear`` layers to `OneDNNLinear` (a subclass:
same parameters, state_dict and checks), and the fused float GEMMs call `float_linear`.

Prepacked weights for few rows: oneDNN reads a plain (N, K) weight through a reorder on every
call; for GEMMs of at most ``PREPACK_MAX_ROWS`` rows - a denoising step's tokens, called 10x per
chunk - the weight is reordered once into oneDNN's blocked layout and kept next to it (a second
copy of that weight: on `small` the action expert's float layers, ~25-50 MiB in fp32). 17x256x768,
2 threads: 71 -> 44 us a call; whole chunks of `small` (interleaved in-process A/B, 25 each,
prepacking toggled without dropping the copies): fp32 55.5 -> 47.2 ms, W8A8 37.0 -> 34.1 ms. A
copy is made for the row count of its first use and remade when the rows move beyond half /
twice of it (a copy made for a fixed 64 rows gained only 11% / 2% in the same A/B). The copy
is kept in a registry keyed by the weight tensor (weakly: freed with it), not on the tensor or
module, so deepcopy and pickling of models are unaffected (an oneDNN blocked tensor cannot be copied). Only under `torch.inference_mode`
(`Policy.predict`, the node, the benchmarks): code that edits weights - quantization, folds,
ATM / OHB, training - runs under `no_grad` or with gradients and never sees a packed copy. The
copy is rebuilt when the weight's storage, offset, strides, shape or version change (re-pointing,
`.to()`, in-place updates through the parameter); a write through ``param.data`` is invisible to
the version counter: call `invalidate_prepacked()` after one (or switch prepacking off and on).
Prefix and vision GEMMs (hundreds of rows, once per chunk) stay on the plain weight.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN = {"on": _onednn_available()}
ONEDNN_MIN_MACS = 1 << 20  # smaller GEMMs stay on F.linear (oneDNN's fixed cost per call)


PREPACK_MAX_ROWS = 64
_PREPACK = {"on": True}
# id(weight) -> (weakref to the weight, weakref to its storage, (offset, strides, shape, version),
# packed weight, the row count it was packed for)
_PACKED: dict[int, tuple] = {}


def set_onednn_prepack(enabled: bool) -> None:
    """Keep oneDNN-blocked copies of weights used with few rows (default) or read the plain
    weight every call; switching off drops every kept copy."""
    _PREPACK["on"] = bool(enabled)
    if not enabled:
        _PACKED.clear()


def invalidate_prepacked() -> None:
    """Drop every kept copy (after writing weights through ``param.data``, which the version
    counter does not see); the next few-row call packs again."""
    _PACKED.clear()


def prepacked_bytes() -> int:
    """Bytes held by the prepacked weight copies of this process."""
    return int(sum(torch.ops.mkldnn._nbytes(e[3]) for e in list(_PACKED.values())))


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _PACKED.get(key)
    if entry is not None and entry[0] is ref:
        _PACKED.pop(key, None)


def _prepacked(weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    """The oneDNN-blocked copy of ``weight`` for GEMMs of about ``rows`` rows (made on first use,
    remade when the row count moves beyond half / twice the one it was made for: the layout is
    chosen for a row count, and a copy made for 1 row ran 17-row GEMMs no faster than the plain
    weight), or None for a tensor without a version counter (an inference tensor)."""
    try:
        state = (weight.storage_offset(), weight.stride(), tuple(weight.shape), weight._version)
        storage = weight.untyped_storage()
    except RuntimeError:
        return None
    key = id(weight)
    entry = _PACKED.get(key)
    if (
        entry is not None
        and entry[0]() is weight
        and entry[1]() is storage
        and entry[2] == state
        and entry[4] <= 2 * rows
        and rows <= 2 * entry[4]
    ):
        return entry[3]
    with torch.inference_mode(False), torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
    ref = weakref.ref(weight, lambda r, k=key: _forget(k, r))
    _PACKED[key] = (ref, weakref.ref(storage), state, packed, rows)
    return packed


def set_onednn_linear(enabled: bool) -> None:
    """Route fp32 CPU linears through oneDNN (default where the build has it) or through F.linear."""
    _ONEDNN["on"] = bool(enabled) and _onednn_available()


def onednn_linear_enabled() -> bool:
    return _ONEDNN["on"]


def is_dense(t: torch.Tensor | None) -> bool:
    """A plain tensor (or a parameter over one), not a tensor subclass such as torchao's
    quantized weights: those dispatch their own ops, which neither oneDNN's kernel nor a
    concatenation of weights would keep."""
    return t is None or type(t) in (torch.Tensor, nn.Parameter)


def float_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; fp32 CPU inference through oneDNN (see the module docstring)."""
    if (
        _ONEDNN["on"]
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and x.shape[-1] == weight.shape[1]
        and x.numel() * weight.shape[0] >= ONEDNN_MIN_MACS  # rows * K * N
        and is_dense(weight)
    ):
        rows = x.numel() // x.shape[-1]
        if _PREPACK["on"] and rows <= PREPACK_MAX_ROWS and torch.is_inference_mode_enabled():
            packed = _prepacked(weight, rows)
            if packed is not None:
                return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` whose forward is `float_linear` (same parameters, names and state_dict).
    A hooked layer (calibration, tracing, a profiler) runs ``F.linear``, as a plain
    ``nn.Linear`` would: the quantization tracer recognises a linear's reads by that call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._forward_hooks or self._forward_pre_hooks:
            return F.linear(x, self.weight, self.bias)
        return float_linear(x, self.weight, self.bias)


def use_onednn_linears(model: nn.Module) -> int:
    """Turn every plain ``nn.Linear`` of ``model`` into a `OneDNNLinear` in place (quantized
    layers and other subclasses are left as they are); returns how many. Nothing changes where
    the PyTorch build has no oneDNN."""
    if not _onednn_available():
        return 0
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = OneDNNLinear
            n += 1
    return n
