#!/usr/bin/env bash
# Train the default MT10 policy on a lent GPU from a compact demo bundle (see
# quantvla_core/sim/compact.py), within a wall-clock budget; the policy lands in $OUT/policy.
# Usage on the device machine: bash scripts/train_default_gpu.sh BUNDLE SECONDS
set -euo pipefail
bundle=${1:?bundle .npz}; seconds=${2:-170}
export PYTHONUNBUFFERED=1
python3 - "$bundle" "$seconds" <<'PY'
import json, os, shutil, sys, time
import torch
from quantvla_core.config import preset
from quantvla_core.train import TrainConfig, train
t0 = time.time()
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch", torch.__version__, flush=True)
tc = TrainConfig(steps=100000, batch_size=64, lr=5e-4, warmup=300, save_every=100000, device="cuda",
                 max_seconds=float(sys.argv[2]), threads=8)
res = train(sys.argv[1], "/tmp/run", preset("mt10"), tc, progress=False)
res["wall_seconds"] = time.time() - t0
print(json.dumps(res), flush=True)
out = os.environ.get("OUT", "/tmp/out")
shutil.copytree("/tmp/run/policy", os.path.join(out, "policy"))
PY
