"""Both notebooks run end to end under papermill with smoke parameters (CPU, offline): Q1 through the README's own
"Set up and run" commands on a fresh copy of the repository, Q2 with tiny random models and both backends."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill
import pytest

REPO = Path(__file__).resolve().parents[1]


def code_cells(name: str) -> list:
    return [cell for cell in nbformat.read(REPO / name, as_version=4).cells if cell.cell_type == "code"]


@pytest.mark.parametrize("name", ["q1_vit_cifar10.ipynb", "q2_text_segmentation.ipynb"])
def test_notebook_is_thin_with_one_parameters_cell_after_the_imports(name):
    cells = code_cells(name)
    tagged = [i for i, cell in enumerate(cells) if "parameters" in cell.metadata.get("tags", [])]
    assert tagged == [1], f"{name}: exactly one cell tagged 'parameters', right after the imports cell"
    for cell in cells:
        assert not any(line.lstrip().startswith(("def ", "class ", "for ", "while ")) for line in cell.source.splitlines()), cell.source
        assert "sys.path" not in cell.source
        assert not cell.get("outputs"), f"{name}: commit the notebook with outputs cleared"
    for line in cells[1].source.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert line.split("=")[0].strip().isupper(), f"parameters must be flat UPPER_CASE literals: {line}"


@pytest.mark.parametrize("name", ["q1_vit_cifar10.ipynb", "q2_text_segmentation.ipynb"])
def test_papermill_help_notebook_lists_every_parameter(name, caplog, monkeypatch):
    # papermill skips a parameter line with "=" in its comment: `-p NAME` then prints "Passed unknown parameter".
    # `papermill --help-notebook NAME` runs through click's test runner (the same command, in this process).
    from click.testing import CliRunner
    from papermill.cli import papermill as papermill_command

    names = [line.split("=")[0].strip() for line in code_cells(name)[1].source.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # papermill's CLI sets it; undone after the test
    shown = CliRunner().invoke(papermill_command, ["--help-notebook", str(REPO / name)])
    assert shown.exit_code == 0, shown.output
    assert re.findall(r"^  (\w+): ", shown.output, re.M) == names
    assert "Unable to parse" not in shown.output + caplog.text


# ----------------------------------------------------------------------------- Q1: the README's commands


def setup_and_run_commands() -> list[str]:
    """The lines of the fenced bash block under the README's "## Set up and run" heading."""
    section = REPO.joinpath("README.md").read_text().split("## Set up and run", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def fresh_copy(target: Path) -> Path:
    """What a clone of this working tree holds: tracked files plus new files git does not ignore (no outputs/, data/)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes((REPO / name).read_bytes())
    return target


def test_q1_notebook_runs_from_the_readme_commands_on_a_fresh_copy(tmp_path):
    """Install: the documented command is run with --dry-run --no-index --no-build-isolation, so pip resolves
    requirements.txt (including `-e .`) against what is installed but changes nothing: a real install from the copy
    would re-point the shared virtual environment's editable nbhelpers at this temporary folder. Run: the documented
    line exactly, through bash in the copy, with `-p PRESET fast` swapped for `-p PRESET smoke -p EPOCHS 4` and a
    two-run ABLATION of one epoch each (the smoke preset on synthetic data, to keep the suite fast); nbhelpers is imported from the copy via PYTHONPATH.
    This is the suite's one run of the Q1 notebook, so it also checks what the run reports and writes."""
    install, run = setup_and_run_commands()
    assert install == "pip install -r requirements.txt"
    assert run.endswith(" -p PRESET fast")
    repo = fresh_copy(tmp_path / "repo")
    assert not (repo / "outputs").exists(), "a fresh clone has no outputs/ folder"
    env = os.environ | {"PYTHONPATH": str(repo), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    resolved = subprocess.run([sys.executable, "-m", *install.split(), "--dry-run", "--no-index", "--no-build-isolation"],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert resolved.returncode == 0, resolved.stdout[-2000:] + resolved.stderr[-2000:]
    # plus a two-run ABLATION of one epoch each: the study section runs in the same notebook run
    smoke = run.removesuffix(" -p PRESET fast") + " -p PRESET smoke -p EPOCHS 4 -y 'ABLATION: [depth=1]' -p ABLATION_EPOCHS 1"
    done = subprocess.run(["bash", "-c", smoke], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    check_q1_run(nbformat.read(repo / "outputs" / "q1_vit_cifar10.ipynb", as_version=4), repo / "outputs" / "q1_vit")


def check_q1_run(notebook, out_dir: Path) -> None:
    """The Q1 notebook's smoke run (4 epochs and a two-run ablation): its summary, checkpoints, plots, the model,
    presets and results tables, the study's runs and takeaways, and what it shows inline."""
    from nbhelpers.vit.checkpoint import load_checkpoint

    summary = json.loads((out_dir / "run_summary.json").read_text())
    assert summary["preset"] == "smoke" and summary["epochs"] == 4 and summary["steps"] == 4 * (2000 // 64)
    assert summary["final_test_accuracy"]["reported"] > 0.5, summary["final_test_accuracy"]
    assert summary["final_test_accuracy"]["raw"] == pytest.approx(summary["history"][-1]["test_accuracy"])
    assert summary["parameters"] > 0 and summary["flops_per_image"] > 0 and summary["images_per_second"] > 0
    assert summary["wall_seconds"] >= summary["train_seconds"] > 0
    assert len(summary["per_class_accuracy"]) == 10 and sum(map(sum, summary["confusion_matrix"])) == summary["test_images"]
    assert "chosen on the test set" in summary["best_epoch_test_accuracy"]["note"]
    best = load_checkpoint(out_dir / "best.pt")  # no validation split: the final state, complete, the same bytes as last.pt
    assert {"model", "optimizer", "scheduler", "scaler", "ema", "rng", "step", "config"} <= set(best) and best["step"] == summary["steps"]
    assert (out_dir / "best.pt").read_bytes() == (out_dir / "last.pt").read_bytes()
    for png in ("curves.png", "confusion.png", "misclassified.png", "attention.png"):
        assert (out_dir / png).stat().st_size > 0
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert sum("image/png" in output.get("data", {}) for output in outputs) >= 4, "plots are shown inline"
    assert any("final test accuracy" in output.get("text", "") for output in outputs)
    # headless, the progress bar is text whose saved output ends at its last state: no widget frozen at "0%"
    assert not [output for output in outputs if "application/vnd.jupyter.widget-view+json" in output.get("data", {})]
    bar = "".join(output.get("text", "") for output in cell_outputs(notebook, "fit_on_gpus(") if output.get("name") == "stderr")
    assert f"{summary['steps']}/{summary['steps']}" in bar.split("train:")[-1], bar[-300:]
    markdown = "\n".join(output.get("data", {}).get("text/markdown", "") for output in outputs)
    # the model section: a per-layer table whose total matches the trained model, and the patch grid figure
    assert f"**{summary['parameters']:,}**" in markdown and "| block 2 |" in markdown
    assert f"**{summary['flops_per_image'] / 1e6:,.1f} M**" in markdown
    assert "| `cpu` |" in markdown and "not measured" in markdown  # the presets table, from the registry
    # results: the generated data is named as such wherever the seed's CIFAR-10 figure stands beside it
    results = next(text for text in markdown.split("\n\n") if "seed write-up (768x12" in text)
    assert "generated data (10 made-up classes, not CIFAR-10)" in results and "device cpu" in results
    # the ablation: two runs of one epoch, a table, the chart and takeaways built from their summaries
    runs = sorted((out_dir / "ablation").glob("*/run_summary.json"))
    assert len(runs) == 2 and all(json.loads(path.read_text())["epochs"] == 1 for path in runs)
    accuracies = {path.parent.name.split("-")[0]: json.loads(path.read_text())["final_test_accuracy"]["reported"] for path in runs}
    delta = 100 * (accuracies["depth"] - accuracies["reference"])
    assert f"depth=1: {delta:+.1f} points over the reference" in markdown and "on generated data (not CIFAR-10)" in markdown
    assert (out_dir / "ablation" / "custom.png").stat().st_size > 0


# ----------------------------------------------------------------------------- Q2


def run(name: str, out: Path, **parameters) -> dict:
    executed = out / name
    papermill.execute_notebook(str(REPO / name), str(executed), parameters=parameters, cwd=str(REPO), kernel_name="python3", progress_bar=False)
    return nbformat.read(executed, as_version=4)


def cell_outputs(notebook, marker: str) -> list:
    """The outputs of the one code cell whose source contains `marker`."""
    (cell,) = [cell for cell in notebook.cells if cell.cell_type == "code" and marker in cell.source]
    return cell.outputs


def figures_shown(notebook, *markers: str) -> dict[str, int]:
    """marker -> how many PNG figures its cell showed."""
    return {marker: sum("image/png" in output.get("data", {}) for output in cell_outputs(notebook, marker))
            for marker in markers}


WALKTHROUGH = ("render.show_boxes(", "render.show_masks(", "render.show(walkthrough")  # stages 1, 2, 3


def test_q2_notebook_segments_the_sample_image_and_compares_the_backends(tmp_path, tiny_seg_model_dirs, tiny_sam3_model_dirs,
                                                                         monkeypatch):
    """BACKEND="both": the default backend (GroundingDINO -> SAM 2.1) segments the sample image and clip, then the
    comparison section runs the same image and clip through both backends."""
    from nbhelpers.seg.export import load_detections
    from nbhelpers.testing import TINY_SAM3_VIDEO_THRESHOLDS, validate_detections

    monkeypatch.delenv("NBHELPERS_NONINTERACTIVE", raising=False)  # the UI's note must come from papermill's headless run
    out_dir = tmp_path / "q2"
    notebook = run(
        "q2_text_segmentation.ipynb", tmp_path, OUT_DIR=str(out_dir), DEVICE="cpu", TEXT_PROMPT="car. cat.", BACKEND="both",
        DINO_MODEL=str(tiny_seg_model_dirs["dino"]), SAM_MODEL=str(tiny_seg_model_dirs["sam"]),
        CLIPSEG_MODEL=str(tiny_seg_model_dirs["clipseg"]), CLIPSEG_THRESHOLD=0.0, MAX_FRAMES=7, MAX_OBJECTS=2,
        REDETECT_EVERY=5, SAM3_MODEL=str(tiny_sam3_model_dirs["sam3"]), SAM3_VIDEO_MODEL=str(tiny_sam3_model_dirs["sam3_video"]),
        SAM3_THRESHOLD=TINY_SAM3_VIDEO_THRESHOLDS["score_threshold_detection"],
    )
    detections = load_detections(out_dir / "sample" / "detections.json")
    validate_detections(detections)
    assert detections["prompt"] == "car. cat."
    assert detections["image"]["height"] == 480 and detections["image"]["width"] == 640
    assert detections["models"]["dino_model"] == str(tiny_seg_model_dirs["dino"])
    for name in ("mask.png", "instances.png", "overlay.png"):
        assert (out_dir / "sample" / name).stat().st_size > 0
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    texts = "".join(output.get("text", "") for output in outputs)
    assert "interactive UI needs a live Jupyter kernel" in texts and "headless" in texts  # papermill: no stdin
    # headless: no bar is a widget saved as a frozen "0%": ours (segment, video) are text, transformers' own
    # ("Loading weights") are off while a model loads
    widgets = [output["data"].get("text/plain", "") for output in outputs
               if "application/vnd.jupyter.widget-view+json" in output.get("data", {})]
    assert not widgets, widgets
    assert "video: 100%" in "".join(output.get("text", "") for output in outputs if output.get("name") == "stderr")
    assert any("image/png" in output.get("data", {}) for output in outputs), "the overlay is shown inline"
    tracks = json.loads((out_dir / "video" / "sample_clip" / "tracks.json").read_text())
    assert tracks["frames"] == 7 and tracks["width"] == 320 and tracks["prompt"] == "car. cat."
    assert 1 <= len(tracks["objects"]) <= 2 and tracks["codec"] == "h264"
    assert any("<video" in output.get("data", {}).get("text/html", "") for output in outputs), "the overlay plays inline"
    # the comparison: the same image and clip through each backend, files apart, one table row per backend
    for backend, model_key in (("gdino-sam2", "dino_model"), ("sam3", "sam3_model")):
        compared = load_detections(out_dir / "compare" / backend / "image" / "detections.json")
        assert compared["models"]["backend"] == backend and compared["image"]["width"] == 640
        assert list(compared["models"]).count("sam3_model") == (backend == "sam3") and model_key in compared["models"]
        clip = json.loads((out_dir / "compare" / backend / "video" / "tracks.json").read_text())
        assert clip["frames"] == 7 and clip["backend"] == backend
    tables = [output["data"]["text/html"] for output in outputs if "<th>backend</th>" in output.get("data", {}).get("text/html", "")]
    assert len(tables) == 1 and tables[0].count("<tr>") == 3 and "SAM 3" in tables[0] and "GroundingDINO" in tables[0]
    # the comparison cell shows no stderr (transformers' per-frame SAM 3 "max_num_objects" warning is counted instead)
    assert not [output for output in cell_outputs(notebook, "compare_backends(config)") if output.get("name") == "stderr"]
    # the walkthrough (one figure per stage) and the identities section's timeline
    assert figures_shown(notebook, *WALKTHROUGH, "render.track_timeline(") == dict.fromkeys([*WALKTHROUGH, "render.track_timeline("], 1)
    (table,) = [output["data"]["text/html"] for output in cell_outputs(notebook, "show_video(video_result)")
                if "<th>label</th>" in output.get("data", {}).get("text/html", "")]
    assert table.count("<tr><td>#") == len(tracks["objects"]) and "frames with a mask (of 7)" in table and "None" not in table


def test_q2_notebook_runs_the_sam3_backend(tmp_path, tiny_sam3_model_dirs):
    """BACKEND="sam3" with tiny random SAM 3 models: the sample image and two frames of the sample clip."""
    from nbhelpers.seg.export import load_detections
    from nbhelpers.testing import TINY_SAM3_VIDEO_THRESHOLDS, validate_detections

    out_dir = tmp_path / "q2"
    notebook = run(
        "q2_text_segmentation.ipynb", tmp_path, OUT_DIR=str(out_dir), DEVICE="cpu", TEXT_PROMPT="car. cat.",
        BACKEND="sam3", SAM3_MODEL=str(tiny_sam3_model_dirs["sam3"]), SAM3_VIDEO_MODEL=str(tiny_sam3_model_dirs["sam3_video"]),
        SAM3_THRESHOLD=TINY_SAM3_VIDEO_THRESHOLDS["score_threshold_detection"], MAX_FRAMES=2, MAX_OBJECTS=3,
    )
    detections = load_detections(out_dir / "sample" / "detections.json")
    validate_detections(detections)
    assert detections["source"] == "sam3" and detections["detections"]
    assert detections["models"]["backend"] == "sam3" and detections["models"]["sam3_model"] == str(tiny_sam3_model_dirs["sam3"])
    tracks = json.loads((out_dir / "video" / "sample_clip" / "tracks.json").read_text())
    assert tracks["frames"] == 2 and tracks["backend"] == "sam3" and tracks["codec"] == "h264"
    texts = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)
    assert 'set BACKEND = "both"' in texts  # the comparison section explains itself
    # SAM 3 video's per-frame "hitting self.max_num_objects" log is counted into one printed line, not shown red
    video_cell = cell_outputs(notebook, "run_video(config, models)")
    assert not [output for output in video_cell if output.get("name") == "stderr" and "max_num_objects" in output.get("text", "")]
    assert figures_shown(notebook, *WALKTHROUGH, "render.track_timeline(") == dict.fromkeys([*WALKTHROUGH, "render.track_timeline("], 1)
