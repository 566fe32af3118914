"""SAM 2 video propagation over a stream of frames, with state that does not grow with video length.

transformers' Sam2Video inference session keeps every processed frame's pixels and every frame's outputs for
the whole video (measured on an H100 at 720p: ≈ 9 MB per frame, 2.7 GB at 240 frames). SAM 2 only reads back
the conditioning (prompted) frames, the last `num_maskmem - 1` frames' mask memory and up to
`max_object_pointers_in_encoder` past frames' object pointers, so `StreamingTracker` deletes everything older
than that window after each frame. Frame numbers are passed explicitly (the session would otherwise number a
new frame by how many it holds, which pruning changes).

Objects can also leave the session (`remove_objects`: forgotten or merged ids then cost nothing per frame) and
be prompted again under their id (`add_objects` with a known id: a revived object). transformers' session has
no removal call, so `remove_objects` re-indexes its per-object dictionaries itself (checked against a session
that never had the object in tests/test_seg_video_identity.py). Each object keeps two conditioning frames: its first
prompt and its latest one, so repeated revivals do not grow the state either.
"""
from __future__ import annotations

import numpy as np
import torch

from nbhelpers.seg.models import LoadedModel
from nbhelpers.seg.types import FrameMasks


class StreamingTracker:
    """Track prompted objects frame by frame through one Sam2Video session.

    Args:
        sam_video: from nbhelpers.seg.models.load_sam2_video.
        height, width: the video's frame size (px).
        offload_frames: keep the preprocessed frame on the CPU (saves GPU memory, costs a copy per frame).
        offload_state: keep SAM 2's memory features on the CPU (saves GPU memory, costs copies per frame).
    """

    def __init__(self, sam_video: LoadedModel, height: int, width: int, offload_frames: bool = False,
                 offload_state: bool = False):
        self.loaded = sam_video
        self.size = (int(height), int(width))
        device = sam_video.device
        cpu = torch.device("cpu")
        self.session = sam_video.processor.init_video_session(
            inference_device=device, inference_state_device=cpu if offload_state else device,
            video_storage_device=cpu if offload_frames else device, processing_device=device, dtype=sam_video.dtype)
        config = sam_video.model.config
        # Frames older than this are never read again (see the module docstring); +1 keeps a margin.
        self.memory_window = max(config.num_maskmem, config.max_object_pointers_in_encoder) + 1
        self.frames_held_peak = 0

    @property
    def object_ids(self) -> list[int]:
        return list(self.session.obj_ids)

    def add_objects(self, frame_index: int, object_ids: list[int], boxes_xyxy: np.ndarray) -> None:
        """Prompt objects with boxes (pixels, xyxy) on the frame `track` is called with next; a known id is
        prompted again (the box becomes a new conditioning frame for it)."""
        assert len(object_ids) == len(boxes_xyxy) > 0, "one box per object id"
        boxes = [[[float(v) for v in box] for box in np.asarray(boxes_xyxy, np.float32)]]  # (1 image, N boxes, 4)
        self.loaded.processor.add_inputs_to_inference_session(
            self.session, frame_idx=frame_index, obj_ids=list(object_ids), input_boxes=boxes, original_size=self.size)

    def remove_objects(self, object_ids: list[int]) -> None:
        """Drop objects from the session: from the next frame on they cost nothing and are not reported."""
        session = self.session
        kept = [object_id for object_id in session.obj_ids if object_id not in set(object_ids)]
        if len(kept) == len(session.obj_ids):
            return
        old_index = {object_id: session.obj_id_to_idx(object_id) for object_id in kept}
        per_object = [session.point_inputs_per_obj, session.mask_inputs_per_obj, session.output_dict_per_obj,
                      session.frames_tracked_per_obj]
        kept_values = [[table[old_index[object_id]] for object_id in kept] for table in per_object]
        for table, values in zip(per_object, kept_values):
            table.clear()
            table.update(enumerate(values))
        session._obj_id_to_idx.clear()
        session._obj_idx_to_id.clear()
        for index, object_id in enumerate(kept):
            session._obj_id_to_idx[object_id], session._obj_idx_to_id[index] = index, object_id
        session.obj_ids = list(kept)
        session.obj_with_new_inputs = [i for i in session.obj_with_new_inputs if i in old_index]

    @torch.inference_mode()
    def appearance(self, frame_index: int, frame_rgb: np.ndarray, regions: np.ndarray) -> np.ndarray:
        """What each region of a frame looks like: SAM 2's image embedding (its last, lowest-resolution feature
        map) averaged under the region, as unit vectors. The embedding is the one `track` computes for the
        frame: it is cached in the session, so whichever of the two runs first pays for it.

        Args:
            frame_index: the frame `track` is (or was last) called with. regions: (N, H, W) bool at the video's size.
        Returns:
            (N, C) float32, unit length (a region too small to cover any feature cell gives a zero row).
        """
        features = self._image_embedding(frame_index, frame_rgb)  # (C, h, w)
        weights = torch.as_tensor(np.asarray(regions, np.float32)[:, None], device=features.device)
        weights = torch.nn.functional.interpolate(weights, size=features.shape[-2:], mode="area")[:, 0]
        pooled = torch.einsum("nhw,chw->nc", weights, features) / weights.sum((1, 2)).clamp_min(1e-6)[:, None]
        return torch.nn.functional.normalize(pooled, dim=1).cpu().numpy()

    def _image_embedding(self, frame_index: int, frame_rgb: np.ndarray) -> torch.Tensor:
        """(C, h, w) float32 image embedding of the frame, from the session's cache or computed into it exactly as
        Sam2VideoModel._prepare_vision_features would, so that tracking the frame reuses it."""
        cache = self.session.cache
        cached = cache.get_vision_features(frame_index)
        if cached is None:
            processor, model = self.loaded.processor, self.loaded.model
            pixels = processor(images=frame_rgb, device=self.loaded.device, return_tensors="pt").pixel_values
            image = model.get_image_features(pixels.to(self.loaded.device, self.loaded.dtype), return_dict=True)
            cached = {"vision_feats": image.fpn_hidden_states, "vision_pos_embeds": image.fpn_position_encoding}
            cache.cache_vision_features(frame_index, cached)
        height, width = self.loaded.model.config.vision_config.backbone_feature_sizes[-1]
        embedding = cached["vision_feats"][-1][:, 0]  # (h * w, C): flattened as get_image_features leaves it
        return embedding.float().T.reshape(-1, height, width)

    @torch.inference_mode()
    def track(self, frame_index: int, frame_rgb: np.ndarray) -> FrameMasks:
        """Propagate every object to this frame (frame indices must increase by one per call)."""
        assert frame_rgb.shape[:2] == self.size, f"frame {frame_rgb.shape[:2]} != video size {self.size}"
        if not self.session.obj_ids:
            empty = np.zeros((0, *self.size), bool)
            return FrameMasks([], empty, np.zeros(0, np.float32))
        processor = self.loaded.processor
        pixels = processor(images=frame_rgb, device=self.loaded.device, return_tensors="pt").pixel_values[0]
        output = self.loaded.model(inference_session=self.session, frame=pixels, frame_idx=frame_index)
        masks = processor.post_process_masks([output.pred_masks], original_sizes=[list(self.size)], binarize=True)[0]
        scores = output.object_score_logits.float().reshape(-1).cpu().numpy()
        result = FrameMasks(list(output.object_ids), masks[:, 0].cpu().numpy().astype(bool), scores)
        self.prune(frame_index)
        return result

    def prune(self, frame_index: int) -> None:
        """Delete the frames and outputs SAM 2 will not read again (all but the memory window and prompts)."""
        session = self.session
        oldest_kept = frame_index - self.memory_window
        for key in [key for key in (session.processed_frames or {}) if key < frame_index]:
            del session.processed_frames[key]
        for object_index, outputs in session.output_dict_per_obj.items():
            stored = outputs["non_cond_frame_outputs"]
            for key in [key for key in stored if key < oldest_kept]:
                del stored[key]
            prompts = sorted(outputs["cond_frame_outputs"])
            for key in prompts[1:-1]:  # between the first prompt and the latest one (revivals)
                del outputs["cond_frame_outputs"][key]
                session.point_inputs_per_obj[object_index].pop(key, None)
                session.mask_inputs_per_obj[object_index].pop(key, None)
            tracked = session.frames_tracked_per_obj[object_index]
            for key in [key for key in tracked if key < oldest_kept]:
                del tracked[key]
        self.frames_held_peak = max(self.frames_held_peak, self.frames_held())

    def frames_held(self) -> int:
        """How many distinct frames the session still holds pixels or outputs for."""
        session = self.session
        held = set(session.processed_frames or {})
        for outputs in session.output_dict_per_obj.values():
            held |= set(outputs["non_cond_frame_outputs"]) | set(outputs["cond_frame_outputs"])
        for tracked in session.frames_tracked_per_obj.values():
            held |= set(tracked)
        return len(held)
