"""A small ipywidgets front end: pick an image, type a prompt, tune thresholds, press "Segment".

When is the UI shown? Only with a live Jupyter frontend attached. `launch_ui` prints a one-line note and
returns None when:
  * the environment variable NBHELPERS_NONINTERACTIVE is 1/true/yes;
  * there is no IPython kernel (plain python, pytest, a terminal IPython);
  * the kernel's current request came with allow_stdin=False. papermill (2.x sets no environment variable
    of its own) and `jupyter nbconvert --execute` run cells through nbclient, which always sends
    allow_stdin=False; JupyterLab, Notebook, Colab and VS Code send True because they can answer input().
The models are loaded only when "Segment" is first clicked.
"""
from __future__ import annotations

import base64
import io
import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from nbhelpers.seg.export import save_outputs
from nbhelpers.seg.image import segment_image
from nbhelpers.seg.inputs import load_image
from nbhelpers.seg.models import DEFAULT_SAM3, load_models, load_sam3_models, release
from nbhelpers.seg.render import overlay, show_overlay, summary_line
from nbhelpers.seg.types import DetectionSettings, Segmentation

SAM_CHECKPOINTS = {
    "tiny": "facebook/sam2.1-hiera-tiny",
    "small": "facebook/sam2.1-hiera-small",
    "base-plus": "facebook/sam2.1-hiera-base-plus",
    "large": "facebook/sam2.1-hiera-large",
}
BACKENDS = {"gdino-sam2": "GroundingDINO → SAM 2.1", "sam3": "SAM 3"}  # dropdown value -> its label
SAM3_CHECKPOINT = DEFAULT_SAM3  # what the loader is asked for when the SAM 3 backend is chosen
SETTING_NAMES = tuple(setting.name for setting in fields(DetectionSettings))
# Sliders for the three thresholds; the other DetectionSettings (nms_iou, max_detections, multimask) have no widget
# and are passed through from the configuration to segment_image.
DEFAULTS: dict[str, Any] = {"image_path": "", "prompt": "", "sam_size": "tiny", "backend": "gdino-sam2",
                            **DetectionSettings().as_dict()}
NONINTERACTIVE_ENV = "NBHELPERS_NONINTERACTIVE"
ModelsLoader = Callable[[str], Any]  # SAM 2.1 checkpoint id -> SegmentationModels; SAM3_CHECKPOINT -> Sam3Models

# ----------------------------------------------------------------------------- environment


def noninteractive_reason() -> str | None:
    """Why no live widget UI is possible here (see the module docstring), or None when it is."""
    if os.environ.get(NONINTERACTIVE_ENV, "").strip().lower() in ("1", "true", "yes"):
        return f"{NONINTERACTIVE_ENV}={os.environ[NONINTERACTIVE_ENV]}"
    try:
        from IPython import get_ipython
    except ImportError:
        return "IPython is not installed"
    kernel = getattr(get_ipython(), "kernel", None)
    if kernel is None:
        return "not running inside a Jupyter kernel"
    if not getattr(kernel, "_allow_stdin", True):
        return "the notebook is being executed headless (papermill / nbconvert)"
    return None


# ----------------------------------------------------------------------------- pipeline (no widgets)


def run_once(image: Any, prompt: str, sam_size: str, models_loader: ModelsLoader,
             settings: DetectionSettings = DetectionSettings(), backend: str = "gdino-sam2"
             ) -> tuple[Segmentation, np.ndarray]:
    """One "Segment" click without a browser: load the image and models, segment, draw.

    Args:
        image: a path or an RGB array (anything `load_image` accepts).
        prompt: what to segment, e.g. "cat. dog.".
        sam_size: one of SAM_CHECKPOINTS ("tiny", "small", "base-plus", "large").
        models_loader: SAM checkpoint id -> SegmentationModels.
        settings: passed to `segment_image`.
        backend: one of BACKENDS; "sam3" asks the loader for SAM3_CHECKPOINT (sam_size is then unused).
    Returns:
        (Segmentation, overlay as (H, W, 3) uint8 RGB).
    """
    return _segment(image, prompt, settings, sam_size, models_loader, backend)[:2]


def _segment(image: Any, prompt: str, settings: DetectionSettings, sam_size: str,
             models_loader: ModelsLoader, backend: str = "gdino-sam2") -> tuple[Segmentation, np.ndarray, Any]:
    """run_once's work; also returns the models used, so the saved metadata can name them."""
    if not prompt or not prompt.strip():  # bad input is rejected before anything heavy starts
        raise ValueError("The prompt is empty: type what to segment, e.g. 'cat. dog.'.")
    if sam_size not in SAM_CHECKPOINTS:
        raise ValueError(f"SAM size {sam_size!r} is not one of {list(SAM_CHECKPOINTS)}.")
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {list(BACKENDS)}.")
    image_rgb = load_image(image)
    models = models_loader(SAM3_CHECKPOINT if backend == "sam3" else SAM_CHECKPOINTS[sam_size])
    seg = segment_image(image_rgb, prompt.strip(), models, settings=settings)
    return seg, overlay(image_rgb, seg), models


def default_models_loader(sam_checkpoint: str) -> Any:
    """Load GroundingDINO + the chosen SAM 2.1 + CLIPSeg with nbhelpers.seg.models defaults (SAM 3 for
    SAM3_CHECKPOINT)."""
    return load_sam3_models(sam_checkpoint) if sam_checkpoint == SAM3_CHECKPOINT else load_models(sam=sam_checkpoint)


def _keep_last_loaded(loader: ModelsLoader) -> ModelsLoader:
    """Reuse the loaded models between clicks; hold one set only. Switching SAM size also drops every SAM from
    nbhelpers.seg.models' cache (GroundingDINO and CLIPSeg stay), so the old SAM's memory is freed once no one
    else holds it, before the next one takes GPU memory."""
    cache: dict[str, Any] = {}

    def load(sam_checkpoint: str) -> Any:
        if sam_checkpoint not in cache:
            if cache:
                cache.clear()
                release("sam2")
                release("sam3")
            cache[sam_checkpoint] = loader(sam_checkpoint)
        return cache[sam_checkpoint]

    return load


# ----------------------------------------------------------------------------- widgets


@dataclass
class SegmentationUI:
    """The widgets of one UI; `container` is what gets displayed."""

    upload: Any
    path: Any
    prompt: Any
    box_threshold: Any
    text_threshold: Any
    clipseg_threshold: Any
    sam_size: Any
    button: Any
    output: Any
    container: Any
    settings: DetectionSettings = DetectionSettings()  # the settings without a widget come from here
    backend: Any = None  # Dropdown of BACKENDS (None: GroundingDINO -> SAM 2.1)

    def current_settings(self) -> DetectionSettings:
        """`settings` with the sliders' thresholds; raises ValueError for a value out of range."""
        return replace(self.settings, box_threshold=self.box_threshold.value, text_threshold=self.text_threshold.value,
                       clipseg_threshold=self.clipseg_threshold.value)

    def __repr__(self) -> str:
        return f"SegmentationUI(prompt={self.prompt.value!r}, sam_size={self.sam_size.value!r})"


def _slider(widgets: Any, description: str, value: float) -> Any:
    return widgets.FloatSlider(
        value=value, min=0.0, max=1.0, step=0.01, description=description, readout_format=".2f",
        continuous_update=False, style={"description_width": "initial"},
    )


def build_ui(models_loader: ModelsLoader | None = None, defaults: dict | None = None, out_dir: Path | None = None) -> SegmentationUI:
    """Create the widgets and wire the button (nothing is displayed). Arguments as for `launch_ui`."""
    import ipywidgets as widgets

    unknown = set(defaults or {}) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"defaults has unknown keys {sorted(unknown)}; allowed: {list(DEFAULTS)}.")
    values = {**DEFAULTS, **(defaults or {})}
    if values["backend"] not in BACKENDS:
        raise ValueError(f"defaults['backend']={values['backend']!r} is not one of {list(BACKENDS)}.")
    if values["sam_size"] not in SAM_CHECKPOINTS:
        raise ValueError(f"defaults['sam_size']={values['sam_size']!r} is not one of {list(SAM_CHECKPOINTS)}.")
    settings = DetectionSettings(**{name: values[name] for name in SETTING_NAMES})  # checks every value
    wide = {"description_width": "initial"}
    ui = SegmentationUI(
        upload=widgets.FileUpload(accept="image/*", multiple=False, description="Upload image"),
        path=widgets.Text(value=str(values["image_path"]), description="or image path", placeholder="/path/to/image.jpg", style=wide),
        prompt=widgets.Text(value=values["prompt"], description="Prompt", placeholder="cat. dog.", style=wide),
        box_threshold=_slider(widgets, "box threshold", settings.box_threshold),
        text_threshold=_slider(widgets, "text threshold", settings.text_threshold),
        clipseg_threshold=_slider(widgets, "CLIPSeg threshold", settings.clipseg_threshold),
        sam_size=widgets.Dropdown(options=list(SAM_CHECKPOINTS), value=values["sam_size"], description="SAM 2.1 size", style=wide),
        button=widgets.Button(description="Segment", button_style="primary", icon="search"),
        output=widgets.Output(), container=None, settings=settings,
        backend=widgets.Dropdown(options=[(label, key) for key, label in BACKENDS.items()], value=values["backend"],
                                 description="backend", style=wide),
    )
    ui.container = widgets.VBox([
        widgets.HBox([ui.upload, ui.path]), ui.prompt,
        widgets.HBox([ui.box_threshold, ui.text_threshold, ui.clipseg_threshold]),
        widgets.HBox([ui.backend, ui.sam_size, ui.button]), ui.output,
    ])
    loader = _keep_last_loaded(models_loader or default_models_loader)
    ui.button.on_click(lambda _button: handle_click(ui, loader, out_dir))
    return ui


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
    from IPython.display import display

    ui = build_ui(models_loader, defaults, out_dir)
    display(ui.container)
    return ui


# ----------------------------------------------------------------------------- click handling


def _read_image_input(ui: SegmentationUI) -> tuple[Any, str]:
    """The uploaded image as RGB (through `load_image`: EXIF, alpha on white, 16-bit) if any, else the typed
    path; plus a name for it."""
    value = ui.upload.value
    uploads = list(value.values()) if isinstance(value, dict) else list(value)  # ipywidgets 7: dict, 8: tuple
    if uploads:
        upload = uploads[-1]
        name = upload.get("name") or upload.get("metadata", {}).get("name", "upload")
        try:
            with Image.open(io.BytesIO(bytes(upload["content"]))) as picture:
                picture.load()  # decode now, so a truncated upload fails here with its name
                return load_image(picture), name
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"{name} is not an image Pillow can read ({error}); upload a complete JPEG, PNG "
                             f"or WebP.") from error
    typed = ui.path.value.strip()
    if not typed:
        raise ValueError("No image: upload one or type its path.")
    return str(Path(typed).expanduser()), Path(typed).name


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


def handle_click(ui: SegmentationUI, models_loader: ModelsLoader, out_dir: Path | None) -> Segmentation | None:
    """What "Segment" does: run the pipeline and show the figure and a summary, or the error as one message."""
    ui.button.disabled = True
    _show(ui.output, text="Segmenting... (the first click also loads the models)")
    try:
        image, name = _read_image_input(ui)
        image_rgb = load_image(image)  # once here, so the saved overlay uses the very same pixels
        settings = ui.current_settings()
        backend = ui.backend.value if ui.backend is not None else "gdino-sam2"
        seg, overlay_rgb, models = _segment(image_rgb, ui.prompt.value, settings, ui.sam_size.value, models_loader,
                                            backend)
        summary = summary_line(seg)
        if out_dir is not None:
            summary += "\n" + _save(image_rgb, seg, Path(out_dir), name, settings, _describe(models, ui.sam_size.value))
        _show(ui.output, png=_figure_png(show_overlay(overlay_rgb, seg)), text=summary)
        return seg
    except Exception as error:  # shown to the user as one line; the UI stays usable
        _show(ui.output, text=f"Could not segment: {type(error).__name__}: {error}", stream="stderr")
        return None
    finally:
        ui.button.disabled = False


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
