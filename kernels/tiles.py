"""GEMM tile configs: the fixed table, shared-memory fitting, the small tuner and tuned-config I/O."""

from __future__ import annotations

import logging
import os

import torch

from .dispatch import log_fallback_once, triton_build_errors, triton_cdiv, triton_next_pow2
from .packing import PACK_GROUP

_SMS: dict = {}
_TUNED: dict = {}
_AUTOTUNE = False


def set_autotune(enabled: bool) -> None:
    """Benchmark a few tile configs per (kernel, M bucket, N, K) on first use (CUDA only, M <= 64,
    never during CUDA-graph capture, where the fixed table is used). Off by default: a tuning
    aid (``benchmarks/kernels.py --autotune``); a deployment loads the measured configs instead
    (:func:`load_tuned_configs`)."""
    global _AUTOTUNE
    _AUTOTUNE = bool(enabled)


def m_bucket(m: int) -> int:
    """Configs are keyed by M rounded up to a power of two (16..1024)."""
    return min(1024, max(16, triton_next_pow2(m)))


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SMS:
        _SMS[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SMS[key]


def _split_for(tiles: int, k_tiles: int, sms: int, min_iters: int) -> int:
    """Power-of-two split-K that brings the CTA count up to about 2 per SM while every split
    keeps at least ``min_iters`` K-iterations."""
    split = 1
    while split < 16 and tiles * split * 2 <= 2 * sms and k_tiles // (split * 2) >= min_iters:
        split *= 2
    return split


def gemm_config(kind: str, m: int, n: int, k: int, device: torch.device, num_sms: int | None = None) -> dict:
    """The fixed (non-tuned) tile table: small M uses BLOCK_M 16/32/64 with split-K, large M
    128x128 tiles; see docs/kernels-notes.md for the reasoning."""
    mb = m_bucket(m)
    sms = num_sms or _num_sms(device)
    kind = {"w8a8f": "w8a8", "w4a8f": "w4a8"}.get(kind, kind)
    if kind == "w8a8":
        bk = min(256, max(32, triton_next_pow2(k)))
        if mb <= 64:
            cfg = dict(BLOCK_M=mb, BLOCK_N=64, BLOCK_K=bk, GROUP_M=1, num_warps=4, num_stages=4)
        elif mb <= 128:
            cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=min(bk, 128), GROUP_M=8, num_warps=4, num_stages=4)
        else:
            cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=min(bk, 128), GROUP_M=8, num_warps=8, num_stages=4)
        k_tiles = triton_cdiv(k, cfg["BLOCK_K"])
    else:  # w4a8 / w4a4: the K tile is one 128-wide packing group
        if mb <= 64:
            # A W4 step moves BLOCK_N x 64 bytes; at BLOCK_N 64 (4 KB) the H200 run reached only
            # 0.9 TB/s, so wider tiles where N allows (unmeasured guess, see kernels-notes.md).
            bn = 128 if n >= 4096 else 64
            cfg = dict(BLOCK_M=mb, BLOCK_N=bn, GROUP_M=1, num_warps=4, num_stages=4)
        elif mb <= 128:
            cfg = dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=8, num_warps=4, num_stages=4)
        else:
            cfg = dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=3)
        # Swapped (acc^T = W x^T): see triton_gemm.py; chosen from Hopper's operand rules after
        # the H200 run, where the unswapped W4 kernel was 3x slower than W8A8. The unswapped
        # kernel stays reachable: a tuned config or ``config=`` with SWAP=False, and the
        # automatic fallback when the swapped one fails to build (gemm._disable_w4_swap).
        cfg["SWAP"] = True
        k_tiles = triton_cdiv(k, PACK_GROUP)
    tiles = triton_cdiv(m, cfg["BLOCK_M"]) * triton_cdiv(n, cfg["BLOCK_N"])
    if kind == "w8a8" and mb <= 64 and cfg["BLOCK_N"] > 32 and tiles < sms and 20 * tiles >= 9 * sms:
        # Narrower tiles fill the card without split-K, whose reduction is one more launch.
        cfg["BLOCK_N"] //= 2
        cfg["SPLIT_K"] = 1
        return fit_smem(kind, cfg)
    cfg["SPLIT_K"] = _split_for(tiles, k_tiles, sms, 2 if mb <= 128 else 4)
    return fit_smem(kind, cfg)


def _candidates(kind: str, m: int, n: int, k: int, device) -> list[dict]:
    """Tile configs the tuner tries: the fixed-table choice plus neighbours in BLOCK_N,
    BLOCK_K (int8 weights) and split-K for small M; wider tiles for large M."""
    base = gemm_config(kind, m, n, k, device)
    out = [base]
    if m_bucket(m) <= 64:
        bks = (256, 512) if kind == "w8a8" else (None,)
        for bn in (32, 64, 128) if kind == "w8a8" else (64, 128):
            for bk in bks:
                k_tiles = triton_cdiv(k, bk or PACK_GROUP)
                for split in (1, 2, 4, 8):
                    if split > 1 and k_tiles // split < 1:
                        continue
                    c = dict(base, BLOCK_N=bn, SPLIT_K=split, num_stages=3 if bk == 512 else 4)
                    if bk:
                        c["BLOCK_K"] = min(bk, max(32, triton_next_pow2(k)))
                    if c not in out:
                        out.append(c)
        if kind != "w8a8":
            out += [dict(c, SWAP=not c.get("SWAP", False)) for c in list(out)]
        else:  # swapped W8A8: weight rows as the 64-row MMA dimension (wgmma-eligible)
            out += [
                dict(c, SWAP=True)
                for c in list(out)
                if c["BLOCK_N"] >= 64 and c.get("BLOCK_K") == min(256, max(32, triton_next_pow2(k)))
            ]
    else:
        if kind != "w8a8":
            out.append(dict(base, SWAP=not base.get("SWAP", False)))
        out += [
            dict(base, BLOCK_N=256, num_warps=8, num_stages=3, SPLIT_K=1),
            dict(base, BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4, SPLIT_K=1),
            dict(base, num_stages=3),
            dict(base, SPLIT_K=2),
        ]
    return out


SMEM_BUDGET = 160 * 1024
"""Bytes of pipelined operand tiles a config may ask for (H100/H200 allow 227 KB per block;
Triton adds layout-conversion scratch on top)."""


def smem_estimate(kind: str, cfg: dict, x_bytes: int = 1) -> int:
    """Shared memory of the software pipeline: stages x (x tile + weight tile)."""
    if kind.startswith("w8a8"):
        per = cfg["BLOCK_M"] * cfg["BLOCK_K"] * x_bytes + cfg["BLOCK_N"] * cfg["BLOCK_K"]
    else:
        per = cfg["BLOCK_M"] * PACK_GROUP * x_bytes + cfg["BLOCK_N"] * (PACK_GROUP // 2)
    return cfg["num_stages"] * per


def fit_smem(kind: str, cfg: dict, x_bytes: int = 1) -> dict:
    """Fewer stages (then a shorter K tile) until the pipeline fits SMEM_BUDGET."""
    cfg = dict(cfg)
    while smem_estimate(kind, cfg, x_bytes) > SMEM_BUDGET:
        if cfg["num_stages"] > 2:
            cfg["num_stages"] -= 1
        elif kind.startswith("w8a8") and cfg["BLOCK_K"] > 64:
            cfg["BLOCK_K"] //= 2
        else:
            break
    return cfg


def _pick_config(kind, m, n, k, device, run, x_bytes: int = 1) -> dict:
    """Tuned config if one was measured for this (kind, M bucket, N, K), else the fixed table.
    The fused float-input kinds reuse their int8-input kind's tuning."""
    base_kind = {"w8a8f": "w8a8", "w4a8f": "w4a8"}.get(kind, kind)
    _load_env_tuned()
    key = (base_kind, m_bucket(m), n, k)
    cfg = _TUNED.get(key)
    if cfg is not None:
        return fit_smem(kind, cfg, x_bytes)
    if (
        not (_AUTOTUNE and device.type == "cuda")
        or base_kind != kind
        or m_bucket(m) > 64
        or torch.cuda.is_current_stream_capturing()
    ):
        return fit_smem(kind, gemm_config(kind, m, n, k, device), x_bytes)
    from triton.testing import do_bench

    best, best_t = None, float("inf")
    for cand in _candidates(kind, m, n, k, device):
        if smem_estimate(kind, cand, x_bytes) > SMEM_BUDGET:
            continue
        try:
            t = do_bench(lambda: run(cand), warmup=5, rep=20)
        except triton_build_errors() as e:  # a config can exceed shared memory on a smaller card
            log_fallback_once(
                f"tile config {cand} for {kind} M<={m_bucket(m)} N={n} K={k}", e, "the tuner skips it", logging.INFO
            )
            continue
        if t < best_t:
            best, best_t = cand, t
    _TUNED[key] = best or gemm_config(kind, m, n, k, device)
    return _TUNED[key]


def tuned_configs() -> list[dict]:
    """What the tuner chose so far (for benchmark reports and for baking into the table)."""
    return [dict(kind=k[0], m_bucket=k[1], N=k[2], K=k[3], **cfg) for k, cfg in _TUNED.items()]


_CFG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SPLIT_K", "SWAP", "num_warps", "num_stages")
_env_loaded = False


def load_tuned_configs(source) -> int:
    """Install tuned configs: a list as returned by :func:`tuned_configs`, or a JSON file holding
    such a list or a benchmark result with ``tuned_configs``.  Keyed by (kind, M bucket, N, K);
    they apply to every card, so load the file measured on the card you run.  Returns the count.
    ``QUANTVLA_TUNED_CONFIGS=<file>`` loads one automatically on first use."""
    if isinstance(source, (str, os.PathLike)):
        import json

        with open(source, encoding="utf-8") as f:
            source = json.load(f)
    if isinstance(source, dict):
        source = source.get("tuned_configs", [])
    if not isinstance(source, list):
        raise ValueError("tuned configs must be a list of dicts (or a JSON file / benchmark result holding one)")
    for i, c in enumerate(source):
        missing = [key for key in ("kind", "m_bucket", "N", "K", "BLOCK_M", "BLOCK_N", "SPLIT_K") if key not in c]
        if missing or c["kind"] not in ("w8a8", "w4a8", "w4a4") or (c["kind"] == "w8a8" and "BLOCK_K" not in c):
            raise ValueError(
                f"tuned config #{i} is malformed (missing {missing or ['BLOCK_K']}, or unknown "
                f"kind {c.get('kind')!r}; kinds: w8a8, w4a8, w4a4): {c}"
            )
        cfg = {key: int(c[key]) for key in _CFG_KEYS if key in c}
        cfg.setdefault("GROUP_M", 1)
        cfg.setdefault("num_warps", 4)
        cfg.setdefault("num_stages", 3)
        _TUNED[(c["kind"], int(c["m_bucket"]), int(c["N"]), int(c["K"]))] = cfg
    return len(source)


def _load_env_tuned() -> None:
    global _env_loaded
    if not _env_loaded:
        _env_loaded = True
        path = os.environ.get("QUANTVLA_TUNED_CONFIGS")
        if path:
            load_tuned_configs(path)
