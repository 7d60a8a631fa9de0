"""The machine, software and checkout a benchmark result was measured on (stored in every
result file)."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKOUT = Path(__file__).resolve().parents[2]  # the git checkout this benchmark runs from


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        r = subprocess.run(
            ["git", "-C", str(CHECKOUT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _git_dirty() -> bool | None:
    """Whether the code that ran differs from the commit (library, kernels, benchmarks)."""
    try:
        r = subprocess.run(
            ["git", "-C", str(CHECKOUT), "status", "--porcelain", "--", "quantvla_core", "kernels", "benchmarks"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return bool(r.stdout.strip()) if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device, threads: int, argv: list[str] | None) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv)),
        "git_commit": _git_commit(),
        "git_dirty": _git_dirty(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "device": str(device),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        env["loadavg_start"] = list(os.getloadavg())
    except OSError:
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return env


def device_tag(env: dict[str, Any]) -> str:
    if "gpu" in env:
        name = env["gpu"].lower()
        for key in ("h200", "h100", "a100", "l40s", "a10", "orin", "4090"):
            if key in name:
                return key
        return "".join(ch for ch in name if ch.isalnum())[:16] or "cuda"
    return "cpu"
