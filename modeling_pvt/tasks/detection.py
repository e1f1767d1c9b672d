"""Object detection: transformers' DETR-family detectors and RT-DETR on a PvtBackbone.

Without a dataset the task trains on the embedded default: digit canvases (`modeling_pvt.data.digit_canvases`) with
the backbone initialised from the digits classifier of `modeling_pvt.tasks.classification` (`pvt-digits/`, trained in
the same processes first when absent): pretrain, then detect. With a dataset (COCO folders, or a `datasets` dataset
in the `objects` layout) it follows the transformers detectors' own defaults (DETR / Deformable DETR papers).
"""

import os
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs
from huggingface_hub.errors import StrictDataclassError

from ..configuration_pvt import PvtConfig
from ..data.classification import DataArguments
from ..data.detection import (
    DetectionCollator,
    DetectionData,
    DetectionDataset,
    build_detection_augmentation,
    load_detection_data,
)
from ..data.digit_canvases import (
    DIGIT_CATEGORIES,
    DIGITS_DETECTION_DATASET_NAME,
    CanvasSpec,
    DigitCanvases,
    load_digit_scans,
)
from ..hub.model_card import render_trained_card
from ..hub.results import OBJECT_DETECTION
from ..modeling_pvt import PvtBackbone
from ..training.launch import cpu_only_host
from ..training.options import (
    OptionError,
    TrainingArguments,
    apply_recipe,
    loading_pretrained,
    parse_config_overrides,
)
from ..training.run import TaskDatasets, TrainingTask, default_repo_id, run_training
from .classification import ClassificationArguments, ClassificationTask
from .classification import complete_recipe as complete_classification_recipe
from .detection_evaluation import evaluate_detector
from .detectors import (
    DETECTORS,
    build_detector,
    build_detector_config,
    build_image_processor,
    find_pvt_backbone,
    freeze_backbone_stages,
    parameter_groups,
)

logger = get_logger(__name__)

DIGITS_BACKBONE_DIR = "pvt-digits"
"""The digits classifier's default output folder, where the embedded default finds its backbone."""

DIGITS_RECIPE = {
    "detector": "deformable_detr",
    "image_size": 96,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "learning_rate": 5e-4,
    "backbone_learning_rate": 1e-4,
    "weight_decay": 1e-4,
    "num_train_epochs": 9,  # the schedule that reached mAP@50 0.7 on every seed (benchmarks/detection_default.md)
    "lr_scheduler_type": "cosine",
    "warmup_epochs": 0.24,  # 30 steps of 2 processes x 8 canvases over 2,000 canvases
    "max_grad_norm": 0.1,
    "freeze_backbone_stages": 2,
    "horizontal_flip": 0.0,  # a flipped digit is not a digit
    "photometric": False,
    "dataloader_num_workers": 0,
    "output_dir": "pvt-detection-digits",
}
# Small DETR-family detectors for 8x8 digits on small canvases: 30 queries, a 128-wide transformer.
DIGITS_DETR_FAMILY = dict(
    d_model=128,
    encoder_layers=2,
    decoder_layers=3,
    encoder_ffn_dim=512,
    decoder_ffn_dim=512,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    num_queries=30,
)
DIGITS_DETECTOR_SETTINGS = {
    # One-stage: with two-stage proposals the run's outcome hung on early discrete choices (which encoder tokens became
    # proposals), so seeds ended anywhere between mAP@50 0.13 and 0.70; one-stage learns on every seed measured
    # (benchmarks/detection_default.md).
    "deformable_detr": dict(DIGITS_DETR_FAMILY, with_box_refine=True, auxiliary_loss=True),
    "rt_detr": dict(
        d_model=128,
        encoder_hidden_dim=128,
        encoder_ffn_dim=512,
        decoder_ffn_dim=512,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        decoder_in_channels=[128, 128, 128],
        num_queries=30,
        num_denoising=40,
    ),
    "detr": DIGITS_DETR_FAMILY,
    "conditional_detr": DIGITS_DETR_FAMILY,
}
# With a dataset: AdamW 1e-4, backbone 1e-5, weight decay 1e-4, gradient clipping 0.1, flips and photometric
# distortion; resize per the detector's processor.
DATASET_RECIPE = {
    "detector": "deformable_detr",
    "per_device_train_batch_size": 2,
    "per_device_eval_batch_size": 16,
    "learning_rate": 1e-4,
    "backbone_learning_rate": 1e-5,
    "weight_decay": 1e-4,
    "num_train_epochs": 50,
    "lr_scheduler_type": "cosine",
    "warmup_epochs": 0,
    "max_grad_norm": 0.1,
    "freeze_backbone_stages": 0,
    "horizontal_flip": 0.5,
    "photometric": True,
    "dataloader_num_workers": min(4, os.cpu_count() or 1),
    "output_dir": "pvt-detection",
}
CARD_SETTINGS = (
    "detector",
    "image_size",
    "per_device_train_batch_size",
    "learning_rate",
    "backbone_learning_rate",
    "weight_decay",
    "num_train_epochs",
    "warmup_epochs",
    "lr_scheduler_type",
    "max_grad_norm",
    "freeze_backbone_stages",
    "horizontal_flip",
    "photometric",
    "config_overrides",
    "seed",
)


@dataclass
class DetectionArguments:
    """Detection data (COCO folders, a `datasets` dataset, or the digit canvases) and the detector."""

    _argument_group_name = "data and detector"

    train_dir: str | None = field(
        default=None, metadata={"help": "COCO folder for training: annotations.json, images/."}
    )
    validation_dir: str | None = field(
        default=None, metadata={"help": "COCO folder for validation (same categories)."}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A datasets dataset with an 'objects' column."})
    dataset_config_name: str | None = None
    split: str | None = field(default=None, metadata={"help": "Held-out split (default: validation, else test)."})
    image_column_name: str = "image"
    train_val_split: float = field(default=0.15, metadata={"help": "Held out of train without a validation split."})
    image_check: Literal["verify", "decode", "none"] = "verify"
    preprocessing_num_workers: int | None = None
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation images."})
    cache_dir: str | None = None
    num_train_canvases: int = field(default=2000, metadata={"help": "Digit canvases per epoch (new every epoch)."})
    num_eval_canvases: int = field(default=300, metadata={"help": "Fixed held-out digit canvases."})
    min_digits: int = 1
    max_digits: int = 4
    min_digit_size: int | None = field(default=None, metadata={"help": "Smallest digit cell (default: 3/16 canvas)."})
    max_digit_size: int | None = field(default=None, metadata={"help": "Largest digit cell (default: 3/8 canvas)."})
    detector: Literal["detr", "conditional_detr", "deformable_detr", "rt_detr"] | None = field(
        default=None, metadata={"help": "[recipe]"}
    )
    backbone_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": f"PVT checkpoint (folder or Hub id) to start the backbone from; default for the digits: "
            f"{DIGITS_BACKBONE_DIR}/ (the digits classifier, trained first when absent)."
        },
    )
    model_size: Literal["tiny", "small", "medium", "large"] | None = field(
        default=None, metadata={"help": "Random backbone of this paper size."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "JSON object of detector config fields, e.g. '{\"num_queries\": 100}', on top of the digits' "
            "small detector for the embedded default (else of transformers' defaults)."
        },
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Square input size; default: the canvas size for digits, else the detector processor's resize "
            "(800/1333 shortest/longest edge for the DETR family, 640x640 for RT-DETR) [recipe]."
        },
    )
    freeze_backbone_stages: int | None = field(default=None, metadata={"help": "Freeze the first N stages [recipe]."})
    backbone_learning_rate: float | None = field(default=None, metadata={"help": "Backbone's peak rate [recipe]."})
    horizontal_flip: float | None = field(default=None, metadata={"help": "Flip probability [recipe]."})
    photometric: bool | None = field(default=None, metadata={"help": "Photometric distortion [recipe]."})

    @property
    def uses_embedded_dataset(self) -> bool:
        return self.dataset_name is None and self.train_dir is None

    def check(self, args: TrainingArguments) -> str | None:
        if self.validation_dir is not None and self.train_dir is None:
            return "--validation_dir needs --train_dir."
        if self.dataset_name is not None and self.train_dir is not None:
            return "Pass either --dataset_name or --train_dir, not both."
        if self.backbone_name_or_path is not None and self.model_size is not None:
            return "Pass either --backbone_name_or_path (pretrained) or --model_size (from scratch), not both."
        if not self.uses_embedded_dataset and self.model_size is None and self.backbone_name_or_path is None:
            return "Pass --backbone_name_or_path (a PVT checkpoint) or --model_size (random backbone)."
        if args.torch_compile and self.image_size is None and self.detector != "rt_detr":
            return (
                "--torch_compile compiles the backbone for one input size: pass --image_size (the DETR family's "
                "default resize, 800/1333 pixels on the shortest/longest edge, gives images of different shapes)."
            )
        return None

    def detector_overrides(self) -> dict:
        """The detector's config fields: the digits' small detector for the embedded default (else transformers'
        defaults), with `--config_overrides` on top. An unknown field, or fields that contradict each other, raise
        `OptionError`."""
        settings = dict(DIGITS_DETECTOR_SETTINGS[self.detector]) if self.uses_embedded_dataset else {}
        if not self.config_overrides:
            return settings
        config_class = DETECTORS[self.detector].model_class.config_class
        settings.update(parse_config_overrides(self.config_overrides, config_class))
        try:  # the config's own checks of fields against each other, before any data is read
            config_class(**settings)
        except (ValueError, StrictDataclassError) as error:
            reason = error.__cause__ or error
            raise OptionError(f"--config_overrides {self.config_overrides}: {reason}") from error
        return settings


def complete_recipe(detection_args: DetectionArguments, args: TrainingArguments) -> None:
    embedded = detection_args.uses_embedded_dataset
    apply_recipe((detection_args, args), DIGITS_RECIPE if embedded else DATASET_RECIPE)
    if embedded and detection_args.model_size is None and detection_args.backbone_name_or_path is None:
        detection_args.backbone_name_or_path = DIGITS_BACKBONE_DIR


def ensure_digits_backbone(folder: str) -> None:
    """Train the digits classifier into `folder` in these processes, unless it is there: every rank takes part."""
    if (Path(folder) / "config.json").is_file():
        return
    # accelerate's logger needs the process state (the classifier's Accelerator would set it only later); on a CPU host
    # it must be told so, like that Accelerator, or every process would run alone.
    PartialState(cpu=cpu_only_host())
    logger.info(f"No digits classifier in {folder}: training one first (the digits recipe of scripts/train.py).")
    data_args, model_args, args = DataArguments(), ClassificationArguments(), TrainingArguments(output_dir=folder)
    complete_classification_recipe(data_args, model_args, args)
    task = ClassificationTask(data_args, model_args, args)
    task.command = shlex.join([ClassificationTask.script, "--output_dir", folder])
    run_training(task, end_process_group=False)


def load_digit_canvases(detection_args: DetectionArguments, seed: int) -> DetectionData:
    """Training canvases from the classifier's training digits, held-out canvases from its held-out digits."""
    (train_scans, train_labels), (held_out_scans, held_out_labels) = load_digit_scans()
    size = detection_args.image_size
    spec = CanvasSpec(
        canvas_size=size,
        min_digits=detection_args.min_digits,
        max_digits=detection_args.max_digits,
        min_digit_size=detection_args.min_digit_size or size * 3 // 16,
        max_digit_size=detection_args.max_digit_size or size * 3 // 8,
    )
    count = detection_args.num_eval_canvases
    return DetectionData(
        train=DigitCanvases(train_scans, train_labels, detection_args.num_train_canvases, spec, seed, fixed=False),
        validation=DigitCanvases(held_out_scans, held_out_labels, count, spec, 0, fixed=True),
        categories=DIGIT_CATEGORIES,
        name=DIGITS_DETECTION_DATASET_NAME,
        validation_split_name=f"{count} canvases of the held-out digits",
    )


def load_data(detection_args: DetectionArguments, seed: int) -> DetectionData:
    if detection_args.uses_embedded_dataset:
        return load_digit_canvases(detection_args, seed)
    data = load_detection_data(
        train_dir=detection_args.train_dir,
        validation_dir=detection_args.validation_dir,
        dataset_name=detection_args.dataset_name,
        dataset_config_name=detection_args.dataset_config_name,
        image_column_name=detection_args.image_column_name,
        validation_split_name=detection_args.split,
        train_val_split=detection_args.train_val_split,
        cache_dir=detection_args.cache_dir,
        check_images=detection_args.image_check,
        num_proc=detection_args.preprocessing_num_workers,
    )
    for split, limit in (("train", detection_args.max_train_samples), ("validation", detection_args.max_eval_samples)):
        source = getattr(data, split)
        if limit is not None:
            source.dataset = source.dataset.select(range(min(limit, len(source.dataset))))
    return data


def build_detection_model(detection_args: DetectionArguments, data: DetectionData):
    """The detector on a PvtBackbone (pretrained or of a paper size) and its image processor."""
    pretrained = None
    if detection_args.backbone_name_or_path is not None:
        with loading_pretrained("--backbone_name_or_path", detection_args.backbone_name_or_path):
            pretrained = PvtBackbone.from_pretrained(detection_args.backbone_name_or_path)
        backbone_config = pretrained.config
    else:
        backbone_config = PvtConfig.from_preset(detection_args.model_size)
    detector = detection_args.detector
    config = build_detector_config(detector, backbone_config, data.id2label, **detection_args.detector_overrides())
    model = build_detector(detector, config, pretrained)
    if detection_args.freeze_backbone_stages:
        freeze_backbone_stages(model, detection_args.freeze_backbone_stages)
    if detection_args.image_size:
        size = {"height": detection_args.image_size, "width": detection_args.image_size}
    elif detector == "rt_detr":
        size = {"height": 640, "width": 640}
    else:
        size = {"shortest_edge": 800, "longest_edge": 1333}
    return model, build_image_processor(detector, size=size)


class DetectionTask(TrainingTask):
    project_name = "pvt_object_detection"
    script = "scripts/train_detection.py"

    def __init__(self, detection_args: DetectionArguments, args: TrainingArguments):
        super().__init__(args)
        self.detection_args = detection_args

    def hyperparameters(self) -> dict:
        return {**asdict(self.detection_args), **asdict(self.args)}

    def accelerator_kwargs(self) -> dict:
        # Some heads take part in the loss only in some configurations (per-layer class heads without the auxiliary
        # loss, RT-DETR's denoising parts): DDP must not wait for their gradients.
        return {"kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=True)]}

    def check_options(self) -> None:
        self.detection_args.detector_overrides()

    def load_data(self) -> DetectionData:
        return load_data(self.detection_args, self.args.seed)

    def build_model(self, data: DetectionData, accelerator: Accelerator):
        model, self.image_processor = build_detection_model(self.detection_args, data)
        return model, self.image_processor

    def module_to_compile(self, model: torch.nn.Module) -> torch.nn.Module:
        # The detectors match predictions to objects (scipy's Hungarian algorithm) inside their forward, which no
        # graph can hold: the backbone alone is one graph, for one input size.
        return find_pvt_backbone(model)

    def build_datasets(self, data: DetectionData, processor) -> TaskDatasets:
        detection_args = self.detection_args
        augmentation = None
        if detection_args.horizontal_flip > 0 or detection_args.photometric:
            augmentation = build_detection_augmentation(detection_args.horizontal_flip, detection_args.photometric)
        collator = DetectionCollator(processor)
        return TaskDatasets(
            train=DetectionDataset(data.train, augmentation, augmentation_seed=self.args.seed),
            validation=DetectionDataset(data.validation),
            train_collate=collator,
            eval_collate=collator,
        )

    def parameter_groups(self, model: torch.nn.Module) -> list[dict]:
        args = self.args
        return parameter_groups(
            model, args.learning_rate, self.detection_args.backbone_learning_rate, args.weight_decay
        )

    def build_loss(self, accelerator: Accelerator, model: torch.nn.Module, data: DetectionData):
        def compute_loss(batch: dict) -> torch.Tensor:
            return model(
                pixel_values=batch["pixel_values"], pixel_mask=batch.get("pixel_mask"), labels=batch["labels"]
            ).loss

        return compute_loss

    def evaluate(self, accelerator: Accelerator, model: torch.nn.Module, dataloader, data: DetectionData) -> dict:
        return evaluate_detector(accelerator, model, dataloader, self.image_processor, data.id2label)

    def describe_scores(self, scores: dict) -> str:
        return f"mAP@50 {scores['eval_map_50']:.4f}, mAP {scores['eval_map']:.4f}"

    def results_fields(self, data: DetectionData) -> dict:
        return {"detector": self.detection_args.detector}

    def model_card(self, data: DetectionData, results: dict) -> str:
        detection_args = self.detection_args
        backbone = detection_args.backbone_name_or_path or f"a randomly initialised PVT-{detection_args.model_size}"
        summary = (
            f"A {detection_args.detector} object detector (transformers' own) on a Pyramid Vision Transformer "
            f"backbone (PVT v1, [arXiv 2102.12122](https://arxiv.org/abs/2102.12122)), fine-tuned from {backbone} "
            f"with `modeling_pvt`'s `{self.script}`. Categories: {', '.join(data.categories[:20])}"
            f"{' ...' if len(data.categories) > 20 else ''} ({len(data.categories)}).\n\n"
            "**Loading needs the PVT code**: pass `trust_remote_code=True` (the folder carries the code), or "
            "`import modeling_pvt` first (installed from its repository). Stock transformers has no PVT v1 backbone; "
            "without either, it stops and asks for `trust_remote_code=True`."
        )
        if detection_args.uses_embedded_dataset:
            summary += (
                "\n\nData: handwritten digits (scikit-learn's 8x8 scans) pasted on black canvases, boxes exact; the "
                "held-out canvases use only digits the backbone's classifier never trained on."
            )
        history = "".join(
            f"| {entry['elapsed_s']:.0f} | {entry['completed_steps']} | {entry['eval_map_50']:.3f} "
            f"| {entry['eval_map']:.3f} |\n"
            for entry in results["eval_history"]
        )
        run_summary = (
            f"Training took {results['train_runtime']:.0f} s ({results['total_runtime']:.0f} s for the whole run) on "
            f"{results['num_processes']} process(es) ({results['device']}, mixed precision: "
            f"{results['mixed_precision']}), {results['completed_steps']} optimizer steps, global batch "
            f"{results['global_batch_size']}.\n\n| seconds since start | steps | mAP@50 | mAP |\n|---|---|---|---|\n"
            + history
        )
        settings = {**asdict(detection_args), **asdict(self.args)}
        backbone_id = detection_args.backbone_name_or_path
        return render_trained_card(
            repo_id=default_repo_id(self.args),
            task=OBJECT_DETECTION,
            title=f"PVT + {detection_args.detector} on {data.name}",
            summary=summary,
            results=results,
            source=f"`{self.script}` at the end of training (COCO mAP, torchmetrics with pycocotools)",
            run_summary=run_summary,
            settings={name: settings[name] for name in CARD_SETTINGS},
            command=self.command,
            base_model=None if backbone_id is None or Path(backbone_id).is_dir() else backbone_id,
            tags=("object-detection", detection_args.detector),
        )
