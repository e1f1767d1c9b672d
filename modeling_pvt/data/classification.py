"""Image-classification data for the training, fine-tuning and evaluation scripts.

One entry point, `load_image_classification_data`, turns the command-line choices into train and validation
`datasets.Dataset`s with a known image column, label column and label names. The scripts share its options as
`DataArguments` (parsed by `transformers.HfArgumentParser`; `DataArguments.load()`; evaluation's subset:
`EvaluationDataArguments`); a `DataError` ends a script with a message for the user. Sources:

- a dataset on the Hugging Face Hub or on disk (`dataset_name`, optionally `dataset_config_name`);
- ImageNet-style image folders (`train_dir` / `validation_dir`, one sub-folder per class, no images beside them;
  `validation_dir` alone is enough for evaluation);
- nothing at all: scikit-learn's handwritten digits (1,797 real 8x8 greyscale scans that ship with scikit-learn),
  split 80/20 with a fixed seed, so every script sees the same held-out images.

Bad data policy:

- an unreadable or corrupt image found by the up-front check (`check_images="verify"`, the default: PIL opens and
  verifies every file; `"decode"` fully decodes each one, which also catches truncated JPEGs) is **skipped**, with one
  warning that counts the skipped files and names the first of them;
- an image that passes the check but cannot be decoded when a batch is built raises `UnreadableImageError` naming the
  file (or the row for images stored inside a dataset); the scripts save what is trained before stopping;
- a missing image or label column, an empty or missing folder, an unknown dataset: `DataError` with a message that
  names the column (and lists the available ones), the folder, or the dataset.
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
import torch
from PIL import Image

from ..hub.results import dataset_fields
from .sampling import EpochSeededDataset
from .sources import (
    IMAGE_EXTENSIONS,
    DataError,
    decode_image,
    describe_image,
    drop_unreadable_images,
    find_image_files,
    load_named_dataset,
)

logger = logging.getLogger(__name__)

DIGITS_DATASET_NAME = "sklearn-digits"
"""How the embedded default dataset is named in results files and model cards."""

DEFAULT_SPLIT_SEED = 42
"""Seed of every train/validation split made here; fixed so training and evaluation hold out the same images."""

DIGITS_VALIDATION_FRACTION = 0.2


@dataclass
class ImageClassificationData:
    """Train and validation splits with undecoded images (`{"bytes", "path"}` dicts) and integer labels."""

    train: datasets.Dataset
    validation: datasets.Dataset
    labels: list[str]
    image_column: str
    label_column: str
    dataset_name: str
    """The dataset id (`DIGITS_DATASET_NAME` for the embedded default, `imagefolder:<train_dir>` for folders)."""
    dataset_config_name: str | None
    validation_split_name: str
    """`"validation"`, `"test"`, or e.g. `"train[20% held out, seed 42]"` when carved out of the training split."""
    skipped_images: int = 0

    @property
    def name(self) -> str:
        """A short description of the source, for logs."""
        return self.dataset_name + (f" ({self.dataset_config_name})" if self.dataset_config_name else "")

    def results_fields(self) -> dict:
        """What a results file says about the evaluated data (see `modeling_pvt.hub.results`)."""
        return dataset_fields(self.dataset_name, self.dataset_config_name, self.validation_split_name)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        return {label: index for index, label in enumerate(self.labels)}


@dataclass
class EvaluationDataArguments:
    """The data options of image-classification evaluation (parsed with `transformers.HfArgumentParser`): which
    held-out images to score."""

    _argument_group_name = "data"  # HfArgumentParser's --help section (a class attribute, not an option)

    dataset_name: str | None = field(
        default=None, metadata={"help": "A dataset on the Hub or saved on disk; none (and no folders): digits."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    train_dir: str | None = field(
        default=None,
        metadata={"help": "Training image folder, one sub-folder per class (evaluation scores its held-out part)."},
    )
    validation_dir: str | None = field(
        default=None,
        metadata={"help": "Validation image folder, one sub-folder per class (alone: enough for evaluation)."},
    )
    split: str | None = field(
        default=None,
        metadata={"help": "Held-out split of --dataset_name (default: validation, else test, else part of train)."},
    )
    train_val_split: float = field(
        default=0.15, metadata={"help": "Fraction of train held out when there is no validation split."}
    )
    image_column_name: str | None = field(
        default=None, metadata={"help": "Column holding the images (default: the first image column)."}
    )
    label_column_name: str | None = field(
        default=None, metadata={"help": "Column holding the labels (default: the first class column)."}
    )
    image_check: Literal["verify", "decode", "none"] = field(
        default="verify",
        metadata={
            "help": "Up-front check of every image; unreadable ones are skipped with a warning. 'decode' also catches "
            "truncated files, at the cost of decoding everything once."
        },
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for the up-front image check (cached by datasets)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N held-out samples."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where datasets and models downloads are cached."})

    evaluation_only = True
    """Whether a `validation_dir` alone is enough (`load_image_classification_data`); a class attribute."""

    @property
    def uses_embedded_dataset(self) -> bool:
        return self.dataset_name is None and self.train_dir is None and self.validation_dir is None

    def load(self) -> ImageClassificationData:
        """`load_image_classification_data` with these options."""
        options = {item.name: getattr(self, item.name) for item in fields(self)}
        options["evaluation_only"] = self.evaluation_only
        options["validation_split_name"] = options.pop("split")
        options["check_images"] = options.pop("image_check")
        options["num_proc"] = options.pop("preprocessing_num_workers")
        return load_image_classification_data(**options)


@dataclass
class DataArguments(EvaluationDataArguments):
    """The data options of every image-classification training script."""

    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training samples."})

    evaluation_only = False


def load_digits_dataset() -> datasets.Dataset:
    """scikit-learn's digits as a `datasets.Dataset`: 8-bit greyscale PNG images in `image`, class in `label`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # The scans hold 17 grey levels (0..16); spread them over 0..255 so they look like ordinary 8-bit images.
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(digit) for digit in range(10)])}
    )
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(array, mode="L") for array in pixels], "label": digits.target.tolist()},
        features=features,
    )


def _check_image_folder(folder: str, argument: str) -> None:
    """An ImageNet-style folder: images only inside class sub-folders (`datasets` would otherwise take the folder's
    own name, or nothing, for their label)."""
    path = Path(folder)
    if not path.is_dir():
        raise DataError(f"{argument} {folder!r} is not a folder.")
    loose = sorted(entry.name for entry in path.iterdir() if entry.suffix.lower() in IMAGE_EXTENSIONS)
    if loose:
        raise DataError(
            f"{argument} {folder!r} holds {len(loose)} image(s) directly (e.g. {loose[0]}): class sub-folders are "
            f"expected, one per class, e.g. {path / 'class_name' / loose[0]}."
        )
    if not find_image_files(path):
        raise DataError(
            f"{argument} {folder!r} holds no image files (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); "
            f"expected one sub-folder per class, e.g. {path / 'class_name' / 'image.jpg'}."
        )


def _resolve_column(
    dataset: datasets.Dataset, requested: str | None, feature_type: type, role: str, option: str
) -> str:
    columns = list(dataset.column_names)
    if requested is not None:
        if requested not in columns:
            raise DataError(
                f"The dataset has no {role} column {requested!r}; available columns: {columns}. "
                f"Pass the right one with {option}."
            )
        return requested
    typed = [name for name, feature in dataset.features.items() if isinstance(feature, feature_type)]
    if typed:
        return typed[0]
    for candidate in ("image", "img") if role == "image" else ("label", "labels"):
        if candidate in columns:
            return candidate
    raise DataError(f"Cannot tell which column holds the {role}s; available columns: {columns}. Pass {option}.")


def _source_splits(
    dataset_name: str | None,
    dataset_config_name: str | None,
    train_dir: str | None,
    validation_dir: str | None,
    cache_dir: str | None,
) -> tuple[datasets.DatasetDict, str, str | None]:
    """The splits of the source the options name, with the name and configuration results files give it. Folders
    give a `train` split, a `validation` split, or both."""
    if dataset_name is not None and (train_dir is not None or validation_dir is not None):
        raise DataError("Pass either a dataset name or image folders (train_dir/validation_dir), not both.")
    if dataset_name is None and train_dir is None and validation_dir is None:
        return datasets.DatasetDict({"train": load_digits_dataset()}), DIGITS_DATASET_NAME, None
    if dataset_name is not None:
        return load_named_dataset(dataset_name, dataset_config_name, cache_dir), dataset_name, dataset_config_name
    data_files = {}
    for split, folder, argument in (
        ("train", train_dir, "train_dir"),
        ("validation", validation_dir, "validation_dir"),
    ):
        if folder is not None:
            _check_image_folder(folder, argument)
            data_files[split] = str(Path(folder) / "**")
    # Labels always come from the class sub-folders (datasets drops them by default when there is only one).
    splits = datasets.load_dataset("imagefolder", data_files=data_files, drop_labels=False, cache_dir=cache_dir)
    return splits, f"imagefolder:{train_dir or validation_dir}", None


def _check_labelled(dataset: datasets.Dataset, image_column: str, label_column: str, split: str) -> None:
    """Rows without a label (None, or -1 as in the ImageNet test split) can be neither trained on nor scored."""
    unlabelled = [index for index, label in enumerate(dataset[label_column]) if label is None or label < 0]
    if unlabelled:
        raise DataError(
            f"{len(unlabelled)} of the {len(dataset)} images of the {split} split have no label (e.g. "
            f"{describe_image(dataset[unlabelled[0]][image_column], unlabelled[0], split)}): a split "
            "without labels, such as a test split, cannot be used; pick a labelled one with --split."
        )


def _held_out_split(
    splits: datasets.DatasetDict,
    validation_split_name: str | None,
    columns: tuple[tuple[str, str, str], ...],
    train_val_split: float,
    split_seed: int,
) -> tuple[datasets.Dataset, datasets.Dataset, str]:
    """(train, validation, the validation split's name): the named or usual held-out split, else a stratified
    `train_val_split` fraction of train. `columns` are (column, role, option) that the validation split needs."""
    train = splits["train"]
    held_out = validation_split_name
    if held_out is None:
        held_out = next((split for split in ("validation", "test") if split in splits), None)
    if held_out is not None and held_out != "train":
        validation = splits[held_out]
        for column, role, option in columns:
            if column not in validation.column_names:
                raise DataError(
                    f"The {held_out!r} split has no {role} column {column!r}; available columns: "
                    f"{validation.column_names}. Pass the right one with {option}."
                )
        return train, validation, held_out
    if not 0.0 < train_val_split < 1.0:
        raise DataError(f"train_val_split must lie in (0, 1), got {train_val_split}.")
    label_column = columns[1][0]
    if not isinstance(train.features[label_column], datasets.ClassLabel):
        train = train.class_encode_column(label_column)
    parts = train.train_test_split(
        test_size=train_val_split, seed=split_seed, stratify_by_column=label_column, shuffle=True
    )
    return parts["train"], parts["test"], f"train[{train_val_split:.0%} held out, seed {split_seed}]"


def _encode_labels(
    train: datasets.Dataset, validation: datasets.Dataset, label_column: str
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Labels stored as strings or plain integers become one `ClassLabel` over both splits, so ids agree."""
    if isinstance(train.features[label_column], datasets.ClassLabel):
        return train, validation
    values = set(train[label_column]) | set(validation[label_column])
    # Integer labels keep their numeric order (so id 2 stays "2", not after "10"); strings sort alphabetically.
    ordered = sorted(values) if all(isinstance(value, int) for value in values) else sorted(map(str, values))
    class_label = datasets.ClassLabel(names=[str(value) for value in ordered])

    def encode(batch: dict) -> dict:
        return {label_column: [class_label.str2int(str(value)) for value in batch[label_column]]}

    return tuple(
        split.map(encode, batched=True).cast_column(label_column, class_label) for split in (train, validation)
    )


def _drop_unreadable(
    train: datasets.Dataset, validation: datasets.Dataset, image_column: str, check_images: str, num_proc: int | None
) -> tuple[datasets.Dataset, datasets.Dataset, int]:
    """Both splits without their unreadable images (`check_images`: "verify", "decode" or "none"), and how many
    were skipped."""
    if check_images == "none":
        return train, validation, 0
    full_decode = check_images == "decode"
    train, skipped_train = drop_unreadable_images(train, image_column, "train", full_decode, num_proc)
    validation, skipped_validation = drop_unreadable_images(
        validation, image_column, "validation", full_decode, num_proc
    )
    return train, validation, skipped_train + skipped_validation


def load_image_classification_data(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    train_val_split: float = 0.15,
    image_column_name: str | None = None,
    label_column_name: str | None = None,
    split_seed: int = DEFAULT_SPLIT_SEED,
    cache_dir: str | None = None,
    check_images: str = "verify",
    num_proc: int | None = None,
    validation_split_name: str | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    evaluation_only: bool = False,
) -> ImageClassificationData:
    """Load train and validation splits; see the module docstring for the sources and the bad-data policy.

    Without a validation split (or folder) a stratified `train_val_split` fraction of the training data is held out
    with `split_seed`. `check_images` is `"verify"`, `"decode"` or `"none"`. `validation_split_name` picks the
    held-out split of a named dataset (default: `validation`, else `test`, else carved out of `train`).
    `max_train_samples` / `max_eval_samples` keep only the first N of each split (before the image check).
    With `evaluation_only`, a `validation_dir` alone is enough: the training split is then empty.
    """
    if check_images not in ("verify", "decode", "none"):
        raise ValueError(f"check_images must be 'verify', 'decode' or 'none', got {check_images!r}.")
    splits, dataset_name, dataset_config_name = _source_splits(
        dataset_name, dataset_config_name, train_dir, validation_dir, cache_dir
    )
    if dataset_name == DIGITS_DATASET_NAME:
        train_val_split = DIGITS_VALIDATION_FRACTION
    if validation_split_name is not None and validation_split_name not in splits and validation_split_name != "train":
        raise DataError(f"The dataset has no split {validation_split_name!r}; available splits: {list(splits)}.")
    if train_dir is None and validation_dir is not None:
        if not evaluation_only:
            raise DataError("--validation_dir alone can be evaluated, not trained on: pass --train_dir as well.")
        splits["train"] = splits["validation"].select([])  # nothing to train on; labels and columns as validation
    if "train" not in splits:
        raise DataError(f"The dataset has no 'train' split; available splits: {list(splits)}.")
    reference = splits["validation"] if len(splits["train"]) == 0 and "validation" in splits else splits["train"]
    image_column = _resolve_column(reference, image_column_name, datasets.Image, "image", "--image_column_name")
    label_column = _resolve_column(reference, label_column_name, datasets.ClassLabel, "label", "--label_column_name")
    columns = ((image_column, "image", "--image_column_name"), (label_column, "label", "--label_column_name"))
    train, validation, held_out = _held_out_split(splits, validation_split_name, columns, train_val_split, split_seed)
    train, validation = _encode_labels(train, validation, label_column)
    labels = list(train.features[label_column].names)
    if not evaluation_only and len(labels) < 2:
        raise DataError(
            f"The training data of {dataset_name} has {len(labels)} class(es) ({labels}): a classifier needs at "
            "least two (for image folders: one sub-folder per class)."
        )

    undecoded = datasets.Image(decode=False)
    train, validation = (
        split.select_columns([image_column, label_column]).cast_column(image_column, undecoded)
        for split in (train, validation)
    )
    for split, dataset in (("train", train), ("validation", validation)):
        if len(dataset) == 0 and not (split == "train" and evaluation_only):
            raise DataError(f"The {split} split of {dataset_name} is empty.")
    if max_train_samples is not None:
        train = train.select(range(min(max_train_samples, len(train))))
    if max_eval_samples is not None:
        validation = validation.select(range(min(max_eval_samples, len(validation))))
    for split, dataset in (("train", train), (held_out, validation)):
        _check_labelled(dataset, image_column, label_column, split)

    train, validation, skipped = _drop_unreadable(train, validation, image_column, check_images, num_proc)
    return ImageClassificationData(
        train=train,
        validation=validation,
        labels=labels,
        image_column=image_column,
        label_column=label_column,
        dataset_name=dataset_name,
        dataset_config_name=dataset_config_name,
        validation_split_name=held_out,
        skipped_images=skipped,
    )


@dataclass
class ImageClassificationDataset(EpochSeededDataset):
    """A map-style torch dataset: decodes, converts to RGB and transforms images into `pixel_values`, `labels`.

    With `augmentation_seed`, the random augmentation of a sample is a pure function of the seed, the epoch and the
    sample's index (see `EpochSeededDataset`).
    """

    dataset: datasets.Dataset
    image_column: str
    label_column: str
    transform: Callable[[Image.Image], torch.Tensor]
    split: str
    augmentation_seed: int | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        row = self.dataset[int(index)]
        image = decode_image(row[self.image_column], describe_image(row[self.image_column], index, self.split))
        with self.augmentation(index):
            pixel_values = self.transform(image)
        return {"pixel_values": pixel_values, "labels": row[self.label_column]}


def collate_image_batch(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples], dtype=torch.long),
    }


def build_train_transform(
    image_size: int,
    rand_augment: str | None = "rand-m9-mstd0.5-inc1",
    crop_scale: tuple[float, float] = (0.08, 1.0),
    horizontal_flip: float = 0.5,
    color_jitter: float = 0.4,
) -> Callable[[Image.Image], torch.Tensor]:
    """The per-image part of the DeiT/PVT training augmentation through timm: random resized crop (bicubic), flip,
    RandAugment (or colour jitter when RandAugment is off); each part can be turned off. It returns `uint8` (3, H, W)
    tensors: normalisation and random erasing run on whole batches on the training device (`TrainBatchTransform`),
    which moves a quarter of the bytes from the workers and the host to the device."""
    from timm.data import create_transform

    return create_transform(
        input_size=image_size,
        is_training=True,
        scale=crop_scale,
        hflip=horizontal_flip,
        color_jitter=color_jitter,
        auto_augment=rand_augment or None,
        interpolation="bicubic",
        use_prefetcher=True,  # timm's name for "stop at uint8 tensors; the batch side normalises and erases"
    )


class TrainBatchTransform:
    """The batch part of the training augmentation, on the device the batch is on: `uint8` images to normalised
    floats, then timm's random erasing ("pixel" mode, one region) with probability `random_erasing`, image by image,
    as DeiT/PVT apply it on the host. Its random draws come from the training process's generators, which
    checkpoints save and restore, so resumed runs stay exact."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], random_erasing: float, device: torch.device):
        mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        # (x / 255 - mean) / std as one multiply-add
        self.scale, self.shift = 1.0 / (255.0 * std), -mean / std
        self.erasing = None
        if random_erasing > 0:
            from timm.data.random_erasing import RandomErasing

            self.erasing = RandomErasing(random_erasing, mode="pixel", max_count=1, device=device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = torch.addcmul(self.shift, images.float(), self.scale)
        return images if self.erasing is None else self.erasing(images)


def build_processor_transform(image_processor) -> Callable[[Image.Image], torch.Tensor]:
    """Evaluation preprocessing: exactly what the saved image processor does (resize, centre crop, normalise)."""

    def transform(image: Image.Image) -> torch.Tensor:
        return image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    return transform
