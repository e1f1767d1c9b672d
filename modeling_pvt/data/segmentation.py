"""Semantic-segmentation data for `scripts/train_segmentation.py`: image/mask pairs, checked and augmented jointly.

`load_segmentation_data` reads either a `datasets` dataset with an image and a mask column (such as
`scene_parse_150`) or folders laid out as `<dir>/images/<stem>.<ext>` + `<dir>/masks/<stem>.png` (single-channel
masks, pixel value = class id; palette PNGs give their palette indices), holds out part of train when there is no
validation split, keeps the first N samples on request, and skips pairs whose image or mask cannot be opened with a
warning that counts them (`drop_unreadable_pairs`, the bad-data policy of `modeling_pvt.data.sources`).
`SegmentationDataset` turns pairs into training samples
(random rescale, crop padded with `ignore_index`, flip: `train_transform`, seeded per sample for exact resume) or
evaluation samples (the saved image processor's resize; the mask keeps its own size, `collate_eval` pads batches).
Class ids are relabelled as the `mean_iou` metric does (`reduce_labels`: ADE20K's 0 = "other" becomes ignored).
"""

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm.auto import tqdm
from transformers import SegformerImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..hub.results import dataset_fields
from ..metrics.mean_iou.mean_iou import relabel
from .sampling import EpochSeededDataset
from .sources import IMAGE_EXTENSIONS, DataError, drop_unreadable_images, load_named_dataset

MASK_COLUMN_CANDIDATES = ("label", "annotation", "mask", "segmentation", "semantic_segmentation")


@dataclass
class SegmentationData:
    """Train and validation pairs with decoded `image` and `label` (mask) columns, and where they came from."""

    train: datasets.Dataset
    validation: datasets.Dataset
    dataset_name: str
    dataset_config_name: str | None
    validation_split_name: str
    skipped_images: int = 0
    labels: list[str] = field(default_factory=list)
    """The class names (`class_names`), set by `SegmentationDataArguments.load`."""

    @property
    def name(self) -> str:
        return self.dataset_name + (f" ({self.dataset_config_name})" if self.dataset_config_name else "")

    def results_fields(self) -> dict:
        return dataset_fields(self.dataset_name, self.dataset_config_name, self.validation_split_name)


@dataclass
class SegmentationDataArguments:
    """The data options of semantic segmentation, parsed with `transformers.HfArgumentParser`."""

    _argument_group_name = "data"

    dataset_name: str | None = field(
        default=None, metadata={"help": "A datasets dataset (Hub id or saved folder), e.g. scene_parse_150."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    train_dir: str | None = field(default=None, metadata={"help": "Folder with images/ and masks/ sub-folders."})
    validation_dir: str | None = field(default=None, metadata={"help": "Folder with images/ and masks/."})
    train_val_split: float = field(
        default=0.15, metadata={"help": "Fraction of the training data held out when there is no validation split."}
    )
    image_column_name: str = field(default="image", metadata={"help": "Image column of --dataset_name."})
    label_column_name: str | None = field(
        default=None,
        metadata={
            "help": f"Mask column of --dataset_name (default: the first of {', '.join(MASK_COLUMN_CANDIDATES)})."
        },
    )
    num_labels: int | None = field(default=None, metadata={"help": "Number of classes (ids 0 .. num_labels - 1)."})
    labels_file: str | None = field(
        default=None, metadata={"help": "Class names: JSON list, JSON {id: name} object, or one name a line."}
    )
    ignore_index: int = field(default=255, metadata={"help": "Mask value of unlabelled pixels (not scored)."})
    reduce_labels: bool = field(
        default=False,
        metadata={
            "help": "Mask value 0 is background: make it ignore_index and lower every other id by one (ADE20K)."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training pairs."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation pairs."})

    def check(self) -> str | None:
        """What is wrong with these options together, or None."""
        if (self.dataset_name is None) == (self.train_dir is None):
            return "Give exactly one data source: --dataset_name or --train_dir."
        if self.validation_dir and not self.train_dir:
            return "--validation_dir goes with --train_dir."
        if not 0.0 < self.train_val_split < 1.0:
            return f"--train_val_split must lie in (0, 1), got {self.train_val_split}."
        if self.num_labels is not None and self.num_labels < 1:
            return f"--num_labels must be positive, got {self.num_labels}."
        if self.num_labels is not None and 0 <= self.ignore_index < self.num_labels:
            return f"--ignore_index {self.ignore_index} is a class id for --num_labels {self.num_labels}."
        return None

    def load(self, split_seed: int) -> "SegmentationData":
        """The pairs (`load_segmentation_data`) with their class names (`class_names`)."""
        names = ("dataset_name", "dataset_config_name", "train_dir", "validation_dir", "train_val_split")
        names += ("image_column_name", "label_column_name", "max_train_samples", "max_eval_samples")
        data = load_segmentation_data(split_seed=split_seed, **{name: getattr(self, name) for name in names})
        data.labels = class_names(data.train, self.labels_file, self.num_labels, self.reduce_labels, self.ignore_index)
        return data


def find_image_mask_pairs(folder: str | Path) -> tuple[list[str], list[str]]:
    """Image and mask paths of a `<folder>/images`, `<folder>/masks` layout, paired by file stem."""
    folder = Path(folder)
    images_dir, masks_dir = folder / "images", folder / "masks"
    for required in (images_dir, masks_dir):
        if not required.is_dir():
            raise DataError(f"{required} does not exist: a data folder needs images/ and masks/ sub-folders.")
    masks = {path.stem: path for path in sorted(masks_dir.iterdir()) if path.suffix.lower() in IMAGE_EXTENSIONS}
    images = [path for path in sorted(images_dir.iterdir()) if path.suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        raise DataError(f"No images in {images_dir} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}).")
    unmatched = [path.name for path in images if path.stem not in masks]
    if unmatched:
        raise DataError(
            f"{len(unmatched)} image(s) in {images_dir} have no mask with the same stem in {masks_dir}, e.g. "
            f"{', '.join(unmatched[:5])}."
        )
    return [str(path) for path in images], [str(masks[path.stem]) for path in images]


def folder_dataset(folder: str | Path) -> datasets.Dataset:
    image_paths, mask_paths = find_image_mask_pairs(folder)
    dataset = datasets.Dataset.from_dict({"image": image_paths, "label": mask_paths})
    return dataset.cast_column("image", datasets.Image()).cast_column("label", datasets.Image())


def _named_dataset_splits(
    dataset_name: str, dataset_config_name: str | None, image_column: str, label_column: str | None
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    loaded = load_named_dataset(dataset_name, dataset_config_name, cache_dir=None)
    if "train" not in loaded:
        raise DataError(f"{dataset_name} has no train split; its splits: {sorted(loaded)}.")
    train = loaded["train"]
    label_column = label_column or next((name for name in MASK_COLUMN_CANDIDATES if name in train.column_names), None)
    for role, column, option in (("image", image_column, "image"), ("mask", label_column, "label")):
        if column is None or column not in train.column_names:
            raise DataError(
                f"{dataset_name} has no {role} column {column!r}; its columns: {train.column_names}. Pass "
                f"--{option}_column_name."
            )
    keep = {image_column: "image", label_column: "label"}
    renames = {old: new for old, new in keep.items() if old != new}
    validation = loaded.get("validation")
    train = train.select_columns(list(keep)).rename_columns(renames)
    if validation is not None:
        validation = validation.select_columns(list(keep)).rename_columns(renames)
    return train, validation


def load_segmentation_data(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    train_val_split: float = 0.15,
    image_column_name: str = "image",
    label_column_name: str | None = None,
    split_seed: int = 42,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> SegmentationData:
    """Train and validation pairs from a `datasets` dataset or from folders (see the module docstring)."""
    if (dataset_name is None) == (train_dir is None):
        raise DataError("Give exactly one data source: a dataset name or a training folder.")
    if train_dir is not None:
        train = folder_dataset(train_dir)
        validation = folder_dataset(validation_dir) if validation_dir else None
        dataset_name, dataset_config_name = f"folder:{train_dir}", None
    else:
        train, validation = _named_dataset_splits(
            dataset_name, dataset_config_name, image_column_name, label_column_name
        )
    validation_split_name = "validation"
    if validation is None:
        held_out = train.train_test_split(test_size=train_val_split, seed=split_seed)
        train, validation = held_out["train"], held_out["test"]
        validation_split_name = f"train[{train_val_split:.0%} held out, seed {split_seed}]"
    if max_train_samples is not None:
        train = train.select(range(min(max_train_samples, len(train))))
    if max_eval_samples is not None:
        validation = validation.select(range(min(max_eval_samples, len(validation))))
    train, skipped_train = drop_unreadable_pairs(train, "train")
    validation, skipped_validation = drop_unreadable_pairs(validation, "validation")
    skipped = skipped_train + skipped_validation
    return SegmentationData(train, validation, dataset_name, dataset_config_name, validation_split_name, skipped)


def drop_unreadable_pairs(pairs: datasets.Dataset, split: str) -> tuple[datasets.Dataset, int]:
    """Pairs whose image or mask cannot be opened are skipped, with one warning each for images and masks that
    counts them and names the first files (`drop_unreadable_images`, the policy of every task's data)."""
    skipped = 0
    for column, what in (("image", split), ("label", f"{split} masks")):
        if not isinstance(pairs.features[column], datasets.Image):
            continue
        pairs, dropped = drop_unreadable_images(pairs.cast_column(column, datasets.Image(decode=False)), column, what)
        pairs = pairs.cast_column(column, datasets.Image())
        skipped += dropped
    return pairs, skipped


# ------------------------------------------------------------------------------------------------------- classes
def mask_to_array(mask: Image.Image, reduce_labels: bool, ignore_index: int) -> np.ndarray:
    """Class ids of a single-channel mask image as int64 (palette images give their palette indices)."""
    if mask.mode not in ("L", "P", "I", "I;16", "1"):
        raise DataError(
            f"Mask {getattr(mask, 'filename', '') or ''} has mode {mask.mode!r}: masks must be single-channel images "
            "whose pixel values are class ids (colour-coded RGB masks must be converted to ids first)."
        )
    return relabel(np.asarray(mask), None, reduce_labels, ignore_index)


def describe(image: Image.Image, index: int) -> str:
    """The file an image was read from, or (images stored inside a dataset) its row."""
    return getattr(image, "filename", "") or f"(row {index})"


def check_class_ids(values: np.ndarray, num_labels: int, ignore_index: int, where: str) -> None:
    """Out-of-range ids crash the loss with an opaque message (a device assert on GPU): name the mask instead."""
    labelled = values[values != ignore_index]
    if labelled.size and (labelled.min() < 0 or labelled.max() >= num_labels):
        raise DataError(
            f"Mask {where} holds class ids in [{labelled.min()}, {labelled.max()}], outside [0, {num_labels}) "
            f"(ignore_index={ignore_index}). Check --num_labels, --ignore_index and --reduce_labels."
        )


def infer_num_labels(train: datasets.Dataset, reduce_labels: bool, ignore_index: int) -> int:
    """The largest class id of the training masks + 1 (reads every mask)."""
    largest = -1
    for row in tqdm(train.select_columns(["label"]), desc="Finding the classes of the training masks"):
        values = mask_to_array(row["label"], reduce_labels, ignore_index)
        labelled = values[values != ignore_index]
        if labelled.size:
            largest = max(largest, int(labelled.max()))
    if largest < 0:
        raise DataError("The training masks hold no labelled pixels (every pixel equals ignore_index).")
    return largest + 1


def read_labels_file(path: str | Path) -> list[str]:
    """Class names from a JSON list, a JSON `{"id": "name"}` object, or a text file with one name a line."""
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix.lower() == ".json":
        content = json.loads(text)
        if isinstance(content, dict):
            ids = sorted(int(key) for key in content)
            if ids != list(range(len(ids))):
                raise DataError(f"{path}: class ids must be 0 .. N-1 without gaps, got {ids[:10]}...")
            return [str(content[str(index)]) for index in ids]
        return [str(name) for name in content]
    return [line.strip() for line in text.splitlines() if line.strip()]


def class_names(
    train: datasets.Dataset,
    labels_file: str | None,
    num_labels: int | None,
    reduce_labels: bool,
    ignore_index: int,
) -> list[str]:
    """From `labels_file`; else `class_0` ... for `num_labels` classes, or as many as the training masks hold."""
    if labels_file:
        names = read_labels_file(labels_file)
        if num_labels is not None and num_labels != len(names):
            raise DataError(f"{labels_file} names {len(names)} classes but num_labels is {num_labels}.")
    else:
        names = [
            f"class_{index}" for index in range(num_labels or infer_num_labels(train, reduce_labels, ignore_index))
        ]
    if 0 <= ignore_index < len(names):
        raise DataError(f"ignore_index {ignore_index} is a class id: there are {len(names)} classes.")
    return names


# -------------------------------------------------------------------------------------------------- transforms
def build_segmentation_processor(image_size: int, reduce_labels: bool) -> SegformerImageProcessor:
    """The evaluation (and inference) preprocessing saved with the model: resize to a square, ImageNet norm."""
    return SegformerImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
        do_reduce_labels=reduce_labels,
    )


def train_transform(image_size: int, ignore_index: int) -> v2.Compose:
    """Random rescale (shortest edge 0.5-2x image_size), random crop padded with ignore_index, flip, normalise."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResize(min_size=image_size // 2, max_size=2 * image_size + 1),
            v2.RandomCrop(image_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}),
            v2.RandomHorizontalFlip(),
            v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
            v2.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ]
    )


@dataclass
class SegmentationDataset(EpochSeededDataset):
    """`pixel_values` and `labels` (class ids, checked against `num_labels`) of each pair.

    With `augment` (a joint image/mask transform such as `train_transform`) the pair is augmented, seeded per sample
    by `augmentation_seed` (see `EpochSeededDataset`); otherwise the image goes through `processor` and the mask keeps
    its own size, so scores are taken at the mask's resolution.
    """

    pairs: datasets.Dataset
    num_labels: int
    ignore_index: int
    reduce_labels: bool
    processor: SegformerImageProcessor
    augment: Callable | None = None
    augmentation_seed: int | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.pairs[int(index)]
        image, mask = row["image"], row["label"]
        values = mask_to_array(mask, self.reduce_labels, self.ignore_index)
        check_class_ids(values, self.num_labels, self.ignore_index, describe(mask, index))
        if values.shape != (image.height, image.width):
            raise DataError(
                f"Mask {describe(mask, index)} is {values.shape[1]}x{values.shape[0]} but its image "
                f"{describe(image, index)} is {image.width}x{image.height}."
            )
        image = image.convert("RGB")
        if self.augment is None:
            pixel_values = self.processor(images=image, return_tensors="pt")["pixel_values"][0]
            return {"pixel_values": pixel_values, "labels": torch.from_numpy(values)}
        with self.augmentation(index):
            image_tensor, mask_tensor = self.augment(image, tv_tensors.Mask(torch.from_numpy(values)))
        return {
            "pixel_values": image_tensor.as_subclass(torch.Tensor),
            "labels": mask_tensor.as_subclass(torch.Tensor),
        }


def collate_train(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.stack([example["labels"] for example in examples]),
    }


def make_collate_eval(ignore_index: int) -> Callable[[list[dict]], dict]:
    """Masks of different sizes padded to the batch's largest with ignore_index (padding is never scored); each
    mask's own size in `label_sizes`."""

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        height = max(example["labels"].shape[0] for example in examples)
        width = max(example["labels"].shape[1] for example in examples)
        labels = torch.full((len(examples), height, width), ignore_index, dtype=torch.int64)
        sizes = torch.zeros((len(examples), 2), dtype=torch.int64)
        for index, example in enumerate(examples):
            mask_height, mask_width = example["labels"].shape
            labels[index, :mask_height, :mask_width] = example["labels"]
            sizes[index] = torch.tensor([mask_height, mask_width])
        return {
            "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
            "labels": labels,
            "label_sizes": sizes,
        }

    return collate


__all__ = [
    "MASK_COLUMN_CANDIDATES",
    "SegmentationData",
    "SegmentationDataset",
    "build_segmentation_processor",
    "check_class_ids",
    "class_names",
    "collate_train",
    "find_image_mask_pairs",
    "folder_dataset",
    "infer_num_labels",
    "load_segmentation_data",
    "make_collate_eval",
    "mask_to_array",
    "read_labels_file",
    "train_transform",
]
