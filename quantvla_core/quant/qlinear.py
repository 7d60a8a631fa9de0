"""QuantLinear: a drop-in nn.Linear replacement holding packed integer weights and scales.

Backends (``forward`` dispatches, per module or globally):
- ``reference``: dequantize and compute in float64 (the oracle; independent of the kernels);
- ``cpu``: exact integer GEMM through ``quantvla_kernels`` ops on the CPU;
- ``triton``: the ``quantvla_kernels`` Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1);
- ``auto`` (default): the kernels' own dispatch: ``triton`` on CUDA, ``cpu`` elsewhere, or
  whatever ``quantvla_kernels.backend_scope`` / ``set_default_backend`` selects.
It keeps ``in_features``, ``out_features`` and a ``weight`` whose ``.dtype`` is the float
compute dtype, because host models read those attributes (pi0's ``.weight.dtype`` lookups).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import GROUP_MULT_MAX, dequantize_weight, qmax, quantize_per_token, quantize_static, quantize_weight
from .transforms import InputTransform, hadamard

BACKENDS = ("auto", "reference", "cpu", "triton")
_FP32_BUFFERS = ("wscale", "bias", "inv_smooth", "rotation", "act_scale")
_default = threading.local()


# Activations the kernel backends read as they are, writing the output in the same dtype (the
# same numbers as x.float() -> kernels -> fp32 -> .to(x.dtype)); others are cast to fp32 first.
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = ("gelu_tanh", "silu")
_ACT_CODES = {None: 0, "gelu_tanh": 1, "silu": 2}  # the fused CPU linear's act argument


def _finish(
    y: torch.Tensor, act: str | None, gated: bool, res2: torch.Tensor | None, rgate: torch.Tensor | None = None
) -> torch.Tensor:
    """The epilogue's activation / gate pairs / residual gate / residual in torch, for the paths
    whose GEMM does not apply it (reference, weight-only, torch int math): the kernels' math
    contract."""
    if act is None and res2 is None:
        return y
    from quantvla_kernels.torch_math import finish_output

    return finish_output(y, act, gated, res2, rgate)


_KERNELS = None


def _kernels():
    """quantvla_kernels, imported lazily (the kernels are compiled on first use)."""
    global _KERNELS
    if _KERNELS is None:
        try:
            import quantvla_kernels
            import quantvla_kernels.cpu_fused  # noqa: F401
        except ImportError as e:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "the 'cpu' and 'triton' QuantLinear backends need the quantvla_kernels "
                "package; use backend='reference' or install the project"
            ) from e
        _KERNELS = quantvla_kernels
    return _KERNELS


_FUSED_DTYPES = (torch.float32, torch.bfloat16)
_FAST_HADAMARD = True


def set_fast_hadamard(enabled: bool) -> None:
    """Apply Hadamard rotations in the fused CPU linear as a fast Walsh-Hadamard transform (True,
    default; sums in butterfly order, so a code at an exact rounding boundary can move by one
    step against the matmul) or as the matmul the torch-op path uses (False: bit-identical to
    it). Takes effect for each layer when its CPU operands are next built (first use, or after
    its buffers change)."""
    global _FAST_HADAMARD
    _FAST_HADAMARD = bool(enabled)


def _fused_cpu():
    """The compiled fused CPU linear of quantvla_kernels, or None (then the torch-op lean path)."""
    return _kernels().cpu_fused.module()


def get_default_backend() -> str:
    return getattr(_default, "backend", "auto")


def set_default_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown QuantLinear backend {backend!r}; accepted: {', '.join(BACKENDS)}")
    _default.backend = backend


@contextlib.contextmanager
def quant_backend(backend: str) -> Iterator[None]:
    """Temporarily route every QuantLinear without its own backend through ``backend``."""
    old = get_default_backend()
    set_default_backend(backend)
    try:
        yield
    finally:
        set_default_backend(old)


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored as int8 (8-bit) or packed int4 (4-bit) codes and fp32 scales.

    ``a_bits`` 8 / 4 quantizes activations per token (dynamic) or with a static per-tensor
    ``act_scale``; ``a_bits=None`` is weight-only (W8A16 / W4A16). An optional input transform
    (inv_smooth, permutation, block rotation) is applied inside the activation-quantization
    step; its weight side is already folded into the codes.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        w_bits: int,
        a_bits: int | None,
        group_size: int | None = None,
        bias: bool = False,
        smooth: bool = False,
        permute: bool = False,
        rotation_kind: str | None = None,
        rotation_block: int = 0,
        static_act: bool = False,
        int_group_scales: bool = False,
        dtype: torch.dtype = torch.float32,
        backend: str | None = None,
    ):
        super().__init__()
        qmax(w_bits)
        if a_bits is not None:
            qmax(a_bits)
        if w_bits == 4 and in_features % 2:
            raise ValueError(f"4-bit weights need an even in_features, got {in_features}")
        if group_size is not None and in_features % group_size:
            raise ValueError(f"group_size {group_size} must divide in_features {in_features}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"unknown QuantLinear backend {backend!r}; accepted: {', '.join(BACKENDS)}")
        if int_group_scales and (w_bits != 4 or group_size is None):
            raise ValueError(
                f"int_group_scales needs 4-bit group-wise weights, got w_bits={w_bits}, group_size={group_size}"
            )
        self.int_group_scales = bool(int_group_scales)
        self.in_features, self.out_features = in_features, out_features
        self.w_bits, self.a_bits, self.group_size = w_bits, a_bits, group_size
        self.rotation_kind, self.rotation_block = rotation_kind, rotation_block
        self.backend = backend
        cols = in_features // 2 if w_bits == 4 else in_features
        self.register_buffer(
            "qweight", torch.zeros(out_features, cols, dtype=torch.uint8 if w_bits == 4 else torch.int8)
        )
        nscale = (out_features, in_features // group_size) if group_size and not int_group_scales else (out_features,)
        self.register_buffer("wscale", torch.ones(nscale, dtype=torch.float32))
        # Integer group scales: group g of channel n is scaled by wgroup[n, g] * wscale[n]
        # (quantizers.integer_group_scales), so the GEMM keeps one int32 accumulator.
        self.register_buffer(
            "wgroup",
            torch.ones((out_features, in_features // group_size), dtype=torch.uint8) if int_group_scales else None,
        )
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32) if bias else None)
        self.register_buffer("inv_smooth", torch.ones(in_features, dtype=torch.float32) if smooth else None)
        self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32) if permute else None)
        if rotation_kind == "hadamard":  # deterministic: rebuilt, not stored
            b = rotation_block
            rot = hadamard(b).to(torch.float32)  # shared by every block (the kernels take (B, B))
            self.register_buffer("rotation", rot, persistent=False)
        elif rotation_kind == "svd":
            b = rotation_block
            self.register_buffer("rotation", torch.eye(b).expand(in_features // b, b, b).contiguous())
        elif rotation_kind is None:
            self.register_buffer("rotation", None)
        else:
            raise ValueError(f"unknown rotation {rotation_kind!r}; accepted: hadamard, svd")
        self.register_buffer("act_scale", torch.ones((), dtype=torch.float32) if static_act else None)
        # Host models read .weight.dtype: an empty float buffer that follows .to(dtype).
        self.register_buffer("weight", torch.empty(0, dtype=dtype), persistent=False)
        # Decided once here (the layer's configuration never changes): whether the lean CPU
        # forward applies, and whether a 4-bit activation rotation must run before quantizing
        # (an int4 packing group would split a rotation block inside the quantization kernel).
        self._rotate_first = (
            rotation_kind is not None and a_bits == 4 and ((in_features % 128) // 2) % max(rotation_block, 1) != 0
        )
        self._lean_cpu = a_bits is not None and not static_act and not (w_bits == 8 and group_size)
        # Lean CPU cache (see _cpu_operands): a plain attribute, not a buffer, so it is neither in
        # the state_dict nor counted as weight bytes by Policy.describe() / memory reports.
        self._cpu_cache: tuple | None = None
        # True on a fused gate/up copy whose output columns are interleaved (gate, up) pairs
        # (concat_quant_linears(..., pairs=True)); forward(x, act=...) then returns act(gate) * up.
        self.gated_pairs = False

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        w_bits: int,
        a_bits: int | None,
        group_size: int | None = None,
        transform: InputTransform | None = None,
        clip_grid=None,
        act_scale: float | None = None,
        backend: str | None = None,
        fold_smooth_in_weight_only: bool = False,
        int_group_scales: bool = False,
    ) -> "QuantLinear":
        """Quantize a float linear (weight side of ``transform`` folded before rounding);
        ``int_group_scales``: 4-bit group scales as integer multiples of a channel scale."""
        from .quantizers import DEFAULT_CLIP_GRID

        t = transform or InputTransform()
        k, n = linear.in_features, linear.out_features
        w = t.fold_weight(linear.weight.detach()).to(torch.float32)
        rot_block = int(t.rotation.shape[-1]) if t.rotation is not None else 0
        mod = cls(
            k,
            n,
            w_bits=w_bits,
            a_bits=a_bits,
            group_size=group_size,
            bias=linear.bias is not None,
            smooth=t.inv_smooth is not None,
            permute=t.perm is not None,
            rotation_kind=t.rotation_kind,
            rotation_block=rot_block,
            static_act=act_scale is not None,
            int_group_scales=int_group_scales,
            dtype=linear.weight.dtype,
            backend=backend,
        )
        grid = DEFAULT_CLIP_GRID if clip_grid is None else clip_grid
        qw = quantize_weight(w, w_bits, group_size, grid, int_group_scales=int_group_scales)
        mod.set_codes(qw.q, qw.scale, qw.group_mult)
        with torch.no_grad():
            if linear.bias is not None:
                mod.bias.copy_(linear.bias.detach().float())
            if t.inv_smooth is not None:
                mod.inv_smooth.copy_(t.inv_smooth.float())
            if t.perm is not None:
                mod.perm.copy_(t.perm)
            if t.rotation is not None and t.rotation_kind == "svd":
                mod.rotation.copy_(t.rotation.float())
            if act_scale is not None:
                mod.act_scale.fill_(float(act_scale))
        return mod.to(linear.weight.device)

    def set_codes(self, q: torch.Tensor, scale: torch.Tensor, group_mult: torch.Tensor | None = None) -> None:
        """Store int8 codes (N, K) (packed here for 4-bit) and their scales; ``group_mult``
        (N, K / group_size) integers 1..GROUP_MULT_MAX on a layer with integer group scales."""
        m = qmax(self.w_bits)
        if q.shape != (self.out_features, self.in_features):
            raise ValueError(f"codes must be {(self.out_features, self.in_features)}, got {tuple(q.shape)}")
        if int(q.min()) < -m or int(q.max()) > m:
            raise ValueError(f"{self.w_bits}-bit codes must lie in [-{m}, {m}]")
        if self.int_group_scales:
            want = tuple(self.wgroup.shape)
            if group_mult is None or tuple(group_mult.shape) != want:
                got = None if group_mult is None else tuple(group_mult.shape)
                raise ValueError(f"this layer has integer group scales: group_mult must be {want}, got {got}")
            if int(group_mult.min()) < 1 or int(group_mult.max()) > GROUP_MULT_MAX:
                raise ValueError(f"group_mult values must lie in [1, {GROUP_MULT_MAX}]")
            self.wgroup = group_mult.to(device=self.qweight.device, dtype=torch.uint8).contiguous()
        elif group_mult is not None:
            raise ValueError("group_mult given for a layer without integer group scales (int_group_scales=False)")
        if self.w_bits == 4:
            q = _kernels().pack_int4(q.to(torch.int8).cpu()).to(self.qweight.device)
        self.qweight = q.to(self.qweight.dtype).contiguous()
        self.wscale = scale.to(torch.float32).reshape(self.wscale.shape).contiguous()

    def int_weight(self) -> torch.Tensor:
        """Unpacked int8 codes (N, K)."""
        if self.w_bits == 4:
            return _kernels().unpack_int4(self.qweight)
        return self.qweight

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W' (the transformed-input weight) as float; x' W'^T is the layer's output."""
        return dequantize_weight(self.int_weight(), self.wscale, self.group_size, dtype, self.wgroup)

    def input_transform(self) -> InputTransform:
        return InputTransform(self.inv_smooth, self.perm, self.rotation, self.rotation_kind)

    @property
    def has_transform(self) -> bool:
        return self.inv_smooth is not None or self.perm is not None or self.rotation is not None

    def extra_repr(self) -> str:
        a = f"a{self.a_bits}" if self.a_bits else "a16"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, w{self.w_bits}{a}, "
            f"group={self.group_size}{' (int scales)' if self.int_group_scales else ''}, "
            f"bias={self.bias is not None}, rotation={self.rotation_kind}"
        )

    def spec(self) -> dict:
        """Constructor arguments (what an artifact needs to rebuild the empty module)."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "group_size": self.group_size,
            "bias": self.bias is not None,
            "smooth": self.inv_smooth is not None,
            "permute": self.perm is not None,
            "rotation_kind": self.rotation_kind,
            "rotation_block": self.rotation_block,
            "static_act": self.act_scale is not None,
            "int_group_scales": self.int_group_scales,
        }

    def storage_bytes(self) -> int:
        """Bytes this layer needs on disk / in memory (codes, scales, bias, stored transforms)."""
        total = 0
        for name, buf in self._buffers.items():
            if buf is None or name == "weight" or name in self._non_persistent_buffers_set:
                continue
            total += buf.numel() * buf.element_size()
        return total

    # ---- dtype handling: scales stay fp32 under model.to(bf16) --------------------------------
    def _apply(self, fn, recurse=True):
        saved = {n: self._buffers.pop(n) for n in _FP32_BUFFERS if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for n, b in saved.items():
            moved = fn(b)
            self._buffers[n] = b.to(moved.device) if moved.dtype != b.dtype else moved
        return self

    # ---- forward ---------------------------------------------------------------------------
    def _epilogue_args(self, x: torch.Tensor, act: str | None, residual: torch.Tensor | None, residual_gate=None):
        """Checks forward's epilogue options; returns (output width, residual as (M, width))."""
        if act is not None and act not in ACTIVATIONS:
            raise ValueError(f"act must be None or one of {ACTIVATIONS}, got {act!r}")
        if self.gated_pairs and act is None:
            raise ValueError("this fused gate/up layer interleaves (gate, up) columns: call it with act=")
        width = self.out_features // 2 if self.gated_pairs else self.out_features
        if residual_gate is not None and (residual is None or tuple(residual_gate.shape) != (width,)):
            got = tuple(residual_gate.shape)
            raise ValueError(f"residual_gate must be ({width},) (one gate per output) with a residual, got {got}")
        if residual is None:
            return width, None
        want = (*x.shape[:-1], width)
        if tuple(residual.shape) != want:
            raise ValueError(f"residual must have the output's shape {want}, got {tuple(residual.shape)}")
        return width, residual.reshape(-1, width)

    def forward(
        self,
        x: torch.Tensor,
        *,
        act: str | None = None,
        residual: torch.Tensor | None = None,
        residual_gate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x W^T + b``; with ``act`` ('gelu_tanh' | 'silu') the activation of it (on a
        gated-pairs layer ``act(gate) * up``), then ``+ residual`` - with ``residual_gate``
        (width,) ``residual + residual_gate * y``, a gated residual: computed in the GEMM
        epilogue (one output write) on the CPU and Triton paths, after it elsewhere."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear expects last dim {self.in_features}, got {tuple(x.shape)}")
        rg = residual_gate
        width, res2 = self._epilogue_args(x, act, residual, rg)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        backend = self.backend or getattr(_default, "backend", "auto")
        if self._lean_cpu and x2.device.type == "cpu" and x2.shape[0] and backend in ("auto", "cpu"):
            k = _kernels()
            if k.resolve_backend(None if backend == "auto" else backend, x2.device) == "cpu":
                y = self._forward_cpu(x2, k.ops, act, res2, rg)
                return (y if y.dtype == x.dtype else y.to(x.dtype)).reshape(*lead, width)
        if backend == "reference":
            y = _finish(self.forward_reference(x2), act, self.gated_pairs, res2, rg)
        elif backend in ("auto", "cpu", "triton"):
            # auto: the kernels pick by device (and honour quantvla_kernels.backend_scope)
            y = self._forward_kernels(x2, None if backend == "auto" else backend, act, res2, rg)
        else:
            raise ValueError(f"unknown QuantLinear backend {backend!r}; accepted: {', '.join(BACKENDS)}")
        return y.to(x.dtype).reshape(*lead, width)

    def quantize_input(self, x2: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference activation quantization of the transformed input: (int8 codes, scales)."""
        xt = self.input_transform().apply(x2.to(dtype))
        if self.act_scale is not None:
            s = self.act_scale.to(dtype)
            return quantize_static(xt, self.a_bits, s), s.expand(xt.shape[0])
        return quantize_per_token(xt, self.a_bits)

    def forward_reference(self, x2: torch.Tensor) -> torch.Tensor:
        """Float64 oracle: transform, quantize, dequantize, matmul (no integer kernels used)."""
        w = self.dequantized_weight(torch.float64)
        if self.a_bits is None:
            xd = self.input_transform().apply(x2.to(torch.float64))
        else:
            q, s = self.quantize_input(x2, torch.float64)
            xd = q.to(torch.float64) * s[:, None]
        y = xd @ w.T
        if self.bias is not None:
            y = y + self.bias.to(torch.float64)
        return y

    _CPU_SOURCES = ("qweight", "wgroup", "perm", "inv_smooth", "rotation", "wscale", "bias")

    def _cpu_weight_groups(self, ops, qweight: torch.Tensor) -> tuple:
        """int8 codes for the CPU integer GEMM: per K-group with float group scales; one
        (N, K) tensor per channel otherwise, which for integer group scales is the codes times
        their multipliers (the 8-bit per-channel weight the layer equals)."""
        if self.int_group_scales:
            codes = ops.cpu_weight_groups(qweight, 4, self.in_features, None)[0]
            return (_kernels().group_multiplied_codes(codes, self._buffers["wgroup"], self.group_size),)
        return ops.cpu_weight_groups(qweight, self.w_bits, self.in_features, self.group_size)

    def _cpu_operands(self, ops) -> tuple:
        """Everything the lean CPU forward needs, built on first CPU use and rebuilt when a
        source buffer is replaced or changed in place (keyed by the tensor objects and their
        version counters, read from ``_buffers`` directly: this runs on every call).
        Returns (weight groups or None, int64 perm, fused-extension arguments, (VNNI-packed
        weights, their group column sums) or Nones). Costs N x K bytes per layer: the unpacked
        4-bit codes or, on a CPU with AVX512-VNNI, the VNNI layout (which the compiled linear
        then always uses; 4-bit layers keep only that, 8-bit ones keep it next to their stored
        codes)."""
        bufs = self._buffers
        cache = self._cpu_cache
        if cache is not None:
            try:
                if all(bufs.get(n) is t and (t is None or t._version == v) for n, t, v in cache[0]):
                    return cache[1]
            except RuntimeError:  # an inference tensor (no version counter): rebuild
                pass
        srcs = [(n, bufs.get(n)) for n in self._CPU_SOURCES]
        try:
            key = tuple((n, t, -1 if t is None else t._version) for n, t in srcs)
        except RuntimeError:  # inference tensors carry no version counter: rebuild each call
            key = None
        wscale = bufs["wscale"]
        if tuple(wscale.shape) != (
            (self.out_features, self.in_features // self.group_size)
            if self.group_size and not self.int_group_scales
            else (self.out_features,)
        ):
            raise ValueError(
                f"wscale has shape {tuple(wscale.shape)}, which does not match "
                f"{self.out_features} outputs and group_size {self.group_size}"
            )
        perm = bufs.get("perm")
        fused = _fused_cpu()
        with torch.inference_mode(False):  # normal tensors: usable later outside inference mode
            groups = self._cpu_weight_groups(ops, bufs["qweight"])
            perm64 = None if perm is None else perm.long()
            # the fused extension reads group scales as (G, N) rows
            ws_fused = wscale if wscale.dim() == 1 else wscale.t().contiguous()
            vnni = (None, None)
            if fused is not None and not self._rotate_first and fused.has_vnni():
                full = groups[0] if len(groups) == 1 else torch.cat(groups, 1)
                packed = fused.vnni_pack(full, len(groups))
                if packed:  # the VNNI layout; 4-bit layers then keep only it (the same N x K bytes)
                    vnni = (packed[0], packed[1])
                    if self.w_bits == 4:
                        groups = None
        rotation = bufs.get("rotation")
        # Hadamard rotations (rebuilt from their kind, never trained) run as the fast transform
        hb = (
            self.rotation_block if (self.rotation_kind == "hadamard" and rotation is not None and _FAST_HADAMARD) else 0
        )
        fused_args = (
            bufs.get("inv_smooth"),
            perm64,
            rotation,
            [] if groups is None else list(groups),
            ws_fused,
            bufs.get("bias"),
            qmax(self.a_bits),
            hb,
            float(rotation[0, 0]) if hb else 0.0,
            None,
            0.0,
            0.0,
        )
        value = (groups, perm64, fused_args, vnni)
        if key is not None:
            self._cpu_cache = (key, value)
        return value

    def cpu_cache_bytes(self) -> int:
        """Bytes the lean CPU forward holds beyond the stored codes (0 until first CPU use):
        unpacked 4-bit codes or the VNNI-packed copy (N x K bytes either way)."""
        if self._cpu_cache is None:
            return 0
        groups, _, _, vnni = self._cpu_cache[1]
        total = sum(t.numel() * t.element_size() for t in vnni if t is not None)
        if groups is not None and self.w_bits == 4:  # int8 codes are used in place
            total += sum(g.numel() * g.element_size() for g in groups)
        return total

    def _forward_cpu(self, x2: torch.Tensor, ops, act=None, res2=None, rgate=None) -> torch.Tensor:
        """Lean CPU forward: the compiled fused linear (kernels/cpu_fused.py) where it is built,
        else one pass of the activation transform, int8 codes for 8 and 4 bits (4-bit codes are
        never packed), cached unpacked weights; both compute the same numbers as
        quantize_per_token + gemm_* on backend 'cpu' (the extension's activation: within a few
        ulps of torch's)."""
        groups, perm, fused_args, vnni = self._cpu_operands(ops)
        fused = _fused_cpu()
        if fused is not None and not self._rotate_first and x2.dtype in _FUSED_DTYPES:
            return fused.int_linear(
                x2 if x2.is_contiguous() else x2.contiguous(),
                *fused_args,
                _ACT_CODES[act],
                self.gated_pairs,
                res2,
                *vnni,
                **({} if rgate is None else {"residual_gate": rgate}),
            )
        if groups is None:  # only the VNNI layout is cached (rare dtype on a VNNI machine)
            groups = self._cpu_weight_groups(ops, self.qweight)
        xf = x2 if x2.dtype == torch.float32 else x2.float()
        if self._rotate_first:
            q, xs = ops.cpu_quantize_codes(self.input_transform().apply(xf), self.a_bits)
        else:
            q, xs = ops.cpu_quantize_codes(xf, self.a_bits, self.inv_smooth, perm, self.rotation)
        return _finish(ops.cpu_int_linear(q, xs, groups, self.wscale, self.bias), act, self.gated_pairs, res2, rgate)

    def try_forward_rmsnorm(
        self,
        x: torch.Tensor,
        norm_weight: torch.Tensor,
        eps: float,
        offset: float,
        *,
        act: str | None = None,
        residual: torch.Tensor | None = None,
        norm_shift: torch.Tensor | None = None,
        residual_gate: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """``self(rmsnorm(x))`` with the norm inside the activation quantization, or None where
        that does not apply (the caller then runs norm-then-linear): on Triton
        ``rmsnorm_quantize`` (one kernel: norm, smoothing, rotation, codes), on the CPU the fused
        extension's row pass; the normalised tensor is never written. The caller guarantees that
        the norm's output feeds only this layer (the model's own data flow). Numerics: the norm
        is not rounded to the model dtype before quantization and its sum of squares runs in the
        kernel's order, so codes can differ from norm-then-linear by one step at rounding
        boundaries. Not fused: the reference backend, static scales, weight-only layers,
        permutations, SVD rotations. ``norm_weight`` holds any folded smoothing;
        the norm is ``x * rstd * (offset + w)``. ``act`` / ``residual`` as in :meth:`forward`.
        ``norm_shift`` (K,): an adaptive norm ``x * rstd * (offset + w) + shift`` (pi0.5's adaRMS
        for one sample: w = 1 + scale, offset 0), fused in the CPU extension's row pass and on
        Triton where the row kernel runs (`norm_shift_supported`)."""
        if not _NORM_FUSION:
            return None
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear expects last dim {self.in_features}, got {tuple(x.shape)}")
        rg = residual_gate
        width, res2 = self._epilogue_args(x, act, residual, rg)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        backend = self.backend or getattr(_default, "backend", "auto")
        fusable = (
            self._lean_cpu
            and not self._rotate_first
            and self.perm is None
            and x2.shape[0] > 0
            and (self.rotation is None or (self.rotation_kind == "hadamard" and self.rotation_block >= 16))
        )
        if fusable and backend in ("auto", "cpu", "triton"):
            k = _kernels()
            name = k.resolve_backend(None if backend == "auto" else backend, x2.device)
            if name == "cpu" and x2.device.type == "cpu" and x2.dtype in _FUSED_DTYPES:
                fused = _fused_cpu()
                groups, perm, args, vnni = self._cpu_operands(k.ops)
                if fused is not None and args[7] == (self.rotation_block if self.rotation is not None else 0):
                    y = fused.int_linear(
                        x2 if x2.is_contiguous() else x2.contiguous(),
                        *args[:9],
                        norm_weight.detach(),
                        float(eps),
                        float(offset),
                        _ACT_CODES[act],
                        self.gated_pairs,
                        res2,
                        *vnni,
                        norm_shift=None if norm_shift is None else norm_shift.detach(),
                        **({} if rg is None else {"residual_gate": rg}),
                    )
                    return y.reshape(*lead, width)
            elif (
                name == "triton"
                and self.w_bits in (4, 8)
                and (norm_shift is None or k.norm_shift_supported(self.rotation, self.in_features, self.a_bits))
            ):
                direct = x2.dtype in _KERNEL_DTYPES
                xq, xs = k.rmsnorm_quantize(
                    x2 if direct else x2.float(),
                    norm_weight.detach(),
                    float(eps),
                    bits=self.a_bits,
                    offset=float(offset),
                    inv_smooth=self.inv_smooth,
                    rotation=self.rotation,
                    backend="triton",
                    norm_shift=None if norm_shift is None else norm_shift.detach(),
                )
                out_dtype = x2.dtype if direct else torch.float32
                y = self._gemm(k, xq, xs, out_dtype, "triton", act, res2, rg)
                return y.to(x.dtype).reshape(*lead, width)
        return None

    def _gemm(self, k, xq, xs, out_dtype, backend, act=None, res2=None, rgate=None):
        """The integer GEMM for activation codes ``xq`` with scales ``xs`` (kernels' backends),
        with the activation / gate pairs / residual gate / residual in its epilogue."""
        epi = dict(bias=self.bias, out_dtype=out_dtype, backend=backend, act=act, gated=self.gated_pairs, residual=res2)
        if rgate is not None:
            epi["residual_gate"] = rgate
        if self.a_bits == 8 and self.w_bits == 8:
            return k.gemm_w8a8(xq, xs, self.qweight, self.wscale, **epi)
        if self.w_bits == 4 and self.a_bits in (8, 4):
            gemm = k.gemm_w4a8 if self.a_bits == 8 else k.gemm_w4a4
            return gemm(xq, xs, self.qweight, self.wscale, group_size=self.group_size, group_mult=self.wgroup, **epi)
        raise ValueError(f"no integer kernel for w{self.w_bits}a{self.a_bits}; accepted: w8a8, w4a8, w4a4")

    def _forward_kernels(self, x2: torch.Tensor, backend: str | None, act=None, res2=None, rgate=None) -> torch.Tensor:
        if self.a_bits is None:  # weight-only: dequantize into the compute dtype
            dt = x2.dtype if x2.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
            xt = self.input_transform().apply(x2.to(dt)) if self.has_transform else x2.to(dt)
            y = F.linear(xt, self.dequantized_weight(dt), None if self.bias is None else self.bias.to(dt))
            return y if act is None and res2 is None else _finish(y.float(), act, self.gated_pairs, res2, rgate)
        k = _kernels()
        if not hasattr(k, "gemm_w8a8") or (self.w_bits == 8 and self.group_size):
            # no kernel for this case: exact torch int path
            return _finish(self._forward_int_torch(x2), act, self.gated_pairs, res2, rgate)
        direct = x2.dtype in _KERNEL_DTYPES
        # The quantization kernels read fp16 / bf16 themselves (the same fp32 values as x2.float())
        # and the GEMM epilogue rounds its fp32 result to the model dtype as .to(x.dtype) would:
        # no cast kernels, no fp32 copies of x and y.
        xf = x2 if direct else x2.float()
        out_dtype = x2.dtype if direct else torch.float32
        if self.act_scale is not None:
            xf = xf.float()  # static per-tensor scale: transform, then fixed-scale rounding
            xt = self.input_transform().apply(xf) if self.has_transform else xf
            xq = quantize_static(xt, self.a_bits, self.act_scale)
            xs = self.act_scale.expand(xf.shape[0]).contiguous()
            if self.a_bits == 4:
                xq = k.pack_int4(xq)
        elif self.rotation is not None and self.a_bits == 4 and ((self.in_features % 128) // 2) % self.rotation_block:
            # int4 packing groups would split a rotation block: rotate first, then quantize
            xq, xs = k.quantize_per_token(self.input_transform().apply(xf.float()), bits=4, backend=backend)
        else:
            # smoothing, permutation and block rotation all happen inside the quantization kernel
            xq, xs = k.quantize_per_token(
                xf,
                bits=self.a_bits,
                inv_smooth=self.inv_smooth,
                rotation=self.rotation,
                perm=self.perm,
                backend=backend,
            )
        return self._gemm(k, xq, xs, out_dtype, backend, act, res2, rgate)

    def _forward_int_torch(self, x2: torch.Tensor) -> torch.Tensor:
        """Integer GEMM in plain torch (int32 accumulation), fp32 epilogue; same math as the kernels."""
        xq, xs = self.quantize_input(x2, torch.float32)
        w = self.int_weight()
        if self.int_group_scales:
            w = _kernels().group_multiplied_codes(w, self.wgroup, self.group_size)
        if self.group_size is None or self.int_group_scales:
            acc = xq.to(torch.int32) @ w.to(torch.int32).T
            y = acc.to(torch.float32) * xs[:, None] * self.wscale[None, :]
        else:
            m, kk = xq.shape
            g = kk // self.group_size
            xg = xq.to(torch.int32).reshape(m, g, self.group_size).transpose(0, 1)  # (G, M, gs)
            wg = w.to(torch.int32).reshape(-1, g, self.group_size).permute(1, 2, 0)  # (G, gs, N)
            acc = torch.bmm(xg, wg)  # (G, M, N) exact int32
            y = (acc.to(torch.float32) * self.wscale.T[:, None, :]).sum(0) * xs[:, None]
        return y + self.bias if self.bias is not None else y


def scale_output_channels(module: nn.Module, factor: torch.Tensor | float) -> None:
    """Multiply a linear's outputs by ``factor`` (scalar or (N,)), folded into weight/scale + bias.

    This is how ATM (q rows per head) and OHB (o_proj output) are applied at zero run-time cost.
    """
    with torch.no_grad():
        if isinstance(module, QuantLinear):
            f = torch.as_tensor(factor, dtype=torch.float64).to(module.wscale.device)
            f = f.expand(module.out_features) if f.dim() == 0 else f
            ws = module.wscale.to(torch.float64)
            module.wscale.copy_((ws * (f[:, None] if ws.dim() == 2 else f)).to(torch.float32))
            if module.bias is not None:
                module.bias.copy_((module.bias.to(torch.float64) * f).to(torch.float32))
            return
        if isinstance(module, nn.Linear):
            f = torch.as_tensor(factor, dtype=torch.float64).to(module.weight.device)
            f = f.expand(module.out_features) if f.dim() == 0 else f
            module.weight.copy_((module.weight.to(torch.float64) * f[:, None]).to(module.weight.dtype))
            if module.bias is not None:
                module.bias.copy_((module.bias.to(torch.float64) * f).to(module.bias.dtype))
            return
    raise TypeError(f"cannot scale outputs of {type(module).__name__}; accepted: nn.Linear, QuantLinear")


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


def concat_quant_linears(layers: list[QuantLinear], pairs: bool = False) -> QuantLinear | None:
    """One QuantLinear computing ``cat([l(x) for l in layers], -1)``, or None where the layers
    cannot share one activation quantization (different bits, group size, static scale,
    backend or input transform). ``pairs`` (two layers of equal width, gate and up): the output
    columns interleave them (gate_0, up_0, gate_1, ...) and the result is a gated-pairs layer
    whose epilogue writes act(gate) * up (``forward(x, act=...)``).

    Why: sibling projections that read the same tensor (q/k/v, gate/up) then quantize it once
    and run one GEMM instead of three; every output column is the same integer dot and the same
    per-element epilogue, so the result is bit for bit the separate layers' (tested)."""
    first = layers[0]
    keys = (
        "in_features",
        "w_bits",
        "a_bits",
        "group_size",
        "rotation_kind",
        "rotation_block",
        "static_act",
        "int_group_scales",
    )
    spec0 = first.spec()
    for layer in layers[1:]:
        spec = layer.spec()
        if any(spec[k] != spec0[k] for k in keys) or layer.backend != first.backend:
            return None
        if not all(
            _same(getattr(layer, n), getattr(first, n)) for n in ("inv_smooth", "perm", "rotation", "act_scale")
        ):
            return None
    if spec0["a_bits"] is None or spec0["static_act"]:
        return None  # weight-only / static layers gain nothing from sharing a quantization
    if pairs and (len(layers) != 2 or layers[0].out_features != layers[1].out_features):
        return None
    n = sum(layer.out_features for layer in layers)
    has_bias = any(layer.bias is not None for layer in layers)
    fused = QuantLinear(
        **dict(spec0, out_features=n, bias=has_bias), dtype=first.weight.dtype, backend=first.backend
    ).to(first.qweight.device)
    # rows of every per-output-channel tensor: stacked, or interleaved for gate/up pairs
    join = (
        (lambda ts: torch.stack(ts, 1).reshape(-1, *ts[0].shape[1:]).contiguous())
        if pairs
        else (lambda ts: torch.cat(ts, 0).contiguous())
    )
    with torch.no_grad():
        fused.qweight = join([layer.qweight for layer in layers])
        fused.wscale = join([layer.wscale for layer in layers])
        if first.int_group_scales:
            fused.wgroup = join([layer.wgroup for layer in layers])
        if has_bias:
            fused.bias = join(
                [
                    layer.bias
                    if layer.bias is not None
                    else torch.zeros(layer.out_features, device=layer.qweight.device)
                    for layer in layers
                ]
            )
        for name in ("inv_smooth", "perm", "rotation"):
            if getattr(first, name) is not None:
                setattr(fused, name, getattr(first, name))
    fused.gated_pairs = pairs
    return fused


_FUSED_SOURCES = ("qweight", "wscale", "wgroup", "bias", "inv_smooth", "perm", "rotation")


def _sources(layers) -> tuple | None:
    """(buffers dict, name, tensor, version) of every tensor a fused copy is built from; None
    for inference tensors (no version counter), which are then not fused."""
    try:
        return tuple(
            (
                layer._buffers,
                n,
                layer._buffers.get(n),
                None if layer._buffers.get(n) is None else layer._buffers[n]._version,
            )
            for layer in layers
            for n in _FUSED_SOURCES
        )
    except RuntimeError:
        return None


def _still_valid(sources) -> bool:
    try:
        return all(b.get(n) is t and (t is None or t._version == v) for b, n, t, v in sources)
    except RuntimeError:
        return False


_SIBLING_FUSION = True
_NORM_FUSION = True
_EPILOGUE_FUSION = True


def _observed(modules) -> bool:
    """Whether one of these modules has its own forward hook: fused execution calls a copy
    instead of them, so it steps aside while one is watched (a tracer, a debug hook). Global
    module hooks (profilers) see the fused layer itself and keep it."""
    return any(mod is not None and (mod._forward_hooks or mod._forward_pre_hooks) for mod in modules)


def set_norm_fusion(enabled: bool) -> None:
    """Compute a decoder's RMSNorm inside the following quantized layers' activation
    quantization (True, default) or as its own module first (False: the layer-by-layer numbers,
    used by tests and benchmarks to compare the two)."""
    global _NORM_FUSION
    _NORM_FUSION = bool(enabled)


def set_epilogue_fusion(enabled: bool) -> None:
    """Compute MLP activations (act(gate) * up) and residual adds in the quantized layers' GEMM
    epilogue (True, default) or as separate ops after them (False: the layer-by-layer numbers;
    the fused activation differs from torch's in the last float bits, the residual is summed
    in fp32 before rounding to the model dtype)."""
    global _EPILOGUE_FUSION
    _EPILOGUE_FUSION = bool(enabled)


def epilogue_fusion() -> bool:
    return _EPILOGUE_FUSION


def set_sibling_fusion(enabled: bool) -> None:
    """Run sibling projections as one fused layer (True, default) or one by one (False: the
    same numbers, used by tests and benchmarks to compare the two)."""
    global _SIBLING_FUSION
    _SIBLING_FUSION = bool(enabled)


def fused_siblings(parent: nn.Module, names: tuple[str, ...], pairs: bool = False) -> QuantLinear | None:
    """The fused layer of ``parent``'s children ``names`` if all are QuantLinears that can share
    one activation quantization, else None (float models, mixed layouts). Built on first use,
    rebuilt when a child's codes, scales or transform change (ATM/OHB, reloads), held as a plain
    attribute: not a submodule, not saved, not counted as weights. Its codes are a copy of the
    children's (the children stay the saved, inspectable layers). ``pairs``: the gate/up
    interleaved layout (see concat_quant_linears), cached separately."""
    if not _SIBLING_FUSION:
        return None
    mods = parent._modules
    first = mods.get(names[0])
    if not isinstance(first, QuantLinear):
        return None  # a float model: nothing to fuse
    if _observed(mods.get(n) for n in names):
        return None  # someone hooks a child (a tracer, a profiler, a debug hook): call each one
    if (first.backend or getattr(_default, "backend", "auto")) == "reference":
        return None  # the float64 oracle stays layer by layer
    slot = "_fused_pairs" if pairs else "_fused_siblings"
    cache = parent.__dict__.get(slot)
    if (
        cache is not None
        and cache[0] == names
        and all(mods.get(n) is c for n, c in zip(names, cache[1]))
        and _still_valid(cache[2])
    ):  # this runs on every forward: dict lookups only
        return cache[3]
    layers = [mods.get(n) for n in names]
    if not all(isinstance(layer, QuantLinear) for layer in layers):
        return None
    sources = _sources(layers)
    if sources is None:
        return None
    with torch.inference_mode(False):
        fused = concat_quant_linears(layers, pairs)
    parent.__dict__[slot] = (names, tuple(layers), sources, fused)
    return fused
