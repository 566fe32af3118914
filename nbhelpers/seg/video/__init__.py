"""Text-prompted video segmentation: detect the prompt's objects, follow them through the video, write an overlay.

    loop.py           segment_with: the loop every backend shares (frames, offload retry, outputs, the result) and
                      the one description of tracks.json's keys
    segment.py        segment_video: GroundingDINO + SAM 2 (Sam2VideoAdapter: detection, tracking, identities)
    sam3_tracking.py  segment_video_sam3: SAM 3's streaming session (Sam3VideoAdapter)
    identity.py       who is who for SAM 2 (new, revived, forgotten, merged objects); association.py, motion.py
    tracking.py       StreamingTracker: SAM 2 propagation with its state pruned to the memory window
    io.py             probe_video / iter_frames (OpenCV, ffmpeg fallback) and VideoWriter (H.264, mp4v fallback)
    overlap.py        the reader and writer threads that overlap decoding and encoding with the model
    export.py         tracks.json and the per-frame object-id PNGs

The records it returns (VideoSegmentation, Track, FrameDetections, FrameMasks) are in nbhelpers.seg.types.
"""
from nbhelpers.seg.types import FrameDetections, Track, VideoSegmentation
from nbhelpers.seg.video.export import load_tracks
from nbhelpers.seg.video.io import VideoError, is_video_file, probe_video
from nbhelpers.seg.video.loop import VideoOutOfMemoryError
from nbhelpers.seg.video.segment import Detector, segment_video

__all__ = ["Detector", "FrameDetections", "Track", "VideoError", "VideoOutOfMemoryError", "VideoSegmentation",
           "is_video_file", "load_tracks", "probe_video", "segment_video"]
