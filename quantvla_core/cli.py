"""`quantvla` command line. Subcommands live next to what they drive; this only collects them."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "quantvla_core.cli_model",  # info, run, demo
    "quantvla_core.quant.cli",  # quantize, layout, ablate
    "quantvla_core.sim.cli",  # sim demos, eval
    "quantvla_core.train",  # train
    "quantvla_core.bench",  # bench
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantvla", description="Quantize and run VLA policies.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name == mod_name:  # not written yet: skip; any other missing import is a bug
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"quantvla {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
