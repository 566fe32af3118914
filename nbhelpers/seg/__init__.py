"""Text-prompted segmentation: GroundingDINO boxes -> SAM 2.1 masks, with a CLIPSeg fallback."""
