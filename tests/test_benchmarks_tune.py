"""benchmarks/tune_presets.py: candidates train on a validation split and report on it (never choosing by test).
The script's main() runs in this process (see the benchmark_script fixture)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tune(benchmark_script):
    return benchmark_script("tune_presets")


def test_smoke_candidates_report_validation_accuracy(tune, tmp_path: Path, capsys, one_thread) -> None:
    assert tune.main(["--smoke", "--candidates", "fast,cct_fast_light", "--out", str(tmp_path)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["candidate"] for r in records] == ["fast", "cct_fast_light"]
    for record in records:
        assert 0.0 <= record["val_accuracy"] <= 1.0 and record["train_seconds"] > 0 and record["epochs"] == 2
        summary = json.loads((tmp_path / record["candidate"] / "run_summary.json").read_text())
        assert summary["history"][-1]["val_accuracy"] == record["val_accuracy"]
        assert summary["config"]["train"]["val_size"] == 100, "candidates are compared on a held-out split"
    light = json.loads((tmp_path / "cct_fast_light" / "run_summary.json").read_text())["config"]
    assert light["model"]["tokenizer"] == "conv" and light["augment"]["mixup_alpha"] == 0.0


@pytest.mark.parametrize("args, expected", [(["--smoke", "--candidates", "fats"], "unknown candidates"),
                                            ([], "--data is required")])
def test_unknown_candidate_and_missing_data_are_refused(tune, args: list[str], expected: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        tune.main(args)
    assert exit_info.value.code == 2 and expected in capsys.readouterr().err
