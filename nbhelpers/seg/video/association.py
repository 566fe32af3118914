"""Geometry and appearance measures for matching detections to tracked objects (numpy, scipy's assignment).

identity.py decides who is who with these; they know nothing about tracks.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

FORBIDDEN = 1e6  # cost of a pair that must not be matched


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
        x0, y0, x1, y1 = _pixels(box)
        box_area = max(x1 - x0, 0) * max(y1 - y0, 0)
        for column, (mask, area) in enumerate(zip(masks, areas)):
            inside = int(mask[y0:y1, x0:x1].sum())
            union = area + box_area - inside
            iou[row, column] = inside / union if union else 0.0
    return iou


def box_coverage(mask: np.ndarray, box: np.ndarray) -> float:
    """Fraction of the box's pixels that the mask covers."""
    x0, y0, x1, y1 = _pixels(np.asarray(box, np.float64))
    area = max(x1 - x0, 0) * max(y1 - y0, 0)
    return int(mask[y0:y1, x0:x1].sum()) / area if area else 0.0


def box_iou(first: np.ndarray, second: np.ndarray) -> float:
    """IoU of two xyxy boxes."""
    x0, y0 = np.maximum(first[:2], second[:2])
    x1, y1 = np.minimum(first[2:], second[2:])
    inter = max(x1 - x0, 0.0) * max(y1 - y0, 0.0)
    union = _area(first) + _area(second) - inter
    return float(inter / union) if union > 0 else 0.0


def centre(box: np.ndarray | list[int]) -> np.ndarray:
    """(x, y) centre of an xyxy box."""
    box = np.asarray(box, np.float64)
    return (box[:2] + box[2:]) / 2


def distance_to_segment(point: np.ndarray, start: np.ndarray, end: np.ndarray) -> float:
    """Distance (px) from a point to the segment start-end (the way an object may have gone)."""
    along = end - start
    length = float(along @ along)
    t = 0.0 if length == 0 else float(np.clip((point - start) @ along / length, 0.0, 1.0))
    return float(np.hypot(*(point - start - t * along)))


def middle_masks(boxes: np.ndarray, size: tuple[int, int], fraction: float) -> np.ndarray:
    """(D, H, W) bool: the middle `fraction` of each box's width and height (at least one pixel), where a detected
    object's pixels are, with less of the background its box corners hold."""
    masks = np.zeros((len(boxes), *size), bool)
    for row, box in enumerate(np.asarray(boxes, np.float64)):
        middle, half = centre(box), np.maximum((box[2:] - box[:2]) * fraction / 2, 0.5)
        x0, y0 = np.floor(middle - half).astype(int).clip(0)
        x1, y1 = np.ceil(middle + half).astype(int)
        masks[row, y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)] = True
    return masks


def assign(cost: np.ndarray) -> list[tuple[int, int]]:
    """Minimum-cost one-to-one matching (Hungarian, scipy); entries >= the forbidden cost are never matched.

    Args:
        cost: (rows, columns) float, FORBIDDEN where a pair is not allowed.
    Returns:
        matched (row, column) pairs.
    """
    if not cost.size:
        return []
    rows, columns = linear_sum_assignment(np.minimum(cost, FORBIDDEN))
    return [(int(r), int(c)) for r, c in zip(rows, columns) if cost[r, c] < FORBIDDEN]




def _pixels(box: np.ndarray) -> tuple[int, int, int, int]:
    x0, y0 = np.floor(box[:2]).astype(int).clip(0)
    x1, y1 = np.ceil(box[2:]).astype(int).clip(0)  # a box shifted past the top or left edge: no negative slice ends
    return int(x0), int(y0), int(x1), int(y1)


def _area(box: np.ndarray) -> float:
    return float(max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0))
