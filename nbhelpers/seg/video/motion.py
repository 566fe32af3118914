"""Where a tracked object is heading: a constant-velocity Kalman filter on its box centre (OpenCV's cv2.KalmanFilter).

SORT, ByteTrack and BoT-SORT predict a lost object's position the same way. The state is (x, y, vx, vy) in pixels
and pixels per processed frame; noise is scaled by the object's size (a big object's centre moves and jitters by
more pixels), as those trackers scale theirs by the box height. OpenCV's filter is used rather than a hand-written
one (filterpy, the usual Python choice, is unmaintained); opencv-python-headless is already a requirement.
"""
from __future__ import annotations

import cv2
import numpy as np

_POSITION_NOISE = 1 / 20  # std of a measured centre, and of its drift per frame, in object sizes
_VELOCITY_NOISE = 1 / 40  # std of the change of velocity per frame, in object sizes (SORT-like trackers use 1/160)
_INITIAL_SPEED = 1.0  # std of the unknown velocity of a new object, in object sizes per frame


class ConstantVelocity:
    """One object's motion: updated with its measured centre on the frames it is seen whole, predicted otherwise.

    Args:
        frame: the frame `centre` was seen on. centre: (x, y) px. size: the object's larger box side (px).
    """

    def __init__(self, frame: int, centre: tuple[float, float], size: float):
        self.frame = frame
        self.filter = cv2.KalmanFilter(4, 2)
        self.filter.transitionMatrix = np.array([[1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 1]], np.float32)
        self.filter.measurementMatrix = np.eye(2, 4, dtype=np.float32)
        self.restart(frame, centre, size)

    def restart(self, frame: int, centre: tuple[float, float], size: float) -> None:
        """Forget the velocity: the object is at `centre` on `frame` (e.g. it came back somewhere unexpected)."""
        scale = max(float(size), 1.0)
        position, velocity = (_POSITION_NOISE * scale) ** 2, (_VELOCITY_NOISE * scale) ** 2
        self.filter.processNoiseCov = np.diag([position, position, velocity, velocity]).astype(np.float32)
        self.filter.measurementNoiseCov = np.eye(2, dtype=np.float32) * position
        self.filter.statePost = np.array([[centre[0]], [centre[1]], [0], [0]], np.float32)
        speed = (_INITIAL_SPEED * scale) ** 2
        self.filter.errorCovPost = np.diag([position, position, speed, speed]).astype(np.float32)
        self.frame = frame

    def update(self, frame: int, centre: tuple[float, float] | None) -> None:
        """Advance to `frame` (predicting each frame in between) and correct with `centre` if it was measured."""
        steps = frame - self.frame
        for _ in range(steps):
            self.filter.predict()  # OpenCV also copies the prediction into statePost: no measurement needed after
        if steps <= 0:  # correct() starts from statePre/errorCovPre, which only predict() sets: start from the state
            self.filter.statePre = self.filter.statePost.copy()
            self.filter.errorCovPre = self.filter.errorCovPost.copy()
        self.frame = max(self.frame, frame)
        if centre is not None:
            self.filter.correct(np.asarray(centre, np.float32).reshape(2, 1))

    @property
    def velocity(self) -> np.ndarray:
        """(vx, vy) px per frame."""
        return self.filter.statePost[2:, 0].astype(np.float64)

    def expected(self, frame: int) -> np.ndarray:
        """Expected centre (x, y) px on `frame` (at or after the last update): constant velocity from there."""
        state = self.filter.statePost[:, 0].astype(np.float64)
        return state[:2] + state[2:] * max(frame - self.frame, 0)

    def position(self) -> np.ndarray:
        """Centre (x, y) px at the last update."""
        return self.filter.statePost[:2, 0].astype(np.float64)
