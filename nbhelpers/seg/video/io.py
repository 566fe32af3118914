"""Stream video frames in and out, one frame at a time (memory does not grow with video length).

Reading uses OpenCV and falls back to the ffmpeg binary of imageio-ffmpeg for codecs OpenCV's build cannot
decode. Writing prefers H.264 (libx264 from imageio-ffmpeg: plays inline in Jupyter and in browsers) and falls
back to OpenCV's mp4v, which most browsers do not play. Files are written under a temporary name and renamed
into place only when complete.
"""
from __future__ import annotations

import os
import re
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from nbhelpers.seg.inputs import is_animated

VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".gif")
REENCODE_HINT = "re-encode it, e.g. `ffmpeg -i INPUT -c:v libx264 -pix_fmt yuv420p OUTPUT.mp4`, and pass OUTPUT.mp4"
DEFAULT_FPS = 30.0  # used when a file carries no frame rate


class VideoError(ValueError):
    """A video that cannot be read as given; the message names the fix."""


def is_video_file(path: str | os.PathLike) -> bool:
    """By extension; a GIF is a video only when animated (a single-frame GIF is an image)."""
    suffix = Path(path).suffix.lower()
    return suffix in VIDEO_EXTENSIONS and (suffix != ".gif" or is_animated(path))


def list_video_files(folder: str | os.PathLike) -> list[Path]:
    """Video files directly inside `folder` (animated GIFs included), sorted by name."""
    return sorted(path for path in Path(folder).iterdir() if path.is_file() and is_video_file(path))


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    width: int  # px
    height: int  # px
    fps: float  # frames per second of the source
    frame_count: int  # from the container header; 0 = unknown (some formats do not store it)
    codec: str  # FourCC / codec name as the reader reports it
    reader: str  # 'opencv' | 'ffmpeg'


def _opencv_fourcc(capture: cv2.VideoCapture) -> str:
    code = int(capture.get(cv2.CAP_PROP_FOURCC))
    text = "".join(chr((code >> 8 * i) & 0xFF) for i in range(4))
    return text if text.isprintable() and text.strip() else "unknown"


def _quiet_opencv() -> None:
    """OpenCV's FFmpeg backend prints its own lines for every file it cannot open; our error names the fix
    instead. Honours a user's own OPENCV_FFMPEG_LOGLEVEL (read when the backend first opens a file)."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def _probe_opencv(path: Path) -> VideoInfo | None:
    _quiet_opencv()
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    try:
        if not capture.isOpened():
            return None
        ok, frame = capture.read()
        if not ok or frame is None:
            return None
        fps = capture.get(cv2.CAP_PROP_FPS)
        count = max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0)
        return VideoInfo(path, frame.shape[1], frame.shape[0], fps if fps and fps > 0 else DEFAULT_FPS, count,
                         _opencv_fourcc(capture), "opencv")
    finally:
        capture.release()


def _probe_ffmpeg(path: Path) -> tuple[VideoInfo | None, str]:
    """(info, '') when ffmpeg decodes a first frame, else (None, ffmpeg's complaint)."""
    try:
        import imageio_ffmpeg
    except ImportError:
        return None, "imageio-ffmpeg is not installed"
    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        meta = next(reader)
        next(reader)  # one decoded frame proves the codec works
    except (RuntimeError, StopIteration, OSError) as error:
        return None, str(error).strip().splitlines()[-1] if str(error).strip() else "no frame decoded"
    finally:
        reader.close()
    width, height = meta["size"]
    fps = float(meta.get("fps") or 0) or DEFAULT_FPS
    count = int(round(meta.get("duration", 0) * fps)) if meta.get("duration") else 0
    return VideoInfo(path, int(width), int(height), fps, count, str(meta.get("codec", "unknown")), "ffmpeg"), ""


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Open a video and decode its first frame.

    Args:
        path: a video file (mp4, mov, avi, mkv, webm, …).
    Returns:
        VideoInfo. Raises FileNotFoundError for a missing file and VideoError (with the fix) for an empty,
        corrupt or undecodable one.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {str(path)!r}; check the path (VIDEO=... in the notebook).")
    if path.stat().st_size == 0:
        raise VideoError(f"{str(path)!r} is an empty file (0 bytes): copy or download the video again.")
    info = _probe_opencv(path)
    if info is not None:
        return info
    info, complaint = _probe_ffmpeg(path)
    if info is not None:
        return info
    header = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    opened, count = header.isOpened(), int(header.get(cv2.CAP_PROP_FRAME_COUNT))
    header.release()
    if opened and count <= 0:
        raise VideoError(f"{str(path)!r} contains no video frames: pass a video with at least one frame.")
    stream = _ffmpeg_video_stream(path)
    if stream is not None:  # the container is fine and names its video codec, but nothing here decodes it
        raise VideoError(f"cannot decode {str(path)!r}: its video codec ({stream}) is not supported by OpenCV or "
                         f"ffmpeg here; re-encode it to H.264 with a tool that reads it (a full ffmpeg build: "
                         f"`ffmpeg -i INPUT -c:v libx264 -pix_fmt yuv420p OUTPUT.mp4`, or the program that made it).")
    raise VideoError(f"cannot read {str(path)!r}: not a video, or corrupt ({complaint}); {REENCODE_HINT}.")


def _ffmpeg_video_stream(path: Path) -> str | None:
    """The video stream's codec as ffmpeg describes it (e.g. "none (QQZZ / 0x5A5A5151)"); None if it finds none."""
    try:
        import imageio_ffmpeg

        probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True,
                               text=True, timeout=60)
    except (ImportError, OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"Stream #\S+: Video: ([^,\n]+)", probe.stderr)
    return found.group(1).strip() if found else None


def iter_frames(info: VideoInfo, stride: int = 1, max_frames: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (source frame index, (H, W, 3) uint8 RGB) one decoded frame at a time.

    Args:
        info: from probe_video. stride: keep every `stride`-th frame. max_frames: stop after this many kept frames.
    """
    if stride < 1:
        raise ValueError(f"frame_stride must be >= 1, got {stride}.")
    frames = _opencv_frames(info.path) if info.reader == "opencv" else _ffmpeg_frames(info)
    kept = 0
    try:
        for index, frame in frames:
            if max_frames is not None and kept >= max_frames:
                return
            if index % stride == 0:
                kept += 1
                yield index, frame
    finally:
        frames.close()


def _opencv_frames(path: Path) -> Iterator[tuple[int, np.ndarray]]:
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    try:
        index = 0
        while True:
            ok, frame = capture.read()
            if not ok:
                return
            yield index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        capture.release()


def _ffmpeg_frames(info: VideoInfo) -> Iterator[tuple[int, np.ndarray]]:
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(info.path))
    index = 0
    try:
        next(reader)  # metadata
        for index, raw in enumerate(reader):
            yield index, np.frombuffer(raw, np.uint8).reshape(info.height, info.width, 3)
    except (RuntimeError, OSError) as error:  # a broken stream: keep what was decoded
        warnings.warn(f"{info.path.name}: decoding stopped after frame {index} ({str(error).strip()[-200:]}); "
                      f"the outputs cover the frames before it.", stacklevel=2)
    finally:
        reader.close()


# ----------------------------------------------------------------------------- writing


class VideoWriter:
    """Write RGB frames to an MP4, incrementally; the file appears under its name only after `close()`.

    Use as a context manager: an exception inside the block deletes the partial file and leaves any
    earlier file at `path` untouched.
    """

    def __init__(self, path: str | os.PathLike, width: int, height: int, fps: float, prefer_h264: bool = True):
        self.path = Path(path)
        self.size = (int(width), int(height))
        self.temp_path = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix or '.mp4'}")
        self.frames_written = 0
        self._h264, self._opencv = None, None
        if prefer_h264:
            self._h264 = self._start_h264(fps)
        if self._h264 is None:
            self._opencv = cv2.VideoWriter(str(self.temp_path), cv2.VideoWriter_fourcc(*"mp4v"), fps, self.size)
            if not self._opencv.isOpened():
                raise VideoError(f"cannot write {str(self.path)!r}: neither libx264 (imageio-ffmpeg) nor OpenCV's mp4v "
                                 f"encoder is available; `pip install imageio-ffmpeg`.")
        self.codec = "h264" if self._h264 is not None else "mp4v"

    def _start_h264(self, fps: float):
        try:
            import imageio_ffmpeg
        except ImportError:
            warnings.warn("imageio-ffmpeg is not installed: writing mp4v, which browsers and Jupyter may not play "
                          "(`pip install imageio-ffmpeg` for H.264).", stacklevel=3)
            return None
        # H.264 4:2:0 needs even sides: an odd side gets one black row/column (padding, not rescaling).
        writer = imageio_ffmpeg.write_frames(str(self.temp_path), self.size, fps=fps, codec="libx264", quality=None,
                                             macro_block_size=1, ffmpeg_log_level="error",
                                             output_params=["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-crf", "23",
                                                            "-preset", "veryfast", "-movflags", "+faststart"])
        try:
            writer.send(None)  # starts ffmpeg
        except (RuntimeError, OSError) as error:
            warnings.warn(f"H.264 encoder unavailable ({error}); writing mp4v instead.", stacklevel=3)
            return None
        return writer

    def write(self, frame_rgb: np.ndarray) -> None:
        """Append one (H, W, 3) uint8 RGB frame of the size given at construction."""
        assert frame_rgb.shape == (self.size[1], self.size[0], 3), f"frame {frame_rgb.shape} != {(self.size[1], self.size[0], 3)}"
        if self._h264 is not None:
            self._h264.send(np.ascontiguousarray(frame_rgb, np.uint8))
        else:
            self._opencv.write(cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR))
        self.frames_written += 1

    def close(self) -> Path:
        """Finish the file and rename it into place; returns the final path."""
        self._finish()
        if self.frames_written == 0:
            self.temp_path.unlink(missing_ok=True)
            raise VideoError(f"no frames were written to {str(self.path)!r}.")
        os.replace(self.temp_path, self.path)
        return self.path

    def abort(self) -> None:
        """Stop and delete the partial file; an earlier file at `path` stays as it was."""
        try:
            self._finish()
        finally:
            self.temp_path.unlink(missing_ok=True)

    def _finish(self) -> None:
        if self._h264 is not None:
            self._h264.close()
            self._h264 = None
        if self._opencv is not None:
            self._opencv.release()
            self._opencv = None

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
