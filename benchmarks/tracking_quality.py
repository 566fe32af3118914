"""Identity quality of video tracking on scripted clips with ground-truth ids: one JSON line per clip.

    python benchmarks/tracking_quality.py                     # this checkout's code
    python benchmarks/tracking_quality.py --code-from f4bb0ea # the same clips through an older commit's code
    python benchmarks/tracking_quality.py --clips fast --no-appearance  # some clips; a tracker without descriptors

Each clip is drawn here with known object ids and masks (48x64 px, 12 fps), with the events that break
identities: an object that leaves the frame and comes back, one hidden behind another for longer than SAM 2's
memory window, a short occlusion, an object appearing mid-clip, empty frames at re-detection time, and objects
coming and going under a small MAX_OBJECTS. `segment_video` runs on each with two stand-ins:
- `ScriptedDetector` returns the ground-truth boxes ("grounding-dino"); on the frames a clip marks as missed
  by GroundingDINO it returns what the CLIPSeg fallback gives instead: loose blobs around the objects, or a blob
  on the background of an empty frame ("clipseg-fallback").
- `ScriptedTracker` stands in for SAM 2 (random tiny weights cannot follow anything): prompted with a box it
  follows the object under it with its exact mask, loses it when it is hidden for more than `memory_frames`
  (SAM 2's mask memory: 7 frames), re-acquires it by itself `reacquire_lag` frames after a shorter absence, and
  follows a box on no object as a phantom (a small mask inside the box, as SAM does with a loose blob).
`hard_clips()` adds the five kinds of case issue 24 reported, each in a few variants (speeds, directions, gaps,
sizes, colours): an object that leaves on one side and comes back on the other (`reenters_elsewhere`), two squares
crossing while both are behind a wall past SAM 2's memory (`cross_while_hidden`), objects faster than their own
size per frame (`fast`), such an object dashing while a tracker stand-in that loses anything moving more than its
size in one frame follows it (`fast_lost`), and a bigger object appearing behind a tracked one, its box enclosing
it (`newcomer_encloses`). The tracker stand-in's `appearance` is the mean colour under a region (SAM 2's is its
mask-pooled image embedding); `--no-appearance` runs without it, to show what place and motion alone do.
Scores come from py-motmetrics (`motmetrics`): IDF1, ID switches, false positives, misses, MOTA, plus the
number of false tracks (ids never matched to a ground-truth object) and the most objects held at once.
py-motmetrics was picked over TrackEval because it scores in memory from per-frame ids and distances (TrackEval
reads benchmark folders in MOTChallenge layout), is a small pure-Python package on PyPI, and implements the
CLEAR-MOT and IDF1 definitions the MOT benchmarks use. Matching: box IoU >= 0.5.

`--code-from REV` extracts `nbhelpers` at that git revision into a temporary folder and runs this same script
against it (its `segment_video` options are passed by name), so "before" is the old code, not an imitation.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH, FPS = 48, 64, 12.0
MATCH_IOU = 0.5  # a track box matches a ground-truth box at this IoU or more


# ----------------------------------------------------------------------------- clips with ground truth


@dataclass
class Thing:
    """One ground-truth object: where its centre is on each frame (None: out of the picture)."""

    label: str
    colour: tuple[int, int, int]
    size: tuple[int, int]  # (height, width) px
    centre: Callable[[int], tuple[float, float] | None]  # frame -> (x, y) px


@dataclass
class Clip:
    """A scripted clip: frames, each object's visible mask per frame, and what the detector misses."""

    name: str
    things: dict[int, Thing]  # ground-truth id -> object; drawn in id order (a higher id is in front)
    frames: int
    dino_misses: set[int] = field(default_factory=set)  # frames where only the CLIPSeg fallback finds anything
    max_objects: int = 20
    lose_fast: bool = False  # the tracker stand-in loses an object that moves more than its size in one frame
    height: int = HEIGHT
    width: int = WIDTH
    kind: str = "basic"  # the family of hard case it belongs to (hard_clips), or "basic" for the first six

    def masks(self, frame: int) -> dict[int, np.ndarray]:
        """Ground-truth id -> visible (H, W) bool mask, for the objects visible on `frame`."""
        visible: dict[int, np.ndarray] = {}
        for thing_id, thing in self.things.items():  # in drawing order: later ones hide earlier ones
            mask = _rectangle(thing, frame, (self.height, self.width))
            if mask is None:
                continue
            visible = {i: m & ~mask for i, m in visible.items()}
            visible[thing_id] = mask
        return {i: m for i, m in visible.items() if m.sum() >= 4}

    def image(self, frame: int) -> np.ndarray:
        picture = np.full((self.height, self.width, 3), 128, np.uint8)
        for thing_id, mask in self.masks(frame).items():
            picture[mask] = self.things[thing_id].colour
        return picture

    def prompt(self) -> str:
        return ". ".join(dict.fromkeys(thing.label for thing in self.things.values()))


def _rectangle(thing: Thing, frame: int, size: tuple[int, int]) -> np.ndarray | None:
    centre = thing.centre(frame)
    if centre is None:
        return None
    (x, y), (h, w) = centre, thing.size
    x0, y0 = int(round(x - w / 2)), int(round(y - h / 2))
    mask = np.zeros(size, bool)
    mask[max(y0, 0):max(y0 + h, 0), max(x0, 0):max(x0 + w, 0)] = True
    return mask if mask.any() else None


def box_of(mask: np.ndarray) -> list[int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


RED, GREEN, BLUE, YELLOW = (220, 30, 30), (30, 200, 60), (30, 60, 220), (230, 210, 40)
ORANGE, PURPLE = (240, 140, 20), (150, 40, 200)


def clips() -> list[Clip]:
    """The scripted clips (see the module docstring)."""
    def moving(x0: float, speed: float, y: float, start: int = 0, stop: int = 10**6):
        return lambda t: (x0 + speed * (t - start), y) if start <= t < stop else None

    def fixed(x: float, y: float):
        return lambda t: (x, y)

    def out_and_back(t: int):  # right, out of the picture for 12 frames, back in from the right
        return (12 + 3 * t, 16.0) if t < 20 else None if t < 32 else (70 - 3 * (t - 32), 16.0)

    return [
        Clip("leaves_and_returns", {1: Thing("square", RED, (10, 10), out_and_back)}, 48),
        # The wall stays in front; the square spends 25 frames (2 s) fully behind it, past SAM 2's memory.
        Clip("hidden_behind_another", {1: Thing("square", RED, (8, 8), moving(6, 0.5, 24)),
                                       2: Thing("wall", GREEN, (36, 20), fixed(32, 24))}, 80),
        # A pole hides the square for 5 frames: the tracker re-acquires it by itself, a little late.
        Clip("short_occlusion", {1: Thing("square", RED, (8, 8), moving(4, 1.0, 24)),
                                 2: Thing("pole", GREEN, (40, 12), fixed(23, 24))}, 40),
        Clip("appears_mid_clip", {1: Thing("square", RED, (10, 10), moving(8, 1.0, 14)),
                                  2: Thing("disc", BLUE, (12, 12), moving(70, -2.0, 34, start=15))}, 40),
        # The square leaves after 12 frames; the rest is empty, and GroundingDINO also misses it twice.
        Clip("empty_at_redetection", {1: Thing("square", RED, (10, 10), moving(20, 4.0, 20, stop=12))}, 40,
             dino_misses=set(range(0, 2)) | set(range(5, 8)) | set(range(12, 40))),
        # Two objects, then two others later, with room for two at once. The later disc is purple: one that looked
        # just like the first, coming in 1.4 s after it left, would be the re-entry reenters_elsewhere keeps the id of.
        Clip("coming_and_going", {1: Thing("square", RED, (10, 10), moving(40, 3.0, 12, stop=12)),
                                  2: Thing("disc", BLUE, (10, 10), moving(44, 3.0, 34, stop=12)),
                                  3: Thing("square", YELLOW, (10, 10), moving(-4, 1.5, 14, start=22)),
                                  4: Thing("disc", PURPLE, (10, 10), moving(-4, 1.5, 36, start=24))}, 48, max_objects=2),
    ]


# ----------------------------------------------------------------------------- hard cases (issue 24)

HARD_KINDS = ("reenters_elsewhere", "cross_while_hidden", "fast", "fast_lost", "newcomer_encloses")


def _route(starts: tuple[float, float], velocity: tuple[float, float], frames: int, gap: int, size: tuple[int, int],
           frame_size: tuple[int, int]) -> Callable[[int], tuple[float, float] | None]:
    """A straight walk that, once wholly out of the picture, stays away `gap` frames and comes back in at the
    opposite edge with the same velocity (an object that went round behind the camera)."""
    (h, w), (height, width) = size, frame_size
    positions: list[tuple[float, float] | None] = []
    x, y, away = starts[0], starts[1], None
    for _ in range(frames):
        outside = x + w / 2 <= 0 or x - w / 2 >= width or y + h / 2 <= 0 or y - h / 2 >= height
        if outside and away is None:
            away = gap
        if away is not None:
            positions.append(None)
            away -= 1
            if away == 0:  # in again from the other side: one step in from just beyond the opposite edge
                x = (width + w / 2 if x < 0 else -w / 2 if x >= width else x) + velocity[0]
                y = (height + h / 2 if y < 0 else -h / 2 if y >= height else y) + velocity[1]
                away = None
            continue
        positions.append((x, y))
        x, y = x + velocity[0], y + velocity[1]
    return lambda t: positions[t] if 0 <= t < len(positions) else None


def _bounce(start: tuple[float, float], velocity: tuple[float, float], size: tuple[int, int],
            frame_size: tuple[int, int]) -> Callable[[int], tuple[float, float]]:
    """Straight lines reflected off the picture's edges (a ball in a box) at constant speed."""
    def fold(value: float, low: float, high: float) -> float:
        span = high - low
        phase = (value - low) % (2 * span)
        return low + (phase if phase <= span else 2 * span - phase)

    (h, w), (height, width) = size, frame_size
    return lambda t: (fold(start[0] + velocity[0] * t, w / 2 + 1, width - w / 2 - 1),
                      fold(start[1] + velocity[1] * t, h / 2 + 1, height - h / 2 - 1))


def _dash(start: tuple[float, float], slow: tuple[float, float], fast: tuple[float, float], dash_from: int,
          dash_frames: int) -> Callable[[int], tuple[float, float]]:
    """Slow, then `dash_frames` frames at `fast` velocity from frame `dash_from`, then slow again."""
    def at(t: int) -> tuple[float, float]:
        fast_frames = min(max(t - dash_from, 0), dash_frames)
        return tuple(s + v * (t - fast_frames) + f * fast_frames for s, v, f in zip(start, slow, fast))
    return at


def _still(x: float, y: float, start: int = 0):
    return lambda t: (x, y) if t >= start else None


def _across(x0: float, y0: float, vx: float, vy: float):
    return lambda t: (x0 + vx * t, y0 + vy * t)


def reentry_clips() -> list[Clip]:
    """An object leaves on one side and comes back on the other side within the forgetting horizon (3 s)."""
    size, frame_size = (10, 10), (HEIGHT, WIDTH)
    variants = [("left_gap12", (32, 16), (-3, 0), 12, None), ("right_gap18", (32, 30), (3, 0), 18, None),
                ("up_gap12", (24, 24), (0, -2), 12, None), ("left_gap24_other_square_stays", (40, 14), (-2.5, 0), 24,
                                                                                          (14, 36))]
    clips_ = []
    for name, start, velocity, gap, other in variants:
        frames = 56 if gap > 18 else 48
        things = {1: Thing("square", RED, size, _route(start, velocity, frames, gap, size, frame_size))}
        if other:
            things[2] = Thing("square", YELLOW, (10, 10), _still(*other))
        clips_.append(Clip(f"reenters_elsewhere-{name}", things, frames, kind="reenters_elsewhere"))
    return clips_


def crossing_clips() -> list[Clip]:
    """Two squares cross while both are behind a wall for longer than SAM 2's memory (7 frames); the wall, drawn
    last, stays in front. Different colours (appearance tells them apart) or the same (only motion can)."""
    variants = [("speed1_colours_differ", 1.0, 1.0, YELLOW, 24, 24), ("speed1_same_colour", 1.0, 1.0, RED, 24, 24),
                ("speed1.5_colours_differ_offset", 1.5, 1.5, YELLOW, 20, 28),
                ("speeds1_1.5_same_colour", 1.0, 1.5, RED, 24, 24)]
    clips_ = []
    for name, left_speed, right_speed, colour, left_y, right_y in variants:
        frames = int(np.ceil(60 / min(left_speed, right_speed)))
        clips_.append(Clip(f"cross_while_hidden-{name}", {
            1: Thing("square", RED, (8, 8), _across(4, left_y, left_speed, 0)),
            2: Thing("square", colour, (8, 8), _across(60, right_y, -right_speed, 0)),
            3: Thing("wall", GREEN, (40, 28), _still(32, 24))}, frames, kind="cross_while_hidden"))
    return clips_


def fast_clips() -> list[Clip]:
    """Objects moving faster than their own size per frame, which the tracker keeps up with (64 x 96 frames)."""
    frame_size, small = (64, 96), (6, 6)
    variants = {
        "bounce_horizontal_8px": {1: Thing("square", RED, small, _bounce((10, 30), (8, 0), small, frame_size))},
        "bounce_diagonal_10px": {1: Thing("square", RED, small, _bounce((10, 10), (9, 7), small, frame_size))},
        "two_opposite_9px": {1: Thing("square", RED, small, _bounce((8, 16), (9, 0), small, frame_size)),
                             2: Thing("square", YELLOW, small, _bounce((88, 46), (-9, 0), small, frame_size))},
        "bounce_13px_bigger": {1: Thing("disc", BLUE, (8, 8), _bounce((10, 40), (13, -5), (8, 8), frame_size))},
    }
    return [Clip(f"fast-{name}", things, 36, height=frame_size[0], width=frame_size[1], kind="fast")
            for name, things in variants.items()]


def fast_lost_clips() -> list[Clip]:
    """An object that dashes faster than its own size per frame for a few frames: the tracker stand-in loses it
    (SAM 2 can lose an object that jumps that far) and only a detection can bring it back (64 x 128 frames)."""
    frame_size, size = (64, 128), (8, 8)
    variants = [("right_3_frames_12px", (20, 20), (1, 0), (12, 0), 14, 3),
                ("left_2_frames_16px", (100, 40), (-1, 0.5), (-16, 0), 9, 2),
                ("down_3_frames_10px", (60, 8), (0.5, 0.5), (0, 10), 16, 3),
                ("diagonal_4_frames_11px", (16, 10), (1, 0.5), (9, 6), 21, 4)]
    return [Clip(f"fast_lost-{name}", {1: Thing("square", RED, size, _dash(start, slow, fast, when, length))}, 40,
                 lose_fast=True, height=frame_size[0], width=frame_size[1], kind="fast_lost")
            for name, start, slow, fast, when, length in variants]


def enclosing_clips() -> list[Clip]:
    """A bigger object appears behind a tracked one, its box enclosing it; the tracked mask covers 0.35-0.45 of the
    newcomer's box (above match_iou 0.3). Ground-truth id 1 is drawn first: it is the one behind."""
    variants = [("other_label_cover0.39", "box", BLUE, (16, 16), 6), ("other_label_cover0.45", "box", BLUE, (14, 16), 9),
                ("same_label_other_colour_cover0.39", "square", GREEN, (16, 16), 7),
                ("same_label_same_colour_cover0.35", "square", RED, (16, 18), 8),
                ("other_label_moving_cover0.39", "box", ORANGE, (16, 16), 12)]
    clips_ = []
    for name, label, colour, size, start in variants:
        moving = "moving" in name
        small = _across(24, 22, 0.5, 0.25) if moving else _still(32, 24)
        big = (lambda s=start: (lambda t: (24 + 0.5 * t, 22 + 0.25 * t) if t >= s else None))() if moving else _still(32, 24, start)
        clips_.append(Clip(f"newcomer_encloses-{name}", {1: Thing(label, colour, size, big),
                                                         2: Thing("square", RED, (10, 10), small)}, 36,
                           kind="newcomer_encloses"))
    return clips_


def hard_clips() -> list[Clip]:
    """Clips of the five kinds of case issue 24 reported, each in a few variants (speeds, directions, gaps, sizes)."""
    return reentry_clips() + crossing_clips() + fast_clips() + fast_lost_clips() + enclosing_clips()


def write_clip(clip: Clip, path: Path) -> Path:
    """The clip as an MP4 (the stand-ins read the ground truth, so compression does not matter)."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (clip.width, clip.height))
    for frame in range(clip.frames):
        writer.write(cv2.cvtColor(clip.image(frame), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


# ----------------------------------------------------------------------------- stand-ins


class ScriptedTracker:
    """Stands in for SAM 2 on a scripted clip (see the module docstring); same interface as StreamingTracker.

    Its `appearance` is what the image looks like under a region: the mean colour (centred on the grey background,
    unit length), as SAM 2's mask-pooled image embedding stands for what an object looks like; a clip whose
    objects share a colour shows what identity does with no help from appearance. `use_appearance=False` leaves
    the method out, as a tracker without one.
    """

    def __init__(self, clip: Clip, memory_frames: int = 7, reacquire_lag: int = 3, use_appearance: bool = True):
        self.clip, self.memory_frames, self.reacquire_lag = clip, memory_frames, reacquire_lag
        self.size = (clip.height, clip.width)
        self.targets: dict[int, int | np.ndarray] = {}  # object id -> ground-truth id, or a phantom's mask
        self.hidden: dict[int, int] = {}  # object id -> frames in a row its object has been hidden
        self.seen_again: dict[int, int] = {}  # object id -> frames in a row visible since it was hidden
        self.given_up: set[int] = set()  # hidden too long (or too fast): not followed again until prompted again
        self.prompted: dict[int, int] = {}  # object id -> frame it was last prompted on
        self.next_frame = 0  # the frame `track` is called with next (the detector runs before it)
        self.frames_held_peak = 1
        self.most_at_once = 0
        if not use_appearance:
            self.appearance = None

    @property
    def object_ids(self) -> list[int]:
        return list(self.targets)

    def appearance(self, frame_index: int, frame_rgb: np.ndarray, regions: np.ndarray) -> np.ndarray:
        colours = (self.clip.image(frame_index).astype(np.float64) - 128) / 128
        weights = np.asarray(regions, np.float64).reshape(len(regions), -1)
        pooled = weights @ colours.reshape(-1, 3) / np.maximum(weights.sum(axis=1, keepdims=True), 1)
        return (pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-9)).astype(np.float32)

    def add_objects(self, frame_index: int, object_ids: list[int], boxes_xyxy: np.ndarray) -> None:
        masks = self.clip.masks(frame_index)
        for object_id, box in zip(object_ids, np.asarray(boxes_xyxy)):
            x0, y0, x1, y1 = np.round(box).astype(int)
            # the object most inside the box; of several wholly inside, the one the box frames (a box around a
            # big object that encloses a small one is the big one's)
            inside = {i: (round(int(m[y0:y1, x0:x1].sum()) / max(int(m.sum()), 1), 3), _box_iou1(box_of(m), box))
                      for i, m in masks.items()}
            best = max(inside, key=inside.get, default=None)
            if best is not None and inside[best][0] > 0.3:
                self.targets[object_id] = best
            else:  # nothing under the box: SAM segments some small patch of background inside it
                phantom = np.zeros(self.size, bool)
                cx, cy, half = (x0 + x1) // 2, (y0 + y1) // 2, max(min(x1 - x0, y1 - y0) // 6, 1)
                phantom[cy - half:cy + half, cx - half:cx + half] = True
                self.targets[object_id] = phantom
            self.hidden[object_id], self.seen_again[object_id] = 0, 0
            self.prompted[object_id] = frame_index
            self.given_up.discard(object_id)

    def remove_objects(self, object_ids: list[int]) -> None:
        for object_id in object_ids:
            self.targets.pop(object_id, None)

    def track(self, frame_index: int, frame_rgb: np.ndarray):
        from nbhelpers.seg.types import FrameMasks

        truth = self.clip.masks(frame_index)
        masks = [self._follow(object_id, target, truth, frame_index) for object_id, target in self.targets.items()]
        self.next_frame = frame_index + 1
        self.most_at_once = max(self.most_at_once, len(self.targets))
        return FrameMasks(list(self.targets), np.asarray(masks, bool).reshape(-1, *self.size),
                          np.ones(len(masks), np.float32))

    def _follow(self, object_id: int, target: int | np.ndarray, truth: dict[int, np.ndarray], frame: int) -> np.ndarray:
        empty = np.zeros(self.size, bool)
        if isinstance(target, np.ndarray):
            return target
        if target not in truth:
            self.hidden[object_id] += 1
            self.seen_again[object_id] = 0
            if self.hidden[object_id] > self.memory_frames:
                self.given_up.add(object_id)
            return empty
        if self.clip.lose_fast and self.prompted[object_id] != frame and self._jumped(target, frame):
            self.given_up.add(object_id)  # it moved further than its own size since the last frame
        if object_id in self.given_up:
            return empty
        if self.hidden[object_id]:  # back after a short absence: re-acquired a few frames late
            self.seen_again[object_id] += 1
            if self.seen_again[object_id] <= self.reacquire_lag:
                return empty
            self.hidden[object_id] = 0
        return truth[target]

    def _jumped(self, target: int, frame: int) -> bool:
        thing = self.clip.things[target]
        now, before = thing.centre(frame), thing.centre(frame - 1)
        return now is not None and before is not None and float(np.hypot(now[0] - before[0], now[1] - before[1])) > max(thing.size)


def _box_iou1(first: list[int], second: np.ndarray) -> float:
    return float(_box_iou(np.asarray([first], float), np.asarray([second], float))[0, 0])


class ScriptedDetector:
    """Ground-truth boxes, or CLIPSeg-like blobs on the frames the clip marks as missed by GroundingDINO."""

    def __init__(self, clip: Clip, tracker: ScriptedTracker):
        self.clip, self.tracker = clip, tracker  # the tracker knows which frame comes next

    def __call__(self, frame_rgb: np.ndarray):
        from nbhelpers.seg.types import FrameDetections

        frame = self.tracker.next_frame
        truth = self.clip.masks(frame)
        if frame not in self.clip.dino_misses:
            labels = [self.clip.things[i].label for i in truth]
            return FrameDetections(np.asarray([box_of(m) for m in truth.values()], np.float32).reshape(-1, 4),
                                   np.full(len(truth), 0.9, np.float32), labels, "grounding-dino")
        blobs = [_loosen(box_of(m), self.clip) for m in truth.values()] or [[30, 4, 58, 30]]  # an empty frame: background
        labels = [self.clip.things[i].label for i in truth] or [next(iter(self.clip.things.values())).label]
        return FrameDetections(np.asarray(blobs, np.float32), np.full(len(blobs), 0.5, np.float32), labels,
                               "clipseg-fallback")


def _loosen(box: list[int], clip: Clip) -> list[float]:
    """A CLIPSeg region's box: 2.5 times the object's width and height (its low-resolution map spreads)."""
    cx, cy, w, h = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0], box[3] - box[1]
    return [max(cx - 1.25 * w, 0), max(cy - 1.25 * h, 0), min(cx + 1.25 * w, clip.width), min(cy + 1.25 * h, clip.height)]


# ----------------------------------------------------------------------------- scoring


def score(clip: Clip, objects: list[dict]) -> dict:
    """py-motmetrics scores of tracks.json `objects` against the clip's ground truth (box IoU >= MATCH_IOU)."""
    import motmetrics

    by_frame: dict[int, dict[int, list[int]]] = {}
    for entry in objects:
        for seen in entry["frames"]:
            by_frame.setdefault(seen["frame"], {})[entry["id"]] = seen["box_xyxy"]
    accumulator = motmetrics.MOTAccumulator(auto_id=False)
    for frame in range(clip.frames):
        truth = {i: box_of(m) for i, m in clip.masks(frame).items()}
        found = by_frame.get(frame, {})
        iou = _box_iou(np.asarray(list(truth.values()), float).reshape(-1, 4), np.asarray(list(found.values()), float).reshape(-1, 4))
        accumulator.update(list(truth), list(found), np.where(iou >= MATCH_IOU, 1 - iou, np.nan), frameid=frame)
    names = ["idf1", "num_switches", "num_false_positives", "num_misses", "mota"]
    summary = motmetrics.metrics.create().compute(accumulator, metrics=names, name=clip.name).iloc[0]
    events = accumulator.mot_events
    matched = set(events.loc[events.Type.isin(["MATCH", "SWITCH", "TRANSFER", "ASCEND", "MIGRATE"]), "HId"].dropna())
    return {"idf1": round(float(summary.idf1), 4), "id_switches": int(summary.num_switches),
            "false_tracks": sum(entry["id"] not in matched for entry in objects), "tracks": len(objects),
            "false_positives": int(summary.num_false_positives), "misses": int(summary.num_misses),
            "mota": round(float(summary.mota), 4)}


def _box_iou(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    import torch
    from torchvision.ops import box_iou

    return box_iou(torch.as_tensor(first), torch.as_tensor(second)).numpy()


# ----------------------------------------------------------------------------- running


def run_clip(clip: Clip, models, sam_video, workdir: Path, redetect_every: int = 5, use_appearance: bool = True,
             **video_options) -> tuple[dict, ScriptedTracker]:
    """segment_video on the clip with the stand-ins; returns (tracks.json, the tracker stand-in).

    Args:
        use_appearance: False = a tracker stand-in without `appearance` (identity by place and motion only).
        video_options: VideoSettings fields.
    """
    from nbhelpers.seg.video import segment as segment_module

    tracker = ScriptedTracker(clip, use_appearance=use_appearance)
    workdir.mkdir(parents=True, exist_ok=True)
    original = segment_module.StreamingTracker
    segment_module.StreamingTracker = lambda *args, **kwargs: tracker
    try:
        options = {"redetect_every": redetect_every, "max_objects": clip.max_objects} | video_options
        parameters = inspect.signature(segment_module.segment_video).parameters
        if "video_settings" in parameters:  # this code: one VideoSettings; older code: separate keywords
            from nbhelpers.seg.types import VideoSettings

            options = {"video_settings": VideoSettings(**options)}
        result = segment_module.segment_video(write_clip(clip, workdir / f"{clip.name}.mp4"), clip.prompt(), models,
                                              workdir / clip.name, sam_video=sam_video,
                                              detector=ScriptedDetector(clip, tracker), progress=False, **options)
    finally:
        segment_module.StreamingTracker = original
    return json.loads(Path(result.files["tracks"]).read_text()), tracker


def measure(workdir: Path, label: str, only: str = "", use_appearance: bool = True) -> list[dict]:
    from nbhelpers.seg.models import load_models, load_sam2_video
    from nbhelpers.testing import build_tiny_segmentation_models

    # segment_video needs loaded models for its metadata; the stand-ins replace what they would compute.
    dirs = build_tiny_segmentation_models(workdir / "models")
    models = load_models(dino=dirs["dino"], sam=dirs["sam"], clipseg=dirs["clipseg"], device="cpu")
    sam_video = load_sam2_video(dirs["sam"])
    records = []
    for clip in [clip for clip in clips() + hard_clips() if only in clip.name]:
        tracks, tracker = run_clip(clip, models, sam_video, workdir, use_appearance=use_appearance)
        record = {"clip": clip.name, "kind": clip.kind, "code": label, "appearance": use_appearance,
                  "ground_truth_objects": len(clip.things)} | score(clip, tracks["objects"])
        record |= {"most_objects_at_once": tracker.most_at_once, "max_objects": clip.max_objects}
        print(json.dumps(record), flush=True)
        records.append(record)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code-from", metavar="REV", help="run the nbhelpers of this git revision instead")
    parser.add_argument("--clips", default="", metavar="TEXT", help="only the clips whose name contains TEXT")
    parser.add_argument("--no-appearance", action="store_true",
                        help="a tracker stand-in without appearance descriptors (place and motion only)")
    args = parser.parse_args()
    if args.code_from:
        with tempfile.TemporaryDirectory(prefix="tracking_quality_") as temp:
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.code_from, "nbhelpers"], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", temp], input=archive, check=True)
            env = dict(os.environ, PYTHONPATH=temp, TRACKING_QUALITY_LABEL=f"before ({args.code_from})")
            options = ["--clips", args.clips] + (["--no-appearance"] if args.no_appearance else [])
            sys.exit(subprocess.run([sys.executable, __file__, *options], env=env).returncode)
    with tempfile.TemporaryDirectory(prefix="tracking_quality_") as temp:
        measure(Path(temp), os.environ.get("TRACKING_QUALITY_LABEL", "this checkout"), args.clips, not args.no_appearance)


if __name__ == "__main__":
    main()
