#!/usr/bin/env bash
# Create ./.venv (if missing) and install nnunet-topo into it, editable, with the test extras.
# torch/torchvision come from the package registry (nnunetv2's dependencies); see README "Install".
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
# fail loudly if the install is unusable (e.g. a CPU-only torch without a matching torchvision)
.venv/bin/python -c "import torch, torchvision, nnunetv2, nnunet_topo; print('nnunet-topo', nnunet_topo.__version__, '| torch', torch.__version__, '| torchvision', torchvision.__version__)"
