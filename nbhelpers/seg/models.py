"""Load the segmentation models (Hugging Face transformers) once: GroundingDINO-family detectors, SAM 2.1 and
CLIPSeg for the default backend, SAM 3 (image and video) for the other (running them: seg.inference, seg.backends).

The detector loads through transformers' zero-shot detection Auto classes, so GroundingDINO (tiny/base),
MM-Grounding-DINO and LLMDet checkpoints (MMGroundingDinoForObjectDetection: same processor and post-processing)
all work. `facebook/sam3` is gated: a refused download (401/403/gated) gets a message naming the fixes.

Every model argument takes a hub id ("IDEA-Research/grounding-dino-tiny"), a short name ("tiny",
"base-plus") or a local folder written by `save_pretrained` / `hf download --local-dir` (offline Kaggle:
the model attached as a data set). Loading is lazy and cached per process by (kind, source, device, dtype).

Precision: weights stay fp32 on every device. On CUDA with bf16 support GroundingDINO runs under bf16
autocast (measured on an H100: 70 ms vs 93 ms in fp32 for the default config at 800x1200);
autocast keeps box regression and sigmoid scores in fp32, which casting the weights to bf16 would not.
fp16 is not used for GroundingDINO (no measured gain, and its text-image fusion needs clamps against fp16
overflow). SAM 2.1 stays fp32: measured on an H100, SAM 2.1 tiny under bf16 autocast was slower than fp32
(16.2 ms vs 14.7 ms).
CLIPSeg runs only as a fallback and is small: fp32.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from nbhelpers.platform import Runtime, select_runtime, widget_bars_freeze
from nbhelpers.seg.types import DEFAULT_CLIPSEG, DEFAULT_DINO, DEFAULT_SAM, DEFAULT_SAM3


SHORT_NAMES = {
    "grounding-dino": {"tiny": "IDEA-Research/grounding-dino-tiny", "base": "IDEA-Research/grounding-dino-base",
                       "mm-tiny": "openmmlab-community/mm_grounding_dino_tiny_o365v1_goldg_v3det",
                       **{f"llmdet-{size}": f"iSEE-Laboratory/llmdet_{size}" for size in ("tiny", "base", "large")}},
    "sam2": {name: f"facebook/sam2.1-hiera-{name}" for name in ("tiny", "small", "base-plus", "large")},
    "clipseg": {"rd64-refined": "CIDAS/clipseg-rd64-refined", "rd64": "CIDAS/clipseg-rd64-refined"},
}
SHORT_NAMES["sam2-video"] = SHORT_NAMES["sam2"]  # the same hub checkpoints hold the video predictor
SHORT_NAMES["sam3"] = SHORT_NAMES["sam3-video"] = {"sam3": DEFAULT_SAM3}
# config.json model_type prefixes accepted per kind (a folder of another model is refused before loading)
EXPECTED_MODEL_TYPE = {"grounding-dino": ("grounding-dino", "mm-grounding-dino"), "sam2": ("sam2",),
                       "sam2-video": ("sam2",), "clipseg": ("clipseg",), "sam3": ("sam3",), "sam3-video": ("sam3",)}


class ModelLoadError(ValueError):
    """A model id or folder that cannot be loaded; the message names the fix."""


# ----------------------------------------------------------------------------- resolving ids and folders


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else with a path shape is meant as a folder.
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1 or (len(name) > 1 and name[1] == ":")


def _find_model_folder(folder: Path) -> Path:
    """The folder itself, or the one folder below it that holds config.json (Kaggle data sets nest)."""
    if (folder / "config.json").is_file():
        return folder
    found = sorted(folder.glob("*/config.json")) + sorted(folder.glob("*/*/config.json"))
    if len(found) == 1:
        return found[0].parent
    raise ModelLoadError(
        f"model folder {str(folder)!r} has no config.json"
        + (f" (several candidates below it: {[str(path.parent) for path in found]})" if found else "")
        + ". Point the model argument at the folder written by save_pretrained / `hf download ID --local-dir DIR`."
    )


def resolve_model_source(model: str | os.PathLike, kind: str) -> tuple[str, bool]:
    """Turn a hub id, short name or folder into what from_pretrained gets.

    Args:
        model: hub id, short name (see SHORT_NAMES[kind]) or local folder.
        kind: "grounding-dino", "sam2" or "clipseg".
    Returns:
        (source, is_local): a hub id or an absolute folder path.
    """
    name = str(model).strip()
    if not name:
        raise ModelLoadError(f"empty {kind} model name; use e.g. {next(iter(SHORT_NAMES[kind].values()))!r} or a folder")
    path = Path(name).expanduser()
    if path.is_dir():
        return str(_find_model_folder(path.resolve())), True
    if name in SHORT_NAMES[kind]:
        return SHORT_NAMES[kind][name], False
    if path.exists() or _looks_like_path(name):
        raise ModelLoadError(
            f"{kind} model folder {name!r} does not exist. Check the path (on Kaggle: /kaggle/input/<dataset>/...), "
            f"or pass a hub id such as {next(iter(SHORT_NAMES[kind].values()))!r}."
        )
    return name, False


def _offline_message(kind: str, model_id: str, error: Exception) -> str:
    return (
        f"cannot load {kind} model {model_id!r} from the Hugging Face hub or its local cache "
        f"({type(error).__name__}: {str(error).splitlines()[0]}). If the id is right and this machine is offline "
        f"(e.g. Kaggle with internet off): on a machine with internet run `hf download {model_id} --local-dir DIR` "
        f"(older huggingface_hub: `huggingface-cli download {model_id} --local-dir DIR`), copy DIR here or attach "
        f"it as a Kaggle data set, then pass that folder path instead of the id."
    )


def _access_refused(error: BaseException) -> bool:
    """True when the hub refused the download (gated licence not accepted, no or wrong token: 401/403)."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    seen: BaseException | None = error
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(seen, GatedRepoError) or "gated repo" in str(seen).lower() or (
                isinstance(seen, HfHubHTTPError) and getattr(response, "status_code", None) in (401, 403)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _gated_message(kind: str, model_id: str, error: Exception) -> str:
    return (
        f"the hub refused {kind} model {model_id!r} ({type(error).__name__}: {str(error).splitlines()[0]}): it is gated "
        f"(licence to accept) or needs a login. Fix: (1) accept the licence on https://huggingface.co/{model_id} with "
        f"your account, create a read token and set it as HF_TOKEN (Kaggle: Add-ons > Secrets, then "
        f"`os.environ['HF_TOKEN'] = UserSecretsClient().get_secret('HF_TOKEN')`; Colab: the key icon, secret HF_TOKEN); "
        f"or (2) on a machine with access run `hf download {model_id} --local-dir DIR`, attach DIR as a Kaggle data set "
        f"and pass that folder path instead of the id."
    )


def _check_model_type(folder: str, kind: str) -> None:
    try:
        model_type = json.loads((Path(folder) / "config.json").read_text()).get("model_type", "")
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{folder}/config.json cannot be read ({error}); re-download the {kind} model.") from error
    expected = EXPECTED_MODEL_TYPE[kind]
    if not model_type.replace("_", "-").startswith(expected):
        raise ModelLoadError(
            f"{folder} holds a {model_type!r} model, not {' / '.join(expected)}: pass the {kind} folder for this argument."
        )


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class LoadedModel:
    """One model with its processor, on its device, and where it came from."""

    model: Any  # a transformers PreTrainedModel in eval mode
    processor: Any  # the matching transformers processor
    model_id: str  # hub id or absolute folder path
    device: torch.device
    dtype: torch.dtype  # weight dtype
    amp_dtype: torch.dtype | None  # autocast dtype for forward passes (None: plain fp32)
    backend: str  # e.g. "transformers:GroundingDinoForObjectDetection"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


_CACHE: dict[tuple, LoadedModel] = {}


def text_token_limit(loaded: LoadedModel) -> int:
    """Most tokens (special tokens included) the model's text encoder reads: the smaller of its tokenizer's
    `model_max_length` (absent from some tokenizer configs) and the model config's own bound (GroundingDINO:
    `max_text_len`; CLIPSeg, SAM 3: the text encoder's `max_position_embeddings`; SAM 3 video: its detector's)."""
    config = loaded.model.config
    config = getattr(config, "detector_config", None) or config  # SAM 3 video: the detector reads the text
    text_config = getattr(config, "text_config", None)
    bound = getattr(config, "max_text_len", None) or getattr(text_config, "max_position_embeddings", None)
    tokenizer = getattr(loaded.processor, "tokenizer", None)
    limits = [limit for limit in (bound, getattr(tokenizer, "model_max_length", None)) if limit]
    if not limits:
        raise ValueError(f"{loaded.model_id}: its config names no text length limit (max_text_len or the text encoder's "
                         "max_position_embeddings); give a GroundingDINO, CLIPSeg or SAM 3 checkpoint.")
    return int(min(limits))


def _runtime(runtime: Runtime | None) -> Runtime:
    return runtime if runtime is not None else select_runtime(None, "auto", compile=False)


def _bf16(runtime: Runtime) -> bool:
    """bf16 where it pays: a CUDA device whose runtime chose bf16 (select_runtime checks the GPU supports it)."""
    return runtime.is_cuda and runtime.amp_dtype == torch.bfloat16


@contextlib.contextmanager
def _no_frozen_loading_bars() -> Iterator[None]:
    """transformers' bars ("Loading weights", downloads) are tqdm.auto widgets: in a notebook executed headless they
    would be saved as a frozen "0%", so there they are off while loading, and restored after."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as transformers_logging

    if not (widget_bars_freeze() and transformers_logging.is_progress_bar_enabled()):
        yield
        return
    hub_bars_were_off = hub_utils.are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()  # transformers' bars and huggingface_hub's (downloads)
    try:
        yield
    finally:
        transformers_logging.enable_progress_bar()
        if hub_bars_were_off:
            hub_utils.disable_progress_bars()


def _load(kind: str, model: str | os.PathLike, runtime: Runtime | None, model_class, processor_class,
          amp_dtype: torch.dtype | None, weight_dtype: torch.dtype = torch.float32) -> LoadedModel:
    runtime = _runtime(runtime)
    source, is_local = resolve_model_source(model, kind)
    key = (kind, source, str(runtime.device), weight_dtype, amp_dtype)
    if key in _CACHE:
        return _CACHE[key]
    if is_local:
        _check_model_type(source, kind)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        with _no_frozen_loading_bars():
            processor = processor_class.from_pretrained(source, local_files_only=offline)
            network = model_class.from_pretrained(source, local_files_only=offline, dtype=weight_dtype)
    except OSError as error:
        if is_local:
            raise ModelLoadError(f"{kind} folder {source!r} is incomplete or unreadable: {error}") from error
        if _access_refused(error):
            raise ModelLoadError(_gated_message(kind, source, error)) from error
        raise ModelLoadError(_offline_message(kind, source, error)) from error
    network = network.to(runtime.device).eval()
    loaded = LoadedModel(network, processor, source, runtime.device, weight_dtype, amp_dtype,
                         f"transformers:{type(network).__name__}")
    _CACHE[key] = loaded
    return loaded


def load_grounding_dino(model_id: str | os.PathLike = DEFAULT_DINO, runtime: Runtime | None = None) -> LoadedModel:
    """Text-prompted box detector of the GroundingDINO family (bf16 autocast on bf16-capable CUDA GPUs, else fp32).

    Loaded through AutoModelForZeroShotObjectDetection / AutoProcessor, so GroundingDINO, MM-Grounding-DINO and
    LLMDet checkpoints all work (they share the processor and `post_process_grounded_object_detection`).
    Args:
        model_id: hub id, a short name ("tiny", "base", "mm-tiny", "llmdet-tiny" / "-base" / "-large") or a folder.
        runtime: from nbhelpers.platform.select_runtime; None = auto.
    Returns:
        LoadedModel (cached: a second call returns the same object).
    """
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    runtime = _runtime(runtime)
    amp = torch.bfloat16 if _bf16(runtime) else None
    return _load("grounding-dino", model_id, runtime, AutoModelForZeroShotObjectDetection, AutoProcessor, amp)


class _DropSam2VideoNotice(logging.Filter):
    # The hub's facebook/sam2.1-hiera-* repos are `sam2_video` checkpoints; loading their image part into
    # Sam2Model is the intended use, so transformers' "model of type sam2_video" warning is only noise here.
    def filter(self, record: logging.LogRecord) -> bool:
        return "`sam2_video` to instantiate a model of type `sam2`" not in record.getMessage()


def load_sam2(model_id: str | os.PathLike = DEFAULT_SAM, runtime: Runtime | None = None) -> LoadedModel:
    """SAM 2.1 image predictor, fp32 (see the module docstring). Short names: tiny, small, base-plus, large."""
    from transformers import Sam2Model, Sam2Processor

    config_logger, notice_filter = logging.getLogger("transformers.configuration_utils"), _DropSam2VideoNotice()
    config_logger.addFilter(notice_filter)
    try:
        return _load("sam2", model_id, runtime, Sam2Model, Sam2Processor, None)
    finally:
        config_logger.removeFilter(notice_filter)


def load_sam2_video(model_id: str | os.PathLike = DEFAULT_SAM, runtime: Runtime | None = None) -> LoadedModel:
    """SAM 2.1 video predictor (Sam2VideoModel) for streaming propagation.

    bf16 weights on bf16-capable CUDA GPUs (the path measured at 33 frames/s streaming 720p on an H100), else fp32.
    Short names as for `load_sam2`; the hub's facebook/sam2.1-hiera-* repos hold this model.
    """
    from transformers import Sam2VideoModel, Sam2VideoProcessor

    runtime = _runtime(runtime)
    weights = torch.bfloat16 if _bf16(runtime) else torch.float32
    return _load("sam2-video", model_id, runtime, Sam2VideoModel, Sam2VideoProcessor, None, weights)


def load_clipseg(model_id: str | os.PathLike = DEFAULT_CLIPSEG, runtime: Runtime | None = None) -> LoadedModel:
    """CLIPSeg text-conditioned segmenter (fallback when GroundingDINO finds nothing), fp32."""
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    return _load("clipseg", model_id, runtime, CLIPSegForImageSegmentation, CLIPSegProcessor, None)


def load_sam3(model_id: str | os.PathLike = DEFAULT_SAM3, runtime: Runtime | None = None) -> LoadedModel:
    """SAM 3 image model (Sam3Model + Sam3Processor): text concept -> every instance's mask. fp32 weights, bf16
    autocast on bf16-capable CUDA GPUs. Gated on the hub: see the module docstring."""
    from transformers import Sam3Model, Sam3Processor

    runtime = _runtime(runtime)
    amp = torch.bfloat16 if _bf16(runtime) else None
    return _load("sam3", model_id, runtime, Sam3Model, Sam3Processor, amp)


def load_sam3_video(model_id: str | os.PathLike = DEFAULT_SAM3, runtime: Runtime | None = None) -> LoadedModel:
    """SAM 3 video model (Sam3VideoModel + Sam3VideoProcessor) for streaming detection and tracking; bf16 weights
    on bf16-capable CUDA GPUs (as for SAM 2 video), else fp32."""
    from transformers import Sam3VideoModel, Sam3VideoProcessor

    runtime = _runtime(runtime)
    weights = torch.bfloat16 if _bf16(runtime) else torch.float32
    return _load("sam3-video", model_id, runtime, Sam3VideoModel, Sam3VideoProcessor, None, weights)


@dataclass(frozen=True)
class Sam3Models:
    """SAM 3's image model and, for videos, its video model (loaded on first use: most runs are images only)."""

    image: LoadedModel
    video_id: str  # hub id or folder of the Sam3VideoModel checkpoint

    def describe(self) -> dict[str, str]:
        """Model ids and backends, for metadata files."""
        return {"sam3_model": self.image.model_id, "sam3_backend": self.image.backend,
                "sam3_video_model": self.video_id, "device": str(self.image.device)}

    def video(self) -> LoadedModel:
        """The Sam3VideoModel on the image model's device (cached after the first call)."""
        runtime = select_runtime(str(self.image.device), "auto", compile=False, verbose=False)
        return load_sam3_video(self.video_id, runtime)


def load_sam3_models(sam3: str | os.PathLike = DEFAULT_SAM3, sam3_video: str | os.PathLike | None = None,
                     device: str | None = None, precision: str = "auto") -> Sam3Models:
    """Load (or reuse) the SAM 3 image model; the video model (`sam3_video`, None = the same checkpoint) loads when
    a video is first segmented.

    Args:
        sam3: hub id, "sam3" or a local folder. device, precision: as for `load_models`.
    Returns:
        Sam3Models.
    """
    runtime = select_runtime(device, precision, compile=False)
    video_id = sam3 if sam3_video is None else sam3_video
    resolve_model_source(video_id, "sam3-video")  # a mistyped video folder fails now, not at the first video
    return Sam3Models(load_sam3(sam3, runtime), str(video_id))


@dataclass(frozen=True)
class SegmentationModels:
    """The three models behind `segment_image`."""

    dino: LoadedModel
    sam: LoadedModel
    clipseg: LoadedModel

    def describe(self) -> dict[str, str]:
        """Model ids and backends, for metadata files."""
        return {f"{name}_model": getattr(self, name).model_id for name in ("dino", "sam", "clipseg")} | {
            f"{name}_backend": getattr(self, name).backend for name in ("dino", "sam", "clipseg")
        } | {"device": str(self.dino.device)}


def load_models(dino: str | os.PathLike = DEFAULT_DINO, sam: str | os.PathLike = DEFAULT_SAM,
                clipseg: str | os.PathLike = DEFAULT_CLIPSEG, device: str | None = None,
                precision: str = "auto") -> SegmentationModels:
    """Load (or reuse) GroundingDINO, SAM 2.1 and CLIPSeg on one device.

    Args:
        dino, sam, clipseg: hub ids, short names or local folders.
        device: "cuda", "cpu", "mps" or None (auto).
        precision: passed to select_runtime; "fp32" turns GroundingDINO autocast off.
    Returns:
        SegmentationModels.
    """
    runtime = select_runtime(device, precision, compile=False)
    return SegmentationModels(load_grounding_dino(dino, runtime), load_sam2(sam, runtime), load_clipseg(clipseg, runtime))


def release(kind: str, keep: LoadedModel | None = None) -> int:
    """Drop the cached models of one kind, except `keep`, and return freed GPU memory to the driver.

    The memory is freed once no caller holds the dropped models any more (e.g. the UI's previous SAM size).
    Args:
        kind: "grounding-dino", "sam2" or "clipseg".
        keep: a loaded model of that kind to keep cached (None: drop them all).
    Returns:
        How many cache entries were dropped.
    """
    if kind not in EXPECTED_MODEL_TYPE:
        raise ValueError(f"unknown model kind {kind!r}; use one of {list(EXPECTED_MODEL_TYPE)}.")
    dropped = [key for key, loaded in _CACHE.items() if key[0] == kind and loaded is not keep]
    on_cuda = any(_CACHE[key].device.type == "cuda" for key in dropped)
    for key in dropped:
        del _CACHE[key]
    if dropped:
        gc.collect()  # modules can sit in reference cycles; collect them before asking CUDA for the memory
    if on_cuda:
        torch.cuda.empty_cache()
    return len(dropped)
