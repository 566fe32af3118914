"""Draw a Segmentation on its image: translucent masks, contours, boxes and labels (OpenCV), plus label maps.

Everything here works on RGB uint8 arrays at the original resolution (`fit_for_display` shrinks an image and its
segmentation for on-screen figures). matplotlib is used only by
`show` / `show_overlay`, which build a figure for inline display and never call plt.show().
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import cv2
import numpy as np

from nbhelpers.seg.types import OVERLAY_ALPHA, FrameDetections, Segmentation, VideoSegmentation

# ----------------------------------------------------------------------------- palette + checks

# Distinct, saturated RGB colours (Tableau-like); instance i uses PALETTE[i % len(PALETTE)].
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
    (170, 110, 40), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 0), (0, 0, 128),
)


def instance_color(index: int) -> tuple[int, int, int]:
    """RGB colour used for instance `index` in overlays and colourised label maps."""
    return PALETTE[index % len(PALETTE)]


def _as_rgb(image_rgb: np.ndarray) -> np.ndarray:
    """The image as (H, W, 3) uint8 (grey and RGBA accepted); ValueError naming the fix otherwise."""
    image = np.asarray(image_rgb)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 RGB, got dtype {image.dtype}. Load it with nbhelpers.seg.inputs.load_image.")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}.")
    return image


def _check_image(image_rgb: np.ndarray, seg: Segmentation) -> np.ndarray:
    """Return the image as (H, W, 3) uint8 (grey and RGBA accepted); raise if it does not match `seg`."""
    image = _as_rgb(image_rgb)
    _check_masks(seg)
    if tuple(image.shape[:2]) != tuple(seg.image_size):
        raise ValueError(
            f"image is {image.shape[:2]} (H, W) but the segmentation was made for {tuple(seg.image_size)}; "
            "draw the segmentation on the image it was computed from."
        )
    return image


def _check_masks(seg: Segmentation) -> None:
    count = len(seg.labels)
    height, width = seg.image_size
    if seg.masks.shape != (count, height, width):
        raise ValueError(f"masks have shape {seg.masks.shape}, expected (N={count}, H={height}, W={width}).")
    if len(seg.boxes) != count or len(seg.scores) != count:
        raise ValueError(f"{count} labels but {len(seg.boxes)} boxes and {len(seg.scores)} scores.")


def _drawing_sizes(height: int, width: int) -> tuple[int, float]:
    """Line thickness and font scale proportional to the image, so tiny and huge images both read well."""
    short_side = min(height, width)
    thickness = max(1, round(short_side / 320))
    font_scale = max(0.3, short_side / 900)
    return thickness, font_scale


# ----------------------------------------------------------------------------- label maps


def instance_map(seg: Segmentation) -> np.ndarray:
    """Label map of the instances.

    Args:
        seg: a Segmentation with N masks.
    Returns:
        (H, W) array: 0 = background, i + 1 = instance i (later instances win where masks overlap);
        uint8 when N <= 255, uint16 otherwise.
    """
    _check_masks(seg)
    count = len(seg.labels)
    if count > np.iinfo(np.uint16).max:
        raise ValueError(f"{count} instances do not fit a 16-bit label map (max 65535).")
    dtype = np.uint8 if count <= np.iinfo(np.uint8).max else np.uint16
    labels = np.zeros(seg.image_size, dtype)
    for index, mask in enumerate(np.asarray(seg.masks, bool)):  # bool: 0/1 ints would index rows
        labels[mask] = index + 1
    return labels


def union_mask(seg: Segmentation) -> np.ndarray:
    """(H, W) uint8 mask: 255 where any instance is, 0 elsewhere."""
    _check_masks(seg)
    if len(seg.labels) == 0:
        return np.zeros(seg.image_size, np.uint8)
    return np.where(np.asarray(seg.masks).any(axis=0), 255, 0).astype(np.uint8)


def colorize_instances(seg: Segmentation) -> np.ndarray:
    """(H, W, 3) uint8 RGB picture of the label map: black background, instance colours as in `overlay`."""
    labels = instance_map(seg)
    lookup = np.zeros((len(seg.labels) + 1, 3), np.uint8)
    for index in range(len(seg.labels)):
        lookup[index + 1] = instance_color(index)
    return lookup[labels]


# ----------------------------------------------------------------------------- overlay


def _caption(label: str, score: float) -> str:
    # Hershey fonts draw ASCII only; anything else would come out as '?' marks.
    text = label.encode("ascii", "replace").decode("ascii")
    return f"{text} {score:.2f}"


def _draw_caption(
    canvas: np.ndarray, text: str, box: np.ndarray, color: tuple[int, int, int], thickness: int, font_scale: float
) -> None:
    """Text on a filled background at the box's top-left corner, kept inside the image."""
    height, width = canvas.shape[:2]
    font = cv2.FONT_HERSHEY_SIMPLEX
    (text_width, text_height), baseline = cv2.getTextSize(text, font, font_scale, thickness)
    pad = max(1, thickness)
    label_height = text_height + baseline + 2 * pad
    left = int(np.clip(box[0], 0, max(0, width - text_width - 2 * pad)))
    top = int(box[1]) - label_height
    if top < 0:  # no room above the box: put the caption just inside it
        top = int(np.clip(box[1], 0, max(0, height - label_height)))
    cv2.rectangle(canvas, (left, top), (left + text_width + 2 * pad, top + label_height), color, thickness=cv2.FILLED)
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    text_color = (0, 0, 0) if luminance > 140 else (255, 255, 255)
    origin = (left + pad, top + pad + text_height)
    cv2.putText(canvas, text, origin, font, font_scale, text_color, thickness, cv2.LINE_AA)


def _blend_mask(canvas: np.ndarray, mask: np.ndarray, color: tuple[int, int, int], alpha: float, thickness: int) -> None:
    """Tint `mask`'s pixels of `canvas` toward `color` and outline it, in place, working only inside its bounding
    box with OpenCV's vectorised ops (on a 6000x4000 photo, boolean fancy indexing took seconds per mask)."""
    mask_u8 = mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8)
    points = cv2.findNonZero(mask_u8)
    if points is None:
        return
    left, top, width, height = cv2.boundingRect(points)
    region, region_mask = canvas[top:top + height, left:left + width], mask_u8[top:top + height, left:left + width]
    tint = np.empty_like(region)
    tint[:] = color
    np.copyto(region, cv2.addWeighted(region, 1.0 - alpha, tint, alpha, 0.0), where=region_mask[:, :, None].astype(bool))
    contours, _ = cv2.findContours(region_mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(left, top))
    cv2.drawContours(canvas, contours, -1, color, thickness, cv2.LINE_AA)


def fit_for_display(image_rgb: np.ndarray, seg: Segmentation, max_side: int = 1600) -> tuple[np.ndarray, Segmentation]:
    """The image and its segmentation shrunk so the longer side is at most `max_side` pixels (unchanged if smaller).

    A notebook shows a figure at screen size: drawing and encoding a 6000x4000 display costs seconds for nothing.
    Saved files keep the full resolution. Returns (image, Segmentation with scaled masks and boxes).
    """
    height, width = image_rgb.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return image_rgb, seg
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # OpenCV wants (width, height)
    small = cv2.resize(image_rgb, size, interpolation=cv2.INTER_AREA)
    masks = np.zeros((len(seg.labels), size[1], size[0]), bool)
    for index, mask in enumerate(np.asarray(seg.masks, bool)):
        masks[index] = cv2.resize(mask.view(np.uint8) * np.uint8(255), size, interpolation=cv2.INTER_AREA) >= 128
    boxes = np.asarray(seg.boxes, np.float32) * np.float32(scale)
    return small, replace(seg, masks=masks, boxes=boxes, image_size=(size[1], size[0]))


def overlay(
    image_rgb: np.ndarray, seg: Segmentation, alpha: float = OVERLAY_ALPHA, draw_boxes: bool = True, draw_labels: bool = True,
    color_indices: Sequence[int] | None = None,
) -> np.ndarray:
    """Draw every instance on a copy of the image.

    Args:
        image_rgb: (H, W, 3) uint8 RGB image the segmentation was computed on.
        seg: the Segmentation to draw.
        alpha: mask opacity in [0, 1].
        draw_boxes: draw each detection box.
        draw_labels: draw "label score" captions on a filled background.
        color_indices: palette index per instance (video: the object id, so colours stay put); None = 0, 1, 2, …
    Returns:
        (H, W, 3) uint8 RGB; pixels outside every mask, contour, box and caption are unchanged.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    canvas = _check_image(image_rgb, seg).copy()
    thickness, _ = _drawing_sizes(*canvas.shape[:2])
    colors = [instance_color(index) for index in (range(len(seg)) if color_indices is None else color_indices)]
    assert len(colors) == len(seg), f"{len(colors)} colour indices for {len(seg)} instances"
    for index, mask in enumerate(np.asarray(seg.masks, bool)):
        _blend_mask(canvas, mask, colors[index], alpha, thickness)
    _draw_boxes(canvas, np.asarray(seg.boxes, np.float32), seg.labels, np.asarray(seg.scores), colors, draw_boxes,
                draw_labels)
    return canvas


def _draw_boxes(canvas: np.ndarray, boxes: np.ndarray, labels: Sequence[str], scores: np.ndarray,
                colors: Sequence[tuple[int, int, int]], draw_boxes: bool = True, draw_labels: bool = True) -> None:
    """Rectangles and "label score" captions on `canvas`, in place."""
    thickness, font_scale = _drawing_sizes(*canvas.shape[:2])
    for index, box in enumerate(boxes):
        if draw_boxes:
            top_left, bottom_right = tuple(int(round(v)) for v in box[:2]), tuple(int(round(v)) for v in box[2:])
            cv2.rectangle(canvas, top_left, bottom_right, colors[index], thickness, cv2.LINE_AA)
        if draw_labels:
            _draw_caption(canvas, _caption(labels[index], float(scores[index])), box, colors[index], thickness, font_scale)


def draw_boxes(image_rgb: np.ndarray, boxes: np.ndarray, labels: Sequence[str], scores: Sequence[float]) -> np.ndarray:
    """Detection boxes with "label score" captions on a copy of the image (no masks): what a detector hands to SAM.

    Args:
        image_rgb: (H, W, 3) uint8 RGB. boxes: (N, 4) xyxy in the image's pixels. labels, scores: N each.
    Returns:
        (H, W, 3) uint8 RGB; box i in `instance_color(i)`, the colour its mask gets in `overlay`.
    """
    canvas = _as_rgb(image_rgb).copy()
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if not len(boxes) == len(labels) == len(scores):
        raise ValueError(f"{len(boxes)} boxes, {len(labels)} labels and {len(scores)} scores: give one of each per box.")
    _draw_boxes(canvas, boxes, labels, np.asarray(scores, np.float32), [instance_color(i) for i in range(len(boxes))])
    return canvas


# ----------------------------------------------------------------------------- matplotlib display


def summary_line(seg: Segmentation) -> str:
    """One line: how many instances, from which backend, in how long, plus the segmentation's message."""
    timings = seg.timings or {}
    total = timings["total"] if "total" in timings else sum(timings.values())
    found = ", ".join(f"{label} {score:.2f}" for label, score in zip(seg.labels, np.asarray(seg.scores).tolist()))
    line = f"{len(seg)} instance(s) for {seg.prompt!r} via {seg.source} in {total:.2f}s"
    line += f": {found}" if found else ""
    return line + (f" | {seg.message}" if seg.message else "")


def show_overlay(overlay_rgb: np.ndarray, seg: Segmentation, title: str | None = None, ax: Any = None) -> Any:
    """Figure with an already-drawn overlay next to the colourised instance map.

    Args:
        overlay_rgb: output of `overlay`.
        seg: the Segmentation it shows (for the mask panel and the caption).
        title: figure title; default is the prompt.
        ax: None (new 1x2 figure), one Axes (overlay only) or two Axes (overlay, masks).
    Returns:
        The matplotlib Figure. It is closed in pyplot so a notebook shows it once, when displayed.
    """
    import matplotlib.pyplot as plt  # imported here: rendering needs no matplotlib

    created = ax is None
    if created:
        height, width = overlay_rgb.shape[:2]
        panel_width = 6.0 * min(2.0, max(0.5, width / max(height, 1)))
        fig, ax = plt.subplots(1, 2, figsize=(2 * panel_width, 6.0))
    axes = list(ax) if isinstance(ax, (Sequence, np.ndarray)) else [ax]
    axes[0].imshow(overlay_rgb)
    axes[0].set_title(f"{len(seg)} instance(s) | {seg.source}", fontsize=10)
    if len(axes) > 1:
        axes[1].imshow(colorize_instances(seg))
        axes[1].set_title("instance masks", fontsize=10)
    for axis in axes:
        axis.axis("off")
    fig = axes[0].figure
    fig.suptitle(title if title is not None else f"prompt: {seg.prompt!r}", fontsize=12)
    if created:
        fig.tight_layout()
        plt.close(fig)  # the inline backend would otherwise display it a second time at cell end
    return fig


def show(image_rgb: np.ndarray, seg: Segmentation, title: str | None = None, ax: Any = None) -> Any:
    """Overlay of `seg` on `image_rgb` side by side with its instance masks; returns the Figure (see `show_overlay`)."""
    return show_overlay(overlay(image_rgb, seg), seg, title=title, ax=ax)


# ----------------------------------------------------------------------------- the pipeline's stages, one figure each


def _single_figure(picture: np.ndarray, title: str, legend: list[tuple[str, tuple[int, int, int]]] | None = None) -> Any:
    """One image in a figure sized to its aspect ratio, with an optional colour legend; closed in pyplot."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    height, width = picture.shape[:2]
    fig, ax = plt.subplots(figsize=(6.0 * min(2.0, max(0.5, width / max(height, 1))), 6.0))
    ax.imshow(picture)
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    if legend:
        ax.legend(handles=[Patch(color=np.asarray(color) / 255, label=text) for text, color in legend],
                  loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    plt.close(fig)  # shown once, when the notebook displays the returned figure
    return fig


def show_boxes(image_rgb: np.ndarray, detections: FrameDetections, title: str | None = None) -> Any:
    """Figure of stage 1: the detector's boxes with their scores (`draw_boxes`), before any mask exists.

    Args:
        image_rgb: the image detected on. detections: its FrameDetections (boxes, scores, labels, source).
    Returns:
        The matplotlib Figure (closed in pyplot; display it once).
    """
    drawn = draw_boxes(image_rgb, detections.boxes, detections.labels, detections.scores)
    default = f"stage 1: {len(detections.labels)} box(es) from {detections.source}"
    return _single_figure(drawn, title if title is not None else default)


def show_masks(seg: Segmentation, title: str | None = None) -> Any:
    """Figure of stage 2: the masks alone (`colorize_instances`), one colour per box of stage 1, with a legend
    giving each mask's label and SAM's predicted IoU (its own estimate of the mask's quality, 0-1)."""
    legend = []
    for index, (label, quality) in enumerate(zip(seg.labels, np.asarray(seg.mask_scores, np.float32).tolist())):
        estimate = "no SAM estimate" if np.isnan(quality) else f"predicted IoU {quality:.2f}"
        legend.append((f"{index + 1}: {label} ({estimate}, {int(seg.masks[index].sum()):,} px)", instance_color(index)))
    default = f"stage 2: {len(seg)} mask(s) from those boxes"
    return _single_figure(colorize_instances(seg), title if title is not None else default, legend)


# ----------------------------------------------------------------------------- video tracks: timeline and table


def track_spans(frames: Sequence[int]) -> list[tuple[int, int]]:
    """Runs of consecutive frame numbers as (first, last) pairs: [0, 1, 2, 5, 6] -> [(0, 2), (5, 6)]."""
    ordered = sorted(set(int(frame) for frame in frames))
    spans: list[tuple[int, int]] = []
    for frame in ordered:
        if spans and frame == spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], frame)
        else:
            spans.append((frame, frame))
    return spans


def _tracks_of(result: VideoSegmentation | dict[str, Any]) -> tuple[list[dict[str, Any]], int, str]:
    """(objects as in tracks.json, frames processed, prompt) from a VideoSegmentation or a loaded tracks.json."""
    if isinstance(result, VideoSegmentation):
        return [track.to_json() for track in result.tracks], result.frames, result.prompt
    if "objects" not in result or "frames" not in result:
        raise ValueError("expected a VideoSegmentation or a tracks.json dict (nbhelpers.seg.video.export.load_tracks).")
    return list(result["objects"]), int(result["frames"]), str(result.get("prompt", ""))


def _timeline_legend(colors: dict[str, np.ndarray]) -> list:
    """Legend entries of `track_timeline`: one bar colour per label, the grey line, the four marks."""
    from matplotlib.lines import Line2D

    legend = [Line2D([], [], color=color, linewidth=6, label=f"{label}: has a mask") for label, color in colors.items()]
    return legend + [Line2D([], [], color="0.75", label="in the session, no mask"),
                     *(Line2D([], [], marker=m, color="black", linestyle="none", label=text) for m, text in
                       (("o", "detected, new id"), ("^", "revived by a detection"), ("x", "forgotten"), (">", "merged")))]


def track_timeline(result: VideoSegmentation | dict[str, Any], title: str | None = None) -> Any:
    """Figure: one row per object id, a bar over every frame it had a mask, coloured by label; a grey line while it
    was in the tracker's session without a mask; o where it was detected and added, ^ where a detection revived it,
    x where it was forgotten, > where it was merged into an older id.

    Args:
        result: what `segment_video` returned, or its tracks.json loaded (`load_tracks`).
    Returns:
        The matplotlib Figure (closed in pyplot). Each bar collection has gid "track-<id>".
    """
    import matplotlib.pyplot as plt

    objects, frames, prompt = _tracks_of(result)
    colors = {label: np.asarray(instance_color(i)) / 255 for i, label in enumerate(dict.fromkeys(o["label"] for o in objects))}
    fig, ax = plt.subplots(figsize=(10.0, 1.2 + 0.45 * max(len(objects), 1)))
    for row, track in enumerate(objects):
        end = track["ended_frame"] if track.get("ended_frame") is not None else frames - 1
        ax.plot([track["first_frame"], end], [row, row], color="0.75", linewidth=1, zorder=1)
        spans = track_spans([entry["frame"] for entry in track["frames"]])
        ax.broken_barh([(first - 0.5, last - first + 1) for first, last in spans], (row - 0.3, 0.6),
                       facecolors=colors[track["label"]], gid=f"track-{track['id']}", zorder=2)
        marks = [("o", [track["first_frame"]])] + [("^", track.get("revived_frames") or [])]
        marks.append({"forgotten": ("x", [end]), "merged": (">", [end])}.get(track.get("state"), ("", [])))
        for marker, at in marks:
            if marker and at:
                ax.plot(at, [row] * len(at), marker, color="black", markersize=6, linestyle="none", zorder=3,
                        gid=f"{marker}-{track['id']}")
        if track.get("state") == "merged":
            ax.annotate(f" into #{track['merged_into']}", (end, row), fontsize=8, va="center")
    ax.set_yticks(range(len(objects)), [f"#{o['id']} {o['label']}" for o in objects])
    ax.set_ylim(len(objects) - 0.5, -0.5)
    ax.set_xlim(-0.5, max(frames, 1) - 0.5)
    ax.set_xlabel(f"processed frame (0-{frames - 1})")
    ax.legend(handles=_timeline_legend(colors), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title(title if title is not None else f"{len(objects)} object id(s) over {frames} frames, prompt {prompt!r}",
                 fontsize=10)
    fig.tight_layout()
    plt.close(fig)
    return fig


def _how_it_ended(track: dict[str, Any], frames: int) -> str:
    """The table's last column: what happened to the object by the last processed frame."""
    state = track.get("state")
    if state == "forgotten":
        text = f"forgotten on frame {track['ended_frame']} (lost longer than FORGET_AFTER_S)"
    elif state == "merged":
        text = f"merged into #{track['merged_into']} on frame {track['ended_frame']} (the same object)"
    elif track.get("last_frame") is None:
        text = "never had a mask (SAM found nothing in its box)"
    elif state == "visible":
        text = "tracked to the end (mask on the last frame)" if track["last_frame"] == frames - 1 else "visible"
    else:
        text = f"lost: no mask since frame {track['lost_since']}"
    merged = track.get("merged_ids") or []
    return text + (f"; took over {', '.join(f'#{i}' for i in merged)}" if merged else "")


def track_table(result: VideoSegmentation | dict[str, Any]) -> str:
    """HTML table of the tracked objects, every column in words a reader can check against the overlay video.

    Args:
        result: a VideoSegmentation or a loaded tracks.json.
    Returns:
        HTML: the table and a one-line key (frame numbers count processed frames); a paragraph when nothing was tracked.
    """
    from html import escape

    objects, frames, _ = _tracks_of(result)
    if not objects:
        message = result.message if isinstance(result, VideoSegmentation) else result.get("message", "")
        return f"<p>No object tracked. {escape(message)}</p>"
    header = ["id", "label", "found by (score)", "added on frame", f"frames with a mask (of {frames})",
              "last frame with a mask", "revived on frames", "at the end"]
    rows = []
    for track in objects:
        cells = [f"#{track['id']}", track["label"], f"{track['source']} ({track['score']:.2f})", track["first_frame"],
                 len(track["frames"]), "never" if track.get("last_frame") is None else track["last_frame"],
                 ", ".join(map(str, track.get("revived_frames") or [])) or "none", _how_it_ended(track, frames)]
        rows.append("<tr>" + "".join(f"<td>{escape(str(cell))}</td>" for cell in cells) + "</tr>")
    key = (f"<p>Frames are processed frames 0-{frames - 1} (source frame = frame x FRAME_STRIDE). A detection "
           "revives a lost object under its own id; a forgotten object has left SAM 2's session.</p>")
    return "<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>" + "".join(rows) + "</table>" + key
