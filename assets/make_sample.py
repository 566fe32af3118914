"""Draw assets/sample.jpg (a 640x480 cartoon scene: sky, sun, hills, road, red car, black cat) and
assets/sample_clip.mp4 (48 frames, 320x240, 12 fps, H.264: the car drives right; the cat walks in from
frame 20) with OpenCV.

Deterministic: no randomness; re-running gives the same pictures. Run: python assets/make_sample.py
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

HEIGHT, WIDTH = 480, 640
HORIZON = 300


def _sky_and_ground() -> np.ndarray:
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)  # RGB
    rows = np.linspace(0.0, 1.0, HORIZON)[:, None]
    top, bottom = np.array([70, 130, 210]), np.array([190, 225, 250])
    image[:HORIZON] = (top * (1 - rows) + bottom * rows).astype(np.uint8)[:, None, :]
    image[HORIZON:] = (96, 160, 72)  # grass
    cv2.ellipse(image, (140, HORIZON + 10), (260, 70), 0, 180, 360, (80, 140, 60), cv2.FILLED, cv2.LINE_AA)
    road = np.array([[0, 420], [WIDTH, 400], [WIDTH, 470], [0, 480]], np.int32)
    cv2.fillPoly(image, [road], (110, 110, 115), cv2.LINE_AA)
    return image


def _sun(image: np.ndarray) -> None:
    centre = (540, 80)
    for angle in range(0, 360, 30):
        tip = (int(centre[0] + 62 * np.cos(np.radians(angle))), int(centre[1] + 62 * np.sin(np.radians(angle))))
        cv2.line(image, centre, tip, (255, 215, 60), 4, cv2.LINE_AA)
    cv2.circle(image, centre, 42, (255, 220, 40), cv2.FILLED, cv2.LINE_AA)


def _polygon(left: int, bottom: int, offsets: list[tuple[int, int]]) -> np.ndarray:
    """Points given as (right of `left`, above `bottom`)."""
    return np.array([[left + dx, bottom - dy] for dx, dy in offsets], np.int32)


def _car(image: np.ndarray, left: int = 300, bottom: int = 430) -> None:
    red, dark_red, glass = (205, 30, 35), (150, 20, 25), (170, 210, 235)
    cabin = _polygon(left, bottom, [(55, 60), (85, 105), (185, 105), (220, 60)])
    cv2.fillPoly(image, [cabin], red, cv2.LINE_AA)
    cv2.rectangle(image, (left, bottom - 62), (left + 270, bottom - 18), red, cv2.FILLED)
    cv2.line(image, (left + 5, bottom - 40), (left + 265, bottom - 40), dark_red, 2, cv2.LINE_AA)
    window_left = _polygon(left, bottom, [(70, 64), (92, 98), (132, 98), (132, 64)])
    window_right = _polygon(left, bottom, [(140, 64), (140, 98), (180, 98), (205, 64)])
    cv2.fillPoly(image, [window_left, window_right], glass, cv2.LINE_AA)
    cv2.rectangle(image, (left + 258, bottom - 56), (left + 270, bottom - 46), (255, 240, 150), cv2.FILLED)
    for wheel_x in (left + 60, left + 210):
        cv2.circle(image, (wheel_x, bottom - 18), 24, (30, 30, 30), cv2.FILLED, cv2.LINE_AA)
        cv2.circle(image, (wheel_x, bottom - 18), 10, (180, 180, 185), cv2.FILLED, cv2.LINE_AA)


def _cat(image: np.ndarray, x: int = 130, y: int = 380) -> None:
    fur, eye = (35, 32, 30), (240, 220, 60)
    cv2.ellipse(image, (x, y), (55, 38), 0, 0, 360, fur, cv2.FILLED, cv2.LINE_AA)  # body
    cv2.circle(image, (x + 50, y - 45), 28, fur, cv2.FILLED, cv2.LINE_AA)  # head
    ears = [np.array([[x + 28, y - 60], [x + 34, y - 92], [x + 50, y - 68]], np.int32),
            np.array([[x + 52, y - 70], [x + 68, y - 94], [x + 74, y - 60]], np.int32)]
    cv2.fillPoly(image, ears, fur, cv2.LINE_AA)
    cv2.ellipse(image, (x - 50, y - 36), (30, 48), 20, 90, 270, fur, 9, cv2.LINE_AA)  # tail
    for paw_x in (x - 35, x - 10, x + 20, x + 42):
        cv2.rectangle(image, (paw_x, y + 20), (paw_x + 12, y + 42), fur, cv2.FILLED)
    for eye_x in (x + 40, x + 60):
        cv2.ellipse(image, (eye_x, y - 50), (5, 7), 0, 0, 360, eye, cv2.FILLED, cv2.LINE_AA)


def make_sample() -> np.ndarray:
    """Return the scene as (480, 640, 3) uint8 RGB."""
    image = _sky_and_ground()
    _sun(image)
    _car(image)
    _cat(image)
    return image


CLIP_FRAMES, CLIP_FPS, CLIP_SIZE, CAT_ENTERS = 48, 12.0, (320, 240), 20


def make_clip_frame(index: int) -> np.ndarray:
    """Frame `index` of the sample clip as (240, 320, 3) uint8 RGB."""
    image = _sky_and_ground()
    _sun(image)
    _car(image, left=40 + 6 * index)
    if index >= CAT_ENTERS:
        _cat(image, x=-60 + 8 * (index - CAT_ENTERS))
    return cv2.resize(image, CLIP_SIZE, interpolation=cv2.INTER_AREA)


def write_clip(target: Path) -> None:
    from nbhelpers.seg.video.io import VideoWriter

    with VideoWriter(target, *CLIP_SIZE, CLIP_FPS) as writer:
        for index in range(CLIP_FRAMES):
            writer.write(make_clip_frame(index))
    assert writer.codec == "h264", "install imageio-ffmpeg so the clip is H.264 (plays in browsers)"
    print(f"wrote {target} ({target.stat().st_size / 1024:.1f} KB, {writer.codec})")


if __name__ == "__main__":
    write_clip(Path(__file__).resolve().parent / "sample_clip.mp4")
    target = Path(__file__).resolve().parent / "sample.jpg"
    bgr = cv2.cvtColor(make_sample(), cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok, "OpenCV could not encode the JPEG"
    temporary = target.with_suffix(".jpg.tmp")
    temporary.write_bytes(encoded.tobytes())
    temporary.replace(target)
    print(f"wrote {target} ({target.stat().st_size / 1024:.1f} KB)")
