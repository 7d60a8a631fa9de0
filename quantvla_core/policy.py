"""The runtime API: `Policy.load(...)` then `policy.predict(Observation) -> ActionChunk`.

One object hides the model family, quantization, device and normalisation so that the ROS node,
the simulator and the CLI all run policies the same way, with per-stage timings that
synchronise the GPU (timings taken without a sync measure launch queues, not work).
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
from .preprocess import Normalizer, images_to_array
from .tokenizer import ByteTokenizer, prompt_text

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
                f"preset instead ({', '.join(PRESETS)}).")
    return path


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
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
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


def _with_policy_io(policy: "Policy", path: Path) -> "Policy":
    """A model dir derived from a real checkpoint (LeRobot / openpi) keeps that checkpoint's
    tokenizer, prompt format and normalisation in policy_io.json; give them back to the policy."""
    if (path / "policy_io.json").is_file():
        from .loaders import with_saved_io
        return with_saved_io(policy, path)
    return policy


class Policy:
    """A loaded VLA policy on one device."""

    def __init__(self, model: FlowMatchingVLA, config: ModelConfig, *, name: str = "custom",
                 device: str | torch.device | None = "cpu", dtype: str | None = None,
                 scheme: str = "fp", quant_meta: dict[str, Any] | None = None, seed: int = 0):
        self.config = config
        self.name = name
        self.device = resolve_device(device)
        self.dtype = _dtype_from_name(dtype, self.device)
        self.model = model.to(device=self.device)
        # Float parts (and the activations) run in the policy dtype; QuantLinear keeps its
        # integer codes and fp32 scales through .to(dtype), so this is safe for artifacts too.
        self.model = self.model.to(dtype=self.dtype)
        self.scheme = scheme if scheme != "fp" else {torch.float32: "fp32", torch.bfloat16: "bf16",
                                                      torch.float16: "fp16"}[self.dtype]
        self.quant_meta = quant_meta or {}
        self.model.eval()
        self.tokenizer = ByteTokenizer()
        self.state_norm = Normalizer(config.state_mean, config.state_std, config.state_dim, "state")
        self.action_norm = Normalizer(config.action_mean, config.action_std, config.action_dim, "action")
        self._generator = torch.Generator().manual_seed(seed)

    # -- loading ------------------------------------------------------------------------
    @classmethod
    def load(cls, source: str | Path = "default", device: str | torch.device | None = "cpu",
             dtype: str | None = None, seed: int = 0) -> "Policy":
        """'default' (the committed trained policy; an error naming the file when it is missing),
        'default-w4a8' (that policy quantized),
        a preset name (seeded random weights) or a model / quantized-artifact directory."""
        src = str(source)
        if src in ("default", "default-w4a8"):
            return cls.load(default_policy_dir(src), device, dtype, seed)
        if src in PRESETS:
            cfg = preset(src)
            return cls(build_model(cfg), cfg, name=src, device=device, dtype=dtype, seed=seed)
        path = Path(src)
        if not path.exists():
            raise CheckpointError(f"{src}: no such model directory or preset; accepted: 'default', 'default-w4a8', "
                                  f"a preset ({', '.join(PRESETS)}) or a directory with config.json")
        if not path.is_dir():
            raise CheckpointError(f"{src}: is a file; a model is a directory with config.json, "
                                  "model.safetensors and manifest.json")
        if not (path / "manifest.json").is_file() and (path / "model.safetensors").is_file():
            from .loaders import load_external  # real checkpoints (LeRobot / openpi layouts)
            return load_external(path, device=device, dtype=dtype, seed=seed)
        verify_manifest(path)
        cfg = read_config(path)
        model = build_model(cfg, seed=None)
        if (path / QUANT_FILE).is_file():
            from .quant.artifact import load_quantized
            model, meta = load_quantized(model, path, verify=False)  # manifest checked above
            return _with_policy_io(cls(model, cfg, name=path.name, device=device, dtype=dtype,
                                       scheme=meta.get("scheme", "quantized"), quant_meta=meta, seed=seed), path)
        load_state_into(model, path)
        return _with_policy_io(cls(model, cfg, name=path.name, device=device, dtype=dtype, seed=seed), path)

    # -- properties ---------------------------------------------------------------------
    @property
    def horizon(self) -> int:
        return self.config.horizon

    @property
    def action_dim(self) -> int:
        return self.config.action_dim

    @property
    def state_dim(self) -> int:
        return self.config.state_dim

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
        return {"name": self.name, "arch": self.config.arch, "scheme": self.scheme,
                "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "weight_bytes": weight_bytes, "weight_bytes_per_component": per_component,
                "horizon": self.horizon, "action_dim": self.action_dim, "num_steps": self.num_steps,
                "max_cameras": self.config.max_cameras}

    # -- inference ----------------------------------------------------------------------
    def preprocess(self, obs: Observation) -> Batch:
        cfg = self.config
        images, image_mask = images_to_array(obs.images, cfg.vision.image_size, cfg.max_cameras)
        state = self.state_norm.normalize(obs.state)
        text = prompt_text(cfg.arch, obs.instruction, state)
        tokens, token_mask = self.tokenizer.encode(text, cfg.max_text_tokens)
        needed = 1 + len(text.encode("utf-8"))
        if cfg.arch == "pi05" and needed > cfg.max_text_tokens:
            raise ValueError(f"the pi0.5 prompt needs {needed} tokens but the model reads {cfg.max_text_tokens}: "
                             "the state and the action cue would be cut off; accepted: a shorter instruction")
        batch = Batch(torch.from_numpy(images)[None], torch.from_numpy(image_mask)[None],
                      torch.from_numpy(tokens)[None], torch.from_numpy(token_mask)[None],
                      torch.from_numpy(state)[None])
        return batch.to(self.device, self.dtype)

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
        return Batch(batch.images[:, cams], batch.image_mask[:, cams], batch.tokens[:, toks],
                     batch.token_mask[:, toks], batch.state)

    def model_inputs(self, obs: Observation) -> Batch:
        """The batch ``predict`` feeds the model for ``obs``: preprocessed on the policy's device
        and dtype, absent cameras and padding tokens left out. Benchmarks time this exact batch."""
        return self._drop_masked(self.preprocess(obs))

    def robot_actions(self, x: torch.Tensor) -> np.ndarray:
        """The model's normalised chunk (1, horizon, action_dim) -> (horizon, action_dim) float32
        in the robot's units; refuses non-finite values."""
        actions = self.action_norm.unnormalize(x[0].float().cpu().numpy()).astype(np.float32)
        if not np.all(np.isfinite(actions)):
            raise FloatingPointError("the model produced non-finite actions; refusing to return them")
        return actions

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def predict(self, obs: Observation, seed: int | None = None, noise: torch.Tensor | None = None
                ) -> ActionChunk:
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
        x = self.model.sample_actions(batch, noise.to(self.device), on_stage=mark)
        actions = self.robot_actions(x)
        mark("postprocess")
        steps = [v for k, v in timings.items() if k.startswith("denoise_step_")]
        timings["denoise"] = float(sum(steps))
        timings["total"] = (time.perf_counter() - t0) * 1e3
        return ActionChunk(actions=actions, timings_ms=timings)
