"""Fine-tune UperNet + PvtBackbone for semantic segmentation with Accelerate; mean IoU after every epoch.

The backbone starts from a PVT image-classification checkpoint (`--backbone_name_or_path`: a folder or a Hub id; its
encoder weights load, the class token, final norm and classifier are dropped), from random weights of one of the
paper's sizes (`--model_size`), or a whole segmentation model saved by this script (`--model_name_or_path`).

Data, one of:

* `--train_dir` (and optionally `--validation_dir`): folders laid out as

      <dir>/images/<stem>.<jpg|png|...>   RGB (or greyscale) images
      <dir>/masks/<stem>.png              single-channel masks of the same size: pixel value = class id,
                                          `--ignore_index` (255) = not scored; palette ("P" mode) PNGs such as
                                          Pascal VOC's are read as their palette indices

  Every image needs a mask with the same stem (masks without an image are ignored). Without `--validation_dir`,
  `--train_val_split` of the training pairs is held out (fixed seed).
* `--dataset_name` (and `--dataset_config_name`): a `datasets` dataset with an image column and a mask column, such as
  `scene_parse_150` (with `--reduce_labels`: ADE20K's label 0 "other" becomes ignore_index, giving 150 classes).

Class names come from `--labels_file` (a JSON list, a JSON `{"id": "name"}` object, or a text file with one name a
line); with only `--num_labels` (or neither: the largest class id found in the training masks + 1) they are
`class_0`, `class_1`, ...

The defaults follow the PVT authors' ADE20K segmentation configuration (which used a Semantic FPN head; here the
head is UperNet) where it maps onto this script: AdamW with learning rate 1e-4 and weight decay 1e-4, polynomial
decay (power 0.9), random rescaling to 0.5-2x of `--image_size` (shortest edge), random `--image_size` crops (padded
with ignore_index) and horizontal flips. Not reproduced: photometric distortion and the crop's category-ratio cap.

Evaluation resizes each image to `--image_size` x `--image_size` (the image processor saved with the model does the
same; the authors instead rescale the shortest edge to 512), upsamples the logits to the mask's own size and scores
every validation image once across processes (`gather_for_metrics`) with the mean-IoU metric that ships in
`modeling_pvt/metrics/mean_iou`.

    accelerate launch scripts/train_segmentation.py --train_dir data/train --validation_dir data/val \
        --backbone_name_or_path path/to/pvt-small-classification --output_dir pvt-upernet-seg

`--output_dir` receives the model (safetensors), the image processor, `all_results.json` (`eval_mean_iou` and the
other scores of the last epoch, plus every epoch's scores) and, with `--with_tracking`, TensorBoard logs. Loading the
saved model needs `import modeling_pvt` first (it registers the `pvt` backbone with transformers' Auto classes).
"""

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import datasets
import evaluate
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm.auto import tqdm
from transformers import SegformerImageProcessor, UperNetConfig, UperNetForSemanticSegmentation, get_scheduler

import modeling_pvt
from modeling_pvt import PVT_PRESETS, PvtBackbone, PvtConfig

logger = get_logger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".jfif"})
MASK_COLUMN_CANDIDATES = ("label", "annotation", "mask", "segmentation", "semantic_segmentation")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", help="A `datasets` dataset (Hub id or local path), e.g. scene_parse_150.")
    data.add_argument("--dataset_config_name", help="Configuration of --dataset_name.")
    data.add_argument("--train_dir", help="Folder with images/ and masks/ sub-folders (see the module docstring).")
    data.add_argument("--validation_dir", help="Folder with images/ and masks/ for evaluation.")
    data.add_argument(
        "--train_val_split",
        type=float,
        default=0.15,
        help="Fraction of the training data held out when there is no validation split.",
    )
    data.add_argument("--image_column_name", default="image", help="Image column of --dataset_name.")
    data.add_argument(
        "--label_column_name",
        help=f"Mask column of --dataset_name (default: the first of {', '.join(MASK_COLUMN_CANDIDATES)} present).",
    )
    data.add_argument("--num_labels", type=int, help="Number of classes (class ids 0 .. num_labels - 1).")
    data.add_argument("--labels_file", help="Class names: JSON list, JSON {id: name} object, or one name a line.")
    data.add_argument("--ignore_index", type=int, default=255, help="Mask value of unlabelled pixels (not scored).")
    data.add_argument(
        "--reduce_labels",
        action="store_true",
        help="Mask value 0 is background: make it ignore_index and lower every other class id by one (ADE20K).",
    )
    data.add_argument("--max_train_samples", type=int, help="Use at most this many training pairs (quick runs).")
    data.add_argument("--max_eval_samples", type=int, help="Use at most this many validation pairs.")
    data.add_argument("--dataloader_num_workers", type=int, default=2)

    model = parser.add_argument_group("model")
    model.add_argument(
        "--backbone_name_or_path",
        help="PVT classification checkpoint (folder or Hub id) whose encoder initialises the backbone.",
    )
    model.add_argument("--model_size", choices=sorted(PVT_PRESETS), help="Randomly initialised PVT of this size.")
    model.add_argument(
        "--model_name_or_path", help="A UperNet + PVT segmentation model saved by this script, to fine-tune further."
    )
    model.add_argument("--head_hidden_size", type=int, default=512, help="Channels of the UperNet decode head.")
    model.add_argument("--auxiliary_head_channels", type=int, default=256, help="Channels of the auxiliary head.")
    model.add_argument("--no_auxiliary_head", action="store_true", help="Train without the auxiliary FCN head.")
    model.add_argument("--drop_path_rate", type=float, default=0.1, help="Stochastic depth of the backbone.")
    model.add_argument(
        "--no_sync_batchnorm",
        action="store_true",
        help="Keep per-GPU BatchNorm statistics in the heads (the default synchronises them on multi-GPU runs).",
    )

    training = parser.add_argument_group("training")
    training.add_argument("--output_dir", required=True)
    training.add_argument("--image_size", type=int, default=512, help="Training crop and evaluation size (square).")
    training.add_argument("--per_device_train_batch_size", type=int, default=4)
    training.add_argument("--per_device_eval_batch_size", type=int, default=4)
    training.add_argument("--learning_rate", type=float, default=1e-4)
    training.add_argument("--weight_decay", type=float, default=1e-4)
    training.add_argument("--num_train_epochs", type=int, default=10)
    training.add_argument("--max_train_steps", type=int, help="Stop after this many optimiser steps.")
    training.add_argument("--gradient_accumulation_steps", type=int, default=1)
    training.add_argument("--lr_scheduler_type", default="polynomial", help="A transformers scheduler name.")
    training.add_argument("--poly_power", type=float, default=0.9, help="Power of the polynomial schedule.")
    training.add_argument("--num_warmup_steps", type=int, default=0)
    training.add_argument("--seed", type=int, default=42)
    training.add_argument("--with_tracking", action="store_true", help="Log losses and scores with a tracker.")
    training.add_argument("--report_to", default="tensorboard", help="Tracker for --with_tracking.")
    args = parser.parse_args(argv)

    if (args.dataset_name is None) == (args.train_dir is None):
        parser.error("Give exactly one data source: --dataset_name or --train_dir.")
    if args.validation_dir and not args.train_dir:
        parser.error("--validation_dir goes with --train_dir.")
    model_sources = [args.backbone_name_or_path, args.model_size, args.model_name_or_path]
    if sum(source is not None for source in model_sources) != 1:
        parser.error(
            "Give exactly one of --backbone_name_or_path (classification weights), --model_size (random weights) "
            "or --model_name_or_path (a saved segmentation model)."
        )
    if not 0.0 < args.train_val_split < 1.0:
        parser.error(f"--train_val_split must lie in (0, 1), got {args.train_val_split}.")
    if args.num_labels is not None and args.num_labels < 1:
        parser.error(f"--num_labels must be positive, got {args.num_labels}.")
    if args.num_labels is not None and 0 <= args.ignore_index < args.num_labels:
        parser.error(f"--ignore_index {args.ignore_index} is a class id for --num_labels {args.num_labels}.")
    return args


# ----------------------------------------------------------------------------------------------------------- data


def find_image_mask_pairs(folder: str | Path) -> tuple[list[str], list[str]]:
    """Image and mask paths of a `<folder>/images`, `<folder>/masks` layout, paired by file stem."""
    folder = Path(folder)
    images_dir, masks_dir = folder / "images", folder / "masks"
    for required in (images_dir, masks_dir):
        if not required.is_dir():
            raise ValueError(f"{required} does not exist: a data folder needs images/ and masks/ sub-folders.")
    masks = {path.stem: path for path in sorted(masks_dir.iterdir()) if path.suffix.lower() in IMAGE_EXTENSIONS}
    images = [path for path in sorted(images_dir.iterdir()) if path.suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        raise ValueError(f"No images in {images_dir} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}).")
    unmatched = [path.name for path in images if path.stem not in masks]
    if unmatched:
        raise ValueError(
            f"{len(unmatched)} image(s) in {images_dir} have no mask with the same stem in {masks_dir}, e.g. "
            f"{', '.join(unmatched[:5])}."
        )
    return [str(path) for path in images], [str(masks[path.stem]) for path in images]


def folder_dataset(folder: str | Path) -> datasets.Dataset:
    image_paths, mask_paths = find_image_mask_pairs(folder)
    dataset = datasets.Dataset.from_dict({"image": image_paths, "label": mask_paths})
    return dataset.cast_column("image", datasets.Image()).cast_column("label", datasets.Image())


def load_splits(args: argparse.Namespace) -> tuple[datasets.Dataset, datasets.Dataset, str, str]:
    """Train and validation splits with decoded `image` / `label` columns, a description, and the split's name."""
    if args.train_dir:
        train = folder_dataset(args.train_dir)
        source = str(args.train_dir)
        validation = folder_dataset(args.validation_dir) if args.validation_dir else None
    else:
        loaded = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
        source = args.dataset_name + (f" ({args.dataset_config_name})" if args.dataset_config_name else "")
        if "train" not in loaded:
            raise ValueError(f"{source} has no train split; its splits: {sorted(loaded)}.")
        train = loaded["train"]
        validation = loaded.get("validation")
        label_column = args.label_column_name or next(
            (name for name in MASK_COLUMN_CANDIDATES if name in train.column_names), None
        )
        for role, column in (("image", args.image_column_name), ("mask", label_column)):
            if column is None or column not in train.column_names:
                raise ValueError(
                    f"{source} has no {role} column {column!r}; its columns: {train.column_names}. Pass "
                    f"--{'image' if role == 'image' else 'label'}_column_name."
                )
        keep = {args.image_column_name: "image", label_column: "label"}
        train, validation = (
            split.select_columns(list(keep)).rename_columns({k: v for k, v in keep.items() if k != v})
            if split is not None
            else None
            for split in (train, validation)
        )
    validation_name = "validation"
    if validation is None:
        held_out = train.train_test_split(test_size=args.train_val_split, seed=args.seed)
        train, validation = held_out["train"], held_out["test"]
        validation_name = f"train[{args.train_val_split:.0%} held out, seed {args.seed}]"
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples is not None:
        validation = validation.select(range(min(args.max_eval_samples, len(validation))))
    return train, validation, source, validation_name


def mask_to_array(mask: Image.Image, reduce_labels: bool, ignore_index: int) -> np.ndarray:
    """Class ids of a single-channel mask image as int64 (palette images give their palette indices)."""
    if mask.mode not in ("L", "P", "I", "I;16", "1"):
        raise ValueError(
            f"Mask {getattr(mask, 'filename', '') or ''} has mode {mask.mode!r}: masks must be single-channel images "
            "whose pixel values are class ids (colour-coded RGB masks must be converted to ids first)."
        )
    values = np.asarray(mask).astype(np.int64)
    if reduce_labels:
        background, ignored = values == 0, values == ignore_index
        values = values - 1
        values[background | ignored] = ignore_index
    return values


def check_class_ids(values: np.ndarray, num_labels: int, ignore_index: int, where: str) -> None:
    """Out-of-range ids crash the loss with an opaque message (a device assert on GPU): name the mask instead."""
    labelled = values[values != ignore_index]
    if labelled.size and (labelled.min() < 0 or labelled.max() >= num_labels):
        raise ValueError(
            f"Mask {where} holds class ids in [{labelled.min()}, {labelled.max()}], outside [0, {num_labels}) "
            f"(ignore_index={ignore_index}). Check --num_labels, --ignore_index and --reduce_labels."
        )


def describe(image: Image.Image, row: int) -> str:
    """The file an image was read from, or (images stored inside a dataset) its place in the batch."""
    return getattr(image, "filename", "") or f"(item {row} of a batch)"


def infer_num_labels(train: datasets.Dataset, reduce_labels: bool, ignore_index: int) -> int:
    """The largest class id of the training masks + 1 (reads every mask; pass --num_labels to skip this)."""
    largest = -1
    masks = train.select_columns(["label"])
    for row in tqdm(masks, desc="Finding the classes of the training masks"):
        values = mask_to_array(row["label"], reduce_labels, ignore_index)
        labelled = values[values != ignore_index]
        if labelled.size:
            largest = max(largest, int(labelled.max()))
    if largest < 0:
        raise ValueError("The training masks hold no labelled pixels (every pixel equals --ignore_index).")
    return largest + 1


def read_labels_file(path: str) -> list[str]:
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix.lower() == ".json":
        content = json.loads(text)
        if isinstance(content, dict):
            ids = sorted(int(key) for key in content)
            if ids != list(range(len(ids))):
                raise ValueError(f"{path}: class ids must be 0 .. N-1 without gaps, got {ids[:10]}...")
            return [str(content[str(index)]) for index in ids]
        return [str(name) for name in content]
    return [line.strip() for line in text.splitlines() if line.strip()]


def class_names(args: argparse.Namespace, train: datasets.Dataset) -> list[str]:
    if args.labels_file:
        names = read_labels_file(args.labels_file)
        if args.num_labels is not None and args.num_labels != len(names):
            raise ValueError(f"--labels_file names {len(names)} classes but --num_labels is {args.num_labels}.")
        return names
    num_labels = args.num_labels or infer_num_labels(train, args.reduce_labels, args.ignore_index)
    return [f"class_{index}" for index in range(num_labels)]


def train_transform(image_size: int, ignore_index: int) -> v2.Compose:
    """Random rescale (shortest edge 0.5-2x image_size), random crop padded with ignore_index, flip, normalise."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResize(min_size=image_size // 2, max_size=2 * image_size + 1),
            v2.RandomCrop(image_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}),
            v2.RandomHorizontalFlip(),
            v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def make_batch_transform(
    training: bool,
    image_size: int,
    num_labels: int,
    ignore_index: int,
    reduce_labels: bool,
    processor: SegformerImageProcessor,
) -> Callable[[dict], dict]:
    """`datasets.with_transform` function: training pairs augmented jointly; evaluation images resized by the
    image processor while the masks keep their own size (the score is taken at the mask's resolution)."""
    augment = train_transform(image_size, ignore_index)

    def transform(batch: dict) -> dict:
        pixel_values, labels = [], []
        for row, (image, mask) in enumerate(zip(batch["image"], batch["label"], strict=True)):
            values = mask_to_array(mask, reduce_labels, ignore_index)
            check_class_ids(values, num_labels, ignore_index, describe(mask, row))
            if values.shape != (image.height, image.width):
                raise ValueError(
                    f"Mask {describe(mask, row)} is {values.shape[1]}x{values.shape[0]} but its image "
                    f"{describe(image, row)} is {image.width}x{image.height}."
                )
            image = image.convert("RGB")
            if training:
                image_tensor, mask_tensor = augment(image, tv_tensors.Mask(torch.from_numpy(values)))
                pixel_values.append(image_tensor.as_subclass(torch.Tensor))
                labels.append(mask_tensor.as_subclass(torch.Tensor))
            else:
                pixel_values.append(processor(images=image, return_tensors="pt")["pixel_values"][0])
                labels.append(torch.from_numpy(values))
        return {"pixel_values": pixel_values, "labels": labels}

    return transform


def collate_train(examples: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.stack([example["labels"] for example in examples]),
    }


def make_collate_eval(ignore_index: int) -> Callable[[list[dict]], dict]:
    """Masks of different sizes padded to the batch's largest with ignore_index (padding is never scored)."""

    def collate(examples: list[dict]) -> dict:
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


# ---------------------------------------------------------------------------------------------------------- model


def build_model(args: argparse.Namespace, labels: list[str]) -> UperNetForSemanticSegmentation:
    id2label = dict(enumerate(labels))
    label2id = {name: index for index, name in id2label.items()}
    if args.model_name_or_path:
        return UperNetForSemanticSegmentation.from_pretrained(
            args.model_name_or_path,
            num_labels=len(labels),
            id2label=id2label,
            label2id=label2id,
            loss_ignore_index=args.ignore_index,
            ignore_mismatched_sizes=True,
        )
    backbone = None
    if args.backbone_name_or_path:
        # Every stage feeds UperNet, whatever the checkpoint's own out_features.
        backbone = PvtBackbone.from_pretrained(
            args.backbone_name_or_path,
            drop_path_rate=args.drop_path_rate,
            out_features=["stage1", "stage2", "stage3", "stage4"],
        )
        backbone_config = backbone.config
    else:
        backbone_config = PvtConfig.from_preset(args.model_size, drop_path_rate=args.drop_path_rate)
    config = UperNetConfig(
        backbone_config=backbone_config,
        num_labels=len(labels),
        id2label=id2label,
        label2id=label2id,
        hidden_size=args.head_hidden_size,
        auxiliary_channels=args.auxiliary_head_channels,
        auxiliary_in_channels=None,  # the third stage's width, read from the backbone
        use_auxiliary_head=not args.no_auxiliary_head,
        loss_ignore_index=args.ignore_index,
    )
    model = UperNetForSemanticSegmentation(config)
    if backbone is not None:
        model.backbone.load_state_dict(backbone.state_dict())
    return model


# ----------------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    dataloader: DataLoader,
    accelerator: Accelerator,
    num_labels: int,
    ignore_index: int,
    metric,
) -> dict | None:
    """Mean IoU over the whole validation set (each sample counted once across processes); None off the main
    process, which alone feeds and computes the metric."""
    model.eval()
    for batch in tqdm(dataloader, desc="Evaluating", disable=not accelerator.is_local_main_process, leave=False):
        logits = model(pixel_values=batch["pixel_values"]).logits
        labels = batch["labels"]
        predictions = torch.zeros_like(labels)
        # Each mask keeps its own size: upsample that sample's logits to it, then argmax.
        for index, (height, width) in enumerate(batch["label_sizes"].tolist()):
            upsampled = F.interpolate(
                logits[index : index + 1].float(), size=(height, width), mode="bilinear", align_corners=False
            )
            predictions[index, :height, :width] = upsampled.argmax(dim=1)[0]
        # Processes hold batches of different mask sizes: pad to a common one (labels with ignore_index).
        for dim in (1, 2):
            predictions = accelerator.pad_across_processes(predictions, dim=dim, pad_index=0)
            labels = accelerator.pad_across_processes(labels, dim=dim, pad_index=ignore_index)
        predictions, labels = accelerator.gather_for_metrics((predictions, labels))
        if accelerator.is_main_process:
            metric.add_batch(predictions=predictions.cpu().numpy(), references=labels.cpu().numpy())
    model.train()
    if not accelerator.is_main_process:
        return None
    return metric.compute(num_labels=num_labels, ignore_index=ignore_index)


def load_mean_iou_metric() -> evaluate.EvaluationModule:
    """The mean-IoU metric shipped with the package, loaded by path (the Hub's copy is unreachable offline)."""
    try:
        from modeling_pvt.metrics import load_metric
    except ImportError:  # a package without the helper: load the module file directly
        return evaluate.load(str(Path(modeling_pvt.__file__).parent / "metrics" / "mean_iou"))
    return load_metric("mean_iou")


def json_scores(scores: dict, labels: list[str]) -> dict:
    """Scores with NaN as null and per-class arrays as {class name: value}."""

    def number(value: float) -> float | None:
        return None if math.isnan(value) else float(value)

    output = {}
    for name, value in scores.items():
        if np.ndim(value) == 0:
            output[name] = number(float(value))
        else:
            output[name] = {label: number(float(item)) for label, item in zip(labels, value, strict=True)}
    return output


# ------------------------------------------------------------------------------------------------------ training


def launched_on_cpu_only_host() -> bool:
    """True for a multi-process launch (`accelerate launch --multi_gpu`, torchrun) on a host without an accelerator.

    `accelerate launch --multi_gpu` tells every process `ACCELERATE_USE_CPU=False`, and without CUDA the processes
    then run as independent single-process jobs. Asking for the CPU makes them one gloo process group instead.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    accelerator = Accelerator(
        cpu=launched_on_cpu_only_host(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)

    # Data: the main process reads (and caches) first so the others reuse its work.
    with accelerator.main_process_first():
        train, validation, source, validation_name = load_splits(args)
        labels = class_names(args, train)
    num_labels = len(labels)
    if 0 <= args.ignore_index < num_labels:
        raise ValueError(f"--ignore_index {args.ignore_index} is a class id: there are {num_labels} classes.")
    logger.info(f"{len(train)} training and {len(validation)} validation pairs from {source}; {num_labels} classes.")
    processor = SegformerImageProcessor(
        size={"height": args.image_size, "width": args.image_size},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_reduce_labels=args.reduce_labels,
    )
    transform_options = dict(
        image_size=args.image_size,
        num_labels=num_labels,
        ignore_index=args.ignore_index,
        reduce_labels=args.reduce_labels,
        processor=processor,
    )
    train = train.with_transform(make_batch_transform(training=True, **transform_options))
    validation = validation.with_transform(make_batch_transform(training=False, **transform_options))
    if len(train) < args.per_device_train_batch_size * accelerator.num_processes:
        raise ValueError(
            f"{len(train)} training pairs cannot fill one batch of {args.per_device_train_batch_size} per process "
            f"on {accelerator.num_processes} process(es) (incomplete batches are dropped: BatchNorm needs >1 sample)."
        )
    train_loader = DataLoader(
        train,
        shuffle=True,
        batch_size=args.per_device_train_batch_size,
        collate_fn=collate_train,
        num_workers=args.dataloader_num_workers,
        drop_last=True,  # a batch of one sample breaks the heads' BatchNorm on the 1x1 pooled map
    )
    eval_loader = DataLoader(
        validation,
        batch_size=args.per_device_eval_batch_size,
        collate_fn=make_collate_eval(args.ignore_index),
        num_workers=args.dataloader_num_workers,
    )

    model = build_model(args, labels)
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda" and not args.no_sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)

    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    # After `prepare` the loader holds this process's share of the batches.
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_train_epochs = math.ceil(max_train_steps / steps_per_epoch)
    scheduler_kwargs = {"power": args.poly_power} if args.lr_scheduler_type == "polynomial" else {}
    # The prepared scheduler steps once per process at every optimiser step, hence the factor.
    lr_scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
        scheduler_specific_kwargs=scheduler_kwargs,
    )
    lr_scheduler = accelerator.prepare(lr_scheduler)
    metric = load_mean_iou_metric() if accelerator.is_main_process else None
    if args.with_tracking:
        accelerator.init_trackers("train_segmentation", {k: v for k, v in vars(args).items() if v is not None})

    global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"{num_train_epochs} epoch(s), {max_train_steps} optimiser steps, global batch {global_batch}.")
    progress = tqdm(range(max_train_steps), desc="Training", disable=not accelerator.is_local_main_process)
    completed_steps, history, started = 0, [], time.perf_counter()
    for epoch in range(num_train_epochs):
        model.train()
        loss_sum, loss_count = torch.zeros((), device=accelerator.device), 0
        for batch in train_loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            loss_sum += loss.detach()
            loss_count += 1
            if accelerator.sync_gradients:
                progress.update(1)
                completed_steps += 1
                if args.with_tracking:
                    accelerator.log({"train_loss": loss.item(), "lr": lr_scheduler.get_last_lr()[0]}, completed_steps)
            if completed_steps >= max_train_steps:
                break
        train_loss = accelerator.reduce(loss_sum / max(loss_count, 1), reduction="mean").item()
        scores = evaluate_model(model, eval_loader, accelerator, num_labels, args.ignore_index, metric)
        if accelerator.is_main_process:
            epoch_scores = {"epoch": epoch, "train_loss": train_loss, "step": completed_steps}
            epoch_scores.update({f"eval_{name}": value for name, value in json_scores(scores, labels).items()})
            history.append(epoch_scores)
            accelerator.print(
                f"epoch {epoch}: train_loss {train_loss:.4f}  eval_mean_iou {scores['mean_iou']:.4f}  "
                f"eval_mean_accuracy {scores['mean_accuracy']:.4f}  eval_overall_accuracy "
                f"{scores['overall_accuracy']:.4f}"
            )
            if args.with_tracking:
                accelerator.log(
                    {
                        "eval_mean_iou": scores["mean_iou"],
                        "eval_mean_accuracy": scores["mean_accuracy"],
                        "eval_overall_accuracy": scores["overall_accuracy"],
                        "train_epoch_loss": train_loss,
                    },
                    completed_steps,
                )
        if completed_steps >= max_train_steps:
            break

    accelerator.wait_for_everyone()
    if args.with_tracking:
        accelerator.end_training()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(
        args.output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save
    )
    if not accelerator.is_main_process:
        return None
    processor.save_pretrained(args.output_dir)
    results = {key: value for key, value in history[-1].items() if key.startswith("eval_")}
    results.update(
        {
            "epoch": history[-1]["epoch"],
            "train_loss": history[-1]["train_loss"],
            "train_steps": completed_steps,
            "train_runtime_s": time.perf_counter() - started,
            "train_samples": len(train),
            "eval_samples": len(validation),
            "dataset": source,
            "eval_split": validation_name,
            "num_labels": num_labels,
            "ignore_index": args.ignore_index,
            "image_size": args.image_size,
            "num_processes": accelerator.num_processes,
            "history": history,
        }
    )
    with open(Path(args.output_dir) / "all_results.json", "w", encoding="utf-8") as file:
        json.dump(results, file, indent=2)
    return results


if __name__ == "__main__":
    main()
