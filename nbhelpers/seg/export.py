"""Save a Segmentation as mask.png, instances.png, overlay.png and detections.json, all or nothing, then the
completion record .complete.json (each file's name and size), written last: a folder counts as finished only when
its record says so and every file still has its recorded size (`outputs_complete`), never because files exist.

detections.json (masks as COCO run-length encoding, decodable with pycocotools or `decode_rle`):
    {"image": {"height", "width", "source_file"?}, "prompt", "source",
     "detections": [{"label", "score", "box_xyxy", "mask_score" (null when unknown), "area",
                     "mask_rle": {"size": [H, W], "counts": str}}],
     "models": {...}, "thresholds": {...}, "timings": {...}, "message"}
"""
from __future__ import annotations

import json
import math
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from nbhelpers.seg.render import instance_map, overlay, union_mask
from nbhelpers.seg.types import Segmentation


OUTPUT_FILES = {"mask": "mask.png", "instances": "instances.png", "overlay": "overlay.png", "detections": "detections.json"}
METADATA_KEYS = ("models", "thresholds", "source_file")
COMPLETE_FILE = ".complete.json"  # the completion record: {"files": {name: size in bytes}}
_TEMP_OF_PROCESS = re.compile(r"\.(\d+)\.[0-9a-f]{8}\.tmp$")  # `_write_temp`'s names: .NAME.<pid>.<hex>.tmp

# ----------------------------------------------------------------------------- RLE


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """(N, H, W) bool masks -> N COCO RLE dicts with str counts (JSON-ready)."""
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (N, H, W), got {masks.shape}.")
    if len(masks) == 0:
        return []
    # pycocotools wants (H, W, N) uint8 in Fortran (column-major) order.
    encoded = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")} for rle in encoded]


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """COCO RLE dict (compressed str/bytes counts, or an uncompressed list of counts) -> (H, W) bool mask."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"an RLE must be a dict with 'size' and 'counts', got {type(rle).__name__}.")
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):
        compressed = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    else:
        compressed = {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(compressed).astype(bool)


# ----------------------------------------------------------------------------- JSON document


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _to_json_value(value: Any) -> Any:
    """numpy scalars/arrays and Paths -> plain JSON types; NaN/inf -> None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(key): _to_json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_to_json_value(item) for item in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return _finite_or_none(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, str):
        return value
    return str(value)  # e.g. a torch.device or dtype in the models metadata


def build_detections(seg: Segmentation, metadata: dict[str, Any]) -> dict[str, Any]:
    """The detections.json document for `seg` (see the module docstring); `metadata` gives models/thresholds/source_file."""
    unknown = set(metadata) - set(METADATA_KEYS)
    if unknown:
        raise ValueError(f"metadata has unknown keys {sorted(unknown)}; allowed: {list(METADATA_KEYS)}.")
    height, width = (int(v) for v in seg.image_size)
    image_info: dict[str, Any] = {"height": height, "width": width}
    if metadata.get("source_file") is not None:
        image_info["source_file"] = os.fspath(metadata["source_file"])
    detections = []
    for index, rle in enumerate(encode_masks(np.asarray(seg.masks, bool))):
        detections.append({
            "label": str(seg.labels[index]),
            "score": round(float(seg.scores[index]), 6),
            "box_xyxy": [round(float(v), 2) for v in seg.boxes[index]],
            "mask_score": _finite_or_none(round(float(seg.mask_scores[index]), 6)),
            "area": int(np.count_nonzero(seg.masks[index])),
            "mask_rle": rle,
        })
    return {
        "image": image_info, "prompt": seg.prompt, "source": seg.source, "detections": detections,
        "models": _to_json_value(metadata.get("models", {})), "thresholds": _to_json_value(metadata.get("thresholds", {})),
        "timings": _to_json_value(dict(seg.timings)), "message": seg.message,
    }


def load_detections(path: str | os.PathLike) -> dict[str, Any]:
    """Read a detections.json file (e.g. one a user passes back in).

    Raises:
        ValueError naming the file when it is not JSON or has no "detections" list (a light check; the full
        schema check is nbhelpers.testing.validate_detections).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-run save_outputs to rewrite it.") from error
    if not isinstance(data, dict) or not isinstance(data.get("detections"), list):
        raise ValueError(f"{path} is not a detections file (no 'detections' list).")
    return data


# ----------------------------------------------------------------------------- writing


def _encode_png(image: np.ndarray, what: str) -> bytes:
    ok, buffer = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode {what} as PNG.")
    return buffer.tobytes()


def _render_files(image_rgb: np.ndarray, seg: Segmentation, metadata: dict[str, Any]) -> dict[str, bytes]:
    """Every output file's bytes, computed in memory before anything touches the disk."""
    document = build_detections(seg, metadata)
    return {
        "mask": _encode_png(union_mask(seg), "the union mask"),
        "instances": _encode_png(instance_map(seg), "the instance map"),  # uint16 -> 16-bit PNG
        "overlay": _encode_png(cv2.cvtColor(overlay(image_rgb, seg), cv2.COLOR_RGB2BGR), "the overlay"),
        "detections": (json.dumps(document, indent=2, allow_nan=False) + "\n").encode("utf-8"),
    }


def _write_temp(out_dir: Path, name: str, data: bytes) -> Path:
    # Not nbhelpers.platform.atomic_write: it renames each file as soon as it is written, while a set of four
    # must be complete on disk before the first rename (all or nothing). The temp file is synced like there.
    # A unique hidden name in the target folder, so os.replace stays a same-filesystem rename.
    temp_path = out_dir / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(temp_path, "xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    return temp_path


def save_outputs(image_rgb: np.ndarray, seg: Segmentation, out_dir: str | os.PathLike, metadata: dict[str, Any]) -> dict[str, Path]:
    """Write mask.png, instances.png, overlay.png and detections.json into `out_dir`, all or nothing.

    Args:
        image_rgb: (H, W, 3) uint8 RGB image `seg` was computed on.
        seg: the Segmentation to save.
        out_dir: output folder (created if needed).
        metadata: {"models": {...}, "thresholds": {...}, "source_file": str | None}; each key optional.
    Returns:
        {"mask", "instances", "overlay", "detections"} -> written paths.
    Raises:
        PermissionError naming the fix when `out_dir` cannot be written. On any failure the files of a
        previous run stay as they were and no partial new set is left behind.
    """
    from nbhelpers.platform import ensure_writable_dir  # platform imports torch; rendering needs none

    contents = _render_files(image_rgb, seg, metadata)
    out_dir = ensure_writable_dir(out_dir)
    remove_dead_temp_files(out_dir)
    temporaries: dict[str, Path] = {}
    try:
        for key, data in contents.items():
            temporaries[key] = _write_temp(out_dir, OUTPUT_FILES[key], data)
        remove_completion_record(out_dir)  # from here until the new record, the folder is not complete
        # Only renames inside one folder remain, after every byte is on disk.
        for key, temp_path in temporaries.items():
            os.replace(temp_path, out_dir / OUTPUT_FILES[key])
    finally:
        for temp_path in temporaries.values():
            temp_path.unlink(missing_ok=True)
    write_completion_record(out_dir, OUTPUT_FILES.values())
    return {key: out_dir / name for key, name in OUTPUT_FILES.items()}


UNTOUCHED_FOR_S = 600.0  # seconds after which a temp file whose writer is unknown counts as left by a killed run


def remove_dead_temp_files(folder: str | os.PathLike, started: float | None = None) -> list[Path]:
    """Delete the temp files killed runs left in `folder` (call at the start of a run writing there).

    Removed: `_write_temp`'s `.NAME.<pid>.<hex>.tmp` files whose process is gone, and other hidden temp files
    (`nbhelpers.platform.atomic_write`'s `.NAME.*.tmp`, the video writer's `.NAME.partial.mp4`, this process's own)
    last written before `started`. A live process's files are kept: another run may be writing here.
    Args:
        started: when the run began (time.time()); None = UNTOUCHED_FOR_S ago (a file without a process id in its
            name and untouched that long has no live writer: writers touch theirs every frame or within a second).
    Returns:
        The removed paths.
    """
    folder, started = Path(folder), time.time() - UNTOUCHED_FOR_S if started is None else started
    removed = []
    for temp in [*folder.glob(".*.tmp"), *folder.glob(".*.partial.*")] if folder.is_dir() else []:
        try:
            if temp.is_file() and _is_stale(temp, started):
                temp.unlink()
                removed.append(temp)
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            continue
    return removed


def _is_stale(temp: Path, started: float) -> bool:
    from nbhelpers.platform import process_is_alive

    match = _TEMP_OF_PROCESS.search(temp.name)
    pid = int(match.group(1)) if match else None
    if pid is not None and pid != os.getpid():
        return not process_is_alive(pid)
    return temp.stat().st_mtime < started


# ----------------------------------------------------------------------------- completion records


def remove_completion_record(folder: str | os.PathLike) -> None:
    """Mark `folder`'s outputs as unfinished (call before replacing any of them)."""
    (Path(folder) / COMPLETE_FILE).unlink(missing_ok=True)


def write_completion_record(folder: str | os.PathLike, names: Iterable[str]) -> Path:
    """Record the finished outputs `names` of `folder` (name and size each), atomically; call after the last one.

    Returns:
        The record's path.
    """
    from nbhelpers.platform import atomic_write  # platform imports torch; rendering needs none

    folder = Path(folder)
    payload = json.dumps({"files": {name: (folder / name).stat().st_size for name in names}}, indent=1).encode()
    return atomic_write(folder / COMPLETE_FILE, lambda file: file.write(payload))


def outputs_complete(folder: str | os.PathLike, names: Iterable[str]) -> bool:
    """Whether `folder` holds the finished outputs `names`: its completion record lists each one and each file
    still has the recorded size (a truncated, emptied or half-replaced output, or one without a record, is not)."""
    folder = Path(folder)
    try:
        recorded = json.loads((folder / COMPLETE_FILE).read_text(encoding="utf-8"))["files"]
        return all((folder / name).is_file() and (folder / name).stat().st_size == int(recorded[name]) for name in names)
    except (OSError, ValueError, KeyError, TypeError):  # no record, an unreadable one, or a name it lacks
        return False
