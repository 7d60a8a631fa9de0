"""What one benchmark run measures: the camera observation and the variants (FP, quantized
schemes, peers) of one (preset, cameras), built lazily and sharing work between them."""

from __future__ import annotations

import copy

import numpy as np
import torch

from quantvla_core.policy import Observation, Policy

from .variants import (
    QUANT_BITS,
    apply_ao_dynamic_int8,
    apply_torchao,
    build_fp_model,
    calibrated_student,
    quick_quantize,
    with_activation_bits,
)

FRAME_HW = (240, 320)  # a typical robot camera frame; resizing it is part of the chunk


def observation(cfg, cameras: int, seed: int = 0) -> Observation:
    rng = np.random.default_rng(seed)
    imgs = [rng.integers(0, 256, (*FRAME_HW, 3), dtype=np.uint8) for _ in range(cameras)]
    return Observation(
        images=imgs,
        instruction="pick up the red cup and place it in the bin",
        state=rng.normal(0, 0.5, cfg.state_dim).astype(np.float32),
    )


def _policy(model, cfg, name: str, opts, scheme: str) -> Policy:
    return Policy(model, cfg, name=name, device=opts.device, dtype=opts.dtype, scheme=scheme)


class Variants:
    """Builds the variants of one (preset, cameras) lazily, sharing work between them."""

    def __init__(self, cfg, opts):
        self.cfg, self.opts = cfg, opts
        self.torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[opts.dtype]
        self._fp: Policy | None = None
        self._w4a8: Policy | None = None

    def fp(self) -> Policy:
        if self._fp is None:
            model = build_fp_model(self.cfg, self.opts.device, self.torch_dtype)
            self._fp = _policy(model, self.cfg, f"{self.cfg.name}-{self.opts.dtype}", self.opts, "fp")
        return self._fp

    def quantized(self, scheme: str) -> Policy:
        o = self.opts
        if o.quantizer == "calib":
            return calibrated_student(self.fp(), scheme, "synthetic:4", o.layout)
        if scheme == "w4a4" and self._w4a8 is not None:  # same int4 weights, 4-bit activations
            model = with_activation_bits(copy.deepcopy(self._w4a8.model), 4)
            return _policy(model, self.cfg, f"{self.cfg.name}-w4a4", o, "w4a4")
        model = build_fp_model(self.cfg, o.device, self.torch_dtype)
        quick_quantize(model, self.cfg.arch, scheme, o.layout, transforms=o.transforms)
        pol = _policy(model, self.cfg, f"{self.cfg.name}-{scheme}", o, scheme)
        if scheme == "w4a8":
            self._w4a8 = pol
        return pol

    def peer(self, name: str) -> Policy:
        o = self.opts
        if name == "compile":
            fp = self.fp()
            pol = copy.copy(fp)
            pol.model = _compiled_model(fp.model)
            pol.name, pol.scheme = f"{fp.name}+compile", "compile"
            return pol
        if name == "fp32-blas":  # the FP model, every float linear through F.linear (PyTorch's BLAS)
            fp = self.fp()
            pol = copy.copy(fp)
            pol.model = _blas_model(fp.model)
            pol.name, pol.scheme = f"{fp.name}+blas", "fp32-blas"
            return pol
        if name == "bf16":  # the same seeded FP weights, cast to bfloat16
            model = build_fp_model(self.cfg, o.device, torch.bfloat16)
            return Policy(model, self.cfg, name=f"{self.cfg.name}-bf16", device=o.device, dtype="bf16", scheme="bf16")
        model = build_fp_model(self.cfg, o.device, self.torch_dtype)
        if name == "ao-dynamic-int8":
            if self.torch_dtype != torch.float32:
                raise ValueError(f"ao-dynamic-int8 takes fp32 activations; FP here is {o.dtype} (use --dtype fp32)")
            apply_ao_dynamic_int8(model, self.cfg.arch, o.layout)
        else:
            apply_torchao(model, self.cfg.arch, name, o.layout)
        return _policy(model, self.cfg, f"{self.cfg.name}-{name}", o, name)

    def build(self, variant: str) -> Policy:
        if variant == "fp":
            return self.fp()
        if variant in QUANT_BITS:
            return self.quantized(variant)
        return self.peer(variant)


def _compiled_model(model):
    """A shallow copy of the FP model (same parameters) whose three stage functions go through
    torch.compile (inductor's default mode: fusion without GEMM autotuning, which would take
    minutes on a 3B model, and without inductor CUDA graphs: the benchmark captures its own, as
    for every other variant). Instance attributes, so ``sample_actions`` / ``euler_step`` (which
    the runner calls, as ``Policy.predict`` does) reach the compiled functions."""
    compiled = copy.copy(model)
    kw = {"dynamic": False}
    for name in ("encode_images", "encode_prefix", "denoise_step"):
        object.__setattr__(compiled, name, torch.compile(getattr(model, name), **kw))
    return compiled


def _blas_model(model):
    """A shallow copy of the FP model (same parameters) whose three stage functions run every
    float linear through ``F.linear`` (MKL's sgemm in the x86 wheels) instead of oneDNN
    (quantvla_core.models.cpu_linear): the fp32 GEMMs plain PyTorch picks, timed beside ours."""
    from quantvla_core.models.cpu_linear import onednn_linear_enabled, set_onednn_linear

    def with_blas(fn):
        def stage(*args, **kwargs):
            prev = onednn_linear_enabled()
            set_onednn_linear(False)
            try:
                return fn(*args, **kwargs)
            finally:
                set_onednn_linear(prev)

        return stage

    out = copy.copy(model)
    for name in ("encode_images", "encode_prefix", "denoise_step"):
        object.__setattr__(out, name, with_blas(getattr(model, name)))
    return out
