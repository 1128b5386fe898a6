#!/usr/bin/env bash
# Creates .venv-torch (repository root): CPU PyTorch for benchmarks/srcmt_peer.py only.
#
#     bash benchmarks/make_torch_env.sh
#
# Why a separate environment: torch is only the peer's framework in the SRC-MT comparison
# (benchmarks/vs_srcmt.py); it must never become a dependency of stsc_tf or share .venv with TensorFlow.
# Why torch==2.13.0 exactly: on the project machine pip finds that version as a local CPU wheel; any other
# version would pull a multi-GB CUDA build from the registry. torchvision is not installed (it does not import
# beside this torch), so the peer writes its DenseNet-121 in plain PyTorch.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-torch/bin/python ]; then
    python3 -m venv .venv-torch
fi
.venv-torch/bin/python -m pip install --quiet "torch==2.13.0" numpy
.venv-torch/bin/python -c "import torch, numpy; print('torch', torch.__version__, '| numpy', numpy.__version__)"
