"""Sample order and per-sample random augmentation as pure functions of (seed, epoch, index).

A resumed run, or one with another number of workers or processes, sees exactly the batches the uninterrupted run
saw: `EpochShuffleSampler` orders the samples, `EpochSeededDataset` seeds each sample's augmentation, and the loaders
of `build_train_dataloader` / `build_eval_dataloader` never draw from the global generators.
"""

import random
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def seeded_random_state(seed: int):
    """Run a block with Python, NumPy and torch (CPU) random generators seeded by `seed`, then restore them."""
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        # The CPU generator alone, which is all fork_rng saves: `torch.manual_seed` also queues the seed for every
        # accelerator type, recording a stack trace each time, which cost more than the rest of this block together.
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class EpochSeededDataset(torch.utils.data.Dataset):
    """Base of the training datasets (dataclasses with an `augmentation_seed` field): `augmentation(index)` makes the
    random augmentation of sample `index` in the epoch set by `set_epoch` a pure function of (`augmentation_seed`,
    epoch, index), whatever the number of workers, the rank that loads the sample, or an interruption and resume.
    Without a seed it draws from the global random state."""

    augmentation_seed: int | None = None

    @property
    def epoch(self) -> int:
        shared = self.__dict__.get("_shared_epoch")
        return 0 if shared is None else int(shared)

    def set_epoch(self, epoch: int) -> None:
        # Persistent data-loader workers keep the copy of the dataset made when they started, so the epoch lives in
        # shared memory, made at the first call (the training loop makes it before any worker starts).
        if "_shared_epoch" not in self.__dict__:
            self._shared_epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._shared_epoch.fill_(epoch)

    @contextmanager
    def augmentation(self, index: int):
        if self.augmentation_seed is None:
            yield
            return
        seed = int(np.random.SeedSequence([self.augmentation_seed, self.epoch, index]).generate_state(1)[0])
        with seeded_random_state(seed):
            yield


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A random order of `range(num_samples)` that depends only on `seed` and the epoch set with `set_epoch`.

    Every rank draws the same order (accelerate then deals the batches out), and a resumed run re-creates the order
    of the interrupted epoch exactly, without touching the global random generators.
    """

    def __init__(self, num_samples: int, seed: int):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        order_generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(self.num_samples, generator=order_generator).tolist()


def _loader_options(num_workers: int) -> dict:
    """Workers that live for the whole run (no restart, and no stall, at each epoch) and, with a GPU, batches in
    page-locked memory so that their copy to the device overlaps the computation."""
    return {
        "num_workers": num_workers,
        "persistent_workers": num_workers > 0,
        "pin_memory": torch.cuda.is_available(),
    }


def build_train_dataloader(
    dataset: torch.utils.data.Dataset, batch_size: int, seed: int, collate_fn: Callable, num_workers: int = 0
) -> torch.utils.data.DataLoader:
    """Shuffled by `EpochShuffleSampler`, incomplete batches dropped, and its own generator: creating an iterator
    must not draw from the global generators, or a resumed run (which creates one more) would drift."""
    return torch.utils.data.DataLoader(
        dataset,
        sampler=EpochShuffleSampler(len(dataset), seed=seed),
        batch_size=batch_size,
        drop_last=True,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(seed),
        **_loader_options(num_workers),
    )


def build_eval_dataloader(
    dataset: torch.utils.data.Dataset, batch_size: int, collate_fn: Callable, num_workers: int = 0
) -> torch.utils.data.DataLoader:
    """In order, every sample once (`gather_for_metrics` drops what accelerate repeats to even out the ranks)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(0),  # see build_train_dataloader
        **_loader_options(num_workers),
    )
