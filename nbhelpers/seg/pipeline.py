"""One configured run: load the models once, segment an image or a folder, save each result.

Shared by the Q2 notebook and `python -m nbhelpers.seg`, so both write the same files.
"""
from __future__ import annotations

import sys
from dataclasses import MISSING, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from nbhelpers.platform import ensure_writable_dir, resolve_paths
from nbhelpers.seg.export import save_outputs
from nbhelpers.seg.image import iter_segmentations
from nbhelpers.seg.inputs import IMAGE_EXTENSIONS, find_unreadable_images, list_image_files, load_image
from nbhelpers.seg.models import SHORT_NAMES, Sam3Models, SegmentationModels, load_models
from nbhelpers.seg.registry import backend_names, backend_spec, segment_any_video
from nbhelpers.seg.render import show_overlay, track_table
from nbhelpers.seg.types import (DEFAULT_BACKEND, DEFAULT_BATCH_SIZE, DEFAULT_CLIPSEG, DEFAULT_DINO, DEFAULT_SAM,
                                 DEFAULT_SAM3, DetectionSettings, Segmentation, VideoSegmentation, VideoSettings)
from nbhelpers.seg.video.io import VIDEO_EXTENSIONS, list_video_files

COMPARE = "both"  # BACKEND value: the default backend, plus `compare_backends` running every registered one

SAMPLE_IMAGE = Path(__file__).resolve().parents[2] / "assets" / "sample.jpg"
SAMPLE_CLIP = Path(__file__).resolve().parents[2] / "assets" / "sample_clip.mp4"


@dataclass
class SegmentConfig:
    images: str | None = None  # an image file or a folder of images; None = the sample image in assets/
    prompt: str = "car. sun."  # objects to find: "a cat. a remote", "cat, dog" or a list of phrases
    out_dir: str | None = None  # None = platform default (/kaggle/working/outputs/q2_seg, …, ./outputs/q2_seg)
    backend: str = DEFAULT_BACKEND  # a registered backend (nbhelpers.seg.registry.backend_names()) or "both" (compare)
    dino_model: str = DEFAULT_DINO  # GroundingDINO hub id, 'tiny' / 'base', or a local folder
    sam_model: str = DEFAULT_SAM  # SAM 2.1 hub id, 'tiny' / 'small' / 'base-plus' / 'large', or a local folder
    clipseg_model: str = DEFAULT_CLIPSEG  # CLIPSeg hub id or a local folder
    sam3_model: str = DEFAULT_SAM3  # SAM 3 hub id (gated: accept its licence, set HF_TOKEN) or a local folder
    sam3_video_model: str | None = None  # SAM 3 video checkpoint (hub id or folder); None = sam3_model
    detection: DetectionSettings = field(default_factory=DetectionSettings)  # thresholds, NMS, box cap, multimask
    batch_size: int = DEFAULT_BATCH_SIZE  # images per forward pass
    device: str | None = None  # None = auto (cuda > mps > cpu)
    # video (segment_video)
    video: str | None = None  # a video file; None = the sample clip in assets/
    video_prompt: str | None = None  # None = `prompt`
    # stride, re-detection, objects at once, ids (SAM 3: only stride, frame cap and objects at once apply)
    video_settings: VideoSettings = field(default_factory=VideoSettings)
    save_id_maps: bool = False  # also write a uint16 object-id PNG per frame
    save_masks: bool = False  # RLE masks per frame in tracks.json (bigger file)
    offload_video: bool = False  # keep frames and SAM 2 state on the CPU (less GPU memory, slower)

    def __post_init__(self) -> None:
        """A field given as None takes its default (the notebook passes None for every parameter it leaves alone)."""
        for spec in fields(self):
            if getattr(self, spec.name) is None:
                default = spec.default_factory() if spec.default_factory is not MISSING else spec.default
                object.__setattr__(self, spec.name, default)
        if self.backend not in backend_choices():
            raise ValueError(f"BACKEND={self.backend!r}: use one of {backend_choices()}.")

    def image_source(self) -> Path:
        return Path(self.images).expanduser() if self.images else SAMPLE_IMAGE

    def output_dir(self) -> Path:
        return resolve_paths("q2_seg", None, self.out_dir).out_dir

    def video_source(self) -> Path:
        return Path(self.video).expanduser() if self.video else SAMPLE_CLIP


@dataclass
class SavedResult:
    """One image's result and where its files went (the image itself is not kept: folders can be large)."""

    name: str  # source file name
    segmentation: Segmentation
    folder: Path
    files: dict[str, Path] = field(default_factory=dict)  # mask, instances, overlay, detections


def output_folder(out: Path, name: str, used: set[str]) -> Path:
    """OUT/<stem>; a second image with the same stem (a.jpg, a.png) gets OUT/<stem>_<ext>."""
    stem = Path(name).stem or "image"
    folder = stem if stem not in used else f"{stem}_{Path(name).suffix.lstrip('.') or len(used)}"
    while folder in used:
        folder += "_"
    used.add(folder)
    return out / folder


def check_images(config: SegmentConfig) -> None:
    """Raise before any model is loaded when IMAGE_PATH is missing, empty or holds unreadable images (all named).
    A folder holding videos and no image passes: `run` segments its videos."""
    source = config.image_source()
    if source.is_dir() and not list_image_files(source) and list_video_files(source):
        return
    unreadable = find_unreadable_images(source)
    if unreadable:
        raise ValueError(f"IMAGE_PATH: {len(unreadable)} unreadable image(s), no model loaded yet: "
                         + "; ".join(str(error) for _, error in unreadable))


def backend_choices() -> list[str]:
    """BACKEND's values: every registered backend, then "both"."""
    return backend_names() + [COMPARE]


def load_configured_models(config: SegmentConfig, backend: str | None = None):
    """Check the configured images, then load (once per process) the models of `backend` (None: the configured
    one; "both" loads the default's) through its registry entry (nbhelpers.seg.registry)."""
    backend = config.backend if backend is None else backend
    spec = backend_spec(DEFAULT_BACKEND if backend == COMPARE else backend)
    check_images(config)
    return spec.load(config)


def plan_outputs(files: list[Path], out_dir: Path) -> list[tuple[Path, Path]]:
    """(input file, output folder) for every input, named over the whole list so that every process agrees."""
    used: set[str] = set()
    return [(file, output_folder(out_dir, file.name, used)) for file in files]


def run(config: SegmentConfig, models: SegmentationModels | None = None,
        on_unreadable: Callable[[str, Exception], None] | None = None, verbose: bool = True,
        planned: list[tuple[Path, Path]] | None = None) -> list[SavedResult]:
    """Segment every configured image and write OUT_DIR/<image>/{mask,instances,overlay}.png + detections.json.

    Args:
        config: what to segment and how.
        models: already loaded models (None = load those the config names).
        on_unreadable: called for a missing or corrupt file, which is skipped; None = raise.
        planned: (image file, output folder) pairs to do instead of every configured image (a process's share).
    Returns:
        One SavedResult per image, in input order.
    """
    source = config.image_source()
    out_dir = ensure_writable_dir(config.output_dir(), "OUT_DIR")
    models = models or load_configured_models(config)
    if planned is None:
        files = list_image_files(source) if source.is_dir() else [source]
        videos = list_video_files(source) if source.is_dir() else []
        if not files and not videos:
            raise ValueError(f"no images or videos in folder {str(source)!r} (looked for "
                             f"{', '.join(dict.fromkeys(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS))}).")
        planned = plan_outputs(files + videos, out_dir)  # named together, as a folder run names them
        run_folder_videos(config, models, [item for item in planned if item[0] in videos], verbose)
        planned = [item for item in planned if item[0] not in videos]
    folder_of = {file.name: folder for file, folder in planned}
    results = []
    for name, image, segmentation in iter_segmentations([file for file, _ in planned], config.prompt, models, config.detection,
                                                        batch_size=config.batch_size, on_unreadable=on_unreadable):
        folder = folder_of[name]
        metadata = {"models": {"backend": config.backend} | models.describe(), "thresholds": config.detection.as_dict(),
                    "source_file": str(source / name if source.is_dir() else source)}
        files = save_outputs(image, segmentation, folder, metadata)
        if verbose:
            note = "" if len(segmentation) else f" -- {segmentation.message}"
            tqdm.write(f"{name}: {segmentation.summary()} -> {folder}{note}", file=sys.stdout)  # above the progress bar
        results.append(SavedResult(name, segmentation, folder, files))
    return results


def run_folder_videos(config: SegmentConfig, models, planned: list[tuple[Path, Path]], verbose: bool = True
                      ) -> list[VideoSegmentation]:
    """The videos of an IMAGE_PATH folder, each into its output folder (video_overlay.mp4, tracks.json), with the
    configured video settings; `run_video` is for the one configured VIDEO_PATH."""
    return [segment_folder_video(video, folder, config, models, video_options(config), verbose) for video, folder in planned]


def segment_folder_video(video: Path, folder: Path, config: SegmentConfig, models, options: dict, verbose: bool = True
                         ) -> VideoSegmentation:
    """One video of a folder into its output folder with the video prompt, through the models' backend.

    Args:
        options: keyword arguments of `segment_any_video` (see `video_options`); `settings` is always config.detection.
    """
    result = segment_any_video(video, config.video_prompt or config.prompt, models, folder, **(options | {"settings": config.detection}))
    if verbose:
        print(f"{video.name}: {result.summary()} -> {folder}", flush=True)
    return result


def video_options(config: SegmentConfig) -> dict:
    """Keyword arguments of `segment_any_video` from the configuration."""
    return dict(settings=config.detection, video_settings=config.video_settings, save_id_maps=config.save_id_maps,
                save_masks=config.save_masks, offload_frames=config.offload_video, offload_state=config.offload_video)


def show_results(results: list[SavedResult], max_images: int = 4) -> None:
    """Display the saved overlays inline (first `max_images`), each with its detections listed."""
    import matplotlib.pyplot as plt
    from IPython.display import display

    for result in results[:max_images]:
        figure = show_overlay(load_image(result.files["overlay"]), result.segmentation, title=result.name)
        display(figure)
        plt.close(figure)
    if len(results) > max_images:
        print(f"{len(results) - max_images} more results in {results[0].folder.parent}")


# ----------------------------------------------------------------------------- video


def run_video(config: SegmentConfig, models: SegmentationModels | Sam3Models | None = None, verbose: bool = True
              ) -> VideoSegmentation:
    """Segment the configured video into OUT_DIR/video/<video stem>/ (video_overlay.mp4, tracks.json[, id_maps/]).

    Returns:
        VideoSegmentation.
    """
    source = config.video_source()
    models = models or load_configured_models(config)
    result = segment_any_video(source, config.video_prompt or config.prompt, models,
                               config.output_dir() / "video" / (source.stem or "video"), **video_options(config))
    if verbose:
        print(result.summary(), "->", result.files["overlay"].parent, flush=True)
    return result


def show_video(result: VideoSegmentation, max_embed_mb: float = 25.0) -> None:
    """Play the overlay inline (embedded when small enough) and list the tracked objects (`render.track_table`:
    what found each, its frames with a mask, revivals and how it ended)."""
    from IPython.display import HTML, Video, display

    path = result.files["overlay"]
    size_mb = path.stat().st_size / 2**20
    if result.codec != "h264":
        print(f"{path.name} is {result.codec}: browsers may not play it inline; download it or install imageio-ffmpeg.")
    if size_mb <= max_embed_mb:
        display(Video(str(path), embed=True, mimetype="video/mp4", html_attributes="controls loop muted"))
    else:
        print(f"{path} is {size_mb:.0f} MB: too large to embed; download it from the output folder.")
    display(HTML(track_table(result)))


# ----------------------------------------------------------------------------- interactive UI


def _configured_sam_size(config: SegmentConfig) -> str:
    """The UI dropdown entry standing for the configured SAM model (a hub id, short name or folder name)."""
    name, checkpoints = str(config.sam_model).rstrip("/").lower(), SHORT_NAMES["sam2"]
    for size in sorted(checkpoints, key=len, reverse=True):  # 'base-plus' before shorter names
        if name == size or name.endswith(f"hiera-{size}") or name == checkpoints[size]:
            return size
    return "tiny"


def _load_for_ui(config: SegmentConfig, sam_checkpoint: str) -> SegmentationModels | Sam3Models:
    if sam_checkpoint in backend_names():  # another backend than the default: its configured models (maybe folders)
        return load_configured_models(config, sam_checkpoint)
    # The configured SAM (maybe a local folder on offline Kaggle) stands for its own dropdown entry.
    sam = config.sam_model if sam_checkpoint == SHORT_NAMES["sam2"][_configured_sam_size(config)] else sam_checkpoint
    return load_models(config.dino_model, sam, config.clipseg_model, device=config.device)


def launch_ui(config: SegmentConfig):
    """Widgets (upload, prompt, thresholds, SAM size, run button) preset from `config`; None when headless."""
    from nbhelpers.seg import ui  # ipywidgets: loaded only when a UI is asked for (the CLI never loads it)

    defaults = {"image_path": str(config.image_source()), "prompt": config.prompt,
                "sam_size": _configured_sam_size(config),
                "backend": DEFAULT_BACKEND if config.backend == COMPARE else config.backend} | config.detection.as_dict()
    return ui.launch_ui(partial(_load_for_ui, config), defaults, config.output_dir() / "ui")
