"""The Q1 report's tables and notebook stamp (nbhelpers.vit.report): model, presets, configuration, results."""
import json
from pathlib import Path

import nbformat
import pytest
import torch

from nbhelpers.vit import report
from nbhelpers.vit.config import PRESETS, build_config
from nbhelpers.vit.model import VisionTransformer
from nbhelpers.vit.state import FitResult


@pytest.mark.parametrize("tokenizer, pool", [("patch", "cls"), ("spt", "mean"), ("conv", "seqpool")])
def test_model_table_accounts_for_every_parameter_and_flop(tokenizer, pool):
    config = build_config("smoke", tokenizer=tokenizer, pool=pool, lsa=True, layerscale=1e-4, depth=3)
    model = VisionTransformer(config.model)
    table = report.model_table(model)
    assert sum(row.parameters for row in table.rows) == table.total_parameters == report.count_parameters(model)
    assert table.total_flops == report.flops_per_image(model, 32)
    rows = {row.name: row for row in table.rows}
    assert rows["block 1"].flops == rows["block 3"].flops > 0  # attention's matmuls land in their block
    assert (rows["pool"].flops > 0) == (pool == "seqpool") and rows["head"].flops == 2 * 64 * 10
    assert rows["block 3"].output_shape == (1, model.num_tokens, 64) and rows["head"].output_shape == (1, 10)
    assert rows["pool"].output_shape == (1, 64) and "LSA" in rows["block 1"].what
    assert model.training  # put back as it was


def test_parameters_of_matches_the_built_model():
    config = build_config("best", depth=4).model
    assert report.parameters_of(config) == report.count_parameters(VisionTransformer(config))


def test_presets_table_lists_the_registry_and_measured_epoch_times(tmp_path):
    measurements = tmp_path / "times.json"
    measurements.write_text(json.dumps({"measurements": [
        {"preset": "cpu", "seconds_per_epoch": 96.0, "device": "CPU (2 cores)", "date": "2026-12-01"},
        {"preset": "cpu", "seconds_per_epoch": 120.0, "device": "CPU (2 cores)", "date": "2026-12-05"},
    ]}))
    table = report.presets_table(measurements)
    for name in PRESETS:
        assert f"| `{name}` |" in table
    cpu = next(line for line in table.splitlines() if line.startswith("| `cpu` |"))
    parameters = report.count_parameters(VisionTransformer(build_config("cpu").model))
    assert "2.0 min (CPU (2 cores), 2026-12-05)" in cpu  # the latest measurement
    assert f"| {parameters / 1e6:.2f} M |" in cpu  # the preset's own model, counted
    assert "not measured" in next(line for line in table.splitlines() if line.startswith("| `fast` |"))
    assert "not measured" in report.presets_table(tmp_path / "missing.json")


def test_record_epoch_time_takes_the_median_of_full_epochs(tmp_path):
    summary = {"preset": "cpu", "device": "device cpu | precision fp32", "data_source": "synthetic", "train_images": 256,
               "config": {"train": {"batch_size": 128}},
               "history": [{"steps": 2, "epoch_seconds": 10.0}, {"steps": 1, "epoch_seconds": 1.0},  # a resumed half epoch
                           {"steps": 2, "epoch_seconds": 12.0}, {"steps": 2, "epoch_seconds": 30.0}]}
    (tmp_path / "run_summary.json").write_text(json.dumps(summary))
    entry = report.record_epoch_time(tmp_path / "run_summary.json", tmp_path / "times.json", note="test")
    assert entry["seconds_per_epoch"] == 12.0
    assert report.load_measurements(tmp_path / "times.json") == [entry]


def test_config_table_is_compact_and_shows_every_value():
    config = build_config("best")
    table = report.config_table(config)
    assert max(len(line) for line in table.splitlines()) < 160
    for section in ("model", "augment", "train"):
        for name, value in config.to_dict()[section].items():
            assert f"| {name} | {value!r} |" in table


def finished_result(tmp_path: Path, source: str) -> FitResult:
    history = [{"epoch": 1, "test_accuracy": 0.91, "step": 10}]
    summary = {"preset": "smoke", "data_source": source, "device": "device cpu | precision fp32", "parameters": 81_484,
               "epochs": 1, "train_seconds": 30.0, "history": history,
               "final_test_accuracy": {"reported": 0.93, "reported_is": "ema+flip-tta"},
               "best_epoch_test_accuracy": {"raw": {"accuracy": 0.91, "epoch": 1}, "ema": None}}
    return FitResult(build_config("smoke"), tmp_path, "finished", 10, history, summary)


def test_results_table_names_generated_data_beside_the_seed_figure(tmp_path):
    generated = report.results_table(finished_result(tmp_path, "synthetic"))
    assert "88%" in generated and "generated data (10 made-up classes, not CIFAR-10)" in generated
    assert "not comparable" in generated and "device cpu, precision fp32" in generated
    for line in generated.splitlines()[2:5]:
        assert line.count("|") == 8  # the device's own '|' separators do not split cells
    real = report.results_table(finished_result(tmp_path, "imagefolder at /data"), "CIFAR-10, JPEG copy")
    assert "CIFAR-10, JPEG copy (imagefolder at /data)" in real and "not comparable" not in real


def test_stamp_notebook_puts_run_facts_first_and_drops_frozen_widget_bars(tmp_path):
    summary = {"device": "device cpu | precision fp32", "torch_version": torch.__version__, "data_source": "synthetic",
               "train_seconds": 90.0}
    (tmp_path / "run_summary.json").write_text(json.dumps(summary))
    bar = nbformat.v4.new_output("display_data", data={"application/vnd.jupyter.widget-view+json": {"model_id": "x"},
                                                       "text/plain": "train:   0%|          | 0/31"})
    text = nbformat.v4.new_output("stream", name="stdout", text="epoch 1/1 | test 0.5\n")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("fit()", outputs=[bar, text])])
    notebook.metadata["papermill"] = {"duration": 125.0, "parameters": {"PRESET": "cpu", "ABLATION_MINUTES": 4}}
    nbformat.write(notebook, tmp_path / "q1.ipynb")
    report.stamp_notebook(tmp_path / "q1.ipynb", tmp_path)
    stamped = nbformat.read(tmp_path / "q1.ipynb", as_version=4)
    first = stamped.cells[0].source
    assert stamped.cells[0].cell_type == "markdown" and "device cpu, precision fp32" in first
    assert "generated data" in first and "wall time: 2.1 min" in first and "training 1.5 min" in first
    assert stamped.cells[1].outputs == [text]
    assert "CPU cores" in first and "`PRESET = 'cpu'`" in first and "`ABLATION_MINUTES = 4`" in first and "1 widget bar(s) removed" in first
