"""Rendering MT10 and then loading the integer kernels in one process must not crash.

MuJoCo's EGL (Mesa) driver and Triton each bring an LLVM; Triton loaded second segfaulted the
process (seen with torch's optimizers and with quantized policies inside eval workers).
"""

import subprocess
import sys

SNIPPET = """
from quantvla_core.sim.env import MT10Env
env = MT10Env("reach-v3", image_size=32)
obs = env.reset(1000, 0)
import torch
layer = torch.nn.Linear(2, 2)
opt = torch.optim.AdamW(layer.parameters())
layer(torch.ones(2)).sum().backward()
opt.step()
import quantvla_kernels
print("ok", int(obs["images"][0].mean() > 0))
"""


def test_render_then_triton_in_one_process():
    r = subprocess.run([sys.executable, "-c", SNIPPET], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.strip() == "ok 1"
