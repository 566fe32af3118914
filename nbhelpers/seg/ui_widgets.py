"""The segmentation UI's widgets and their layout: what each control says to the user, and rows that wrap.

No behaviour here: `nbhelpers.seg.ui` wires the controls. Every control has a tooltip in a user's words; the
rows wrap on a narrow notebook instead of squeezing the sliders or scrolling sideways.
"""
from __future__ import annotations

from typing import Any

import ipywidgets as widgets

from nbhelpers.seg.ui_inputs import UPLOAD_LIMIT_BYTES, megabytes

# CSS classes the browser-side upload guard (ui_inputs.upload_guard_script) and the browser test look for.
UI_CLASS, UPLOAD_CLASS, NOTE_CLASS, RESULT_CLASS = "nbh-seg-ui", "nbh-upload", "nbh-upload-note", "nbh-result"


def _slider(description: str, value: float, tooltip: str) -> widgets.FloatSlider:
    # [0, 1]: the range DetectionSettings accepts for every threshold; the value comes from its defaults or config.
    return widgets.FloatSlider(
        value=value, min=0.0, max=1.0, step=0.01, description=description, readout_format=".2f",
        continuous_update=False, tooltip=tooltip, style={"description_width": "120px"},
        layout=widgets.Layout(flex="1 1 260px", min_width="240px", max_width="420px"),
    )


def _row(children: list) -> widgets.HBox:
    """A row that wraps onto more lines when the notebook is narrow (instead of squeezing or scrolling)."""
    return widgets.HBox(children, layout=widgets.Layout(flex_flow="row wrap", align_items="center"))


def _label(text: str, control: Any) -> widgets.Label:
    """A caption in front of `control`. Text and Dropdown drop their tooltip when given a description
    (ipywidgets 8), so they get none and this label carries the caption and the same tooltip."""
    return widgets.Label(text, tooltip=control.tooltip, layout=widgets.Layout(width="auto", margin="0 4px 0 8px"))


def make_controls(values: dict[str, Any], sam_sizes: list[str], backends: dict[str, str]) -> dict[str, Any]:
    """The UI's widgets by field name of SegmentationUI, set to `values` (keys of ui.DEFAULTS).

    Args:
        backends: dropdown value -> label, e.g. {"gdino-sam2": "GroundingDINO → SAM 2.1", "sam3": "SAM 3"}.
    """
    upload = widgets.FileUpload(accept="image/*", multiple=False, description="Upload image", layout=widgets.Layout(
        width="auto", min_width="150px"), tooltip=f"Choose an image on this computer (up to "
        f"{megabytes(UPLOAD_LIMIT_BYTES)}); it replaces the path below")
    upload.add_class(UPLOAD_CLASS)
    upload_note = widgets.HTML(tooltip="Jupyter drops bigger uploads; typed paths have no limit")
    upload_note.add_class(NOTE_CLASS)
    return dict(
        upload=upload, upload_note=upload_note,
        clear_upload=widgets.Button(description="Clear upload", icon="times", disabled=True, layout=widgets.Layout(
            width="auto"), tooltip="Forget the uploaded image and use the path instead"),
        # Sent to the kernel on Enter or when the box loses focus, not per keystroke: a half-typed path is not an error.
        path=widgets.Text(value=str(values["image_path"]), placeholder="/path/to/image.jpg", continuous_update=False,
                          layout=widgets.Layout(flex="1 1 300px", min_width="220px"), tooltip="Path of an image file "
                          "on the machine running the notebook, then Enter; quotes and file:// are fine. It replaces "
                          "an upload"),
        source=widgets.HTML(tooltip="The image the next Segment will use"),
        prompt=widgets.Text(value=values["prompt"], placeholder="cat. dog.", layout=widgets.Layout(
            flex="1 1 300px", min_width="220px"), tooltip="What to find, phrases separated by dots, e.g. "
            "'a cat. a remote'. Enter runs Segment"),
        box_threshold=_slider("box threshold", values["box_threshold"], "Minimum detection score for a box: higher "
                              "finds fewer, surer objects"),
        text_threshold=_slider("text threshold", values["text_threshold"], "Minimum score for matching a box to a "
                               "phrase of the prompt"),
        clipseg_threshold=_slider("CLIPSeg threshold", values["clipseg_threshold"], "Used only when no box is found: "
                                  "how sure the coarse fallback must be; lower finds more"),
        sam3_threshold=_slider("SAM 3 threshold", values["sam3_threshold"], "SAM 3 only (SAM3_THRESHOLD): minimum "
                               "score of an object; lower finds more, higher fewer and surer objects"),
        sam_size=widgets.Dropdown(options=sam_sizes, value=values["sam_size"], layout=widgets.Layout(
            width="auto", min_width="110px"), tooltip="Mask model size: larger gives sharper edges but is slower and "
            "downloads more the first time"),
        backend=widgets.Dropdown(options=[(label, key) for key, label in backends.items()], value=values["backend"],
                                 layout=widgets.Layout(width="auto", min_width="150px"), tooltip="Which models segment: "
                                 "GroundingDINO boxes refined by SAM 2.1, or SAM 3 alone (text to masks in one model)"),
        button=widgets.Button(description="Segment", button_style="primary", icon="search",
                              tooltip="Find the prompt's objects in the image (Enter in the prompt does the same)"),
        output=_result_output(),
        progress=widgets.Output(),  # captures model loading and download progress, emptied once loaded
    )


def _result_output() -> widgets.Output:
    output = widgets.Output()
    output.add_class(RESULT_CLASS)
    return output


def arrange(ui: Any) -> widgets.VBox:
    """The displayed layout of a SegmentationUI's controls."""
    container = widgets.VBox([
        _row([ui.upload, ui.clear_upload, _label("or image path", ui.path), ui.path]),
        ui.source, ui.upload_note, _row([_label("Prompt", ui.prompt), ui.prompt]),
        _row([ui.box_threshold, ui.text_threshold, ui.clipseg_threshold, ui.sam3_threshold]),
        _row([_label("Models", ui.backend), ui.backend, _label("SAM 2.1 size", ui.sam_size), ui.sam_size, ui.button]),
        ui.output, ui.progress,
    ], layout=widgets.Layout(width="100%"))
    container.add_class(UI_CLASS)
    return container


def upload_hint() -> str:
    """The note under the upload button while nothing was refused."""
    return (f"<small>Uploads up to {megabytes(UPLOAD_LIMIT_BYTES)}; for a bigger file type its path (on Kaggle or "
            "Colab, copy it to the notebook's disk first).</small>")
