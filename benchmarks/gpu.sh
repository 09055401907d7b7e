#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md in one call, for a machine with a CUDA device and
# no network (the workplace's device tool: `bash benchmarks/gpu.sh`, about 8 minutes on an
# H100). Uses the python3 that holds a CUDA build of PyTorch and paintseg from src/ (its core
# needs numpy, scipy, scikit-image, tifffile and torch only; nothing is installed). The logs
# go to $OUT (the device tool's folder that comes back), else to ./gpu-out.
#
#   1. end_to_end.py: segment_file of a fast-preset model trained 10 s from strokes on a
#      64x2048x2048 stack (issue 41's GPU stack), of a 3D fast-preset model on 64x512x512 and
#      of the starter on 2048^2, in float32 and in the default mixed precision, each against
#      the network's forward pass alone in both, with the labels' agreement and the training
#      steps per second (without the run of the old CPU path, --no-before);
#   2. inference.py: tiled inference against the plain forward pass (and MONAI if present).
# ../shared does not travel to that machine: the EM and phase-contrast inputs are not run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

$PY - <<'EOF' 2>&1 | tee "$OUT/env.log"
import torch, paintseg.batch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$OUT/env.log"

timeout 330 $PY benchmarks/end_to_end.py --device cuda --seconds 10 \
    --data mosaic nuclei3d starter --planes 64 --no-before 2>&1 | tee "$OUT/end_to_end.log"
timeout 150 $PY benchmarks/inference.py --device cuda --repeat 2 2>&1 | tee "$OUT/inference.log"
