"""Vision Transformer from scratch on CIFAR-10: config, model, data, GPU augmentation, training, report."""
