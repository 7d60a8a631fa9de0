"""Quantized artifact directories: write atomically, verify, and load back into a model.

Layout (a model directory plus two files):
  config.json          ModelConfig (as for float models)
  model.safetensors    float tensors with ATM/OHB/smoothing already folded, and for every
                       QuantLinear its qweight (int8 or packed int4 uint8), wscale, bias and
                       stored transforms (inv_smooth, perm, SVD rotation blocks)
  quantization.json    format/version, scheme, QuantConfig, layout, per-module QuantLinear
                       specs, ATM alpha per head, OHB beta per block
  report.json, report.png
  manifest.json        sha256 of every file (checked before anything is loaded)
Nothing is unpickled: tensors come from safetensors, everything else is JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    CheckpointError,
    check_state_dict,
    load_tensors,
    read_json,
    verify_manifest,
    write_manifest,
)
from ..fileio import atomic_directory, atomic_write_json
from .qlinear import QuantLinear
from .quantizers import GROUP_MULT_MAX

QUANT_FILE = "quantization.json"
REPORT_FILE = "report.json"
REPORT_PNG = "report.png"
QUANT_FORMAT = "quantvla-quantization"
QUANT_VERSION = 1
_SPEC_KEYS = {
    "in_features",
    "out_features",
    "w_bits",
    "a_bits",
    "group_size",
    "bias",
    "smooth",
    "permute",
    "rotation_kind",
    "rotation_block",
    "static_act",
    "int_group_scales",
}
# Added later with a default: specs written before it (integer group scales did not exist)
# still load, as float group scales.
_SPEC_DEFAULTS = {"int_group_scales": False}


def save_quantized(directory: str | Path, result) -> Path:
    """Write a QuantResult as an artifact directory (temp dir + os.replace: all or nothing)."""
    from .report import save_png

    directory = Path(directory)
    policy = result.policy
    tensors = {k: v.detach().contiguous().cpu() for k, v in policy.model.state_dict().items()}
    with atomic_directory(directory) as tmp:
        atomic_write_json(tmp / CONFIG_FILE, policy.config.to_dict())
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt", "quantvla": QUANT_FORMAT})
        atomic_write_json(tmp / QUANT_FILE, result.meta)
        if result.report.get("memory"):  # quantize(report=False) has none
            atomic_write_json(tmp / REPORT_FILE, result.report)
            save_png(result.report, tmp / REPORT_PNG)
        policy.save_io(tmp)  # real checkpoints: tokenizer, prompt format, normalisation (else nothing)
        write_manifest(tmp)
    return directory


def read_quant_meta(directory: Path) -> dict[str, Any]:
    meta = read_json(directory / QUANT_FILE, "quantization")
    where = directory / QUANT_FILE
    if not isinstance(meta, dict) or meta.get("format") != QUANT_FORMAT:
        raise CheckpointError(f"{where}: not a quantvla quantization file (expected format {QUANT_FORMAT!r})")
    if meta.get("version") != QUANT_VERSION:
        raise CheckpointError(f"{where}: version {meta.get('version')!r} is not supported; accepted: {QUANT_VERSION}")
    if not isinstance(meta.get("modules"), dict):
        raise CheckpointError(f"{where}: 'modules' must map module names to QuantLinear specs")
    for name, spec in meta["modules"].items():
        if isinstance(spec, dict):
            spec.update({k: v for k, v in _SPEC_DEFAULTS.items() if k not in spec})
        if not isinstance(spec, dict) or set(spec) != _SPEC_KEYS:
            raise CheckpointError(f"{where}: module {name!r} has a bad spec; expected keys {sorted(_SPEC_KEYS)}")
    return meta


def install_quant_linears(model: nn.Module, modules: dict[str, dict]) -> None:
    """Swap the named linears for empty QuantLinears with the recorded specs."""
    found = dict(model.named_modules())
    for name, spec in modules.items():
        old = found.get(name)
        if not isinstance(old, (nn.Linear, QuantLinear)):
            raise CheckpointError(
                f"quantization.json names {name!r}, which is not a linear layer of this "
                f"model ({type(old).__name__ if old is not None else 'missing'})"
            )
        if (old.in_features, old.out_features) != (spec["in_features"], spec["out_features"]):
            raise CheckpointError(
                f"{name}: quantized shape {spec['in_features']}x{spec['out_features']} does "
                f"not match the model's {old.in_features}x{old.out_features}"
            )
        try:
            ql = QuantLinear(**spec, dtype=old.weight.dtype)
        except ValueError as e:
            raise CheckpointError(f"{name}: bad QuantLinear spec ({e})") from None
        parent, _, child = name.rpartition(".")
        setattr(found[parent] if parent else model, child, ql.to(old.weight.device))


def load_quantized(model: nn.Module, directory: str | Path, verify: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Load an artifact into a freshly built float model of the same config.

    Returns (model with QuantLinears in place, quantization metadata). Raises CheckpointError
    naming the file at fault when the directory is incomplete, tampered with or truncated.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not an artifact directory")
    if verify:
        verify_manifest(directory)
    meta = read_quant_meta(directory)
    install_quant_linears(model, meta["modules"])
    tensors = load_tensors(directory / MODEL_FILE)
    check_state_dict(model, tensors, str(directory / MODEL_FILE))
    for name, spec in meta["modules"].items():
        q = tensors[f"{name}.qweight"]
        want = torch.uint8 if spec["w_bits"] == 4 else torch.int8
        if q.dtype != want:
            raise CheckpointError(f"{directory / MODEL_FILE}: {name}.qweight has dtype {q.dtype}, expected {want}")
        if spec["int_group_scales"]:  # loaded as a buffer, not through set_codes: check here
            mult = tensors.get(f"{name}.wgroup")
            if mult is not None and mult.dtype != torch.uint8:
                raise CheckpointError(
                    f"{directory / MODEL_FILE}: {name}.wgroup has dtype {mult.dtype}, expected torch.uint8"
                )
            if mult is not None and mult.numel() and (int(mult.min()) < 1 or int(mult.max()) > GROUP_MULT_MAX):
                raise CheckpointError(
                    f"{directory / MODEL_FILE}: {name}.wgroup holds values outside [1, {GROUP_MULT_MAX}] "
                    "(integer group scales; larger ones would overflow the int8 codes they multiply)"
                )
    model.load_state_dict(tensors, strict=True)
    return model, meta
