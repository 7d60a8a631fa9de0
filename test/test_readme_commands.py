"""The README and the deploy / quantization guides work as written.

- Every shell block of README.md is run, in order, in a scratch copy of the checkout (links to
  its files, a fresh ./runs), except blocks marked ``<!-- readme-test: parse only (why) -->``.
- Every command in README.md, docs/deploy.md and docs/quantization.md is checked: `quantvla`
  lines parse with the real argument parser, scripts / modules / launch files exist and launch
  arguments are declared, and the paths these documents name are in the repository (no links
  outside it).
- The command line fails in one line (bad flag, bad device), stops cleanly on Ctrl-C and
  stays quiet when its reader closes the pipe.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/deploy.md", "docs/quantization.md")
PARSE_ONLY = "<!-- readme-test: parse only"
VENV_BIN = Path(sys.executable).parent
# commands the check knows and does not run or parse further (need a robot, a ROS 2
# installation, a package manager or a network)
NOT_CHECKED = (
    "colcon",
    "rosdep",
    "sudo",
    "apt",
    "apt-get",
    "pip",
    "pip3",
    "python3 -m pip",
    "cd",
    "export",
    "mkdir",
    "ros2 bag",
    "ros2 run",
    "ros2 param",
    "ros2 lifecycle",
    "ros2 topic",
    "tegrastats",
    "nvidia-smi",
    "git",
    "cat",
    "ls",
    "echo",
    "touch",
    "python -m colcon",
    "python3 -m colcon",
    "nvpmodel",
    "jetson_clocks",
    "sensors",
    "ln",
    "cp",
    "source /opt/ros",
    "source install/setup.bash",
    "source ~/",
)


def shell_blocks(path: Path) -> list[tuple[str, bool, int]]:
    """(text, runnable, first line number) of each ```bash / ```sh block."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        if re.match(r"^```(bash|sh|shell)\s*$", lines[i]):
            prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            start = i + 1
            i += 1
            body = []
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            out.append(("\n".join(body), not prev.strip().startswith(PARSE_ONLY), start + 1))
        i += 1
    return out


def commands(block: str) -> list[str]:
    """One string per command: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(" ".join(shlex.quote(w) for w in words))
    return out


def all_commands():
    for doc in DOCS:
        p = ROOT / doc
        if not p.is_file():
            continue
        for block, _runnable, lineno in shell_blocks(p):
            for cmd in commands(block):
                yield pytest.param(cmd, id=f"{doc}:{lineno}:{cmd[:40]}")


def _launch_arguments(launch_file: Path) -> set[str]:
    """Names in the launch file's ARGUMENTS table (read from its syntax tree, not imported: the
    launch packages are not installable here)."""
    tree = ast.parse(launch_file.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "ARGUMENTS" for t in node.targets):
            return {row[0] for row in ast.literal_eval(node.value)}
    raise AssertionError(f"{launch_file.name} has no ARGUMENTS table")


@pytest.mark.parametrize("cmd", list(all_commands()))
def test_documented_command_is_valid(cmd):
    words = shlex.split(os.path.expandvars(cmd))
    if words[0] == "source" and words[1:] == [".venv/bin/activate"]:
        assert (VENV_BIN / "activate").is_file()
        return
    plain = " ".join(shlex.split(cmd))
    if any(
        plain.startswith(p) and (p.endswith("/") or plain[len(p) : len(p) + 1] in ("", " ", "/")) for p in NOT_CHECKED
    ):
        return
    for i, w in enumerate(words):  # leading VAR=value assignments
        if "=" not in w or w.startswith("-"):
            words = words[i:]
            break
    prog = words[0]
    if prog in ("quantvla", ".venv/bin/quantvla"):
        from quantvla_core.cli import build_parser

        try:
            args = build_parser().parse_args(words[1:])
        except SystemExit as e:
            pytest.fail(f"`{cmd}` does not parse (exit {e.code})")
        assert getattr(args, "func", None), cmd
    elif prog == "bash":
        assert (ROOT / words[1]).is_file(), f"{words[1]} is not in the repository"
    elif prog in ("python", "python3", ".venv/bin/python") or prog.endswith("/python"):
        if words[1] == "-m":
            assert importlib.util.find_spec(words[2]) is not None, f"no module {words[2]}"
        elif words[1] != "-c":
            assert (ROOT / words[1]).is_file(), f"{words[1]} is not in the repository"
    elif prog == "ros2" and words[1] == "launch":
        assert words[2] == "quantvla_ros", cmd
        launch = ROOT / "launch" / words[3]
        assert launch.is_file(), f"no launch file {words[3]}"
        declared = _launch_arguments(launch)
        given = [w.split(":=")[0] for w in words[4:] if ":=" in w]
        assert set(given) <= declared, f"{launch.name} does not declare {sorted(set(given) - declared)}"
    else:
        pytest.fail(f"unknown command in the docs (teach test_readme_commands.py about it): {cmd}")


REPO_PATH = re.compile(
    r"(?<![\w./-])((?:docs|scripts|benchmarks|config|launch|quantvla_core|quantvla_ros|kernels"
    r"|test)/[\w./-]*[\w/])"
)


@pytest.mark.parametrize("doc", DOCS)
def test_docs_stay_inside_the_repository(doc):
    p = ROOT / doc
    if not p.is_file():
        pytest.skip(f"{doc} not written")
    text = p.read_text(encoding="utf-8")
    assert "../" not in text, f"{doc} links outside the repository"
    assert not re.search(r"(?<![\w/])shared/", text), f"{doc} points into a shared/ folder outside the repository"
    for m in REPO_PATH.finditer(text):
        path = m.group(1).rstrip(".")
        if any(c in path for c in "*<>{}"):
            continue
        assert (ROOT / path).exists(), f"{doc} names {path}, which is not in the repository"


def test_readme_has_the_setup_and_path_lines():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "bash scripts/demo.sh" in text and "bash scripts/test.sh" in text
    assert "source .venv/bin/activate" in text
    assert "source .venv/bin/activate" in (ROOT / "scripts" / "ensure_venv.sh").read_text()


def _scratch_checkout(tmp: Path) -> Path:
    """A copy of the checkout made of links, with a fresh runs/ (what a new clone has)."""
    work = tmp / "clone"
    work.mkdir()
    for entry in ROOT.iterdir():
        if entry.name in ("runs", ".git", ".pytest_cache"):
            continue
        (work / entry.name).symlink_to(entry)
    return work


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_readme_shell_blocks_run_as_written(tmp_path):
    blocks = [(b, n) for b, runnable, n in shell_blocks(ROOT / "README.md") if runnable]
    assert blocks, "the README has no runnable shell block"
    work = _scratch_checkout(tmp_path)
    results_before = sorted(os.listdir(ROOT / "benchmarks" / "results"))
    script = "set -euo pipefail\n" + "\n".join(f"echo '>>> README line {n}'\n{b}" for b, n in blocks)
    env = dict(
        os.environ,
        ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
        PYTHONUNBUFFERED="1",
        PATH=os.environ.get("PATH", "/usr/bin:/bin"),
    )
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if Path(p) != VENV_BIN)
    r = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=1400)
    tail = r.stdout[-3000:] + "\n--- stderr ---\n" + r.stderr[-3000:]
    assert r.returncode == 0, tail
    assert "Traceback" not in r.stderr, tail
    assert (work / "runs" / "my_policy_w4a8" / "report.json").is_file(), tail
    assert "action chunk" in r.stdout, tail
    assert sorted(os.listdir(ROOT / "benchmarks" / "results")) == results_before  # bench wrote to runs/
    assert list((work / "runs" / "bench").glob("e2e-*tiny-quick*.json")), tail


# ---- the command line's failure modes ----------------------------------------------------------
def _quantvla(*args, **kw):
    return subprocess.run(
        [str(VENV_BIN / "quantvla"), *args], capture_output=True, text=True, timeout=300, cwd=kw.get("cwd", ROOT)
    )


def test_bad_flags_and_devices_are_one_line():
    for args, needle in (
        (["quantize", "tiny", "--out", "x", "--bogus"], "unrecognized arguments: --bogus"),
        (["run", "tiny", "--image", "a.png", "--instruction", "x", "--device", "gpu"], "'gpu': accepted cpu, cuda"),
        (["layout", "no-such-model"], "neither 'default'"),
        (["nosuchcommand"], "invalid choice"),
    ):
        r = _quantvla(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, r.stderr)
    import torch

    if not torch.cuda.is_available():
        r = _quantvla("run", "tiny", "--image", "a.png", "--instruction", "x", "--device", "cuda")
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "no CUDA device" in r.stderr


def test_ctrl_c_and_closed_pipe_are_quiet(tmp_path):
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err_file:
        p = subprocess.Popen(
            [
                str(VENV_BIN / "quantvla"),
                "quantize",
                "tiny",
                "--calib",
                "synthetic:3000",
                "--samples",
                "3000",
                "--out",
                str(tmp_path / "never"),
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=err_file,
            text=True,
        )
    # Ctrl-C once the quantizer is at work (its progress bar "quantize w4a8" is on stderr), so the
    # interrupt lands inside the command and not in its imports; 3000 samples keep it busy.
    end = time.monotonic() + 240
    while "quantize w4a8" not in err_path.read_text() and p.poll() is None and time.monotonic() < end:
        time.sleep(0.05)
    assert p.poll() is None and "quantize w4a8" in err_path.read_text(), err_path.read_text()[-2000:]
    p.send_signal(signal.SIGINT)
    p.wait(timeout=120)
    err = err_path.read_text()
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted" in err, err[-2000:]
    assert not (tmp_path / "never").exists()  # nothing half-written
    r = subprocess.run(
        f"{VENV_BIN / 'quantvla'} layout tiny | head -n 1",
        shell=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.stdout.startswith("layout ") and r.stderr == "", r.stderr
