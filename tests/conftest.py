"""Shared fixtures: tiny random segmentation models, built once per test session (a few seconds); benchmark scripts
loaded as modules; torch on one thread."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# One intra-op thread for torch here and in every process a test starts (papermill kernels, CLIs, torchrun, the
# browser's kernel): the tiny models gain nothing from a second thread, and on CI's 2 cores two spinning OpenMP threads
# compete with those processes. Measured on the whole suite: about a quarter less CPU time and a tenth less wall time
# (benchmarks/RESULTS.md). Set before torch is imported; a value already in the environment wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_seg_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"dino", "sam", "clipseg"} -> folders of tiny random models with real processors (save_pretrained)."""
    from nbhelpers.testing import build_tiny_segmentation_models

    return build_tiny_segmentation_models(tmp_path_factory.mktemp("tiny-seg-models"))


@pytest.fixture(scope="session")
def tiny_seg_models(tiny_seg_model_dirs: dict[str, Path]):
    """The tiny models loaded on the CPU through nbhelpers.seg.models.load_models (from_pretrained)."""
    from nbhelpers.seg.models import load_models

    dirs = tiny_seg_model_dirs
    return load_models(dino=dirs["dino"], sam=dirs["sam"], clipseg=dirs["clipseg"], device="cpu")


@pytest.fixture(scope="session")
def tiny_sam3_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"sam3", "sam3_video"} -> folders of tiny random SAM 3 image and video models (save_pretrained)."""
    from nbhelpers.testing import build_tiny_sam3_models

    return build_tiny_sam3_models(tmp_path_factory.mktemp("tiny-sam3-models"))


@pytest.fixture
def one_thread():
    """torch on one thread for the test, whatever OMP_NUM_THREADS says: torchrun starts each process with one thread,
    so an in-process run compared with it must reduce floats in the same order; and two spinning OpenMP threads on a
    busy 2-core machine stall each other, which makes timing tests erratic."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def benchmark_script():
    """NAME -> benchmarks/NAME.py loaded as a module, once per session: its main(argv) then runs in this process,
    without a fresh interpreter and torch import (several seconds of CPU) per run."""
    loaded = {}

    def load(name: str):
        if name not in loaded:
            spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
            saved_path = list(sys.path)
            try:
                spec.loader.exec_module(module)
            finally:
                sys.path[:] = saved_path  # the scripts put benchmarks/ (and the checkout) first for their own imports
            loaded[name] = module
        return loaded[name]

    return load
