"""Remember SIGINT/SIGTERM that arrive while an executable is still importing (torch, rclpy:
about half a second), so a stop request then is honoured by the clean shutdown path instead of
a KeyboardInterrupt traceback or death by SIGTERM. Standard library only: it must be importable
before anything heavy."""

from __future__ import annotations

import signal

received: list[str] = []


def _record(signum, frame) -> None:
    received.append(signal.Signals(signum).name)


def capture() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _record)
