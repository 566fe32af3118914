"""Vision Transformer from scratch on CIFAR-10, resumable on any device.

Modules, in import order (each imports only those before it): `config` (dataclasses + named presets) ->
`model`, `augment` (batched GPU augmentation), `data` (finding, decoding and caching CIFAR-10) -> `state`
(EMA, the loop's state, RNG state, FitResult) -> `checkpoint`, `evaluate` -> `report` -> `train` (`fit`) ->
`launch` (torchrun or one process per GPU from a notebook) -> `ablation` (studies of variants at an equal budget) ->
`__main__` (CLI).
"""
