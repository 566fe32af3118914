"""SAM 3 backend (images and streamed video), the gated-checkpoint message and detectors loaded through the Auto
classes, on tiny random models built by nbhelpers.testing (loaded with from_pretrained)."""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from nbhelpers.seg import models as seg_models
from nbhelpers.seg import registry
from nbhelpers.seg.__main__ import main
from nbhelpers.seg.backends import Sam3Backend, as_backend
from nbhelpers.seg.image import segment_image, segment_images
from nbhelpers.seg.models import ModelLoadError, load_grounding_dino, load_sam3_models
from nbhelpers.seg.types import DetectionSettings, VideoSettings
from nbhelpers.seg.video.sam3_tracking import Sam3StreamingTracker, sam3_postprocessing, segment_video_sam3
from nbhelpers.testing import (TINY_SAM3_VIDEO_THRESHOLDS, build_tiny_mm_grounding_dino, make_test_frame,
                               make_test_image, make_test_video, set_sam3_kernel_state, validate_detections)

EVERYTHING = DetectionSettings(sam3_threshold=0.0)  # random weights score about 0.25: keep every instance
VIDEO = DetectionSettings(sam3_threshold=TINY_SAM3_VIDEO_THRESHOLDS["score_threshold_detection"])


@pytest.fixture(scope="module")
def sam3_dirs(tiny_sam3_model_dirs) -> dict[str, Path]:
    return tiny_sam3_model_dirs


@pytest.fixture(scope="module")
def sam3(sam3_dirs):
    return load_sam3_models(sam3_dirs["sam3"], sam3_dirs["sam3_video"], device="cpu")


# ----------------------------------------------------------------------------- images


def test_batch_of_images_with_several_phrases(sam3) -> None:
    images = [make_test_image(48, 64), make_test_image(60, 40, seed=1)]
    results = segment_images(images, "cat. dog", sam3, EVERYTHING, batch_size=2, progress=False)
    for (_, result), image in zip(results, images):
        assert result.backend == "sam3" and result.source == "sam3"
        assert set(result.labels) == {"cat", "dog"}  # each phrase is its own prompt and labels its instances
        assert result.masks.shape == (len(result), *image.shape[:2]) and result.masks.dtype == bool
        height, width = image.shape[:2]
        assert (result.boxes[:, [0, 2]] <= width).all() and (result.boxes[:, [1, 3]] <= height).all()
        assert set(result.timings) >= {"preprocess", "segment", "detect", "total"}
    single = segment_image(images[1], "cat. dog", sam3, EVERYTHING)  # batching does not change a result
    assert single.labels == results[1][1].labels and np.array_equal(single.masks, results[1][1].masks)


def test_vision_features_are_computed_once_for_all_phrases(sam3, monkeypatch) -> None:
    model, calls = sam3.image.model, {"vision": 0, "forward": 0}
    vision, forward = model.get_vision_features, model.forward

    def count_vision(*args, **kwargs):
        calls["vision"] += 1
        return vision(*args, **kwargs)

    def count_forward(*args, **kwargs):
        calls["forward"] += 1
        assert kwargs.get("pixel_values") is None, "a phrase re-encoded the image"
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "get_vision_features", count_vision)
    monkeypatch.setattr(model, "forward", count_forward)
    segment_images([make_test_image(48, 64)] * 2, "cat. dog. car", sam3, EVERYTHING, batch_size=2, progress=False)
    assert calls == {"vision": 1, "forward": 3}  # one image encoding for the batch, one decoder pass per phrase


def test_per_label_nms(sam3) -> None:
    image = make_test_image(48, 64)
    queries = sam3.image.model.config.detr_decoder_config.num_queries
    everything = segment_image(image, "cat. dog", sam3, dataclasses.replace(EVERYTHING, nms_iou=1.0))
    assert everything.labels.count("cat") == everything.labels.count("dog") == queries  # no NMS: every query
    merged = segment_image(image, "cat. dog", sam3, dataclasses.replace(EVERYTHING, nms_iou=0.5))
    assert 0 < len(merged) < len(everything) and set(merged.labels) == {"cat", "dog"}
    from torchvision.ops import box_iou
    for label in ("cat", "dog"):
        boxes = torch.from_numpy(merged.boxes[[i for i, name in enumerate(merged.labels) if name == label]])
        overlap = box_iou(boxes, boxes) - torch.eye(len(boxes))
        assert (overlap <= 0.5).all()
    capped = segment_image(image, "cat. dog", sam3, dataclasses.replace(EVERYTHING, nms_iou=1.0, max_detections=3))
    assert len(capped) == 3 and np.allclose(np.sort(capped.scores), np.sort(everything.scores)[-3:])


def test_nothing_found_says_which_threshold(sam3) -> None:
    result = segment_image(make_test_image(48, 64), "cat", sam3, DetectionSettings(sam3_threshold=1.0))
    assert len(result) == 0 and "SAM3_THRESHOLD" in result.message


def test_long_phrase_is_cut_with_a_warning(sam3, capsys) -> None:
    long_phrase = " ".join(["red cat"] * 30)  # far more than the 32 tokens SAM 3's text encoder reads
    result = segment_image(make_test_image(48, 64), [long_phrase, "dog"], sam3, EVERYTHING)
    (warning,) = capsys.readouterr().err.strip().splitlines()
    assert warning.startswith("warning: prompt cut") and "SAM 3 32 tokens per phrase" in warning
    tokenizer = sam3.image.processor.tokenizer
    cut = next(label for label in result.labels if label.startswith("red cat"))
    assert len(tokenizer(cut)["input_ids"]) <= 32 and long_phrase.startswith(cut)


def test_a_10000_character_word_is_cut_for_sam3_images_and_video(sam3, tmp_path: Path, capsys, monkeypatch) -> None:
    set_sam3_kernel_state(monkeypatch, "missing")  # the same run whatever is installed
    word = "a" * 10_000
    result = segment_image(make_test_image(48, 64), word, sam3, EVERYTHING)
    (warning,) = capsys.readouterr().err.strip().splitlines()
    assert "SAM 3 32 tokens per phrase" in warning
    tokenizer = sam3.image.processor.tokenizer
    assert result.labels and all(len(tokenizer(label)["input_ids"]) <= 32 and word.startswith(label)
                                 for label in result.labels)
    clip = make_test_video(tmp_path / "clip.mp4", frames=2, height=48, width=64)
    video = segment_video_sam3(clip, word, sam3, tmp_path / "out", settings=VIDEO, progress=False)
    err = capsys.readouterr().err  # may also hold the progress bar of the video model's first load
    (warning,) = [line for line in err.splitlines() if "warning" in line.lower() or "[transformers]" in line]
    assert "SAM 3 video 32 tokens per phrase" in warning
    assert video.frames == 2 and len(video.prompt) < 40


def test_cli_sam3_image(sam3_dirs, tmp_path: Path) -> None:
    image = tmp_path / "in.png"
    from PIL import Image
    Image.fromarray(make_test_image(48, 64)).save(image)
    code = main([str(image), "--prompt", "cat", "--out", str(tmp_path / "out"), "--backend", "sam3",
                 "--sam3", str(sam3_dirs["sam3"]), "--sam3-threshold", "0", "--device", "cpu"])
    assert code == 0
    data = json.loads((tmp_path / "out" / "in" / "detections.json").read_text())
    validate_detections(data)
    assert data["source"] == "sam3" and data["detections"] and data["models"]["sam3_model"] == str(sam3_dirs["sam3"])
    assert data["models"]["backend"] == "sam3"
    assert all((tmp_path / "out" / "in" / name).is_file() for name in ("mask.png", "instances.png", "overlay.png"))


def test_ui_backend_dropdown_runs_sam3(sam3_dirs, tiny_seg_model_dirs, tmp_path: Path) -> None:
    from PIL import Image

    from nbhelpers.seg import ui

    asked = []

    def loader(checkpoint: str):  # real loads from the tiny folders, recording which backend was asked for
        asked.append(checkpoint)
        if checkpoint == ui.SAM3_CHECKPOINT:
            return load_sam3_models(sam3_dirs["sam3"], sam3_dirs["sam3_video"], device="cpu")
        dirs = tiny_seg_model_dirs
        return seg_models.load_models(dirs["dino"], dirs["sam"], dirs["clipseg"], device="cpu")

    Image.fromarray(make_test_image(48, 64)).save(tmp_path / "photo.png")
    widgets = ui.build_ui(loader, {"image_path": str(tmp_path / "photo.png"), "prompt": "cat", "sam3_threshold": 0.0},
                          tmp_path / "out")
    assert widgets.backend.value == "gdino-sam2" and set(widgets.backend.options) == {
        (spec.label, name) for name, spec in registry.backends().items()}
    widgets.backend.value = "sam3"
    seg = ui.handle_click(widgets, loader, tmp_path / "out")
    assert asked == [ui.SAM3_CHECKPOINT] and seg is not None and seg.backend == "sam3" and len(seg) > 0
    widgets.wait_saved(60)  # the full-size files are written in the background after the result is shown
    saved = json.loads((tmp_path / "out" / "photo" / "detections.json").read_text())
    assert saved["source"] == "sam3" and saved["models"]["sam3_model"] == str(sam3_dirs["sam3"])


# ----------------------------------------------------------------------------- gated checkpoint (mocked network)


def _refusal(status: int) -> OSError:
    """The error chain from_pretrained raises for a refused download: huggingface_hub's error, wrapped by transformers."""
    import httpx
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    response = httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/facebook/sam3"))
    cause = (GatedRepoError("403 Client Error: Cannot access gated repo", response=response) if status == 403
             else HfHubHTTPError("401 Client Error: Unauthorized", response=response))
    try:
        raise OSError(f"facebook/sam3 download failed ({status})") from cause
    except OSError as error:
        return error


@pytest.mark.parametrize("status", [401, 403])
def test_gated_checkpoint_names_the_fixes(status: int, monkeypatch) -> None:
    # No network here: the hub's refusal is raised by a patched from_pretrained (mocks the download).
    from transformers import Sam3Model, Sam3Processor

    def refuse(*args, **kwargs):
        raise _refusal(status)

    monkeypatch.setattr(Sam3Processor, "from_pretrained", refuse)
    monkeypatch.setattr(Sam3Model, "from_pretrained", refuse)
    with pytest.raises(ModelLoadError) as caught:
        load_sam3_models("facebook/sam3", device="cpu")
    message = str(caught.value)
    assert "HF_TOKEN" in message and "licence" in message and "data set" in message
    assert "hf download facebook/sam3 --local-dir" in message


# ----------------------------------------------------------------------------- detectors through the Auto classes


def test_mm_grounding_dino_loads_through_the_auto_classes(tiny_seg_model_dirs, tmp_path_factory) -> None:
    folder = build_tiny_mm_grounding_dino(tmp_path_factory.mktemp("tiny-mm"))
    detector = load_grounding_dino(folder, seg_models.select_runtime("cpu", verbose=False))
    assert type(detector.model).__name__ == "MMGroundingDinoForObjectDetection"
    models = seg_models.load_models(folder, tiny_seg_model_dirs["sam"], tiny_seg_model_dirs["clipseg"], device="cpu")
    result = segment_image(make_test_image(48, 64), "cat. dog", models, DetectionSettings(box_threshold=0.0,
                                                                                         text_threshold=0.0))
    assert result.source == "grounding-dino" and len(result) > 0 and set(result.labels) <= {"cat", "dog"}
    with pytest.raises(ModelLoadError, match="not grounding-dino / mm-grounding-dino"):
        load_grounding_dino(tiny_seg_model_dirs["sam"], seg_models.select_runtime("cpu", verbose=False))


# ----------------------------------------------------------------------------- video


def test_pruning_bounds_the_state_and_changes_no_mask(sam3) -> None:
    video = sam3.video()
    frames = [make_test_frame(i, 48, 64, enter_frame=3) for i in range(16)]  # 4 memory windows
    runs = []
    for prune in (True, False):
        tracker = Sam3StreamingTracker(video, ["cat"], 48, 64, VIDEO, prune=prune)
        results = [tracker.track(index, frame)[0] for index, frame in enumerate(frames)]
        runs.append((results, tracker))
    (pruned, pruned_tracker), (full, full_tracker) = runs
    assert any(len(result.object_ids) for result in full), "the tiny model should track something"
    for a, b in zip(pruned, full):
        assert a.object_ids == b.object_ids and np.array_equal(a.masks, b.masks)
    window = pruned_tracker.memory_window
    assert len(frames) >= 4 * window and full_tracker.frames_held_peak == len(frames)
    conditioning = {frame for outputs in pruned_tracker.session.output_dict_per_obj.values()
                    for frame in outputs["cond_frame_outputs"]}
    assert pruned_tracker.frames_held_peak <= window + 1 + len(conditioning) < len(frames)


@pytest.fixture
def duplicated_video(sam3):
    """A copy of the tiny video model whose queries are all the same, so each frame's detections are exact
    duplicates: the case transformers' SAM 3 NMS (skipped without the `kernels` package) would have merged."""
    loaded = sam3.video()
    model = copy.deepcopy(loaded.model)
    decoder = model.detector_model.detr_decoder
    with torch.no_grad():
        decoder.query_embed.weight[:] = decoder.query_embed.weight[:1].clone()
        decoder.reference_points.weight[:] = decoder.reference_points.weight[:1].clone()
    return dataclasses.replace(loaded, model=model)


def test_no_duplicate_tracks_without_kernels(duplicated_video, monkeypatch) -> None:
    set_sam3_kernel_state(monkeypatch, "missing")  # transformers' NMS skipped, whatever is installed
    counts = {}
    for nms_iou in (1.0, 0.5):  # 1.0: nothing counts as overlapping, as without NMS
        tracker = Sam3StreamingTracker(duplicated_video, ["cat"], 48, 64, dataclasses.replace(VIDEO, nms_iou=nms_iou))
        counts[nms_iou] = len(tracker.track(0, make_test_frame(0, 48, 64))[0].object_ids)
    queries = duplicated_video.model.config.detector_config.detr_decoder_config.num_queries
    assert counts == {1.0: queries, 0.5: 1}


def test_with_kernels_sam3_merges_duplicates_itself_and_one_track_stays(duplicated_video, monkeypatch) -> None:
    kernel = set_sam3_kernel_state(monkeypatch, "loaded")  # stands in for the hub download (no network here)
    tracker = Sam3StreamingTracker(duplicated_video, ["cat"], 48, 64, VIDEO)
    found, new = tracker.track(0, make_test_frame(0, 48, 64))
    assert kernel.calls > 0, "SAM 3's own NMS ran"
    assert len(found.object_ids) == len(new) == 1 and tracker.duplicates == []  # nothing left for our pass to remove


@pytest.mark.parametrize("state, runs, description", [
    ("missing", False, "skipped: kernels package not installed"),
    ("failed", False, "skipped: cv-utils kernel could not be loaded (no route to the hub)"),
    ("loaded", True, "NMS, hole filling, sprinkle removal"),
])
def test_postprocessing_says_what_runs_quietly(state, runs, description, monkeypatch, capfd) -> None:
    set_sam3_kernel_state(monkeypatch, state, error="no route to the hub. Check the network")
    status = sam3_postprocessing()
    assert (status.runs, status.description) == (runs, description)
    assert capfd.readouterr().err == ""  # transformers' (and kernels') warnings do not reach stderr
    note = status.note()
    assert (note is None) == runs
    if note is not None:
        assert note.count("\n") == 0 and "duplicate tracks may appear" in note and "pip install kernels" in note


def test_video_end_to_end_tracks_json(sam3, tmp_path: Path, monkeypatch, capfd) -> None:
    set_sam3_kernel_state(monkeypatch, "failed", error="cannot reach huggingface.co")  # as offline, whatever is installed
    clip = make_test_video(tmp_path / "clip.mp4", frames=4, height=48, width=64, enter_frame=2)
    capfd.readouterr()
    result = segment_video_sam3(clip, "cat", sam3, tmp_path / "out", settings=VIDEO, save_id_maps=True,
                                progress=False)
    printed = capfd.readouterr()
    assert "Failed to load cv_utils kernel" not in printed.err and "kernels" not in printed.err  # no red block
    (note,) = [line for line in printed.out.splitlines() if "post-processing" in line]  # one line, on stdout
    assert "skipped: cv-utils kernel could not be loaded (cannot reach huggingface.co)" in note
    assert result.frames == 4 and result.files["overlay"].is_file() and len(list(result.files["id_maps"].iterdir())) == 4
    data = json.loads(result.files["tracks"].read_text())
    assert data["backend"] == "sam3" and data["video_settings"] == {"frame_stride": 1, "max_frames": None, "max_objects": 20, "overlay_alpha": 0.5}
    assert data["sam3_postprocessing"] == "skipped: cv-utils kernel could not be loaded (cannot reach huggingface.co)"
    ids = [entry["id"] for entry in data["objects"]]
    assert ids and len(ids) == len(set(ids)) and all(entry["label"] == "cat" for entry in data["objects"])
    assert any(entry["first_frame"] > 0 for entry in data["objects"]), "a newcomer is found by per-frame detection"


def test_video_bad_inputs(sam3, tmp_path: Path) -> None:
    from nbhelpers.seg.video import VideoError
    with pytest.raises((FileNotFoundError, VideoError)):
        segment_video_sam3(tmp_path / "missing.mp4", "cat", sam3, tmp_path / "out", progress=False)
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(VideoError):
        segment_video_sam3(tmp_path / "bad.mp4", "cat", sam3, tmp_path / "out", progress=False)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match="empty file"):
        segment_video_sam3(tmp_path / "empty.mp4", "cat", sam3, tmp_path / "out", progress=False)
    cv2.VideoWriter(str(tmp_path / "no_frames.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48)).release()
    with pytest.raises(VideoError, match="contains no video frames"):
        segment_video_sam3(tmp_path / "no_frames.avi", "cat", sam3, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "video_overlay.mp4").exists()
    with pytest.raises(ValueError, match="name at least one object"):
        segment_video_sam3(tmp_path / "bad.mp4", " . ", sam3, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="max_frames"):
        segment_video_sam3(tmp_path / "bad.mp4", "cat", sam3, tmp_path / "out",
                           video_settings=VideoSettings(max_frames=0), progress=False)


def test_as_backend_picks_sam3(sam3) -> None:
    assert isinstance(as_backend(sam3), Sam3Backend)


def test_video_out_of_memory_retries_offloaded_then_explains(sam3, tmp_path: Path, monkeypatch) -> None:
    # A GPU cannot exist here, so its out-of-memory error is raised by a patched tracker.
    from nbhelpers.seg.video import VideoOutOfMemoryError
    from nbhelpers.seg.video import sam3_tracking

    clip = make_test_video(tmp_path / "clip.mp4", frames=2, height=48, width=64)
    offloads = []
    real_init = sam3_tracking.Sam3StreamingTracker.__init__

    def record_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        offloads.append(self.session.video_storage_device)

    def out_of_memory(self, frame_index, frame_rgb):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(sam3_tracking.Sam3StreamingTracker, "__init__", record_init)
    monkeypatch.setattr(sam3_tracking.Sam3StreamingTracker, "track", out_of_memory)
    with pytest.warns(UserWarning, match="retrying once"), pytest.raises(VideoOutOfMemoryError, match="MAX_OBJECTS.*SAM3_THRESHOLD"):
        segment_video_sam3(clip, "cat", sam3, tmp_path / "out", progress=False)
    assert [str(device) for device in offloads] == ["cpu", "cpu"] and len(offloads) == 2  # tried twice, then explained
    assert not (tmp_path / "out" / "video_overlay.mp4").exists() and not (tmp_path / "out" / "tracks.json").exists()


def test_cli_sam3_folder_of_images_and_a_video_with_a_corrupt_image_writes_the_others(sam3_dirs, tmp_path: Path) -> None:
    # The folder run (seg/folder_run.py, also what torchrun runs) must hand a video to SAM 3's video model too.
    from PIL import Image
    folder, out = tmp_path / "images", tmp_path / "out"
    folder.mkdir()
    Image.fromarray(make_test_image(48, 64)).save(folder / "good.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    Image.fromarray(make_test_image(40, 40)[:, :, 0]).save(folder / "grey.png")  # an odd (one-channel) image
    make_test_video(folder / "clip.mp4", frames=3, height=48, width=64, enter_frame=1)
    code = main([str(folder), "--prompt", "cat", "--out", str(out), "--backend", "sam3", "--sam3", str(sam3_dirs["sam3"]),
                 "--sam3-video", str(sam3_dirs["sam3_video"]), "--sam3-threshold", str(VIDEO.sam3_threshold), "--device", "cpu"])
    assert code == 2  # bad input reported, nothing lost
    for name in ("good", "grey"):
        validate_detections(json.loads((out / name / "detections.json").read_text()))
    assert not (out / "broken").exists()
    tracks = json.loads((out / "clip" / "tracks.json").read_text())
    assert tracks["backend"] == "sam3" and tracks["frames"] == 3 and (out / "clip" / "video_overlay.mp4").is_file()
    summary = json.loads((out / "inputs_summary.json").read_text())
    assert {item["input"]: item["status"] for item in summary["inputs"]} == {
        "broken.jpg": "failed", "clip.mp4": "done", "good.png": "done", "grey.png": "done"}


@pytest.mark.parametrize("prompt", ["", " ., ;"])
def test_cli_sam3_empty_prompt_exits_2(prompt: str, sam3_dirs, tmp_path: Path, capsys) -> None:
    from PIL import Image
    Image.fromarray(make_test_image(48, 64)).save(tmp_path / "in.png")
    assert main([str(tmp_path / "in.png"), "--prompt", prompt, "--out", str(tmp_path / "out"), "--backend", "sam3",
                 "--sam3", str(sam3_dirs["sam3"]), "--device", "cpu"]) == 2
    assert "name at least one object" in capsys.readouterr().err


def test_capped_objects_warnings_are_counted_not_shown() -> None:
    """transformers logs "hitting self.max_num_objects" on every frame SAM 3 video detects more objects than it may
    track; around the model call those records are counted (other records pass) and become one line at the end."""
    import logging

    from nbhelpers.seg.video.sam3_tracking import SAM3_VIDEO_LOGGER, CappedFrames

    logger, seen, capped = logging.getLogger(SAM3_VIDEO_LOGGER), [], CappedFrames()
    handler = logging.Handler()
    handler.emit = seen.append
    logger.addHandler(handler)
    try:
        assert capped.note(2) is None
        for _ in range(3):
            with capped.counting():
                logger.warning("hitting self.max_num_objects=2 with new_det_num=4 and prev_obj_num=2")
                logger.warning("another warning")
        logger.warning("hitting self.max_num_objects=2 outside a model call")  # not counted: shown
    finally:
        logger.removeHandler(handler)
    assert capped.frames == 3
    assert [record.getMessage() for record in seen] == ["another warning"] * 3 + ["hitting self.max_num_objects=2 outside a model call"]
    assert capped.note(2) == ("[nbhelpers] SAM 3 video: on 3 frame(s) it detected more objects than MAX_OBJECTS=2 "
                              "and did not track the extra ones (raise MAX_OBJECTS to follow more).")
