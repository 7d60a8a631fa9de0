"""`quantvla quantize | layout | ablate | report`: the quantizer from the command line."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from . import layout as L

VARIANTS = {"none": (False, False), "atm": (True, False), "ohb": (False, True), "atm+ohb": (True, True)}
TABLE1_LAYOUTS = ("llm", "dit-all", "dit-mlp", "llm+dit-all", "llm+dit-mlp")


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


def _model_for_layout(source: str):
    """(model on the meta device or loaded, arch, recorded quantization or None)."""
    from ..checkpoint import read_config
    from ..config import PRESETS, preset
    from ..models import build_model
    from ..policy import default_policy_dir

    if source in ("default", "default-w4a8"):
        source = str(default_policy_dir(source))  # names a missing asset file
    if source in PRESETS:
        cfg = preset(source)
        return build_model(cfg, device="meta"), cfg.arch, None
    path = Path(source)
    if path.is_dir() and (path / "config.json").is_file():
        cfg = read_config(path)
        meta = None
        if (path / "quantization.json").is_file():
            from .artifact import read_quant_meta

            meta = read_quant_meta(path)
        return build_model(cfg, device="meta"), cfg.arch, meta
    raise ValueError(
        f"{source!r} is neither 'default', 'default-w4a8', a preset ({', '.join(PRESETS)}) nor a "
        "model directory with config.json"
    )


def memory_estimate(model, entries, scheme: str, group_size: int | None = 128) -> dict[str, dict[str, int]]:
    """FP16 vs quantized bytes per component, from shapes alone (codes + fp32 scales + bias)."""
    from ..models import component_of
    from .quantize import SCHEMES

    w_bits, _ = SCHEMES[scheme]
    integer = {e.name for e in entries if e.integer}
    out: dict[str, dict[str, int]] = {}
    for name, p in model.named_parameters():
        comp = component_of(name)
        row = out.setdefault(comp, {"fp16": 0, "quantized": 0})
        row["fp16"] += 2 * p.numel()
        owner, _, leaf = name.rpartition(".")
        if owner in integer and leaf == "weight":
            n, k = p.shape
            gs = group_size if (w_bits == 4 and group_size and k % group_size == 0) else k
            row["quantized"] += n * k * w_bits // 8 + 4 * n * (k // gs)
        elif owner in integer and leaf == "bias":
            row["quantized"] += 4 * p.numel()
        else:
            row["quantized"] += 2 * p.numel()
    return out


def cmd_layout(args) -> int:
    from .quantize import SCHEMES

    model, arch, meta = _model_for_layout(args.model)
    if meta is not None and not args.layout_given:
        scheme, lay = meta["scheme"], meta["config"]["layout"]
        entries = [
            L.LayoutEntry(
                e["name"],
                e["role"],
                e["integer"],
                model.get_submodule(e["name"]).in_features,
                model.get_submodule(e["name"]).out_features,
            )
            for e in meta["layout"]
        ]
    else:
        scheme, lay = args.scheme, args.layout
        entries = L.plan_model(model, arch, lay)
    w, a = SCHEMES[scheme]
    prec = f"w{w}a{a or 16}"
    rows = [
        {
            "name": e.name,
            "role": e.role,
            "precision": prec if e.integer else "float",
            "shape": [e.in_features, e.out_features],
        }
        for e in entries
    ]
    others = []
    if args.all:  # every other module that holds weights (norms, embeddings, per-embodiment MLPs)
        linear = {e.name for e in entries}
        others = [
            {"name": n, "role": type(m).__name__, "precision": "float", "shape": None}
            for n, m in model.named_modules()
            if n not in linear and any(True for _ in m.parameters(recurse=False))
        ]
    if args.json:
        print(
            json.dumps(
                {"arch": arch, "layout": lay, "scheme": scheme, "modules": rows, "other_modules": others}, indent=2
            )
        )
        return 0
    width = max(len(r["name"]) for r in rows) if rows else 10
    print(f"layout {lay} ({', '.join(L.LAYOUTS[lay]) or 'nothing'} integer), scheme {scheme}, arch {arch}")
    print(f"{'module':<{width}}  {'role':<9} {'precision':<9} in x out")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['role']:<9} {r['precision']:<9} {r['shape'][0]} x {r['shape'][1]}")
    n_int = sum(r["precision"] != "float" for r in rows)
    params_int = sum(r["shape"][0] * r["shape"][1] for r in rows if r["precision"] != "float")
    params_all = sum(r["shape"][0] * r["shape"][1] for r in rows)
    for r in others:
        print(f"{r['name']:<{width}}  {r['role']:<9} float")
    print(f"\n{n_int} of {len(rows)} linears integer ({params_int / max(params_all, 1):.1%} of linear weights)")
    from .report import format_bytes

    est = memory_estimate(model, entries, scheme)
    print(f"\nmemory estimate ({scheme}, floats at FP16, int4 groups of 128, fp32 scales):")
    print(f"{'component':<12}{'FP16':>12}{scheme:>12}{'ratio':>8}")
    for comp, r in list(est.items()) + [
        (
            "total",
            {"fp16": sum(v["fp16"] for v in est.values()), "quantized": sum(v["quantized"] for v in est.values())},
        )
    ]:
        print(
            f"{comp:<12}{format_bytes(r['fp16']):>12}{format_bytes(r['quantized']):>12}"
            f"{r['quantized'] / max(r['fp16'], 1):>8.1%}"
        )
    return 0


def ablation_combos(schemes, layouts, variants, full: bool = False) -> list[tuple[str, str, str]]:
    """(scheme, layout, variant) to run: the paper's two tables, or the full product.

    Table 1: every layout without ATM/OHB. Table 2: every variant on the selective layout.
    """
    if full:
        return list(itertools.product(schemes, layouts, variants))
    combos = [(s, lay, "none") for s in schemes for lay in layouts]
    combos += [(s, "llm+dit-mlp", v) for s in schemes for v in variants if (s, "llm+dit-mlp", v) not in combos]
    return combos


def run_ablation(
    policy, calib, combos, base_over=None, progress=True, save_dir: str | Path | None = None
) -> list[dict]:
    """Fidelity (and memory) of each (scheme, layout, ATM/OHB variant) on one buffer; with
    ``save_dir`` every variant is also written as an artifact (for closed-loop evaluation)."""
    from tqdm import tqdm

    from .quantize import QuantConfig, quantize

    rows = []
    for scheme, lay, var in tqdm(combos, desc="ablate", disable=not progress, unit="config"):
        atm, ohb = VARIANTS[var]
        qc = QuantConfig(**{**(base_over or {}), "scheme": scheme, "layout": lay, "atm": atm, "ohb": ohb})
        r = quantize(policy, qc, calib, progress=False)
        artifact = None
        if save_dir is not None:
            artifact = str(Path(save_dir) / f"{scheme}_{lay}_{var}".replace("+", "-"))
            r.save(artifact)
        rows.append(
            {
                "scheme": scheme,
                "layout": lay,
                "variant": var,
                **r.report["fidelity"],
                "artifact": artifact,
                "memory_ratio": r.report["memory"]["quantized_components_ratio"],
                "model_memory_ratio": r.report["memory"]["model_ratio"],
                "alpha_changed": r.report["alpha_summary"].get("changed", 0),
                "beta_changed": r.report["beta_summary"].get("changed", 0),
            }
        )
    return rows


def render_ablation(rows: list[dict]) -> str:
    """Paper Table 1 (layouts, no ATM/OHB) and Table 2 (ATM/OHB on the selective layout)."""
    out = []
    schemes = sorted({r["scheme"] for r in rows})
    t1 = [r for r in rows if r["variant"] == "none"]
    if t1:
        out.append("Table 1 shape: which components are integer (no ATM/OHB); action fidelity vs FP teacher")
        out.append(f"{'layout':<14}" + "".join(f"{s + ' cos':>14}{s + ' relL2':>14}{s + ' mem':>10}" for s in schemes))
        for lay in dict.fromkeys(r["layout"] for r in t1):
            cells = ""
            for s in schemes:
                r = next((x for x in t1 if x["layout"] == lay and x["scheme"] == s), None)
                cells += (
                    f"{r['cosine_mean']:>14.5f}{r['rel_l2_mean']:>14.4f}{r['memory_ratio']:>10.1%}"
                    if r
                    else f"{'-':>14}{'-':>14}{'-':>10}"
                )
            out.append(f"{lay:<14}{cells}")
    t2 = [r for r in rows if r["layout"] in ("llm+dit-mlp", "quantvla")]
    if {r["variant"] for r in t2} - {"none"}:
        out.append("")
        out.append("Table 2 shape: ATM / OHB on the selective layout (LLM + DiT MLP)")
        out.append(
            f"{'variant':<14}" + "".join(f"{s + ' cos':>14}{s + ' relL2':>14}{s + ' a/b!=1':>14}" for s in schemes)
        )
        for var in dict.fromkeys(r["variant"] for r in t2):
            cells = ""
            for s in schemes:
                r = next((x for x in t2 if x["variant"] == var and x["scheme"] == s), None)
                cells += (
                    f"{r['cosine_mean']:>14.5f}{r['rel_l2_mean']:>14.4f}"
                    f"{str(r['alpha_changed']) + '/' + str(r['beta_changed']):>14}"
                    if r
                    else f"{'-':>14}{'-':>14}{'-':>14}"
                )
            out.append(f"{var:<14}{cells}")
    out.append("")
    out.append(
        "(fidelity = mean over held-out observations of the cosine / relative L2 of the whole action "
        "chunk vs the FP teacher with identical noise; success rates need the closed-loop evaluation)"
    )
    return "\n".join(out)


def closed_loop_ablation(args, rows: list[dict]) -> dict:
    """Run FP and every saved variant on the same held-out MT10 starts (paired) and add the
    success rates to the rows; prints Tables 1-2 in success % and writes the eval report."""
    from ..sim.evaluate import EvalConfig, evaluate
    from ..sim.report import save_report

    if args.sim != "mt10":
        raise ValueError(f"--sim {args.sim!r}: accepted: mt10")
    specs = [("fp", args.model)] + [(Path(r["artifact"]).name, r["artifact"]) for r in rows]
    import dataclasses

    from ..sim.env import TASKS

    cfg = EvalConfig(
        episodes_per_task=args.episodes,
        replan_steps=args.replan_steps,
        workers=args.workers,
        tasks=tuple(args.tasks) if args.tasks else TASKS,
    )
    if args.max_steps:
        cfg = dataclasses.replace(cfg, settings=dataclasses.replace(cfg.settings, max_steps=args.max_steps))
    report = evaluate(specs, cfg, progress=not args.no_progress)
    out_dir = Path(args.save_dir) / "eval"
    save_report(report, out_dir)
    fp = report["variants"]["fp"]
    for r in rows:
        v = report["variants"][Path(r["artifact"]).name]
        r["success"] = v["mean_success"]
        r["success_ci95"] = v["mean_ci95"]
        pair = next(p for p in report["paired"] if p["a"] == "fp" and p["b"] == Path(r["artifact"]).name)
        r["mcnemar_p_vs_fp"] = pair.get("p_value")
    print(
        f"\nclosed loop, MT10 held-out starts, {args.episodes} episodes per task "
        f"(FP {fp['mean_success']:.1%}, 95% CI {fp['mean_ci95'][0]:.1%}-{fp['mean_ci95'][1]:.1%})"
    )
    print(
        f"{'scheme':<8}{'layout':<14}{'variant':<10}{'success':>9}{'vs FP':>8}{'McNemar p':>11}{'cosine':>10}{'mem':>8}"
    )
    for r in rows:
        p = r["mcnemar_p_vs_fp"]
        print(
            f"{r['scheme']:<8}{r['layout']:<14}{r['variant']:<10}{r['success']:>9.1%}"
            f"{100 * (r['success'] - fp['mean_success']):>+7.1f}p{p if p is not None else float('nan'):>11.3f}"
            f"{r['cosine_mean']:>10.5f}{r['memory_ratio']:>8.1%}"
        )
    print(f"eval report: {out_dir}")
    return report


def cmd_ablate(args) -> int:
    from ..fileio import atomic_write_json
    from ..policy import Policy

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
        closed_loop_ablation(args, rows)
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
