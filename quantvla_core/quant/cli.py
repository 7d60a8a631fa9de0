"""`quantvla quantize | layout | ablate | report | recording`: the quantizer from the command line.

Arguments in, library calls, text out: the ablation study is quant/ablation.py, the layout table
quant/layout_table.py, the memory estimate memory_accounting.py, the model lookup
policy.model_structure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import layout as L
from .ablation import TABLE1_LAYOUTS, VARIANTS


def _csv(text: str, accepted, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in accepted]
    if bad or not items:
        raise ValueError(f"bad {what} {bad or text!r}; accepted: {', '.join(accepted)}")
    return items


def _strength(text: str):
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: accepted a number in (0, 1] or 'auto'")
    return value


def _config_from_args(args, **over):
    from .quantize import QuantConfig

    transforms = () if args.transforms in ("", "none") else tuple(t.strip() for t in args.transforms.split(","))
    kw = dict(
        scheme=getattr(args, "scheme", "w4a8"),
        layout=getattr(args, "layout", "quantvla"),
        group_size=None if args.group_size == 0 else args.group_size,
        int_group_scales=not getattr(args, "float_group_scales", False),
        activation=args.activation,
        transforms=transforms,
        smooth_strength=0.5 if args.smooth_strength == "auto" else float(args.smooth_strength),
        rotation=args.rotation,
        atm=not args.no_atm,
        ohb=not args.no_ohb,
        atm_backbone=args.atm_backbone,
        ohb_mlp=args.ohb_mlp,
        order=args.order,
        calib_samples=args.samples,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    kw.update(over)
    return QuantConfig(**kw)


def _add_quant_options(p: argparse.ArgumentParser, with_scheme: bool = True) -> None:
    from .quantize import SCHEMES

    if with_scheme:
        p.add_argument("--scheme", default="w4a8", choices=list(SCHEMES))
        p.add_argument("--layout", default="quantvla", choices=list(L.LAYOUTS))
    p.add_argument(
        "--calib",
        default="synthetic",
        help="synthetic[:N] | folder with observations.jsonl | rosbag2 .mcap file or bag dir | "
        "calibration .yaml (source + topics)",
    )
    p.add_argument(
        "--camera-topics",
        default=None,
        metavar="T1,T2",
        help="recording: comma-separated camera topics in model order (default: the colour "
        "Image/CompressedImage topics, sorted; depth and mono streams are never chosen)",
    )
    p.add_argument(
        "--instruction-topic",
        default=None,
        help="recording: std_msgs/String instruction topic (default: the one String topic "
        "with short text; a URDF or JSON string is never chosen)",
    )
    p.add_argument(
        "--instruction",
        default=None,
        metavar="TEXT",
        help="recording without an instruction topic: this text for every frame",
    )
    p.add_argument(
        "--state-topic",
        default=None,
        help="recording: sensor_msgs/JointState topic (default: the only one, or joint_states); 'none': zero states",
    )
    p.add_argument("--samples", type=int, default=32, help="calibration observations (a further 1/3 is held out)")
    p.add_argument("--group-size", type=int, default=128, help="int4 weight group along K (0 = per channel)")
    p.add_argument(
        "--float-group-scales",
        action="store_true",
        help="one float scale per int4 group instead of integer multiples of a per-channel scale "
        "(the integer form lets the GEMM sum all groups in int32; docs/quantization.md)",
    )
    p.add_argument("--activation", default="dynamic", choices=["dynamic", "static"])
    p.add_argument("--transforms", default="smooth,rotate", help="comma list of smooth,permute,rotate or 'none'")
    p.add_argument(
        "--smooth-strength",
        type=_strength,
        default=0.5,
        help="SmoothQuant-style strength in (0, 1], or 'auto': quantize at 0.15, 0.3 and 0.5 "
        "and keep the closest to the float model on the held-out frames",
    )
    p.add_argument("--rotation", default="hadamard", choices=["hadamard", "svd"])
    p.add_argument("--no-atm", action="store_true", help="skip attention temperature matching")
    p.add_argument("--no-ohb", action="store_true", help="skip output head balancing")
    p.add_argument("--atm-backbone", action="store_true", help="also apply ATM to the backbone attention")
    p.add_argument("--ohb-mlp", action="store_true", help="also balance the action head's MLP down projections")
    p.add_argument("--order", default="sequential", choices=["sequential", "joint"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true")


def calib_source(args, source):
    """``source`` with the recording options given on the command line (None stays None)."""
    from .calibration import merge_options

    if source is None:
        return None
    cams = None
    if args.camera_topics is not None:
        cams = [t.strip() for t in args.camera_topics.split(",") if t.strip()]
        if not cams:
            raise ValueError("--camera-topics: give at least one topic")
    return merge_options(
        source,
        camera_topics=cams,
        instruction_topic=args.instruction_topic,
        state_topic=args.state_topic,
        instruction=args.instruction,
        progress=not args.no_progress,
    )


def cmd_quantize(args) -> int:
    from ..policy import Policy
    from .quantize import quantize
    from .report import render_table

    qc = _config_from_args(args)
    calib, heldout = calib_source(args, args.calib), calib_source(args, args.heldout)
    policy = Policy.load(args.model, device=args.device, dtype="fp32")
    if args.smooth_strength == "auto":
        from .quantize import sweep_smooth_strength

        result, rows = sweep_smooth_strength(policy, qc, calib, heldout=heldout, progress=not args.no_progress)
        print("smoothing strength   held-out action cosine (mean / min)")
        for r in rows:
            mark = "  <- kept" if r["smooth_strength"] == result.meta["config"]["smooth_strength"] else ""
            print(f"  {r['smooth_strength']:<18} {r['cosine_mean']:.5f} / {r['cosine_min']:.4f}{mark}")
    else:
        result = quantize(policy, qc, calib, heldout=heldout, progress=not args.no_progress)
    result.save(args.out)
    print(render_table(result.report))
    print(
        f"\nwrote {args.out} (config.json, model.safetensors, quantization.json, report.json, report.png, "
        "manifest.json)"
    )
    return 0


def cmd_layout(args) -> int:
    from ..memory_accounting import format_estimate, memory_estimate
    from ..policy import model_structure
    from .layout_table import layout_table, recorded_entries, render_layout_table

    model, arch, meta = model_structure(args.model)
    if meta is not None and not args.layout_given:
        scheme, lay = meta["scheme"], meta["config"]["layout"]
        entries = recorded_entries(model, meta["layout"])
    else:
        scheme, lay = args.scheme, args.layout
        entries = L.plan_model(model, arch, lay)
    table = layout_table(model, arch, lay, scheme, entries, other_modules=args.all)
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    print(render_layout_table(table))
    print("\n" + format_estimate(memory_estimate(model, entries, scheme), scheme))
    return 0


def cmd_ablate(args) -> int:
    from ..fileio import atomic_write_json
    from ..policy import Policy
    from .ablation import ablation_combos, closed_loop_ablation, render_ablation, render_closed_loop, run_ablation

    schemes = _csv(args.schemes, ("w8a8", "w4a8", "w4a4", "w8a16", "w4a16"), "schemes")
    layouts = _csv(args.layouts, list(L.LAYOUTS), "layouts")
    variants = _csv(args.variants, list(VARIANTS), "variants")
    policy = Policy.load(args.model, device=args.device, dtype="fp32")
    if args.smooth_strength == "auto":
        raise ValueError(
            "--smooth-strength auto is for `quantvla quantize`; ablate compares fixed "
            "configurations: give a number in (0, 1]"
        )
    base = _config_from_args(args, scheme=schemes[0], layout=layouts[0]).to_dict()
    for k in ("scheme", "layout", "atm", "ohb"):
        base.pop(k)
    combos = ablation_combos(schemes, layouts, variants, args.full)
    if args.sim and not args.save_dir:
        raise ValueError("--sim needs --save-dir: the closed loop runs the saved artifacts")
    rows = run_ablation(
        policy, calib_source(args, args.calib), combos, base, progress=not args.no_progress, save_dir=args.save_dir
    )
    print(render_ablation(rows))
    if args.sim:
        if args.sim != "mt10":
            raise ValueError(f"--sim {args.sim!r}: accepted: mt10")
        out_dir = Path(args.save_dir) / "eval"
        report = closed_loop_ablation(
            args.model,
            rows,
            out_dir,
            episodes=args.episodes,
            replan_steps=args.replan_steps,
            workers=args.workers,
            tasks=args.tasks,
            max_steps=args.max_steps,
            progress=not args.no_progress,
        )
        print("\n" + render_closed_loop(rows, report))
        print(f"eval report: {out_dir}")
    if args.save_dir:
        specs = " ".join(f"--policy {Path(r['artifact']).name}={r['artifact']}" for r in rows)
        print(
            f"\nartifacts in {args.save_dir}; closed-loop success rates (Tables 1-2 in success %):\n"
            f"  quantvla eval --sim mt10 --policy fp={args.model} {specs}"
        )
    if args.out:
        atomic_write_json(args.out, {"model": args.model, "calib": args.calib, "rows": rows})
        print(f"\nwrote {args.out}")
    return 0


def cmd_report(args) -> int:
    from ..checkpoint import read_json
    from .report import render_table

    rep = read_json(Path(args.artifact) / "report.json", "report")
    print(json.dumps(rep, indent=2) if args.json else render_table(rep))
    return 0


def cmd_recording(args) -> int:
    """`quantvla recording show|synth`: what calibration would take from a recording; or write a
    synthetic one with a real robot's topic mix (to try the pipeline before recording)."""
    from .. import recordings as R

    path = Path(args.path)
    if args.action == "synth":
        w, _, h = args.size.partition("x")
        if not (w.isdigit() and h.isdigit() and int(w) >= 16 and int(h) >= 16):
            raise ValueError(f"--size {args.size!r}: accepted WIDTHxHEIGHT, e.g. 320x240")
        if args.seconds <= 0 or args.rate <= 0 or args.episodes < 1:
            raise ValueError("--seconds and --rate must be positive, --episodes at least 1")
        path.parent.mkdir(parents=True, exist_ok=True)
        info = R.write_synthetic_recording(
            path, seconds=args.seconds, rate_hz=args.rate, size=(int(h), int(w)), episodes=args.episodes
        )
        t = info["topics"]
        print(
            f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): {len(info['times_ns'])} frames on "
            f"{', '.join(t['cameras'])}; depth {t['depth']}; URDF {t['urdf']}; {t['instruction']}; {t['state']}"
        )
        if args.frames:
            import cv2

            frames = Path(args.frames)
            frames.mkdir(parents=True, exist_ok=True)
            obs = R.read_samples(path, 4, 2, 1, log=lambda m: None)[0][0]
            for name, img in zip(("cam_high", "cam_wrist"), obs.images):
                if not cv2.imwrite(str(frames / f"{name}.png"), img[..., ::-1]):
                    raise ValueError(f"cannot write {frames / (name + '.png')}")
            print(f"wrote {frames}/cam_high.png, {frames}/cam_wrist.png (the first frame)")
        return 0
    s = R.scan(R.recording_files(path), progress=not args.no_progress)
    print(f"{path}: {s.messages} messages")
    for topic, info in sorted(s.topics.items()):
        span = (info.last_ns - info.first_ns) / 1e9
        note = f"  (not used: {info.problem})" if info.problem else ""
        print(f"  {topic:<40} {info.schema:<34} {info.count:>7} msgs over {span:7.1f} s{note}")
    cams = [t.strip() for t in args.camera_topics.split(",") if t.strip()] if args.camera_topics else None
    sel = R.select_topics(
        s, str(path), args.max_cameras, cams, args.instruction_topic, args.state_topic, args.instruction
    )
    print(
        f"calibration would use: cameras {', '.join(sel.cameras)}; instruction "
        f"{sel.instruction or repr(args.instruction)}; state {sel.state or 'zeros'}"
    )
    for note in sel.notes:
        print(f"  {note}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "recording",
        help="show what calibration takes from a rosbag2 .mcap recording, "
        "or write a synthetic one with a robot's topic mix",
    )
    p.add_argument(
        "action",
        choices=["show", "synth"],
        help="show: topics and the calibration choice; synth: write a synthetic recording to PATH",
    )
    p.add_argument("path", help=".mcap file or bag directory")
    p.add_argument("--camera-topics", default=None, help="show: as for quantize")
    p.add_argument("--instruction-topic", default=None, help="show: as for quantize")
    p.add_argument("--instruction", default=None, help="show: as for quantize")
    p.add_argument("--state-topic", default=None, help="show: as for quantize")
    p.add_argument("--max-cameras", type=int, default=2, help="show: cameras the model takes (default 2)")
    p.add_argument("--seconds", type=float, default=20.0, help="synth: length (default 20)")
    p.add_argument("--rate", type=float, default=15.0, help="synth: camera frames per second (default 15)")
    p.add_argument("--size", default="320x240", help="synth: WIDTHxHEIGHT (default 320x240)")
    p.add_argument("--episodes", type=int, default=2, help="synth: episodes, 2 s apart (default 2)")
    p.add_argument("--frames", default=None, help="synth: also write the first frame of each camera as PNG here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_recording)

    p = subparsers.add_parser("quantize", help="post-training quantization (QuantVLA) into an artifact directory")
    p.add_argument("model", help="'default', a preset or a model directory")
    p.add_argument("--out", required=True, help="artifact directory to write (atomically)")
    p.add_argument(
        "--heldout",
        default=None,
        help="a separate held-out source for the report (same forms as "
        "--calib); default: part of the calibration source",
    )
    _add_quant_options(p)
    p.set_defaults(func=cmd_quantize)

    p = subparsers.add_parser("layout", help="print every linear layer with its role and precision")
    p.add_argument("model", help="'default', 'default-w4a8', a preset, a model directory or a quantized artifact")
    p.add_argument("--layout", default=None, choices=list(L.LAYOUTS))
    p.add_argument("--scheme", default="w4a8", choices=["w8a8", "w4a8", "w4a4", "w8a16", "w4a16"])
    p.add_argument("--all", action="store_true", help="also list non-linear modules with weights (all float)")
    p.add_argument("--json", action="store_true")

    def _layout(args):
        args.layout_given = args.layout is not None
        args.layout = args.layout or "quantvla"
        return cmd_layout(args)

    p.set_defaults(func=_layout)

    p = subparsers.add_parser(
        "ablate",
        help="layouts x {none, ATM, OHB, ATM+OHB} x schemes: fidelity tables (and closed-loop success with --sim mt10)",
    )
    p.add_argument("model")
    p.add_argument("--sim", choices=["mt10"], help="also run every variant in closed loop (needs --save-dir)")
    p.add_argument("--episodes", type=int, default=10, help="with --sim: episodes per task (default 10)")
    p.add_argument("--replan-steps", type=int, default=16, help="with --sim: actions run per chunk")
    p.add_argument("--workers", type=int, default=2, help="with --sim: parallel simulator workers")
    p.add_argument("--tasks", nargs="+", help="with --sim: MT10 tasks (default: all ten)")
    p.add_argument("--max-steps", type=int, default=0, help="with --sim: episode step limit (default: the env's 200)")
    p.add_argument("--schemes", default="w8a8,w4a8")
    p.add_argument("--layouts", default=",".join(TABLE1_LAYOUTS))
    p.add_argument("--variants", default="none,atm,ohb,atm+ohb")
    p.add_argument("--full", action="store_true", help="every scheme x layout x variant, not just the two tables")
    p.add_argument("--save-dir", default=None, help="also write every variant as an artifact here (for quantvla eval)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    _add_quant_options(p, with_scheme=False)
    p.set_defaults(func=cmd_ablate)

    p = subparsers.add_parser("report", help="print the report stored in a quantized artifact")
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_report)
