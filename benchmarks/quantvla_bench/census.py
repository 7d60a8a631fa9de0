"""The benchmark's ``--census``: device kernel launches and bytes moved per stage, no timing.

Why: at batch 1 a denoising step is a few hundred small kernels, so on a GPU its latency is
set as much by the number of launches and the bytes each one moves as by FLOPs. Integer layers
pay off only if they do not add launches (separate activation-quantization kernels, casts) that
eat the bandwidth they save. A census answers that on any machine, without a GPU and without
a noisy clock: run one chunk under a TorchDispatchMode and record every aten op that does work.

Counting rules (tested in test/test_bench_census.py):

- Composite ops (linear, matmul, reshape, einsum, scaled_dot_product_attention) are
  decomposed as eager autograd would, so the ops they actually pick are counted, not the name.
- One launch per aten op that does work. An op does no work when every tensor it returns is a
  view of an input: its schema marks the return as an alias that is not written
  (``Tensor(a)``: view, t, transpose, expand, permute, slice, select, (un)squeeze, split,
  unbind, alias, detach, as_strided, ...), or it returns a fresh-looking tensor that shares an
  input's storage (``_unsafe_view``). Pure allocations (empty, empty_strided, ...) launch
  nothing either. In-place and ``out=`` ops (``Tensor(a!)``) write memory: they count. An op
  that returns no tensor counts if it reads one (``_local_scalar_dense``: ``.item()``).
- Bytes: activation bytes = bytes of the tensor inputs that are not model weights (read) +
  bytes of the outputs (written); ``out=`` arguments count as written only. A tensor's bytes are
  its distinct elements (an expanded, stride-0 dimension counts once) times the element size.
- Weight bytes: inputs whose storage belongs to the model: parameters, buffers, and tensors
  the modules keep as attributes (e.g. QuantLinear's unpacked CPU weight cache). Collected
  before the chunk, by storage pointer, after one warm-up chunk has built such caches.
- ``--census-backend triton``: the integer layers run the Triton kernels (the interpreter on
  the CPU). Each ``kernel[grid](...)`` launch counts once; the aten ops the interpreter issues
  while it runs a kernel are not counted (counting is suspended for the launch). A launch is
  charged the bytes of each distinct tensor argument once (from outside, a kernel's reads and
  writes cannot be told apart), weights separately.
- The compiled CPU extension of quantvla_kernels (cpu_fused) is a third kind: each call counts
  as one launch for its own C++ loops; the aten ops it issues inside (torch._int_mm) count too.

The census counts what runs on the backend in effect (the CPU integer path shows up as
torch._int_mm and friends); the report names that backend.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ALLOCATION_ONLY = frozenset(
    {
        "aten::empty",
        "aten::empty_strided",
        "aten::empty_like",
        "aten::new_empty",
        "aten::new_empty_strided",
        "aten::empty_permuted",
    }
)
TRITON_MODULES = ("quantvla_kernels.triton_gemm", "quantvla_kernels.triton_quant")
TABLE_STAGES = ("vision", "prefix", "step", "chunk")


# ---- counting ------------------------------------------------------------------------------------


@dataclasses.dataclass
class StageCount:
    """What one stage launched and moved."""

    launches: int = 0
    triton_launches: int = 0
    act_read_bytes: int = 0
    act_written_bytes: int = 0
    weight_bytes: int = 0
    ops: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @property
    def act_bytes(self) -> int:
        return self.act_read_bytes + self.act_written_bytes

    @property
    def opaque_launches(self) -> int:
        """Calls of compiled extensions (counted in ``launches``)."""
        return sum(c for k, c in self.ops.items() if k.startswith("cpu_fused:"))

    def add(self, other: "StageCount") -> None:
        self.launches += other.launches
        self.triton_launches += other.triton_launches
        self.act_read_bytes += other.act_read_bytes
        self.act_written_bytes += other.act_written_bytes
        self.weight_bytes += other.weight_bytes
        self.ops.update(other.ops)

    def to_json(self) -> dict[str, Any]:
        return {
            "launches": self.launches,
            "triton_launches": self.triton_launches,
            "act_read_bytes": self.act_read_bytes,
            "act_written_bytes": self.act_written_bytes,
            "act_bytes": self.act_bytes,
            "weight_bytes": self.weight_bytes,
            "ops": dict(self.ops.most_common()),
        }


def _storage_ptr(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse, nested and other storage-less layouts
        return None


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (stride-0 dimensions once)."""
    if t.numel() == 0:
        return 0
    try:
        n = 1
        for size, stride in zip(t.shape, t.stride()):
            if stride != 0:
                n *= size
    except (RuntimeError, NotImplementedError):
        n = t.numel()
    return n * t.element_size()


def weight_storages(module: nn.Module) -> set[int]:
    """Storage pointers of everything a model holds: parameters, buffers and tensors kept as
    module attributes (caches built on first use), nested in tuples / lists / dicts."""
    ptrs: set[int] = set()

    def visit(obj, depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            p = _storage_ptr(obj)
            if p:
                ptrs.add(p)
        elif depth < 4 and isinstance(obj, (tuple, list)):
            for o in obj:
                visit(o, depth + 1)
        elif depth < 4 and isinstance(obj, dict):
            for o in obj.values():
                visit(o, depth + 1)

    module = getattr(module, "_model", module)  # a torch.compile wrapper keeps the FP model
    for m in module.modules():
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            visit(t, 0)
        for k, v in vars(m).items():
            if k not in ("_parameters", "_buffers", "_modules"):
                visit(v, 0)
    return ptrs


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """One entry per distinct (storage, offset, shape, stride): an op given x twice reads it once."""
    seen, out = set(), []
    for t in tensors:
        try:
            key = (_storage_ptr(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        except (RuntimeError, NotImplementedError):
            key = (id(t),)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def is_view_op(func, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> bool:
    """True when ``func`` only re-describes memory it was given (see the module docstring)."""
    schema = func._schema
    if schema.name in ALLOCATION_ONLY:
        return True
    rets = schema.returns
    if rets and all(r.alias_info is not None and not r.alias_info.is_write for r in rets):
        return True  # Tensor(a) / Tensor(a)[]: a view of an argument
    if any(r.alias_info is not None and r.alias_info.is_write for r in rets):
        return False  # in place / out=: writes memory
    if not outputs:
        return not any(t.numel() for t in inputs)  # e.g. .item() reads a tensor: one copy
    in_ptrs = {_storage_ptr(t) for t in inputs}
    return all(t.numel() == 0 or _storage_ptr(t) in in_ptrs for t in outputs)  # _unsafe_view and kin


class OpCensus(TorchDispatchMode):
    """Counts launches and bytes per stage for everything run inside ``with census, census.stage(name)``.
    Ops outside any stage, and inside :meth:`suspended`, are not counted."""

    def __init__(self, weights: Iterable[int] | nn.Module = ()):
        super().__init__()
        self.weights = weight_storages(weights) if isinstance(weights, nn.Module) else set(weights)
        self.stats: dict[str, StageCount] = {}
        self._stage: str | None = None
        self._suspended = 0
        self._seen: list[set] = []  # storages read by aten ops inside an opaque call, innermost last

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[StageCount]:
        prev, self._stage = self._stage, name
        try:
            yield self.stats.setdefault(name, StageCount())
        finally:
            self._stage = prev

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        self._suspended += 1
        try:
            yield
        finally:
            self._suspended -= 1

    def _split(self, tensors: list[torch.Tensor]) -> tuple[int, int]:
        """(activation bytes, weight bytes) of distinct tensors."""
        act = wt = 0
        for t in _unique(tensors):
            if _storage_ptr(t) in self.weights:
                wt += tensor_bytes(t)
            else:
                act += tensor_bytes(t)
        return act, wt

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._stage is None or self._suspended:
            return func(*args, **kwargs)
        # Under inference_mode composite ops (linear, matmul, reshape, einsum, sdpa) arrive whole;
        # run their decomposition under this mode so the kernels they pick are what is counted.
        with self:
            out = func.decompose(*args, **kwargs)
        if out is not NotImplemented:
            return out
        out = func(*args, **kwargs)
        ins = _tensors((args, {k: v for k, v in kwargs.items() if k != "out"}))
        outs = _tensors(out)
        if is_view_op(func, ins, outs):
            return out
        s = self.stats.setdefault(self._stage, StageCount())
        s.launches += 1
        s.ops[str(func)] += 1
        act, wt = self._split(ins)
        s.act_read_bytes += act
        s.weight_bytes += wt
        s.act_written_bytes += sum(tensor_bytes(t) for t in _unique(outs))
        for seen in self._seen:
            seen.update(_storage_ptr(t) for t in ins + outs)
        return out

    @contextlib.contextmanager
    def watching(self) -> Iterator[set]:
        """Storages the aten ops inside the block touch (so an opaque call is not charged again
        for tensors its inner GEMM already read)."""
        seen: set = set()
        self._seen.append(seen)
        try:
            yield seen
        finally:
            self._seen.remove(seen)

    def record_kernel(self, name: str, args: Iterable[Any], outputs: Any = (), triton: bool = True) -> None:
        """One launch of a kernel that aten does not see (a Triton launch, a compiled extension
        call). Tensor arguments count as read: from outside, a kernel's reads and writes of
        the buffers it is given cannot be told apart; returned tensors count as written."""
        if self._stage is None or self._suspended:
            return
        s = self.stats.setdefault(self._stage, StageCount())
        s.launches += 1
        s.triton_launches += int(triton)
        s.ops[name] += 1
        act, wt = self._split(_tensors(list(args)))
        s.act_read_bytes += act
        s.weight_bytes += wt
        s.act_written_bytes += sum(tensor_bytes(t) for t in _unique(_tensors(outputs)))


# ---- Triton launches -----------------------------------------------------------------------------


def triton_census_modules(device: torch.device) -> list:
    """quantvla_kernels' Triton modules, imported for ``device`` (interpreter check on the CPU)."""
    from quantvla_kernels import dispatch

    if device.type != "cuda" and not dispatch.triton_interpreting():
        raise ValueError(
            "--census-backend triton on the CPU needs the Triton interpreter: set "
            "TRITON_INTERPRET=1 in the environment before starting; accepted otherwise: "
            "--census-backend auto"
        )
    return [importlib.import_module(m) for m in TRITON_MODULES]


@contextlib.contextmanager
def count_triton_launches(census: OpCensus, modules: list) -> Iterator[list[str]]:
    """Route every host launch (``kernel[grid](...)`` -> ``kernel.run(grid=..., warmup=False)``)
    of the Triton kernels in ``modules`` through ``census.record_kernel``, with aten counting
    suspended while the kernel runs. Patched on the kernel objects (an instance ``run``), so the
    kernels themselves and the code that launches them are untouched; restored on exit."""
    from triton.runtime.jit import KernelInterface

    patched: list[tuple[Any, bool, Any]] = []

    def wrap(kernel, name: str, run: Callable):
        def launch(*args, grid, warmup, **kwargs):
            if warmup:
                return run(*args, grid=grid, warmup=warmup, **kwargs)
            census.record_kernel(f"triton:{name}", list(args) + list(kwargs.values()))
            with census.suspended():
                return run(*args, grid=grid, warmup=warmup, **kwargs)

        return launch

    names = []
    try:
        for mod in modules:
            for name, obj in sorted(vars(mod).items()):
                if isinstance(obj, KernelInterface) and not any(obj is p[0] for p in patched):
                    had = "run" in vars(obj)
                    patched.append((obj, had, vars(obj).get("run")))
                    obj.run = wrap(obj, name, obj.run)
                    names.append(name)
        yield names
    finally:
        for obj, had, old in reversed(patched):
            if had:
                obj.run = old
            else:
                del obj.run


@contextlib.contextmanager
def count_extension_calls(census: OpCensus) -> Iterator[list[str]]:
    """quantvla_kernels' compiled CPU extension (cpu_fused: quantization and epilogue loops in
    C++ around torch._int_mm) does work aten does not see: each call of one of its functions
    counts as one launch (its own loops), charged the tensor arguments that no aten op inside
    it read (those are counted with that op, e.g. the weights with the int8 GEMM) and its
    result as written. The aten ops it issues are counted as usual. Restored on exit."""
    try:
        from quantvla_kernels import cpu_fused

        ext = cpu_fused.module()
    except Exception:  # not installed, or no compiler: the torch-op path runs, all of it visible
        ext = None
    if ext is None:
        yield []
        return
    saved = {n: f for n, f in vars(ext).items() if callable(f) and not n.startswith("_")}

    def wrap(name, fn):
        def call(*args, **kwargs):
            with census.watching() as seen:
                out = fn(*args, **kwargs)
            own = [t for t in _tensors((args, kwargs)) if _storage_ptr(t) not in seen]
            census.record_kernel(f"cpu_fused:{name}", own, out, triton=False)
            return out

        return call

    try:
        for n, f in saved.items():
            setattr(ext, n, wrap(n, f))
        yield list(saved)
    finally:
        for n, f in saved.items():
            setattr(ext, n, f)


# ---- one policy ----------------------------------------------------------------------------------


def _resolved_backend(device: torch.device) -> str | None:
    try:
        import quantvla_kernels
    except ImportError:
        return None
    return quantvla_kernels.resolve_backend(None, device)


def kernel_backend(device: torch.device) -> str:
    """The quantvla_kernels backend the integer layers use on ``device`` now."""
    try:
        import quantvla_kernels
    except ImportError:
        return "reference (quantvla_kernels not installed)"
    name = quantvla_kernels.resolve_backend(None, device)
    if name == "triton" and device.type != "cuda":
        name += " (interpreter)"
    if name == "cpu":
        try:
            from quantvla_kernels import cpu_fused

            name += " (fused C++ ext)" if cpu_fused.module() is not None else " (torch ops)"
        except ImportError:
            pass
    return name


def census_policy(policy, obs, num_steps: int, backend: str = "auto", warmup: bool = True) -> dict[str, StageCount]:
    """Count one chunk of ``policy`` stage by stage (runner stages; 'step' = denoise step 0,
    'denoise' = all steps, 'chunk' = every stage)."""
    from .chunk_timing import ChunkRunner
    from quantvla_core.quant.qlinear import QuantLinear

    runner = ChunkRunner(policy, obs, num_steps, "eager")
    with quantvla_backend_scope(backend):
        # Triton launches are invisible to aten: instrument them wherever they run (--census-backend
        # triton, or auto on CUDA, where the kernels pick Triton themselves)
        modules = triton_census_modules(policy.device) if _resolved_backend(policy.device) == "triton" else []
        if warmup:  # lazily built caches (CPU weight groups, fused sibling layers) exist first
            runner.run_staged(lambda name: contextlib.nullcontext())
        else:  # the Triton interpreter is too slow for a warm-up chunk: build the same caches on
            # the exact CPU path (the fused sibling layers do not depend on the backend), so the
            # counted chunk sees what every chunk after the first one runs
            import quantvla_kernels

            with quantvla_kernels.backend_scope("cpu"):
                runner.run_staged(lambda name: contextlib.nullcontext())
        census = OpCensus(policy.model)
        quantized = any(isinstance(m, QuantLinear) for m in policy.model.modules())
        with contextlib.ExitStack() as stack:
            if modules:
                stack.enter_context(count_triton_launches(census, modules))
            elif quantized and policy.device.type == "cpu":
                stack.enter_context(count_extension_calls(census))
            stack.enter_context(census)
            runner.run_staged(census.stage)
    stats = dict(census.stats)
    steps = [stats.get(f"denoise_step_{i}", StageCount()) for i in range(runner.num_steps)]
    stats["step"] = steps[0]
    denoise, chunk = StageCount(), StageCount()
    for s in steps:
        denoise.add(s)
    for name, s in census.stats.items():
        chunk.add(s)
    stats["denoise"], stats["chunk"] = denoise, chunk
    return stats


# ---- the bench entry point -----------------------------------------------------------------------


def census_variants(opts) -> list[str]:
    """fp, bf16 (unless FP already is bf16) and the integer schemes asked for."""
    names = ["fp"] + (["bf16"] if opts.dtype != "bf16" else [])
    return names + [s for s in opts.schemes if s != "fp"]


def run_census(opts, argv: list[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Census of every (preset, cameras, variant). Returns the JSON dict."""
    from .machine import environment
    from .runs import Variants as _Variants, observation as _observation
    from quantvla_core.config import preset

    if opts.device.type == "cpu":
        torch.set_num_threads(opts.threads)
    if opts.census_backend == "triton":
        triton_census_modules(opts.device)  # fail before building anything
    env = environment(opts.device, torch.get_num_threads(), argv)
    t_start = time.perf_counter()
    rows, notes = [], []
    for p in opts.presets:
        base = preset(p)
        if opts.steps:
            base.num_steps = opts.steps
        for cams in opts.cameras:
            cfg = dataclasses.replace(base, max_cameras=cams)
            variants = _Variants(cfg, opts)
            obs = _observation(cfg, cams)
            steps = opts.steps or cfg.num_steps
            for name in census_variants(opts):
                try:
                    pol = (
                        variants.peer("bf16")
                        if name == "bf16"
                        else (variants.fp() if name == "fp" else variants.quantized(name))
                    )
                except Exception as e:  # reported, not fatal, as in the timed bench
                    notes.append(f"{cfg.name} {cams} cam: {name} not built: {type(e).__name__}: {e}")
                    continue
                integer = name not in ("fp", "bf16")
                # every row on the same kernels: on Triton the float variants run the float ops
                # that have a Triton form too (adaptive RMSNorm, gated residual), as on a GPU
                backend = opts.census_backend
                t0 = time.perf_counter()
                try:
                    stats = census_policy(
                        pol, obs, steps, backend, warmup=not (backend == "triton" and opts.device.type != "cuda")
                    )
                except Exception as e:  # a variant that cannot run here is reported, not fatal
                    notes.append(f"{cfg.name} {cams} cam: {name} failed: {type(e).__name__}: {str(e)[:200]}")
                    continue
                if progress:
                    print(f"census {cfg.name} {cams} cam {name}: {time.perf_counter() - t0:.1f} s", flush=True)
                with quantvla_backend_scope(backend):
                    kb = kernel_backend(opts.device) if integer or backend == "triton" else "-"
                rows.append(
                    {
                        "preset": cfg.name,
                        "cameras": cams,
                        "steps": steps,
                        "variant": name,
                        "dtype": str(pol.dtype).replace("torch.", ""),
                        "kernel_backend": kb,
                        "stages": {k: v.to_json() for k, v in stats.items()},
                    }
                )
            del variants
    env = dict(env, wall_s=time.perf_counter() - t_start)
    return {
        "format": "quantvla-bench-census",
        "version": 1,
        "environment": env,
        "options": {
            "presets": opts.presets,
            "cameras": opts.cameras,
            "schemes": opts.schemes,
            "dtype": opts.dtype,
            "device": str(opts.device),
            "layout": opts.layout,
            "quantizer": opts.quantizer,
            "transforms": list(opts.transforms),
            "census_backend": opts.census_backend,
            "steps": opts.steps,
        },
        "rows": rows,
        "notes": notes,
    }


def quantvla_backend_scope(backend: str):
    """quantvla_kernels.backend_scope for 'triton'; nothing for 'auto' (the device decides)."""
    if backend != "triton":
        return contextlib.nullcontext()
    import quantvla_kernels

    return quantvla_kernels.backend_scope("triton")


def _reference(rows: list[dict]) -> dict | None:
    """The float row quantized variants are compared with: bf16, or FP when FP is bf16."""
    return next((r for r in rows if r["variant"] == "bf16"), None) or next(
        (r for r in rows if r["variant"] == "fp" and r["dtype"] == "bfloat16"), None
    )


def format_census(result: dict[str, Any]) -> str:
    """Table (stage x variant: launches, activation MiB, weight MiB), then launches of each
    quantized scheme against bf16 per stage, and a WARN line per scheme that needs more launches
    per denoise step than bf16."""
    env = result["environment"]
    mib = 2**20
    out = [
        f"quantvla end-to-end benchmark --census - {env['date_utc']} - {env.get('gpu') or env['cpu']}",
        f"torch {env['torch']}, triton {env.get('triton')}, commit {env.get('git_commit')}"
        f"{' (+ local changes)' if env.get('git_dirty') else ''}",
        f"command: {env['command']}",
        "launches = device kernels one chunk's stage launches (aten ops that do work, Triton launches); "
        "act = activation bytes read + written; weight = model bytes read; step = one denoising step; "
        "chunk = every stage (pre/postprocess and all steps included)",
        "",
    ]
    head = (
        f"{'preset':<10}{'cams':<5}{'variant':<8}{'dtype':<10}{'backend':<22}{'stage':<8}"
        f"{'launches':>9}{'triton':>8}{'act MiB':>10}{'weight MiB':>11}"
    )
    out += [head, "-" * len(head)]
    groups: dict[tuple, list[dict]] = {}
    for r in result["rows"]:
        groups.setdefault((r["preset"], r["cameras"]), []).append(r)
        for st in TABLE_STAGES:
            s = r["stages"][st]
            out.append(
                f"{r['preset']:<10}{r['cameras']:<5}{r['variant']:<8}{r['dtype']:<10}"
                f"{r['kernel_backend'][:21]:<22}{st:<8}{s['launches']:>9}{s['triton_launches']:>8}"
                f"{s['act_bytes'] / mib:>10.2f}{s['weight_bytes'] / mib:>11.2f}"
            )
    out.append("")
    warns = []
    for (p, cams), rows in groups.items():
        ref = _reference(rows)
        quant = [r for r in rows if r["variant"] not in ("fp", "bf16")]
        if ref is None or not quant:
            continue
        out.append(f"{p}, {cams} cam: launches, quantized vs {ref['variant']} ({ref['dtype']})")
        for st in ("vision", "prefix", "step"):
            base = ref["stages"][st]["launches"]
            cells = ", ".join(
                f"{r['variant']} {r['stages'][st]['launches']} ({r['stages'][st]['launches'] - base:+d})" for r in quant
            )
            label = "launches per denoise step" if st == "step" else st
            out.append(f"  {label}: {ref['variant']} {base}; {cells}")
        for r in quant:
            q, b = r["stages"]["step"]["launches"], ref["stages"]["step"]["launches"]
            if q > b:
                warns.append(
                    f"WARN {p} {cams} cam: {r['variant']} launches {q} kernels per denoise step, "
                    f"{q - b} more than {ref['variant']} ({b})"
                )
    out += warns
    if result["notes"]:
        out += ["notes:"] + [f"  - {n}" for n in result["notes"]]
    return "\n".join(out)


def write_census(result: dict[str, Any], out_dir: Path, tag: str | None) -> dict[str, Path]:
    from .machine import device_tag
    from quantvla_core.fileio import atomic_write_bytes, atomic_write_json

    env, o = result["environment"], result["options"]
    stem = tag or (
        f"census-{device_tag(env)}-{env['date_utc'][:10]}-{'+'.join(o['presets'])}"
        + ("-triton" if o["census_backend"] == "triton" else "")
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "txt": out_dir / f"{stem}.txt"}
    atomic_write_json(paths["json"], result)
    atomic_write_bytes(paths["txt"], (format_census(result) + "\n").encode("utf-8"))
    return paths
