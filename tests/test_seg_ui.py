"""The ipywidgets UI without a browser: widget tree, run_once, the click handler and the non-interactive rule.

Everything runs the real code on the tiny random models of tests/conftest.py: loading, segment_image, overlay,
figure and export. The outcome is made deterministic by the settings: box_threshold=1.0 is never exceeded, so
GroundingDINO finds nothing, and clipseg_threshold=0.0 turns the CLIPSeg fallback into one whole-image region
per phrase. segment_image is only wrapped (the real one runs) to record what the UI passed to it. Stand-ins
remain for what cannot exist inside pytest: a Jupyter kernel and the browser sending an upload.
"""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import cv2
import matplotlib

matplotlib.use("Agg")  # headless test run

import ipywidgets as widgets
import numpy as np
import pytest
from PIL import Image

import nbhelpers.seg.ui as ui_module
from nbhelpers.seg import models as seg_models
from nbhelpers.seg import pipeline
from nbhelpers.seg.render import overlay
from nbhelpers.seg.types import DetectionSettings
from nbhelpers.seg.ui import SAM3_CHECKPOINT, SAM_CHECKPOINTS, build_ui, launch_ui, noninteractive_reason, run_once
from nbhelpers.seg.ui_inputs import UPLOAD_LIMIT_BYTES, clean_path, file_size, upload_guard_script
from nbhelpers.seg.ui_widgets import upload_hint

REPO = Path(__file__).resolve().parents[1]
FALLBACK = {"box_threshold": 1.0, "clipseg_threshold": 0.0}  # deterministic: one whole-image region per phrase


class TinyModelsLoader:
    """A real models loader (load_models on the CPU) for two SAM sizes: "tiny" is the tiny SAM folder, "small"
    a copy of it at another path, i.e. another model id, as a different size would be. Records each load.
    `sam3_folder`, when set, is what the SAM 3 backend loads (load_sam3_models)."""

    def __init__(self, dirs: dict[str, Path], small_sam: Path) -> None:
        self.dirs, self.loaded, self.sam3_folder = dirs, [], None
        self.sam_folders = {SAM_CHECKPOINTS["tiny"]: dirs["sam"], SAM_CHECKPOINTS["small"]: small_sam}

    def __call__(self, sam_checkpoint: str) -> seg_models.SegmentationModels | seg_models.Sam3Models:
        self.loaded.append(sam_checkpoint)
        if sam_checkpoint == SAM3_CHECKPOINT:
            return seg_models.load_sam3_models(self.sam3_folder, device="cpu")
        return seg_models.load_models(self.dirs["dino"], self.sam_folders[sam_checkpoint], self.dirs["clipseg"],
                                      device="cpu")


@pytest.fixture(scope="session")
def small_sam(tiny_seg_model_dirs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(shutil.copytree(tiny_seg_model_dirs["sam"], tmp_path_factory.mktemp("second-sam") / "sam2"))


@pytest.fixture
def loader(tiny_seg_model_dirs, small_sam: Path) -> TinyModelsLoader:
    return TinyModelsLoader(tiny_seg_model_dirs, small_sam)


@pytest.fixture
def segment_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Record what reaches segment_image; the real function still runs."""
    calls: list[dict] = []
    real = ui_module.segment_image

    def recording_segment_image(image, prompt, models, settings):
        calls.append({"image": image.copy(), "prompt": prompt, "models": models, "settings": settings})
        return real(image, prompt, models, settings)

    monkeypatch.setattr(ui_module, "segment_image", recording_segment_image)
    return calls


@pytest.fixture
def picture(tmp_path: Path) -> tuple[Path, np.ndarray]:
    rgb = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    path = tmp_path / "my photo.png"
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path, rgb


def _cached_sams() -> list[str]:
    return [key[1] for key in seg_models._CACHE if key[0] == "sam2"]


# ----------------------------------------------------------------------------- widget tree


def test_widget_tree_types_ranges_and_defaults(loader) -> None:
    ui = build_ui(loader)
    assert isinstance(ui.upload, widgets.FileUpload) and isinstance(ui.path, widgets.Text)
    assert isinstance(ui.prompt, widgets.Text) and isinstance(ui.button, widgets.Button) and isinstance(ui.output, widgets.Output)
    assert ui.button.description == "Segment"
    sliders = {"box_threshold": ui.box_threshold, "text_threshold": ui.text_threshold, "clipseg_threshold": ui.clipseg_threshold}
    library_defaults = DetectionSettings()  # the one copy of the defaults: the UI must not have its own
    for name, slider in sliders.items():
        assert isinstance(slider, widgets.FloatSlider)
        assert slider.value == pytest.approx(getattr(library_defaults, name))
    assert ui.settings == library_defaults and ui.current_settings() == library_defaults
    assert isinstance(ui.sam_size, widgets.Dropdown) and ui.sam_size.value == "tiny"  # DEFAULT_SAM's size
    assert isinstance(ui.container, widgets.VBox) and ui.output in ui.container.children
    assert loader.loaded == []  # building the widgets loads nothing


def test_defaults_are_applied_and_checked(loader) -> None:
    ui = build_ui(loader, defaults={"prompt": "car.", "box_threshold": 0.5, "sam_size": "large", "image_path": "a.jpg",
                                    "nms_iou": 0.3, "multimask": True})
    assert (ui.prompt.value, ui.box_threshold.value, ui.sam_size.value, ui.path.value) == ("car.", 0.5, "large", "a.jpg")
    assert (ui.settings.nms_iou, ui.settings.multimask) == (0.3, True)
    for bad, message in [({"box_treshold": 0.5}, "unknown keys"), ({"sam_size": "huge"}, "sam_size"),
                         ({"nms_iou": 1.5}, "nms_iou"), ({"multimask": "yes"}, "multimask")]:
        with pytest.raises(ValueError, match=message):
            build_ui(loader, defaults=bad)


# ----------------------------------------------------------------------------- run_once


def test_run_once_returns_segmentation_and_overlay(loader, segment_calls, picture) -> None:
    path, rgb = picture
    settings = DetectionSettings(box_threshold=1.0, text_threshold=0.2, clipseg_threshold=0.0, nms_iou=0.3, multimask=True)
    seg, drawn = run_once(str(path), " cat. ", "tiny", loader, settings)
    assert loader.loaded == ["facebook/sam2.1-hiera-tiny"]
    (call,) = segment_calls
    assert call["prompt"] == "cat." and np.array_equal(call["image"], rgb)
    assert call["models"].sam.model_id == str(loader.dirs["sam"].resolve())
    assert call["settings"] == settings
    assert seg.source == "clipseg-fallback" and seg.labels == ["cat"] and seg.masks.shape == (1, 60, 80)
    assert drawn.dtype == np.uint8 and np.array_equal(drawn, overlay(rgb, seg))  # drawn on the very same pixels
    assert not np.array_equal(drawn, rgb)


@pytest.mark.parametrize("prompt,sam_size,message", [("  ", "tiny", "prompt is empty"), ("cat.", "huge", "SAM size")])
def test_run_once_rejects_bad_input(loader, segment_calls, picture, prompt, sam_size, message) -> None:
    with pytest.raises(ValueError, match=message):
        run_once(str(picture[0]), prompt, sam_size=sam_size, models_loader=loader)
    assert loader.loaded == [] and segment_calls == []  # nothing heavy started


# ----------------------------------------------------------------------------- click handler


def _outputs(ui) -> tuple[list[bytes], str, str]:
    images = [base64.b64decode(o["data"]["image/png"]) for o in ui.output.outputs if o["output_type"] == "display_data"]
    stdout = "".join(o["text"] for o in ui.output.outputs if o.get("name") == "stdout")
    stderr = "".join(o["text"] for o in ui.output.outputs if o.get("name") == "stderr")
    return images, stdout, stderr


def test_click_shows_figure_saves_real_metadata_and_reuses_models(loader, picture, tmp_path: Path) -> None:
    defaults = {"prompt": "cat.", "image_path": str(picture[0]), "sam_size": "tiny", "nms_iou": 0.4, **FALLBACK}
    ui = build_ui(loader, defaults=defaults, out_dir=tmp_path / "out")
    ui.button.click()
    ui.wait_saved(60)
    images, stdout, stderr = _outputs(ui)
    assert len(images) == 1 and images[0].startswith(b"\x89PNG") and stderr == ""
    assert "my photo.png: 1 instance(s) for 'cat.' via clipseg-fallback" in stdout and "saved" in stdout
    saved = json.loads((tmp_path / "out" / "my_photo" / "detections.json").read_text())
    assert saved["image"]["source_file"] == "my photo.png" and len(saved["detections"]) == 1
    # the models really loaded (local folders here), not the hub id the dropdown entry stands for
    assert saved["models"]["sam_model"] == str(loader.dirs["sam"].resolve())
    assert saved["models"]["dino_model"] == str(loader.dirs["dino"].resolve())
    assert saved["models"]["sam_backend"] == "transformers:Sam2Model" and saved["models"]["device"] == "cpu"
    assert saved["thresholds"] == {"box_threshold": 1.0, "text_threshold": 0.25, "clipseg_threshold": 0.0,
                                   "nms_iou": 0.4, "max_detections": None, "multimask": False, "sam3_threshold": 0.5,
                                   "sam3_mask_threshold": 0.5}
    ui.button.click()  # re-run: output replaced, not appended; models not reloaded
    ui.wait_saved(60)
    assert len(_outputs(ui)[0]) == 1 and loader.loaded == ["facebook/sam2.1-hiera-tiny"]
    assert saved["models"]["sam_model"] in _cached_sams()


def test_switching_sam_size_keeps_only_the_latest_sam_cached(loader, picture, small_sam: Path, tmp_path: Path) -> None:
    tiny_sam, other_sam = str(loader.dirs["sam"].resolve()), str(small_sam.resolve())
    ui = build_ui(loader, defaults={"prompt": "cat.", "image_path": str(picture[0]), **FALLBACK}, out_dir=tmp_path)
    ui.sam_size.value = "small"
    ui.button.click()
    assert other_sam in _cached_sams()  # a first click releases nothing: other SAMs may still be cached
    ui.sam_size.value = "tiny"
    ui.button.click()  # switching drops the other SAM from the models cache (its memory can go)
    ui.wait_saved(60)
    assert loader.loaded == ["facebook/sam2.1-hiera-small", "facebook/sam2.1-hiera-tiny"]
    assert _cached_sams() == [tiny_sam] and _outputs(ui)[2] == ""
    detectors = [key[1] for key in seg_models._CACHE if key[0] == "grounding-dino"]
    assert str(loader.dirs["dino"].resolve()) in detectors  # GroundingDINO stays cached
    assert json.loads((tmp_path / "my_photo" / "detections.json").read_text())["models"]["sam_model"] == tiny_sam
    assert not ui.button.disabled




def test_failed_save_still_shows_the_result(loader, picture, tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    ui = build_ui(loader, defaults={"prompt": "cat.", "image_path": str(picture[0]), **FALLBACK}, out_dir=blocker)
    ui.button.click()
    ui.wait_saved(60)
    images, stdout, _ = _outputs(ui)
    assert len(images) == 1 and "not saved: PermissionError" in stdout and "writable folder" in stdout


def _upload(ui, name: str, content: bytes) -> None:
    # What the browser sends (ipywidgets 8 format); a real upload needs a browser.
    ui.upload.set_state({"value": [{"name": name, "type": "image/png", "size": len(content),
                                    "content": memoryview(content), "last_modified": 0}]})


def test_uploaded_rgba_png_is_composited_on_white(loader, segment_calls) -> None:
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[:, :25] = (255, 0, 0, 255)  # opaque red; the right half is fully transparent black
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    ui = build_ui(loader, defaults={"prompt": "dog.", **FALLBACK})
    _upload(ui, "up.png", buffer.getvalue())
    ui.button.click()
    images, stdout, stderr = _outputs(ui)
    assert len(images) == 1 and "1 instance(s) for 'dog.'" in stdout and stderr == ""
    image = segment_calls[0]["image"]
    assert image.shape == (40, 50, 3) and (image[:, :25] == (255, 0, 0)).all() and (image[:, 25:] == 255).all()


def test_broken_upload_names_the_file(loader, segment_calls) -> None:
    ui = build_ui(loader, defaults={"prompt": "dog."})
    _upload(ui, "holiday.png", b"\x89PNG not really")
    ui.button.click()
    stderr = _outputs(ui)[2]
    assert stderr.startswith("Could not segment: holiday.png could not be read as an image") and segment_calls == []
    assert "BytesIO" not in stderr and "upload a complete JPEG" in stderr


def test_click_errors_become_one_message(loader, segment_calls, tmp_path: Path) -> None:
    ui = build_ui(loader, defaults={"prompt": "cat."})
    ui.button.click()
    images, stdout, stderr = _outputs(ui)
    assert images == [] and stderr.startswith("Could not segment: No image: upload one or type its path")
    assert "Traceback" not in stderr and not ui.button.disabled
    ui.path.value = str(tmp_path / "missing.jpg")
    ui.button.click()
    assert _outputs(ui)[2].startswith("Could not segment:") and segment_calls == [] and loader.loaded == []


def test_pipeline_launch_ui_passes_the_configuration(tiny_seg_model_dirs, segment_calls, picture, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import IPython.display

    # No Jupyter kernel can run inside pytest: the rule is told there is one, and display only collects.
    monkeypatch.setattr(ui_module, "noninteractive_reason", lambda: None)
    monkeypatch.setattr(IPython.display, "display", lambda widget: None)
    dirs = tiny_seg_model_dirs
    config = pipeline.SegmentConfig(images=str(picture[0]), prompt="cat.", out_dir=str(tmp_path), dino_model=str(dirs["dino"]),
                                    sam_model=str(dirs["sam"]), clipseg_model=str(dirs["clipseg"]),
                                    detection=DetectionSettings(nms_iou=0.3, multimask=True, **FALLBACK), device="cpu")
    ui = pipeline.launch_ui(config)
    ui.button.click()
    ui.wait_saved(60)
    assert _outputs(ui)[2] == ""
    (call,) = segment_calls
    assert (call["settings"].nms_iou, call["settings"].multimask) == (0.3, True)
    saved = json.loads((tmp_path / "ui" / "my_photo" / "detections.json").read_text())
    assert saved["models"]["sam_model"] == str(dirs["sam"].resolve())  # the configured local folder, not a hub id
    assert (saved["thresholds"]["nms_iou"], saved["thresholds"]["multimask"]) == (0.3, True)


# ----------------------------------------------------------------------------- image source, paths, controls


def _png_bytes(height: int, width: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 200, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_latest_action_picks_the_image_and_the_source_line_names_it(loader, segment_calls, picture, tmp_path) -> None:
    path, rgb = picture
    ui = build_ui(loader, defaults={"prompt": "cat.", "image_path": str(path), **FALLBACK})
    assert "my photo.png: 80 x 60 px" in ui.source.value and ui.clear_upload.disabled
    _upload(ui, "up.png", _png_bytes(30, 40))
    assert "uploaded up.png: 40 x 30 px" in ui.source.value and not ui.clear_upload.disabled
    ui.button.click()
    assert segment_calls[-1]["image"].shape == (30, 40, 3)  # the upload, as shown
    ui.path.value = str(path) + " "  # editing the path afterwards: the path wins, the upload is dropped
    assert ui.upload.value == () and "my photo.png: 80 x 60 px" in ui.source.value
    ui.button.click()
    assert np.array_equal(segment_calls[-1]["image"], rgb)
    _upload(ui, "up.png", _png_bytes(30, 40))  # the same file again is a new action
    assert "uploaded up.png" in ui.source.value
    ui.clear_upload.click()
    assert ui.upload.value == () and "my photo.png" in ui.source.value and ui.clear_upload.disabled
    ui.button.click()
    assert np.array_equal(segment_calls[-1]["image"], rgb) and len(segment_calls) == 3


def test_quoted_and_file_url_paths_are_accepted(loader, segment_calls, picture) -> None:
    path, rgb = picture
    url = path.resolve().as_uri()  # file:///.../my%20photo.png
    for typed in (f'"{path}"', f"'{path}'", url, f"  {url}  ", f' "{url}" '):
        assert clean_path(typed) == str(path), typed
    ui = build_ui(loader, defaults={"prompt": "cat.", "image_path": f' "{url}" ', **FALLBACK})
    assert "my photo.png: 80 x 60 px" in ui.source.value
    ui.button.click()
    assert _outputs(ui)[2] == "" and np.array_equal(segment_calls[-1]["image"], rgb)


def test_path_errors_speak_to_the_user(loader, picture, tmp_path: Path) -> None:
    ui = build_ui(loader, defaults={"prompt": "cat.", "image_path": str(picture[0].parent)})
    assert "is a folder: type the path of one image in it, e.g." in ui.source.value
    ui.button.click()
    stderr = _outputs(ui)[2]
    assert "is a folder" in stderr and "my photo.png" in stderr and "segment_images" not in stderr
    ui.path.value = str(tmp_path / "nope.jpg")
    assert "No file at" in ui.source.value
    ui.button.click()
    assert _outputs(ui)[2].startswith(f"Could not segment: No file at {tmp_path / 'nope.jpg'}: check the spelling")


def _press_enter(ui) -> None:
    # What the browser sends when Enter is pressed in a Text widget (a custom "submit" message).
    ui.prompt._handle_msg({"content": {"data": {"method": "custom", "content": {"event": "submit"}}}, "buffers": []})


def test_enter_runs_and_a_double_click_runs_once(loader, segment_calls, picture, monkeypatch) -> None:
    ui = build_ui(loader, defaults={"prompt": "cat.", "image_path": str(picture[0]), **FALLBACK})
    _press_enter(ui)
    assert len(segment_calls) == 1 and ui.runs == 1
    # No kernel runs inside pytest: the browser's send times of each press (message header dates) are given here.
    sent = iter([1000.0, 1000.2, 1003.0, 1003.0])
    monkeypatch.setattr(ui_module, "_sent_at", lambda: next(sent))
    ui.button.click()
    ui.button.click()  # sent 0.2 s after the first: the second half of a double-click
    assert len(segment_calls) == 2 and ui.runs == 2
    ui.button.click()  # a later press runs again
    assert len(segment_calls) == 3 and ui.runs == 3
    ui.button.click()  # the same send time again: a stale header, not a second press; it runs
    assert len(segment_calls) == 4 and ui.runs == 4


def test_status_line_mentions_loading_only_when_models_load(loader, picture, monkeypatch) -> None:
    shown: list[str] = []
    real_show = ui_module._show
    monkeypatch.setattr(ui_module, "_show", lambda output, png=None, text="", stream="stdout": (
        shown.append(text), real_show(output, png, text, stream)))
    ui = build_ui(loader, defaults={"prompt": "cat.", "image_path": str(picture[0]), **FALLBACK})
    ui.button.click()
    assert shown[0].startswith("Loading the models and segmenting")
    shown.clear()
    ui.button.click()
    assert shown[0] == "Segmenting..."


def test_every_control_explains_itself_and_rows_wrap(loader) -> None:
    ui = build_ui(loader)
    controls = [ui.upload, ui.clear_upload, ui.path, ui.prompt, ui.box_threshold, ui.text_threshold,
                ui.clipseg_threshold, ui.sam3_threshold, ui.sam_size, ui.button]
    assert all(isinstance(control.tooltip, str) and len(control.tooltip) > 20 for control in controls)
    rows = [child for child in ui.container.children if isinstance(child, widgets.HBox)]
    assert len(rows) == 4 and all(row.layout.flex_flow == "row wrap" for row in rows)
    assert all(slider.layout.min_width for slider in (ui.box_threshold, ui.text_threshold, ui.clipseg_threshold,
                                                        ui.sam3_threshold))
    assert ui.upload.layout.width == "auto"  # the label, with its file count, is not cut


def test_big_image_is_shown_small_and_saved_full_size(loader, tmp_path: Path, monkeypatch) -> None:
    big = tmp_path / "big.png"
    cv2.imwrite(str(big), np.full((300, 500, 3), 90, np.uint8))
    monkeypatch.setattr(ui_module, "DISPLAY_MAX_SIDE", 100)
    drawn = []
    monkeypatch.setattr(ui_module, "overlay", lambda image, seg, **kw: drawn.append(image.shape) or overlay(image, seg, **kw))
    ui = build_ui(loader, defaults={"prompt": "cat.", "image_path": str(big), **FALLBACK}, out_dir=tmp_path / "out")
    ui.button.click()
    ui.wait_saved(60)
    assert drawn == [(60, 100, 3)]  # the on-screen figure is drawn at display size
    assert cv2.imread(str(tmp_path / "out" / "big" / "overlay.png")).shape == (300, 500, 3)  # the file is not


def test_upload_guard_script_carries_the_limit_and_the_fix() -> None:
    script = upload_guard_script("nbh-upload", "nbh-upload-note")
    assert str(UPLOAD_LIMIT_BYTES) in script and "websocket_max_message_size" in script
    assert "stopImmediatePropagation" in script and UPLOAD_LIMIT_BYTES < 10 * 2**20


# ----------------------------------------------------------------------------- non-interactive rule


def test_plain_python_gets_a_note_not_a_ui(loader, capsys: pytest.CaptureFixture) -> None:
    assert launch_ui(loader) is None
    note = capsys.readouterr().out
    assert note.count("\n") == 1 and "needs a live Jupyter kernel" in note


def test_environment_variable_forces_non_interactive(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("NBHELPERS_NONINTERACTIVE", "1")
    assert launch_ui() is None and "NBHELPERS_NONINTERACTIVE=1" in capsys.readouterr().out


def test_kernel_rule_uses_allow_stdin(loader, monkeypatch: pytest.MonkeyPatch) -> None:
    import IPython
    import IPython.display

    # A kernel cannot run inside pytest: a namespace stands in for get_ipython().kernel.
    shell = SimpleNamespace(kernel=SimpleNamespace(_allow_stdin=False))
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    assert "headless" in noninteractive_reason()
    shell.kernel._allow_stdin = True
    assert noninteractive_reason() is None
    shown = []
    monkeypatch.setattr(IPython.display, "display", shown.append)
    ui = launch_ui(loader)
    assert ui is not None and shown[0] is ui.container and loader.loaded == []  # models load on the first click
    assert len(shown) == 2 and "nbhUploadGuard" in shown[1].data  # the browser-side upload size check


# ----------------------------------------------------------------------------- issue 22: faults 13 and 14


@pytest.fixture
def kernel_shell(monkeypatch: pytest.MonkeyPatch) -> list:
    """No Jupyter kernel can run inside pytest: this stands in for its shell where the capturing Output widget looks
    for it, so an error raised inside `with output:` is shown as a traceback and swallowed, as in Jupyter. Returns
    the tracebacks shown."""
    from ipywidgets.widgets import widget_output

    shown: list = []
    shell = SimpleNamespace(kernel=None, showtraceback=lambda exc_tuple, tb_offset=None: shown.append(exc_tuple))
    monkeypatch.setattr(widget_output, "get_ipython", lambda: shell)
    return shown


@pytest.mark.parametrize("broken", ["missing folder", "broken config"])
def test_a_model_that_fails_to_load_shows_the_loaders_message(loader, picture, tmp_path: Path, kernel_shell,
                                                              broken: str) -> None:
    sam = tmp_path / "sam-small"
    if broken == "broken config":
        sam.mkdir()
        (sam / "config.json").write_text("{not json")
    loader.sam_folders[SAM_CHECKPOINTS["small"]] = sam
    ui = build_ui(loader, defaults={"prompt": "cat.", "image_path": str(picture[0]), "sam_size": "small", **FALLBACK})
    ui.button.click()
    images, stdout, stderr = _outputs(ui)
    expected = "does not exist. Check the path" if broken == "missing folder" else "config.json cannot be read"
    assert images == [] and stderr.startswith("Could not segment: "), stderr
    assert expected in stderr and "TypeError" not in stderr and stderr.count("\n") == 1  # the loader's own message
    assert kernel_shell == [] and ui.progress.outputs == ()  # no traceback under the UI
    ui.sam_size.value = "tiny"
    ui.button.click()  # a load that works replaces the message
    images, stdout, stderr = _outputs(ui)
    assert len(images) == 1 and stderr == "" and expected not in stdout and "1 instance(s)" in stdout
    assert kernel_shell == [] and ui.progress.outputs == ()


def test_upload_note_is_redrawn_after_an_upload_a_clear_and_a_path(loader, picture) -> None:
    # The browser writes a refused upload into the note on the page only (the browser test shows it); the kernel
    # must then send the note again, which a value equal to the old one would not do.
    ui = build_ui(loader, defaults={"prompt": "cat."})
    sent: list[str] = []
    ui.upload_note.observe(lambda change: sent.append(change["new"]), names="value")
    for action in (lambda: _upload(ui, "up.png", _png_bytes(30, 40)), ui.clear_upload.click,
                   lambda: setattr(ui.path, "value", str(picture[0]))):
        sent.clear()
        action()
        assert sent and sent[-1] == upload_hint() and ui.upload_note.value == upload_hint()


def test_sam3_threshold_slider_drives_sam3_and_only_the_chosen_backends_controls_work(
        loader, tiny_sam3_model_dirs, picture) -> None:
    library = DetectionSettings()
    ui = build_ui(loader, defaults={"prompt": "cat.", "image_path": str(picture[0]), "backend": "sam3",
                                    "sam3_threshold": 1.0})
    slider = ui.sam3_threshold
    assert isinstance(slider, widgets.FloatSlider) and (slider.min, slider.max) == (0.0, 1.0) and slider.value == 1.0
    assert build_ui(loader).sam3_threshold.value == library.sam3_threshold  # the library's default, not a copy
    sam2_controls = [ui.box_threshold, ui.text_threshold, ui.clipseg_threshold, ui.sam_size]
    assert all(control.disabled for control in sam2_controls) and not slider.disabled
    loader.sam3_folder = tiny_sam3_model_dirs["sam3"]
    ui.button.click()  # no score reaches 1.0: the result says to lower the threshold
    assert "lower SAM3_THRESHOLD" in _outputs(ui)[1] and "0 instance(s)" in _outputs(ui)[1]
    slider.value = 0.0  # every query passes
    ui.button.click()
    images, stdout, stderr = _outputs(ui)
    assert stderr == "" and "via sam3" in stdout and "sam3_threshold=0.0" in stdout and "0 instance(s)" not in stdout
    assert ui.current_settings().sam3_threshold == 0.0
    ui.backend.value = "gdino-sam2"
    assert not any(control.disabled for control in sam2_controls) and slider.disabled
    ui.backend.value = "sam3"
    assert all(control.disabled for control in sam2_controls) and not slider.disabled


def test_non_image_and_cut_short_files_are_named_as_such_when_the_path_is_entered(loader, segment_calls,
                                                                                  tmp_path: Path) -> None:
    notes, fake, cut = tmp_path / "notes.txt", tmp_path / "fake.jpg", tmp_path / "cut.jpg"
    notes.write_text("shopping list")
    fake.write_text("not a picture")
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    cut.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    ui = build_ui(loader, defaults={"prompt": "cat.", **FALLBACK})
    for path, expected in [(notes, "notes.txt is not an image (.txt files are not supported)"),
                           (fake, "fake.jpg is not an image, although its name ends in .jpg"),
                           (cut, "cut.jpg is damaged or cut short")]:
        ui.path.value = str(path)
        assert expected in ui.source.value and "color:#c00" in ui.source.value, ui.source.value
        ui.button.click()
        stderr = _outputs(ui)[2]
        assert stderr.startswith(f"Could not segment: {expected}") and "MAX_IMAGE_PIXELS" not in stderr, stderr
    assert segment_calls == [] and loader.loaded == []


def test_sizes_read_in_sensible_units(loader, picture, tmp_path: Path) -> None:
    assert [file_size(size) for size in (800, 43_000, 3_565_158)] == ["800 bytes", "42 KB", "3.4 MB"]
    path = picture[0]
    ui = build_ui(loader, defaults={"image_path": str(path)})
    assert f"80 x 60 px, {path.stat().st_size / 1024:.0f} KB" in ui.source.value and "0.0 MB" not in ui.source.value
    _upload(ui, "up.png", _png_bytes(30, 40))
    assert f"40 x 30 px, {len(_png_bytes(30, 40))} bytes" in ui.source.value


def test_a_typed_path_is_checked_on_enter_not_per_keystroke(loader) -> None:
    # The browser sends a Text's value per keystroke only when continuous_update is on (the browser test types a
    # path key by key); here: the widget state the browser reads, and what the empty source line asks for.
    ui = build_ui(loader)
    assert ui.path.get_state()["continuous_update"] is False
    assert "type its path and press Enter" in ui.source.value and "Enter" in ui.path.tooltip


def test_summary_says_the_time_is_model_time_and_gives_the_whole_click(loader, picture) -> None:
    ui = build_ui(loader, defaults={"prompt": "cat.", "image_path": str(picture[0]), **FALLBACK})
    ui.button.click()  # the first click loads the models: far more than the model time
    stdout = _outputs(ui)[1]
    summary_s = float(re.search(r" in ([0-9.]+)s", stdout).group(1))
    model_s, click_s = map(float, re.search(r"model time ([0-9.]+)s of ([0-9.]+)s for the whole click", stdout).groups())
    assert model_s == summary_s and click_s > model_s
