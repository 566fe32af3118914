"""Overlay drawing, label maps and the matplotlib figure, on hand-made Segmentation objects."""
from __future__ import annotations

import cv2
import matplotlib

matplotlib.use("Agg")  # headless test run

import numpy as np
import pytest

from nbhelpers.seg.types import Segmentation
from nbhelpers.seg.render import (
    PALETTE, colorize_instances, draw_boxes, fit_for_display, instance_color, instance_map, overlay, show, summary_line, union_mask,
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


def test_fit_for_display_scales_image_masks_and_boxes_together() -> None:
    image = noise_image(400, 600)
    seg = make_seg(np.stack([rect_mask(400, 600, 100, 200, 300, 400), np.zeros((400, 600), bool)]))
    small, small_seg = fit_for_display(image, seg, max_side=150)
    assert small.shape == (100, 150, 3) and small_seg.masks.shape == (2, 100, 150) and small_seg.image_size == (100, 150)
    assert small_seg.masks[0].sum() == 50 * 50 and small_seg.masks[0][25:75, 50:100].all() and not small_seg.masks[1].any()
    assert np.allclose(small_seg.boxes[0], np.asarray(seg.boxes[0]) / 4)
    assert small_seg.labels == seg.labels and seg.masks.shape == (2, 400, 600)  # the original is untouched
    overlay(small, small_seg)  # consistent: drawable as is
    same, same_seg = fit_for_display(image, seg, max_side=600)
    assert same is image and same_seg is seg  # already small enough


# ----------------------------------------------------------------------------- the pipeline's stages


def test_draw_boxes_outlines_each_box_where_given_in_its_instance_colour() -> None:
    image = np.zeros((400, 600, 3), np.uint8)
    boxes = np.array([[100, 120, 300, 280], [400, 40, 560, 360]], np.float32)
    drawn = draw_boxes(image, boxes, ["car", "sun"], [0.91, 0.4])

    def has(color, rows, cols) -> bool:  # the patch's brightest pixel is the colour at >= 80% (lines are anti-aliased)
        patch = drawn[rows, cols].reshape(-1, 3).astype(float)
        pixel, color = patch[patch.sum(axis=1).argmax()], np.asarray(color, float)
        return pixel.sum() >= 0.8 * color.sum() and np.allclose(pixel / pixel.sum(), color / color.sum(), atol=0.03)

    for index, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        color, middle_y, middle_x = instance_color(index), (y0 + y1) // 2, (x0 + x1) // 2
        assert has(color, middle_y, slice(x0 - 1, x0 + 2)) and has(color, middle_y, slice(x1 - 1, x1 + 2))  # sides
        assert has(color, slice(y1 - 1, y1 + 2), middle_x)  # bottom edge
        assert not drawn[y0 + 5 : y1 - 5, x0 + 5 : x1 - 5].any()  # inside: untouched (no mask at this stage)
    assert (drawn[90:120, 100:300] != 0).any()  # the first box's "car 0.91" caption sits above it
    assert not drawn[300:400, 0:80].any() and not image.any()  # elsewhere untouched; the input is not drawn on
    with pytest.raises(ValueError, match="one of each per box"):
        draw_boxes(image, boxes, ["car"], [0.9, 0.4])


def test_stage_figures_show_the_boxes_then_the_masks_alone() -> None:
    from nbhelpers.seg.render import show_boxes, show_masks
    from nbhelpers.seg.types import FrameDetections

    image = noise_image(120, 160)
    seg = make_seg(np.stack([rect_mask(120, 160, 10, 10, 50, 60), rect_mask(120, 160, 60, 80, 110, 150)]), ["car", "sun"])
    seg.mask_scores = np.array([0.93, np.nan], np.float32)
    detections = FrameDetections(seg.boxes, seg.scores, seg.labels, "grounding-dino")
    boxes_figure = show_boxes(image, detections)
    assert np.array_equal(boxes_figure.axes[0].images[0].get_array(), draw_boxes(image, seg.boxes, seg.labels, seg.scores))
    assert "2 box(es) from grounding-dino" in boxes_figure.axes[0].get_title()
    masks_figure = show_masks(seg)
    assert np.array_equal(masks_figure.axes[0].images[0].get_array(), colorize_instances(seg))
    legend = [text.get_text() for text in masks_figure.axes[0].get_legend().get_texts()]
    assert legend == ["1: car (predicted IoU 0.93, 2,000 px)", "2: sun (no SAM estimate, 3,500 px)"]


def test_run_stages_prompts_sam_with_exactly_the_detected_boxes(tiny_seg_models) -> None:
    """The walkthrough's stages are the pipeline's: its boxes are the detect step's and its masks equal what
    segment_image returns for the same image (SAM 2.1 prompted with those boxes)."""
    from nbhelpers.seg.backends import as_backend
    from nbhelpers.seg.image import segment_image
    from nbhelpers.seg.stages import run_stages
    from nbhelpers.seg.types import DetectionSettings
    from nbhelpers.testing import make_test_image

    image, settings = make_test_image(), DetectionSettings(box_threshold=0.0, text_threshold=0.0, max_detections=3)
    stages = run_stages(image, "a cat. a remote", tiny_seg_models, settings, name="test.png")
    detected = as_backend(tiny_seg_models).detect(image, ["a cat", "a remote"], settings)
    assert len(stages.detections.boxes) == 3 and np.array_equal(stages.detections.boxes, detected.boxes)
    whole = segment_image(image, "a cat. a remote", tiny_seg_models, settings)
    assert stages.segmentation.source == whole.source == "grounding-dino"
    assert np.array_equal(stages.segmentation.boxes, whole.boxes) and stages.segmentation.labels == whole.labels
    assert np.array_equal(stages.segmentation.masks, whole.masks)
    assert set(stages.seconds) == {"detect", "masks"} and stages.name == "test.png"


# ----------------------------------------------------------------------------- video tracks


def make_video_result(frames: int = 10):
    """Three objects: #1 seen on 0-3 and, revived, on 6-9; #2 added on 2, never given a mask, forgotten on 5;
    #3 added on 4, seen 4-7, merged into #1 on 8."""
    from nbhelpers.seg.types import Track, VideoSegmentation

    mask = rect_mask(40, 60, 5, 5, 20, 30)
    first, second, third = Track(1, "car", 0.9, "grounding-dino", 0), Track(2, "cat", 0.5, "clipseg-fallback", 2), \
        Track(3, "car", 0.7, "grounding-dino", 4)
    for frame in range(frames):
        first.record(frame, mask if frame < 4 or frame >= 6 else None)
        if 2 <= frame < 5:
            second.record(frame, None)
        if 4 <= frame < 8:
            third.record(frame, mask)
    first.revived_frames, first.merged_ids = [6], [3]
    second.end(5, "forgotten")
    third.end(8, "merged", merged_into=1)
    return VideoSegmentation("clip.mp4", "car. cat.", frames, (40, 60), 12.0, 12.0, [first, second, third], 0, "h264",
                             "3 object(s) tracked")


def bar_frames(figure, gid: str) -> set[int]:
    """Frames whose centre lies inside the bars of the collection with this gid."""
    (bars,) = [c for c in figure.axes[0].collections if c.get_gid() == gid]
    spans = [(path.vertices[:, 0].min(), path.vertices[:, 0].max()) for path in bars.get_paths()]
    return {frame for frame in range(-5, 50) if any(low < frame < high for low, high in spans)}


def marker_frames(figure, gid: str) -> list[float]:
    return [x for line in figure.axes[0].lines if line.get_gid() == gid for x in line.get_xdata()]


def test_track_spans_groups_consecutive_frames() -> None:
    from nbhelpers.seg.render import track_spans

    assert track_spans([5, 0, 1, 2, 6, 6, 9]) == [(0, 2), (5, 6), (9, 9)] and track_spans([]) == []


def test_track_timeline_marks_the_frames_with_a_mask_revivals_and_endings() -> None:
    from nbhelpers.seg.render import track_timeline

    result = make_video_result()
    for source in (result, {"frames": result.frames, "prompt": result.prompt, "objects": [t.to_json() for t in result.tracks]}):
        figure = track_timeline(source)
        assert bar_frames(figure, "track-1") == {0, 1, 2, 3, 6, 7, 8, 9}
        assert bar_frames(figure, "track-2") == set() and bar_frames(figure, "track-3") == {4, 5, 6, 7}
        assert marker_frames(figure, "^-1") == [6] and marker_frames(figure, "x-2") == [5]
        assert marker_frames(figure, ">-3") == [8] and marker_frames(figure, "o-3") == [4]
        assert [label.get_text() for label in figure.axes[0].get_yticklabels()] == ["#1 car", "#2 cat", "#3 car"]
        bars = {c.get_gid(): c.get_facecolor()[0][:3] for c in figure.axes[0].collections if c.get_gid()}
        assert np.allclose(bars["track-1"], bars["track-3"]) and not np.allclose(bars["track-1"], bars["track-2"])


def test_track_table_says_in_words_what_each_object_did() -> None:
    from nbhelpers.seg.render import track_table

    html = track_table(make_video_result())
    rows = [[cell for cell in row.split("</td><td>")] for row in html.split("<tr><td>")[1:]]
    assert [row[:2] for row in rows] == [["#1", "car"], ["#2", "cat"], ["#3", "car"]]
    first, second, third = rows
    assert first[4:7] == ["8", "9", "6"] and "tracked to the end" in first[7] and "took over #3" in first[7]
    assert second[2] == "clipseg-fallback (0.50)" and second[4:7] == ["0", "never", "none"]
    assert "forgotten on frame 5" in second[7]
    assert third[5] == "7" and "merged into #1 on frame 8" in third[7]
    assert "None" not in html and "frames with a mask (of 10)" in html
    assert "No object tracked" in track_table({"frames": 3, "objects": [], "message": "nothing found"})
