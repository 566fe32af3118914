"""save_outputs / detections.json: RLE round trips, schema checks, all-or-nothing writes, bad folders."""
from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from nbhelpers.seg import export
from nbhelpers.seg.export import (COMPLETE_FILE, OUTPUT_FILES, build_detections, decode_rle, encode_masks, load_detections,
                                  outputs_complete, remove_dead_temp_files, save_outputs)
from nbhelpers.seg.types import Segmentation
from nbhelpers.testing import validate_detections
from nbhelpers.seg.render import instance_map, overlay, union_mask

METADATA = {
    "models": {"dino": "IDEA-Research/grounding-dino-tiny", "sam": "facebook/sam2.1-hiera-small"},
    "thresholds": {"box_threshold": np.float32(0.35), "text_threshold": 0.25},
    "source_file": Path("photos/cat.jpg"),
}


def make_seg(height: int = 48, width: int = 64, count: int = 3, seed: int = 0) -> Segmentation:
    rng = np.random.default_rng(seed)
    masks = rng.random((count, height, width)) > 0.6
    boxes = np.array([[2, 3, width - 5, height - 4]] * count, np.float32)
    mask_scores = np.array([0.9, np.nan, 0.7][:count] + [0.5] * max(0, count - 3), np.float32)
    return Segmentation(boxes, np.linspace(0.9, 0.4, count).astype(np.float32), [f"obj{i}" for i in range(count)],
                        masks, mask_scores, "grounding-dino", (height, width), "obj.", {"detect": 0.25}, "")


def image_for(seg: Segmentation, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*seg.image_size, 3), dtype=np.uint8)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


# ----------------------------------------------------------------------------- RLE


@pytest.mark.parametrize("shape", [(3, 37, 53), (2, 64, 16), (1, 1, 1)])
def test_rle_round_trip_random_masks(shape: tuple[int, int, int]) -> None:
    masks = np.random.default_rng(sum(shape)).random(shape) > 0.5
    encoded = encode_masks(masks)
    assert len(encoded) == shape[0]
    for mask, rle in zip(masks, encoded):
        assert rle["size"] == list(shape[1:]) and isinstance(rle["counts"], str)
        json.dumps(rle)  # JSON-ready
        assert np.array_equal(decode_rle(rle), mask)
        # the same counts decode with pycocotools directly (COCO-compatible, row/column order included)
        assert np.array_equal(mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool), mask)


def test_rle_empty_and_full_masks() -> None:
    masks = np.stack([np.zeros((20, 30), bool), np.ones((20, 30), bool)])
    empty_rle, full_rle = encode_masks(masks)
    assert not decode_rle(empty_rle).any() and decode_rle(full_rle).all()
    assert decode_rle(full_rle).shape == (20, 30)
    assert encode_masks(np.zeros((0, 20, 30), bool)) == []


def test_decode_uncompressed_rle_and_bad_input() -> None:
    mask = decode_rle({"size": [2, 3], "counts": [1, 2, 3]})  # column-major: 1 off, 2 on, 3 off
    assert mask.T.ravel().tolist() == [False, True, True, False, False, False]
    with pytest.raises(ValueError, match="size"):
        decode_rle({"counts": "abc"})


# ----------------------------------------------------------------------------- schema


def test_document_content_and_validation() -> None:
    seg = make_seg()
    document = build_detections(seg, METADATA)
    validate_detections(document)
    assert document["image"] == {"height": 48, "width": 64, "source_file": "photos/cat.jpg"}
    assert document["thresholds"] == {"box_threshold": pytest.approx(0.35), "text_threshold": 0.25}
    first, second = document["detections"][:2]
    assert first["label"] == "obj0" and first["score"] == pytest.approx(0.9) and first["box_xyxy"] == [2, 3, 59, 44]
    assert second["mask_score"] is None  # NaN has no JSON spelling
    assert first["area"] == int(seg.masks[0].sum())
    json.dumps(document, allow_nan=False)


def _broken(change) -> dict:
    document = build_detections(make_seg(), METADATA)
    change(document)
    return document


@pytest.mark.parametrize("change,field", [
    (lambda d: d.pop("prompt"), "'prompt' is missing"),
    (lambda d: d["detections"][0].update(score=1.5), "detections\\[0\\].score"),
    (lambda d: d["detections"][1].update(box_xyxy=[10, 0, 5, 4]), "detections\\[1\\].box_xyxy"),
    (lambda d: d["detections"][2].update(area=d["detections"][2]["area"] + 1), "detections\\[2\\].area"),
    (lambda d: d["image"].update(height=47), "mask_rle"),
    (lambda d: d["detections"][0]["mask_rle"].update(counts=b"abc"), "mask_rle"),
    (lambda d: d.update(timings={"detect": "slow"}), "timings"),
    (lambda d: d["detections"][0].pop("label"), "label is missing"),
])
def test_schema_violations_are_reported(change, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        validate_detections(_broken(change))


def test_unknown_metadata_key_is_rejected() -> None:
    with pytest.raises(ValueError, match="threshold"):
        build_detections(make_seg(), {"threshold": {}})


# ----------------------------------------------------------------------------- writing


def test_all_four_files_round_trip(tmp_path: Path) -> None:
    seg = make_seg()
    image = image_for(seg)
    paths = save_outputs(image, seg, tmp_path / "run", METADATA)
    assert sorted(path.name for path in paths.values()) == ["detections.json", "instances.png", "mask.png", "overlay.png"]
    written = sorted(path.name for path in (tmp_path / "run").iterdir())
    assert written == sorted([COMPLETE_FILE, *(path.name for path in paths.values())])  # the record, written last
    assert outputs_complete(tmp_path / "run", OUTPUT_FILES.values())
    assert np.array_equal(cv2.imread(str(paths["mask"]), cv2.IMREAD_UNCHANGED), union_mask(seg))
    assert np.array_equal(cv2.imread(str(paths["instances"]), cv2.IMREAD_UNCHANGED), instance_map(seg))
    saved_overlay = cv2.cvtColor(cv2.imread(str(paths["overlay"])), cv2.COLOR_BGR2RGB)
    assert np.array_equal(saved_overlay, overlay(image, seg))  # PNG is lossless and channel order is right
    data = load_detections(paths["detections"])
    for mask, detection in zip(seg.masks, data["detections"]):
        assert np.array_equal(decode_rle(detection["mask_rle"]), mask)
    assert data["models"] == METADATA["models"] and data["timings"] == {"detect": 0.25}


def test_many_instances_give_a_16_bit_label_png(tmp_path: Path) -> None:
    masks = np.zeros((300, 20, 20), bool)
    for index in range(300):
        masks[index].flat[index] = True
    seg = Segmentation(np.tile(np.array([[0, 0, 19, 19]], np.float32), (300, 1)), np.full(300, 0.5, np.float32),
                       ["dot"] * 300, masks, np.full(300, 0.5, np.float32), "grounding-dino", (20, 20), "dot.")
    paths = save_outputs(image_for(seg), seg, tmp_path, {})
    labels = cv2.imread(str(paths["instances"]), cv2.IMREAD_UNCHANGED)
    assert labels.dtype == np.uint16 and labels.max() == 300


def test_empty_segmentation_exports(tmp_path: Path) -> None:
    seg = Segmentation.empty((30, 40), "unicorn.", "no box above box_threshold=0.35")
    paths = save_outputs(image_for(seg), seg, tmp_path, {"thresholds": {"box_threshold": 0.35}})
    data = load_detections(paths["detections"])
    assert data["detections"] == [] and data["source"] == "none" and data["message"].startswith("no box")
    mask = cv2.imread(str(paths["mask"]), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (30, 40) and not mask.any()


def _fail_on_call(number: int, real, error: Exception):
    calls = {"count": 0}

    def wrapper(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == number:
            raise error
        return real(*args, **kwargs)

    return wrapper


def test_encode_failure_leaves_previous_files_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = make_seg(seed=0)
    save_outputs(image_for(first), first, tmp_path, METADATA)
    before = snapshot(tmp_path)
    # Fault injection: OpenCV cannot be made to fail on demand, so its 3rd encode (the overlay) raises.
    monkeypatch.setattr(cv2, "imencode", _fail_on_call(3, cv2.imencode, RuntimeError("encoder crashed")))
    second = make_seg(seed=5)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        save_outputs(image_for(second, seed=7), second, tmp_path, METADATA)
    assert snapshot(tmp_path) == before


def test_write_failure_leaves_no_partial_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = make_seg(seed=0)
    save_outputs(image_for(old), old, tmp_path / "kept", METADATA)
    before = snapshot(tmp_path / "kept")
    # Fault injection: a full disk cannot be produced here, so the 3rd temporary file write raises ENOSPC.
    real_write = export._write_temp
    disk_full = OSError(28, "No space left on device")
    monkeypatch.setattr(export, "_write_temp", _fail_on_call(3, real_write, disk_full))
    new = make_seg(seed=9)
    with pytest.raises(OSError, match="No space"):
        save_outputs(image_for(new), new, tmp_path / "kept", METADATA)
    assert snapshot(tmp_path / "kept") == before  # no new files, no leftover temporaries
    monkeypatch.setattr(export, "_write_temp", _fail_on_call(3, real_write, disk_full))
    with pytest.raises(OSError, match="No space"):
        save_outputs(image_for(new), new, tmp_path / "fresh", METADATA)
    assert list((tmp_path / "fresh").iterdir()) == []


def test_complete_only_when_the_record_matches_the_files(tmp_path: Path) -> None:
    seg = make_seg()
    save_outputs(image_for(seg), seg, tmp_path, METADATA)
    names = list(OUTPUT_FILES.values())
    assert outputs_complete(tmp_path, names)
    assert not outputs_complete(tmp_path, [*names, "extra.png"])  # a file the record does not list
    detections = tmp_path / "detections.json"
    kept = detections.read_bytes()
    detections.write_bytes(kept[:-10])  # truncated: the size differs from the record's
    assert not outputs_complete(tmp_path, names)
    detections.write_bytes(kept)
    assert outputs_complete(tmp_path, names)
    (tmp_path / COMPLETE_FILE).write_text("{")  # an unreadable record
    assert not outputs_complete(tmp_path, names)
    (tmp_path / COMPLETE_FILE).unlink()  # no record: files of an older version, or of a run that died
    assert not outputs_complete(tmp_path, names)


def test_a_crash_between_renames_leaves_the_folder_unfinished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = make_seg(seed=0), make_seg(seed=9)
    save_outputs(image_for(first), first, tmp_path, METADATA)
    # Fault injection: the process dies after the first of the four renames (a SIGKILL cannot be survived here).
    monkeypatch.setattr(os, "replace", _fail_on_call(2, os.replace, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_outputs(image_for(second), second, tmp_path, METADATA)
    monkeypatch.undo()
    assert not outputs_complete(tmp_path, OUTPUT_FILES.values()), "a mix of two runs' files is not a finished set"


def _dead_pid() -> int:
    """The id of a process that has exited (a real one, started and waited for)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temp_files_of_killed_runs_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    import time

    started = time.time()
    dead, live, mine = _dead_pid(), os.getppid(), os.getpid()  # the parent (pytest's shell or runner) is alive
    names = {"dead": f".mask.png.{dead}.0a1b2c3d.tmp", "live": f".overlay.png.{live}.0a1b2c3d.tmp",
             "mine_old": f".instances.png.{mine}.0a1b2c3d.tmp", "atomic_old": ".tracks.json.k2j4x9_q.tmp",
             "partial_old": ".video_overlay.partial.mp4", "atomic_new": ".complete.json.zz81ab3c.tmp",
             "output": "mask.png"}
    for key, name in names.items():
        (tmp_path / name).write_bytes(b"x")
        if key.endswith("_old"):
            os.utime(tmp_path / name, (started - 60, started - 60))  # last written before this run began
        elif key == "atomic_new":
            os.utime(tmp_path / name, (started + 1, started + 1))  # being written by another run now
    removed = {path.name for path in remove_dead_temp_files(tmp_path, started)}
    assert removed == {names[key] for key in ("dead", "mine_old", "atomic_old", "partial_old")}
    assert {path.name for path in tmp_path.iterdir()} == {names[key] for key in ("live", "atomic_new", "output")}
    # without a start time (save_outputs, a video folder): a file another run is writing right now is kept, one
    # untouched for longer than any live writer leaves its file is removed
    partial = tmp_path / ".video_overlay.partial.mp4"
    partial.write_bytes(b"frames so far")
    assert remove_dead_temp_files(tmp_path) == []
    os.utime(partial, (started - 7200, started - 7200))
    assert remove_dead_temp_files(tmp_path) == [partial]


def test_save_outputs_clears_a_killed_writers_temp_files(tmp_path: Path) -> None:
    stale = tmp_path / f".mask.png.{_dead_pid()}.0a1b2c3d.tmp"  # what a SIGKILL mid-write leaves
    stale.write_bytes(b"half a png")
    seg = make_seg()
    save_outputs(image_for(seg), seg, tmp_path, METADATA)
    assert not stale.exists() and not list(tmp_path.glob(".*.tmp"))


def test_out_dir_below_a_file_names_the_fix(tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    seg = make_seg()
    with pytest.raises(PermissionError, match="OUT_DIR=.*cannot be written.*writable folder"):
        save_outputs(image_for(seg), seg, blocker / "sub", METADATA)  # fails even for root
    assert blocker.read_text() == "not a folder"


ROOT_NOTE = "root ignores directory permission bits, so chmod 0o500 cannot make a folder read-only (see the file.txt/sub test)"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason=ROOT_NOTE)
def test_read_only_out_dir_names_the_fix(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        seg = make_seg()
        with pytest.raises(PermissionError, match="writable folder"):
            save_outputs(image_for(seg), seg, locked, METADATA)
    finally:
        locked.chmod(0o700)


def test_load_detections_reports_broken_json(tmp_path: Path) -> None:
    path = tmp_path / "detections.json"
    path.write_text('{"image": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_detections(path)
    path.write_text('{"image": {"height": 4, "width": 4}}')
    with pytest.raises(ValueError, match="not a detections file"):
        load_detections(path)
