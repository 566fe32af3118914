"""Finding CIFAR-10 under DATA_ROOT and decoding its on-disk formats (pickle batches, ImageFolder tree)."""
from __future__ import annotations

import os
import pickle
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

CIFAR10_CLASSES: list[str] = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SEARCH_DEPTH = 4  # folders below DATA_ROOT searched for a data set (Kaggle nests 2-3 levels deep)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_CLASS_ALIASES = {"plane": "airplane", "car": "automobile"}  # the PyTorch tutorial's short names
_FIXES = (
    "Fix: put a `cifar-10-batches-py` folder or an ImageFolder tree `train/<class>/*`, `test/<class>/*` under "
    "DATA_ROOT=..., attach the Kaggle CIFAR-10 data set (Add Input), enable internet for the download, "
    "or use DATASET='synthetic' (PRESET='smoke') for a smoke run."
)

# Arrays as they are decoded and cached, before the validation split: train/test images + labels, class names.
_Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]


# ----------------------------------------------------------------------------- source search


def _find_sources(data_root: Path) -> tuple[list[Path], list[Path], list[str]]:
    """Walk DATA_ROOT (at most SEARCH_DEPTH levels) for pickle folders and ImageFolder roots.

    Returns:
        (batch folders, ImageFolder roots, problems): each list shallowest first; problems are half trees.
    """
    batches, image_folders, problems = [], [], []
    for folder, subfolders, files in os.walk(data_root, followlinks=True):  # depth limit stops link loops
        depth = len(Path(folder).relative_to(data_root).parts)
        splits = {name.lower(): name for name in subfolders}
        if "data_batch_1" in files and "test_batch" in files:
            batches.append((depth, Path(folder)))
            subfolders.clear()
        elif "train" in splits and "test" in splits and _has_subfolders(Path(folder, splits["train"])):
            image_folders.append((depth, Path(folder)))
            subfolders.clear()
        else:
            for present, absent in (("test", "train"), ("train", "test")):
                if present in splits and absent not in splits and _has_subfolders(Path(folder, splits[present])):
                    problems.append(f"{folder} has an ImageFolder {present}/ split but no {absent}/ split; add it")
            subfolders[:] = [] if depth >= SEARCH_DEPTH else sorted(n for n in subfolders if not n.startswith("."))
    return [path for _, path in sorted(batches)], [path for _, path in sorted(image_folders)], problems


def _has_subfolders(folder: Path) -> bool:
    return any(entry.is_dir() for entry in os.scandir(folder))


# ----------------------------------------------------------------------------- readers


def _unpickle(path: Path) -> dict:
    """One CIFAR-10 pickle (Python 2 format, bytes keys) with a message naming the file when it is broken."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the CIFAR-10 folder. Re-extract cifar-10-python.tar.gz. {_FIXES}")
    try:
        with open(path, "rb") as handle:
            content = pickle.load(handle, encoding="bytes")
        return {(key.decode() if isinstance(key, bytes) else key): value for key, value in content.items()}
    except (EOFError, pickle.UnpicklingError, ValueError, AttributeError, TypeError) as error:
        raise ValueError(
            f"{path} is truncated or not a CIFAR-10 pickle ({type(error).__name__}: {error}). "
            f"Re-download / re-extract cifar-10-python.tar.gz into that folder, or delete the folder to download it."
        ) from error


def _read_batches(folder: Path) -> _Arrays:
    """data_batch_1..5 and test_batch: rows of 3072 bytes = R, G, B planes of 32x32, row-major."""
    def read(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        parts = [_unpickle(folder / name) for name in names]
        data = np.concatenate([np.asarray(part["data"], dtype=np.uint8).reshape(-1, 3, 32, 32) for part in parts])
        labels = np.concatenate([np.asarray(part["labels"], dtype=np.int64) for part in parts])
        assert len(data) == len(labels), f"{folder}: {len(data)} images but {len(labels)} labels"
        return np.ascontiguousarray(data.transpose(0, 2, 3, 1)), labels  # (N, 3, H, W) -> (N, H, W, 3)

    train_images, train_labels = read([f"data_batch_{index}" for index in range(1, 6)])
    test_images, test_labels = read(["test_batch"])
    classes = CIFAR10_CLASSES
    if (folder / "batches.meta").is_file():
        names = _unpickle(folder / "batches.meta")["label_names"]
        classes = [name.decode() if isinstance(name, bytes) else str(name) for name in names]
    return train_images, train_labels, test_images, test_labels, classes


def _class_order(names: list[str]) -> tuple[list[str], list[str]]:
    """(folder names, reported class names): canonical CIFAR-10 order when the folders are its classes."""
    canonical = [_CLASS_ALIASES.get(name.lower(), name.lower()) for name in names]
    if sorted(canonical) == sorted(CIFAR10_CLASSES):
        by_canonical = dict(zip(canonical, names))
        return [by_canonical[name] for name in CIFAR10_CLASSES], list(CIFAR10_CLASSES)
    return sorted(names), sorted(names)


def _read_image_folder(root: Path) -> _Arrays:
    """Decode `train/<class>/*` and `test/<class>/*` (png/jpg/jpeg) with a thread pool."""
    splits = {entry.name.lower(): Path(entry.path) for entry in os.scandir(root) if entry.is_dir()}
    train_names = sorted(entry.name for entry in os.scandir(splits["train"]) if entry.is_dir())
    test_names = sorted(entry.name for entry in os.scandir(splits["test"]) if entry.is_dir())
    if train_names != test_names:
        raise ValueError(f"{root}: train/ classes {train_names} differ from test/ classes {test_names}. "
                         "Make both splits hold the same class folders.")
    folders, classes = _class_order(train_names)
    if len(classes) != 10:
        warnings.warn(f"{root}: {len(classes)} class folders, CIFAR-10 has 10: {classes}", stacklevel=3)
    arrays = []
    for split in ("train", "test"):
        files, labels = [], []
        for label, name in enumerate(folders):
            found = sorted(path for path in (splits[split] / name).iterdir() if path.suffix.lower() in IMAGE_EXTENSIONS)
            files += found
            labels += [label] * len(found)
        if not files:
            raise FileNotFoundError(f"{splits[split]} holds no .png/.jpg/.jpeg images in its class folders. {_FIXES}")
        arrays += [_decode_images(files), np.asarray(labels, dtype=np.int64)]
    return arrays[0], arrays[1], arrays[2], arrays[3], classes


def _decode_images(files: list[Path], size: int = 32) -> np.ndarray:
    """(N, size, size, 3) uint8; images of another size are resized (with one warning)."""
    from PIL import Image

    def decode(path: Path) -> tuple[np.ndarray, bool]:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                resized = image.size != (size, size)
                if resized:
                    image = image.resize((size, size), Image.BICUBIC)
                return np.asarray(image, dtype=np.uint8), resized
        except OSError as error:
            raise ValueError(f"{path} cannot be decoded ({error}). Delete or replace that file.") from error

    with ThreadPoolExecutor(max_workers=16) as pool:  # PIL decoding releases the GIL
        results = list(pool.map(decode, files))
    resized = sum(flag for _, flag in results)
    if resized:
        warnings.warn(f"{resized} of {len(files)} images were not {size}x{size} and were resized", stacklevel=4)
    return np.stack([pixels for pixels, _ in results])
