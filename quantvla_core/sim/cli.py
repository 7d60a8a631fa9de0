"""`quantvla sim demos | calib | bundle`, `quantvla eval --sim mt10` and `quantvla train`:
argparse wiring only (the work is in demos.py, evaluate.py, calib_export.py, compact.py, train.py).

`register(subparsers)` is called by quantvla_core/cli.py; each subcommand sets `func(args)`
returning an exit code. `python -m quantvla_core.sim.cli ...` works on its own as well.
"""

from __future__ import annotations

import argparse
import json
import sys


def _env_args(p: argparse.ArgumentParser) -> None:
    from quantvla_core.sim import env

    p.add_argument(
        "--tasks",
        nargs="+",
        default=list(env.TASKS),
        metavar="TASK",
        choices=env.TASKS,
        help="MT10 tasks (default: all ten)",
    )
    p.add_argument(
        "--cameras",
        nargs="+",
        default=list(env.DEFAULT_CAMERAS),
        choices=env.CAMERAS,
        help="cameras, in image order (default: %(default)s)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=env.DEFAULT_IMAGE_SIZE,
        help="square image side in pixels (default: %(default)s)",
    )
    p.add_argument(
        "--max-steps", type=int, default=env.DEFAULT_MAX_STEPS, help="episode step limit (default: %(default)s)"
    )
    p.add_argument("--workers", type=int, default=2, help="parallel processes (default: 2)")


def _settings(args):
    from quantvla_core.sim.demos import EnvSettings

    return EnvSettings(tuple(args.cameras), args.image_size, args.max_steps)


def _run_demos(args) -> int:
    from quantvla_core.sim.demos import generate_demos

    index = generate_demos(args.out, args.tasks, args.per_task, args.workers, _settings(args), chunk=args.chunk)
    print(f"{index['episodes']} episodes, {index['steps']} steps in {index['seconds']} s -> {args.out}")
    for task, row in index["tasks"].items():
        rate = row["expert_success"]
        print(
            f"  {task:<26} {row['episodes']:>4} / {row['attempted']:<4} "
            f"expert success {'-' if rate is None else f'{100 * rate:.0f}%'}"
        )
    return 0


def _run_eval(args) -> int:
    from quantvla_core.sim.evaluate import EvalConfig, evaluate
    from quantvla_core.sim.report import format_table, save_report

    if args.sim != "mt10":
        print(f"--sim {args.sim!r} is not supported; accepted: mt10", file=sys.stderr)
        return 2
    from quantvla_core.sim import env

    try:
        env.check_eval_seeds(args.eval_seeds)
    except ValueError as e:
        print(f"--eval-seeds {e}", file=sys.stderr)
        return 2
    cfg = EvalConfig(
        tasks=tuple(args.tasks),
        episodes_per_task=args.episodes,
        replan_steps=args.replan_steps,
        workers=args.workers,
        settings=_settings(args),
        device=args.device,
        seed=args.seed,
        eval_seeds=tuple(args.eval_seeds),
    )
    report = evaluate(args.policy, cfg)
    paths = save_report(report, args.out)
    print(format_table(report))
    print(f"report: {', '.join(str(p) for p in paths)}")
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def _run_calib(args) -> int:
    from quantvla_core.sim.calib_export import export_calibration

    print(f"calibration folder: {export_calibration(args.demos, args.out, args.n)}")
    return 0


def _run_bundle(args) -> int:
    from quantvla_core.sim.compact import write_bundle

    info = write_bundle(args.demos, args.out, every=args.every, codec=args.codec)
    print(f"{info['rows']} observations, {info['bytes'] / 2**20:.1f} MiB ({info['format']}) -> {args.out}")
    return 0


def parse_task_weights(items: list[str]) -> dict:
    """['push-v3=3', ...] -> {'push-v3': 3.0}; a malformed or repeated entry is refused."""
    out = {}
    for item in items:
        task, _, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            raise SystemExit(f"--task-weight {item!r}: expected TASK=WEIGHT, e.g. push-v3=3") from None
        if not task:
            raise SystemExit(f"--task-weight {item!r}: expected TASK=WEIGHT, e.g. push-v3=3")
        if task in out:
            raise SystemExit(f"--task-weight: {task} given twice")
        out[task] = weight
    return out


def _run_train(args) -> int:
    from quantvla_core.config import preset
    from quantvla_core.sim.train import TrainConfig, train

    cfg = preset(args.preset)
    tc = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        save_every=args.save_every,
        device=args.device,
        init=args.init or "",
        max_seconds=args.max_seconds,
        ema=args.ema,
        shift_pixels=args.shift,
        warmup=args.warmup,
        task_weights=parse_task_weights(args.task_weight or []),
    )
    result = train(args.demos, args.out, cfg, tc)
    print(json.dumps(result, indent=2))
    return 0


def register(subparsers) -> None:
    from quantvla_core.config import PRESETS
    from quantvla_core.sim import env
    from quantvla_core.sim.train import TrainConfig

    sim = subparsers.add_parser("sim", help="Meta-World MT10 simulation tools")
    sim_sub = sim.add_subparsers(dest="sim_command", required=True)
    demos = sim_sub.add_parser("demos", help="record scripted-expert demonstrations")
    demos.add_argument("--out", default="runs/demos", help="shard folder (default: %(default)s)")
    demos.add_argument("--per-task", type=int, default=50, help="successful episodes per task (default: %(default)s)")
    demos.add_argument("--chunk", type=int, default=10, help="episodes per shard/job")
    _env_args(demos)
    demos.set_defaults(func=_run_demos)

    cal = sim_sub.add_parser("calib", help="write a calibration folder (observations.jsonl + PNGs) from demos")
    cal.add_argument("--demos", default="runs/demos", help="demo shard folder (default: %(default)s)")
    cal.add_argument("--out", required=True, help="calibration folder to write")
    cal.add_argument("-n", type=int, default=128, help="observations (default: %(default)s)")
    cal.set_defaults(func=_run_calib)

    bun = sim_sub.add_parser("bundle", help="pack demos into one compact .npz for training elsewhere (e.g. a GPU)")
    bun.add_argument("--demos", default="runs/demos", help="demo shard folder (default: %(default)s)")
    bun.add_argument("--out", required=True, help=".npz file to write")
    bun.add_argument("--every", type=int, default=3, help="keep every k-th observation (default: %(default)s)")
    bun.add_argument(
        "--codec",
        default="video",
        choices=("video", "jpeg"),
        help="video: mp4v per episode and camera (~1 KB/frame); jpeg: q70 per image",
    )
    bun.set_defaults(func=_run_bundle)

    ev = subparsers.add_parser("eval", help="closed-loop success rates of policies on MT10")
    ev.add_argument("--sim", default="mt10", help="benchmark (only: mt10)")
    ev.add_argument(
        "--policy",
        action="append",
        required=True,
        metavar="SPEC",
        help="repeatable: 'expert', 'default', a preset or a model/artifact dir; NAME=SPEC gives it a display name",
    )
    ev.add_argument("--episodes", type=int, default=20, help="episodes per task (default: 20)")
    ev.add_argument(
        "--replan-steps",
        type=int,
        default=16,
        help="actions executed from each chunk before re-inferring (default: %(default)s = the "
        "default policy's whole chunk; replanning more often did worse on MT10)",
    )
    ev.add_argument("--device", default="cpu", help="torch device for the policies")
    ev.add_argument("--seed", type=int, default=0, help="policy sampling seed")
    ev.add_argument(
        "--eval-seeds",
        type=int,
        nargs="+",
        default=list(env.EVAL_SEEDS),
        metavar="SEED",
        help="Meta-World seeds whose starts are run (50 each, taken "
        "in order; default: the held-out %(default)s; validation for choosing "
        f"between candidates: {list(env.VALIDATION_SEEDS)})",
    )
    ev.add_argument("--out", default="runs/eval", help="report folder (default: %(default)s)")
    ev.add_argument("--json", action="store_true", help="also print the JSON report")
    _env_args(ev)
    ev.set_defaults(func=_run_eval)

    p = subparsers.add_parser("train", help="flow-matching behaviour cloning on demo shards (resumable)")
    p.add_argument("--demos", required=True, help="folder of demo shards (quantvla sim demos)")
    p.add_argument("--out", required=True, help="run folder: train_state/ and the final policy/")
    p.add_argument("--preset", default="mt10", choices=PRESETS)
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=TrainConfig.save_every)
    p.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast)")
    p.add_argument("--init", help="start from this model directory (fine-tune)")
    p.add_argument("--max-seconds", type=float, default=0.0, help="wall-clock budget (0 = none)")
    p.add_argument(
        "--ema",
        type=float,
        default=0.0,
        help="save an exponential moving average of the weights with this decay (e.g. 0.999)",
    )
    p.add_argument(
        "--shift", type=int, default=TrainConfig.shift_pixels, help="random-shift augmentation in pixels (0 = none)"
    )
    p.add_argument("--warmup", type=int, default=TrainConfig.warmup, help="linear LR warm-up steps")
    p.add_argument(
        "--task-weight",
        action="append",
        metavar="TASK=WEIGHT",
        help="repeatable: draw this task's observations WEIGHT times as often (default 1; 0 = leave out)",
    )
    p.set_defaults(func=_run_train)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="quantvla")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
