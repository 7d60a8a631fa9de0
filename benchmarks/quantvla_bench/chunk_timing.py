"""Time one action chunk stage by stage, the same way for every variant of a policy.

What is timed is the deployed chunk: ``Policy.model_inputs`` (absent cameras and padding
tokens left out, as the node runs them), ``FlowMatchingVLA.sample_actions`` (fp32 integration
state, the network in the policy dtype) and ``Policy.robot_actions``, the very calls
``Policy.predict`` makes; test/test_bench_e2e.py checks that the chunks are equal.

Why not ``Policy.predict``'s own timings: those synchronise the device after every stage and run
eagerly. A fair speed comparison needs (a) device-side timing (CUDA events, no sync between
stages), (b) the same execution for FP and quantized models - on CUDA the vision tower, the
prefix and every denoising step (``euler_step``, the step ``sample_actions`` takes) are captured
as CUDA graphs over static input buffers (the prefix KV cache is written into the same buffers
every chunk) - and (c) on a shared CPU, the thread's CPU time next to wall time, so a
neighbour's load can be told apart from our work.

Stages: preprocess (image resize, tokenize, host->device copies), vision, prefix,
denoise_step_0..N-1, postprocess (device->host, de-normalise); ``denoise`` is their sum of
steps and ``total`` the wall time of the whole chunk.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from quantvla_core.models import Batch

EXEC_MODES = ("eager", "graph")


def stage_names(num_steps: int) -> list[str]:
    return ["preprocess", "vision", "prefix"] + [f"denoise_step_{i}" for i in range(num_steps)] + ["postprocess"]


class ChunkRunner:
    """Runs chunks of one policy for one observation; ``run()`` returns per-stage milliseconds.

    ``exec_mode='graph'`` (CUDA only) captures vision, prefix and each denoising step as CUDA
    graphs after ``warmup`` eager chunks (kernels compile and pick tiles outside capture), with
    the deployed runtime's ``quantvla_core.cuda_graphs.ChunkGraphs``.
    """

    def __init__(self, policy, obs, num_steps: int | None = None, exec_mode: str = "eager", seed: int = 0):
        if exec_mode not in EXEC_MODES:
            raise ValueError(f"exec mode must be one of {EXEC_MODES}, got {exec_mode!r}")
        self.policy = policy
        self.model = policy.model
        self.obs = obs
        self.device = policy.device
        self.cuda = self.device.type == "cuda"
        if exec_mode == "graph" and not self.cuda:
            raise ValueError("exec mode 'graph' needs a CUDA device; use 'eager' on the CPU")
        self.exec_mode = exec_mode
        self.num_steps = int(num_steps or policy.num_steps)
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        self.noise = self.model.sample_noise(1, torch.Generator().manual_seed(seed))
        self.grid = self.model.time_grid(self.num_steps)
        self.dt = self.model.step_size(self.num_steps)
        self.stages = stage_names(self.num_steps)
        self._graphs = None  # quantvla_core.cuda_graphs.ChunkGraphs once captured
        self.capture_bytes = 0  # CUDA memory the graphs' pool keeps (activations of a chunk)
        self.last_actions: np.ndarray | None = None

    # -- the chunk, in pieces (the calls Policy.predict makes) --------------------------------
    def _inputs(self) -> tuple[Batch, torch.Tensor]:
        return self.policy.model_inputs(self.obs), self.noise.to(self.device)

    def _step(self, cache, x: torch.Tensor, tt: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return self.model.euler_step(cache, x, tt, self.dt, state)

    def _times(self) -> list[torch.Tensor]:
        return [torch.full((1,), t, device=self.device, dtype=torch.float32) for t in self.grid]

    # -- clocks ------------------------------------------------------------------------------
    def _mark_factory(self):
        """Returns (mark(stage), finish() -> dict): CUDA events on GPU, wall + thread CPU on CPU."""
        if self.cuda:
            events: list[tuple[str, torch.cuda.Event]] = []
            start = torch.cuda.Event(enable_timing=True)
            start.record()

            def mark(stage: str) -> None:
                e = torch.cuda.Event(enable_timing=True)
                e.record()
                events.append((stage, e))

            def finish() -> dict[str, float]:
                torch.cuda.synchronize(self.device)
                out, prev = {}, start
                for stage, e in events:
                    out[stage] = prev.elapsed_time(e)
                    prev = e
                return out

            return mark, finish
        wall: dict[str, float] = {}
        cpu: dict[str, float] = {}
        last = [time.perf_counter(), time.thread_time()]

        def mark(stage: str) -> None:
            now, now_cpu = time.perf_counter(), time.thread_time()
            wall[stage] = (now - last[0]) * 1e3
            cpu[stage + "@cpu"] = (now_cpu - last[1]) * 1e3
            last[0], last[1] = now, now_cpu

        return mark, lambda: {**wall, **cpu}

    # -- eager -------------------------------------------------------------------------------
    @torch.inference_mode()
    def _run_eager(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        t0, c0 = time.perf_counter(), time.thread_time()
        mark, finish = self._mark_factory()
        batch, noise = self._inputs()
        mark("preprocess")
        x = self.model.sample_actions(batch, noise, self.num_steps, on_stage=mark)
        self.last_actions = self.policy.robot_actions(x, self.obs)
        mark("postprocess")
        out = finish()
        out["total"] = (time.perf_counter() - t0) * 1e3
        if not self.cuda:
            out["total@cpu"] = (time.thread_time() - c0) * 1e3
        return out

    @torch.inference_mode()
    def run_staged(self, stage) -> np.ndarray:
        """One eager chunk, each stage inside the context ``stage(name)`` (names as ``run()``'s
        keys). The launch census counts ops this way, so it sees exactly the chunk that is timed:
        ``sample_actions`` reports the end of each stage, which closes its context and opens the
        next one."""
        with stage("preprocess"):
            batch, noise = self._inputs()
        following = dict(zip(self.stages[1:-2], self.stages[2:-1]))  # vision -> prefix -> step 0 ...
        current = [stage("vision")]
        current[0].__enter__()

        def mark(name: str) -> None:
            current[0].__exit__(None, None, None)
            current[0] = stage(following[name]) if name in following else None
            if current[0] is not None:
                current[0].__enter__()

        try:
            x = self.model.sample_actions(batch, noise, self.num_steps, on_stage=mark)
        except BaseException:
            if current[0] is not None:
                current[0].__exit__(*sys.exc_info())
            raise
        with stage("postprocess"):
            self.last_actions = self.policy.robot_actions(x, self.obs)
        return self.last_actions

    # -- CUDA graphs: the deployed runtime's (quantvla_core.cuda_graphs) ---------------------
    @torch.inference_mode()
    def capture(self, warmup: int = 2) -> None:
        """Capture vision / prefix / each step once, as `Policy(cuda_graphs=True)` does."""
        from quantvla_core.cuda_graphs import ChunkGraphs

        self._graphs = ChunkGraphs(self.model, self.num_steps, self.device, warmup=warmup)
        batch, x = self._inputs()
        self._graphs.run(batch, x)
        torch.cuda.synchronize(self.device)
        if not self._graphs.shapes:  # the runtime fell back to eager: never time that as "graph"
            graphs, self._graphs = self._graphs, None
            raise RuntimeError(f"CUDA graph capture failed: {graphs.last_error}")
        self.capture_bytes = self._graphs.capture_bytes

    @torch.inference_mode()
    def _run_graph(self) -> dict[str, float]:
        if self._graphs is None:
            self.capture()
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        mark, finish = self._mark_factory()
        batch, x = self._inputs()
        mark("preprocess")
        # the copies into the graphs' static inputs (a few KB) count with "vision"
        x_out = self._graphs.run(batch, x, on_stage=mark)
        self.last_actions = self.policy.robot_actions(x_out, self.obs)
        mark("postprocess")
        out = finish()
        out["total"] = (time.perf_counter() - t0) * 1e3
        return out

    def run(self) -> dict[str, float]:
        """One chunk; per-stage ms (+ '@cpu' thread-CPU ms on the CPU), 'denoise' and 'total'."""
        out = self._run_graph() if self.exec_mode == "graph" else self._run_eager()
        out["denoise"] = sum(out[f"denoise_step_{i}"] for i in range(self.num_steps))
        if "denoise_step_0@cpu" in out:
            out["denoise@cpu"] = sum(out[f"denoise_step_{i}@cpu"] for i in range(self.num_steps))
        return out

    def release(self) -> None:
        if self._graphs is not None:
            self._graphs.release()
        self._graphs = None


def _dense_parts(t: torch.Tensor):
    """The plain tensors holding ``t``'s data: itself, or a tensor subclass's inner tensors
    (torchao's quantized weights: codes and scales), recursively."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for n in names:
            yield from _dense_parts(getattr(t, n))
    else:
        yield t


def model_bytes(model) -> int:
    """Device bytes of a model's tensors (parameters and all buffers, shared storage once;
    a tensor subclass counted by its inner tensors)."""
    model = getattr(model, "_model", model)  # a torch.compile wrapper shares the FP weights
    seen: dict[int, int] = {}
    for p in list(model.parameters()) + list(model.buffers()):
        for t in _dense_parts(p):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return int(sum(seen.values()))


def peak_memory_chunk(runner: ChunkRunner) -> dict[str, int] | None:
    """CUDA memory of one variant: its weights + the peak of one chunk's activations (graph
    pool included). Other variants resident on the same device are excluded, which a raw
    ``max_memory_allocated`` would not do."""
    if not runner.cuda:
        return None
    torch.cuda.synchronize(runner.device)
    before = torch.cuda.memory_allocated(runner.device)
    torch.cuda.reset_peak_memory_stats(runner.device)
    runner.run()
    act = int(torch.cuda.max_memory_allocated(runner.device) - before) + runner.capture_bytes
    w = model_bytes(runner.policy.model)
    return {"weights": w, "activations": act, "peak": w + act}
