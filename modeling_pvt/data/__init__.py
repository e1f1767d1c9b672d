"""The data floor: datasets, sampling and per-sample seeding, batch transforms. Imports no training code.

- `sources`: where images come from and the bad-data policy every task shares;
- `sampling`: sample order and augmentation as pure functions of (seed, epoch, index), and the loaders;
- `classification`, `segmentation`, `detection`, `digit_canvases`: each task's data.
"""
