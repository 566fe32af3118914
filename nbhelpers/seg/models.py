"""Load GroundingDINO, SAM 2.1 and CLIPSeg (Hugging Face transformers) once, and run each on images.

Every model argument takes a hub id ("IDEA-Research/grounding-dino-tiny"), a short name ("tiny",
"base-plus") or a local folder written by `save_pretrained` / `hf download --local-dir` (offline Kaggle:
the model attached as a data set). Loading is lazy and cached per process by (kind, source, device, dtype).

Precision: weights stay fp32 on every device. On CUDA with bf16 support GroundingDINO runs under bf16
autocast (measured 70 ms vs 93 ms fp32 for the default config at 800x1200 on an H100, see NOTES.md);
autocast keeps box regression and sigmoid scores in fp32, which casting the weights to bf16 would not.
fp16 is not used for GroundingDINO (no measured gain, and its text-image fusion needs clamps against fp16
overflow). SAM 2.1 stays fp32: its bf16 autocast was slower than fp32 (16.2 ms vs 14.7 ms, NOTES.md).
CLIPSeg runs only as a fallback and is small: fp32.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from nbhelpers.platform import Runtime, select_runtime

DEFAULT_DINO = "IDEA-Research/grounding-dino-tiny"
DEFAULT_SAM = "facebook/sam2.1-hiera-tiny"
DEFAULT_CLIPSEG = "CIDAS/clipseg-rd64-refined"

SHORT_NAMES = {
    "grounding-dino": {"tiny": "IDEA-Research/grounding-dino-tiny", "base": "IDEA-Research/grounding-dino-base"},
    "sam2": {name: f"facebook/sam2.1-hiera-{name}" for name in ("tiny", "small", "base-plus", "large")},
    "clipseg": {"rd64-refined": "CIDAS/clipseg-rd64-refined", "rd64": "CIDAS/clipseg-rd64-refined"},
}
EXPECTED_MODEL_TYPE = {"grounding-dino": "grounding-dino", "sam2": "sam2", "clipseg": "clipseg"}


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


def _check_model_type(folder: str, kind: str) -> None:
    try:
        model_type = json.loads((Path(folder) / "config.json").read_text()).get("model_type", "")
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{folder}/config.json cannot be read ({error}); re-download the {kind} model.") from error
    expected = EXPECTED_MODEL_TYPE[kind]
    if not model_type.replace("_", "-").startswith(expected):
        raise ModelLoadError(
            f"{folder} holds a {model_type!r} model, not {expected!r}: pass the {kind} folder for this argument."
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


def _runtime(runtime: Runtime | None) -> Runtime:
    return runtime if runtime is not None else select_runtime(None, "auto", compile=False)


def _load(kind: str, model: str | os.PathLike, runtime: Runtime | None, model_class, processor_class,
          amp_dtype: torch.dtype | None) -> LoadedModel:
    runtime = _runtime(runtime)
    source, is_local = resolve_model_source(model, kind)
    key = (kind, source, str(runtime.device), torch.float32, amp_dtype)
    if key in _CACHE:
        return _CACHE[key]
    if is_local:
        _check_model_type(source, kind)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        processor = processor_class.from_pretrained(source, local_files_only=offline)
        network = model_class.from_pretrained(source, local_files_only=offline, dtype=torch.float32)
    except OSError as error:
        if is_local:
            raise ModelLoadError(f"{kind} folder {source!r} is incomplete or unreadable: {error}") from error
        raise ModelLoadError(_offline_message(kind, source, error)) from error
    network = network.to(runtime.device).eval()
    loaded = LoadedModel(network, processor, source, runtime.device, torch.float32, amp_dtype,
                         f"transformers:{type(network).__name__}")
    _CACHE[key] = loaded
    return loaded


def load_grounding_dino(model_id: str | os.PathLike = DEFAULT_DINO, runtime: Runtime | None = None) -> LoadedModel:
    """GroundingDINO detector (bf16 autocast on bf16-capable CUDA GPUs, else fp32).

    Args:
        model_id: hub id, "tiny" / "base", or a local folder.
        runtime: from nbhelpers.platform.select_runtime; None = auto.
    Returns:
        LoadedModel (cached: a second call returns the same object).
    """
    from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

    runtime = _runtime(runtime)
    amp = torch.bfloat16 if runtime.is_cuda and runtime.amp_dtype == torch.bfloat16 else None
    return _load("grounding-dino", model_id, runtime, GroundingDinoForObjectDetection, GroundingDinoProcessor, amp)


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


def load_clipseg(model_id: str | os.PathLike = DEFAULT_CLIPSEG, runtime: Runtime | None = None) -> LoadedModel:
    """CLIPSeg text-conditioned segmenter (fallback when GroundingDINO finds nothing), fp32."""
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    return _load("clipseg", model_id, runtime, CLIPSegForImageSegmentation, CLIPSegProcessor, None)


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


def clear_model_cache() -> None:
    """Forget loaded models (frees their memory once no caller holds them)."""
    _CACHE.clear()


# ----------------------------------------------------------------------------- running the models

# Upsampling SAM's low-resolution logits to the original size is done in chunks of boxes so that the float
# intermediate stays under this many bytes even for 50-megapixel photos with many boxes.
MAX_UPSAMPLE_BYTES = 256 * 2**20


@dataclass
class Detections:
    """GroundingDINO boxes for one image, before NMS."""

    boxes: np.ndarray  # (N, 4) float32 xyxy in original-image pixels, clipped to the image
    scores: np.ndarray  # (N,) float32 box confidence (max token probability)
    phrase_index: np.ndarray  # (N,) int64 index into the prompt's phrases


def phrase_token_map(input_ids: list[int], tokenizer) -> np.ndarray:
    """Map each token position to its phrase number; -1 for special tokens and the '.' separators."""
    separator = tokenizer.convert_tokens_to_ids(".")
    special = set(tokenizer.all_special_ids)
    phrase, mapping = 0, []
    for token in input_ids:
        if token == separator:
            mapping.append(-1)
            phrase += 1
        else:
            mapping.append(-1 if token in special else phrase)
    return np.asarray(mapping, np.int64)


def max_prompt_tokens(dino: LoadedModel) -> int:
    """Longest prompt (tokens, with [CLS]/[SEP]) GroundingDINO reads; the model silently cuts longer ones."""
    return int(min(dino.processor.tokenizer.model_max_length, dino.model.config.max_text_len))


def run_grounding_dino(dino: LoadedModel, images: list[Image.Image], prompt: str, num_phrases: int,
                       box_threshold: float, text_threshold: float) -> list[Detections]:
    """Detect the prompt's phrases in a batch of images (one forward pass).

    Args:
        images: RGB PIL images (any sizes: the processor resizes and pads them).
        prompt: normalised prompt "a cat. a remote."; num_phrases: how many phrases it has.
        box_threshold: minimum box score; text_threshold: minimum token score for a phrase to name a box.
    Returns:
        One Detections per image, boxes in that image's original pixels.
    """
    assert num_phrases >= 1, "the prompt must hold at least one phrase"
    processor = dino.processor
    inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt").to(dino.device)
    with torch.inference_mode(), dino.autocast():
        outputs = dino.model(**inputs)
    outputs.logits, outputs.pred_boxes = outputs.logits.float(), outputs.pred_boxes.float()
    sizes = [(image.height, image.width) for image in images]
    results = processor.post_process_grounded_object_detection(
        outputs, inputs["input_ids"], threshold=box_threshold, text_threshold=text_threshold, target_sizes=sizes)
    token_phrase = torch.from_numpy(phrase_token_map(inputs["input_ids"][0].tolist(), processor.tokenizer))
    token_phrase = token_phrase[: outputs.logits.shape[-1]]
    one_hot = (token_phrase[:, None] == torch.arange(num_phrases)[None]).to(outputs.logits.device)  # (T, P)
    detections = []
    for index, result in enumerate(results):
        probs = outputs.logits[index, :, : len(token_phrase)].sigmoid()  # (Q, T)
        kept = probs.max(-1).values > box_threshold  # the post-processor's rule, to recover query indices
        assert int(kept.sum()) == len(result["scores"]), "post-processing kept other queries than expected"
        phrase_scores = (probs[kept][:, :, None] * one_hot[None]).amax(1)  # (K, P)
        best_score, best_phrase = phrase_scores.max(-1)
        named = best_score > text_threshold
        height, width = sizes[index]
        boxes = result["boxes"][named].float()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        detections.append(Detections(boxes.cpu().numpy().astype(np.float32),
                                     result["scores"][named].float().cpu().numpy().astype(np.float32),
                                     best_phrase[named].cpu().numpy().astype(np.int64)))
    return detections


def sam2_image_embeddings(sam: LoadedModel, images: list[Image.Image]) -> list[torch.Tensor]:
    """SAM 2.1 image encoder on a batch; returns the multi-scale embeddings, each (B, C, h, w)."""
    pixel_values = sam.processor(images=images, return_tensors="pt")["pixel_values"].to(sam.device)
    with torch.inference_mode(), sam.autocast():
        return sam.model.get_image_embeddings(pixel_values)


def sam2_masks_for_boxes(sam: LoadedModel, embeddings: list[torch.Tensor], index: int, boxes: np.ndarray,
                         image_size: tuple[int, int], multimask: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One SAM 2.1 mask per box for image `index` of the embedded batch, all boxes in one decoder call.

    Args:
        boxes: (N, 4) xyxy in original pixels; image_size: (H, W) of the original image.
        multimask: ask for three masks per box and keep the one with the best predicted IoU.
    Returns:
        masks (N, H, W) bool at the original size, predicted IoU (N,) float32.
    """
    height, width = image_size
    if len(boxes) == 0:
        return np.zeros((0, height, width), bool), np.zeros(0, np.float32)
    prompts = sam.processor(original_sizes=[[height, width]], input_boxes=[boxes.tolist()], return_tensors="pt")
    with torch.inference_mode(), sam.autocast():
        outputs = sam.model(image_embeddings=[level[index : index + 1] for level in embeddings],
                            input_boxes=prompts["input_boxes"].to(sam.device), multimask_output=multimask)
    low_res, iou = outputs.pred_masks[0].float(), outputs.iou_scores[0].float()  # (N, M, h, w), (N, M)
    best = iou.argmax(-1)
    rows = torch.arange(len(boxes), device=iou.device)
    low_res, iou = low_res[rows, best][:, None], iou[rows, best]  # (N, 1, h, w), (N,)
    masks = np.zeros((len(boxes), height, width), bool)
    chunk = max(1, MAX_UPSAMPLE_BYTES // (height * width * 4))
    for start in range(0, len(boxes), chunk):
        upsampled = sam.processor.post_process_masks([low_res[start : start + chunk]], [[height, width]])[0]
        masks[start : start + chunk] = upsampled[:, 0].cpu().numpy()
    return masks, iou.cpu().numpy().astype(np.float32)


def clipseg_probabilities(clipseg: LoadedModel, image: Image.Image, phrases: list[str]) -> np.ndarray:
    """CLIPSeg probability map per phrase, resized to the original image: (P, H, W) float32 in [0, 1]."""
    inputs = clipseg.processor(text=phrases, images=[image] * len(phrases), padding=True, truncation=True,
                               return_tensors="pt").to(clipseg.device)
    with torch.inference_mode(), clipseg.autocast():
        logits = clipseg.model(**inputs).logits.float()
    if logits.ndim == 2:  # older releases squeeze a batch of one
        logits = logits[None]
    probabilities = logits.sigmoid()[:, None]  # (P, 1, h, w)
    maps = np.empty((len(phrases), image.height, image.width), np.float32)
    for row in range(len(phrases)):  # one phrase at a time keeps the float map of a huge image single
        maps[row] = F.interpolate(probabilities[row : row + 1], size=(image.height, image.width), mode="bilinear",
                                  align_corners=False)[0, 0].cpu().numpy()
    return maps
