"""nbhelpers.vit.data: every source is written into tmp_path by the test; the download is mocked (no network)."""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nbhelpers.vit.config import TrainConfig
from nbhelpers.vit.data import CACHE_NAME, CIFAR10_CLASSES, load_data, make_synthetic

TRAIN_PER_BATCH, TEST_COUNT = 3, 4


def write_batches(folder: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A tiny cifar-10-batches-py folder in the real format; returns the HWC images and labels written."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name, count in [(f"data_batch_{index}", TRAIN_PER_BATCH) for index in range(1, 6)] + [("test_batch", TEST_COUNT)]:
        images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, count).tolist()
        rows = images.transpose(0, 3, 1, 2).reshape(count, 3072)  # R plane, G plane, B plane, each row-major
        with open(folder / name, "wb") as handle:
            pickle.dump({b"batch_label": name.encode(), b"data": rows, b"labels": labels}, handle)
        written[name] = (images, np.asarray(labels))
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [name.encode() for name in CIFAR10_CLASSES], b"num_vis": 3072}, handle)
    train = [written[f"data_batch_{index}"] for index in range(1, 6)]
    return np.concatenate([i for i, _ in train]), np.concatenate([l for _, l in train]), *written["test_batch"]


def write_image_folder(root: Path, classes: list[str], per_class: dict[str, int]) -> dict:
    """train/<class>/*.png (+ one .JPG per class in train) and test/<class>/*.png; returns pixels by path."""
    rng = np.random.default_rng(1)
    pixels = {}
    for split, count in per_class.items():
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for index in range(count):
                image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                suffix = ".JPG" if split == "train" and index == 0 else ".png"
                path = root / split / name / f"{index:03d}{suffix}"
                Image.fromarray(image).save(path, format="JPEG" if suffix == ".JPG" else "PNG")
                pixels[path] = image
    return pixels


def config(**overrides) -> TrainConfig:
    return TrainConfig(**{"dataset": "cifar10", "val_size": 0, **overrides})


# ----------------------------------------------------------------------------- pickle folder


def test_nested_pickle_folder_round_trips_pixels_and_labels(tmp_path):
    train_images, train_labels, test_images, test_labels = write_batches(tmp_path / "root" / "kaggle" / "v1" / "cifar-10-batches-py")
    splits = load_data(config(), tmp_path / "root", tmp_path / "cache")
    assert splits.source == f"cifar-10-batches-py at {tmp_path / 'root' / 'kaggle' / 'v1' / 'cifar-10-batches-py'}"
    assert splits.train_images.dtype == np.uint8 and splits.train_images.shape == (5 * TRAIN_PER_BATCH, 32, 32, 3)
    assert splits.train_labels.dtype == np.int64
    np.testing.assert_array_equal(splits.train_images, train_images)  # CHW planes -> HWC exactly
    np.testing.assert_array_equal(splits.train_labels, train_labels)
    np.testing.assert_array_equal(splits.test_images, test_images)
    np.testing.assert_array_equal(splits.test_labels, test_labels)
    assert splits.classes == CIFAR10_CLASSES and len(splits.val_images) == 0


def test_known_pattern_plane_order(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_batches(folder)
    row = np.zeros(3072, np.uint8)
    row[:1024] = 200  # whole red plane
    row[1024 + 5 * 32 + 7] = 99  # green at y=5, x=7
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"data": row[None], b"labels": [3]}, handle)
    splits = load_data(config(), folder, tmp_path / "cache")  # DATA_ROOT is the batches folder itself
    image = splits.test_images[0]
    assert (image[..., 0] == 200).all() and image[5, 7, 1] == 99 and image[..., 1].sum() == 99 and image[..., 2].sum() == 0
    assert splits.test_labels.tolist() == [3]


def test_truncated_pickle_names_the_file_and_fix(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_batches(folder)
    data = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"data_batch_3 is truncated.*Re-download"):
        load_data(config(), tmp_path, tmp_path / "cache")


# ----------------------------------------------------------------------------- ImageFolder


def test_image_folder_png_and_jpg_sorted_classes(tmp_path):
    pixels = write_image_folder(tmp_path / "data" / "pngs", ["zebra", "apple", "mango"], {"train": 3, "test": 2})
    with pytest.warns(UserWarning, match="3 class folders, CIFAR-10 has 10"):
        splits = load_data(config(), tmp_path / "data", tmp_path / "cache")
    assert splits.source == f"imagefolder at {tmp_path / 'data' / 'pngs'}"
    assert splits.classes == ["apple", "mango", "zebra"]
    assert splits.train_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and splits.test_labels.tolist() == [0, 0, 1, 1, 2, 2]
    np.testing.assert_array_equal(splits.train_images[4], pixels[tmp_path / "data/pngs/train/mango/001.png"])  # png exact
    np.testing.assert_array_equal(splits.test_images[5], pixels[tmp_path / "data/pngs/test/zebra/001.png"])
    jpeg = splits.train_images[6].astype(int) - pixels[tmp_path / "data/pngs/train/zebra/000.JPG"]
    assert jpeg.shape == (32, 32, 3) and 0 < np.abs(jpeg).mean() < 60  # the .JPG was read (lossy, so not exact)


def test_image_folder_cifar_names_use_canonical_order_and_resize_warns(tmp_path):
    folders = ["Truck", "plane", "car"] + CIFAR10_CLASSES[2:-1]  # mixed case, tutorial aliases
    pixels = write_image_folder(tmp_path, folders, {"train": 1, "test": 1})
    Image.new("RGB", (40, 40), (10, 20, 30)).save(tmp_path / "test" / "car" / "000.png")
    with pytest.warns(UserWarning, match="1 of 10 images were not 32x32"):
        splits = load_data(config(), tmp_path, tmp_path / "cache")
    assert splits.classes == CIFAR10_CLASSES
    assert splits.train_images.shape == (10, 32, 32, 3) and splits.train_labels.tolist() == list(range(10))
    for label, folder in [(0, "plane"), (1, "car"), (9, "Truck")]:
        jpeg = splits.train_images[label].astype(int) - pixels[tmp_path / "train" / folder / "000.JPG"]
        assert np.abs(jpeg).mean() < 60, folder  # the image from this folder got this label
    assert splits.test_images.shape == (10, 32, 32, 3) and (splits.test_images[1] == (10, 20, 30)).all()


def test_image_folder_with_test_but_no_train_is_a_clear_error(tmp_path):
    write_image_folder(tmp_path / "half", ["cat", "dog"], {"test": 1})
    with pytest.raises(FileNotFoundError, match=r"half has an ImageFolder test/ split but no train/ split"):
        load_data(config(), tmp_path, tmp_path / "cache")


# ----------------------------------------------------------------------------- download (mocked: no network here)


def test_failed_download_names_the_fixes(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):  # stands in for the network, which this machine does not have
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"DATA_ROOT=.*network is unreachable.*cifar-10-batches-py.*synthetic"):
        load_data(config(), tmp_path / "empty", tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match=r"does not exist.*synthetic"):
        load_data(config(), tmp_path / "missing", tmp_path / "cache")


def test_mocked_download_returns_arrays_and_falls_back_to_cache_dir(tmp_path, monkeypatch):
    import torchvision.datasets

    roots = []

    class FakeCIFAR10:  # mocks the download (no network here); torchvision's attributes: data, targets, classes
        def __init__(self, root, train, download):
            roots.append(root)
            count = 6 if train else 2
            self.data = np.full((count, 32, 32, 3), 7 if train else 9, np.uint8)
            self.targets = list(range(count))
            self.classes = list(CIFAR10_CLASSES)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    splits = load_data(config(val_size=2), tmp_path / "new_root", tmp_path / "cache")
    assert roots == [str(tmp_path / "new_root")] * 2 and splits.source == f"torchvision download at {tmp_path / 'new_root'}"
    assert splits.train_images.shape == (4, 32, 32, 3) and (splits.train_images == 7).all() and (splits.test_images == 9).all()
    assert sorted(splits.train_labels.tolist() + splits.val_labels.tolist()) == list(range(6))
    (tmp_path / "cache" / CACHE_NAME).unlink()
    (tmp_path / "not_a_folder").write_text("")  # DATA_ROOT that cannot be created, like read-only /kaggle/input
    splits = load_data(config(), tmp_path / "not_a_folder" / "input", tmp_path / "cache")
    assert roots[-1] == str(tmp_path / "cache") and len(splits.train_images) == 6


# ----------------------------------------------------------------------------- cache


def test_second_load_reads_the_cache_even_after_the_source_is_gone(tmp_path):
    expected = write_batches(tmp_path / "data" / "cifar-10-batches-py")
    first = load_data(config(), tmp_path / "data", tmp_path / "cache")
    assert "cached" not in first.source and (tmp_path / "cache" / CACHE_NAME).is_file()
    second = load_data(config(), tmp_path / "data", tmp_path / "cache")
    assert second.source == first.source + " (cached)"
    shutil.rmtree(tmp_path / "data" / "cifar-10-batches-py")
    third = load_data(config(), tmp_path / "data", tmp_path / "cache")
    assert third.source.endswith("(cached)")
    for got, want in zip((third.train_images, third.train_labels, third.test_images, third.test_labels), expected):
        np.testing.assert_array_equal(got, want)
    assert third.classes == CIFAR10_CLASSES


def test_a_different_source_invalidates_the_cache(tmp_path):
    write_batches(tmp_path / "a" / "cifar-10-batches-py", seed=0)
    load_data(config(), tmp_path / "a", tmp_path / "cache")
    expected = write_batches(tmp_path / "b" / "cifar-10-batches-py", seed=5)
    splits = load_data(config(), tmp_path / "b", tmp_path / "cache")
    assert "cached" not in splits.source
    np.testing.assert_array_equal(splits.train_images, expected[0])


def test_changed_source_files_invalidate_the_cache(tmp_path):
    folder = tmp_path / "data" / "cifar-10-batches-py"
    write_batches(folder, seed=0)
    load_data(config(), tmp_path / "data", tmp_path / "cache")
    shutil.rmtree(folder)
    expected = write_batches(folder, seed=7)  # the data was fixed in place: same path, new content
    for index, name in enumerate(sorted(path.name for path in folder.iterdir())):
        os.utime(folder / name, ns=(10**18 + index, 10**18 + index))  # a later modification time, whatever the clock
    splits = load_data(config(), tmp_path / "data", tmp_path / "cache")
    assert "cached" not in splits.source
    np.testing.assert_array_equal(splits.train_labels, expected[1])
    assert load_data(config(), tmp_path / "data", tmp_path / "cache").source.endswith("(cached)")


@pytest.mark.parametrize("split", ["data_batch_3", "test_batch"])
def test_labels_outside_the_classes_are_refused_when_loading(tmp_path, split):
    folder = tmp_path / "cifar-10-batches-py"
    write_batches(folder)
    with open(folder / split, "rb") as handle:
        content = pickle.load(handle)
    content[b"labels"][1] = 10
    with open(folder / split, "wb") as handle:
        pickle.dump(content, handle)
    kind = "test" if split == "test_batch" else "train"
    with pytest.raises(ValueError, match=rf"1 {kind} label\(s\) outside 0..9 \(10 classes\), e.g. 10 at index"):
        load_data(config(), tmp_path, tmp_path / "cache")


def test_rows_of_the_wrong_size_name_the_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_batches(folder)
    with open(folder / "data_batch_2", "rb") as handle:
        content = pickle.load(handle)
    content[b"data"] = content[b"data"][:, :1024]  # one colour plane only
    with open(folder / "data_batch_2", "wb") as handle:
        pickle.dump(content, handle)
    with pytest.raises(ValueError, match=r"data_batch_2: image rows have shape \(3, 1024\)"):
        load_data(config(), tmp_path, tmp_path / "cache")


def test_a_batch_with_fewer_labels_than_images_names_the_file_and_the_fix(tmp_path, capsys):
    from nbhelpers.vit.__main__ import main

    folder = tmp_path / "cifar-10-batches-py"
    write_batches(folder)
    with open(folder / "data_batch_4", "rb") as handle:
        content = pickle.load(handle)
    content[b"labels"] = content[b"labels"][:-1]  # 3 images, 2 labels
    with open(folder / "data_batch_4", "wb") as handle:
        pickle.dump(content, handle)
    before = (folder / "data_batch_4").read_bytes()
    with pytest.raises(ValueError, match=r"data_batch_4 holds 3 images but 2 labels.*Re-download / re-extract.*replace that file"):
        load_data(config(), tmp_path, tmp_path / "cache")
    code = main(["--preset", "smoke", "--dataset", "cifar10", "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "data_batch_4 holds 3 images but 2 labels" in err, err
    assert (folder / "data_batch_4").read_bytes() == before and not (tmp_path / "cache").exists()  # nothing changed or cached


@pytest.mark.parametrize("missing", [["test_batch"], ["data_batch_2", "test_batch"], ["data_batch_5"]])
def test_a_batches_folder_missing_files_names_them_instead_of_a_failed_download(tmp_path, monkeypatch, missing):
    import torchvision.datasets

    downloads = []
    # stands in for the network (none here); a download must not even be tried
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda *args, **kwargs: downloads.append(args) or 1 / 0)
    folder = tmp_path / "data" / "cifar-10-batches-py"
    write_batches(folder)
    for name in missing:
        (folder / name).unlink()
    with pytest.raises(FileNotFoundError) as raised:
        load_data(config(), tmp_path / "data", tmp_path / "cache")
    message = str(raised.value)
    assert f"{folder} holds CIFAR-10 batch files but lacks {', '.join(missing)};" in message
    assert "re-download / re-extract cifar-10-python.tar.gz" in message
    assert "failed" not in message and not downloads


def test_a_data_root_that_does_not_exist_is_not_created(tmp_path):
    typo = tmp_path / "datta"
    with pytest.raises(FileNotFoundError, match="DATA_ROOT=.*datta' does not exist. Check the path"):
        load_data(config(data_root=str(typo)), typo, tmp_path / "cache")
    assert not typo.exists()


def test_corrupt_cache_is_ignored_and_rebuilt(tmp_path):
    expected = write_batches(tmp_path / "cifar-10-batches-py")
    cache = tmp_path / "cache" / CACHE_NAME
    cache.parent.mkdir()
    cache.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.warns(UserWarning, match="unreadable cache"):
        splits = load_data(config(), tmp_path, tmp_path / "cache")
    np.testing.assert_array_equal(splits.train_images, expected[0])
    assert load_data(config(), tmp_path, tmp_path / "cache").source.endswith("(cached)")
    assert [path.name for path in cache.parent.iterdir()] == [CACHE_NAME]  # no temp file left behind


# ----------------------------------------------------------------------------- synthetic


def colour_features(images: np.ndarray) -> np.ndarray:
    means = images.reshape(len(images), -1, 3).mean(1)
    return means / means.sum(1, keepdims=True)  # chromaticity: brightness-invariant


def spectrum_features(images: np.ndarray) -> np.ndarray:
    gray = images.astype(float).mean(-1)
    magnitude = np.abs(np.fft.fft2(gray - gray.mean((1, 2), keepdims=True))).reshape(len(images), -1)
    return magnitude / np.linalg.norm(magnitude, axis=1, keepdims=True)  # shift-invariant stripe orientation + frequency


def nearest_centroid_accuracy(train_x, train_y, test_x, test_y) -> float:
    centroids = np.stack([train_x[train_y == label].mean(0) for label in range(10)])
    predictions = ((test_x[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    return float((predictions == test_y).mean())


def test_synthetic_shapes_determinism_and_balance():
    train_images, train_labels, test_images, test_labels = make_synthetic(200, 50, seed=3)
    assert train_images.shape == (200, 32, 32, 3) and test_images.shape == (50, 32, 32, 3)
    assert train_images.dtype == np.uint8 and train_labels.dtype == np.int64
    assert np.bincount(train_labels).tolist() == [20] * 10 and np.bincount(test_labels).tolist() == [5] * 10
    again = make_synthetic(200, 50, seed=3)
    for got, want in zip(again, (train_images, train_labels, test_images, test_labels)):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(make_synthetic(200, 50, seed=4)[0], train_images)
    assert not np.array_equal(train_images[:50], test_images)
    assert make_synthetic(20, 10, image_size=16, num_classes=4)[0].shape == (20, 16, 16, 3)


def test_synthetic_is_learnable_but_not_trivial():
    train_images, train_labels, test_images, test_labels = make_synthetic(1000, 500, seed=0)
    same_class = train_images[train_labels == 0].astype(float)
    assert same_class.std(0).mean() > 20  # images of one class differ (shift, brightness, noise)
    colour_only = nearest_centroid_accuracy(colour_features(train_images), train_labels, colour_features(test_images), test_labels)
    raw_pixels = nearest_centroid_accuracy(train_images.reshape(1000, -1) / 255.0, train_labels, test_images.reshape(500, -1) / 255.0, test_labels)
    spectrum = nearest_centroid_accuracy(spectrum_features(train_images), train_labels, spectrum_features(test_images), test_labels)
    assert colour_only < 0.7 and raw_pixels < 0.7, (colour_only, raw_pixels)  # colour separates only half the classes
    assert spectrum > 0.9, spectrum  # stripe orientation/frequency does the rest


def test_load_data_synthetic_is_not_cached(tmp_path):
    splits = load_data(TrainConfig(dataset="synthetic", synthetic_train_size=100, synthetic_test_size=30, val_size=10), tmp_path, tmp_path / "cache")
    assert splits.source == "synthetic" and len(splits.classes) == 10
    assert (len(splits.train_images), len(splits.val_images), len(splits.test_images)) == (90, 10, 30)
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------- validation split


def test_validation_split_is_disjoint_seeded_and_checked(tmp_path):
    def load(val_size: int, seed: int = 0):
        return load_data(TrainConfig(dataset="synthetic", synthetic_train_size=200, synthetic_test_size=10, val_size=val_size, seed=seed), tmp_path, tmp_path)

    full, split = load(0), load(50)
    assert (len(split.train_images), len(split.val_images)) == (150, 50) and len(split.val_labels) == 50
    rows = {image.tobytes(): label for image, label in zip(full.train_images, full.train_labels)}
    train_rows = {image.tobytes() for image in split.train_images}
    val_rows = {image.tobytes() for image in split.val_images}
    assert not train_rows & val_rows and train_rows | val_rows == set(rows)
    assert all(rows[image.tobytes()] == label for image, label in zip(split.val_images, split.val_labels))
    np.testing.assert_array_equal(load(50).val_images, split.val_images)
    assert not np.array_equal(load(50, seed=1).val_images, split.val_images)
    for bad in (200, -1):
        with pytest.raises(ValueError, match=r"val_size=.*VAL_SIZE"):
            load(bad)
