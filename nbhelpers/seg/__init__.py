"""Text-prompted segmentation (the Q2 notebook): GroundingDINO boxes -> SAM 2.1 masks, with a CLIPSeg fallback,
on images, folders and videos.

    types       results and DetectionSettings (numpy only; the one copy of the detection defaults)
    inputs      image loading and prompt handling
    models      loading the models (from_pretrained, cached); inference: running them
    backends    SegmentationBackend and its GroundingDINO -> SAM 2.1 implementation
    image       segment_image / segment_images / iter_segmentations
    video/      segment_video and its tracking, video I/O and tracks.json export
    render      overlays and label maps; export: mask.png, instances.png, overlay.png, detections.json
    pipeline    the configured run shared by the notebook and the CLI; ui: the ipywidgets front end
    __main__    python -m nbhelpers.seg
"""
