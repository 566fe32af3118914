"""segment_image / segment_images, prompts, CLIPSeg regions and image loading, on tiny random models."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from nbhelpers.seg import backends
from nbhelpers.seg.backends import StageClock, clipseg_map_to_boxes, per_label_nms
from nbhelpers.seg.image import segment_image, segment_images
from nbhelpers.seg.inputs import load_image, normalize_prompt, prompt_phrases
from nbhelpers.seg.types import TIMING_STAGES, DetectionSettings, Detections, Segmentation
from nbhelpers.testing import make_test_image

# ----------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("prompt, expected", [
    ("cat, dog", "cat. dog."),
    (["cat", "dog"], "cat. dog."),
    ("Cat. dog", "cat. dog."),
    ("  A Cat .  a   remote.  ", "a cat. a remote."),
    ("cat;dog\nperson", "cat. dog. person."),
    ("cat. cat. Cat", "cat."),
    (("Red car",), "red car."),
])
def test_normalize_prompt(prompt, expected: str) -> None:
    assert normalize_prompt(prompt) == expected


@pytest.mark.parametrize("prompt", ["", "   ", " . , ", [], ["  ", "."]])
def test_empty_prompt_names_the_fix(prompt) -> None:
    with pytest.raises(ValueError, match="name at least one object"):
        prompt_phrases(prompt)


def test_long_prompt_is_truncated_with_a_warning(tiny_seg_models, capsys) -> None:
    words = ["cat", "dog", "remote", "person", "car", "tree", "sky", "photo", "shape", "thing", "object", "disc"]
    prompt = ", ".join(f"a red {word}" for word in words)  # 12 phrases, ~50 tokens > 32
    result = segment_image(make_test_image(48, 64), prompt, tiny_seg_models)
    warning = capsys.readouterr().err.strip()
    assert warning.startswith("warning: prompt cut") and "GroundingDINO 32 tokens in all" in warning
    assert "\n" not in warning, "one line"
    assert ".py" not in warning, "no internal file path or line in what the user reads"
    tokenizer = tiny_seg_models.dino.processor.tokenizer
    assert len(tokenizer(result.prompt)["input_ids"]) <= 32
    assert result.prompt.startswith("a red cat. a red dog.") and "a red disc" not in result.prompt


def _one_warning(err: str) -> str:
    """The run's single stderr line, which must be the prompt warning (no transformers warning beside it)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: prompt cut to what the models read"), err
    return lines[0]


def test_one_long_word_is_cut_to_groundingdino_limit(tiny_seg_models, capsys) -> None:
    word = "abcdefghij" * 5  # one word of 50 WordPiece tokens: more than the tiny GroundingDINO's 32
    result = segment_image(make_test_image(48, 64), word, tiny_seg_models, DetectionSettings(box_threshold=0.0))
    assert "GroundingDINO 32 tokens in all" in _one_warning(capsys.readouterr().err)
    tokenizer = tiny_seg_models.dino.processor.tokenizer
    assert len(tokenizer(result.prompt)["input_ids"]) <= 32 and word.startswith(result.prompt.rstrip("."))
    assert len(result) and all(word.startswith(label) for label in result.labels)


def test_a_10000_character_word_reaches_clipseg_cut_to_its_limit(tiny_seg_models, capsys, monkeypatch) -> None:
    from nbhelpers.seg.inference import clipseg_probabilities

    # A tokenizer config without model_max_length (the tiny one has 77): only the model's 77 positions bound it.
    monkeypatch.setattr(tiny_seg_models.clipseg.processor.tokenizer, "model_max_length", int(1e30))
    word = "a" * 10_000
    result = segment_image(make_test_image(48, 64), word, tiny_seg_models, DetectionSettings(box_threshold=1.0))
    assert result.source in ("clipseg-fallback", "none")  # GroundingDINO finds nothing: CLIPSeg ran
    assert "CLIPSeg 77 tokens per phrase" in _one_warning(capsys.readouterr().err)
    picture = Image.fromarray(make_test_image(48, 64))
    assert clipseg_probabilities(tiny_seg_models.clipseg, picture, [word]).shape == (1, 48, 64)  # called directly too


def test_non_ascii_prompt_runs(tiny_seg_models) -> None:
    result = segment_image(make_test_image(48, 64), "chat noir é, 猫, 🐱", tiny_seg_models, settings=DetectionSettings(box_threshold=0.05))
    assert result.prompt == "chat noir é. 猫. 🐱."
    assert set(result.labels) <= {"chat noir é", "猫", "🐱"}


# ----------------------------------------------------------------------------- pipeline


def _box_inside(boxes: np.ndarray, height: int, width: int) -> bool:
    return bool((boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all() and (boxes[:, 2] <= width).all()
                and (boxes[:, 3] <= height).all() and (boxes[:, 0] <= boxes[:, 2]).all() and (boxes[:, 1] <= boxes[:, 3]).all())


def test_detection_path_on_non_square_image(tiny_seg_models) -> None:
    height, width = 90, 210
    result = segment_image(make_test_image(height, width), "a cat. the dog", tiny_seg_models, settings=DetectionSettings(box_threshold=0.05, text_threshold=0.0))
    assert result.source == "grounding-dino" and len(result) > 0
    assert result.image_size == (height, width)
    assert result.masks.shape == (len(result), height, width) and result.masks.dtype == bool
    assert result.boxes.shape == (len(result), 4) and _box_inside(result.boxes, height, width)
    assert set(result.labels) <= {"a cat", "the dog"}
    assert result.mask_scores.shape == (len(result),) and np.isfinite(result.mask_scores).all()
    assert list(result.timings) == list(TIMING_STAGES)  # exactly the documented stages
    assert all(seconds >= 0 for seconds in result.timings.values())
    assert result.timings["total"] == pytest.approx(sum(v for k, v in result.timings.items() if k != "total"))
    assert result.backend == "grounding-dino+sam2"
    assert result.timings["fallback"] == 0.0  # GroundingDINO found boxes: no fallback ran


def test_large_image_runs_at_model_size_with_outputs_at_original_size(tiny_seg_models, monkeypatch) -> None:
    from nbhelpers.seg import inference

    monkeypatch.setattr(inference, "MAX_UPSAMPLE_BYTES", 32 * 2**20)  # several upsampling chunks for this image
    height, width = 1500, 2400
    result = segment_image(make_test_image(height, width), "a cat", tiny_seg_models, settings=DetectionSettings(box_threshold=0.05))
    assert len(result) > 2 and result.masks.shape == (len(result), height, width) and result.masks.dtype == bool
    assert _box_inside(result.boxes, height, width) and result.boxes[:, 2].max() > 96  # not the model's input scale


def test_per_label_nms() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.5, 0.9, 0.7, 0.4], np.float32)
    phrases = np.array([0, 0, 1, 0])  # boxes 0 and 1 overlap (IoU 0.81) with the same phrase
    kept = per_label_nms(Detections(boxes, scores, phrases), iou=0.5)
    np.testing.assert_array_equal(kept.scores, scores[[1, 2, 3]])  # box 0 suppressed by box 1, other phrase kept
    np.testing.assert_array_equal(kept.phrase_index, [0, 1, 0])
    assert len(per_label_nms(Detections(boxes, scores, phrases), iou=0.9).boxes) == 4


def _max_same_label_overlap(result: Segmentation) -> tuple[int, float]:
    """(most boxes sharing one label, highest IoU between two different boxes of one label)."""
    most, worst = 0, 0.0
    for label in set(result.labels):
        rows = [i for i, name in enumerate(result.labels) if name == label]
        overlaps = box_iou(torch.from_numpy(result.boxes[rows]), torch.from_numpy(result.boxes[rows]))
        most, worst = max(most, len(rows)), max(worst, float((overlaps - torch.eye(len(rows))).max()))
    return most, worst


def test_pipeline_output_respects_nms(tiny_seg_models) -> None:
    # The tiny random detector gives small boxes that barely overlap (IoU 0.034 at most for this image and
    # prompt), so NMS is tested at an IoU of 0.02: without NMS the result would have such a pair.
    image, iou = make_test_image(80, 120), 0.02
    unsuppressed = segment_image(image, "a cat", tiny_seg_models, settings=DetectionSettings(box_threshold=0.05, text_threshold=0.0, nms_iou=1.0))
    assert _max_same_label_overlap(unsuppressed)[1] > iou
    result = segment_image(image, "a cat", tiny_seg_models, settings=DetectionSettings(box_threshold=0.05, text_threshold=0.0, nms_iou=iou))
    most, worst = _max_same_label_overlap(result)
    assert most >= 2, "need two boxes with one label for the overlap check to mean anything"
    assert worst <= iou + 1e-6 and 0 < len(result) < len(unsuppressed)


def test_max_detections_keeps_the_highest_scores(tiny_seg_models) -> None:
    image = make_test_image(80, 120)
    everything = segment_images([image], "a cat", tiny_seg_models, progress=False, settings=DetectionSettings(box_threshold=0.0, text_threshold=0.0))[0][1]
    assert len(everything) > 3, "need more boxes than the cap for the check to mean anything"
    capped = segment_images([image], "a cat", tiny_seg_models, progress=False, settings=DetectionSettings(box_threshold=0.0, text_threshold=0.0, max_detections=3))[0][1]
    np.testing.assert_allclose(np.sort(capped.scores), np.sort(everything.scores)[-3:])
    assert capped.masks.shape == (3, 80, 120)


def test_fallback_to_clipseg_when_dino_finds_nothing(tiny_seg_models) -> None:
    # Random weights: a CLIPSeg threshold of 0 makes every pixel (sigmoid > 0) one region, so the fallback
    # deterministically finds something; box_threshold=1.0 can never be exceeded by a sigmoid score.
    height, width = 60, 100
    result = segment_image(make_test_image(height, width), "a cat, a dog", tiny_seg_models, settings=DetectionSettings(box_threshold=1.0, clipseg_threshold=0.0))
    assert result.source == "clipseg-fallback"
    assert result.labels == ["a cat", "a dog"]
    np.testing.assert_array_equal(result.boxes, [[0, 0, width, height]] * 2)
    assert result.masks.shape == (2, height, width) and result.masks.dtype == bool
    assert ((result.scores > 0) & (result.scores <= 1)).all()
    assert result.timings["fallback"] > 0 and "CLIPSeg found 2 region(s)" in result.message


def test_fallback_keeps_clipseg_region_where_sam_mask_is_empty(tiny_seg_models, monkeypatch) -> None:
    # The real SAM call runs; its masks are then emptied to exercise the keep-the-coarse-region branch,
    # which random weights cannot be relied on to reach.
    real = backends.sam2_masks_for_boxes

    def empty_masks(*args, **kwargs):
        masks, scores = real(*args, **kwargs)
        return np.zeros_like(masks), scores

    monkeypatch.setattr(backends, "sam2_masks_for_boxes", empty_masks)
    result = segment_image(make_test_image(40, 50), "a cat", tiny_seg_models, settings=DetectionSettings(box_threshold=1.0, clipseg_threshold=0.0))
    assert result.source == "clipseg-fallback" and result.masks.all()  # the whole-image CLIPSeg region
    assert np.isnan(result.mask_scores).all()


def test_nothing_found_is_empty_with_message(tiny_seg_models) -> None:
    result = segment_image(make_test_image(50, 70), "a cat", tiny_seg_models, settings=DetectionSettings(box_threshold=1.0, clipseg_threshold=1.0))
    assert result.source == "none" and len(result) == 0
    assert result.masks.shape == (0, 50, 70) and result.boxes.shape == (0, 4)
    assert "no object matched 'a cat.'" in result.message
    assert "BOX_THRESHOLD" in result.message and "CLIPSEG_THRESHOLD" in result.message


def test_batched_folder_matches_single_images(tiny_seg_models, tmp_path: Path) -> None:
    arrays = [make_test_image(64, 96, seed=seed) for seed in range(3)]
    for index, array in enumerate(arrays):
        Image.fromarray(array).save(tmp_path / f"img{index}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.warns(UserWarning, match="skipped broken.jpg"):
        results = segment_images(tmp_path, "a cat", tiny_seg_models, batch_size=2, progress=False, skip_unreadable=True, settings=DetectionSettings(box_threshold=0.05))
    assert [name for name, _ in results] == ["img0.png", "img1.png", "img2.png"]
    for (name, batched), array in zip(results, arrays):
        single = segment_image(array, "a cat", tiny_seg_models, settings=DetectionSettings(box_threshold=0.05))
        assert batched.labels == single.labels
        np.testing.assert_allclose(batched.boxes, single.boxes, atol=1e-2)
        assert (batched.masks != single.masks).mean() < 0.01
    with pytest.raises(ValueError, match="broken.jpg"):
        segment_images(tmp_path, "a cat", tiny_seg_models, progress=False)


def test_empty_folder_is_a_clear_error(tiny_seg_models, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no images in folder"):
        segment_images(tmp_path, "a cat", tiny_seg_models, progress=False)


# ----------------------------------------------------------------------------- CLIPSeg regions


def test_clipseg_map_to_boxes_two_blobs() -> None:
    probability = np.full((60, 80), 0.1, np.float32)
    probability[10:20, 5:25] = 0.9  # rows 10..19, columns 5..24 (200 px)
    probability[30:50, 40:70] = 0.7  # rows 30..49, columns 40..69 (600 px)
    probability[2:4, 70:72] = 0.95  # 4 px speck, below min_area
    boxes, masks = clipseg_map_to_boxes(probability, threshold=0.5, min_area=10)
    np.testing.assert_array_equal(boxes, [[40, 30, 70, 50], [5, 10, 25, 20]])  # largest first
    assert masks.shape == (2, 60, 80) and masks.dtype == bool
    assert masks[0].sum() == 600 and masks[1].sum() == 200 and masks[1, 10:20, 5:25].all()
    boxes, _ = clipseg_map_to_boxes(probability, threshold=0.8, min_area=1)  # only the 0.9 blob and the speck
    np.testing.assert_array_equal(boxes, [[5, 10, 25, 20], [70, 2, 72, 4]])
    empty_boxes, empty_masks = clipseg_map_to_boxes(probability, threshold=0.95)  # strictly greater
    assert empty_boxes.shape == (0, 4) and empty_masks.shape == (0, 60, 80)


# ----------------------------------------------------------------------------- image loading


def test_grayscale_png(tmp_path: Path) -> None:
    gray = np.arange(12 * 20, dtype=np.uint8).reshape(12, 20)
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    loaded = load_image(tmp_path / "g.png")
    assert loaded.shape == (12, 20, 3) and loaded.dtype == np.uint8
    assert all(np.array_equal(loaded[:, :, channel], gray) for channel in range(3))


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[:, :5] = (255, 0, 0, 255)  # opaque red; the right half is fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    loaded = load_image(tmp_path / "a.png")
    assert loaded.shape == (10, 10, 3)
    assert (loaded[:, :5] == (255, 0, 0)).all() and (loaded[:, 5:] == 255).all()


def test_16_bit_scaled_to_8_bit(tmp_path: Path) -> None:
    deep = np.array([[0, 257 * 100, 65535]], np.uint16).repeat(4, axis=0)
    Image.fromarray(deep).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I;16")
    loaded = load_image(tmp_path / "d.png")
    np.testing.assert_array_equal(loaded[0, :, 0], [0, 100, 255])


def test_cmyk_jpeg_converted(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 8), (255, 0, 0, 0)).save(tmp_path / "c.jpg")  # pure cyan
    loaded = load_image(tmp_path / "c.jpg")
    assert loaded.shape == (8, 16, 3)
    red, green, blue = loaded.reshape(-1, 3).mean(0)
    assert red < 30 and green > 225 and blue > 225


def test_exif_orientation_respected(tmp_path: Path) -> None:
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:10, :10] = (255, 0, 0)  # red marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    loaded = load_image(tmp_path / "phone.jpg")
    assert loaded.shape == (60, 40, 3)  # height and width swapped
    assert loaded[:10, -10:, 0].mean() > 200 and loaded[:10, :10, 0].mean() < 50  # marker now top-right


def test_truncated_file_names_file_and_fix(tmp_path: Path) -> None:
    Image.fromarray(make_test_image(64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.png.*Re-export or re-download"):
        load_image(tmp_path / "cut.png")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        load_image(tmp_path / "nope.jpg")


def test_arrays_are_normalised() -> None:
    assert load_image(np.ones((4, 5), bool))[0, 0].tolist() == [255, 255, 255]
    assert load_image(np.full((4, 5, 1), 0.5, np.float32))[0, 0].tolist() == [128, 128, 128]
    with pytest.raises(ValueError, match="expected"):
        load_image(np.zeros((4, 5, 2), np.uint8))


def test_segmentation_summary() -> None:
    empty = Segmentation.empty((4, 5), "cat.", "nothing here", {"total": 0.5})
    assert empty.summary() == "nothing (none, 0.50 s)"


def test_stage_clock_synchronises_cuda_only_when_profiling(monkeypatch: pytest.MonkeyPatch) -> None:
    # No GPU here: torch.cuda.synchronize is replaced by a recorder, and the models by their devices only.
    synchronised = []
    monkeypatch.setattr(torch.cuda, "synchronize", synchronised.append)
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    gpu_models = SimpleNamespace(dino=SimpleNamespace(device=gpu), sam=SimpleNamespace(device=gpu),
                                 clipseg=SimpleNamespace(device=cpu))
    clock = StageClock([gpu_models.dino, gpu_models.sam, gpu_models.clipseg], sync=True)
    clock.lap("preprocess")
    clock.lap("detect")
    assert synchronised == [gpu, gpu] and list(clock.seconds) == ["preprocess", "detect"]
    assert all(seconds >= 0 for seconds in clock.seconds.values())
    cpu_models = SimpleNamespace(dino=SimpleNamespace(device=cpu), sam=SimpleNamespace(device=cpu),
                                 clipseg=SimpleNamespace(device=cpu))
    StageClock([cpu_models.dino, cpu_models.sam, cpu_models.clipseg], sync=True).lap("preprocess")
    default = StageClock([gpu_models.dino, gpu_models.sam, gpu_models.clipseg])  # production default: no synchronize at all
    default.lap("preprocess")
    assert synchronised == [gpu, gpu] and list(default.seconds) == ["preprocess"]


def test_profile_flag_reaches_the_stage_clock(tiny_seg_models, monkeypatch: pytest.MonkeyPatch) -> None:
    made = []
    real = backends.StageClock
    monkeypatch.setattr(backends, "StageClock", lambda models, sync=False: made.append(sync) or real(models, sync))
    image = make_test_image(48, 64)
    segment_images([image], "a cat", tiny_seg_models, progress=False)
    segment_images([image], "a cat", tiny_seg_models, progress=False, profile=True)
    assert made == [False, True]


def test_settings_reject_out_of_range_values() -> None:
    for bad, name in [({"box_threshold": 1.3}, "box_threshold"), ({"nms_iou": -0.1}, "nms_iou"),
                      ({"multimask": "yes"}, "multimask"), ({"max_detections": 0}, "max_detections")]:
        with pytest.raises(ValueError, match=name):
            DetectionSettings(**bad)
