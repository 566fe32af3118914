"""The README's "Set up and run" commands, run as written on a fresh copy of the repository."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]


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


def test_readme_setup_and_run_commands_work_on_a_fresh_copy_and_q1_reports_its_run(tmp_path):
    """Install: the documented command is run with --dry-run --no-index --no-build-isolation, so pip resolves
    requirements.txt (including `-e .`) against what is installed but changes nothing: a real install from the copy
    would re-point the shared virtual environment's editable nbhelpers at this temporary folder. Run: the documented
    line exactly, through bash in the copy, with `-p PRESET fast` swapped for `-p PRESET smoke -p EPOCHS 4` (the
    smoke preset on synthetic data, to keep the suite fast); nbhelpers is imported from the copy via PYTHONPATH.
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
    smoke = run.removesuffix(" -p PRESET fast") + " -p PRESET smoke -p EPOCHS 4"
    done = subprocess.run(["bash", "-c", smoke], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    check_q1_run(nbformat.read(repo / "outputs" / "q1_vit_cifar10.ipynb", as_version=4), repo / "outputs" / "q1_vit")


def check_q1_run(notebook, out_dir: Path) -> None:
    """The Q1 notebook's smoke run (4 epochs): its summary, checkpoints, plots, and what it shows inline."""
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
