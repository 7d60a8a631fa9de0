"""Model directories: config.json + model.safetensors + manifest.json (sha256 of each file).

Every failure names the file or tensor at fault: missing files, checksum mismatches, truncated
or corrupt safetensors, missing/unexpected keys and shape mismatches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .fileio import atomic_directory, atomic_write_json, sha256_file

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "quantvla-model"


class CheckpointError(ValueError):
    """A model directory that cannot be loaded; the message names the file/key and the fix."""


def write_manifest(directory: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    files = {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST_FILE}
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "files": files, **(extra or {})}
    atomic_write_json(directory / MANIFEST_FILE, manifest)
    return manifest


def save_model_dir(
    directory: str | Path,
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """Write atomically: a reader sees the old directory or the complete new one, never a mix.

    extra_files: name -> JSON-able object, written beside the config (e.g. quantization.json).
    """
    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_directory(directory) as tmp:
        atomic_write_json(tmp / CONFIG_FILE, config.to_dict())
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        for name, obj in (extra_files or {}).items():
            atomic_write_json(tmp / name, obj)
        write_manifest(tmp)
    return directory


def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing {what} file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def verify_manifest(directory: Path) -> dict[str, Any]:
    manifest = read_json(directory / MANIFEST_FILE, "manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(
            f"{directory / MANIFEST_FILE}: not a quantvla manifest (expected format {MANIFEST_FORMAT!r})"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{directory / MANIFEST_FILE}: lists no files")
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the manifest but missing")
        actual = sha256_file(path)
        if actual != digest:
            raise CheckpointError(
                f"{path}: sha256 mismatch (manifest {digest[:12]}..., file "
                f"{actual[:12]}...): the file is truncated, corrupt or was edited"
            )
    return manifest


def read_config(directory: str | Path) -> ModelConfig:
    directory = Path(directory)
    try:
        return ModelConfig.from_dict(read_json(directory / CONFIG_FILE, "model config"))
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{directory / CONFIG_FILE}: {e}") from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing weights file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors ({e}); the file is truncated or corrupt") from None


def check_state_dict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise with the full list of differences between a model and a set of tensors."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(tensors))
        if tensors[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(
            f"missing keys ({len(missing)}): {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else "")
        )
    if unexpected:
        problems.append(
            f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}"
            + (" ..." if len(unexpected) > 10 else "")
        )
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:10])}")
    if problems:
        raise CheckpointError(f"{source}: weights do not match the model config: " + " | ".join(problems))


def load_state_into(model: torch.nn.Module, directory: str | Path) -> None:
    directory = Path(directory)
    tensors = load_tensors(directory / MODEL_FILE)
    check_state_dict(model, tensors, str(directory / MODEL_FILE))
    model.load_state_dict(tensors, strict=True)
