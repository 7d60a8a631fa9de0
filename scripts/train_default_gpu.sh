#!/usr/bin/env bash
# Train the default MT10 policy on a lent GPU from compact demo bundle(s) (see
# quantvla_core/sim/compact.py) within a wall-clock budget; the policy lands in $OUT/policy.
# Usage on the device machine: bash scripts/train_default_gpu.sh BUNDLE[,PART2,...] SECONDS [INIT_DIR]
# Environment: BATCH (256), LR (6e-4), EMA (0.999), SHIFT (random-shift pixels, 4), SEED (0),
# DEVICE (cuda), THREADS (8), RUN (scratch folder, /tmp/run), TASK_WEIGHTS (e.g.
# "push-v3=3,pick-place-v3=3": those tasks' observations drawn 3x as often; default none).
# The whole bundle is decoded once into GPU memory (uint8) and batches are gathered there, so a
# large batch costs little more per step than a small one on an H100/H200.
set -euo pipefail
bundle=${1:?bundle .npz}; seconds=${2:-170}; init=${3:-}
export PYTHONUNBUFFERED=1
python3 - "$bundle" "$seconds" "$init" <<'PY'
import json, os, shutil, sys, time
import torch
from quantvla_core.config import preset
from quantvla_core.sim.cli import parse_task_weights
from quantvla_core.sim.train import TrainConfig, train
t0 = time.time()
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch", torch.__version__, flush=True)
torch.backends.cuda.matmul.allow_tf32 = True
env = os.environ.get
tc = TrainConfig(steps=10**6, batch_size=int(env("BATCH", 256)), lr=float(env("LR", 6e-4)),
                 warmup=200, save_every=10**6, device=env("DEVICE", "cuda"), max_seconds=float(sys.argv[2]),
                 threads=int(env("THREADS", 8)), init=sys.argv[3], ema=float(env("EMA", 0.999)),
                 shift_pixels=int(env("SHIFT", 4)), seed=int(env("SEED", 0)),
                 task_weights=parse_task_weights([w for w in env("TASK_WEIGHTS", "").split(",") if w]))
bundles = sys.argv[1].split(",")
run = env("RUN", "/tmp/run")
res = train(bundles if len(bundles) > 1 else bundles[0], run, preset("mt10"), tc, progress=False)
res["wall_seconds"] = time.time() - t0
print(json.dumps(res), flush=True)
out = env("OUT", "/tmp/out")
shutil.copytree(os.path.join(run, "policy"), os.path.join(out, "policy"))
PY
