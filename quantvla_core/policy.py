"""The runtime API: `Policy.load(...)` then `policy.predict(Observation) -> ActionChunk`.

One object hides the model family, quantization, device and normalisation so that the ROS node,
the simulator and the CLI all run policies the same way, with per-stage timings that
synchronise the GPU (timings taken without a sync measure launch queues, not work).
What surrounds the model (tokenizer, prompt, image and state / action conventions) is the
component `policy.io` (policy_io.py): the project's own conventions, or a real checkpoint's
(loaders.external.ExternalIO), which the loaders build without importing this module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import CheckpointError, load_state_into, read_config, verify_manifest
from .config import PRESETS, ModelConfig, preset
from .models import Batch, FlowMatchingVLA, build_model, component_of
from .models.cpu_linear import use_onednn_linears
from .policy_io import PolicyIO, ReferenceIO

DEFAULT_POLICY_DIR = Path(__file__).resolve().parent / "assets" / "default_policy"
# The same policy quantized with QuantVLA W4A8 (MT10 demo frames as calibration).
DEFAULT_W4A8_DIR = Path(__file__).resolve().parent / "assets" / "default_policy_w4a8"
QUANT_FILE = "quantization.json"
# What a committed default policy directory must hold to be loaded (quantization.json as well
# for the W4A8 one); checked before loading so a missing asset is named, not a random model.
_DEFAULT_FILES = ("config.json", "model.safetensors", "manifest.json")


def default_policy_dir(name: str = "default") -> Path:
    """The directory of the committed policy `name` ('default' or 'default-w4a8'), after
    checking that its files are there. Raises CheckpointError naming the first missing file and
    how to get it back; there is no silent fallback to random weights (a preset name such as
    'small' is the way to ask for those)."""
    dirs = {"default": DEFAULT_POLICY_DIR, "default-w4a8": DEFAULT_W4A8_DIR}
    if name not in dirs:
        raise ValueError(f"unknown default policy {name!r}; accepted: {', '.join(dirs)}")
    path = Path(dirs[name])
    needed = _DEFAULT_FILES + ((QUANT_FILE,) if name == "default-w4a8" else ())
    for fname in needed:
        if not (path / fname).is_file():
            raise CheckpointError(
                f"Policy.load({name!r}): the committed policy file {path / fname} is missing. "
                f"It ships in the git repository under quantvla_core/assets/{path.name}/ "
                f"(restore it with `git checkout -- quantvla_core/assets/{path.name}`, or install "
                "from a full clone so the package data is included); docs/default-policy.md says "
                "how to retrain and quantize it. For a model with seeded random weights, load a "
                f"preset instead ({', '.join(PRESETS)})."
            )
    return path


def model_structure(source: str | Path) -> tuple[FlowMatchingVLA, str, dict[str, Any] | None]:
    """(model on the meta device, arch, recorded quantization or None) of 'default',
    'default-w4a8', a preset or a model / artifact directory: what the model is made of, without
    reading or allocating its weights (`quantvla layout` lists the full-size presets this way)."""
    src = str(source)
    if src in ("default", "default-w4a8"):
        src = str(default_policy_dir(src))  # names a missing asset file
    if src in PRESETS:
        cfg = preset(src)
        return build_model(cfg, device="meta"), cfg.arch, None
    path = Path(src)
    if path.is_dir() and (path / "config.json").is_file():
        cfg = read_config(path)
        meta = None
        if (path / QUANT_FILE).is_file():
            from .quant.artifact import read_quant_meta

            meta = read_quant_meta(path)
        return build_model(cfg, device="meta"), cfg.arch, meta
    raise ValueError(
        f"{src!r} is neither 'default', 'default-w4a8', a preset ({', '.join(PRESETS)}) nor a "
        "model directory with config.json"
    )


@dataclass
class Observation:
    images: list[np.ndarray]  # 1..max_cameras frames, uint8 HxWx3 RGB, any size
    instruction: str
    state: np.ndarray  # (state_dim,) raw (un-normalised) proprioception


@dataclass
class ActionChunk:
    actions: np.ndarray  # (horizon, action_dim) float32, in the robot's units
    timings_ms: dict[str, float] = field(default_factory=dict)


def _dtype_from_name(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; accepted: fp32, bf16, fp16")
    return table[name]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; accepted here: cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; accepted: cpu, cuda, cuda:N, auto")
    return dev


def _saved_io(path: Path) -> PolicyIO | None:
    """A model dir derived from a real checkpoint (LeRobot / openpi) keeps that checkpoint's
    tokenizer, prompt format and normalisation in policy_io.json (loaders.IO_FILE); None when
    it has none. The loaders are imported only then: plain model dirs do not pay for them."""
    if not (path / "policy_io.json").is_file():
        return None
    from .loaders import read_io

    return read_io(path)


def _refuse_external_options(source: str, tokenizer, robot) -> None:
    if tokenizer is not None or robot is not None:
        raise ValueError(
            f"Policy.load({source!r}): tokenizer= and robot= apply to a LeRobot or openpi "
            "checkpoint directory (model.safetensors without manifest.json) only; accepted "
            "here: neither"
        )


class Policy:
    """A loaded VLA policy on one device. `io` (default: ReferenceIO of `config`) turns
    observations into model inputs and model outputs into actions."""

    def __init__(
        self,
        model: FlowMatchingVLA,
        config: ModelConfig,
        *,
        name: str = "custom",
        device: str | torch.device | None = "cpu",
        dtype: str | None = None,
        scheme: str = "fp",
        quant_meta: dict[str, Any] | None = None,
        seed: int = 0,
        io: PolicyIO | None = None,
        cuda_graphs: bool = False,
    ):
        self.config = config
        self.name = name
        self.device = resolve_device(device)
        self.dtype = _dtype_from_name(dtype, self.device)
        self.model = model.to(device=self.device)
        # Float parts (and the activations) run in the policy dtype; QuantLinear keeps its
        # integer codes and fp32 scales through .to(dtype), so this is safe for artifacts too.
        self.model = self.model.to(dtype=self.dtype)
        self.scheme = (
            scheme
            if scheme != "fp"
            else {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        )
        self.quant_meta = quant_meta or {}
        self.model.eval()
        if self.device.type == "cpu":  # fp32 float layers through oneDNN (models.cpu_linear)
            use_onednn_linears(self.model)
        self.io: PolicyIO = io if io is not None else ReferenceIO(config)
        self._generator = torch.Generator().manual_seed(seed)
        self._graphs = None
        self.use_cuda_graphs(cuda_graphs)

    # -- loading ------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        source: str | Path = "default",
        device: str | torch.device | None = "cpu",
        dtype: str | None = None,
        seed: int = 0,
        *,
        tokenizer: str | Path | None = None,
        robot: str | None = None,
        cuda_graphs: bool = False,
    ) -> "Policy":
        """'default' (the committed trained policy; an error naming the file when it is missing),
        'default-w4a8' (that policy quantized),
        a preset name (seeded random weights) or a model / quantized-artifact directory.

        A LeRobot or openpi checkpoint directory (model.safetensors, no manifest.json) is
        converted on load (loaders.read_external); for it only, `tokenizer` is the tokenizer
        file's path and `robot` the openpi robot transform (loaders.robots.ROBOTS).
        `cuda_graphs` (CUDA only): chunks replay captured CUDA graphs (quantvla_core.cuda_graphs)."""
        if cuda_graphs:
            policy = cls.load(source, device, dtype, seed, tokenizer=tokenizer, robot=robot)
            policy.use_cuda_graphs(True)
            return policy
        src = str(source)
        if src in ("default", "default-w4a8"):
            _refuse_external_options(src, tokenizer, robot)
            return cls.load(default_policy_dir(src), device, dtype, seed)
        if src in PRESETS:
            _refuse_external_options(src, tokenizer, robot)
            cfg = preset(src)
            return cls(build_model(cfg), cfg, name=src, device=device, dtype=dtype, seed=seed)
        path = Path(src)
        if not path.exists():
            raise CheckpointError(
                f"{src}: no such model directory or preset; accepted: 'default', 'default-w4a8', "
                f"a preset ({', '.join(PRESETS)}) or a directory with config.json"
            )
        if not path.is_dir():
            raise CheckpointError(
                f"{src}: is a file; a model is a directory with config.json, model.safetensors and manifest.json"
            )
        if not (path / "manifest.json").is_file() and (path / "model.safetensors").is_file():
            from .loaders import read_external  # real checkpoints (LeRobot / openpi layouts)

            ext = read_external(path, tokenizer=tokenizer, robot=robot)
            return cls(ext.model, ext.config, io=ext.io, name=path.name, device=device, dtype=dtype, seed=seed)
        _refuse_external_options(src, tokenizer, robot)
        verify_manifest(path)
        cfg = read_config(path)
        model = build_model(cfg, seed=None)
        if (path / QUANT_FILE).is_file():
            from .quant.artifact import load_quantized

            model, meta = load_quantized(model, path, verify=False)  # manifest checked above
            return cls(
                model,
                cfg,
                name=path.name,
                device=device,
                dtype=dtype,
                scheme=meta.get("scheme", "quantized"),
                quant_meta=meta,
                seed=seed,
                io=_saved_io(path),
            )
        load_state_into(model, path)
        return cls(model, cfg, name=path.name, device=device, dtype=dtype, seed=seed, io=_saved_io(path))

    # -- properties ---------------------------------------------------------------------
    @property
    def horizon(self) -> int:
        return self.config.horizon

    @property
    def action_dim(self) -> int:
        """Entries of each returned action (a real checkpoint's robot may use fewer than the model)."""
        return self.io.action_dim(self.config)

    @property
    def state_dim(self) -> int:
        """Entries of the state an Observation carries."""
        return self.io.state_dim(self.config)

    @property
    def state_norm(self):
        return self.io.state_norm

    @property
    def action_norm(self):
        return self.io.action_norm

    @property
    def num_steps(self) -> int:
        return self.config.num_steps

    def describe(self) -> dict[str, Any]:
        params = 0
        weight_bytes = 0
        per_component: dict[str, int] = {}
        for n, t in list(self.model.named_parameters()) + list(self.model.named_buffers()):
            nbytes = t.numel() * t.element_size()
            weight_bytes += nbytes
            per_component[component_of(n)] = per_component.get(component_of(n), 0) + nbytes
            if t.is_floating_point() or t.dtype in (torch.int8, torch.uint8):
                params += t.numel()
        return {
            "name": self.name,
            "arch": self.config.arch,
            "scheme": self.scheme,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "weight_bytes": weight_bytes,
            "weight_bytes_per_component": per_component,
            "horizon": self.horizon,
            "action_dim": self.action_dim,
            "num_steps": self.num_steps,
            "max_cameras": self.config.max_cameras,
            **self.io.describe(self.config),
        }

    def save_io(self, directory: str | Path) -> None:
        """Write the files a model directory derived from this policy needs to keep its IO
        conventions (policy_io.json and the tokenizer for a real checkpoint; none otherwise)."""
        self.io.save(directory)

    # -- inference ----------------------------------------------------------------------
    def preprocess(self, obs: Observation) -> Batch:
        return self.io.to_batch(obs, self.config, self.model).to(self.device, self.dtype)

    @staticmethod
    def _drop_masked(batch: Batch) -> Batch:
        """For one observation, leave out absent cameras and padding tokens entirely: they are
        masked anyway and positions come from the cumulative mask, so the result is the same
        without running the vision tower on blank frames or the backbone on padding."""
        if batch.images.shape[0] != 1:
            return batch
        cams = batch.image_mask[0].nonzero().flatten()
        toks = batch.token_mask[0].nonzero().flatten()
        if len(cams) == 0 or len(toks) == 0:
            return batch
        return Batch(
            batch.images[:, cams],
            batch.image_mask[:, cams],
            batch.tokens[:, toks],
            batch.token_mask[:, toks],
            batch.state,
        )

    def model_inputs(self, obs: Observation) -> Batch:
        """The batch ``predict`` feeds the model for ``obs``: preprocessed on the policy's device
        and dtype, absent cameras and padding tokens left out. Benchmarks time this exact batch."""
        return self._drop_masked(self.preprocess(obs))

    def robot_actions(self, x: torch.Tensor, obs: Observation) -> np.ndarray:
        """The model's normalised chunk (1, horizon, action_dim) for ``obs`` -> (horizon,
        action_dim) float32 in the robot's units (the IO conventions' actions_out); refuses
        non-finite values."""
        actions = np.asarray(self.io.actions_out(x[0].float().cpu().numpy(), obs, self.config), dtype=np.float32)
        if not np.all(np.isfinite(actions)):
            raise FloatingPointError("the model produced non-finite actions; refusing to return them")
        return actions

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def use_cuda_graphs(self, enabled: bool = True) -> None:
        """Run each chunk as replays of CUDA graphs (captured on the first chunk of each input
        shape; quantvla_core.cuda_graphs) or eagerly. CUDA only: a ValueError names the device
        otherwise. Same numbers as eager (the same kernels, replayed). The graphs keep the
        weights as captured: after changing them, switch off and on again (a new capture)."""
        if not enabled:
            if self._graphs is not None:
                self._graphs.release()
            self._graphs = None
            return
        if self._graphs is None:
            from .cuda_graphs import ChunkGraphs

            self._graphs = ChunkGraphs(self.model, self.num_steps, self.device)

    @property
    def cuda_graphs(self) -> bool:
        return self._graphs is not None

    @torch.inference_mode()
    def predict(self, obs: Observation, seed: int | None = None, noise: torch.Tensor | None = None) -> ActionChunk:
        """One action chunk. Raises ValueError (naming the field) on invalid observations."""
        timings: dict[str, float] = {}
        self._sync()
        t0 = last = time.perf_counter()

        def mark(stage: str) -> None:
            nonlocal last
            self._sync()
            now = time.perf_counter()
            timings[stage] = (now - last) * 1e3
            last = now

        batch = self.model_inputs(obs)
        if noise is None:
            gen = torch.Generator().manual_seed(seed) if seed is not None else self._generator
            noise = self.model.sample_noise(1, gen)
        mark("preprocess")
        if self._graphs is not None:  # the same chunk as replays of captured CUDA graphs
            x = self._graphs.run(batch, noise.to(self.device), on_stage=mark)
        else:
            x = self.model.sample_actions(batch, noise.to(self.device), on_stage=mark)
        actions = self.robot_actions(x, obs)
        mark("postprocess")
        steps = [v for k, v in timings.items() if k.startswith("denoise_step_")]
        timings["denoise"] = float(sum(steps))
        timings["total"] = (time.perf_counter() - t0) * 1e3
        return ActionChunk(actions=actions, timings_ms=timings)
