"""Tiny random models, synthetic inputs and the detections.json schema check, for tests and smoke runs (no downloads).

The tiny models are real transformers classes with real processors and tokenizers, saved with
`save_pretrained`, so code under test loads them through the same `from_pretrained` path as hub ids.
Their weights are random: tests check shapes, coordinates and control flow, never accuracy.
"""
from __future__ import annotations

import math
import os
from functools import partial
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

# ----------------------------------------------------------------------------- synthetic images


def make_test_image(height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """A grey image with a red rectangle, a blue disc and a little noise.

    Args:
        height, width: image size in pixels.
        seed: noise seed (the shapes are fixed relative to the size).
    Returns:
        (height, width, 3) uint8 RGB.
    """
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 128, np.uint8)
    image[height // 8 : height // 2, width // 8 : width // 2] = (220, 30, 30)  # red rectangle, top left
    yy, xx = np.mgrid[:height, :width]
    radius = min(height, width) / 5
    disc = (yy - 0.68 * height) ** 2 + (xx - 0.7 * width) ** 2 <= radius**2
    image[disc] = (30, 60, 220)  # blue disc, bottom right
    noise = rng.integers(-6, 7, size=image.shape)
    return np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def make_test_frame(index: int, height: int = 96, width: int = 128, enter_frame: int | None = None) -> np.ndarray:
    """Frame `index` of a synthetic clip: a red square moving right; a blue disc from `enter_frame` on.

    Returns:
        (height, width, 3) uint8 RGB (grey background, no noise: the shapes' colours are exact before encoding).
    """
    frame = np.full((height, width, 3), 128, np.uint8)
    side = max(height // 4, 4)
    left = int(index * 2) % max(width - side, 1)
    frame[height // 8 : height // 8 + side, left : left + side] = (220, 30, 30)
    if enter_frame is not None and index >= enter_frame:
        yy, xx = np.mgrid[:height, :width]
        center_x = width - 1 - min((index - enter_frame) * 3, width // 3)  # slides in from the right edge
        disc = (yy - 0.7 * height) ** 2 + (xx - center_x) ** 2 <= (min(height, width) / 6) ** 2
        frame[disc] = (30, 60, 220)
    return frame


def make_test_video(path: str | os.PathLike, frames: int = 24, height: int = 96, width: int = 128, fps: float = 12.0,
                    enter_frame: int | None = None) -> Path:
    """Write the synthetic clip of `make_test_frame` as an mp4v MP4 (OpenCV) and return its path."""
    import cv2

    path = Path(path)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    assert writer.isOpened(), f"OpenCV cannot write {path}"
    for index in range(frames):
        writer.write(cv2.cvtColor(make_test_frame(index, height, width, enter_frame), cv2.COLOR_RGB2BGR))
    writer.release()
    return path



def make_truncated_video(folder: str | os.PathLike, frames: int = 20, height: int = 48, width: int = 64) -> Path:
    """An MJPG AVI of `frames` synthetic frames cut to half its bytes: its header still says `frames`, fewer decode."""
    import cv2

    whole = Path(folder) / "whole.avi"
    writer = cv2.VideoWriter(str(whole), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (width, height))
    for index in range(frames):
        writer.write(make_test_frame(index, height, width))
    writer.release()
    cut = Path(folder) / "cut.avi"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return cut

# ----------------------------------------------------------------------------- tiny tokenizers

TEST_WORDS = (
    "a an the of and with on in . , cat cats dog dogs remote person people car cars red blue green "
    "square rectangle circle disc shape object thing photo picture sky tree"
).split()


def tiny_bert_vocab() -> dict[str, int]:
    """WordPiece vocabulary: BERT special tokens, the test words, letters and '##' letter pieces."""
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TEST_WORDS]
    letters = [chr(code) for code in range(ord("a"), ord("z") + 1)]
    tokens += letters + ["##" + letter for letter in letters] + ["##s"]
    unique = list(dict.fromkeys(tokens))
    return {token: index for index, token in enumerate(unique)}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table (byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in characters)))


def tiny_clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary and merges for CLIPTokenizer: 256 bytes, their '</w>' forms, a few words."""
    alphabet = list(_bytes_to_unicode().values())
    vocab_tokens = alphabet + [character + "</w>" for character in alphabet]
    merges = []
    for word in ("cat", "dog", "the", "car", "remote", "person"):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right: c a -> ca, ca t</w> -> cat</w>
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab_tokens.append(pieces[0])
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    unique = list(dict.fromkeys(vocab_tokens))
    return {token: index for index, token in enumerate(unique)}, list(dict.fromkeys(merges))


# ----------------------------------------------------------------------------- tiny models


def _save_atomically(target: Path, save) -> Path:
    """Build into a temporary sibling folder, then rename: a half-written model folder is never reused.

    Not nbhelpers.platform.atomic_write: that replaces one file, while save_pretrained writes several files
    (config, weights, tokenizer, processor) that must appear together, so the whole folder is renamed."""
    if (target / "config.json").is_file():
        return target
    if target.exists():  # a leftover without config.json (an interrupted older build): rebuild it
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)
    try:
        save(staging)
        try:
            os.replace(staging, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _save_grounding_dino(folder: Path, mm: bool = False) -> None:
    """Tiny GroundingDINO; `mm=True`: the same sizes as MMGroundingDinoForObjectDetection (MM-Grounding-DINO and
    LLMDet checkpoints' class), which uses the same processor."""
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, MMGroundingDinoConfig,
                              MMGroundingDinoForObjectDetection, SwinConfig)

    vocab = tiny_bert_vocab()
    backbone = SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=7,
                          out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=len(vocab), hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=16, max_position_embeddings=128)
    config_class, model_class = ((MMGroundingDinoConfig, MMGroundingDinoForObjectDetection) if mm
                                 else (GroundingDinoConfig, GroundingDinoForObjectDetection))
    config = config_class(
        backbone_config=backbone, text_config=text, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
        num_queries=16, max_text_len=32, num_feature_levels=4, encoder_n_points=2, decoder_n_points=2,
    )
    model = model_class(config).eval()
    tokenizer = BertTokenizer(vocab=vocab, model_max_length=32)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    model.save_pretrained(folder)
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def _save_sam2(folder: Path) -> None:
    """Saved like the hub's facebook/sam2.1-hiera-* repos: a `sam2_video` checkpoint with a Sam2VideoProcessor,
    which Sam2Model / Sam2Processor load for still images. Hidden sizes are 128 because Sam2VideoModel's memory
    path failed with hidden sizes of 64 and below when these models were built, so the same folder also serves
    Sam2VideoModel."""
    from transformers import (Sam2HieraDetConfig, Sam2ImageProcessor, Sam2VideoConfig, Sam2VideoModel,
                              Sam2VideoProcessor, Sam2VideoVideoProcessor, Sam2VisionConfig)

    hiera = Sam2HieraDetConfig(
        hidden_size=12, image_size=128, patch_kernel_size=7, patch_stride=4, patch_padding=3,
        blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[12, 24, 48, 96], num_attention_heads_per_stage=[1, 2, 4, 8],
        window_size_per_stage=[8, 4, 4, 4], global_attention_blocks=[3], window_positional_embedding_background_size=[4, 4],
    )
    vision = Sam2VisionConfig(backbone_config=hiera, backbone_channel_list=[96, 48, 24, 12],
                              backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]], fpn_hidden_size=128)
    config = Sam2VideoConfig(
        vision_config=vision, prompt_encoder_config=dict(hidden_size=128, image_size=128, patch_size=16),
        mask_decoder_config=dict(hidden_size=128, mlp_dim=128, num_attention_heads=2, iou_head_hidden_dim=32),
        image_size=128, memory_attention_hidden_size=128, memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=128, memory_attention_rope_feat_sizes=[8, 8],
        memory_encoder_hidden_size=128, mask_downsampler_embed_dim=128, memory_fuser_embed_dim=128,
        memory_fuser_intermediate_dim=128,
    )
    model = Sam2VideoModel(config).eval()
    size, mask_size = {"height": 128, "width": 128}, {"height": 32, "width": 32}
    processor = Sam2VideoProcessor(image_processor=Sam2ImageProcessor(size=size, mask_size=mask_size),
                                   video_processor=Sam2VideoVideoProcessor(size=size), target_size=128)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def _save_clipseg(folder: Path) -> None:
    from transformers import (CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, CLIPTokenizer,
                              ViTImageProcessor)

    vocab, merges = tiny_clip_bpe()
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"])
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=64,
                  patch_size=16)
    config = CLIPSegConfig(text_config=text, vision_config=vision, projection_dim=16, extract_layers=[1, 2],
                           reduce_dim=16, decoder_num_attention_heads=2, decoder_intermediate_size=32)
    model = CLIPSegForImageSegmentation(config).eval()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    image_processor = ViTImageProcessor(size={"height": 64, "width": 64}, image_mean=[0.485, 0.456, 0.406],
                                        image_std=[0.229, 0.224, 0.225])
    model.save_pretrained(folder)
    CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def _tiny_sam3_detector_config(image_size: int, fpn_hidden_size: int, scale_factors: list[float],
                                feature_sizes: list[list[int]] | None = None, queries: int = 5):
    """A Sam3Config with 2-layer ViT / CLIP text encoders, one-layer DETR and geometry encoders, `queries` queries."""
    from transformers import Sam3Config, Sam3ViTConfig, Sam3VisionConfig

    vocab, _ = tiny_clip_bpe()
    vit = Sam3ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        image_size=image_size, patch_size=14, window_size=8, global_attn_indexes=[0, 1],
                        pretrain_image_size=image_size)
    vision = Sam3VisionConfig(backbone_config=vit, fpn_hidden_size=fpn_hidden_size, scale_factors=scale_factors,
                              **({"backbone_feature_sizes": feature_sizes} if feature_sizes else {}))
    end = vocab["<|endoftext|>"]
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=32, bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=end, pad_token_id=end)
    small = dict(hidden_size=fpn_hidden_size, num_layers=1, num_attention_heads=4, intermediate_size=64)
    return Sam3Config(vision_config=vision, text_config=text, geometry_encoder_config=small, detr_encoder_config=small,
                      detr_decoder_config=dict(small, num_queries=queries),
                      mask_decoder_config=dict(hidden_size=fpn_hidden_size, num_upsampling_stages=2, num_attention_heads=4))


def _tiny_clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = tiny_clip_bpe()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=32)  # SAM 3's text encoder reads 32 tokens


def _save_sam3(folder: Path) -> None:
    """Sam3Model (image) with a 224 px ViT of hidden size 32: about 240 k parameters, under a second per image."""
    from transformers import Sam3ImageProcessor, Sam3Model, Sam3Processor

    Sam3Model(_tiny_sam3_detector_config(224, 32, [2.0, 1.0])).eval().save_pretrained(folder)
    image_processor = Sam3ImageProcessor(size={"height": 224, "width": 224}, mask_size={"height": 64, "width": 64})
    Sam3Processor(image_processor=image_processor, tokenizer=_tiny_clip_tokenizer()).save_pretrained(folder)


# The tiny video model's detection thresholds: its random weights score every query about 0.24, so with these
# each of its 3 queries starts a track (overlapping ones: the duplicates the NMS must catch). Runs pass
# DetectionSettings(sam3_threshold=TINY_SAM3_VIDEO_THRESHOLDS["score_threshold_detection"]).
TINY_SAM3_VIDEO_THRESHOLDS = {"score_threshold_detection": 0.2, "new_det_thresh": 0.2}


def _save_sam3_video(folder: Path) -> None:
    """Sam3VideoModel at 56 px (a 4x4 patch grid) with a short tracker memory (3 frames, 3 object pointers).

    Sam3VideoModel needs the detector's FPN at the four scales [4, 2, 1, 0.5] of the patch grid, an FPN hidden size
    above 64 (128) and the tracker's 64-channel memory (hard-coded upstream), see shared NOTES."""
    from transformers import (Sam2VideoVideoProcessor, Sam3ImageProcessor, Sam3VideoConfig, Sam3VideoModel,
                              Sam3VideoProcessor)

    image_size, grid = 56, 4
    detector = _tiny_sam3_detector_config(image_size, 128, [4.0, 2.0, 1.0, 0.5],
                                          [[4 * grid] * 2, [2 * grid] * 2, [grid] * 2], queries=3)
    tracker = dict(
        vision_config=detector.vision_config.to_dict(), image_size=image_size,
        prompt_encoder_config=dict(hidden_size=128, image_size=image_size, patch_size=14),
        mask_decoder_config=dict(hidden_size=128, mlp_dim=128, num_attention_heads=2, iou_head_hidden_dim=32),
        memory_attention_hidden_size=128, memory_attention_num_layers=1, memory_attention_feed_forward_hidden_size=128,
        memory_attention_rope_feat_sizes=[grid, grid], memory_encoder_hidden_size=128, mask_downsampler_embed_dim=128,
        memory_fuser_embed_dim=128, memory_fuser_intermediate_dim=128, num_maskmem=3, max_object_pointers_in_encoder=3)
    mask_size = 8 * grid
    config = Sam3VideoConfig(detector_config=detector.to_dict(), tracker_config=tracker, low_res_mask_size=mask_size,
                             **TINY_SAM3_VIDEO_THRESHOLDS)
    Sam3VideoModel(config).eval().save_pretrained(folder)
    size = {"height": image_size, "width": image_size}
    Sam3VideoProcessor(image_processor=Sam3ImageProcessor(size=size, mask_size={"height": mask_size, "width": mask_size}),
                       video_processor=Sam2VideoVideoProcessor(size=size),
                       tokenizer=_tiny_clip_tokenizer()).save_pretrained(folder)


def build_tiny_sam3_models(root: str | os.PathLike) -> dict[str, Path]:
    """Build (or reuse) tiny random SAM 3 image and video model folders.

    Returns:
        {"sam3": image model folder, "sam3_video": video model folder}; both load with `from_pretrained`.
    """
    return _build_models(root, {"sam3": ("sam3", _save_sam3), "sam3_video": ("sam3-video", _save_sam3_video)})


def build_tiny_mm_grounding_dino(root: str | os.PathLike) -> Path:
    """Build (or reuse) a tiny random MM-Grounding-DINO folder (model type mm-grounding-dino)."""
    return _build_models(root, {"mm": ("mm-grounding-dino", partial(_save_grounding_dino, mm=True))})["mm"]


def build_tiny_segmentation_models(root: str | os.PathLike) -> dict[str, Path]:
    """Build (or reuse) tiny random GroundingDINO, SAM 2 and CLIPSeg model folders.

    Args:
        root: folder that receives grounding-dino/, sam2/ and clipseg/ (created if missing).
    Returns:
        {"dino": path, "sam": path, "clipseg": path}; each folder loads with `from_pretrained`.
    """
    return _build_models(root, {"dino": ("grounding-dino", _save_grounding_dino), "sam": ("sam2", _save_sam2),
                                "clipseg": ("clipseg", _save_clipseg)})


def _build_models(root: str | os.PathLike, builders: dict[str, tuple[str, Callable[[Path], None]]]) -> dict[str, Path]:
    """{key: root/folder} built by each `save` with the same seed (the same random weights on every build)."""
    import torch

    paths = {}
    for key, (folder_name, save) in builders.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            paths[key] = _save_atomically(Path(root) / folder_name, save)
    return paths


# ----------------------------------------------------------------------------- real-size random models (benchmarks)


def _save_real_grounding_dino(folder: Path) -> None:
    from transformers import (BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor)

    model = GroundingDinoForObjectDetection(GroundingDinoConfig()).eval()  # the default config is grounding-dino-tiny's
    model.save_pretrained(folder)
    tokenizer = BertTokenizer(vocab=tiny_bert_vocab(), model_max_length=256)  # ids fit BERT's 30,522-word table
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(), tokenizer=tokenizer).save_pretrained(folder)


def _save_real_sam2(folder: Path) -> None:
    from transformers import (Sam2ImageProcessor, Sam2VideoConfig, Sam2VideoModel, Sam2VideoProcessor,
                              Sam2VideoVideoProcessor)

    Sam2VideoModel(Sam2VideoConfig()).eval().save_pretrained(folder)  # default config: sam2.1-hiera-tiny's layout
    Sam2VideoProcessor(image_processor=Sam2ImageProcessor(), video_processor=Sam2VideoVideoProcessor()).save_pretrained(folder)


def _save_real_clipseg(folder: Path) -> None:
    from transformers import (CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, CLIPTokenizer,
                              ViTImageProcessor)

    vocab, merges = tiny_clip_bpe()
    config = CLIPSegConfig(reduce_dim=64, use_complex_transposed_convolution=True)  # rd64-refined
    CLIPSegForImageSegmentation(config).eval().save_pretrained(folder)
    image_processor = ViTImageProcessor(size={"height": 352, "width": 352}, image_mean=[0.485, 0.456, 0.406],
                                        image_std=[0.229, 0.224, 0.225])
    CLIPSegProcessor(image_processor=image_processor,
                     tokenizer=CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)).save_pretrained(folder)


def build_real_config_models(root: str | os.PathLike) -> dict[str, Path]:
    """Random weights in the real checkpoints' configurations (grounding-dino-tiny, sam2.1-hiera-tiny,
    clipseg-rd64-refined) with real image processors and tiny tokenizers: real compute cost, no downloads.

    Returns:
        {"dino", "sam", "clipseg"} -> folders that load with `from_pretrained` (about 1 GB in all).
    """
    return _build_models(root, {"dino": ("grounding-dino-tiny-random", _save_real_grounding_dino),
                                "sam": ("sam2.1-hiera-tiny-random", _save_real_sam2),
                                "clipseg": ("clipseg-rd64-random", _save_real_clipseg)})


def _save_real_sam3(folder: Path) -> None:
    from transformers import Sam3Config, Sam3ImageProcessor, Sam3Model, Sam3Processor

    Sam3Model(Sam3Config()).eval().save_pretrained(folder)  # the default config is facebook/sam3's (840 M)
    Sam3Processor(image_processor=Sam3ImageProcessor(), tokenizer=_tiny_clip_tokenizer()).save_pretrained(folder)


def _save_real_sam3_video(folder: Path) -> None:
    from transformers import (Sam2VideoVideoProcessor, Sam3ImageProcessor, Sam3VideoConfig, Sam3VideoModel,
                              Sam3VideoProcessor)

    Sam3VideoModel(Sam3VideoConfig()).eval().save_pretrained(folder)  # facebook/sam3's video model layout (860 M)
    size = {"height": 1008, "width": 1008}
    Sam3VideoProcessor(image_processor=Sam3ImageProcessor(), video_processor=Sam2VideoVideoProcessor(size=size),
                       tokenizer=_tiny_clip_tokenizer()).save_pretrained(folder)


def build_real_config_sam3_models(root: str | os.PathLike) -> dict[str, Path]:
    """Random weights in facebook/sam3's image and video configurations, real image processors, a tiny tokenizer
    (its ids fit the real vocabulary): real compute cost, no download (about 7 GB on disk).

    Returns:
        {"sam3", "sam3_video"} -> folders that load with `from_pretrained`.
    """
    return _build_models(root, {"sam3": ("sam3-random", _save_real_sam3),
                                "sam3_video": ("sam3-video-random", _save_real_sam3_video)})


# ----------------------------------------------------------------------------- detections.json schema (tests)

DETECTIONS_TOP_LEVEL_KEYS = ("image", "prompt", "source", "detections", "models", "thresholds", "timings", "message")
DETECTION_KEYS = ("label", "score", "box_xyxy", "mask_score", "area", "mask_rle")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _rle_area(rle: dict[str, Any]) -> int:
    from pycocotools import mask as mask_utils

    return int(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode("ascii")}))


def _detection_problems(index: int, det: Any, size: list[int] | None) -> list[str]:
    where = f"detections[{index}]"
    if not isinstance(det, dict):
        return [f"{where} must be an object"]
    problems = [f"{where}.{key} is missing" for key in DETECTION_KEYS if key not in det]
    if problems:
        return problems
    if not isinstance(det["label"], str):
        problems.append(f"{where}.label must be a string")
    if not (_is_number(det["score"]) and 0.0 <= det["score"] <= 1.0):
        problems.append(f"{where}.score must be a number in [0, 1], got {det['score']!r}")
    box = det["box_xyxy"]
    if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box) and box[0] <= box[2] and box[1] <= box[3]):
        problems.append(f"{where}.box_xyxy must be [x0, y0, x1, y1] with x0 <= x1 and y0 <= y1, got {box!r}")
    if det["mask_score"] is not None and not _is_number(det["mask_score"]):
        problems.append(f"{where}.mask_score must be a number or null")
    rle = det["mask_rle"]
    if not (isinstance(rle, dict) and isinstance(rle.get("counts"), str) and rle.get("size") == size):
        problems.append(f"{where}.mask_rle must be {{'size': {size}, 'counts': str}}")
    elif not (isinstance(det["area"], int) and det["area"] == _rle_area(rle)):
        problems.append(f"{where}.area {det['area']!r} does not match the mask's pixel count")
    return problems


def validate_detections(data: dict[str, Any]) -> None:
    """Check a detections.json document against the schema in nbhelpers.seg.export's docstring.

    Args:
        data: the parsed document (export.build_detections or export.load_detections).
    Raises:
        ValueError listing every problem found.
    """
    if not isinstance(data, dict):
        raise ValueError(f"detections.json must hold an object, got {type(data).__name__}.")
    problems = [f"'{key}' is missing" for key in DETECTIONS_TOP_LEVEL_KEYS if key not in data]
    if problems:
        raise ValueError("detections.json schema: " + "; ".join(problems))
    image = data["image"]
    size = None
    if not (isinstance(image, dict) and all(isinstance(image.get(k), int) and image[k] > 0 for k in ("height", "width"))):
        problems.append("image must have positive integer 'height' and 'width'")
    else:
        size = [image["height"], image["width"]]
        if "source_file" in image and not isinstance(image["source_file"], str):
            problems.append("image.source_file must be a string")
    problems += [f"'{key}' must be a string" for key in ("prompt", "source", "message") if not isinstance(data[key], str)]
    problems += [f"'{key}' must be an object" for key in ("models", "thresholds", "timings") if not isinstance(data[key], dict)]
    if isinstance(data["timings"], dict) and not all(_is_number(v) for v in data["timings"].values()):
        problems.append("timings values must be numbers (seconds)")
    if not isinstance(data["detections"], list):
        problems.append("'detections' must be a list")
    else:
        for index, det in enumerate(data["detections"]):
            problems += _detection_problems(index, det, size)
    if problems:
        raise ValueError("detections.json schema: " + "; ".join(problems))


# ----------------------------------------------------------------------------- SAM 3 video post-processing kernel


class GreedyNmsKernel:
    """Stands in for the `kernels` package's cv-utils kernel, which is downloaded from the hub (no network here):
    greedy NMS over transformers' mask-IoU matrix; connected components unavailable, as on an unsupported GPU."""

    def __init__(self) -> None:
        self.calls = 0

    def generic_nms(self, ious, scores, iou_threshold: float, use_iou_matrix: bool = True):
        import torch

        self.calls += 1
        kept: list[int] = []
        for index in scores.argsort(descending=True).tolist():
            if all(ious[index, other] <= iou_threshold for other in kept):
                kept.append(index)
        return torch.tensor(sorted(kept), dtype=torch.long)

    def cc_2d(self, mask, get_counts: bool = True):
        raise RuntimeError("not in this stand-in")  # transformers then skips hole filling, as it says


def set_sam3_kernel_state(monkeypatch, state: str, error: str = "hub unreachable (test)") -> GreedyNmsKernel | None:
    """Put transformers' SAM 3 video post-processing kernel in one state for a test, whatever is installed.

    Args:
        monkeypatch: pytest's fixture (undoes everything after the test).
        state: "missing" (no `kernels` package), "failed" (the hub kernel cannot be fetched: the load raises
            `error`) or "loaded" (a GreedyNmsKernel stands in for the hub download).
    Returns:
        The stand-in kernel for "loaded", else None.
    """
    import logging

    from transformers.models.sam3_video import modeling_sam3_video

    if state not in ("missing", "failed", "loaded"):
        raise ValueError(f"state must be 'missing', 'failed' or 'loaded', got {state!r}")

    def get_kernel(*args, **kwargs):
        raise RuntimeError(error)

    kernel = GreedyNmsKernel() if state == "loaded" else None
    monkeypatch.setattr(modeling_sam3_video, "cv_utils_kernel", kernel)  # None: not attempted yet
    monkeypatch.setattr(modeling_sam3_video, "is_kernels_available", lambda: state != "missing")
    monkeypatch.setattr(modeling_sam3_video, "get_kernel", get_kernel, raising=False)
    logging.Logger.warning_once.cache_clear()  # transformers warns once per message: let this attempt warn again
    return kernel
