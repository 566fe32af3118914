"""Video outputs besides the MP4: tracks.json (per object: label, frames, boxes, optional RLE masks) and
per-frame object-id PNGs. Both appear only complete: the id-map folder is filled under a temporary name and
swapped in at the end; tracks.json is written atomically. A run removes the folder's completion record before it
replaces any output (`begin_video_outputs`) and writes it again after tracks.json (`finish_video_outputs`), so an overlay and tracks.json
from different runs (a run killed between the two) never count as a finished pair.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from nbhelpers.platform import atomic_write
from nbhelpers.seg.export import remove_completion_record, remove_dead_temp_files, write_completion_record
from nbhelpers.seg.types import Track

TRACKS_FILE = "tracks.json"
OVERLAY_FILE = "video_overlay.mp4"
ID_MAPS_DIR = "id_maps"
VIDEO_OUTPUTS = (OVERLAY_FILE, TRACKS_FILE)  # a finished video folder's files (id maps are optional)


def write_tracks(path: str | os.PathLike, tracks: list[Track], metadata: dict[str, Any]) -> Path:
    """Write tracks.json atomically: the metadata keys, then "objects" (one entry per Track)."""
    data = dict(metadata) | {"objects": [track.to_json() for track in tracks]}
    payload = json.dumps(data, indent=1).encode()
    return atomic_write(path, lambda file: file.write(payload))


def begin_video_outputs(out_dir: str | os.PathLike) -> None:
    """Before a video run replaces any output in `out_dir`: mark the folder unfinished and delete the temp files
    that killed runs left there."""
    remove_completion_record(out_dir)
    remove_dead_temp_files(out_dir)


def finish_video_outputs(out_dir: str | os.PathLike, tracks: list[Track], metadata: dict[str, Any]) -> Path:
    """Write tracks.json, then the completion record of it and the overlay: the last writes of a video run.

    Returns:
        The tracks.json path.
    """
    path = write_tracks(Path(out_dir) / TRACKS_FILE, tracks, metadata)
    write_completion_record(out_dir, VIDEO_OUTPUTS)
    return path


def load_tracks(path: str | os.PathLike) -> dict[str, Any]:
    """Read tracks.json; raises ValueError naming the file when it is not valid JSON with "objects"."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {path}: {error}") from error
    if not isinstance(data, dict) or not isinstance(data.get("objects"), list):
        raise ValueError(f"{path} is not a tracks file (no 'objects' list).")
    return data


class IdMapWriter:
    """Per-frame uint16 PNGs (0 = background, else the object id) into OUT/id_maps/, swapped in when complete."""

    def __init__(self, out_dir: Path):
        self.final = out_dir / ID_MAPS_DIR
        self.partial = out_dir / f".{ID_MAPS_DIR}.partial"
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)

    def write(self, frame: int, object_ids: list[int], masks: np.ndarray, size: tuple[int, int]) -> None:
        id_map = np.zeros(size, np.uint16)
        for object_id, mask in zip(object_ids, masks):
            id_map[mask] = object_id
        if not cv2.imwrite(str(self.partial / f"{frame:06d}.png"), id_map):
            raise OSError(f"cannot write id map for frame {frame} under {self.partial}")

    def close(self) -> Path:
        old = self.final.with_name(f".{ID_MAPS_DIR}.old")
        shutil.rmtree(old, ignore_errors=True)
        if self.final.exists():
            os.replace(self.final, old)
        os.replace(self.partial, self.final)
        shutil.rmtree(old, ignore_errors=True)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)
