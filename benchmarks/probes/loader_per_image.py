"""What one training image costs a data-loader worker: this package's dataset against the plain reference pipeline.

    python benchmarks/probes/loader_per_image.py > benchmarks/probes/loader_per_image.log

On the same photo-sized JPEGs (`scripts/benchmark_training.py`'s generator, 500x375, quality 90) and the same
paper-recipe augmentation at 224 px, one process and one thread (as in a worker), it times per image:

- reference: `torchvision.datasets.ImageFolder` with timm's `create_transform` (RandAugment m9, random erasing 0.25,
  bicubic), float32 output normalised and erased in the worker: the pipeline issue 13 measured at 5,829 img/s with
  15 workers on an H200 host;
- ours: `ImageClassificationDataset` over `datasets`' imagefolder, as `train.py` builds it: uint8 output
  (normalising and erasing run on the device), the augmentation seeded per (seed, epoch, image) for exact resume;
- ours unseeded: the same without the per-image seeding. Its images get other augmentations than the seeded ones,
  whose costs differ, so the seeding's own cost is also timed alone (`seeded_random_state`).

Each pipeline takes every image once untimed, then the median of 3 rounds over all images, the pipelines taking
turns so that a slow spell of the machine falls on all of them.
"""

import importlib
import statistics
import tempfile
import time
import timeit
from pathlib import Path

import torch

from modeling_pvt.data.classification import (
    ImageClassificationDataset,
    build_train_transform,
    load_image_classification_data,
)
from modeling_pvt.data.sampling import seeded_random_state

REPO = Path(__file__).resolve().parents[2]
NUM_IMAGES = 512
ROUNDS = 3


def seconds_for_all(dataset: torch.utils.data.Dataset) -> float:
    start = time.perf_counter()
    for index in range(len(dataset)):
        dataset[index]
    return time.perf_counter() - start


def seed_and_restore() -> None:
    with seeded_random_state(12345):
        pass


def main() -> None:
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    torch.set_num_threads(1)
    benchmark_training = importlib.import_module("modeling_pvt.scripts.benchmark_training")
    cpu = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    print(f"torch {torch.__version__}, {cpu.split(':', 1)[1].strip()}, 1 thread, {NUM_IMAGES} JPEGs of 500x375")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        benchmark_training.write_jpeg_folder(root / "train", NUM_IMAGES)
        reference_transform = create_transform(
            224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic", re_prob=0.25
        )
        data = load_image_classification_data(train_dir=str(root / "train"), check_images="none")
        pipelines = {
            "reference (ImageFolder + timm, float32)": ImageFolder(str(root / "train"), reference_transform),
            "ours (datasets + timm, uint8, seeded)": ImageClassificationDataset(
                data.train, data.image_column, data.label_column, build_train_transform(224), "train", 0
            ),
            "ours unseeded": ImageClassificationDataset(
                data.train, data.image_column, data.label_column, build_train_transform(224), "train", None
            ),
        }
        rounds = {name: [] for name in pipelines}
        for round_index in range(ROUNDS + 1):  # the first round warms up, the others alternate the pipelines
            for name, dataset in pipelines.items():
                seconds = seconds_for_all(dataset)
                if round_index:
                    rounds[name].append(seconds / len(dataset) * 1e3)
        seeding = timeit.timeit(seed_and_restore, number=2000) / 2000 * 1e6
        print(f"seeded_random_state alone: {seeding:.0f} us per image")
        for name, dataset in pipelines.items():
            times = rounds[name]
            print(
                f"{name}: {statistics.median(times):.2f} ms per image (rounds {min(times):.2f}-{max(times):.2f}; "
                f"{len(dataset)} images)"
            )


if __name__ == "__main__":
    main()
