"""The ipywidgets UI without a browser: widget tree, run_once, the click handler and the non-interactive rule.

The real models belong to nbhelpers.seg.models and need downloaded weights, so `segment_image` and the
models loader are replaced by stand-ins here; they record what the UI passes and return a hand-made
Segmentation. Everything else (load_image, overlay, figure, export) is the real code.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import matplotlib

matplotlib.use("Agg")  # headless test run

import ipywidgets as widgets
import numpy as np
import pytest

import nbhelpers.seg.image as image_module
from nbhelpers.seg.image import Segmentation
from nbhelpers.seg.ui import DEFAULTS, SAM_CHECKPOINTS, build_ui, launch_ui, noninteractive_reason, run_once

REPO = Path(__file__).resolve().parents[1]


class FakeModelsLoader:
    """Stand-in for nbhelpers.seg.models.load_models: counts loads per SAM checkpoint."""

    def __init__(self) -> None:
        self.loaded: list[str] = []

    def __call__(self, sam_checkpoint: str) -> SimpleNamespace:
        self.loaded.append(sam_checkpoint)
        return SimpleNamespace(sam_checkpoint=sam_checkpoint)


@pytest.fixture
def fake_segment(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Replace segment_image (real models cannot run here): one box + mask in the image's top-left quarter."""
    calls: list[dict] = []

    def segment_image(image, prompt, models, **thresholds) -> Segmentation:
        calls.append({"shape": image.shape, "prompt": prompt, "models": models, **thresholds})
        height, width = image.shape[:2]
        masks = np.zeros((1, height, width), bool)
        masks[0, height // 8: height // 2, width // 8: width // 2] = True
        box = np.array([[width // 8, height // 8, width // 2, height // 2]], np.float32)
        return Segmentation(box, np.array([0.8], np.float32), [prompt.rstrip(".")], masks, np.array([0.9], np.float32),
                            "grounding-dino", (height, width), prompt, {"detect": 0.01, "segment": 0.02})

    monkeypatch.setattr(image_module, "segment_image", segment_image)
    return calls


@pytest.fixture
def picture(tmp_path: Path) -> tuple[Path, np.ndarray]:
    rgb = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    path = tmp_path / "my photo.png"
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path, rgb


# ----------------------------------------------------------------------------- widget tree


def test_widget_tree_types_ranges_and_defaults() -> None:
    ui = build_ui(FakeModelsLoader())
    assert isinstance(ui.upload, widgets.FileUpload) and isinstance(ui.path, widgets.Text)
    assert isinstance(ui.prompt, widgets.Text) and isinstance(ui.button, widgets.Button) and isinstance(ui.output, widgets.Output)
    assert ui.button.description == "Segment"
    sliders = {"box_threshold": ui.box_threshold, "text_threshold": ui.text_threshold, "clipseg_threshold": ui.clipseg_threshold}
    for name, slider in sliders.items():
        assert isinstance(slider, widgets.FloatSlider)
        assert (slider.min, slider.max, slider.step) == (0.0, 1.0, 0.01)
        assert slider.value == pytest.approx(DEFAULTS[name])
    assert (ui.box_threshold.value, ui.text_threshold.value, ui.clipseg_threshold.value) == pytest.approx((0.35, 0.25, 0.4))
    assert isinstance(ui.sam_size, widgets.Dropdown) and list(ui.sam_size.options) == ["tiny", "small", "base-plus", "large"]
    assert ui.sam_size.value == "tiny"  # same default as nbhelpers.seg.models.DEFAULT_SAM
    assert SAM_CHECKPOINTS["base-plus"] == "facebook/sam2.1-hiera-base-plus"
    assert all(checkpoint == f"facebook/sam2.1-hiera-{size}" for size, checkpoint in SAM_CHECKPOINTS.items())
    assert isinstance(ui.container, widgets.VBox) and ui.output in ui.container.children


def test_defaults_are_applied_and_checked() -> None:
    ui = build_ui(FakeModelsLoader(), defaults={"prompt": "car.", "box_threshold": 0.5, "sam_size": "large", "image_path": "a.jpg"})
    assert (ui.prompt.value, ui.box_threshold.value, ui.sam_size.value, ui.path.value) == ("car.", 0.5, "large", "a.jpg")
    with pytest.raises(ValueError, match="unknown keys"):
        build_ui(FakeModelsLoader(), defaults={"box_treshold": 0.5})
    with pytest.raises(ValueError, match="sam_size"):
        build_ui(FakeModelsLoader(), defaults={"sam_size": "huge"})


# ----------------------------------------------------------------------------- run_once


def test_run_once_returns_segmentation_and_overlay(fake_segment: list[dict], picture) -> None:
    path, rgb = picture
    loader = FakeModelsLoader()
    seg, drawn = run_once(str(path), " cat. ", 0.3, 0.2, 0.45, "tiny", loader)
    assert loader.loaded == ["facebook/sam2.1-hiera-tiny"]
    call = fake_segment[0]
    assert call["prompt"] == "cat." and call["shape"] == (60, 80, 3) and call["models"].sam_checkpoint == loader.loaded[0]
    assert (call["box_threshold"], call["text_threshold"], call["clipseg_threshold"]) == (0.3, 0.2, 0.45)
    assert drawn.shape == rgb.shape and drawn.dtype == np.uint8
    assert not np.array_equal(drawn[12:28, 14:38], rgb[12:28, 14:38])  # inside the mask: tinted
    assert np.array_equal(drawn[45:, 55:], rgb[45:, 55:])  # far from it: untouched
    assert len(seg) == 1


@pytest.mark.parametrize("prompt,sam_size,threshold,message", [
    ("  ", "tiny", 0.3, "prompt is empty"), ("cat.", "huge", 0.3, "SAM size"), ("cat.", "tiny", 1.3, "box_threshold"),
])
def test_run_once_rejects_bad_input(fake_segment, picture, prompt, sam_size, threshold, message) -> None:
    loader = FakeModelsLoader()
    with pytest.raises(ValueError, match=message):
        run_once(str(picture[0]), prompt, threshold, 0.25, 0.4, sam_size, loader)
    assert loader.loaded == [] and fake_segment == []  # nothing heavy started


# ----------------------------------------------------------------------------- click handler


def _outputs(ui) -> tuple[list[bytes], str, str]:
    images = [base64.b64decode(o["data"]["image/png"]) for o in ui.output.outputs if o["output_type"] == "display_data"]
    stdout = "".join(o["text"] for o in ui.output.outputs if o.get("name") == "stdout")
    stderr = "".join(o["text"] for o in ui.output.outputs if o.get("name") == "stderr")
    return images, stdout, stderr


def test_click_shows_figure_and_summary_and_reuses_models(fake_segment, picture, tmp_path: Path) -> None:
    loader = FakeModelsLoader()
    ui = build_ui(loader, defaults={"prompt": "cat.", "image_path": str(picture[0]), "sam_size": "tiny"}, out_dir=tmp_path / "out")
    ui.button.click()
    images, stdout, stderr = _outputs(ui)
    assert len(images) == 1 and images[0].startswith(b"\x89PNG") and stderr == ""
    assert "1 instance(s) for 'cat.'" in stdout and "saved" in stdout
    saved = json.loads((tmp_path / "out" / "my_photo" / "detections.json").read_text())
    assert saved["image"]["source_file"] == "my photo.png" and saved["models"]["sam"] == "facebook/sam2.1-hiera-tiny"
    ui.button.click()  # re-run: output replaced, not appended; models not reloaded
    assert len(_outputs(ui)[0]) == 1 and loader.loaded == ["facebook/sam2.1-hiera-tiny"]
    ui.sam_size.value = "small"
    ui.button.click()
    assert loader.loaded == ["facebook/sam2.1-hiera-tiny", "facebook/sam2.1-hiera-small"]
    ui.sam_size.value = "tiny"
    ui.button.click()  # only the last loaded set is kept (GPU memory), so tiny loads again
    assert loader.loaded[-1] == "facebook/sam2.1-hiera-tiny" and len(loader.loaded) == 3
    assert not ui.button.disabled


def test_failed_save_still_shows_the_result(fake_segment, picture, tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    ui = build_ui(FakeModelsLoader(), defaults={"prompt": "cat.", "image_path": str(picture[0])}, out_dir=blocker)
    ui.button.click()
    images, stdout, _ = _outputs(ui)
    assert len(images) == 1 and "not saved: PermissionError" in stdout and "writable folder" in stdout


def test_click_with_an_uploaded_image(fake_segment, picture) -> None:
    path, rgb = picture
    ui = build_ui(FakeModelsLoader(), defaults={"prompt": "dog."})
    # What the browser sends (ipywidgets 8 format); a real upload needs a browser.
    ui.upload.set_state({"value": [{"name": "up.png", "type": "image/png", "size": path.stat().st_size,
                                    "content": memoryview(path.read_bytes()), "last_modified": 0}]})
    ui.button.click()
    images, stdout, _ = _outputs(ui)
    assert len(images) == 1 and "dog" in stdout and fake_segment[0]["shape"] == rgb.shape


def test_click_errors_become_one_message(fake_segment, tmp_path: Path) -> None:
    ui = build_ui(FakeModelsLoader(), defaults={"prompt": "cat."})
    ui.button.click()
    images, stdout, stderr = _outputs(ui)
    assert images == [] and stderr.startswith("Could not segment: ValueError: No image")
    assert "Traceback" not in stderr and not ui.button.disabled
    ui.path.value = str(tmp_path / "missing.jpg")
    ui.button.click()
    assert _outputs(ui)[2].startswith("Could not segment:") and fake_segment == []


# ----------------------------------------------------------------------------- non-interactive rule


def test_plain_python_gets_a_note_not_a_ui(capsys: pytest.CaptureFixture) -> None:
    assert launch_ui(FakeModelsLoader()) is None
    note = capsys.readouterr().out
    assert note.count("\n") == 1 and "needs a live Jupyter kernel" in note


def test_environment_variable_forces_non_interactive(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("NBHELPERS_NONINTERACTIVE", "1")
    assert launch_ui() is None and "NBHELPERS_NONINTERACTIVE=1" in capsys.readouterr().out


def test_kernel_rule_uses_allow_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
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
    ui = launch_ui(FakeModelsLoader())
    assert ui is not None and shown == [ui.container]


def test_papermill_run_prints_the_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: papermill really executes a notebook cell that calls launch_ui."""
    import nbformat
    import papermill

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(
        f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
        "from nbhelpers.seg.ui import launch_ui\nresult = launch_ui()\nprint('returned', result)"
    )]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    source, executed = tmp_path / "ui.ipynb", tmp_path / "ui_out.ipynb"
    nbformat.write(notebook, source)
    monkeypatch.delenv("NBHELPERS_NONINTERACTIVE", raising=False)  # the rule under test is allow_stdin
    papermill.execute_notebook(str(source), str(executed), kernel_name="python3", progress_bar=False, cwd=str(tmp_path))
    text = "".join(output.get("text", "") for output in nbformat.read(executed, as_version=4).cells[0].outputs)
    assert "needs a live Jupyter kernel" in text and "headless" in text and "returned None" in text
