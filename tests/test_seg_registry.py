"""The backend registry (nbhelpers.seg.registry): a backend registered here, in the test, runs through the CLI, the
notebook's configuration (SegmentConfig + pipeline.run / run_video) and the comparison with no other file changed;
`python -m nbhelpers.seg --help` loads neither torch's models nor a widget module."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nbhelpers.seg import __main__ as cli
from nbhelpers.seg import pipeline, registry
from nbhelpers.seg.types import DetectionSettings, FrameDetections, FrameMasks, Segmentation, Track, VideoSettings
from nbhelpers.testing import make_test_image, make_test_video

BOX = (8, 6, 40, 30)  # x0, y0, x1, y1 of the one object the scripted backend finds


class ScriptedBackend:
    """A model family that finds one object per phrase in a fixed box: what a new detector family brings (a
    SegmentationBackend). Its "loaded models" are the backend itself."""

    name = "scripted"

    def __init__(self, config) -> None:
        self.loaded_with = config.dino_model  # proves the loader got the configuration

    def describe(self) -> dict[str, str]:
        return {"scripted_model": "box-v1"}

    def fit_phrases(self, phrases: list[str]) -> list[str]:
        return phrases

    def detect(self, image: np.ndarray, phrases: list[str], settings: DetectionSettings) -> FrameDetections:
        return FrameDetections(np.asarray([BOX], np.float32), np.ones(1, np.float32), phrases[:1], "scripted")

    def segment_images(self, images, phrases, settings, profile=False) -> list[Segmentation]:
        results = []
        for image in images:
            mask = np.zeros((1, *image.shape[:2]), bool)
            mask[0, BOX[1]:BOX[3], BOX[0]:BOX[2]] = True
            results.append(Segmentation(
                boxes=np.asarray([BOX], np.float32), scores=np.ones(1, np.float32), labels=phrases[:1], masks=mask,
                mask_scores=np.ones(1, np.float32), source="scripted", image_size=image.shape[:2],
                prompt=". ".join(phrases) + ".", timings={"total": 0.0}, message="scripted", backend=self.name))
        return results


class _ScriptedPass:
    """Object 1 sits in BOX on every frame."""

    def __init__(self, label: str, size: tuple[int, int], encode_mask) -> None:
        self.label, self.size, self.encode_mask = label, size, encode_mask
        self.tracks: dict[int, Track] = {}
        self.seed_frame, self.objects_now, self.frames_held_peak = None, 1, 1

    def step(self, frame: int, frame_rgb: np.ndarray) -> FrameMasks:
        if not self.tracks:
            self.tracks[1], self.seed_frame = Track(1, self.label, 1.0, "scripted", frame), frame
        mask = np.zeros((1, *self.size), bool)
        mask[0, BOX[1]:BOX[3], BOX[0]:BOX[2]] = True
        self.tracks[1].record(frame, mask[0], self.encode_mask)
        return FrameMasks([1], mask, np.ones(1, np.float32))

    def notes(self) -> str:
        return ""


class ScriptedVideoAdapter:
    """The video loop's side of the scripted family (nbhelpers.seg.video.loop.VideoAdapter)."""

    backend, tracker_name, out_of_memory_advice = "scripted", "the scripted tracker", "Use fewer objects"
    no_match_hint, drawing_source, video_fields = "nothing", "scripted-video", ("frame_stride", "max_frames")

    def __init__(self, models, phrases, settings, video_settings) -> None:
        import torch

        self.phrases, self.prompt, self.device = phrases, ". ".join(phrases) + ".", torch.device("cpu")

    def start(self, info, output_fps, offload, encode_mask) -> _ScriptedPass:
        return _ScriptedPass(self.phrases[0], (info.height, info.width), encode_mask)

    def metadata(self, run) -> dict:
        return {"detector": "scripted box", "models": {"scripted_model": "box-v1"}}


@pytest.fixture
def scripted_backend():
    spec = registry.register_backend(registry.BackendSpec(
        name="scripted", label="Scripted boxes", load=ScriptedBackend, image_backend=lambda models: models,
        video=ScriptedVideoAdapter, owns=lambda models: isinstance(models, ScriptedBackend)))
    yield spec
    registry.unregister_backend("scripted")


def test_a_backend_registered_in_the_test_runs_through_the_cli(scripted_backend, tmp_path: Path, capsys) -> None:
    import cv2

    image = tmp_path / "photo.png"
    cv2.imwrite(str(image), make_test_image(48, 64))
    clip = make_test_video(tmp_path / "clip.mp4", frames=3, height=48, width=64)
    out = tmp_path / "out"
    assert cli.main([str(image), "--prompt", "a box", "--out", str(out), "--backend", "scripted"]) == 0
    saved = json.loads((out / "photo" / "detections.json").read_text())
    assert saved["models"]["backend"] == "scripted" and saved["models"]["scripted_model"] == "box-v1"
    assert [d["box_xyxy"] for d in saved["detections"]] == [list(BOX)]
    assert cli.main([str(clip), "--prompt", "a box", "--out", str(out / "video"), "--backend", "scripted"]) == 0
    tracks = json.loads((out / "video" / "tracks.json").read_text())
    assert tracks["backend"] == "scripted" and tracks["detector"] == "scripted box" and tracks["frames"] == 3
    assert tracks["video_settings"] == {"frame_stride": 1, "max_frames": None}
    assert [entry["box_xyxy"] for entry in tracks["objects"][0]["frames"]] == [list(BOX)] * 3
    assert "Scripted boxes" in _help(capsys)  # --help lists it, from the registry


def _help(capsys) -> str:
    capsys.readouterr()
    assert cli.main(["--help"]) == 0
    return capsys.readouterr().out


def test_a_backend_registered_in_the_test_runs_through_the_notebook_config(scripted_backend, tmp_path: Path) -> None:
    import cv2

    cv2.imwrite(str(tmp_path / "photo.png"), make_test_image(48, 64))
    clip = make_test_video(tmp_path / "clip.mp4", frames=2, height=48, width=64)
    config = pipeline.SegmentConfig(images=str(tmp_path / "photo.png"), prompt="a box", out_dir=str(tmp_path / "out"),
                                    backend="scripted", dino_model="my-checkpoint", video=str(clip))
    models = pipeline.load_configured_models(config)
    assert isinstance(models, ScriptedBackend) and models.loaded_with == "my-checkpoint"
    (result,) = pipeline.run(config, models, verbose=False)
    assert result.segmentation.backend == "scripted" and result.files["overlay"].is_file()
    video = pipeline.run_video(config, models, verbose=False)
    assert video.frames == 2 and [track.label for track in video.tracks] == ["a box"]
    assert json.loads(video.files["tracks"].read_text())["backend"] == "scripted"


def test_an_unknown_backend_is_refused_naming_the_registered_ones() -> None:
    with pytest.raises(ValueError, match=r"BACKEND='nope': use one of \['gdino-sam2', 'sam3', 'both'\]"):
        pipeline.SegmentConfig(backend="nope")


def test_cli_help_loads_no_widget_module_and_no_torch() -> None:
    code = ("import sys, runpy\n"
            "sys.argv = ['nbhelpers.seg', '--help']\n"
            "try:\n    runpy.run_module('nbhelpers.seg', run_name='__main__')\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "loaded = [m for m in sys.modules if m.split('.')[0] in ('ipywidgets', 'torch', 'transformers')]\n"
            "assert not loaded, loaded\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    assert "--backend {gdino-sam2,sam3}" in done.stdout
    # what a CLI run imports (the pipeline, the folder run) loads no widget module either: only launch_ui does
    code = ("import sys, nbhelpers.seg.pipeline, nbhelpers.seg.folder_run, nbhelpers.seg.compare\n"
            "assert not [m for m in sys.modules if m.startswith('ipywidgets')]\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr


def test_settings_left_at_none_take_the_library_defaults() -> None:
    assert DetectionSettings(box_threshold=None, max_detections=None) == DetectionSettings()
    assert VideoSettings(redetect_every=None, overlay_alpha=None) == VideoSettings()
    config = pipeline.SegmentConfig(prompt=None, backend=None, batch_size=None, detection=None, video_settings=None)
    assert config == pipeline.SegmentConfig()
    with pytest.raises(ValueError, match="overlay_alpha=1.5: must be in"):
        VideoSettings(overlay_alpha=1.5)


def test_a_backend_registered_in_the_test_is_in_the_ui_dropdown_and_runs(scripted_backend, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import cv2
    import IPython.display

    from nbhelpers.seg import ui as ui_module

    # No Jupyter kernel can run inside pytest: the rule is told there is one, and display only collects.
    monkeypatch.setattr(ui_module, "noninteractive_reason", lambda: None)
    monkeypatch.setattr(IPython.display, "display", lambda widget: None)
    cv2.imwrite(str(tmp_path / "photo.png"), make_test_image(48, 64))
    config = pipeline.SegmentConfig(images=str(tmp_path / "photo.png"), prompt="a box", out_dir=str(tmp_path / "out"),
                                    backend="scripted")
    widgets = pipeline.launch_ui(config)
    assert ("Scripted boxes", "scripted") in set(widgets.backend.options) and widgets.backend.value == "scripted"
    widgets.button.click()
    widgets.wait_saved(60)
    saved = json.loads((tmp_path / "out" / "ui" / "photo" / "detections.json").read_text())
    assert saved["models"]["scripted_model"] == "box-v1" and [d["box_xyxy"] for d in saved["detections"]] == [list(BOX)]
