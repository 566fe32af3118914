"""A small ipywidgets front end: pick an image, type a prompt, tune thresholds, press "Segment".

When is the UI shown? Only with a live Jupyter frontend attached (`nbhelpers.platform.noninteractive_reason`):
`launch_ui` prints a one-line note and returns None under papermill / nbconvert, outside a kernel, or with
NBHELPERS_NONINTERACTIVE=1.
The models are loaded only when "Segment" is first clicked.
Reading the image (path rules, uploads, the upload size guard) is in `ui_inputs`, the widgets and their layout in
`ui_widgets`.
"""
from __future__ import annotations

import base64
import html
import io
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nbhelpers.platform import noninteractive_reason
from nbhelpers.seg.export import save_outputs
from nbhelpers.seg.image import segment_image
from nbhelpers.seg.inputs import load_image
from nbhelpers.seg.models import SHORT_NAMES, load_models, load_sam3_models, release
from nbhelpers.seg.registry import backends
from nbhelpers.seg.render import fit_for_display, overlay, show_overlay, summary_line
from nbhelpers.seg.types import DEFAULT_BACKEND, DetectionSettings, Segmentation
from nbhelpers.seg.ui_inputs import (check_image_path, decode_upload, describe_file, describe_upload, read_image_file,
                                     upload_entries, upload_guard_script, upload_name)
from nbhelpers.seg.ui_widgets import NOTE_CLASS, UPLOAD_CLASS, arrange, make_controls, upload_hint

SAM_CHECKPOINTS = SHORT_NAMES["sam2"]  # the SAM 2.1 size dropdown: size -> hub id (nbhelpers.seg.models' table)
# The loader is asked for the chosen SAM 2.1 checkpoint under the default backend, else for the backend's registry
# name (nbhelpers.seg.registry); SAM 3's ("sam3") is also its short model name, so the default loader reads it as one.
SAM3_CHECKPOINT = "sam3"
SETTING_NAMES = tuple(setting.name for setting in fields(DetectionSettings))
# Sliders for GroundingDINO's, CLIPSeg's and SAM 3's thresholds; the other DetectionSettings (nms_iou, max_detections,
# multimask, sam3_mask_threshold) have no widget and are passed through from the configuration to segment_image.
DEFAULTS: dict[str, Any] = {"image_path": "", "prompt": "", "sam_size": "tiny", "backend": DEFAULT_BACKEND,
                            **DetectionSettings().as_dict()}
DISPLAY_MAX_SIDE = 1600  # pixels: the on-screen figure is drawn at most this large; saved files keep full size
REPEAT_CLICK_S = 0.5  # a second press sent by the browser sooner than this after the first is a double-click
ModelsLoader = Callable[[str], Any]  # SAM 2.1 checkpoint id -> SegmentationModels; another backend's name -> its models

# ----------------------------------------------------------------------------- pipeline (no widgets)


def run_once(image: Any, prompt: str, sam_size: str, models_loader: ModelsLoader,
             settings: DetectionSettings = DetectionSettings(), backend: str = DEFAULT_BACKEND
             ) -> tuple[Segmentation, np.ndarray]:
    """One "Segment" click without a browser: load the image and models, segment, draw.

    Args:
        image: a path or an RGB array (anything `load_image` accepts).
        prompt: what to segment, e.g. "cat. dog.".
        sam_size: one of SAM_CHECKPOINTS ("tiny", "small", "base-plus", "large").
        models_loader: SAM checkpoint id -> SegmentationModels.
        settings: passed to `segment_image`.
        backend: a registered backend (nbhelpers.seg.registry); another than the default asks the loader for its
            name (sam_size is then unused).
    Returns:
        (Segmentation, overlay as (H, W, 3) uint8 RGB).
    """
    image_rgb, seg, _models = _segment(image, prompt, settings, sam_size, models_loader, backend)
    return seg, overlay(image_rgb, seg)


def _segment(image: Any, prompt: str, settings: DetectionSettings, sam_size: str,
             models_loader: ModelsLoader, backend: str = DEFAULT_BACKEND) -> tuple[np.ndarray, Segmentation, Any]:
    """Check the input, load the image and models, segment: (RGB image, Segmentation, models used)."""
    if not prompt or not prompt.strip():  # bad input is rejected before anything heavy starts
        raise ValueError("The prompt is empty: type what to segment, e.g. 'cat. dog.'.")
    if sam_size not in SAM_CHECKPOINTS:
        raise ValueError(f"SAM size {sam_size!r} is not one of {list(SAM_CHECKPOINTS)}.")
    if backend not in backends():
        raise ValueError(f"backend {backend!r} is not one of {list(backends())}.")
    image_rgb = load_image(image)
    models = models_loader(SAM_CHECKPOINTS[sam_size] if backend == DEFAULT_BACKEND else backend)
    seg = segment_image(image_rgb, prompt.strip(), models, settings=settings)
    return image_rgb, seg, models


def default_models_loader(sam_checkpoint: str) -> Any:
    """Load GroundingDINO + the chosen SAM 2.1 + CLIPSeg with nbhelpers.seg.models defaults (SAM 3 for
    SAM3_CHECKPOINT)."""
    return load_sam3_models(sam_checkpoint) if sam_checkpoint == SAM3_CHECKPOINT else load_models(sam=sam_checkpoint)


class _KeepLastLoaded:
    """Reuse the loaded models between clicks; hold one set only. Switching SAM size also drops every SAM from
    nbhelpers.seg.models' cache (GroundingDINO and CLIPSeg stay), so the old SAM's memory is freed once no one
    else holds it, before the next one takes GPU memory."""

    def __init__(self, loader: ModelsLoader) -> None:
        self.loader, self.cache = loader, {}

    def has(self, sam_checkpoint: str) -> bool:
        return sam_checkpoint in self.cache

    def __call__(self, sam_checkpoint: str) -> Any:
        if sam_checkpoint not in self.cache:
            if self.cache:
                self.cache.clear()
                release("sam2")
                release("sam3")
            self.cache[sam_checkpoint] = self.loader(sam_checkpoint)
        return self.cache[sam_checkpoint]


# ----------------------------------------------------------------------------- widgets


@dataclass
class SegmentationUI:
    """The widgets of one UI; `container` is what gets displayed."""

    upload: Any
    clear_upload: Any
    path: Any
    source: Any  # HTML: the image the next run will segment
    upload_note: Any  # HTML: the upload limit, or why an upload was refused
    prompt: Any
    box_threshold: Any
    text_threshold: Any
    clipseg_threshold: Any
    sam3_threshold: Any
    sam_size: Any
    button: Any
    output: Any  # status, result figure and summary, or the error; set from the kernel only
    progress: Any  # what model loading prints, captured by the browser (kept apart from `output`)
    container: Any
    settings: DetectionSettings = DetectionSettings()  # the settings without a widget come from here
    runs: int = 0  # runs started, double-clicks not counted
    last_sent: float | None = None  # browser time of the last press that started a run (seconds since the epoch)
    backend: Any = None  # Dropdown of backend_labels() (None: the default backend)
    _saver: ThreadPoolExecutor | None = field(default=None, repr=False)
    _saving: Future | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return f"SegmentationUI(prompt={self.prompt.value!r}, sam_size={self.sam_size.value!r})"

    def current_settings(self) -> DetectionSettings:
        """`settings` with the sliders' thresholds; raises ValueError for a value out of range."""
        return replace(self.settings, box_threshold=self.box_threshold.value, text_threshold=self.text_threshold.value,
                       clipseg_threshold=self.clipseg_threshold.value, sam3_threshold=self.sam3_threshold.value)

    def wait_saved(self, timeout: float | None = None) -> None:
        """Block until the last run's files are written (they are saved after the result is shown)."""
        if self._saving is not None:
            self._saving.result(timeout)


def build_ui(models_loader: ModelsLoader | None = None, defaults: dict | None = None, out_dir: Path | None = None) -> SegmentationUI:
    """Create the widgets and wire the button (nothing is displayed). Arguments as for `launch_ui`."""
    unknown = set(defaults or {}) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"defaults has unknown keys {sorted(unknown)}; allowed: {list(DEFAULTS)}.")
    values = {**DEFAULTS, **(defaults or {})}
    if values["backend"] not in backends():
        raise ValueError(f"defaults['backend']={values['backend']!r} is not one of {list(backends())}.")
    if values["sam_size"] not in SAM_CHECKPOINTS:
        raise ValueError(f"defaults['sam_size']={values['sam_size']!r} is not one of {list(SAM_CHECKPOINTS)}.")
    settings = DetectionSettings(**{name: values[name] for name in SETTING_NAMES})  # checks every value
    ui = SegmentationUI(**make_controls(values, list(SAM_CHECKPOINTS), backend_labels()), container=None, settings=settings)
    ui.container = arrange(ui)
    _wire(ui, _KeepLastLoaded(models_loader or default_models_loader), out_dir)
    return ui


def _wire(ui: SegmentationUI, loader: _KeepLastLoaded, out_dir: Path | None) -> None:
    """The latest action picks the image: an upload wins until the path is edited or the upload cleared."""
    def on_upload(_change: Any = None) -> None:
        ui.clear_upload.disabled = not upload_entries(ui.upload.value)
        _redraw_upload_note(ui)
        _describe_source(ui)

    def on_path(_change: Any) -> None:
        if upload_entries(ui.upload.value):
            ui.upload.value = ()  # calls on_upload
        else:
            _redraw_upload_note(ui)
            _describe_source(ui)

    ui.upload.observe(on_upload, names="value")
    ui.path.observe(on_path, names="value")
    ui.backend.observe(lambda _change: _enable_for_backend(ui), names="value")
    _enable_for_backend(ui)
    ui.clear_upload.on_click(lambda _button: setattr(ui.upload, "value", ()))
    def on_prompt_message(_widget: Any, content: dict, _buffers: Any) -> None:
        if content.get("event") == "submit":  # Enter; Text.on_submit does this but is deprecated in ipywidgets 8
            request_run(ui, loader, out_dir)

    ui.button.on_click(lambda _button: request_run(ui, loader, out_dir))
    ui.prompt.on_msg(on_prompt_message)
    on_upload()


def _redraw_upload_note(ui: SegmentationUI) -> None:
    """Put the upload hint back. The browser-side guard writes a refusal into the note on the page only, so the
    kernel's value is still the hint: setting it again would send nothing, and the page would keep the refusal.
    Two changes make the browser redraw the note."""
    ui.upload_note.value = ""
    ui.upload_note.value = upload_hint()


def _enable_for_backend(ui: SegmentationUI) -> None:
    """Only the chosen backend's controls can be changed: SAM 3 reads none of GroundingDINO's, CLIPSeg's or SAM 2.1's
    settings, and GroundingDINO -> SAM 2.1 does not read SAM 3's threshold."""
    sam3 = chosen_backend(ui) == "sam3"
    for control in (ui.box_threshold, ui.text_threshold, ui.clipseg_threshold, ui.sam_size):
        control.disabled = sam3
    ui.sam3_threshold.disabled = not sam3


def _describe_source(ui: SegmentationUI) -> None:
    """Show which image the next run will use, with its size, so a stale upload or a typo is seen before running."""
    uploads = upload_entries(ui.upload.value)
    if uploads:
        text = f"Image: uploaded {html.escape(describe_upload(uploads[-1]))} (the path box is not used)"
    elif not ui.path.value.strip():
        text = "Image: none yet: upload one, or type its path and press Enter"
    else:
        try:
            path = check_image_path(ui.path.value)
            text = f"Image: {html.escape(describe_file(path))}<br><code>{html.escape(str(path))}</code>"
        except ValueError as problem:
            text = f"<span style='color:#c00'>{html.escape(str(problem))}</span>"
    ui.source.value = f"<div style='overflow-wrap:anywhere'>{text}</div>"


def launch_ui(
    models_loader: ModelsLoader | None = None, defaults: dict | None = None, out_dir: Path | None = None
) -> SegmentationUI | None:
    """Show the segmentation UI in the notebook.

    Args:
        models_loader: SAM checkpoint id -> SegmentationModels; default `nbhelpers.seg.models.load_models(sam=...)`.
            Loaded models are reused between clicks.
        defaults: initial widget values and the DetectionSettings passed to segment_image; keys of DEFAULTS.
        out_dir: if given, each result is also saved to out_dir/<image name>/ with `save_outputs`.
    Returns:
        The SegmentationUI, or None (after a one-line note) when no live Jupyter frontend is attached.
    """
    reason = noninteractive_reason()
    if reason is not None:
        print(f"[nbhelpers] The interactive UI needs a live Jupyter kernel; skipped ({reason}). Call segment_image() in code instead.")
        return None
    from IPython.display import Javascript, display

    ui = build_ui(models_loader, defaults, out_dir)
    display(ui.container)
    display(Javascript(upload_guard_script(UPLOAD_CLASS, NOTE_CLASS)))  # refuses oversize uploads in the browser
    return ui


# ----------------------------------------------------------------------------- click handling


def _sent_at() -> float | None:
    """When the browser sent the message being handled (its header date), or None outside a kernel."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    kernel = getattr(get_ipython(), "kernel", None)
    parent = kernel.get_parent() if hasattr(kernel, "get_parent") else getattr(kernel, "_parent_header", None)
    date = (parent or {}).get("header", {}).get("date")
    if isinstance(date, str):
        date = datetime.fromisoformat(date.replace("Z", "+00:00"))
    return date.timestamp() if isinstance(date, datetime) else None


def request_run(ui: SegmentationUI, models_loader: ModelsLoader, out_dir: Path | None) -> Segmentation | None:
    """A press of Segment (or Enter): run, unless the browser sent it within REPEAT_CLICK_S of the press that
    started the last run. The kernel handles presses one after another, so a double-click's second press only
    arrives once the first run is over; the browser's send times tell the two apart."""
    sent = _sent_at()
    # A send time equal to the last run's is that press's header seen again (the kernel's parent lookup can lag
    # behind in a widget callback), not a second press: only a later time within REPEAT_CLICK_S is a double-click.
    if sent is not None and ui.last_sent is not None and 0 < sent - ui.last_sent < REPEAT_CLICK_S:
        return None
    ui.last_sent, ui.runs = sent, ui.runs + 1
    return handle_click(ui, models_loader, out_dir)


def _read_image_input(ui: SegmentationUI) -> tuple[np.ndarray, str]:
    """The image the source line shows: the latest upload if there is one, else the typed path; plus its name."""
    uploads = upload_entries(ui.upload.value)
    if uploads:
        return decode_upload(uploads[-1]), upload_name(uploads[-1])
    path = check_image_path(ui.path.value)
    return read_image_file(path), path.name


def _figure_png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _show(output: Any, png: bytes | None = None, text: str = "", stream: str = "stdout") -> None:
    """Replace the Output widget's content (works from a callback and without a kernel)."""
    outputs: list[dict] = []
    if png is not None:
        data = {"image/png": base64.b64encode(png).decode("ascii"), "text/plain": "<segmentation figure>"}
        outputs.append({"output_type": "display_data", "data": data, "metadata": {}})
    if text:
        outputs.append({"output_type": "stream", "name": stream, "text": text + "\n"})
    output.outputs = tuple(outputs)


def _loading_in_output(ui: SegmentationUI, loader: ModelsLoader) -> ModelsLoader:
    """`loader`, with what it prints (download and loading progress bars) shown under the status line: a widget
    callback's prints would otherwise go to JupyterLab's log console only. The browser fills a capturing Output
    and syncs it back, so capture goes to `ui.progress`: into `ui.output`, set from here, a late sync could undo
    the result. An error is caught inside the capture and raised outside it: in a kernel, the capturing Output would
    show its traceback for good and swallow it (the run then went on with no models)."""
    def load(sam_checkpoint: str) -> Any:
        failure: Exception | None = None
        with ui.progress:
            try:
                return loader(sam_checkpoint)
            except Exception as error:  # raised below, after the capture, as the loader's own message
                failure = error
            finally:
                ui.progress.clear_output()
        raise failure

    return load


def backend_labels() -> dict[str, str]:
    """The backend dropdown: registry name -> label, every registered backend."""
    return {name: spec.label for name, spec in backends().items()}


def chosen_backend(ui: SegmentationUI) -> str:
    """The backend dropdown's value (GroundingDINO -> SAM 2.1 when the UI has no dropdown)."""
    return ui.backend.value if ui.backend is not None else DEFAULT_BACKEND


def handle_click(ui: SegmentationUI, models_loader: ModelsLoader, out_dir: Path | None) -> Segmentation | None:
    """What "Segment" does: run the pipeline, show the figure and a summary (or the error as one message), then
    save the files at full resolution in the background."""
    started = time.perf_counter()
    ui.button.disabled = True
    backend = chosen_backend(ui)
    checkpoint = SAM_CHECKPOINTS.get(ui.sam_size.value, "") if backend == DEFAULT_BACKEND else backend
    first = not (isinstance(models_loader, _KeepLastLoaded) and models_loader.has(checkpoint))
    _show(ui.output, text="Loading the models and segmenting... (first run with this SAM size; download progress "
          "shows here)" if first else "Segmenting...")
    try:
        image_rgb, name = _read_image_input(ui)
        settings = ui.current_settings()
        _, seg, models = _segment(image_rgb, ui.prompt.value, settings, ui.sam_size.value,
                                  _loading_in_output(ui, models_loader), chosen_backend(ui))
        shown_rgb, shown_seg = fit_for_display(image_rgb, seg, DISPLAY_MAX_SIDE)
        png = _figure_png(show_overlay(overlay(shown_rgb, shown_seg), shown_seg, title=f"{name} | prompt: {seg.prompt!r}"))
        summary = f"{name}: {summary_line(seg)}\n{_timing_line(seg, time.perf_counter() - started)}"
        _show(ui.output, png=png, text=summary + (f"\nsaving to {out_dir} ..." if out_dir is not None else ""))
        if out_dir is not None:
            _save_in_background(ui, png, summary, (image_rgb, seg, Path(out_dir), name, settings,
                                                   _describe(models, ui.sam_size.value)))
        return seg
    except Exception as error:  # shown to the user as one line; the UI stays usable
        _show(ui.output, text=f"Could not segment: {_user_message(error)}", stream="stderr")
        return None
    finally:
        ui.button.disabled = False


def _timing_line(seg: Segmentation, click_s: float) -> str:
    """The summary's time is the models' only; say so, next to what the whole click took."""
    timings = seg.timings or {}
    model_s = timings["total"] if "total" in timings else sum(timings.values())
    return (f"model time {model_s:.2f}s of {click_s:.2f}s for the whole click (the rest: reading the image, drawing, "
            "and loading the models on a first run)")


def _user_message(error: Exception) -> str:
    """Our own checks already speak to the user; anything else also names its type."""
    if isinstance(error, (ValueError, FileNotFoundError, PermissionError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _save_in_background(ui: SegmentationUI, png: bytes, summary: str, arguments: tuple) -> None:
    """Write the full-size files on one worker thread (PNG encoding of a big photo takes seconds and releases the
    GIL); the summary line then says where they went, unless a newer run has replaced the output."""
    ui._saver = ui._saver or ThreadPoolExecutor(max_workers=1, thread_name_prefix="nbhelpers-ui-save")
    run = ui.runs

    def save_and_report() -> None:
        line = _save(*arguments)
        if ui.runs == run:
            _show(ui.output, png=png, text=f"{summary}\n{line}")

    ui._saving = ui._saver.submit(save_and_report)


def _describe(models: Any, sam_size: str) -> dict[str, str]:
    """The models really used (SegmentationModels.describe); a custom loader's result may only say the size."""
    describe = getattr(models, "describe", None)
    return describe() if callable(describe) else {"sam_size": sam_size}


def _save(image_rgb: np.ndarray, seg: Segmentation, out_dir: Path, name: str, settings: DetectionSettings,
          models_info: dict) -> str:
    """save_outputs into out_dir/<image name>/; returns a line saying where, or why not."""
    folder = out_dir / (re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem) or "image")
    metadata = {"models": models_info, "thresholds": settings.as_dict(), "source_file": name}
    try:
        paths = save_outputs(image_rgb, seg, folder, metadata)
    except Exception as error:  # the result is still shown; only the files are missing
        return f"not saved: {type(error).__name__}: {error}"
    return f"saved {', '.join(path.name for path in paths.values())} to {folder}"
