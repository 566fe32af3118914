"""Which object is which in a video: detections matched to tracks, lost tracks revived, old ones forgotten,
duplicates merged. numpy and scipy; the frame loop (segment.py) asks it what to prompt and drop, and tells it the
masks.

Each object keeps what it looks like and where it is heading:
- Appearance: a descriptor (a unit vector; for SAM 2, its image embedding averaged under the object's mask,
  `StreamingTracker.appearance`), a running average over the frames it is seen whole. A detection's descriptor
  is averaged over the middle of its box. Cosine similarity compares them.
- Motion: a constant-velocity Kalman filter on its box centre (nbhelpers.seg.video.motion), corrected on the
  frames it is seen whole (not cut by the frame's edge, not much smaller than lately), predicted while it is not.
  "Seen whole" keeps an object sliding behind another or out of the picture from dragging its velocity down.

The rules (thresholds in VideoSettings and below):
- A detection is a visible object already followed when its box overlaps the object's latest mask, moved on by
  the object's velocity, by `match_iou` or more (IoU of the mask with the filled box; an object with no mask yet
  counts as its box), the labels are the same and the two do not look different (similarity below
  `APPEARANCE_DIFFERENT`). One detection per object, the best overlaps first (Hungarian assignment).
- A second detection of a followed object is ignored: same label with box IoU `DUPLICATE_BOX_IOU` or more or
  mostly covered by the object's mask (a part of it), or another label with nearly the same box
  (`RELABELLED_BOX_IOU`). A detection of another label, or a bigger one that merely encloses a tracked
  object, is not a duplicate: it becomes a new object.
- Else a lost object of the same label comes back under its own id when the detection is where it could have got
  (within `revive_distance` box diagonals, plus as many per second it has been lost, of the way from where it was
  last seen to where its velocity takes it), or looks like it (`APPEARANCE_SAME` or more) wherever it appears,
  and does not look different. Among several candidates the cheapest is taken (appearance distance plus distance
  from the predicted position; Hungarian assignment). SAM 2 is prompted again with the detection's box for that
  id. A visible object whose own detection was not matched by overlap is matched the same way (a fast object
  the velocity did not quite predict), without prompting. `revive_distance` 0 never revives.
- Else it is a new object, if the session has room (`max_objects` at once); room is made by dropping the objects
  lost longest. New ids count up and are never reused.
- An object lost for longer than `forget_after_s` leaves SAM 2's session (it costs nothing from then on);
  tracks.json keeps it, ended.
- Two visible objects whose masks overlap by `merge_iou` for `merge_frames` frames in a row are one object: the
  younger id is merged into the older and leaves the session; both records say so.

Without descriptors (a tracker that has no `appearance`), matching uses place and motion only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from nbhelpers.seg.types import FrameDetections, FrameMasks, Track, VideoSettings
from nbhelpers.seg.video.association import (FORBIDDEN, assign, box_coverage, box_iou, centre, distance_to_segment,
                                             mask_box_iou, middle_masks)
from nbhelpers.seg.video.motion import ConstantVelocity

__all__ = ["Describe", "Identities", "Prompts", "mask_box_iou"]

# (N, H, W) bool regions of the current frame -> (N, C) unit descriptors, or None when it has none.
Describe = Callable[[np.ndarray], np.ndarray | None]

APPEARANCE_SAME = 0.9  # cosine similarity from which a detection is a lost object wherever it appears
APPEARANCE_DIFFERENT = 0.5  # below this a detection is never that object, however close
APPEARANCE_MOMENTUM = 0.9  # weight of the old descriptor in the running average (BoT-SORT uses 0.9)
DUPLICATE_BOX_IOU = 0.5  # box IoU from which a same-label detection is a second box on a followed object ...
PART_COVERAGE = 0.7  # ... or this much of its box is the object's mask (a part of it)
RELABELLED_BOX_IOU = 0.7  # box IoU from which a detection of another label is a followed object relabelled
WHOLE = 0.85  # a mask whose area, width and height are this fraction of their recent largest shows all of it
MIDDLE = 0.5  # a detection's descriptor is averaged over this middle fraction of its box's sides ...
MIN_REGION = 0.3  # ... less followed objects' pixels, if that leaves this fraction of the middle's area
_RECENT = 8  # frames of mask areas (and boxes) that count as "recent"


@dataclass
class Prompts:
    """What the tracker must do before tracking a frame."""

    drop: list[int]  # ids to remove from the session first
    ids: list[int]  # ids to prompt (new ones, and lost ones revived)
    boxes: np.ndarray  # (len(ids), 4) float32 xyxy px, one box per id


def _box_mask(box: list[int], size: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(size, bool)
    mask[box[1]:box[3], box[0]:box[2]] = True
    return mask


def _similarity(first: np.ndarray | None, second: np.ndarray | None) -> float | None:
    return None if first is None or second is None else float(first @ second)


def _looks_different(similarity: float | None) -> bool:
    return similarity is not None and similarity < APPEARANCE_DIFFERENT


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
        self.motion: dict[int, ConstantVelocity] = {}  # each active object's centre and velocity
        self.looks: dict[int, np.ndarray] = {}  # each active object's appearance descriptor (once seen whole)
        self.areas: dict[int, list[np.ndarray]] = {}  # each active object's recent (mask area, box width, height)
        self.streaks: dict[tuple[int, int], int] = {}  # (older, younger) -> frames in a row overlapping
        self.skipped_for_cap = 0

    def assign(self, frame: int, found: FrameDetections, describe: Describe | None = None) -> Prompts:
        """Sort this frame's detections into known, revived and new objects (see the module docstring).

        Args:
            describe: descriptors of regions of this frame (the tracker's `appearance`); None = place and motion only.
        """
        boxes = np.asarray(found.boxes, np.float64).reshape(-1, 4)
        order = [int(i) for i in np.argsort(-np.asarray(found.scores), kind="stable")]
        visible = [i for i in self.active if self.tracks[i].state == "visible"]
        followed = self._match_visible(frame, boxes, found.labels, visible)
        rest = [d for d in order if d not in followed and not self._duplicate(frame, d, boxes, found.labels, visible)]
        unmatched = [i for i in visible if i not in followed.values()]
        lost = [i for i in self.active if self.tracks[i].state == "lost" and self.tracks[i].frames
                and self.settings.revive_distance > 0]
        candidates = lost + unmatched
        looks = self._describe_boxes(boxes[rest], visible, describe) if rest and candidates else None
        matched = self._associate(frame, rest, boxes, found.labels, looks, candidates)
        revived = {object_id: d for d, object_id in matched.items() if object_id in lost}
        fresh = [d for d in rest if d not in matched]
        drop = self._make_room(frame, len(fresh), keep=revived)
        room = self.settings.max_objects - len(self.active)
        self.skipped_for_cap += max(len(fresh) - room, 0)
        new_ids = self._add(frame, found, fresh[:max(room, 0)])
        for object_id, index in revived.items():
            self.tracks[object_id].revived_frames.append(frame)
            self._place(object_id, frame, boxes[index])
        indices = list(revived.values()) + fresh[:len(new_ids)]
        return Prompts(drop, list(revived) + new_ids, boxes.astype(np.float32)[indices].reshape(-1, 4))

    def _describe_boxes(self, boxes: np.ndarray, visible: list[int], describe: Describe | None) -> np.ndarray | None:
        """Descriptors of detections: averaged over the middle of each box, less the visible objects' pixels (a box
        that encloses a followed object is described by what is around it), or over the whole box less those
        pixels, or over the middle, whichever first keeps `MIN_REGION` of its area."""
        if describe is None:
            return None
        followed = np.zeros(self.size, bool)
        for object_id in visible:
            followed |= self._reference(object_id)
        middle, whole = middle_masks(boxes, self.size, MIDDLE), middle_masks(boxes, self.size, 1.0)
        regions = middle.copy()
        for row in range(len(boxes)):
            for candidate in (middle[row] & ~followed, whole[row] & ~followed):
                if candidate.sum() >= MIN_REGION * middle[row].sum():
                    regions[row] = candidate
                    break
        return describe(regions)

    def _offset(self, object_id: int, frame: int) -> np.ndarray:
        """How far (px) the object is expected to have moved since it was last seen."""
        track, motion = self.tracks[object_id], self.motion[object_id]
        last = track.last_frame if track.last_frame is not None else frame
        return motion.velocity * (frame - last)

    def _reference(self, object_id: int) -> np.ndarray:
        return self.masks.get(object_id, _box_mask(self.tracks[object_id].last_box() or [0, 0, 0, 0], self.size))

    def _match_visible(self, frame: int, boxes: np.ndarray, labels: list[str], visible: list[int]) -> dict[int, int]:
        """Detection index -> the visible object it is (overlap with its mask moved on by its velocity)."""
        cost = np.full((len(boxes), len(visible)), FORBIDDEN)
        for column, object_id in enumerate(visible):
            shifted = boxes - np.tile(self._offset(object_id, frame), 2)  # moving the box back = the mask on
            overlap = mask_box_iou([self._reference(object_id)], shifted)[:, 0]
            for row in np.flatnonzero(overlap >= max(self.settings.match_iou, 1e-9)):
                if labels[row] == self.tracks[object_id].label:
                    cost[row, column] = 1.0 - overlap[row]
        return {row: visible[column] for row, column in assign(cost)}

    def _duplicate(self, frame: int, index: int, boxes: np.ndarray, labels: list[str], visible: list[int]) -> bool:
        """Whether a detection not matched to a visible object is a second box on one (see the module docstring)."""
        for object_id in visible:
            track = self.tracks[object_id]
            shifted = boxes[index] - np.tile(self._offset(object_id, frame), 2)
            overlap = box_iou(shifted, np.asarray(track.last_box() or [0, 0, 0, 0], np.float64))
            if labels[index] != track.label:
                if overlap >= RELABELLED_BOX_IOU:
                    return True
            elif overlap >= DUPLICATE_BOX_IOU or box_coverage(self._reference(object_id), shifted) >= PART_COVERAGE:
                return True
        return False

    def _associate(self, frame: int, rows: list[int], boxes: np.ndarray, labels: list[str], looks: np.ndarray | None,
                   candidates: list[int]) -> dict[int, int]:
        """Detection index -> the lost or unmatched visible object it is, by appearance and motion (cheapest first)."""
        cost = np.full((len(rows), len(candidates)), FORBIDDEN)
        for i, row in enumerate(rows):
            for j, object_id in enumerate(candidates):
                if labels[row] == self.tracks[object_id].label:
                    look = None if looks is None else looks[i]
                    cost[i, j] = self._cost(frame, object_id, boxes[row], look)
        return {rows[i]: candidates[j] for i, j in assign(cost)}

    def _cost(self, frame: int, object_id: int, box: np.ndarray, look: np.ndarray | None) -> float:
        """Cost of the detection being this object: appearance distance plus distance from where it should be,
        each in [0, 1]; FORBIDDEN where it cannot be."""
        similarity = _similarity(look, self.looks.get(object_id))
        if _looks_different(similarity):
            return FORBIDDEN
        track, here = self.tracks[object_id], centre(box)
        expected = self.motion[object_id].expected(frame)
        if track.state == "lost":
            reach = self._reach(track, frame)
            near = distance_to_segment(here, centre(track.last_box() or box), expected) <= reach
        else:  # an unmatched visible object: within a box diagonal, plus two frames' travel (it may have turned),
            # of where its velocity puts it
            reach = self._diagonal(track) + 2 * float(np.hypot(*self.motion[object_id].velocity))
            near = float(np.hypot(*(here - expected))) <= reach
        if not near and (similarity is None or similarity < APPEARANCE_SAME):
            return FORBIDDEN
        appearance = 0.5 if similarity is None else (1.0 - similarity) / (1.0 - APPEARANCE_DIFFERENT)
        return appearance + min(float(np.hypot(*(here - expected))) / max(reach, 1.0), 2.0) / 2

    def _diagonal(self, track: Track) -> float:
        """The largest box diagonal of its recent frames (the very last box is often a sliver at an edge)."""
        return max([float(np.hypot(b[2] - b[0], b[3] - b[1])) for b in (f["box_xyxy"] for f in track.frames[-_RECENT:])]
                   + [1.0])

    def _reach(self, track: Track, frame: int) -> float:
        """How far (px) from its expected way a lost object may come back: `revive_distance` of its box
        diagonals, plus as many per second it has been lost."""
        return self.settings.revive_distance * self._diagonal(track) * (1 + track.frames_lost(frame) / self.fps)

    def _place(self, object_id: int, frame: int, box: np.ndarray) -> None:
        """A revived object is at `box`: its filter takes it as a measurement if it came back on its way, else
        starts again there (it came back somewhere its velocity does not explain)."""
        motion, track, here = self.motion[object_id], self.tracks[object_id], centre(box)
        if np.hypot(*(here - motion.expected(frame))) <= self._reach(track, frame):
            motion.update(frame, tuple(here))
        else:
            motion.restart(frame, tuple(here), float(max(box[2] - box[0], box[3] - box[1])))

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
            box = np.asarray(found.boxes[index], np.float64)
            self.motion[object_id] = ConstantVelocity(frame, tuple(centre(box)), float(max(box[2] - box[0], box[3] - box[1])))
            self.active.append(object_id)
        return ids

    def _end(self, object_id: int, frame: int, reason: str, merged_into: int | None = None) -> int:
        self.tracks[object_id].end(frame, reason, merged_into)
        self.active.remove(object_id)
        for table in (self.masks, self.motion, self.looks, self.areas):
            table.pop(object_id, None)
        return object_id

    def record(self, frame: int, result: FrameMasks, describe: Describe | None = None) -> list[int]:
        """Note this frame's masks (and, for objects seen whole, their motion and appearance); returns the ids to
        drop from the session (forgotten or merged).

        Args:
            describe: descriptors of regions of this frame (the tracker's `appearance`); None = no appearance.
        """
        masks = dict(zip(result.object_ids, result.masks))
        scores = dict(zip(result.object_ids, np.asarray(result.object_scores, np.float64)))
        whole: list[int] = []
        for object_id in self.active:
            mask = masks.get(object_id)
            self.tracks[object_id].record(frame, mask, self.encode_mask)
            seen = mask is not None and bool(mask.any())
            if seen:
                self.masks[object_id] = mask
                if self._seen_whole(object_id, mask, scores.get(object_id, 1.0)):
                    whole.append(object_id)
            box = self.tracks[object_id].last_box()
            self.motion[object_id].update(frame, tuple(centre(box)) if object_id in whole else None)
        self._update_looks(whole, masks, describe)
        merged = self._merge_duplicates(frame)
        forgotten = [self._end(i, frame, "forgotten") for i in list(self.active)
                     if self.tracks[i].state == "lost" and self.tracks[i].frames_lost(frame) >= self.horizon]
        return merged + forgotten

    def _seen_whole(self, object_id: int, mask: np.ndarray, score: float) -> bool:
        """Confidently tracked and all of it in view: SAM's presence score > 0, not cut by the frame's edge, and
        its area, width and height not much below their largest of late (an object sliding behind another loses
        one side first; its centre would lag and drag the velocity down)."""
        x0, y0, x1, y1 = self.tracks[object_id].last_box()
        now = np.asarray([mask.sum(), x1 - x0, y1 - y0], np.float64)
        recent = self.areas.setdefault(object_id, [])
        recent[:] = (recent + [now])[-_RECENT:]
        inside = x0 > 0 and y0 > 0 and x1 < self.size[1] and y1 < self.size[0]
        return score > 0 and inside and bool((now >= WHOLE * np.max(recent, axis=0)).all())

    def _update_looks(self, whole: list[int], masks: dict[int, np.ndarray], describe: Describe | None) -> None:
        """Running average of each whole object's descriptor (kept unit length)."""
        if describe is None or not whole:
            return
        looks = describe(np.stack([masks[object_id] for object_id in whole]))
        if looks is None:
            return
        for object_id, look in zip(whole, np.asarray(looks, np.float64)):
            old = self.looks.get(object_id)
            mixed = look if old is None else APPEARANCE_MOMENTUM * old + (1 - APPEARANCE_MOMENTUM) * look
            self.looks[object_id] = mixed / max(float(np.linalg.norm(mixed)), 1e-12)

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
