"""The launch files without `launch` installed: they parse, define generate_launch_description,
declare the arguments the README promises, and start the package's real executables (which
setup.py declares). launch_pytest runs them for real in test_ros_launch_pytest.py."""

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree(name):
    path = os.path.join(ROOT, "launch", name)
    with open(path) as f:
        return ast.parse(f.read(), filename=path)


def _strings(tree):
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def _console_scripts():
    with open(os.path.join(ROOT, "setup.py")) as f:
        return set(re.findall(r'"(\w+) = quantvla_ros\.', f.read()))


@pytest.mark.parametrize("name", ["quantvla.launch.py", "demo.launch.py"])
def test_launch_file_defines_generate_launch_description(name):
    tree = _tree(name)
    funcs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "generate_launch_description" in funcs
    assert "quantvla_ros" in _strings(tree)


def test_quantvla_launch_declares_documented_arguments_and_lifecycle_node():
    tree = _tree("quantvla.launch.py")
    args = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "ARGUMENTS")
    names = {t.elts[0].value for t in args.value.elts}
    assert {"model", "params_file", "namespace", "use_sim_time", "camera_topics"} <= names
    strings = _strings(tree)
    assert "policy_node" in strings and "policy_node" in _console_scripts()
    assert "LifecycleNode" in {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert "default.yaml" in strings


def test_demo_launch_starts_camera_and_includes_policy_launch():
    strings = _strings(_tree("demo.launch.py"))
    assert "synthetic_camera" in strings and "synthetic_camera" in _console_scripts()
    assert "quantvla.launch.py" in strings and "model" in strings


def test_default_yaml_documents_every_declared_parameter():
    from quantvla_ros import params as P

    with open(os.path.join(ROOT, "config", "default.yaml")) as f:
        text = f.read()
    yaml_names = set(re.findall(r"^\s{4}#?\s?(\w+):", text.split("synthetic_camera:")[0], re.M))
    declared = {s.name for s in P.SPECS}
    assert declared <= yaml_names, declared - yaml_names
    extra = yaml_names - declared - {"ros__parameters", "policy_node", "use_sim_time"}
    assert not extra, extra
