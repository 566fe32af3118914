"""A folder of images (or of videos) split across `torchrun` processes, resumable, with a per-input summary.

    torchrun --nproc_per_node=N -m nbhelpers.seg FOLDER --prompt "a cat" --out DIR

Every process loads the models on its own device and segments every N-th input (images in name order; a
folder of videos: one video at a time per process). Each input's outputs are the same files a single-process run
writes, so the union of the processes' outputs is that run's. Inputs whose outputs are complete (their completion
record, written last, matches the files: nbhelpers.seg.export.outputs_complete) are skipped (a session that died
mid-folder continues), unless `overwrite`. Rank 0 writes DIR/inputs_summary.json listing every
input: done, skipped (complete outputs found) or failed with the reason.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from nbhelpers import distributed
from nbhelpers.platform import atomic_write, ensure_writable_dir
from nbhelpers.seg import pipeline
from nbhelpers.seg.export import OUTPUT_FILES, outputs_complete, remove_dead_temp_files
from nbhelpers.seg.inputs import list_image_files
from nbhelpers.seg.models import Sam3Models, SegmentationModels
from nbhelpers.seg.video import VideoError, VideoOutOfMemoryError
from nbhelpers.seg.video.io import list_video_files
from nbhelpers.seg.video.export import ID_MAPS_DIR, VIDEO_OUTPUTS

SUMMARY_FILE = "inputs_summary.json"


@dataclass
class InputStatus:
    input: str  # file name inside the folder
    output: str  # output folder, relative to OUT
    status: str  # "done" | "skipped" | "failed"
    reason: str = ""  # why it failed, or why it was skipped
    rank: int = 0  # the process that handled it


def rank_share(planned: list[tuple[Path, Path]], block: int = 1) -> list[tuple[Path, Path]]:
    """This rank's (input, output folder) pairs, dealt out in whole blocks of `block` (the batch size): batched
    inference pads the images of a batch together, so keeping the single-process batches keeps each image's result
    identical to that run's."""
    return [item for index, item in enumerate(planned) if (index // block) % distributed.world_size() == distributed.rank()]


def my_share(planned: list[tuple[Path, Path]], names: tuple[str, ...], overwrite: bool, block: int = 1
             ) -> tuple[list[tuple[Path, Path]], list[InputStatus]]:
    """This rank's inputs (see rank_share) still to do, and the statuses of those it skips as complete."""
    todo, skipped = [], []
    for file, folder in rank_share(planned, block):
        if not overwrite and outputs_complete(folder, names):
            skipped.append(InputStatus(file.name, folder.name, "skipped", "complete outputs found (--overwrite redoes them)", distributed.rank()))
        else:
            todo.append((file, folder))
    return todo, skipped


def remove_killed_runs_temp_files(planned: list[tuple[Path, Path]], is_video: dict[Path, bool], out_dir: Path,
                                  block: int) -> None:
    """Delete the temp files killed runs left in this rank's output folders (rank 0: OUT too), including those of
    inputs skipped as complete; another rank's folders are its own to clean (it may be writing there now)."""
    started = time.time()
    mine = rank_share([item for item in planned if not is_video[item[0]]], block)
    mine += rank_share([item for item in planned if is_video[item[0]]])
    folders = [folder for _, folder in mine] + ([out_dir] if distributed.is_main() else [])
    removed = [path for folder in folders for path in remove_dead_temp_files(folder, started)]
    if removed:
        print(f"removed {len(removed)} temp file(s) left by killed runs (e.g. {removed[0]})", flush=True)


def write_summary(statuses: list[InputStatus], out_dir: Path, order: list[str]) -> dict:
    """Gather every rank's statuses; rank 0 writes them in input order. Returns the summary (on every rank)."""
    gathered = [status for part in distributed.gather_objects([asdict(s) for s in statuses]) for status in part]
    position = {name: index for index, name in enumerate(order)}
    gathered.sort(key=lambda status: position.get(status["input"], len(order)))
    counts = {kind: sum(status["status"] == kind for status in gathered) for kind in ("done", "skipped", "failed")}
    summary = {"world_size": distributed.world_size(), "counts": counts, "inputs": gathered}
    if distributed.is_main():
        text = json.dumps(summary, indent=2)
        atomic_write(out_dir / SUMMARY_FILE, lambda file: file.write(text.encode()))
        print(f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed -> {out_dir / SUMMARY_FILE}", flush=True)
    return summary


def report_failure(statuses: list[InputStatus], folder_of: dict[str, Path]) -> Callable[[str, Exception], None]:
    """An `on_unreadable` callback recording the failure (the run goes on with the other inputs)."""
    def record(name: str, error: Exception) -> None:
        if any(status.input == name and status.status == "failed" for status in statuses):
            return  # reported once, though both the up-front check and the run may find it
        statuses.append(InputStatus(name, folder_of[name].name, "failed", str(error), distributed.rank()))
        tqdm.write(f"error: skipped {name}: {error}", file=sys.stderr)  # above the progress bar, not onto it

    return record


def run_folder(config: pipeline.SegmentConfig, models: SegmentationModels | Sam3Models, overwrite: bool = False,
               video_options: dict | None = None) -> dict:
    """This process's share of the folder's images, then of its videos; returns the summary of every input.

    Args:
        config: `images` is the folder; outputs go to OUT/<input stem>/ (a video: video_overlay.mp4, tracks.json).
        overwrite: redo inputs whose outputs are already complete.
        video_options: keyword arguments for `registry.segment_any_video` (video_settings, save_id_maps, save_masks,
            offload_frames, offload_state).
    """
    source, out_dir = config.image_source(), ensure_writable_dir(config.output_dir(), "OUT_DIR")
    images, videos = list_image_files(source), list_video_files(source)
    planned = pipeline.plan_outputs(sorted(images + videos), out_dir)
    is_video = {file: file in set(videos) for file, _ in planned}
    remove_killed_runs_temp_files(planned, is_video, out_dir, config.batch_size)
    image_todo, statuses = my_share([item for item in planned if not is_video[item[0]]], tuple(OUTPUT_FILES.values()), overwrite, config.batch_size)
    video_todo, skipped_videos = my_share([item for item in planned if is_video[item[0]]], VIDEO_OUTPUTS, overwrite)
    if (video_options or {}).get("save_id_maps"):  # finished without id maps, which are asked for now: redo
        lacking = {status.input for status in skipped_videos if not (out_dir / status.output / ID_MAPS_DIR).is_dir()}
        video_todo += [item for item in planned if item[0].name in lacking]
        skipped_videos = [status for status in skipped_videos if status.input not in lacking]
    statuses += skipped_videos
    if image_todo:
        results = pipeline.run(config, models, on_unreadable=report_failure(statuses, dict((f.name, d) for f, d in image_todo)), planned=image_todo)
        statuses += [InputStatus(result.name, result.folder.name, "done", rank=distributed.rank()) for result in results]
    for file, folder in video_todo:
        statuses.append(segment_one_video(file, folder, config, models, video_options or {}))
    return write_summary(statuses, out_dir, [file.name for file, _ in planned])


def segment_one_video(file: Path, folder: Path, config: pipeline.SegmentConfig, models: SegmentationModels | Sam3Models, options: dict) -> InputStatus:
    """One video of the folder into its own output folder, with the backend the models belong to; a bad video is
    recorded as failed, not raised."""
    try:
        pipeline.segment_folder_video(file, folder, config, models, options)
    except (ValueError, VideoError, VideoOutOfMemoryError) as error:
        print(f"error: skipped {file.name}: {error}", file=sys.stderr, flush=True)
        return InputStatus(file.name, folder.name, "failed", str(error), distributed.rank())
    return InputStatus(file.name, folder.name, "done", rank=distributed.rank())
