"""CIFAR-10 as uint8 arrays, from whichever source is at hand, decoded once and cached.

Sources, in order: a `cifar-10-batches-py` folder under DATA_ROOT (read with pickle, not torchvision,
whose md5 check rejects re-packed Kaggle copies); an ImageFolder tree `train/<class>/*`, `test/<class>/*`;
a torchvision download. `dataset='synthetic'` generates a small learnable stand-in for smoke runs.
"""
from __future__ import annotations

import functools
import hashlib
import os
import pickle
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nbhelpers.platform import atomic_write, ensure_writable_dir
from nbhelpers.vit.config import TrainConfig

CIFAR10_CLASSES: list[str] = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SEARCH_DEPTH = 4  # folders below DATA_ROOT searched for a data set (Kaggle nests 2-3 levels deep)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
BATCH_FILES = tuple(f"data_batch_{index}" for index in range(1, 6)) + ("test_batch",)  # a complete cifar-10-batches-py
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
        (batch folders, ImageFolder roots, problems): each list shallowest first; problems are half trees and
        batch folders missing some of BATCH_FILES.
    """
    batches, image_folders, problems = [], [], []
    for folder, subfolders, files in os.walk(data_root, followlinks=True):  # depth limit stops link loops
        depth = len(Path(folder).relative_to(data_root).parts)
        splits = {name.lower(): name for name in subfolders}
        found = [name for name in BATCH_FILES if name in files]
        if len(found) == len(BATCH_FILES):
            batches.append((depth, Path(folder)))
            subfolders.clear()
        elif "train" in splits and "test" in splits and _has_subfolders(Path(folder, splits["train"])):
            image_folders.append((depth, Path(folder)))
            subfolders.clear()
        else:
            if found:  # a half-copied or half-extracted archive: say what is missing, not that a download failed
                missing = ", ".join(name for name in BATCH_FILES if name not in found)
                problems.append(f"{folder} holds CIFAR-10 batch files but lacks {missing}; re-download / re-extract "
                                "cifar-10-python.tar.gz so that it holds data_batch_1..5 and test_batch")
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
        parts = [_batch_arrays(folder / name) for name in names]
        data = np.concatenate([rows for rows, _ in parts])
        labels = np.concatenate([labels for _, labels in parts])
        return np.ascontiguousarray(data.transpose(0, 2, 3, 1)), labels  # (N, 3, H, W) -> (N, H, W, 3)

    train_images, train_labels = read([f"data_batch_{index}" for index in range(1, 6)])
    test_images, test_labels = read(["test_batch"])
    classes = CIFAR10_CLASSES
    if (folder / "batches.meta").is_file():
        names = _unpickle(folder / "batches.meta")["label_names"]
        classes = [name.decode() if isinstance(name, bytes) else str(name) for name in names]
    return train_images, train_labels, test_images, test_labels, classes


def _batch_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file's images (N, 3, 32, 32) uint8 and labels (N,) int64, refused unless there is one label per image."""
    part = _unpickle(path)
    redo = "Re-download / re-extract cifar-10-python.tar.gz, or replace that file with an intact copy."
    if "data" not in part or "labels" not in part:
        raise ValueError(f"{path} has no {'data' if 'data' not in part else 'labels'} entry, so it is not a CIFAR-10 batch. {redo}")
    data = np.asarray(part["data"], dtype=np.uint8)
    labels = np.asarray(part["labels"], dtype=np.int64).reshape(-1)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: image rows have shape {data.shape}, CIFAR-10 rows are 3072 bytes (3x32x32). {redo}")
    if len(data) != len(labels):
        raise ValueError(f"{path} holds {len(data)} images but {len(labels)} labels (one per image expected). {redo}")
    return data.reshape(-1, 3, 32, 32), labels


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


# ----------------------------------------------------------------------------- loading + cache

CACHE_NAME = "cifar10_uint8.npz"


@dataclass
class DataSplits:
    """Train/validation/test images (N, 32, 32, 3) uint8 and labels (N,) int64."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray  # (V, 32, 32, 3); V = val_size, may be 0
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    source: str  # where the pixels came from, with "(cached)" when read from the cache


def load_data(train: TrainConfig, data_root: Path, cache_dir: Path) -> DataSplits:
    """Load CIFAR-10 (or the synthetic set) and hold out `train.val_size` training images for validation.

    Args:
        train: uses dataset, val_size, seed (of the split) and the synthetic_* sizes.
        data_root: searched up to SEARCH_DEPTH levels for CIFAR-10; the download goes here when writable.
        cache_dir: holds `cifar10_uint8.npz` (decoded arrays) and, if DATA_ROOT is read-only, the download.
    Returns:
        DataSplits. Raises FileNotFoundError naming the fixes when no source works.
    """
    if train.dataset == "synthetic":
        # seed 0, not train.seed: the data set stays fixed across runs, like a real one
        generated = make_synthetic(train.synthetic_train_size, train.synthetic_test_size, seed=0)
        arrays, source = (*generated, [f"class_{index}" for index in range(10)]), "synthetic"
    elif train.dataset == "cifar10":
        if train.data_root is not None and not Path(data_root).exists():  # a typo must not create (and download into) a folder
            raise FileNotFoundError(f"DATA_ROOT={str(data_root)!r} does not exist. Check the path, or set DATA_ROOT=None "
                                    "to search (and download into) the platform's default data folder.")
        arrays, source = _load_cifar10(Path(data_root), Path(cache_dir))
    else:
        raise ValueError(f"dataset={train.dataset!r}: use 'cifar10' or 'synthetic'.")
    check_arrays(arrays, source)
    train_images, train_labels, test_images, test_labels, classes = arrays
    train_index, val_index = _validation_split(len(train_labels), train.val_size, train.seed)
    return DataSplits(
        train_images[train_index], train_labels[train_index], train_images[val_index], train_labels[val_index],
        test_images, test_labels, list(classes), source,
    )


def check_arrays(arrays: _Arrays, source: str) -> None:
    """Refuse images that are not (N, 32, 32, 3) uint8 and labels outside 0..classes-1, before any training."""
    train_images, train_labels, test_images, test_labels, classes = arrays
    for split, images, labels in (("train", train_images, train_labels), ("test", test_images, test_labels)):
        if images.dtype != np.uint8 or images.shape[1:] != (32, 32, 3) or len(images) != len(labels):
            raise ValueError(f"{source}: {split} images are {images.dtype} {images.shape} with {len(labels)} labels; "
                             "expected (N, 32, 32, 3) uint8 with one label each. Fix or re-extract the data set.")
        bad = np.flatnonzero((labels < 0) | (labels >= len(classes)))
        if len(bad):
            raise ValueError(f"{source}: {len(bad)} {split} label(s) outside 0..{len(classes) - 1} ({len(classes)} classes), "
                             f"e.g. {labels[bad[0]]} at index {bad[0]}. Fix the labels in the data files; the cache is rebuilt when they change.")


def _validation_split(count: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): a seeded random `val_size` of the training images, each part in original order."""
    if not 0 <= val_size < count:
        raise ValueError(
            f"val_size={val_size} must be between 0 and the number of training images minus one ({count - 1}). "
            f"Set VAL_SIZE=0 for a final run or e.g. VAL_SIZE={min(5000, count // 10)} for tuning."
        )
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(order[val_size:]), np.sort(order[:val_size])


# ----------------------------------------------------------------------------- sources


def _load_cifar10(data_root: Path, cache_dir: Path) -> tuple[_Arrays, str]:
    """Arrays from the first source found under DATA_ROOT (via the cache), else a cache, else a download."""
    cache_path = cache_dir / CACHE_NAME
    batches, image_folders, problems = _find_sources(data_root) if data_root.is_dir() else ([], [], [])
    if batches or image_folders:
        key = f"cifar-10-batches-py at {batches[0]}" if batches else f"imagefolder at {image_folders[0]}"
        fingerprint = source_fingerprint(batches[0] if batches else image_folders[0])
        cached = _read_cache(cache_path, key, fingerprint)
        if cached is not None:
            return cached[0], f"{key} (cached)"
        print(f"[nbhelpers] decoding CIFAR-10 from {key} (once; cached in {cache_path})")
        arrays = _read_batches(batches[0]) if batches else _read_image_folder(image_folders[0])
        _write_cache(cache_path, key, arrays, fingerprint)
        return arrays, key
    if problems:
        raise FileNotFoundError("Incomplete data set: " + "; ".join(problems) + ". " + _FIXES)
    cached = _read_cache(cache_path, key=None)  # the original source is gone, but its decoded copy is not
    if cached is not None:
        return cached[0], f"{cached[1]} (cached)"
    searched = (f"No CIFAR-10 found under DATA_ROOT={str(data_root)!r} (searched {SEARCH_DEPTH} folder levels)"
                if data_root.is_dir() else f"DATA_ROOT={str(data_root)!r} does not exist")
    return _download(data_root, cache_dir, searched)


def _download(data_root: Path, cache_dir: Path, searched: str) -> tuple[_Arrays, str]:
    """torchvision's CIFAR-10 download into DATA_ROOT, or into cache_dir when DATA_ROOT is read-only."""
    try:
        root = ensure_writable_dir(data_root, "DATA_ROOT")
    except PermissionError:  # e.g. Kaggle's read-only /kaggle/input
        root = ensure_writable_dir(cache_dir, "cache folder")
    key = f"torchvision download at {root}"
    try:
        import torchvision.datasets

        datasets = [torchvision.datasets.CIFAR10(str(root), train=split, download=True) for split in (True, False)]
    except Exception as error:  # no network (URLError, OSError, RuntimeError from a failed checksum)
        raise FileNotFoundError(
            f"{searched}, and the torchvision download into {root} failed ({type(error).__name__}: {error}). {_FIXES}"
        ) from error
    train_set, test_set = datasets
    arrays = (
        np.ascontiguousarray(train_set.data, dtype=np.uint8), np.asarray(train_set.targets, dtype=np.int64),
        np.ascontiguousarray(test_set.data, dtype=np.uint8), np.asarray(test_set.targets, dtype=np.int64), list(train_set.classes),
    )
    _write_cache(cache_dir / CACHE_NAME, key, arrays, source_fingerprint(root))
    return arrays, key


# ----------------------------------------------------------------------------- cache


def source_fingerprint(folder: Path) -> str:
    """A digest of every file's relative path, size and modification time under `folder`: changes when the data does."""
    digest = hashlib.sha1()
    for root, subfolders, files in os.walk(folder):
        subfolders.sort()
        for name in sorted(files):
            info = os.stat(os.path.join(root, name))
            digest.update(f"{os.path.relpath(os.path.join(root, name), folder)}|{info.st_size}|{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _read_cache(path: Path, key: str | None, fingerprint: str | None = None) -> tuple[_Arrays, str] | None:
    """(arrays, source) when `path` holds arrays decoded from source `key` whose files still match `fingerprint`
    (key None = any source, e.g. when the source is gone); else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            source = str(stored["source"])
            stored_fingerprint = str(stored["fingerprint"]) if "fingerprint" in stored.files else None
            if key is not None and (source != key or stored_fingerprint != fingerprint):
                return None
            arrays = tuple(stored[name] for name in ("train_images", "train_labels", "test_images", "test_labels"))
            classes = [str(name) for name in stored["classes"]]
        for images, labels in (arrays[:2], arrays[2:]):
            assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3 and len(images) == len(labels)
    except Exception as error:  # truncated zip, wrong content: the cache is only a copy, so rebuild it
        warnings.warn(f"Ignoring the unreadable cache {path} ({type(error).__name__}: {error}); rebuilding it.", stacklevel=3)
        return None
    return (*arrays, classes), source


def _write_cache(path: Path, key: str, arrays: _Arrays, fingerprint: str) -> None:
    """Save atomically (temp file + os.replace); an unwritable cache folder only costs a warning."""
    train_images, train_labels, test_images, test_labels, classes = arrays
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # np.savez gets a file object: given a name it would append ".npz" to it
        atomic_write(path, lambda file: np.savez(
            file, train_images=train_images, train_labels=train_labels, test_images=test_images,
            test_labels=test_labels, classes=np.asarray(classes, dtype=str), source=np.asarray(key),
            fingerprint=np.asarray(fingerprint)))
    except OSError as error:
        warnings.warn(f"Could not write the data cache {path} ({error}); the data will be decoded again next run.", stacklevel=3)


# ----------------------------------------------------------------------------- synthetic data


def make_synthetic(
    train_size: int, test_size: int, seed: int = 0, image_size: int = 32, num_classes: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A learnable stand-in for CIFAR-10: per class, oriented stripes of a class frequency and a class tint.

    Classes c and c + num_classes/2 share a tint and differ in stripe angle by 90 degrees, so colour alone
    separates only half of them; every image gets its own phase (shift), angle/frequency jitter, contrast,
    brightness, tint jitter and pixel noise.

    Args:
        train_size, test_size: images per split (classes balanced to within one image).
        seed: train and test are drawn from the same distribution with separate streams of this seed.
    Returns:
        (train_images, train_labels, test_images, test_labels): (N, S, S, 3) uint8 and (N,) int64.
    """
    train = _synthetic_split(train_size, (seed, 0), image_size, num_classes)
    test = _synthetic_split(test_size, (seed, 1), image_size, num_classes)
    return tuple(array.copy() for array in (*train, *test))  # copies: the cached arrays stay as generated


@functools.lru_cache(maxsize=4)  # ~40 ms per 1,000 images; tests and notebooks regenerate the same splits many times
def _synthetic_split(count: int, stream: tuple[int, int], size: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(list(stream))
    images, labels = _draw_synthetic(count, rng, size, num_classes)
    images.flags.writeable = labels.flags.writeable = False  # cached: callers get copies, and nobody edits these
    return images, labels


def _draw_synthetic(count: int, rng: np.random.Generator, size: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.permutation(np.arange(count) % num_classes).astype(np.int64)
    tint_count = (num_classes + 1) // 2
    hues = (labels % tint_count) / tint_count
    tints = 0.55 + 0.45 * np.cos(2 * np.pi * (hues[:, None] + np.array([0.0, 1 / 3, 2 / 3])))  # (N, 3)
    tints += rng.normal(0.0, 0.06, (count, 3))
    angles = np.pi * labels / num_classes + rng.normal(0.0, 0.06, count)
    frequencies = (2.5 + 1.0 * (labels % 3)) * rng.uniform(0.9, 1.1, count)  # cycles per image side
    phases = rng.uniform(0.0, 2 * np.pi, count)
    y, x = np.mgrid[0:size, 0:size] / size  # (S, S) each
    along = x[None] * np.cos(angles)[:, None, None] + y[None] * np.sin(angles)[:, None, None]  # (N, S, S)
    waves = np.sin(2 * np.pi * frequencies[:, None, None] * along + phases[:, None, None])
    gray = 0.5 + 0.5 * rng.uniform(0.4, 0.8, (count, 1, 1)) * waves
    images = rng.uniform(0.6, 1.15, (count, 1, 1, 1)) * gray[..., None] * tints[:, None, None, :]  # (N, S, S, 3)
    images += rng.normal(0.0, 0.08, images.shape)
    return np.clip(np.rint(images * 255), 0, 255).astype(np.uint8), labels
