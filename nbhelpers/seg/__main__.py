"""Command line: text-prompted segmentation of an image, a folder of images, or a video.

    python -m nbhelpers.seg IMAGE_OR_FOLDER --prompt "a cat. a remote" --out DIR [--backend NAME (registered backends)]
        [--sam3 ID_OR_DIR] [--sam3-video ID_OR_DIR] [--sam3-threshold F] [--sam3-mask-threshold F] [--box-threshold F] [--text-threshold F] [--clipseg-threshold F] [--nms-iou F] [--multimask]
        [--dino ID_OR_DIR] [--sam ID_OR_DIR] [--clipseg ID_OR_DIR] [--device D] [--batch-size N]
    python -m nbhelpers.seg VIDEO --prompt "a person. a dog" --out DIR [--redetect-every N] [--frame-stride N]
        [--max-frames N] [--max-objects N] [--forget-after SECONDS] [--clipseg-redetect] [--id-maps]
        [--save-masks] [--offload]   (+ the options above)
    torchrun --nproc_per_node=N -m nbhelpers.seg FOLDER --prompt ... --out DIR [--overwrite]

A folder (of images and/or videos) is split across torchrun's processes (one model copy per GPU); inputs whose
outputs are complete are skipped (--overwrite redoes them) and DIR/inputs_summary.json lists every input as done,
skipped or failed with the reason. A video inside a folder goes to DIR/<video stem>/.

Writes DIR/<image stem>/{mask.png, instances.png, overlay.png, detections.json} per image; for a video
(.mp4, .mov, .avi, .mkv, .webm, …, and animated GIFs; a single-frame GIF is an image) DIR/video_overlay.mp4 and DIR/tracks.json (+ DIR/id_maps/ with --id-maps).
Exit codes: 0 done (also when nothing was found), 2 bad input (missing file, empty prompt, bad model path,
unreadable image: the others are still written), 1 unexpected error.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from functools import partial
from pathlib import Path

from nbhelpers.seg.types import (DEFAULT_BACKEND, DEFAULT_BATCH_SIZE, DEFAULT_CLIPSEG, DEFAULT_DINO, DEFAULT_SAM,
                                 DEFAULT_SAM3, DetectionSettings, VideoSettings)

EXIT_OK, EXIT_UNEXPECTED, EXIT_BAD_INPUT = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line on stderr instead of usage + message
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def fraction(text: str) -> float:
    """argparse type for thresholds: a number (its range is DetectionSettings' to check, the one place it is)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in [0, 1]") from None


def build_parser() -> argparse.ArgumentParser:
    from nbhelpers.seg.registry import backends

    defaults = DetectionSettings()
    parser = _Parser(prog="python -m nbhelpers.seg", description="Text prompt -> GroundingDINO boxes -> SAM 2.1 masks "
                     "(CLIPSeg fallback) for an image, every image of a folder, or a video (SAM 2 tracking).")
    parser.add_argument("images", metavar="IMAGE_FOLDER_OR_VIDEO",
                        help="an image file, a folder of images, or a video (.mp4, .mov, .avi, .mkv, .webm, …; an "
                             "animated GIF is a video, a single-frame GIF an image)")
    parser.add_argument("--prompt", required=True, help='objects to find, e.g. "a cat. a remote" or "cat, dog"')
    parser.add_argument("--out", required=True, type=Path, help="output folder (one subfolder per image)")
    parser.add_argument("--backend", choices=list(backends()), default=DEFAULT_BACKEND,
                        help="; ".join(f"{name}: {spec.label}" for name, spec in backends().items())
                        + " (default %(default)s)")
    parser.add_argument("--sam3", default=DEFAULT_SAM3, help="SAM 3 hub id (gated: accept the licence, set HF_TOKEN) "
                        "or local folder")
    parser.add_argument("--sam3-video", default=None, help="--backend sam3 only: SAM 3 video checkpoint, hub id or "
                        "local folder (default: the --sam3 checkpoint, which holds both)")
    parser.add_argument("--sam3-threshold", type=fraction, default=defaults.sam3_threshold,
                        help="SAM 3 instance score minimum (default %(default)s)")
    parser.add_argument("--sam3-mask-threshold", type=fraction, default=defaults.sam3_mask_threshold,
                        help="SAM 3 mask probability cut (default %(default)s)")
    parser.add_argument("--box-threshold", type=fraction, default=defaults.box_threshold,
                        help="GroundingDINO box score minimum (default %(default)s)")
    parser.add_argument("--text-threshold", type=fraction, default=defaults.text_threshold,
                        help="GroundingDINO phrase score minimum (default %(default)s)")
    parser.add_argument("--clipseg-threshold", type=fraction, default=defaults.clipseg_threshold,
                        help="CLIPSeg fallback probability cut (default %(default)s)")
    parser.add_argument("--nms-iou", type=fraction, default=defaults.nms_iou,
                        help="per-label NMS overlap limit (default %(default)s)")
    parser.add_argument("--multimask", action="store_true", help="SAM: best of three masks per box")
    parser.add_argument("--dino", default=DEFAULT_DINO, help="detector: GroundingDINO / MM-Grounding-DINO / LLMDet hub "
                        "id, tiny/base/mm-tiny/llmdet-tiny/llmdet-base/llmdet-large, or local folder")
    parser.add_argument("--sam", default=DEFAULT_SAM, help="SAM 2.1 hub id, tiny/small/base-plus/large or folder")
    parser.add_argument("--clipseg", default=DEFAULT_CLIPSEG, help="CLIPSeg hub id or local folder")
    parser.add_argument("--device", default=None, help="cuda, cpu, mps (default: auto)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per forward pass")
    parser.add_argument("--overwrite", action="store_true", help="folder: redo inputs whose outputs are already complete")
    video = parser.add_argument_group("video")
    video_defaults = VideoSettings()
    video.add_argument("--redetect-every", type=int, default=video_defaults.redetect_every,
                       help="frames between detections that add or revive objects; 0 = detect once (default "
                            "%(default)s); gdino-sam2 only: sam3 detects on every frame")
    video.add_argument("--frame-stride", type=int, default=video_defaults.frame_stride, help="process every n-th frame")
    video.add_argument("--max-frames", type=int, default=video_defaults.max_frames,
                       help="stop after this many processed frames")
    video.add_argument("--max-objects", type=int, default=video_defaults.max_objects,
                       help="most objects tracked at once (default %(default)s)")
    video.add_argument("--forget-after", type=float, default=video_defaults.forget_after_s, metavar="SECONDS",
                       help="a lost object leaves the session after this many seconds of video (default %(default)s)")
    video.add_argument("--clipseg-redetect", action="store_true",
                       help="let CLIPSeg add objects at re-detection frames too (by default it only seeds the first ones)")
    video.add_argument("--id-maps", action="store_true", help="also write a uint16 object-id PNG per frame")
    video.add_argument("--save-masks", action="store_true", help="RLE masks per frame in tracks.json")
    video.add_argument("--overlay-alpha", type=fraction, default=video_defaults.overlay_alpha,
                       help="mask opacity in video_overlay.mp4 (default %(default)s)")
    video.add_argument("--offload", action="store_true", help="keep frames and SAM 2 state on the CPU")
    return parser


class BadInput(Exception):
    """Input the user can fix (exit code 2)."""


def _check_before_imports(args: argparse.Namespace) -> Path:
    """The checks that need neither torch nor the models (a mistyped path fails in a fraction of a second, not after
    seconds of imports); returns the input path."""
    from nbhelpers.seg.inputs import normalize_prompt

    source = Path(args.images).expanduser()
    try:
        if not source.exists():
            raise FileNotFoundError(f"{str(source)!r} does not exist (give an image file, a folder of images or a video)")
        normalize_prompt(args.prompt)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        args.settings, args.video_settings = _settings(args), _video_settings(args)  # their ranges are checked here
    except (FileNotFoundError, ValueError) as error:
        raise BadInput(str(error)) from error
    return source


def _check_inputs(source: Path) -> None:
    """Raise ValueError when nothing in `source` can be segmented: a corrupt video, a folder with no image or video,
    or only unreadable images. Some bad inputs of a folder are left to the folder run, which reports each one as
    it skips it (and lists it in inputs_summary.json)."""
    from nbhelpers.seg.video.io import list_video_files
    from nbhelpers.seg.inputs import IMAGE_EXTENSIONS, find_unreadable_images, list_image_files
    from nbhelpers.seg.video import is_video_file, probe_video
    from nbhelpers.seg.video.io import VIDEO_EXTENSIONS

    if is_video_file(source):
        probe_video(source)  # a corrupt or undecodable video fails here, before model loading
        return
    images = list_image_files(source) if source.is_dir() else [source]
    videos = list_video_files(source) if source.is_dir() else []
    if not images and not videos:
        raise ValueError(f"no images or videos in folder {str(source)!r} (looked for {', '.join(IMAGE_EXTENSIONS)}, "
                         f"{', '.join(extension for extension in VIDEO_EXTENSIONS if extension != '.gif')})")
    unreadable = find_unreadable_images(source) if images else []  # a bad image fails before model loading
    if unreadable and len(unreadable) == len(images) and not videos:
        raise ValueError("; ".join(str(error) for _, error in unreadable))


def _prepare(config, source: Path):
    """Check the inputs that need the video reader and image decoder, then load the models of the configured
    backend (its registry entry's loader); any problem here is the user's to fix."""
    from nbhelpers.platform import ensure_writable_dir, select_runtime
    from nbhelpers.seg.models import ModelLoadError
    from nbhelpers.seg.registry import backend_spec

    try:
        _check_inputs(source)
        ensure_writable_dir(Path(config.out_dir), "--out")
        select_runtime(config.device, verbose=False)  # "cuda" without a GPU fails here
        spec = backend_spec(config.backend)
        print(f"loading models: {' | '.join(spec.model_names(config)) or spec.label}", flush=True)
        return spec.load(config)
    except (FileNotFoundError, PermissionError, ValueError, ModelLoadError, RuntimeError) as error:
        raise BadInput(str(error)) from error


def report_unreadable(args: argparse.Namespace, name: str, error: Exception) -> None:
    """One `error: skipped` line per unreadable image, written above the progress bar; remembered in args.unreadable."""
    from tqdm.auto import tqdm

    if name not in args.unreadable:
        args.unreadable.add(name)
        tqdm.write(f"error: skipped {name}: {error}", file=sys.stderr)


def _settings(args: argparse.Namespace) -> DetectionSettings:
    return DetectionSettings(box_threshold=args.box_threshold, text_threshold=args.text_threshold,
                             clipseg_threshold=args.clipseg_threshold, nms_iou=args.nms_iou, multimask=args.multimask,
                             sam3_threshold=args.sam3_threshold, sam3_mask_threshold=args.sam3_mask_threshold)


def _video_settings(args: argparse.Namespace) -> VideoSettings:
    return VideoSettings(frame_stride=args.frame_stride, max_frames=args.max_frames, redetect_every=args.redetect_every,
                         max_objects=args.max_objects, forget_after_s=args.forget_after,
                         clipseg_redetect=args.clipseg_redetect, overlay_alpha=args.overlay_alpha)


def video_options(args: argparse.Namespace) -> dict:
    """segment_any_video's keyword arguments from the command line's video options."""
    return dict(video_settings=args.video_settings, save_id_maps=args.id_maps, save_masks=args.save_masks,
                offload_frames=args.offload, offload_state=args.offload)


def run_video(args: argparse.Namespace, source: Path, models) -> int:
    """Segment a video into --out; returns the exit code."""
    from nbhelpers.seg.registry import segment_any_video
    from nbhelpers.seg.video import VideoOutOfMemoryError

    try:
        result = segment_any_video(source, args.prompt, models, args.out, settings=args.settings,
                                   **video_options(args))
    except (ValueError, VideoOutOfMemoryError) as error:  # bad options, an unreadable video, or too little GPU memory
        raise BadInput(str(error)) from error
    print(result.summary(), "->", args.out, flush=True)
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    """Segment and save every image (or the video); returns the exit code."""
    source = _check_before_imports(args)
    from nbhelpers import distributed
    from nbhelpers.seg import pipeline
    from nbhelpers.seg.folder_run import run_folder
    from nbhelpers.seg.video import is_video_file

    args.device = distributed.init_from_env(args.device)  # under torchrun: this process's GPU
    config = pipeline.SegmentConfig(
        images=str(source), prompt=args.prompt, out_dir=str(args.out), backend=args.backend, dino_model=args.dino,
        sam_model=args.sam, clipseg_model=args.clipseg, sam3_model=args.sam3, sam3_video_model=args.sam3_video,
        detection=args.settings, batch_size=args.batch_size, device=args.device, video_settings=args.video_settings)
    models = _prepare(config, source)
    if is_video_file(source):
        return run_video(args, source, models)
    if source.is_dir():
        summary = run_folder(config, models, args.overwrite, video_options(args))
        distributed.shutdown()  # under torchrun every process gets here (failures are statuses): they leave together
        return EXIT_BAD_INPUT if summary["counts"]["failed"] else EXIT_OK
    pipeline.run(config, models, on_unreadable=partial(report_unreadable, args))
    return EXIT_BAD_INPUT if args.unreadable else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (see the module docstring)."""
    try:
        args = build_parser().parse_args(argv)
        args.unreadable = set()  # names of images reported as unreadable (each once)
    except SystemExit as exit_request:  # --help (0) or a usage error (2, already printed on one line)
        return exit_request.code if isinstance(exit_request.code, int) else EXIT_BAD_INPUT
    try:
        return run(args)
    except BadInput as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - anything else is a bug: show where
        traceback.print_exc()
        print(f"error: unexpected {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
