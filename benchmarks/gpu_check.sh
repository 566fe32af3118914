#!/usr/bin/env bash
# One prepared GPU check (about 6 minutes on an H100): real CIFAR-10, augmentation speed, the `fast` preset end to end.
# Prepare on the CPU machine first (the device gets only the checkout plus carried folders):
#   mkdir -p gpu_data && python ../shared/tools/cifar10_jpeg.py batches-py gpu_data/cifar   # gpu_data/ is in .git/info/exclude
# Then on the device, carrying gpu_data (and .venv if it was built there):
#   bash benchmarks/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log
set -euo pipefail
out="${OUT:-gpu_out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python benchmarks/augment_speed.py --device cuda --batch 512 --repeats 50 | tee "$out/augment_speed.txt"
python -m nbhelpers.vit --preset fast --data gpu_data/cifar --out "$out/fast" --no-plots
python - "$out/fast/run_summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print({k: s[k] for k in ("device", "parameters", "images_per_second", "train_seconds", "final_test_accuracy")})
PY
