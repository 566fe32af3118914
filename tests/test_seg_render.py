"""Overlay drawing, label maps and the matplotlib figure, on hand-made Segmentation objects."""
from __future__ import annotations

import cv2
import matplotlib

matplotlib.use("Agg")  # headless test run

import numpy as np
import pytest

from nbhelpers.seg.types import Segmentation
from nbhelpers.seg.render import (
    PALETTE, colorize_instances, instance_color, instance_map, overlay, show, summary_line, union_mask,
)


def make_seg(masks: np.ndarray, labels: list[str] | None = None, boxes: np.ndarray | None = None) -> Segmentation:
    """A Segmentation whose boxes are the masks' bounding boxes unless given."""
    masks = np.asarray(masks, bool)
    count, height, width = masks.shape
    if boxes is None:
        boxes = np.zeros((count, 4), np.float32)
        for index, mask in enumerate(masks):
            ys, xs = np.nonzero(mask)
            if len(xs):
                boxes[index] = (xs.min(), ys.min(), xs.max(), ys.max())
    labels = labels if labels is not None else [f"thing{index}" for index in range(count)]
    scores = np.linspace(0.9, 0.5, count).astype(np.float32)
    return Segmentation(np.asarray(boxes, np.float32), scores, labels, masks, np.full(count, 0.8, np.float32),
                        "grounding-dino", (height, width), "thing.", {"detect": 0.1, "segment": 0.2})


def rect_mask(height: int, width: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[top:bottom, left:right] = True
    return mask


def noise_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- overlay


def test_mask_interior_moves_toward_instance_colour() -> None:
    image = noise_image(200, 300)
    seg = make_seg(rect_mask(200, 300, 60, 80, 160, 220)[None])
    drawn = overlay(image, seg, alpha=0.5)
    interior = rect_mask(200, 300, 70, 90, 150, 210)  # away from the contour, box and caption
    color = np.array(instance_color(0), np.float32)
    before = np.abs(image[interior].astype(np.float32) - color).sum(axis=1)
    after = np.abs(drawn[interior].astype(np.float32) - color).sum(axis=1)
    assert (after <= before).all() and (after < before).mean() > 0.99
    expected = np.rint(image[interior].astype(np.float32) * 0.5 + color * 0.5)
    assert np.abs(drawn[interior].astype(np.float32) - expected).max() <= 1


def test_pixels_outside_masks_boxes_and_text_are_unchanged() -> None:
    image = noise_image(240, 320, seed=1)
    masks = np.stack([rect_mask(240, 320, 30, 20, 90, 110), rect_mask(240, 320, 50, 60, 120, 140)])
    seg = make_seg(masks)
    plain = overlay(image, seg, draw_boxes=False, draw_labels=False)
    near_masks = cv2.dilate(masks.any(0).astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    assert np.array_equal(plain[~near_masks], image[~near_masks])
    full = overlay(image, seg)
    assert np.array_equal(full[160:, :], image[160:, :])  # far below every box and caption
    assert np.array_equal(full[:, 200:], image[:, 200:])
    assert not np.array_equal(full[:160, :200], image[:160, :200])


def test_caption_has_filled_background_in_instance_colour() -> None:
    image = np.full((200, 300, 3), 128, np.uint8)
    seg = make_seg(rect_mask(200, 300, 100, 100, 180, 250)[None], labels=["car"])
    no_label = overlay(image, seg, draw_labels=False)
    labelled = overlay(image, seg, draw_labels=True)
    caption = (labelled != no_label).any(axis=2)
    ys, _ = np.nonzero(caption)
    assert ys.max() < 100 + 2  # the caption sits above the box, where there is room
    assert (labelled[caption] == instance_color(0)).all(axis=1).sum() > 50  # filled background


def test_overlay_rejects_mismatched_image_and_bad_alpha() -> None:
    seg = make_seg(rect_mask(50, 60, 10, 10, 20, 20)[None])
    with pytest.raises(ValueError, match="computed from"):
        overlay(np.zeros((60, 50, 3), np.uint8), seg)
    with pytest.raises(ValueError, match="uint8"):
        overlay(np.zeros((50, 60, 3), np.float32), seg)
    with pytest.raises(ValueError, match="alpha"):
        overlay(np.zeros((50, 60, 3), np.uint8), seg, alpha=1.5)


def test_grey_image_and_non_ascii_labels_are_drawn() -> None:
    grey = np.full((64, 64), 90, np.uint8)
    seg = make_seg(rect_mask(64, 64, 20, 20, 50, 50)[None], labels=["chat noir \u00e9t\u00e9"])
    drawn = overlay(grey, seg)
    assert drawn.shape == (64, 64, 3) and (drawn != 90).any()


def test_line_width_scales_with_image_size() -> None:
    def box_edge_width(height: int, width: int) -> int:
        empty = np.zeros((1, height, width), bool)
        box = np.array([[width * 0.25, height * 0.5, width * 0.75, height * 0.9]], np.float32)
        seg = make_seg(empty, boxes=box)
        drawn = overlay(np.zeros((height, width, 3), np.uint8), seg, draw_labels=False)
        column = drawn[:, width // 2].any(axis=1)
        top = int(height * 0.5)
        return int(column[top - height // 10: top + height // 10].sum())

    tiny, large = box_edge_width(20, 30), box_edge_width(3000, 4000)
    assert 1 <= tiny <= 3
    assert large >= 8, "a 3000x4000 image needs thicker lines to stay visible"


@pytest.mark.parametrize("height,width", [(20, 30), (3000, 4000)])
def test_tiny_and_huge_images(height: int, width: int) -> None:
    image = noise_image(height, width, seed=2)
    masks = np.stack([rect_mask(height, width, height // 4, width // 4, height // 2, width // 2),
                      rect_mask(height, width, height // 3, width // 3, height - 1, width - 1)])
    seg = make_seg(masks, labels=["cat", "dog"])
    drawn = overlay(image, seg)
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    assert not np.array_equal(drawn, image)
    assert instance_map(seg).shape == (height, width) and union_mask(seg).shape == (height, width)


# ----------------------------------------------------------------------------- label maps


def test_instance_map_values_and_overlap_order() -> None:
    first, second = rect_mask(40, 50, 0, 0, 20, 30), rect_mask(40, 50, 10, 20, 40, 50)
    labels = instance_map(make_seg(np.stack([first, second])))
    assert labels.dtype == np.uint8 and labels.shape == (40, 50)
    assert labels[5, 5] == 1 and labels[35, 45] == 2 and labels[15, 25] == 2  # later instance wins the overlap
    assert labels[35, 5] == 0
    reversed_labels = instance_map(make_seg(np.stack([second, first])))
    assert reversed_labels[15, 25] == 2 and reversed_labels[35, 45] == 1


def test_instance_map_switches_to_uint16_above_255_instances() -> None:
    masks = np.zeros((300, 20, 20), bool)
    for index in range(300):
        masks[index].flat[index] = True
    labels = instance_map(make_seg(masks))
    assert labels.dtype == np.uint16 and labels.max() == 300 and labels.flat[299] == 300


def test_union_mask_and_empty_segmentation() -> None:
    masks = np.stack([rect_mask(30, 40, 0, 0, 10, 10), rect_mask(30, 40, 20, 20, 30, 40)])
    union = union_mask(make_seg(masks))
    assert union.dtype == np.uint8 and set(np.unique(union)) == {0, 255}
    assert np.array_equal(union == 255, masks.any(axis=0))
    empty = Segmentation.empty((30, 40), "cat.", "nothing found")
    assert union_mask(empty).shape == (30, 40) and not union_mask(empty).any()
    assert not instance_map(empty).any()
    image = noise_image(30, 40)
    assert np.array_equal(overlay(image, empty), image)


def test_colorized_instances_use_the_palette() -> None:
    masks = np.stack([rect_mask(10, 10, 0, 0, 5, 5), rect_mask(10, 10, 5, 5, 10, 10)])
    picture = colorize_instances(make_seg(masks))
    assert tuple(picture[0, 0]) == PALETTE[0] and tuple(picture[9, 9]) == PALETTE[1] and tuple(picture[0, 9]) == (0, 0, 0)


# ----------------------------------------------------------------------------- figure


def test_show_returns_a_two_panel_figure_and_accepts_axes() -> None:
    import matplotlib.pyplot as plt

    image = noise_image(60, 80)
    seg = make_seg(rect_mask(60, 80, 10, 10, 40, 50)[None], labels=["cat"])
    figure = show(image, seg, title="demo")
    assert len(figure.axes) == 2 and figure.get_suptitle() == "demo"
    assert not plt.fignum_exists(figure.number), "show() must not leave the figure open for a second inline display"
    own_figure, own_axis = plt.subplots()
    assert show(image, seg, ax=own_axis) is own_figure
    plt.close(own_figure)


def test_summary_line_mentions_count_source_and_message() -> None:
    seg = make_seg(rect_mask(20, 20, 0, 0, 5, 5)[None], labels=["cat"])
    line = summary_line(seg)
    assert line.startswith("1 instance(s)") and "grounding-dino" in line and "cat 0.90" in line and "0.30s" in line
    assert "nothing found" in summary_line(Segmentation.empty((5, 5), "cat.", "nothing found"))
    seg.timings = {"detect": 1.0, "segment": 2.0, "total": 3.0}  # a recorded total is not added twice
    assert "in 3.00s" in summary_line(seg)
