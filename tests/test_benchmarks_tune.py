"""benchmarks/tune_presets.py: candidates train on a validation split and report on it (never choosing by test)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def test_smoke_candidates_report_validation_accuracy(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "benchmarks/tune_presets.py", "--smoke", "--candidates", "fast,cct_fast_light",
                           "--out", str(tmp_path)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["candidate"] for r in records] == ["fast", "cct_fast_light"]
    for record in records:
        assert 0.0 <= record["val_accuracy"] <= 1.0 and record["train_seconds"] > 0 and record["epochs"] == 2
        summary = json.loads((tmp_path / record["candidate"] / "run_summary.json").read_text())
        assert summary["history"][-1]["val_accuracy"] == record["val_accuracy"]
        assert summary["config"]["train"]["val_size"] == 100, "candidates are compared on a held-out split"
    light = json.loads((tmp_path / "cct_fast_light" / "run_summary.json").read_text())["config"]
    assert light["model"]["tokenizer"] == "conv" and light["augment"]["mixup_alpha"] == 0.0


def test_unknown_candidate_and_missing_data_are_refused() -> None:
    for args, expected in ((["--smoke", "--candidates", "fats"], "unknown candidates"), ([], "--data is required")):
        done = subprocess.run([sys.executable, "benchmarks/tune_presets.py", *args], cwd=REPO, env=ENV,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and expected in done.stderr
