"""A policy's action chunk as CUDA graphs: vision, prefix and every denoising step captured once
over static input buffers, then replayed for each new observation.

Why: a VLA's action head is launch-bound on a GPU. A denoising step of pi05-3b is a few hundred
small kernels whose weights stream in ~0.2 ms on an H200 while the step took ~4 ms even as a
graph (docs/benchmarks.md); run eagerly, every one of those launches also waits on Python and
the driver. Replaying captured graphs removes that per-launch host work for every scheme alike
(float and quantized), which is what `Policy(cuda_graphs=True)` and the ROS node's
`cuda_graphs` parameter turn on, and what the benchmark's `--exec graph` times.

One graph per stage rather than one for the chunk, so `Policy.predict` still reports vision,
prefix and per-step timings (the stage boundaries cost a replay call each, microseconds).
Graphs are keyed by the input shapes (cameras present, prompt length, batch): a new shape is
captured once (a few hundred ms: warm-up on a side stream, then capture) and kept, up to
`max_shapes` sets (least recently used dropped). The output of `run` is the captured output
buffer: valid until the next `run`. A shape whose capture fails (an op that cannot be captured)
is logged and runs eagerly from then on (after running out of memory it is tried again next time). Graphs hold the weights and the fused layer copies
as they were at capture: after changing the model's weights, `release()` (the Policy's
`use_cuda_graphs(False)` then `True`).
"""

from __future__ import annotations

import gc
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .models import Batch

_FIELDS = ("images", "image_mask", "tokens", "token_mask", "state")
_log = logging.getLogger(__name__)


def shape_key(batch: Batch, noise: torch.Tensor) -> tuple:
    """What a set of graphs is specialised to: every input's shape and dtype."""
    tensors = [getattr(batch, f) for f in _FIELDS] + [noise]
    return tuple((tuple(t.shape), t.dtype) for t in tensors)


@dataclass
class _Captured:
    static: Batch
    x0: torch.Tensor
    vision: Any = None
    prefix: Any = None
    steps: list = field(default_factory=list)
    x_out: torch.Tensor | None = None
    keep: tuple = ()  # every graph output lives as long as the graphs
    pool_bytes: int = 0


class ChunkGraphs:
    """`run(batch, noise)` = `model.sample_actions(batch, noise, num_steps)` as graph replays."""

    def __init__(self, model, num_steps: int, device: str | torch.device, warmup: int = 2, max_shapes: int = 4):
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; this policy runs on {self.device} (use eager)")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if max_shapes < 1:
            raise ValueError(f"max_shapes must be >= 1, got {max_shapes}")
        self.model = model
        self.num_steps = int(num_steps)
        self.warmup = max(1, int(warmup))
        self.max_shapes = int(max_shapes)
        self._sets: OrderedDict[tuple, _Captured] = OrderedDict()
        self._eager: set[tuple] = set()  # shapes whose capture failed: sample_actions instead
        self.last_error: str | None = None  # why the last failed capture failed

    @property
    def capture_bytes(self) -> int:
        """CUDA memory the graphs' private pools keep (the activations of a chunk per shape)."""
        return sum(c.pool_bytes for c in self._sets.values())

    @property
    def shapes(self) -> list[tuple]:
        return list(self._sets)

    def release(self) -> None:
        self._sets.clear()
        self._eager.clear()

    @torch.inference_mode()
    def run(self, batch: Batch, noise: torch.Tensor, on_stage: Callable[[str], None] | None = None) -> torch.Tensor:
        """The chunk's integrated actions (normalised space), from the replayed graphs;
        ``on_stage`` as in ``sample_actions`` ('vision', 'prefix', 'denoise_step_i')."""
        key = shape_key(batch, noise)
        if key in self._eager:
            return self.model.sample_actions(batch, noise, self.num_steps, on_stage=on_stage)
        cap = self._sets.get(key)
        if cap is None:
            try:
                with torch.cuda.device(self.device):
                    cap = self._capture(batch, noise)
            except Exception as exc:  # noqa: BLE001 - any op that cannot be captured
                self.last_error = f"{type(exc).__name__}: {exc}"
                _log.warning(
                    "CUDA graph capture failed for input shapes %s (%s: %s); this shape runs eagerly",
                    [s for s, _ in key],
                    type(exc).__name__,
                    exc,
                )
                if not isinstance(exc, torch.cuda.OutOfMemoryError):  # memory may free up: retry then
                    self._eager.add(key)
                try:
                    torch.cuda.synchronize(self.device)
                except RuntimeError:
                    pass
                return self.model.sample_actions(batch, noise, self.num_steps, on_stage=on_stage)
            self._sets[key] = cap
            while len(self._sets) > self.max_shapes:
                self._sets.popitem(last=False)
        else:
            self._sets.move_to_end(key)
        mark = on_stage or (lambda _name: None)
        with torch.cuda.device(self.device):  # replays launch on the current device's stream
            for f in _FIELDS:
                getattr(cap.static, f).copy_(getattr(batch, f), non_blocking=True)
            cap.x0.copy_(noise, non_blocking=True)
            cap.vision.replay()
            mark("vision")
            cap.prefix.replay()
            mark("prefix")
            for i, g in enumerate(cap.steps):
                g.replay()
                mark(f"denoise_step_{i}")
        return cap.x_out

    def _capture(self, batch: Batch, noise: torch.Tensor) -> _Captured:
        """Warm up eagerly on a side stream (kernels compile and pick their tiles outside the
        capture), then capture vision / prefix (with the chunk's time conditions) / each step."""
        model, dev = self.model, self.device
        static = Batch(*(getattr(batch, f).clone() for f in _FIELDS))
        x0 = noise.float().clone()
        times = [
            torch.full((x0.shape[0],), t, device=dev, dtype=torch.float32) for t in model.time_grid(self.num_steps)
        ]
        dt = model.step_size(self.num_steps)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                cache = model.encode_prefix(static, model.encode_images(static))
                model.prepare_steps(cache, times)
                xx = x0
                for tt in times:
                    xx = model.euler_step(cache, xx, tt, dt, static.state)
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)
        # torch.cuda.graph() empties the allocator cache on entry; do it before measuring too,
        # or the warm-up's freed cache counts against the pool (negative sizes, seen on an H200)
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved(dev)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(dev)  # capture on the model's device, whichever is current
        cap = _Captured(static=static, x0=x0)
        cap.vision = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cap.vision, pool=pool, stream=stream):
            image_tokens = model.encode_images(static)
        cap.prefix = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cap.prefix, pool=pool, stream=stream):
            cache = model.encode_prefix(static, image_tokens)
            model.prepare_steps(cache, times)  # each step graph reads its own t's entry
        xs = [x0]
        for tt in times:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool, stream=stream):
                xs.append(model.euler_step(cache, xs[-1], tt, dt, static.state))
            cap.steps.append(g)
        cap.keep = (image_tokens, cache, xs, times)
        cap.x_out = xs[-1]
        torch.cuda.synchronize(dev)
        cap.pool_bytes = int(torch.cuda.memory_reserved(dev) - before)
        return cap
