"""Start the package's node executables as subprocesses with a parameters file.

`ros2 run` / `ros2 launch` are not installable from PyPI, so the tests, the demo and the
benchmark start `python -m quantvla_ros.<node> --ros-args --params-file <yaml>` themselves.
The caller's environment (ROS_DOMAIN_ID, ROS_AUTOMATIC_DISCOVERY_RANGE) is passed through
unchanged: the node never chooses its own discovery settings.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from quantvla_core.fileio import atomic_write_bytes


def write_params(path: str, params_by_node: dict[str, dict]) -> str:
    """Write a ROS 2 parameters YAML (JSON flow values are valid YAML) atomically."""
    lines = []
    for node, params in params_by_node.items():
        lines += [f"{node}:", "  ros__parameters:"]
        lines += [f"    {name}: {json.dumps(value)}" for name, value in params.items()]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path


def start_node(module: str, params_file: str, log_path: str, extra_args=()) -> subprocess.Popen:
    """`python -m quantvla_ros.<module>` with its stdout+stderr in `log_path`."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", RCUTILS_COLORIZED_OUTPUT="0")
    log = open(log_path, "w")
    cmd = [sys.executable, "-m", f"quantvla_ros.{module}", "--ros-args", "--params-file", params_file, *extra_args]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    log.close()
    return proc


def stop_node(proc: subprocess.Popen, timeout_s: float = 10.0) -> int:
    """SIGINT (clean rclpy shutdown), then SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)
    return proc.returncode
