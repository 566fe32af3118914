"""Text-prompted segmentation (the Q2 notebook): GroundingDINO boxes -> SAM 2.1 masks, with a CLIPSeg fallback, or
SAM 3, on images, folders and videos.

    types       results, DetectionSettings and VideoSettings (numpy only; the one copy of every default)
    registry    the backends by name (BackendSpec, register_backend): what the CLI, notebook, UI and comparison offer
    inputs      image loading and prompt handling
    models      loading the models (from_pretrained, cached); inference: running them
    backends    SegmentationBackend and its GroundingDINO -> SAM 2.1 and SAM 3 implementations
    image       segment_image / segment_images / iter_segmentations
    video/      the video loop every backend shares, its adapters, tracking, video I/O and tracks.json export
    render      overlays and label maps; export: mask.png, instances.png, overlay.png, detections.json
    pipeline    the configured run shared by the notebook and the CLI; ui: the ipywidgets front end
    __main__    python -m nbhelpers.seg

The names below are the public surface (`from nbhelpers.seg import SegmentConfig, run, run_video`); they are
imported on first use, so `import nbhelpers.seg` loads neither torch nor ipywidgets. `decode_rle`,
`load_detections` and `load_tracks` read the files a run writes back (documented API for users' own analysis).
"""
from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "SegmentConfig": "pipeline", "run": "pipeline", "run_video": "pipeline", "show_results": "pipeline",
    "show_video": "pipeline", "load_configured_models": "pipeline", "launch_ui": "pipeline",
    "DetectionSettings": "types", "VideoSettings": "types", "Segmentation": "types", "VideoSegmentation": "types",
    "BackendSpec": "registry", "register_backend": "registry", "backend_names": "registry",
    "segment_any_video": "registry", "segment_image": "image", "segment_images": "image", "load_models": "models",
    "load_sam3_models": "models", "decode_rle": "export", "load_detections": "export",
    "load_tracks": "video.export", "compare_backends": "compare", "show_comparison": "compare",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    """Import a public name's module when the name is first used (PEP 562)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'nbhelpers.seg' has no attribute {name!r}")
    return getattr(importlib.import_module(f"nbhelpers.seg.{_PUBLIC[name]}"), name)
