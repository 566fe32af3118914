"""Run the loaded GroundingDINO, SAM 2.1 and CLIPSeg models on images (loading: nbhelpers.seg.models)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from nbhelpers.seg.models import LoadedModel, text_token_limit
from nbhelpers.seg.types import Detections

# ----------------------------------------------------------------------------- running the models

# Upsampling SAM's low-resolution logits to the original size is done in chunks of boxes so that the float
# intermediate stays under this many bytes even for 50-megapixel photos with many boxes.
MAX_UPSAMPLE_BYTES = 256 * 2**20


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
    """Longest prompt (tokens, with [CLS]/[SEP]) GroundingDINO reads; a longer one fails in its forward pass."""
    return text_token_limit(dino)


def grounding_dino_inputs(dino: LoadedModel, images: list[Image.Image], prompt: str) -> Any:
    """GroundingDINO's preprocessing (resize, normalise, pad, tokenise), already on the model's device."""
    return dino.processor(images=images, text=[prompt] * len(images), return_tensors="pt").to(dino.device)


def run_grounding_dino(dino: LoadedModel, images: list[Image.Image], prompt: str, num_phrases: int,
                       box_threshold: float, text_threshold: float, inputs: Any = None) -> list[Detections]:
    """Detect the prompt's phrases in a batch of images (one forward pass).

    Args:
        images: RGB PIL images (any sizes: the processor resizes and pads them).
        prompt: normalised prompt "a cat. a remote."; num_phrases: how many phrases it has.
        box_threshold: minimum box score; text_threshold: minimum token score for a phrase to name a box.
        inputs: `grounding_dino_inputs(dino, images, prompt)` when already computed (None: computed here).
    Returns:
        One Detections per image, boxes in that image's original pixels.
    """
    assert num_phrases >= 1, "the prompt must hold at least one phrase"
    processor = dino.processor
    inputs = grounding_dino_inputs(dino, images, prompt) if inputs is None else inputs
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


def sam2_pixel_values(sam: LoadedModel, images: list[Image.Image]) -> torch.Tensor:
    """SAM 2.1's preprocessing (resize, normalise) on the model's device: (B, 3, S, S)."""
    return sam.processor(images=images, return_tensors="pt")["pixel_values"].to(sam.device)


def sam2_image_embeddings(sam: LoadedModel, images: list[Image.Image],
                          pixel_values: torch.Tensor | None = None) -> list[torch.Tensor]:
    """SAM 2.1 image encoder on a batch (pixel_values: `sam2_pixel_values` when already computed);
    returns the multi-scale embeddings, each (B, C, h, w)."""
    pixel_values = sam2_pixel_values(sam, images) if pixel_values is None else pixel_values
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
    """CLIPSeg probability map per phrase, resized to the original image: (P, H, W) float32 in [0, 1].

    A phrase longer than CLIPSeg reads is cut to its leading tokens (callers cut it first, with a warning:
    nbhelpers.seg.inputs.fit_phrases); the explicit max_length also covers a tokenizer saved without a limit.
    """
    inputs = clipseg.processor(text=phrases, images=[image] * len(phrases), padding=True, truncation=True,
                               max_length=text_token_limit(clipseg), return_tensors="pt").to(clipseg.device)
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
