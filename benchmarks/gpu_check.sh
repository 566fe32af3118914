#!/usr/bin/env bash
# The one prepared GPU check (budget: 8 minutes on one H100 after `pip install`): every benchmark, JSON lines into
# $OUT/benchmarks.jsonl, logs beside it. Prepare on the CPU machine first (the device gets only the checkout plus
# carried folders):
#   mkdir -p gpu_data && python ../shared/tools/cifar10_jpeg.py batches-py gpu_data/cifar   # gpu_data/ is in .git/info/exclude
# Then on the device, carrying gpu_data:
#   pip install -r requirements.txt && bash benchmarks/gpu_check.sh
# Expected times (H100, estimated, not yet measured): vit_throughput ~2.5 min, time_to_accuracy fast ~3 min,
# seg_speed ~2.5 min. Each step has its own time limit so that one slow step cannot eat the others' time.
set -uo pipefail
out="${OUT:-gpu_out}"
mkdir -p "$out"
results="$out/benchmarks.jsonl"
: > "$results"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: JSON lines to $results, everything else to $out/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2> "$out/$name.log" | tee -a "$results" | cut -c1-240
  echo "== $name exit ${PIPESTATUS[0]}"
}
step vit_throughput 200 python benchmarks/vit_throughput.py --models seed,fast,best --steps 30 --profile
step time_to_accuracy 230 python benchmarks/time_to_accuracy.py --data gpu_data/cifar --preset fast --target 0.905 --out "$out/tta_fast"
step seg_speed 200 python benchmarks/seg_speed.py --video-frames 240 2400 --profile
echo "results: $results ($(wc -l < "$results") lines)"
