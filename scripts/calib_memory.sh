#!/usr/bin/env bash
# Peak memory of calibration from a long recording: writes a 60 s robot-like .mcap (640x480
# rgb8 + JPEG cameras, a 16UC1 depth stream, URDF, instruction, joint states, all at 30 Hz,
# 3 episodes; about 2.8 GB, uncompressed chunks as `ros2 bag record -s mcap` writes them) to
# $CALIB_TMP (default /tmp), reads SAMPLES (43 = the default 32 + held-out) frames from it as
# `quantvla quantize` does, prints the peak RSS next to the RSS of the imports alone, and
# deletes the recording.   bash scripts/calib_memory.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/ensure_venv.sh
rec=${CALIB_TMP:-/tmp}/quantvla_calib_memory_$$.mcap
trap 'rm -f "$rec"' EXIT
.venv/bin/python - "$rec" "${SAMPLES:-43}" <<'PY'
import resource, subprocess, sys, time
from quantvla_core.recordings import write_synthetic_recording
rec, n = sys.argv[1], sys.argv[2]
t = time.time()
write_synthetic_recording(rec, seconds=60, rate_hz=30, size=(480, 640), episodes=3, compression="none")
print(f"wrote {rec} in {time.time() - t:.0f} s")
probe = ("import resource, sys, time; from quantvla_core.config import preset; "
         "from quantvla_core.quant.calibration import load_observations; "
         "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; t = time.time(); "
         "obs = load_observations(sys.argv[1], preset('mt10'), n=int(sys.argv[2])); "
         "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; "
         "print(f'{len(obs)} observations in {time.time() - t:.1f} s; peak RSS {peak:.0f} MiB "
         "(imports alone {base:.0f} MiB)')")
subprocess.run([sys.executable, "-c", probe, rec, n], check=True)
PY
