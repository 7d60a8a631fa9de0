"""`quantvla info | run | demo`: inspect a model, run it on images, or demo the default policy."""

from __future__ import annotations

import argparse
import json

import numpy as np

from .config import PRESETS


def _fmt_count(n: float) -> str:
    return f"{n / 1e6:,.1f}M"


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def cmd_info(args: argparse.Namespace) -> int:
    from .memory_accounting import model_summary

    s = model_summary(args.model)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"model {s['model']}  arch {s['arch']}  scheme {s['scheme']}")
    print(f"{'component':<10} {'params':>12} {'bytes':>14} {'bf16 bytes':>14}")
    for comp, r in s["components"].items():
        print(
            f"{comp:<10} {_fmt_count(r['params']):>12} {_fmt_bytes(r['bytes']):>14} {_fmt_bytes(2 * r['params']):>14}"
        )
    print(
        f"{'total':<10} {_fmt_count(s['total_params']):>12} {_fmt_bytes(s['total_bytes']):>14} "
        f"{_fmt_bytes(2 * s['total_params']):>14}"
    )
    return 0


def print_chunk(chunk, max_rows: int = 8) -> None:
    a = chunk.actions
    print(f"action chunk {a.shape[0]} x {a.shape[1]} (first {min(max_rows, len(a))} steps):")
    with np.printoptions(precision=3, suppress=True, linewidth=120):
        for k, row in enumerate(a[:max_rows]):
            print(f"  t+{k:<3d} {row}")
    t = chunk.timings_ms
    steps = [v for k, v in t.items() if k.startswith("denoise_step_")]
    print(
        "timings (ms): "
        + "  ".join(f"{k} {t[k]:.1f}" for k in ("preprocess", "vision", "prefix", "denoise", "postprocess", "total"))
    )
    if steps:
        print(f"  per denoising step: median {np.median(steps):.2f} ms over {len(steps)} steps")


def _read_image(path: str) -> np.ndarray:
    import cv2

    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"{path}: cannot read image (accepted: PNG, JPEG, BMP, ... readable by OpenCV)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def cmd_run(args: argparse.Namespace) -> int:
    from .policy import Observation, Policy

    pol = Policy.load(args.model, device=args.device)
    images = [_read_image(p) for p in args.image]
    state = np.array(args.state, dtype=np.float32) if args.state else np.zeros(pol.state_dim, np.float32)
    chunk = pol.predict(Observation(images, args.instruction, state), seed=args.seed)
    print(f"policy {pol.name} ({pol.scheme}, {pol.device})")
    print_chunk(chunk, max_rows=args.rows)
    return 0


def synthetic_frame(rng: np.random.Generator, size: tuple[int, int] = (240, 320)) -> np.ndarray:
    """A table-top-like test frame: grey table, a few coloured blocks."""
    h, w = size
    img = np.full((h, w, 3), (90, 90, 100), np.uint8)
    img[h // 2 :] = (140, 110, 80)
    for color in ((220, 40, 40), (40, 180, 60), (40, 80, 220)):
        y, x = rng.integers(h // 2, h - 30), rng.integers(0, w - 30)
        img[y : y + 24, x : x + 24] = color
    return img


def cmd_demo(args: argparse.Namespace) -> int:
    from .policy import Observation, Policy

    pol = Policy.load(args.model, device=args.device)
    d = pol.describe()
    print(
        f"policy {d['name']}: arch {d['arch']}, scheme {d['scheme']}, {_fmt_bytes(d['weight_bytes'])} "
        f"of weights, chunk {d['horizon']} x {d['action_dim']}, {d['num_steps']} denoising steps"
    )
    rng = np.random.default_rng(args.seed)
    for i in range(args.chunks):
        images = [synthetic_frame(rng) for _ in range(min(2, pol.config.max_cameras))]
        chunk = pol.predict(
            Observation(images, "pick up the red block", np.zeros(pol.state_dim, np.float32)), seed=args.seed + i
        )
        print(f"-- chunk {i}")
        print_chunk(chunk, max_rows=4)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameters and bytes per component of a preset or model dir")
    p.add_argument("model", help=f"preset ({', '.join(PRESETS)}) or model/artifact directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("run", help="run a policy on image files and print the chunk and timings")
    p.add_argument("model")
    p.add_argument("--image", action="append", required=True, help="image file (repeat per camera)")
    p.add_argument("--instruction", required=True)
    p.add_argument("--state", type=float, nargs="*", help="proprioceptive state (default zeros)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", type=int, default=10)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="run the default policy on synthetic camera frames")
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--chunks", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
