"""Shared test set-up: CPU determinism, Triton interpreter, and ROS 2 kept on loopback."""

import contextlib
import os
import random

# ROS 2 traffic from any test stays on 127.0.0.1 in a domain of this run's own.
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("ROS_DOMAIN_ID", str(random.Random(os.getpid()).randint(101, 200)))
# Camera-sized messages need Fast DDS's large shared-memory segment (config/fastdds_large_data.xml).
# Fast DDS reads the profile once per process, at its first participant, so set it here before
# any test (in-process nodes included) initialises rclpy.
os.environ.setdefault(
    "FASTDDS_DEFAULT_PROFILES_FILE",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config", "fastdds_large_data.xml"),
)
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MUJOCO_GL", "egl")

# The benchmark code lives in the checkout, not in the installed packages: benchmarks/ on the
# path makes its package (quantvla_bench) importable by the tests that check it.
import sys  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton's LLVM must load before MuJoCo's EGL/Mesa driver brings its own LLVM into the process:
# importing triton afterwards (torch's optimizers do, lazily) segfaults. Import it first.
import triton  # noqa: E402,F401

torch.set_num_threads(2)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer tests (still run in CI unless -m 'not slow')")
    config.addinivalue_line("markers", "ros: starts ROS 2 processes over DDS")


@pytest.fixture
def tmp_model_dir(tmp_path):
    return tmp_path / "model"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls: one intra-op thread; with a busy shared CPU, 2 spinning threads run ~30x slower.
    Modules use it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


FASTDDS_PROFILE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config", "fastdds_large_data.xml"
)


@contextlib.contextmanager
def loopback_ros_env(domain_id: int):
    """Loopback-only discovery in ``domain_id``, Fast DDS's large-message profile; restores the
    environment after (set by tests, never by the nodes: robots need the network)."""
    keys = ("ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_DOMAIN_ID", "FASTDDS_DEFAULT_PROFILES_FILE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ["ROS_DOMAIN_ID"] = str(domain_id)
    os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = FASTDDS_PROFILE
    try:
        yield domain_id
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def tiny_smolvla_config():
    """A SmolVLA-layout ModelConfig small enough for unit tests (no such preset ships)."""
    from quantvla_core.config import DecoderConfig, ModelConfig, VisionConfig

    return ModelConfig(
        arch="smolvla",
        name="tiny-smolvla",
        vision=VisionConfig(image_size=32, patch_size=8, width=64, depth=1, heads=1, mlp=64, pixel_shuffle=2),
        backbone=DecoderConfig(width=64, depth=2, mlp=96, heads=2, kv_heads=1, head_dim=32, vocab_size=384, act="silu"),
        expert=DecoderConfig(width=48, depth=2, mlp=64, heads=2, kv_heads=1, head_dim=32, vocab_size=384, act="silu"),
        action_dim=4,
        state_dim=4,
        horizon=5,
        num_steps=3,
        max_cameras=1,
        max_text_tokens=16,
    )
