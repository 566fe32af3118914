"""`python -m nbhelpers.seg`: outputs and exit codes, with the tiny random models (no network)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from nbhelpers.seg import __main__ as cli
from nbhelpers.seg.export import COMPLETE_FILE, OUTPUT_FILES, load_detections
from nbhelpers.seg.inputs import list_image_files
from nbhelpers.seg.pipeline import output_folder
from nbhelpers.seg.video import is_video_file
from nbhelpers.testing import validate_detections
from nbhelpers.testing import make_test_frame, make_test_image

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m nbhelpers.seg ARGS` in a fresh interpreter (runpy, exactly as -m does); the last stdout line says
    whether torch was imported before the exit."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    code = ("import runpy, sys\ntry:\n    runpy.run_module('nbhelpers.seg', run_name='__main__', alter_sys=True)\n"
            "finally:\n    print('torch imported' if 'torch' in sys.modules else 'torch not imported')")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _model_args(dirs: dict[str, Path]) -> list[str]:
    return ["--dino", str(dirs["dino"]), "--sam", str(dirs["sam"]), "--clipseg", str(dirs["clipseg"]), "--device", "cpu"]


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(make_test_image(72, 120)).save(folder / "kitchen.png")
    Image.fromarray(make_test_image(100, 64, seed=3)).save(folder / "street.jpg")
    return folder


def test_folder_run_writes_outputs_and_exits_0(tiny_seg_model_dirs, tiny_seg_models, image_folder: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code = cli.main([str(image_folder), "--prompt", "a cat, the dog", "--out", str(out), "--box-threshold", "0.05",
                     *_model_args(tiny_seg_model_dirs)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    for stem, size in (("kitchen", (72, 120)), ("street", (100, 64))):
        assert sorted(path.name for path in (out / stem).iterdir()) == sorted([*OUTPUT_FILES.values(), COMPLETE_FILE])
        saved = load_detections(out / stem / "detections.json")
        validate_detections(saved)
        assert (saved["image"]["height"], saved["image"]["width"]) == size
        assert saved["prompt"] == "a cat. the dog." and saved["source"] == "grounding-dino"
        assert saved["thresholds"]["box_threshold"] == 0.05
        assert saved["models"]["dino_model"] == str(tiny_seg_model_dirs["dino"].resolve())
        assert f"{stem}." in printed.out


def test_missing_image_exits_2_with_one_line(tiny_seg_model_dirs, tmp_path: Path) -> None:
    # A real process: exit code 2, one line on stderr, and no seconds spent importing torch before saying so.
    done = _run_cli(str(tmp_path / "missing.jpg"), "--prompt", "a cat", "--out", str(tmp_path / "out"),
                    *_model_args(tiny_seg_model_dirs))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {str(tmp_path / 'missing.jpg')!r} does not exist "
                                                "(give an image file, a folder of images or a video)"]
    assert done.stdout.strip().splitlines()[-1] == "torch not imported"


# The other bad inputs go through main() in this process (the same code as the subprocess, without paying
# for a fresh interpreter and torch import each time).
@pytest.mark.parametrize("case, expected", [
    ("empty prompt", "is empty"),
    ("bad model folder", "model folder './no-such-dino' does not exist"),
    ("threshold out of range", "box_threshold=1.5 must be in [0, 1]"),
    ("empty folder", "no images or videos in folder"),
    ("offline hub id", "hf download nbhelpers-tests/not-cached --local-dir DIR"),
])
def test_bad_input_exits_2_with_one_line(case: str, expected: str, tiny_seg_model_dirs, tiny_seg_models,
                                         image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    image, prompt, extra = str(image_folder / "kitchen.png"), "a cat", _model_args(tiny_seg_model_dirs)
    if case == "empty prompt":
        prompt = "  "
    elif case == "bad model folder":
        extra = ["--dino", "./no-such-dino", *extra[2:]]
    elif case == "threshold out of range":
        extra = [*extra, "--box-threshold", "1.5"]
    elif case == "empty folder":
        image = str(tmp_path)
    elif case == "offline hub id":  # the real offline code path; the id is made up so no cache can hold it
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        extra = [*extra[:4], "--clipseg", "nbhelpers-tests/not-cached", *extra[6:]]
    assert cli.main([image, "--prompt", prompt, "--out", str(tmp_path / "out"), *extra]) == 2
    # transformers' weight-loading progress bar goes to stderr too when an earlier test released a cached model
    errors = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("Loading weights")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and expected in errors[0], errors


def test_nothing_found_still_exits_0(tiny_seg_model_dirs, tiny_seg_models, image_folder: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    code = cli.main([str(image_folder / "kitchen.png"), "--prompt", "a cat", "--out", str(tmp_path / "out"),
                     "--box-threshold", "1", "--clipseg-threshold", "1", *_model_args(tiny_seg_model_dirs)])
    assert code == 0
    assert "no object matched 'a cat.'" in capsys.readouterr().out
    saved = load_detections(tmp_path / "out" / "kitchen" / "detections.json")
    assert saved["source"] == "none" and saved["detections"] == []


def test_unreadable_image_exits_2_after_writing_the_others(tiny_seg_model_dirs, tiny_seg_models, image_folder: Path,
                                                           tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (image_folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code = cli.main([str(image_folder), "--prompt", "a cat", "--out", str(tmp_path / "out"),
                     *_model_args(tiny_seg_model_dirs)])
    assert code == 2
    assert "skipped broken.png" in capsys.readouterr().err
    assert (tmp_path / "out" / "kitchen" / "detections.json").is_file()
    assert (tmp_path / "out" / "street" / "detections.json").is_file()
    assert not (tmp_path / "out" / "broken").exists()


def test_unreadable_images_are_found_before_any_model_is_loaded(tiny_seg_model_dirs, image_folder: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from nbhelpers.seg import models, pipeline

    def no_loading(*args, **kwargs):  # a model load here is the minutes the check is there to save
        raise AssertionError("models were loaded before the images were checked")

    monkeypatch.setattr(models, "load_models", no_loading)
    monkeypatch.setattr(pipeline, "load_models", no_loading)
    broken = image_folder / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert cli.main([str(broken), "--prompt", "a cat", "--out", str(tmp_path / "out"), *_model_args(tiny_seg_model_dirs)]) == 2
    printed = capsys.readouterr()
    assert "loading models" not in printed.out and f"cannot read image {str(broken)!r}" in printed.err
    with pytest.raises(ValueError, match="IMAGE_PATH: 1 unreadable image.*broken.png"):  # the notebook's models cell
        pipeline.load_configured_models(pipeline.SegmentConfig(images=str(image_folder)))


def test_error_lines_are_written_above_the_progress_bar(tiny_seg_model_dirs, tiny_seg_models, image_folder: Path,
                                                        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # A JPEG cut short keeps a valid header: it passes the up-front check and fails while the bar is drawn.
    whole = tmp_path / "whole.jpg"
    Image.fromarray(make_test_image(64, 64)).save(whole)
    (image_folder / "broken.jpg").write_bytes(whole.read_bytes()[:400])
    code = cli.main([str(image_folder), "--prompt", "a cat", "--out", str(tmp_path / "out"), *_model_args(tiny_seg_model_dirs)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error: skipped broken.jpg") == 1
    fragments = re.split(r"[\r\n]", err)  # a line printed onto the bar would share its fragment with the bar's text
    assert any(fragment.startswith("error: skipped broken.jpg") for fragment in fragments), err


def test_a_threshold_that_is_not_a_number_is_named_as_the_option(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["x.jpg", "--prompt", "a cat", "--out", str(tmp_path), "--box-threshold", "abc"]) == 2
    err = capsys.readouterr().err
    assert "argument --box-threshold: 'abc' is not a number in [0, 1]" in err and "_threshold" not in err


def test_unexpected_error_exits_1(tiny_seg_model_dirs, tiny_seg_models, image_folder: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def failing_save(*args, **kwargs):  # stands in for a bug deep inside the run
        raise RuntimeError("simulated failure")

    monkeypatch.setattr("nbhelpers.seg.pipeline.save_outputs", failing_save)
    code = cli.main([str(image_folder / "kitchen.png"), "--prompt", "a cat", "--out", str(tmp_path / "out"),
                     *_model_args(tiny_seg_model_dirs)])
    assert code == 1
    assert "error: unexpected RuntimeError: simulated failure" in capsys.readouterr().err


def test_same_stem_gets_distinct_folders(tmp_path: Path) -> None:
    used: set[str] = set()
    assert output_folder(tmp_path, "a.jpg", used) == tmp_path / "a"
    assert output_folder(tmp_path, "a.png", used) == tmp_path / "a_png"
    assert output_folder(tmp_path, "b.png", used) == tmp_path / "b"


def _save_gif(path: Path, frames: int) -> Path:
    pictures = [Image.fromarray(make_test_frame(index, 48, 64)) for index in range(frames)]
    pictures[0].save(path, save_all=frames > 1, append_images=pictures[1:], duration=100, loop=0)
    return path


def test_a_gif_is_a_video_only_when_animated(tmp_path: Path) -> None:
    still, animated = _save_gif(tmp_path / "still.gif", 1), _save_gif(tmp_path / "moving.gif", 4)
    assert not is_video_file(still) and is_video_file(animated)
    assert list_image_files(tmp_path) == [still]  # the folder rule is the same as the single-file one
    assert "video" in cli.build_parser().format_help() and "GIF" in cli.build_parser().format_help()


def test_single_frame_gif_runs_as_an_image(tiny_seg_model_dirs, tiny_seg_models, tmp_path: Path) -> None:
    still = _save_gif(tmp_path / "still.gif", 1)
    code = cli.main([str(still), "--prompt", "a cat", "--out", str(tmp_path / "out"), "--box-threshold", "0.05",
                     *_model_args(tiny_seg_model_dirs)])
    assert code == 0 and (tmp_path / "out" / "still" / "detections.json").is_file()


def test_folder_segments_its_videos_too(tiny_seg_model_dirs, tiny_seg_models, image_folder: Path, tmp_path: Path) -> None:
    # A folder run (also what torchrun shards) takes a video in the folder into OUT/<video stem>/.
    _save_gif(image_folder / "moving.gif", 4)
    _save_gif(image_folder / "still.gif", 1)
    out = tmp_path / "out"
    code = cli.main([str(image_folder), "--prompt", "a cat", "--out", str(out), *_model_args(tiny_seg_model_dirs)])
    assert code == 0
    assert sorted(path.name for path in out.iterdir()) == ["inputs_summary.json", "kitchen", "moving", "still", "street"]
    assert (out / "moving" / "tracks.json").is_file() and (out / "moving" / "video_overlay.mp4").is_file()
    assert sorted(path.name for path in (out / "still").iterdir()) == sorted([*OUTPUT_FILES.values(), COMPLETE_FILE])  # an image
    summary = json.loads((out / "inputs_summary.json").read_text())
    assert {item["input"]: item["status"] for item in summary["inputs"]} == {
        "kitchen.png": "done", "moving.gif": "done", "still.gif": "done", "street.jpg": "done"}


def test_rerun_redoes_corrupt_or_unrecorded_outputs(tiny_seg_model_dirs, tiny_seg_models, image_folder: Path,
                                                   tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Finished means verified by the completion record written last, not that the files exist."""
    for name, seed in (("garden.png", 5), ("yard.png", 6)):
        Image.fromarray(make_test_image(40, 56, seed=seed)).save(image_folder / name)
    out, args = tmp_path / "out", ["--prompt", "a cat", "--box-threshold", "0.05", *_model_args(tiny_seg_model_dirs)]
    assert cli.main([str(image_folder), "--out", str(out), *args]) == 0
    overlay = out / "kitchen" / "overlay.png"
    overlay.write_bytes(overlay.read_bytes()[: overlay.stat().st_size // 2])  # a write cut short (disk full, sync)
    (out / "street" / "detections.json").write_text("")  # emptied
    (out / "garden" / COMPLETE_FILE).unlink()  # outputs of an older version, which wrote no record
    untouched = (out / "yard" / "overlay.png").stat().st_mtime_ns
    stale = out / "yard" / ".overlay.png.999999999.0a1b2c3d.tmp"  # a killed --overwrite run's (no such process)
    stale.write_bytes(b"half a png")
    capsys.readouterr()
    assert cli.main([str(image_folder), "--out", str(out), *args]) == 0
    summary = json.loads((out / "inputs_summary.json").read_text())
    assert {item["input"]: item["status"] for item in summary["inputs"]} == {
        "garden.png": "done", "kitchen.png": "done", "street.jpg": "done", "yard.png": "skipped"}
    assert (out / "yard" / "overlay.png").stat().st_mtime_ns == untouched
    assert not stale.exists(), "a killed run's temp file is removed, even in a folder skipped as complete"
    Image.open(overlay).load()  # whole again
    validate_detections(load_detections(out / "street" / "detections.json"))
