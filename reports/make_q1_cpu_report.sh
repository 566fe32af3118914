#!/usr/bin/env bash
# Regenerate reports/q1_cpu/: the Q1 notebook executed on this machine's CPU with the `cpu` preset on real CIFAR-10
# (the JPEG copy in ../shared/data, unpacked once), as a notebook and as HTML, with device, data, date and wall
# time in the first cell; the preset's measured time per epoch is added to benchmarks/preset_epoch_times.json.
#
#   bash reports/make_q1_cpu_report.sh                       # the real run (about 30 minutes on a quiet 2-core CPU)
#   bash reports/make_q1_cpu_report.sh -p ABLATION recipe    # extra papermill arguments go to the notebook
#
# Environment: PACK_TOOL (the JPEG pack's unpacking tool), DATA (where to unpack it), REPORT (output folder), PRESET (default cpu),
# DATA_NAME (what the tables call the data), RECORD=0 (do not record the epoch time).
set -euo pipefail
cd "$(dirname "$0")/.."
PACK_TOOL=${PACK_TOOL:-../shared/tools/cifar10_jpeg.py}  # beside this checkout, as on the project machines
DATA=${DATA:-data/cifar10-jpeg}
REPORT=${REPORT:-reports/q1_cpu}
PRESET=${PRESET:-cpu}
DATA_NAME=${DATA_NAME:-CIFAR-10, JPEG copy (quality 75; about 3 points below the original release)}
if [ "${DATASET:-cifar10}" = cifar10 ] && [ ! -f "$DATA/cifar-10-batches-py/test_batch" ]; then
  python "$PACK_TOOL" batches-py "$DATA"
fi
mkdir -p "$REPORT"
rm -rf "$REPORT/run"  # a fresh run: the report shows one run from start to end
papermill q1_vit_cifar10.ipynb "$REPORT/q1_vit_cifar10.ipynb" --cwd . \
  -p PRESET "$PRESET" -p DEVICE cpu -p DATA_ROOT "$DATA" -p DATA_NAME "$DATA_NAME" -p OUT_DIR "$REPORT/run" \
  ${DATASET:+-p DATASET "$DATASET"} "$@"
python - "$REPORT" "$DATA_NAME" "${RECORD:-1}" <<'PY'
import sys
from nbhelpers.vit.report import record_epoch_time, stamp_notebook

report, data_name, record = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
stamp_notebook(f"{report}/q1_vit_cifar10.ipynb", f"{report}/run", data_name)
if record:
    print("recorded:", record_epoch_time(f"{report}/run/run_summary.json", note="reports/make_q1_cpu_report.sh"))
PY
jupyter nbconvert --to html "$REPORT/q1_vit_cifar10.ipynb" --output q1_vit_cifar10.html
echo "report: $REPORT/q1_vit_cifar10.ipynb and $REPORT/q1_vit_cifar10.html"
