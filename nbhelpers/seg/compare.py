"""The same image and clip through both backends (GroundingDINO -> SAM 2.1, and SAM 3), side by side.

Used by the Q2 notebook's comparison section (BACKEND = "both"); outputs go to OUT_DIR/compare/<backend>/.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from html import escape

import numpy as np

from nbhelpers.seg.export import save_outputs
from nbhelpers.seg.image import segment_image
from nbhelpers.seg.inputs import load_image
from nbhelpers.seg.pipeline import SegmentConfig, load_configured_models
from nbhelpers.seg.registry import backend_spec, backends, segment_any_video
from nbhelpers.seg.stages import first_image
from nbhelpers.seg.types import Segmentation, VideoSegmentation

# transformers' SAM 3 video model logs "hitting self.max_num_objects=… with new_det_num=…" as a WARNING on every frame
# where it detects more objects than it may track: in a notebook, a red block of identical lines.


@dataclass
class BackendRun:
    """What one backend did with the comparison's image and clip."""

    backend: str  # its registry name (nbhelpers.seg.registry)
    models: dict[str, str]  # model ids (describe())
    parameters: int  # parameters of the models used for images (SAM 3: its image model)
    image: Segmentation
    image_rgb: np.ndarray = field(repr=False)
    image_seconds: float
    video: VideoSegmentation | None  # None: no clip compared


def _parameters(models) -> int:
    """Parameters of the loaded models held (LoadedModel fields: SAM 3's video model is loaded on first use, not here)."""
    loaded = [value for value in vars(models).values() if hasattr(value, "model") and hasattr(value.model, "parameters")]
    return sum(parameter.numel() for item in loaded for parameter in item.model.parameters())


def run_backend(config: SegmentConfig, backend: str, image_rgb: np.ndarray, video: bool = True) -> BackendRun:
    """Segment the image (and the configured clip) with one backend; files under OUT_DIR/compare/<backend>/."""
    models = load_configured_models(config, backend)
    out = config.output_dir() / "compare" / backend
    start = time.perf_counter()
    segmentation = segment_image(image_rgb, config.prompt, models, config.detection)
    seconds = time.perf_counter() - start
    save_outputs(image_rgb, segmentation, out / "image", {"models": {"backend": backend} | models.describe(),
                                                          "thresholds": config.detection.as_dict()})
    clip = None
    if video:
        clip = segment_any_video(config.video_source(), config.video_prompt or config.prompt, models,
                                 out / "video", settings=config.detection, video_settings=config.video_settings,
                                 progress=False)
    return BackendRun(backend, models.describe(), _parameters(models), segmentation, image_rgb, seconds, clip)


def compare_backends(config: SegmentConfig, video: bool = True) -> list[BackendRun] | None:
    """Both backends on the configured image (the first of a folder) and clip, when config.backend == "both".

    Returns:
        One BackendRun per backend, or None (with a note) for another BACKEND.
    """
    if config.backend != "both":
        print(f'BACKEND={config.backend!r}: set BACKEND = "both" to run the comparison.')
        return None
    image_rgb = load_image(first_image(config))
    runs = []
    for backend in backends():
        runs.append(run_backend(replace(config, backend=backend), backend, image_rgb, video))
    return runs


def comparison_table(runs: list[BackendRun]) -> str:
    """HTML table: models, parameters, what each found on the image and the clip, and how fast."""
    def found(labels: list[str]) -> str:
        return ", ".join(f"{labels.count(label)}× {label}" for label in dict.fromkeys(labels)) or "nothing"

    rows = []
    for run in runs:
        clip = run.video
        tracks = found([track.label for track in clip.tracks]) if clip else "–"
        speed = f"{clip.frames_per_second:.2f} frames/s" if clip else "–"
        models = "<br>".join(escape(f"{key}: {value}") for key, value in run.models.items() if key.endswith("model"))
        rows.append(f"<tr><td>{escape(backend_spec(run.backend).label)}</td><td>{models}</td>"
                    f"<td>{run.parameters / 1e6:.1f} M</td><td>{escape(found(run.image.labels))} ({run.image.source})</td>"
                    f"<td>{run.image_seconds:.2f} s</td><td>{escape(tracks)}</td><td>{speed}</td></tr>")
    header = ("<tr><th>backend</th><th>models</th><th>parameters</th><th>image: found</th><th>image time</th>"
              "<th>video: tracks</th><th>video speed</th></tr>")
    return f"<table>{header}{''.join(rows)}</table>"


def show_comparison(runs: list[BackendRun] | None) -> None:
    """The two image overlays side by side, then the table (nothing for None)."""
    if not runs:
        return
    import matplotlib.pyplot as plt
    from IPython.display import HTML, display

    from nbhelpers.seg.render import show

    figure, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.5))
    for ax, run in zip(np.atleast_1d(axes), runs):
        show(run.image_rgb, run.image, title=f"prompt: {run.image.prompt!r}", ax=ax)
        ax.set_title(f"{backend_spec(run.backend).label}\n{len(run.image)} instance(s) | {run.image.source}", fontsize=10)
    display(figure)
    plt.close(figure)
    display(HTML(comparison_table(runs)))
