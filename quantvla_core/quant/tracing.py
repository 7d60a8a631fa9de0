"""Fold proofs from a traced forward: which tensor every linear really reads, and who made it.

Why: where a smoothing vector may be folded (into a norm's weight, or into the rows of the
linear that produces the input) used to be decided from module NAMES. On a model whose norms
sit elsewhere (Gemma-2/3: ``post_attention_layernorm`` normalises the attention output, and
``pre_feedforward_layernorm`` feeds the MLP) a name-based fold silently computes a different
function. Here the fold target is read off one calibration forward instead:

- every candidate module (anything that is not a Linear and has no Linear child except an
  adaRMS ``dense``) has a forward hook that tags the tensors it returns with its name;
- a ``TorchFunctionMode`` sees every torch call made between modules. For each tagged tensor it
  records every op that reads it (metadata reads such as ``.shape`` and ops that return the very
  same object, such as ``.to(same dtype)``, are not reads). ``F.linear`` outputs and the
  elementwise products of a linear's output (gated MLPs: ``act(gate(x)) * up(x)``) are tagged too;
- every linear has a forward-pre-hook that records the identity of its input tensor per call.

Linears whose per-call input objects are identical form a group (one shared smoothing vector;
found with one dict, O(N)). A group folds into norm N only when, on every call, each member
read an object N returned, and every read of every object N returned is an ``F.linear`` of a
group member. A group folds into producer linear U only when its input is U's output, or the
elementwise product of U's output with a tensor not made by U, with the same shape and no other
reader. Otherwise the inverse smoothing stays inside the quantization op (exact, a few % slower).

Limits: only the code paths the calibration forward runs are seen; ops inside C++ / custom
autograd functions that bypass ``__torch_function__`` are invisible (a tensor read only there
looks unread); the norm's functional form is then checked numerically (``verify_norm_fold``).
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_MUL_NAMES = {"mul", "__mul__", "__rmul__", "mul_"}


def _fname(func) -> str:
    return getattr(func, "__name__", None) or repr(func)


def _is_metadata(func) -> bool:
    """Reads that cannot see values: attribute getters (.shape, .dtype, .device ...) and sizes."""
    name = _fname(func)
    return name in (
        "__get__",
        "size",
        "dim",
        "numel",
        "is_contiguous",
        "stride",
        "data_ptr",
        "element_size",
        "is_floating_point",
        "get_device",
        "__len__",
        "storage_offset",
    )


def _tensors(obj, depth: int = 0):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 2 and isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o, depth + 1)
    elif depth < 2 and isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o, depth + 1)


@dataclass
class TensorInfo:
    """One tagged tensor: who made it and every op that read it."""

    producer: tuple  # ("module", name) | ("linear", name) | ("mul", (tk_a, tk_b))
    shape: tuple
    readers: list = field(default_factory=list)  # ("linear", name) | ("op", func name)


class _Identity:
    """id(tensor) -> (weakref, value); a dead or recycled id never matches."""

    def __init__(self):
        self.map: dict[int, tuple[weakref.ref, Any]] = {}

    def get(self, t: torch.Tensor):
        e = self.map.get(id(t))
        if e is not None and e[0]() is t:
            return e[1]
        return None

    def put(self, t: torch.Tensor, value) -> None:
        key = id(t)
        try:
            ref = weakref.ref(t, lambda _r, k=key, m=self.map: m.pop(k, None) if m.get(k, (None,))[0] is _r else None)
        except TypeError:
            return
        self.map[key] = (ref, value)


class _Mode(TorchFunctionMode):
    def __init__(self, trace: "Trace | None", sdpa: Callable | None):
        super().__init__()
        self.trace = trace
        self.sdpa = sdpa

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.sdpa is not None and func is F.scaled_dot_product_attention:
            self.sdpa(*args, **kwargs)
        out = func(*args, **kwargs)
        if self.trace is not None and not _is_metadata(func):
            self.trace._on_op(func, args, kwargs, out)
        return out


class Trace:
    """Tags, reads and per-call input identities collected during one forward (see module doc)."""

    def __init__(self, model: nn.Module, linear_names: list[str]):
        self.model = model
        mods = dict(model.named_modules())
        self.linear_names = list(linear_names)
        self.weight_owner: dict[int, str] = {}
        for n, m in mods.items():
            if isinstance(m, nn.Linear):
                self.weight_owner[id(m.weight)] = n
        self.ids = _Identity()
        self.tokens = _Identity()
        self.infos: dict[int, TensorInfo] = {}
        self.calls: dict[str, list[tuple[int, int | None]]] = {n: [] for n in linear_names}
        self.module_arg_shapes: dict[str, list[tuple]] = {}
        self.module_out_index: dict[str, int] = {}
        self._next = 0
        self._handles = []
        self.candidates = [n for n, m in mods.items() if _is_candidate(m)]
        for n in self.candidates:
            self._handles.append(mods[n].register_forward_hook(self._module_hook(n), with_kwargs=True))
        for n in linear_names:
            self._handles.append(mods[n].register_forward_pre_hook(self._linear_hook(n)))

    # ---- collection ----
    def _new(self, t: torch.Tensor, producer: tuple) -> int:
        self._next += 1
        tk = self._next
        self.infos[tk] = TensorInfo(producer, tuple(t.shape))
        self.ids.put(t, tk)
        return tk

    def _module_hook(self, name: str):
        def hook(_m, args, kwargs, out):
            if name not in self.module_arg_shapes:
                self.module_arg_shapes[name] = [
                    (tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in args
                ]
            outs = (
                [out]
                if isinstance(out, torch.Tensor)
                else [o for o in out if isinstance(o, torch.Tensor)]
                if isinstance(out, (tuple, list))
                else []
            )
            for i, o in enumerate(outs):
                if o.is_floating_point():
                    self._new(o, ("module", name, i))

        return hook

    def _linear_hook(self, name: str):
        def pre(_m, args):
            if not args or not isinstance(args[0], torch.Tensor):
                self.calls[name].append((-1, None))
                return
            x = args[0]
            tok = self.tokens.get(x)
            if tok is None:
                self._next += 1
                tok = self._next
                self.tokens.put(x, tok)
            self.calls[name].append((tok, self.ids.get(x)))

        return pre

    def _on_op(self, func, args, kwargs, out) -> None:
        is_linear = func is F.linear or _fname(func) == "linear"
        reader: tuple
        if is_linear:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            owner = self.weight_owner.get(id(w)) if w is not None else None
            reader = ("linear", owner) if owner else ("op", "linear")
        else:
            reader = ("op", _fname(func))
        read_tks = []
        for t in _tensors(list(args) + list(kwargs.values())):
            tk = self.ids.get(t)
            if tk is None or t is out:
                continue
            self.infos[tk].readers.append(reader)
            read_tks.append((t, tk))
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            if is_linear and reader[1] != "linear":
                self._new(out, ("linear", reader[1]))
            elif (
                _fname(func) in _MUL_NAMES
                and read_tks
                and any(self.infos[tk].producer[0] == "linear" for _, tk in read_tks)
            ):
                operands = [self.ids.get(a) if isinstance(a, torch.Tensor) else None for a in args[:2]]
                self._new(out, ("mul", tuple(operands)))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ---- analysis ----
    def groups(self) -> list[list[str]]:
        """Linears that read the same tensor object on every call (one smoothing vector), O(N)."""
        by_sig: dict[tuple, list[str]] = {}
        for n in self.linear_names:
            sig = tuple(t for t, _ in self.calls[n])
            if not sig:
                by_sig.setdefault(("uncalled", n), []).append(n)
            else:
                by_sig.setdefault(sig, []).append(n)
        return list(by_sig.values())

    def fold_target(self, members: list[str]) -> tuple[str, str | None, str, int]:
        """(kind, target, why, out_index): kind 'norm' | 'producer' | 'none'."""
        calls = self.calls[members[0]]
        if not calls:
            return "none", None, "never called during calibration", 0
        prods = {tk for _, tk in calls}
        if None in prods:
            return "none", None, "input is not the output of a module or linear seen in the trace", 0
        producers = {self.infos[tk].producer for tk in prods}
        kinds = {p[0] for p in producers}
        if kinds == {"module"}:
            names = {p[1] for p in producers}
            if len(names) != 1 or len({p[2] for p in producers}) != 1:
                return "none", None, f"input comes from several modules {sorted(names)}", 0
            (p,) = {(p[1], p[2]) for p in producers}
            name, idx = p
            allowed = {("linear", m) for m in members}
            for tk, info in self.infos.items():
                if info.producer[:2] == ("module", name):
                    bad = [r for r in info.readers if r not in allowed]
                    if bad:
                        return (
                            "none",
                            None,
                            (f"{name}'s output is also read by {bad[0][1]!r} ({bad[0][0]}), not only by this group"),
                            0,
                        )
            return "norm", name, f"input IS {name}'s output on every call, read only by this group", idx
        if len(producers) != 1 and not all(p[0] in ("linear", "mul") for p in producers):
            return "none", None, "input has several producers", 0
        ups = set()
        allowed = {("linear", m) for m in members}
        for tk in prods:
            info = self.infos[tk]
            if any(r not in allowed for r in info.readers):
                return "none", None, "the input tensor is read by something outside the group", 0
            if info.producer[0] == "linear":
                ups.add(info.producer[1])
                continue
            if info.producer[0] != "mul":
                return "none", None, f"input made by {info.producer[0]}", 0
            ops = [o for o in info.producer[1] if o is not None and self.infos[o].producer[0] == "linear"]
            if len(ops) != 1 or len([o for o in info.producer[1] if o == ops[0]]) != 1:
                return "none", None, "elementwise product of several linear outputs", 0
            u = self.infos[ops[0]]
            if u.shape != info.shape:
                return "none", None, "producer output is broadcast in the product", 0
            if len(u.readers) != 1 or u.readers[0][0] != "op" or u.readers[0][1] not in _MUL_NAMES:
                return "none", None, f"{u.producer[1]}'s output is read elsewhere too", 0
            ups.add(u.producer[1])
        if len(ups) != 1:
            return "none", None, f"input produced by several linears {sorted(ups)}", 0
        (u,) = ups
        if u in members:
            return "none", None, "a member produces its own input", 0
        return "producer", u, f"input is {u}'s output (times a gate) on every call, read only by this group", 0


def _is_candidate(m: nn.Module) -> bool:
    if isinstance(m, (nn.Linear, nn.Embedding)) or type(m).__name__ == "QuantLinear":
        return False
    kids = list(m.children())
    if not kids:
        w = getattr(m, "weight", None)
        return isinstance(w, torch.Tensor) and w.dim() == 1
    return len(kids) == 1 and isinstance(getattr(m, "dense", None), nn.Linear)


def trace_forward(
    model: nn.Module,
    run: Callable[[nn.Module], Any],
    linear_names: list[str],
    extra_hooks: Callable[[], Any] | None = None,
    sdpa: Callable | None = None,
) -> Trace:
    """Run ``run(model)`` once under the tracer; returns the Trace (hooks removed)."""
    tr = Trace(model, linear_names)
    try:
        with _Mode(tr, sdpa), torch.no_grad():
            run(model)
    finally:
        tr.close()
    return tr


# ---- numeric check of a norm fold ---------------------------------------------------------------


def verify_norm_fold(
    norm: nn.Module,
    arg_shapes: list,
    out_index: int,
    inv_smooth: torch.Tensor,
    fold: Callable[[nn.Module, torch.Tensor, float | None], None],
    seed: int = 0,
) -> tuple[float | None, float]:
    """Find the weight offset for which folding makes ``norm`` emit output * inv_smooth.

    Tries the module's own ``offset`` attribute, then 0 (Llama/Qwen: y = n(x) * w) and 1
    (Gemma: y = n(x) * (1 + w)) on a float64 copy with random inputs of the traced shapes.
    Returns (offset or None when none fits, best relative error)."""
    gen = torch.Generator().manual_seed(seed)
    args = []
    for a in arg_shapes:
        if isinstance(a, tuple) and len(a) == 2 and isinstance(a[1], torch.dtype):
            shape = a[0]
            if len(shape) > 2:  # a few rows are enough
                shape = (1,) * (len(shape) - 2) + tuple(shape[-2:])
            args.append(torch.randn(shape, generator=gen, dtype=torch.float64))
        else:
            args.append(a)
    base = copy.deepcopy(norm).to(torch.float64)

    def pick(o):
        if isinstance(o, (tuple, list)):
            o = [t for t in o if isinstance(t, torch.Tensor)][out_index]
        return o.to(torch.float64)

    try:
        with torch.no_grad():
            y0 = pick(base(*args))
    except Exception:  # noqa: BLE001 - a module we cannot call alone: no fold
        return None, float("inf")
    inv = inv_smooth.to(torch.float64)
    want = y0 * inv
    best = float("inf")
    tried = []
    own = getattr(norm, "offset", None)
    for off in ([float(own)] if isinstance(own, (int, float)) else []) + [None, 0.0, 1.0]:
        if off in tried:
            continue
        tried.append(off)
        cand = copy.deepcopy(base)
        try:
            fold(cand, inv, off)
            with torch.no_grad():
                y1 = pick(cand(*args))
        except Exception:  # noqa: BLE001
            continue
        err = float((y1 - want).norm() / want.norm().clamp_min(1e-300))
        best = min(best, err)
        if err < 1e-5:  # norms that compute in fp32 internally (HF Gemma) give ~1e-7; a wrong form gives O(1)
            return (off if off is not None else float(getattr(norm, "offset", 0.0))), err
    return None, best


# ---- attention logits through SDPA (HF-style attention) --------------------------------------------


@torch.no_grad()
def sdpa_logits(
    q, k, v=None, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **_
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits fp32 (B, H, Tq, Tk), bool mask or None) of one scaled_dot_product_attention call."""
    h = q.shape[-3]
    if k.shape[-3] != h:
        k = k.repeat_interleave(h // k.shape[-3], dim=-3)
    s = (q.shape[-1] ** -0.5) if scale is None else scale
    logits = (q.float() @ k.float().transpose(-1, -2)) * s
    mask = None
    if attn_mask is not None:
        mask = attn_mask if attn_mask.dtype == torch.bool else attn_mask > torch.finfo(attn_mask.dtype).min / 2
    if is_causal:
        tq, tk = logits.shape[-2:]
        causal = torch.ones(tq, tk, dtype=torch.bool, device=logits.device).tril()
        mask = causal if mask is None else (mask & causal)
    if logits.dim() == 3:
        logits = logits[None]
    return logits, mask


_SOFTMAX = {"softmax", "_softmax"}


class _SDPAMode(TorchFunctionMode):
    def __init__(self, cb, softmax_cb=None):
        super().__init__()
        self.cb = cb
        self.softmax_cb = softmax_cb

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.cb(*args, **kwargs)
        elif (
            self.softmax_cb is not None
            and _fname(func) in _SOFTMAX
            and args
            and isinstance(args[0], torch.Tensor)
            and args[0].dim() == 4
        ):
            self.softmax_cb(args[0])
        return func(*args, **kwargs)


class attention_logit_scope:
    """While active, every ``F.scaled_dot_product_attention`` call made inside one of the named
    modules is passed as ``callback(name, logits, mask)`` (the project's own attention() reports
    through ``logit_observer``; HF models with attn_implementation='sdpa' through this). Modules
    that compute attention eagerly (HF 'eager', Gemma-2's soft-capped logits) are seen at their
    4-D softmax input instead: masked entries (additive mask at the dtype's minimum, or -inf) are
    excluded; soft-capped logits are observed after the cap."""

    def __init__(self, model: nn.Module, names, callback):
        self.mods = {n: m for n, m in model.named_modules() if n in set(names)}
        self.callback = callback
        self.stack: list[str] = []
        self.handles = []
        self.mode = _SDPAMode(self._on_sdpa, self._on_softmax)

    def _on_sdpa(self, *args, **kwargs):
        if self.stack:
            logits, mask = sdpa_logits(*args, **kwargs)
            self.callback(self.stack[-1], logits, mask)

    def _on_softmax(self, x):
        if not self.stack:
            return
        name = self.stack[-1]
        if hasattr(self.mods[name], "attn_name"):  # the project's attention(): logit_observer reports it
            return
        with torch.no_grad():
            lf = x.detach().float()
            mask = torch.isfinite(lf) & (lf > torch.finfo(x.dtype).min / 2)
            self.callback(name, torch.where(mask, lf, torch.zeros_like(lf)), mask)

    def __enter__(self):
        def push(name):
            def pre(_m, _a):
                self.stack.append(name)  # returns None: the inputs stay as they are

            return pre

        def pop(_m, _a, _o):
            self.stack.pop()  # returns None: the output stays as it is

        for n, m in self.mods.items():
            self.handles.append(m.register_forward_pre_hook(push(n)))
            self.handles.append(m.register_forward_hook(pop))
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        for h in self.handles:
            h.remove()
        self.handles = []
        return False
