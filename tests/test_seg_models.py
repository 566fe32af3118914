"""Model loading and per-model inference (nbhelpers.seg.models) on tiny random models; no network."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nbhelpers.seg import inference
from nbhelpers.seg import models as seg_models
from nbhelpers.seg.inference import (clipseg_probabilities, max_prompt_tokens, phrase_token_map, run_grounding_dino,
                                     sam2_image_embeddings, sam2_masks_for_boxes)
from nbhelpers.seg.models import (ModelLoadError, load_clipseg, load_grounding_dino, load_sam2,
                                  resolve_model_source)
from nbhelpers.testing import make_test_image

# ----------------------------------------------------------------------------- resolving and loading


@pytest.mark.parametrize("kind", ["grounding-dino", "sam2", "clipseg", "sam3"])
def test_a_short_name_and_its_hub_id_resolve_alike(kind: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no folder here may be mistaken for a model
    for short, hub_id in seg_models.SHORT_NAMES[kind].items():
        assert resolve_model_source(short, kind) == resolve_model_source(hub_id, kind) == (hub_id, False)


@pytest.mark.parametrize("name", ["/no/such/folder/grounding-dino", "./models/dino", "~/missing-model-dir", "a/b/c"])
def test_missing_local_folder_is_a_clear_error(name: str) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_grounding_dino(name)


def test_local_folders_load_with_backend_and_cache(tiny_seg_models, tiny_seg_model_dirs) -> None:
    dino = tiny_seg_models.dino
    assert dino.backend == "transformers:GroundingDinoForObjectDetection"
    assert tiny_seg_models.sam.backend == "transformers:Sam2Model"
    assert tiny_seg_models.clipseg.backend == "transformers:CLIPSegForImageSegmentation"
    assert dino.model_id == str(tiny_seg_model_dirs["dino"].resolve())
    assert dino.device.type == "cpu" and dino.dtype == torch.float32 and dino.amp_dtype is None
    assert not dino.model.training and next(dino.model.parameters()).dtype == torch.float32
    # a second load of the same folder on the same device is the cached object, not a reload
    assert load_grounding_dino(tiny_seg_model_dirs["dino"], seg_models.select_runtime("cpu", verbose=False)) is dino
    assert max_prompt_tokens(dino) == 32


def test_kaggle_style_nested_folder_is_found(tiny_seg_model_dirs, tmp_path: Path) -> None:
    nested = tmp_path / "my-dataset" / "clipseg-rd64-refined"
    shutil.copytree(tiny_seg_model_dirs["clipseg"], nested)
    assert resolve_model_source(tmp_path / "my-dataset", "clipseg") == (str(nested), True)
    loaded = load_clipseg(tmp_path / "my-dataset", seg_models.select_runtime("cpu", verbose=False))
    assert loaded.model_id == str(nested)


def test_wrong_model_kind_names_the_mix_up(tiny_seg_model_dirs) -> None:
    with pytest.raises(ModelLoadError, match="holds a 'sam2_video' model, not grounding-dino / mm-grounding-dino"):
        load_grounding_dino(tiny_seg_model_dirs["sam"])
    with pytest.raises(ModelLoadError, match="holds a 'grounding-dino' model, not sam2:"):
        load_sam2(tiny_seg_model_dirs["dino"])


def test_folder_without_config_names_the_fix(tmp_path: Path) -> None:
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_sam2(tmp_path / "empty-model")


def test_hub_id_offline_names_local_folder_alternative(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real offline path: HF_HUB_OFFLINE=1 makes from_pretrained look only in the local cache (no network
    # is mocked). The id is made up so that a developer's filled cache cannot turn this into a real download.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_id = "nbhelpers-tests/not-cached-sam2"
    with pytest.raises(ModelLoadError) as caught:
        load_sam2(model_id, seg_models.select_runtime("cpu", verbose=False))
    message = str(caught.value)
    assert f"hf download {model_id} --local-dir DIR" in message
    assert "Kaggle data set" in message and "folder path" in message


# ----------------------------------------------------------------------------- GroundingDINO


def test_phrase_token_map(tiny_seg_models) -> None:
    tokenizer = tiny_seg_models.dino.processor.tokenizer
    input_ids = tokenizer("a cat. the red dog.")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(input_ids) == ["[CLS]", "a", "cat", ".", "the", "red", "dog", ".", "[SEP]"]
    assert phrase_token_map(input_ids, tokenizer).tolist() == [-1, 0, 0, -1, 1, 1, 1, -1, -1]


def test_boxes_are_scaled_to_each_original_image(tiny_seg_models, monkeypatch: pytest.MonkeyPatch) -> None:
    """Boxes predicted on the resized, padded batch come back in each image's own original pixels."""
    dino = tiny_seg_models.dino
    captured = {}
    forward = dino.model.forward

    def spy(*args, **kwargs):  # records the real outputs; changes nothing
        captured["outputs"] = forward(*args, **kwargs)
        captured["pixel_values"] = kwargs["pixel_values"]
        return captured["outputs"]

    monkeypatch.setattr(dino.model, "forward", spy)
    images = [Image.fromarray(make_test_image(90, 200)), Image.fromarray(make_test_image(150, 60, seed=1))]
    detections = run_grounding_dino(dino, images, "a cat. the dog.", 2, box_threshold=0.2, text_threshold=0.0)
    assert captured["pixel_values"].shape[-2:] != (90, 200)  # the model really saw a resized image
    outputs = captured["outputs"]
    for index, (image, found) in enumerate(zip(images, detections)):
        probs = outputs.logits[index].sigmoid()
        kept = probs.max(-1).values > 0.2
        center_x, center_y, box_w, box_h = outputs.pred_boxes[index][kept].double().unbind(-1)  # normalised cxcywh
        expected = torch.stack([(center_x - box_w / 2) * image.width, (center_y - box_h / 2) * image.height,
                                (center_x + box_w / 2) * image.width, (center_y + box_h / 2) * image.height], -1)
        expected[:, 0::2] = expected[:, 0::2].clamp(0, image.width)
        expected[:, 1::2] = expected[:, 1::2].clamp(0, image.height)
        assert len(found.boxes) == int(kept.sum()) > 0
        np.testing.assert_allclose(found.boxes, expected.numpy(), rtol=1e-5, atol=1e-3)
        assert set(found.phrase_index.tolist()) <= {0, 1}
        assert found.boxes.dtype == np.float32 and found.scores.dtype == np.float32


def test_box_threshold_one_finds_nothing(tiny_seg_models) -> None:
    image = Image.fromarray(make_test_image(64, 80))
    (found,) = run_grounding_dino(tiny_seg_models.dino, [image], "a cat.", 1, box_threshold=1.0, text_threshold=0.0)
    assert found.boxes.shape == (0, 4) and len(found.scores) == 0


# ----------------------------------------------------------------------------- SAM 2.1 and CLIPSeg


def test_sam_masks_original_size_and_chunked_upsampling(tiny_seg_models, monkeypatch: pytest.MonkeyPatch) -> None:
    sam = tiny_seg_models.sam
    image = Image.fromarray(make_test_image(70, 150))
    embeddings = sam2_image_embeddings(sam, [image])
    boxes = np.array([[5, 5, 60, 40], [80, 20, 140, 65], [0, 0, 150, 70]], np.float32)
    masks, iou = sam2_masks_for_boxes(sam, embeddings, 0, boxes, (70, 150))
    assert masks.shape == (3, 70, 150) and masks.dtype == bool and iou.shape == (3,)
    monkeypatch.setattr(inference, "MAX_UPSAMPLE_BYTES", 1)  # forces one box per upsampling chunk
    chunked, chunked_iou = sam2_masks_for_boxes(sam, embeddings, 0, boxes, (70, 150))
    assert np.array_equal(masks, chunked) and np.allclose(iou, chunked_iou)


def test_multimask_keeps_best_predicted_iou(tiny_seg_models) -> None:
    sam = tiny_seg_models.sam
    image = Image.fromarray(make_test_image(64, 64))
    embeddings = sam2_image_embeddings(sam, [image])
    boxes = np.array([[4, 4, 40, 40], [20, 10, 60, 60]], np.float32)
    _, iou = sam2_masks_for_boxes(sam, embeddings, 0, boxes, (64, 64), multimask=True)
    prompts = sam.processor(original_sizes=[[64, 64]], input_boxes=[boxes.tolist()], return_tensors="pt")
    with torch.inference_mode():
        direct = sam.model(image_embeddings=embeddings, input_boxes=prompts["input_boxes"], multimask_output=True)
    assert direct.iou_scores.shape[-1] == 3
    np.testing.assert_allclose(iou, direct.iou_scores[0].max(-1).values.numpy(), rtol=1e-5)


def test_batched_embeddings_match_single_image(tiny_seg_models) -> None:
    sam = tiny_seg_models.sam
    images = [Image.fromarray(make_test_image(60, 90, seed=seed)) for seed in (0, 1)]
    batched = sam2_image_embeddings(sam, images)
    single = sam2_image_embeddings(sam, images[1:])
    for level_batched, level_single in zip(batched, single):
        torch.testing.assert_close(level_batched[1:], level_single, rtol=1e-4, atol=1e-5)


def test_clipseg_probabilities_at_original_size(tiny_seg_models) -> None:
    tokenizer = tiny_seg_models.clipseg.processor.tokenizer  # a real byte-level BPE with a few merges
    assert tokenizer.tokenize("a Cat") == ["a</w>", "cat</w>"]
    assert tokenizer.decode(tokenizer("chat noir é")["input_ids"], skip_special_tokens=True) == "chat noir é"
    image = Image.fromarray(make_test_image(50, 130))
    maps = clipseg_probabilities(tiny_seg_models.clipseg, image, ["a cat", "the dog", "chat noir é"])
    assert maps.shape == (3, 50, 130) and maps.dtype == np.float32
    assert 0.0 <= maps.min() and maps.max() <= 1.0 and maps.std() > 0


@pytest.mark.parametrize("hub_bars_off_before", [False, True])
@pytest.mark.parametrize("headless", [False, True])
def test_loading_in_a_headless_notebook_hides_transformers_bars_and_restores_their_state(
        tiny_seg_model_dirs, tmp_path: Path, monkeypatch, headless: bool, hub_bars_off_before: bool) -> None:
    from huggingface_hub import utils as hub_utils
    from transformers import Sam2Model
    from transformers.utils import logging as transformers_logging

    monkeypatch.setattr(seg_models, "widget_bars_freeze", lambda: headless)
    seen = []
    original = Sam2Model.from_pretrained.__func__

    def spy(cls, *args, **kwargs):  # the bar state while transformers loads the weights
        seen.append((transformers_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(Sam2Model, "from_pretrained", classmethod(spy))
    if hub_bars_off_before:
        hub_utils.disable_progress_bars()
    try:
        copy = shutil.copytree(tiny_seg_model_dirs["sam"], tmp_path / "sam-copy")  # not in the loaded-model cache
        load_sam2(copy, seg_models.select_runtime("cpu", verbose=False))
        assert seen == [(False, True)] if headless else seen == [(True, hub_bars_off_before)]
        assert transformers_logging.is_progress_bar_enabled()  # as before the load
        assert hub_utils.are_progress_bars_disabled() == hub_bars_off_before
    finally:
        hub_utils.enable_progress_bars()
        seg_models.release("sam2")


def test_release_drops_other_models_of_one_kind(tiny_seg_model_dirs, tmp_path: Path) -> None:
    runtime = seg_models.select_runtime("cpu", verbose=False)
    copy = shutil.copytree(tiny_seg_model_dirs["sam"], tmp_path / "sam-copy")  # same weights, another id
    load_sam2(tiny_seg_model_dirs["sam"], runtime)
    latest, dino = load_sam2(copy, runtime), load_grounding_dino(tiny_seg_model_dirs["dino"], runtime)
    assert seg_models.release("sam2", keep=latest) >= 1
    assert [loaded for key, loaded in seg_models._CACHE.items() if key[0] == "sam2"] == [latest]
    assert load_grounding_dino(tiny_seg_model_dirs["dino"], runtime) is dino  # other kinds stay cached
    assert seg_models.release("sam2", keep=latest) == 0
    with pytest.raises(ValueError, match="unknown model kind"):
        seg_models.release("sam4")
