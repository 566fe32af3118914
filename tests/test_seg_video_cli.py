"""`python -m nbhelpers.seg VIDEO ...`: outputs and exit codes with the tiny random models (no network).

main() runs in this process (the code `python -m` runs, without a fresh interpreter and torch import per case; the
subprocess path is checked once in test_seg_cli), with the tiny models already cached by the tiny_seg_models fixture.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import pytest

from nbhelpers.seg import __main__ as cli
from nbhelpers.seg.video import load_tracks
from nbhelpers.testing import make_test_frame, make_test_image, make_test_video, make_truncated_video


@pytest.fixture
def run_cli(tiny_seg_model_dirs, tiny_seg_models, capsys: pytest.CaptureFixture):
    """main(ARGS + the tiny models) -> (exit code, stdout, stderr)."""
    dirs = tiny_seg_model_dirs
    models = ["--dino", str(dirs["dino"]), "--sam", str(dirs["sam"]), "--clipseg", str(dirs["clipseg"]), "--device", "cpu"]

    def run(*args: str) -> tuple[int, str, str]:
        code = cli.main([*args, *models])
        printed = capsys.readouterr()
        return code, printed.out, printed.err

    return run


def test_video_run_writes_overlay_and_tracks(run_cli, tmp_path: Path) -> None:
    clip = make_test_video(tmp_path / "clip.mp4", frames=8, height=48, width=64, fps=8.0)
    out = tmp_path / "out"
    code, _, errors = run_cli(str(clip), "--prompt", "a cat", "--out", str(out), "--box-threshold", "0.05",
                              "--redetect-every", "3", "--max-objects", "2", "--id-maps")
    assert code == 0, errors
    capture = cv2.VideoCapture(str(out / "video_overlay.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 8 and capture.get(cv2.CAP_PROP_FPS) == 8.0
    tracks = load_tracks(out / "tracks.json")
    objects = tracks["objects"]
    assert tracks["video_settings"]["redetect_every"] == 3 and tracks["video_settings"]["max_objects"] == 2 and len(objects) >= 1
    # MAX_OBJECTS counts objects at once: lost ones may be dropped for newcomers, never more than 2 live or seen.
    assert sum(o["state"] in ("visible", "lost") for o in objects) <= 2
    assert all(sum(f in [e["frame"] for e in o["frames"]] for o in objects) <= 2 for f in range(8))
    assert len(list((out / "id_maps").glob("*.png"))) == 8


def test_corrupt_video_exits_2_with_one_line(run_cli, tmp_path: Path) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x01 not a video" * 50)
    code, _, errors = run_cli(str(bad), "--prompt", "a cat", "--out", str(tmp_path / "out"))
    assert code == 2
    assert errors.strip().count("\n") == 0, errors
    assert errors.startswith("error: cannot read") and "ffmpeg -i INPUT -c:v libx264" in errors
    assert not (tmp_path / "out").exists(), "nothing written: the video is checked before the models load"


def test_bad_video_option_exits_2(run_cli, tmp_path: Path) -> None:
    # The option reaches segment_video, whose ValueError must become exit code 2 with one line naming the option.
    clip = make_test_video(tmp_path / "clip.mp4", frames=2, height=48, width=64)
    code, _, errors = run_cli(str(clip), "--prompt", "a cat", "--out", str(tmp_path / "out"), "--frame-stride", "0")
    errors = [line for line in errors.splitlines() if line.startswith("error")]  # not load progress
    assert code == 2 and errors == ["error: frame_stride=0: use 1 (every frame) or more."], errors


def test_animated_gif_is_a_video_and_a_cut_video_warns(run_cli, tmp_path: Path) -> None:
    from PIL import Image

    pictures = [Image.fromarray(make_test_frame(index, 48, 64)) for index in range(3)]
    gif = tmp_path / "moving.gif"
    pictures[0].save(gif, save_all=True, append_images=pictures[1:], duration=100, loop=0)
    code, _, errors = run_cli(str(gif), "--prompt", "a cat", "--out", str(tmp_path / "gif"), "--box-threshold", "0.05")
    assert code == 0, errors
    assert load_tracks(tmp_path / "gif" / "tracks.json")["frames"] == 3
    # Half of an MJPG AVI: the header says 20 frames, a few decode. Those are kept; the notice is a warning
    # (Python prints warnings on stderr), not part of the summary on stdout.
    cut = make_truncated_video(tmp_path)  # the header says 20 frames, about half decode
    with pytest.warns(UserWarning, match="ended after"):
        code, summary, errors = run_cli(str(cut), "--prompt", "a cat", "--out", str(tmp_path / "cut"),
                                        "--box-threshold", "1", "--clipseg-threshold", "1")
    assert code == 0, errors
    assert "ended after" not in summary and "frames" in summary
    assert 1 <= load_tracks(tmp_path / "cut" / "tracks.json")["frames"] < 20


def _frame_count(path: Path) -> int:
    capture = cv2.VideoCapture(str(path))
    try:
        return int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        capture.release()


def test_folder_of_only_videos_runs_from_cli_and_library(run_cli, tiny_seg_models, tmp_path: Path) -> None:
    import json

    from nbhelpers.seg.folder_run import SUMMARY_FILE, run_folder
    from nbhelpers.seg.pipeline import SegmentConfig

    folder = tmp_path / "clips"
    folder.mkdir()
    make_test_video(folder / "street.mp4", frames=4, height=48, width=64)
    code, _, errors = run_cli(str(folder), "--prompt", "a cat", "--out", str(tmp_path / "cli"), "--box-threshold", "0.05")
    assert code == 0, errors
    assert _frame_count(tmp_path / "cli" / "street" / "video_overlay.mp4") == 4
    assert load_tracks(tmp_path / "cli" / "street" / "tracks.json")["frames"] == 4
    config = SegmentConfig(images=str(folder), prompt="a cat", out_dir=str(tmp_path / "library"))
    summary = run_folder(config, tiny_seg_models)
    assert summary["counts"] == {"done": 1, "skipped": 0, "failed": 0}
    assert json.loads((tmp_path / "library" / SUMMARY_FILE).read_text())["inputs"][0]["input"] == "street.mp4"
    assert (tmp_path / "library" / "street" / "tracks.json").is_file()
    again = run_folder(config, tiny_seg_models, video_options={"save_id_maps": True})  # now asked for id maps: redone
    assert again["counts"] == {"done": 1, "skipped": 0, "failed": 0}
    assert len(list((tmp_path / "library" / "street" / "id_maps").glob("*.png"))) == 4
    assert run_folder(config, tiny_seg_models, video_options={"save_id_maps": True})["counts"]["skipped"] == 1
    # the notebook's path: IMAGE_PATH a folder of videos passes the image check, run() segments the videos into the
    # folders a folder run uses, and the walkthrough falls back to the sample image
    from PIL import Image

    from nbhelpers.seg import pipeline, stages

    notebook = SegmentConfig(images=str(folder), prompt="a cat", out_dir=str(tmp_path / "notebook"))
    pipeline.check_images(notebook)
    assert pipeline.run(notebook, tiny_seg_models) == []
    assert load_tracks(tmp_path / "notebook" / "street" / "tracks.json")["frames"] == 4
    assert stages.first_image(notebook) == pipeline.SAMPLE_IMAGE
    # images and videos together: both are segmented, each into its own folder
    Image.fromarray(make_test_image(48, 64)).save(folder / "photo.png")
    mixed = SegmentConfig(images=str(folder), prompt="a cat", out_dir=str(tmp_path / "mixed"))
    assert [result.name for result in pipeline.run(mixed, tiny_seg_models)] == ["photo.png"]
    assert (tmp_path / "mixed" / "photo" / "overlay.png").is_file() and (tmp_path / "mixed" / "street" / "tracks.json").is_file()


class _Killed(BaseException):
    """Stands for SIGKILL (which no test can survive): nothing after the raising point runs."""


def test_a_run_killed_between_overlay_and_tracks_is_redone(run_cli, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from nbhelpers.seg.video import export

    folder = tmp_path / "clips"
    folder.mkdir()
    make_test_video(folder / "clip.mp4", frames=6, height=48, width=64)
    out, args = tmp_path / "out", ["--prompt", "a cat", "--box-threshold", "0.05"]
    assert run_cli(str(folder), "--out", str(out), *args)[0] == 0

    def killed(*_args, **_kwargs):
        raise _Killed  # right after the new MP4 was renamed into place, before tracks.json
    with monkeypatch.context() as patch:
        patch.setattr(export, "write_tracks", killed)
        with pytest.raises(_Killed):
            run_cli(str(folder), "--out", str(out), *args, "--overwrite", "--max-frames", "3")
    pair = out / "clip"
    assert _frame_count(pair / "video_overlay.mp4") == 3 and load_tracks(pair / "tracks.json")["frames"] == 6  # mismatched
    code, _, errors = run_cli(str(folder), "--out", str(out), *args, "--max-frames", "3")  # the re-run
    assert code == 0, errors
    statuses = {item["input"]: item["status"] for item in json.loads((out / "inputs_summary.json").read_text())["inputs"]}
    assert statuses == {"clip.mp4": "done"}, "the mismatched pair is not taken as complete"
    assert _frame_count(pair / "video_overlay.mp4") == load_tracks(pair / "tracks.json")["frames"] == 3
