"""Object-detection data: COCO-format folders and `datasets` datasets with an `objects` column, validated up front.

Both sources become one `datasets.Dataset` layout, the one transformers' detection example uses (cppe-5):
an image column and `objects = {"bbox": [[x, y, w, h], ...], "category": [id, ...], "id": [annotation id, ...]}`,
with boxes in pixels and categories as contiguous ids `0..K-1` named by `DetectionData.categories`.

- COCO folder: `FOLDER/annotations.json` (COCO `images`, `annotations`, `categories`) and the images under
  `FOLDER/images/` (or wherever `file_name` points, relative to `FOLDER/images` or `FOLDER`). COCO category ids
  (any integers, e.g. 1..90 with gaps) map to contiguous ids in increasing order.
- `datasets` dataset (`dataset_name`: a Hub id or a `save_to_disk` folder) with an `objects` column as above; the
  category names come from its `ClassLabel` feature.

Bad data policy (every message names the file, the row or the annotation id, and nothing already written is lost):

- missing `annotations.json`, malformed JSON, an annotation naming an unknown image or category, a box with no area,
  or a box outside its image by more than `BOX_TOLERANCE` pixels: `DataError` before training starts (boxes over the
  edge by less than that are clipped; COCO's own annotations overshoot by rounding);
- an image without boxes is valid and kept (it teaches the detector "nothing here");
- a missing or unreadable image is skipped by the up-front check with one warning naming the files (as for
  classification, `modeling_pvt.data.drop_unreadable_images`); one that fails later raises `UnreadableImageError`.
"""

import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image

from ..hub.results import dataset_fields
from .sampling import EpochSeededDataset
from .sources import DataError, decode_image, describe_image, drop_unreadable_images, load_named_dataset

logger = logging.getLogger(__name__)

ANNOTATIONS_FILE_NAME = "annotations.json"
IMAGES_DIR_NAME = "images"
BOX_TOLERANCE = 1.0
"""Pixels a box may extend past its image before it counts as an error (it is clipped instead)."""
MAX_NAMED_PROBLEMS = 10
"""Bad annotations described in full in a message; the ids of the others follow."""

AnnotationProblem = tuple[object, str]
"""A bad annotation: its id (None when it has none) and what is wrong with it."""


@dataclass
class DetectionSample:
    """One image and its boxes: `boxes` is (n, 4) float32 `[x, y, w, h]` in pixels, `categories` (n,) int64."""

    image: Image.Image
    image_id: int
    boxes: np.ndarray
    categories: np.ndarray
    description: str


@dataclass
class DetectionData:
    train: "ObjectsSource"
    validation: "ObjectsSource"
    categories: list[str]
    name: str
    validation_split_name: str
    skipped_images: int = 0
    dataset_config_name: str | None = None

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.categories))

    def results_fields(self) -> dict:
        """What a results file says about the evaluated data (see `modeling_pvt.hub.results`)."""
        return dataset_fields(self.name, self.dataset_config_name, self.validation_split_name)


class ObjectsSource:
    """Samples of a validated `datasets.Dataset` in the `objects` layout (see the module docstring)."""

    def __init__(self, dataset: datasets.Dataset, image_column: str, split: str):
        self.dataset = dataset
        self.image_column = image_column
        self.split = split

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, index: int, epoch: int = 0) -> DetectionSample:
        row = self.dataset[int(index)]
        description = describe_image(row[self.image_column], index, self.split)
        image = decode_image(row[self.image_column], description)
        objects = row["objects"]
        boxes = np.asarray(objects["bbox"], dtype=np.float32).reshape(-1, 4)
        width, height = image.size
        # Clip the small overshoots the validation allowed, so augmentation never sees a box leaving the image.
        x0 = np.clip(boxes[:, 0], 0, width)
        y0 = np.clip(boxes[:, 1], 0, height)
        x1 = np.clip(boxes[:, 0] + boxes[:, 2], 0, width)
        y1 = np.clip(boxes[:, 1] + boxes[:, 3], 0, height)
        return DetectionSample(
            image=image,
            image_id=int(row["image_id"]) if "image_id" in row else int(index),
            boxes=np.stack([x0, y0, x1 - x0, y1 - y0], axis=1),
            categories=np.asarray(objects["category"], dtype=np.int64),
            description=description,
        )


# ---------------------------------------------------------------------------------------------------- COCO folders
def _read_coco_annotations(folder: Path) -> dict:
    annotations_file = folder / ANNOTATIONS_FILE_NAME
    if not folder.is_dir():
        raise DataError(f"COCO folder {str(folder)!r} does not exist.")
    if not annotations_file.is_file():
        raise DataError(
            f"{str(annotations_file)!r} is missing: a COCO folder holds {ANNOTATIONS_FILE_NAME} (COCO 'images', "
            f"'annotations', 'categories') and the images under {IMAGES_DIR_NAME}/."
        )
    try:
        coco = json.loads(annotations_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{str(annotations_file)!r} is not valid JSON: {error}") from error
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(coco.get(key), list)]
    if missing:
        raise DataError(f"{str(annotations_file)!r} has no list(s) {missing}; expected COCO object detection format.")
    return coco


def _resolve_image_path(folder: Path, file_name: str) -> Path:
    for candidate in (folder / IMAGES_DIR_NAME / file_name, folder / file_name):
        if candidate.is_file():
            return candidate
    return folder / IMAGES_DIR_NAME / file_name  # missing: the up-front image check names it and skips it


def _collect_annotations(
    annotations: list[dict], images: dict, coco_to_label: dict[int, int]
) -> list[AnnotationProblem]:
    """Put each usable annotation's box, label and id into its image's `objects`; the problems of the others (an
    unknown image or category, no [x, y, width, height] box)."""
    problems = []
    for annotation in annotations:
        annotation_id = annotation.get("id")
        if annotation.get("image_id") not in images:
            problems.append(
                (annotation_id, f"annotation {annotation_id}: unknown image_id {annotation.get('image_id')!r}")
            )
            continue
        if annotation.get("category_id") not in coco_to_label:
            problems.append(
                (
                    annotation_id,
                    f"annotation {annotation_id}: unknown category_id {annotation.get('category_id')!r} "
                    f"(categories: {sorted(coco_to_label)})",
                )
            )
            continue
        bbox = annotation.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            problems.append((annotation_id, f"annotation {annotation_id}: bbox {bbox!r} is not [x, y, width, height]"))
            continue
        objects = images[annotation["image_id"]]["objects"]
        objects["bbox"].append([float(value) for value in bbox])
        objects["category"].append(coco_to_label[annotation["category_id"]])
        objects["id"].append(int(annotation_id) if annotation_id is not None else -1)
    return problems


def load_coco_folder(
    folder: str, categories: list[str] | None = None
) -> tuple[datasets.Dataset, list[str], list[AnnotationProblem]]:
    """A COCO folder as a dataset in the `objects` layout, its category names, and the annotations left out of it
    because they name an unknown image or category or have no [x, y, width, height] box (`validate_objects`
    reports them with the problems of the boxes kept, in one message).

    With `categories` (the names of the training split), a validation folder must use the same names; its COCO ids
    may differ.
    """
    path = Path(folder)
    coco = _read_coco_annotations(path)
    annotations_file = path / ANNOTATIONS_FILE_NAME
    coco_categories = sorted(coco["categories"], key=lambda category: category["id"])
    names = [str(category["name"]) for category in coco_categories]
    if not names:
        raise DataError(f"{str(annotations_file)!r} lists no categories.")
    if categories is not None and names != categories:
        unknown = sorted(set(names) - set(categories))
        if unknown:
            raise DataError(
                f"{str(annotations_file)!r} has categories the training data does not: {unknown} (training "
                f"categories: {categories})."
            )
    label_names = categories if categories is not None else names
    coco_to_label = {category["id"]: label_names.index(str(category["name"])) for category in coco_categories}

    images = {}
    for image in coco["images"]:
        if "id" not in image or "file_name" not in image:
            raise DataError(f"{str(annotations_file)!r}: image entry {image} has no 'id' or 'file_name'.")
        images[image["id"]] = {
            "image": str(_resolve_image_path(path, image["file_name"])),
            "image_id": image["id"],
            "width": image.get("width"),
            "height": image.get("height"),
            "objects": {"bbox": [], "category": [], "id": []},
        }
    problems = _collect_annotations(coco["annotations"], images, coco_to_label)
    rows = list(images.values())
    if not rows:
        raise DataError(f"{str(annotations_file)!r} lists no images.")
    features = datasets.Features(
        {
            "image": datasets.Image(decode=False),
            "image_id": datasets.Value("int64"),
            "width": datasets.Value("int64"),
            "height": datasets.Value("int64"),
            "objects": {
                "bbox": datasets.Sequence(datasets.Sequence(datasets.Value("float32"), length=4)),
                "category": datasets.Sequence(datasets.ClassLabel(names=label_names)),
                "id": datasets.Sequence(datasets.Value("int64")),
            },
        }
    )
    columns = {key: [row[key] for row in rows] for key in features}
    columns["image"] = [{"path": row["image"], "bytes": None} for row in rows]
    return datasets.Dataset.from_dict(columns, features=features), label_names, problems


def _raise_problems(problems: Sequence[AnnotationProblem], where: str) -> None:
    """One `DataError` for every bad annotation: the first `MAX_NAMED_PROBLEMS` described, the ids of the rest."""
    if not problems:
        return
    described = "; ".join(text for _, text in problems[:MAX_NAMED_PROBLEMS])
    rest = problems[MAX_NAMED_PROBLEMS:]
    more = ""
    if rest:
        ids = ", ".join(str(annotation_id) for annotation_id, _ in rest if annotation_id is not None)
        more = f" (and {len(rest)} more" + (f": annotation ids {ids}" if ids else "") + ")"
    raise DataError(f"{len(problems)} bad annotation(s) in {where}: {described}{more}")


# ------------------------------------------------------------------------------------------------ datasets objects
def _category_names(dataset: datasets.Dataset) -> list[str] | None:
    """Names of the ClassLabel under `objects.category`, for `dict of lists` and `list of dicts` layouts alike."""
    feature = dataset.features["objects"]
    if isinstance(feature, (datasets.Sequence, datasets.List)) and isinstance(feature.feature, dict):
        feature = feature.feature
    category = feature.get("category") if isinstance(feature, dict) else None
    while isinstance(category, (datasets.Sequence, datasets.List)):
        category = category.feature
    return list(category.names) if isinstance(category, datasets.ClassLabel) else None


def _normalise_objects(dataset: datasets.Dataset, split: str) -> datasets.Dataset:
    """`objects` as a dict of lists (the cppe-5 layout) whatever the stored layout."""
    if "objects" not in dataset.column_names:
        raise DataError(
            f"The {split} split has no 'objects' column (columns: {dataset.column_names}); expected "
            "objects = {'bbox': [[x, y, w, h], ...], 'category': [...]} as in the cppe-5 dataset."
        )
    feature = dataset.features["objects"]
    if isinstance(feature, (datasets.Sequence, datasets.List)) and isinstance(feature.feature, dict):

        def to_dict_of_lists(batch):
            return {
                "objects": [
                    {key: [entry[key] for entry in objects] for key in feature.feature} for objects in batch["objects"]
                ]
            }

        dataset = dataset.map(to_dict_of_lists, batched=True, desc=f"Reading {split} objects")
    elif not isinstance(feature, dict):
        raise DataError(
            f"The {split} split's 'objects' column is {feature}; expected a dict with 'bbox' and 'category'."
        )
    names = set(dataset.features["objects"])
    if not {"bbox", "category"} <= names:
        raise DataError(
            f"The {split} split's 'objects' have fields {sorted(names)}; 'bbox' and 'category' are needed."
        )
    return dataset


def _image_sizes(dataset: datasets.Dataset, image_column: str) -> list[tuple[int, int] | None]:
    """(width, height) of each image from the header alone (None when unreadable: the image check deals with it)."""

    def size_of(value: dict | None) -> tuple[int, int] | None:
        try:
            source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
            with Image.open(source) as image:
                return image.size
        except Exception:  # unreadable: reported by drop_unreadable_images with the file name
            return None

    return [size_of(value) for value in dataset.select_columns([image_column])[image_column]]


def validate_objects(
    dataset: datasets.Dataset,
    image_column: str,
    num_categories: int,
    split: str,
    problems: Sequence[AnnotationProblem] = (),
) -> None:
    """Raise one `DataError` naming the row/file and annotation id of every unknown category, box without area or
    box outside its image, together with the `problems` already found (a COCO file's annotations left out)."""
    sizes = _image_sizes(dataset, image_column)
    problems = list(problems)
    for index, (objects, image, size) in enumerate(
        zip(dataset["objects"], dataset.select_columns([image_column])[image_column], sizes)
    ):
        where = describe_image(image, index, split)
        ids = objects.get("id") or [None] * len(objects["bbox"])
        if len(objects["category"]) != len(objects["bbox"]):
            problems.append((None, f"{where}: {len(objects['bbox'])} boxes but {len(objects['category'])} categories"))
            continue
        for annotation_id, box, category in zip(ids, objects["bbox"], objects["category"]):
            label = f"{where}, annotation {annotation_id}" if annotation_id is not None else where
            if not 0 <= int(category) < num_categories:
                problems.append(
                    (annotation_id, f"{label}: unknown category {category} (valid: 0..{num_categories - 1})")
                )
                continue
            if box is None or len(box) != 4:
                problems.append((annotation_id, f"{label}: bbox {box!r} is not [x, y, width, height]"))
                continue
            x, y, width, height = box
            if not (width > 0 and height > 0):
                problems.append((annotation_id, f"{label}: box {box} has no area"))
            elif size is not None and (
                x < -BOX_TOLERANCE
                or y < -BOX_TOLERANCE
                or x + width > size[0] + BOX_TOLERANCE
                or y + height > size[1] + BOX_TOLERANCE
            ):
                problems.append(
                    (annotation_id, f"{label}: box [x, y, w, h] = {box} lies outside the {size[0]}x{size[1]} image")
                )
    _raise_problems(problems, f"the {split} split")


def _prepare_split(
    dataset: datasets.Dataset,
    image_column: str,
    num_categories: int,
    split: str,
    check_images: str,
    num_proc: int | None,
    problems: Sequence[AnnotationProblem] = (),
) -> tuple[datasets.Dataset, int]:
    """Validated split with unreadable images dropped; done before any train/validation split, so the rows named in
    messages are the rows of the data as given."""
    dataset = _normalise_objects(dataset, split)
    if image_column not in dataset.column_names:
        raise DataError(
            f"The {split} split has no image column {image_column!r}; available columns: {dataset.column_names}."
        )
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    validate_objects(dataset, image_column, num_categories, split, problems)
    skipped = 0
    if check_images != "none":
        dataset, skipped = drop_unreadable_images(dataset, image_column, split, check_images == "decode", num_proc)
    return dataset, skipped


def load_detection_data(
    train_dir: str | None = None,
    validation_dir: str | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    image_column_name: str = "image",
    validation_split_name: str | None = None,
    train_val_split: float = 0.15,
    split_seed: int = 42,
    cache_dir: str | None = None,
    check_images: str = "verify",
    num_proc: int | None = None,
) -> DetectionData:
    """Train and validation detection data from COCO folders or a `datasets` dataset (see the module docstring).

    Without a validation folder or split, `train_val_split` of the training images is held out with `split_seed`.
    """
    if (dataset_name is None) == (train_dir is None):
        raise DataError("Pass either a dataset name or a COCO training folder (train_dir), exactly one of them.")
    if dataset_name is not None:
        splits = load_named_dataset(dataset_name, dataset_config_name, cache_dir)
        if "train" not in splits:
            raise DataError(f"The dataset has no 'train' split; available splits: {list(splits)}.")
        train = _normalise_objects(splits["train"], "train")
        categories = _category_names(train)
        if categories is None:
            raise DataError(
                "The dataset's objects.category is not a ClassLabel, so the category names are unknown; cast it "
                "with datasets.ClassLabel(names=[...]) first."
            )
        held_out = validation_split_name or next((name for name in ("validation", "test") if name in splits), None)
        if held_out is not None and held_out not in splits:
            raise DataError(f"The dataset has no split {held_out!r}; available splits: {list(splits)}.")
        validation = splits[held_out] if held_out else None
        name = dataset_name + (f" ({dataset_config_name})" if dataset_config_name else "")
        train_problems, validation_problems = [], []
    else:
        train, categories, train_problems = load_coco_folder(train_dir)
        validation, held_out, validation_problems = None, None, []
        if validation_dir is not None:
            validation, _, validation_problems = load_coco_folder(validation_dir, categories)
            held_out = f"coco:{validation_dir}"
        name = f"coco:{train_dir}"
    train, skipped = _prepare_split(
        train, image_column_name, len(categories), "train", check_images, num_proc, train_problems
    )
    if validation is None:
        if not 0.0 < train_val_split < 1.0:
            raise DataError(f"train_val_split must lie in (0, 1), got {train_val_split}.")
        parts = train.train_test_split(test_size=train_val_split, seed=split_seed, shuffle=True)
        train, validation = parts["train"], parts["test"]
        held_out = f"train[{train_val_split:.0%} held out, seed {split_seed}]"
    else:
        validation, skipped_validation = _prepare_split(
            validation, image_column_name, len(categories), "validation", check_images, num_proc, validation_problems
        )
        skipped += skipped_validation
    return DetectionData(
        train=ObjectsSource(train, image_column_name, "train"),
        validation=ObjectsSource(validation, image_column_name, "validation"),
        categories=categories,
        name=name,
        validation_split_name=held_out,
        skipped_images=skipped,
        dataset_config_name=dataset_config_name,
    )


# -------------------------------------------------------------------------------------- augmentation and batching
def build_detection_augmentation(
    horizontal_flip: float = 0.5, photometric: bool = True, zoom_out: bool = False, iou_crop: bool = False
) -> Callable[[dict], dict]:
    """Box-aware training augmentation from torchvision.transforms.v2, applied before the image processor resizes.

    Boxes follow every geometric change; boxes that end up degenerate are dropped with their labels
    (`SanitizeBoundingBoxes`). Digits and text must keep `horizontal_flip=0`.
    """
    from torchvision.transforms import v2

    transforms = []
    if photometric:
        transforms.append(v2.RandomPhotometricDistort(p=0.5))
    if zoom_out:
        transforms.append(v2.RandomZoomOut(fill=0, side_range=(1.0, 2.0), p=0.5))
    if iou_crop:
        transforms.append(v2.RandomIoUCrop())
    if horizontal_flip > 0:
        transforms.append(v2.RandomHorizontalFlip(p=horizontal_flip))
    transforms.append(v2.SanitizeBoundingBoxes(min_size=1.0))
    return v2.Compose(transforms)


class DetectionDataset(EpochSeededDataset):
    """A map-style torch dataset over a detection source (`ObjectsSource`, `DigitCanvases`, ...).

    Items are `{"image": PIL or tensor image, "annotations": COCO-style dict}` for `DetectionCollator`. The source
    gets the epoch too (digit canvases change every epoch); with `augmentation_seed` the augmentation of a sample
    is a pure function of (seed, epoch, index), so a resumed run sees exactly the same data.
    """

    def __init__(
        self, source, augmentation: Callable[[dict], dict] | None = None, augmentation_seed: int | None = None
    ):
        self.augmentation_seed = augmentation_seed
        self.source = source
        self.transform = augmentation

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        sample = self.source.sample(index, self.epoch)
        image, boxes, categories = sample.image, sample.boxes, sample.categories
        if self.transform is not None:
            from torchvision import tv_tensors
            from torchvision.transforms.v2 import functional

            with self.augmentation(index):
                augmented = self.transform(
                    {
                        "image": tv_tensors.Image(functional.pil_to_tensor(image)),
                        "boxes": tv_tensors.BoundingBoxes(
                            torch.as_tensor(boxes), format="XYWH", canvas_size=(image.height, image.width)
                        ),
                        "labels": torch.as_tensor(categories),
                    }
                )
            image = augmented["image"]
            boxes = augmented["boxes"].numpy().reshape(-1, 4)
            categories = augmented["labels"].numpy()
        annotations = [
            {"bbox": box.tolist(), "category_id": int(category), "area": float(box[2] * box[3]), "iscrowd": 0}
            for box, category in zip(boxes, categories)
        ]
        return {"image": image, "annotations": {"image_id": sample.image_id, "annotations": annotations}}


class DetectionCollator:
    """Batches through the detector's image processor: resize, normalise, pad (with `pixel_mask` where the family
    uses one) and the labels the transformers detectors take (`class_labels`, normalised `cxcywh` boxes)."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, examples: Sequence[dict]) -> dict:
        encoded = self.image_processor(
            images=[example["image"] for example in examples],
            annotations=[example["annotations"] for example in examples],
            return_tensors="pt",
        )
        return dict(encoded)
