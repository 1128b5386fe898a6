#!/usr/bin/env bash
# Benchmark 6: STSC vs supervised step throughput on a GPU (DenseNet-121, 224 px, batch 48), in under 5 minutes.
#
#   bash benchmarks/gpu.sh            # on a machine with an NVIDIA GPU
#
# Self-contained: uses .venv if its TensorFlow sees a GPU, else makes /tmp/stsc_gpu_venv with
# tensorflow[and-cuda]==2.21.0 and this package. Runs benchmark 1 (benchmarks/step_cost.py) three times:
# float32, mixed_float16, and mixed_float16 + XLA (no distribution strategy), and prints images/s for each.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if ! { [ -x "$PY" ] && "$PY" -c "import tensorflow as tf, sys; sys.exit(not tf.config.list_physical_devices('GPU'))" 2>/dev/null; }; then
  python3 -m venv /tmp/stsc_gpu_venv
  PY=/tmp/stsc_gpu_venv/bin/python
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q "tensorflow[and-cuda]==2.21.0" -e .
fi
"$PY" -c "import tensorflow as tf; print('GPUs:', tf.config.list_physical_devices('GPU'))"
export TF_CPP_MIN_LOG_LEVEL=2
for opts in "--mixed_precision=none" "--mixed_precision=mixed_float16" "--mixed_precision=mixed_float16 --jit_compile"; do
  echo "=== $opts"
  # shellcheck disable=SC2086
  timeout 100 "$PY" benchmarks/step_cost.py --backbone=densenet121 --image_size=224 --batch=48 --repeat=10 $opts \
    | grep -E "images/s|STSC / supervised|^\{"
done
