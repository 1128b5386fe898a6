#!/usr/bin/env bash
# GPU check: STSC and supervised throughput (DenseNet-121, 224 px, batch 48) in float32, mixed_float16 and
# mixed_float16 + XLA, each with the fused and with Keras' own BatchNorm; then the 4-replica equality test.
#
#   bash benchmarks/gpu.sh            # on a machine with an NVIDIA GPU; about 8 minutes
#
# Self-contained: uses .venv if its TensorFlow sees a GPU, else makes /tmp/stsc_gpu_venv with
# tensorflow[and-cuda]==2.21.0 and this package (this needs a package registry). Each benchmark is capped at 100 s.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if ! { [ -x "$PY" ] && "$PY" -c "import tensorflow as tf, sys; sys.exit(not tf.config.list_physical_devices('GPU'))" 2>/dev/null; }; then
  python3 -m venv /tmp/stsc_gpu_venv
  PY=/tmp/stsc_gpu_venv/bin/python
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q "tensorflow[and-cuda]==2.21.0" -e '.[test]'
fi
"$PY" -c "import tensorflow as tf; print('GPUs:', tf.config.list_physical_devices('GPU'))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export TF_CPP_MIN_LOG_LEVEL=2
for bn in "" "--keras_bn"; do
  for opts in "--mixed_precision=none" "--mixed_precision=mixed_float16" "--mixed_precision=mixed_float16 --jit_compile"; do
    echo "=== $opts $bn"
    # shellcheck disable=SC2086
    timeout 100 "$PY" benchmarks/step_cost.py --backbone=densenet121 --image_size=224 --batch=48 --repeat=10 $opts $bn \
      | grep -E "images/s|STSC / supervised|^\{" || echo "(did not finish in 100 s)"
  done
done
echo "=== the 4-replica equality test (logical CPU devices, as in CI) and the fused BatchNorm tests"
"$PY" -m pytest -q "tests/test_model.py::test_replicas_give_the_single_device_result" tests/test_fused_bn.py
