"""`python -m nbhelpers.seg VIDEO ...`: outputs and exit codes with the tiny random models (no network)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2

from nbhelpers.seg import __main__ as cli
from nbhelpers.seg.video import load_tracks
from nbhelpers.testing import make_test_frame, make_test_video, make_truncated_video

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run_cli(dirs: dict[str, Path], *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    models = ["--dino", str(dirs["dino"]), "--sam", str(dirs["sam"]), "--clipseg", str(dirs["clipseg"]), "--device", "cpu"]
    return subprocess.run([sys.executable, "-m", "nbhelpers.seg", *args, *models], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_video_run_writes_overlay_and_tracks(tiny_seg_model_dirs, tmp_path: Path) -> None:
    clip = make_test_video(tmp_path / "clip.mp4", frames=8, height=48, width=64, fps=8.0)
    out = tmp_path / "out"
    done = _run_cli(tiny_seg_model_dirs, str(clip), "--prompt", "a cat", "--out", str(out), "--box-threshold", "0.05",
                    "--redetect-every", "3", "--max-objects", "2", "--id-maps")
    assert done.returncode == 0, done.stderr
    capture = cv2.VideoCapture(str(out / "video_overlay.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 8 and capture.get(cv2.CAP_PROP_FPS) == 8.0
    tracks = load_tracks(out / "tracks.json")
    objects = tracks["objects"]
    assert tracks["redetect_every"] == 3 and tracks["max_objects"] == 2 and len(objects) >= 1
    # MAX_OBJECTS counts objects at once: lost ones may be dropped for newcomers, never more than 2 live or seen.
    assert sum(o["state"] in ("visible", "lost") for o in objects) <= 2
    assert all(sum(f in [e["frame"] for e in o["frames"]] for o in objects) <= 2 for f in range(8))
    assert len(list((out / "id_maps").glob("*.png"))) == 8


def test_corrupt_video_exits_2_with_one_line(tiny_seg_model_dirs, tmp_path: Path) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x01 not a video" * 50)
    done = _run_cli(tiny_seg_model_dirs, str(bad), "--prompt", "a cat", "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert done.stderr.startswith("error: cannot read") and "ffmpeg -i INPUT -c:v libx264" in done.stderr


def test_bad_video_option_exits_2(tiny_seg_model_dirs, tiny_seg_models, tmp_path: Path, capsys) -> None:
    # In this process (models already cached by tiny_seg_models): the option reaches segment_video, whose
    # ValueError must become exit code 2 with one line naming the option.
    clip = make_test_video(tmp_path / "clip.mp4", frames=2, height=48, width=64)
    dirs = tiny_seg_model_dirs
    code = cli.main([str(clip), "--prompt", "a cat", "--out", str(tmp_path / "out"), "--frame-stride", "0",
                     "--dino", str(dirs["dino"]), "--sam", str(dirs["sam"]), "--clipseg", str(dirs["clipseg"]),
                     "--device", "cpu"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]  # not load progress
    assert code == 2 and errors == ["error: frame_stride=0: use 1 (every frame) or more."], errors


def test_animated_gif_is_a_video_and_a_cut_video_warns_on_stderr(tiny_seg_model_dirs, tmp_path: Path) -> None:
    from PIL import Image

    pictures = [Image.fromarray(make_test_frame(index, 48, 64)) for index in range(3)]
    gif = tmp_path / "moving.gif"
    pictures[0].save(gif, save_all=True, append_images=pictures[1:], duration=100, loop=0)
    done = _run_cli(tiny_seg_model_dirs, str(gif), "--prompt", "a cat", "--out", str(tmp_path / "gif"),
                    "--box-threshold", "0.05")
    assert done.returncode == 0, done.stderr
    assert load_tracks(tmp_path / "gif" / "tracks.json")["frames"] == 3
    # Half of an MJPG AVI: the header says 20 frames, a few decode. Those are kept; the notice is a warning
    # on stderr, not part of the summary on stdout.
    cut = make_truncated_video(tmp_path)  # the header says 20 frames, about half decode
    done = _run_cli(tiny_seg_model_dirs, str(cut), "--prompt", "a cat", "--out", str(tmp_path / "cut"),
                    "--box-threshold", "1", "--clipseg-threshold", "1")
    assert done.returncode == 0, done.stderr
    assert "ended after" in done.stderr and "Warning" in done.stderr and "ended after" not in done.stdout
    assert 1 <= load_tracks(tmp_path / "cut" / "tracks.json")["frames"] < 20
