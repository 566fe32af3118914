"""Draw a Segmentation on its image: translucent masks, contours, boxes and labels (OpenCV), plus label maps.

Everything here works on RGB uint8 arrays at the original resolution. matplotlib is used only by
`show` / `show_overlay`, which build a figure for inline display and never call plt.show().
"""
from __future__ import annotations

from typing import Any, Sequence

import cv2
import numpy as np

from nbhelpers.seg.types import Segmentation

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


def _check_image(image_rgb: np.ndarray, seg: Segmentation) -> np.ndarray:
    """Return the image as (H, W, 3) uint8 (grey and RGBA accepted); raise if it does not match `seg`."""
    image = np.asarray(image_rgb)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 RGB, got dtype {image.dtype}. Load it with nbhelpers.seg.inputs.load_image.")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}.")
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


def overlay(
    image_rgb: np.ndarray, seg: Segmentation, alpha: float = 0.5, draw_boxes: bool = True, draw_labels: bool = True,
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
    thickness, font_scale = _drawing_sizes(*canvas.shape[:2])
    colors = [instance_color(index) for index in (range(len(seg)) if color_indices is None else color_indices)]
    assert len(colors) == len(seg), f"{len(colors)} colour indices for {len(seg)} instances"
    for index, mask in enumerate(np.asarray(seg.masks, bool)):
        color = colors[index]
        blended = canvas[mask].astype(np.float32) * (1.0 - alpha) + np.float32(alpha) * np.array(color, np.float32)
        canvas[mask] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, color, thickness, cv2.LINE_AA)
    for index, box in enumerate(np.asarray(seg.boxes, np.float32)):
        color = colors[index]
        if draw_boxes:
            top_left, bottom_right = tuple(int(round(v)) for v in box[:2]), tuple(int(round(v)) for v in box[2:])
            cv2.rectangle(canvas, top_left, bottom_right, color, thickness, cv2.LINE_AA)
        if draw_labels:
            _draw_caption(canvas, _caption(seg.labels[index], float(seg.scores[index])), box, color, thickness, font_scale)
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
