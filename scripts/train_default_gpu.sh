#!/usr/bin/env bash
# Train the default MT10 policy on a lent GPU from a compact demo bundle (see
# quantvla_core/sim/compact.py) within a wall-clock budget; the policy lands in $OUT/policy.
# Usage on the device machine: bash scripts/train_default_gpu.sh BUNDLE SECONDS [INIT_DIR]
# The whole bundle is decoded once into GPU memory (uint8) and batches are gathered there, so a
# large batch costs little more per step than a small one on an H100/H200.
set -euo pipefail
bundle=${1:?bundle .npz}; seconds=${2:-170}; init=${3:-}
export PYTHONUNBUFFERED=1
python3 - "$bundle" "$seconds" "$init" <<'PY'
import json, os, shutil, sys, time
import torch
from quantvla_core.config import preset
from quantvla_core.train import TrainConfig, train
t0 = time.time()
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch", torch.__version__, flush=True)
torch.backends.cuda.matmul.allow_tf32 = True
tc = TrainConfig(steps=10**6, batch_size=int(os.environ.get("BATCH", 256)), lr=float(os.environ.get("LR", 6e-4)),
                 warmup=200, save_every=10**6, device=os.environ.get("DEVICE", "cuda"), max_seconds=float(sys.argv[2]), threads=int(os.environ.get("THREADS", 8)),
                 init=sys.argv[3], ema=float(os.environ.get("EMA", 0.999)))
res = train(sys.argv[1], "/tmp/run", preset("mt10"), tc, progress=False)
res["wall_seconds"] = time.time() - t0
print(json.dumps(res), flush=True)
out = os.environ.get("OUT", "/tmp/out")
shutil.copytree("/tmp/run/policy", os.path.join(out, "policy"))
PY
