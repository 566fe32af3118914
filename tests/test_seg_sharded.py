"""`python -m nbhelpers.seg FOLDER` split over 2 gloo processes under torchrun, resume and the per-input summary.

The tiny random models (no network) make every output deterministic on the CPU, so the two-process run must
write byte for byte the files of the single-process run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from nbhelpers.seg import __main__ as cli
from nbhelpers.seg.export import COMPLETE_FILE
from nbhelpers.seg.folder_run import SUMMARY_FILE
from nbhelpers.testing import make_test_image

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    photos = tmp_path / "photos"
    photos.mkdir()
    for index, (height, width) in enumerate([(72, 120), (100, 64), (64, 64), (80, 96), (48, 72)]):
        Image.fromarray(make_test_image(height, width, seed=index)).save(photos / f"photo_{index}.png")
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    return photos



def model_args(dirs: dict[str, Path]) -> list[str]:
    return ["--prompt", "a cat, the dog", "--box-threshold", "0.05", "--dino", str(dirs["dino"]), "--sam", str(dirs["sam"]),
            "--clipseg", str(dirs["clipseg"]), "--device", "cpu"]


def files_of(out: Path) -> dict[str, object]:
    """Every output file's bytes; JSON parsed, less detections.json's timings (seconds: not deterministic) and
    the size the completion record gives detections.json (it holds those timings)."""
    files: dict[str, object] = {}
    for path in sorted(out.rglob("*")):
        if path.is_file() and path.name != SUMMARY_FILE:
            files[str(path.relative_to(out))] = path.read_bytes()
            if path.suffix == ".json":
                files[str(path.relative_to(out))] = {key: value for key, value in json.loads(path.read_bytes()).items() if key != "timings"}
            if path.name == COMPLETE_FILE:  # the completion record: sizes; detections.json's varies with its timings
                files[str(path.relative_to(out))]["files"].pop("detections.json")
    return files


def statuses(out: Path) -> dict[str, str]:
    return {item["input"]: item["status"] for item in json.loads((out / SUMMARY_FILE).read_text())["inputs"]}


def test_two_processes_write_the_single_process_outputs_and_reruns_skip(tiny_seg_model_dirs, folder: Path, tmp_path: Path, one_thread) -> None:
    single = tmp_path / "single"
    assert cli.main([str(folder), "--out", str(single), *model_args(tiny_seg_model_dirs)]) == 2  # broken.jpg: exit 2
    summary = json.loads((single / SUMMARY_FILE).read_text())
    assert summary["counts"] == {"done": 5, "skipped": 0, "failed": 1} and summary["world_size"] == 1
    assert [item["input"] for item in summary["inputs"]] == ["broken.jpg"] + [f"photo_{i}.png" for i in range(5)]
    assert summary["inputs"][0]["status"] == "failed" and summary["inputs"][0]["reason"]  # the loader's message

    double = tmp_path / "double"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nbhelpers.seg",
               str(folder), "--out", str(double), *model_args(tiny_seg_model_dirs)]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0 and "broken.jpg" in done.stderr  # the failed input makes rank(s) exit 2
    shared = json.loads((double / SUMMARY_FILE).read_text())
    assert shared["world_size"] == 2 and shared["counts"] == summary["counts"]
    assert {item["rank"] for item in shared["inputs"]} == {0, 1}
    assert files_of(double) == files_of(single)  # the union of both processes' outputs; PNGs byte for byte
    assert len(files_of(single)) == 5 * 5  # four outputs and the completion record per image

    before = {name: (single / name).stat().st_mtime_ns for name in files_of(single)}
    cli.main([str(folder), "--out", str(single), *model_args(tiny_seg_model_dirs)])  # a re-run (a session that died)
    assert statuses(single) == {"broken.jpg": "failed"} | {f"photo_{i}.png": "skipped" for i in range(5)}
    assert {name: (single / name).stat().st_mtime_ns for name in files_of(single)} == before  # nothing rewritten
    (single / "photo_3" / "overlay.png").unlink()  # an input whose outputs are incomplete is redone
    cli.main([str(folder), "--out", str(single), *model_args(tiny_seg_model_dirs)])
    assert statuses(single)["photo_3.png"] == "done" and (single / "photo_3" / "overlay.png").is_file()
    cli.main([str(folder), "--out", str(single), "--overwrite", *model_args(tiny_seg_model_dirs)])
    assert set(statuses(single).values()) == {"done", "failed"}
