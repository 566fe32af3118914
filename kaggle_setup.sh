#!/usr/bin/env bash
# Set up nbhelpers on Kaggle or Colab (or any machine that already has a CUDA build of torch).
# Idempotent: safe to run in every session. Keeps the preinstalled torch/torchvision (their CUDA
# builds match the platform's driver); installs the other requirements and this package.
# Usage, from a notebook cell:  !bash /path/to/repo/kaggle_setup.sh
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if python -c "import torch, torchvision" 2>/dev/null; then
  echo "keeping preinstalled torch $(python -c 'import torch; print(torch.__version__)')"
  grep -vE '^(torch|torchvision)([<>=!~ ]|$)' "$repo/requirements.txt" | grep -vE '^-e ' > /tmp/nbhelpers-requirements.txt
else
  grep -vE '^-e ' "$repo/requirements.txt" > /tmp/nbhelpers-requirements.txt
fi
python -m pip install -q -r /tmp/nbhelpers-requirements.txt
python -m pip install -q --no-deps -e "$repo"
python -c "import nbhelpers, nbhelpers.platform as p; print('nbhelpers ready on', p.detect_platform())"
