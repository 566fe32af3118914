"""Helpers behind the two notebooks: ViT on CIFAR-10 (`nbhelpers.vit`) and text-prompted segmentation (`nbhelpers.seg`)."""

__version__ = "0.1.0"
