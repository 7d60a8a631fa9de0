"""`quantvla` command line. Subcommands live next to what they drive; this only collects them.

Every failure a user can cause (a bad flag, a missing file, a device this machine lacks) ends
in one line on stderr and exit status 2; Ctrl-C ends with status 130 and no traceback; a closed
pipe (`quantvla layout tiny | head`) ends quietly.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMAND_MODULES = (
    "quantvla_core.cli_model",  # info, run, demo
    "quantvla_core.quant.cli",  # quantize, layout, ablate, report, recording
    "quantvla_core.sim.cli",  # sim demos | calib | bundle, eval, train
)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the command, the problem, where help is)."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def device_arg(text: str) -> str:
    """A torch device string this machine can use: cpu, cuda, cuda:N (and 'auto' where a
    command offers it); anything else is a usage error, not a traceback."""
    t = text.strip().lower()
    if t in ("cpu", "auto"):
        return t
    head, _, index = t.partition(":")
    if head not in ("cuda", "mps") or (index and not index.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: accepted cpu, cuda, cuda:N (and auto where offered)")
    import torch

    if head == "cuda":
        if not torch.cuda.is_available():
            build = torch.__version__ + ("" if torch.version.cuda else ", a CPU-only build")
            raise argparse.ArgumentTypeError(
                f"{text!r}: no CUDA device usable by this torch ({build}); "
                "install a CUDA build of torch (docs/deploy.md) or use cpu"
            )
        if index and int(index) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available here")
    return t


def _check_devices(parser: argparse.ArgumentParser) -> None:
    """Give every subcommand's --device the device check (the commands declare it as text)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _check_devices(sub)
        elif action.dest == "device" and action.type is None:
            action.type = device_arg


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="quantvla", description="Quantize and run VLA policies.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for mod_name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name == mod_name:  # not written yet: skip; any other missing import is a bug
                continue
            raise
        mod.register(sub)
    _check_devices(parser)
    return parser


def _quiet_broken_pipe() -> int:
    # The reader went away (`| head`): send what is left to /dev/null so the interpreter's
    # final flush does not raise again, and exit like other tools do on SIGPIPE.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        try:
            rc = int(args.func(args) or 0)
            sys.stdout.flush()  # a closed pipe shows here, inside the handler below
            return rc
        except (ValueError, OSError) as e:
            if isinstance(e, BrokenPipeError):
                raise
            print(f"quantvla {args.command}: error: {e}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        print("\nquantvla: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _quiet_broken_pipe()


if __name__ == "__main__":
    sys.exit(main())
