"""Which object is which in a video: detections matched to tracks, lost tracks revived, old ones forgotten,
duplicates merged. numpy only; the frame loop (segment.py) asks it what to prompt and drop, and tells it the masks.

The rules (thresholds in VideoSettings):
- A detection is an object already followed when its box overlaps a visible object's latest mask by
  `match_iou` or more (IoU of the mask with the filled box; an object with no mask yet counts as its box, which
  makes this box IoU).
- Else a lost object of the same label that could have got there comes back under its own id (within
  `revive_distance` box diagonals of where it was last seen, plus as many per second it has been lost):
  SAM 2 is prompted again with the detection's box for that id. An object SAM 2 re-acquires by itself simply
  keeps its id.
- Else it is a new object, if the session has room (`max_objects` at once); room is made by dropping the objects
  lost longest. New ids count up and are never reused.
- An object lost for longer than `forget_after_s` leaves SAM 2's session (it costs nothing from then on);
  tracks.json keeps it, ended.
- Two visible objects whose masks overlap by `merge_iou` for `merge_frames` frames in a row are one object: the
  younger id is merged into the older and leaves the session; both records say so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from nbhelpers.seg.types import FrameDetections, FrameMasks, Track, VideoSettings


@dataclass
class Prompts:
    """What the tracker must do before tracking a frame."""

    drop: list[int]  # ids to remove from the session first
    ids: list[int]  # ids to prompt (new ones, and lost ones revived)
    boxes: np.ndarray  # (len(ids), 4) float32 xyxy px, one box per id


def mask_box_iou(masks: list[np.ndarray], boxes: np.ndarray) -> np.ndarray:
    """IoU of each box (filled) with each mask.

    Args:
        masks: (H, W) bool each. boxes: (D, 4) xyxy px.
    Returns:
        (D, len(masks)) float.
    """
    iou = np.zeros((len(boxes), len(masks)))
    areas = [int(mask.sum()) for mask in masks]
    for row, box in enumerate(np.asarray(boxes, np.float64)):
        x0, y0 = np.floor(box[:2]).astype(int).clip(0)
        x1, y1 = np.ceil(box[2:]).astype(int)
        box_area = max(x1 - x0, 0) * max(y1 - y0, 0)
        for column, (mask, area) in enumerate(zip(masks, areas)):
            inside = int(mask[y0:y1, x0:x1].sum())
            union = area + box_area - inside
            iou[row, column] = inside / union if union else 0.0
    return iou


def _box_mask(box: list[int], size: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(size, bool)
    mask[box[1]:box[3], box[0]:box[2]] = True
    return mask


def _centre_distance(box: np.ndarray, reference: list[int]) -> float:
    """Distance (px) between the boxes' centres."""
    offset = (np.asarray(box[:2], np.float64) + box[2:]) / 2 - (np.asarray(reference[:2], np.float64) + reference[2:]) / 2
    return float(np.hypot(*offset))


class Identities:
    """The tracks of one video and which of them are in SAM 2's session.

    Args:
        settings: the thresholds (see the module docstring). output_fps: processed frames per second of video.
        size: (H, W) of the frames. encode_mask: (H, W) bool -> RLE stored per frame in tracks.json; None = boxes only.
    """

    def __init__(self, settings: VideoSettings, output_fps: float, size: tuple[int, int],
                 encode_mask: Callable[[np.ndarray], dict] | None = None):
        self.settings, self.size, self.encode_mask = settings, size, encode_mask
        self.fps = output_fps
        self.horizon = settings.forget_after_frames(output_fps)  # frames
        self.tracks: dict[int, Track] = {}
        self.active: list[int] = []  # ids in the session, in the order they were added
        self.masks: dict[int, np.ndarray] = {}  # latest non-empty mask of each active object
        self.streaks: dict[tuple[int, int], int] = {}  # (older, younger) -> frames in a row overlapping
        self.skipped_for_cap = 0

    def assign(self, frame: int, found: FrameDetections) -> Prompts:
        """Sort this frame's detections into known, revived and new objects (see the module docstring)."""
        visible = [i for i in self.active if self.tracks[i].state == "visible"]
        references = [self.masks.get(i, _box_mask(self.tracks[i].last_box() or [0, 0, 0, 0], self.size)) for i in visible]
        overlap = mask_box_iou(references, found.boxes)
        revived: dict[int, int] = {}  # id -> detection index
        fresh: list[int] = []
        for index in np.argsort(-np.asarray(found.scores), kind="stable"):
            if visible and overlap[index].max() >= self.settings.match_iou:
                continue  # an object already followed
            lost = self._nearest_lost(found.boxes[index], found.labels[index], revived, frame)
            if lost is not None:
                revived[lost] = int(index)
            else:
                fresh.append(int(index))
        drop = self._make_room(frame, len(fresh), keep=revived)
        room = self.settings.max_objects - len(self.active)
        self.skipped_for_cap += max(len(fresh) - room, 0)
        new_ids = self._add(frame, found, fresh[:max(room, 0)])
        for object_id in revived:
            self.tracks[object_id].revived_frames.append(frame)
        indices = list(revived.values()) + fresh[:len(new_ids)]
        return Prompts(drop, list(revived) + new_ids, np.asarray(found.boxes, np.float32)[indices].reshape(-1, 4))

    def _nearest_lost(self, box: np.ndarray, label: str, exclude: dict[int, int], frame: int) -> int | None:
        """The lost object of this label that the detection is nearest to, relative to how far it can be."""
        reachable = []
        for object_id in self.active:
            track = self.tracks[object_id]
            if object_id in exclude or track.state != "lost" or track.label != label or not track.frames:
                continue
            reach = self._reach(track, frame)
            if reach > 0 and (distance := _centre_distance(box, track.last_box()) / reach) <= 1.0:
                reachable.append((distance, object_id))
        return min(reachable)[1] if reachable else None

    def _reach(self, track: Track, frame: int) -> float:
        """How far (px) from where it was last seen a lost object may come back: `revive_distance` of its box
        diagonals, plus as many per second it has been lost. The largest of its last boxes: the very last one is
        often a sliver at an edge."""
        diagonal = max(float(np.hypot(b[2] - b[0], b[3] - b[1])) for b in (f["box_xyxy"] for f in track.frames[-8:]))
        return self.settings.revive_distance * max(diagonal, 1.0) * (1 + track.frames_lost(frame) / self.fps)

    def _make_room(self, frame: int, wanted: int, keep: dict[int, int]) -> list[int]:
        """Drop the objects lost longest until `wanted` new ones fit (visible and revived objects stay)."""
        short = wanted - (self.settings.max_objects - len(self.active))
        lost = sorted((i for i in self.active if self.tracks[i].state == "lost" and i not in keep),
                      key=lambda i: -self.tracks[i].frames_lost(frame))
        return [self._end(object_id, frame, "forgotten") for object_id in lost[:max(short, 0)]]

    def _add(self, frame: int, found: FrameDetections, indices: list[int]) -> list[int]:
        next_id = max(self.tracks, default=0) + 1
        ids = list(range(next_id, next_id + len(indices)))  # ids count up, never reused
        for object_id, index in zip(ids, indices):
            self.tracks[object_id] = Track(object_id, found.labels[index], float(found.scores[index]), found.source, frame)
            self.active.append(object_id)
        return ids

    def _end(self, object_id: int, frame: int, reason: str, merged_into: int | None = None) -> int:
        self.tracks[object_id].end(frame, reason, merged_into)
        self.active.remove(object_id)
        self.masks.pop(object_id, None)
        return object_id

    def record(self, frame: int, result: FrameMasks) -> list[int]:
        """Note this frame's masks; returns the ids to drop from the session (forgotten or merged)."""
        masks = dict(zip(result.object_ids, result.masks))
        for object_id in self.active:
            mask = masks.get(object_id)
            self.tracks[object_id].record(frame, mask, self.encode_mask)
            if mask is not None and mask.any():
                self.masks[object_id] = mask
        merged = self._merge_duplicates(frame)
        forgotten = [self._end(i, frame, "forgotten") for i in list(self.active)
                     if self.tracks[i].state == "lost" and self.tracks[i].frames_lost(frame) >= self.horizon]
        return merged + forgotten

    def _merge_duplicates(self, frame: int) -> list[int]:
        """Count frames in a row each pair of visible objects overlaps; merge pairs that reach merge_frames."""
        needed = self.settings.merge_frames
        if not needed:
            return []
        visible = sorted((i for i in self.active if self.tracks[i].last_frame == frame),
                         key=lambda i: (self.tracks[i].first_frame, i))  # oldest first
        streaks: dict[tuple[int, int], int] = {}
        for position, older in enumerate(visible):
            for younger in visible[position + 1:]:
                if _mask_iou(self.masks[older], self.masks[younger]) >= self.settings.merge_iou:
                    streaks[older, younger] = self.streaks.get((older, younger), 0) + 1
        self.streaks = streaks
        merged: list[int] = []
        for (older, younger), count in streaks.items():
            if count >= needed and older not in merged and younger not in merged:
                self.tracks[older].merged_ids.append(younger)
                merged.append(self._end(younger, frame, "merged", merged_into=older))
        return merged


def _mask_iou(first: np.ndarray, second: np.ndarray) -> float:
    rows = np.flatnonzero(first.any(axis=1) & second.any(axis=1))  # rows both touch: the only place they can meet
    if not len(rows):
        return 0.0
    inter = int((first[rows[0]:rows[-1] + 1] & second[rows[0]:rows[-1] + 1]).sum())
    return inter / (int(first.sum()) + int(second.sum()) - inter)
