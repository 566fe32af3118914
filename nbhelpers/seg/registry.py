"""The segmentation backends by name: the one table the CLI (`--backend`), the notebook (BACKEND), the UI's
dropdown and the backend comparison read.

A backend is a `BackendSpec`: its name and label, how to load its models from a SegmentConfig, the image backend
(nbhelpers.seg.backends.SegmentationBackend) and the video adapter (nbhelpers.seg.video.loop.VideoAdapter) built
from those models. Adding one is one `register_backend(BackendSpec(...))` call; nothing else changes:

    register_backend(BackendSpec(name="my-detector", label="My detector", load=load_mine, image_backend=MyBackend,
                                 video=MyVideoAdapter, owns=lambda models: isinstance(models, MyModels)))

(it lives here rather than in backends.py because it names the video adapters, which import backends.py). This
module imports only numpy-level modules: the CLI reads the names for `--help` without loading torch; the built-in
backends import their models when first used.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from nbhelpers.seg.types import DEFAULT_BACKEND, DetectionSettings, VideoSegmentation, VideoSettings

@dataclass(frozen=True)
class BackendSpec:
    """One model family, as the CLI, the notebook, the UI and the comparison see it."""

    name: str  # --backend / BACKEND / dropdown value, e.g. "gdino-sam2"
    label: str  # what people read (dropdown entries, comparison tables)
    load: Callable[[Any], Any]  # a SegmentConfig -> its loaded models (cached by the loaders; ModelLoadError if not)
    image_backend: Callable[[Any], Any]  # loaded models -> the image pipeline's SegmentationBackend (backends.py)
    video: Callable[[Any, list[str], DetectionSettings, VideoSettings], Any]  # (models, phrases, settings,
    #                                            video_settings) -> the video loop's VideoAdapter (video/loop.py)
    owns: Callable[[Any], bool]  # whether loaded models are this backend's (what `load` returns)
    model_names: Callable[[Any], list[str]] = lambda config: []  # the configured checkpoints, for "loading ..." lines


# ----------------------------------------------------------------------------- the built-in backends and the table


def _load_gdino_sam2(config: Any):
    from nbhelpers.seg import models

    for model, kind in ((config.dino_model, "grounding-dino"), (config.sam_model, "sam2"), (config.clipseg_model, "clipseg")):
        models.resolve_model_source(model, kind)  # a mistyped folder fails before the other models download
    return models.load_models(config.dino_model, config.sam_model, config.clipseg_model, device=config.device)


def _gdino_sam2_image(models: Any):
    from nbhelpers.seg.backends import GroundingDinoSam2Backend

    return GroundingDinoSam2Backend(models)


def _gdino_sam2_video(models: Any, phrases: list[str], settings: DetectionSettings, video_settings: VideoSettings):
    from nbhelpers.seg.video.segment import Sam2VideoAdapter

    return Sam2VideoAdapter(models, phrases, settings, video_settings)


def _is_gdino_sam2(models: Any) -> bool:
    from nbhelpers.seg.models import SegmentationModels

    return isinstance(models, SegmentationModels)


def _load_sam3(config: Any):
    from nbhelpers.seg.models import load_sam3_models

    return load_sam3_models(config.sam3_model, config.sam3_video_model, device=config.device)


def _sam3_image(models: Any):
    from nbhelpers.seg.backends import Sam3Backend

    return Sam3Backend(models)


def _sam3_video(models: Any, phrases: list[str], settings: DetectionSettings, video_settings: VideoSettings):
    from nbhelpers.seg.video.sam3_tracking import Sam3VideoAdapter

    return Sam3VideoAdapter(models, phrases, settings, video_settings)


def _is_sam3(models: Any) -> bool:
    from nbhelpers.seg.models import Sam3Models

    return isinstance(models, Sam3Models)


_REGISTRY: dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec(name=DEFAULT_BACKEND, label="GroundingDINO → SAM 2.1 (+ CLIPSeg fallback)", load=_load_gdino_sam2,
                image_backend=_gdino_sam2_image, video=_gdino_sam2_video, owns=_is_gdino_sam2,
                model_names=lambda config: [str(config.dino_model), str(config.sam_model), str(config.clipseg_model)]),
    BackendSpec(name="sam3", label="SAM 3", load=_load_sam3, image_backend=_sam3_image, video=_sam3_video,
                owns=_is_sam3, model_names=lambda config: [str(config.sam3_model)]),
)}


# ----------------------------------------------------------------------------- lookups


def register_backend(spec: BackendSpec) -> BackendSpec:
    """Add (or replace) a backend under `spec.name`; returns it."""
    _REGISTRY[spec.name] = spec
    return spec


def unregister_backend(name: str) -> None:
    """Remove a backend (e.g. a stand-in registered by a test)."""
    _REGISTRY.pop(name, None)


def backends() -> dict[str, BackendSpec]:
    """Every registered backend by name, the built-in ones first."""
    return dict(_REGISTRY)


def backend_names() -> list[str]:
    """The registered names: `--backend` choices and the notebook's BACKEND values."""
    return list(backends())


def backend_spec(name: str) -> BackendSpec:
    """The backend called `name`; ValueError naming the choices for another name."""
    found = backends().get(name)
    if found is None:
        raise ValueError(f"BACKEND={name!r}: use one of {backend_names()}.")
    return found


def spec_for(models: Any) -> BackendSpec:
    """The backend whose loader made `models`; TypeError for anything else."""
    for spec in backends().values():
        if spec.owns(models):
            return spec
    raise TypeError(f"{type(models).__name__} was not loaded by a registered backend ({backend_names()}).")


def segment_any_video(video: str | os.PathLike, prompt: str | Sequence[str], models: Any, out_dir: str | os.PathLike,
                      settings: DetectionSettings = DetectionSettings(), video_settings: VideoSettings = VideoSettings(),
                      save_id_maps: bool = False, save_masks: bool = False, offload_frames: bool = False,
                      offload_state: bool = False, progress: bool = True) -> VideoSegmentation:
    """The video loop (nbhelpers.seg.video.loop.segment_with) with the video adapter of the backend that loaded
    `models`. Options as for nbhelpers.seg.video.segment_video."""
    from nbhelpers.seg.video.loop import segment_with

    spec = spec_for(models)
    return segment_with(lambda phrases: spec.video(models, phrases, settings, video_settings), video, prompt, out_dir,
                        settings, video_settings, save_id_maps, save_masks, (offload_frames, offload_state),
                        video_settings.overlay_alpha, progress)
