"""Image classification: PVT trained from scratch or fine-tuned, with the paper's recipe or the embedded digits one.

The paper's recipe (DeiT's, arXiv 2012.12877, as used by PVT arXiv 2102.12122 Sec. 5.1) applies with a dataset: AdamW
at 5e-4 x global batch / 512, weight decay 0.05 (none on biases, norms, position embeddings and class tokens), cosine
schedule with 5 warm-up epochs, label smoothing 0.1, Mixup 0.8 / CutMix 1.0, RandAugment, random erasing 0.25,
stochastic depth 0.1 (tiny, small) or 0.3 (medium, large), gradient clipping at 1.0 for medium and large. Without a
dataset the digits recipe trains PVT-tiny on scikit-learn's digits.
"""

from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from accelerate import Accelerator

from ..configuration_pvt import PvtConfig
from ..data.classification import (
    DataArguments,
    ImageClassificationData,
    ImageClassificationDataset,
    TrainBatchTransform,
    build_processor_transform,
    build_train_transform,
    collate_image_batch,
)
from ..data.device import (
    DeviceEvalTransform,
    DeviceTrainTransform,
    EncodedImageDataset,
    TrainAugmentationSampler,
    TransformedBatches,
    collate_encoded_batch,
)
from ..hub.model_card import render_trained_card
from ..hub.results import IMAGE_CLASSIFICATION
from ..image_processing_pvt import PvtImageProcessor
from ..modeling_pvt import PvtForImageClassification
from ..training.options import TrainingArguments, apply_recipe, loading_pretrained, parse_config_overrides
from ..training.run import TaskDatasets, TrainingTask, default_repo_id
from .evaluation import evaluate_classifier

PAPER_RECIPE = {
    "model_size": "tiny",
    "image_size": 224,
    "per_device_train_batch_size": 128,
    "per_device_eval_batch_size": 128,
    "learning_rate": None,  # 5e-4 x global batch / 512, once the number of processes is known
    "weight_decay": 0.05,
    "num_train_epochs": 300,
    "lr_scheduler_type": "cosine",
    "warmup_epochs": 5,
    "label_smoothing": 0.1,
    "mixup": 0.8,
    "cutmix": 1.0,
    "rand_augment": "rand-m9-mstd0.5-inc1",
    "random_erasing": 0.25,
    "min_crop_scale": 0.08,
    "horizontal_flip": 0.5,
    "eval_crop_pct": 0.875,
    "dataloader_num_workers": 8,
    "output_dir": "pvt-classification",
}

# PVT-tiny on 8x8 digit scans. Upsampled to 32x32 the digits are 8x8 tokens in stage 1, and the paper's heavy
# augmentation (crops down to 8% of the image, flips, Mixup/CutMix, RandAugment) destroys what little there is of a
# digit, so this recipe keeps only mild crops. Batch, learning rate and epochs come from the study recorded in
# benchmarks/train_digits.json (2 CPU processes).
DIGITS_RECIPE = {
    "model_size": "tiny",
    "image_size": 32,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 128,
    "learning_rate": 2e-3,
    "weight_decay": 0.05,
    "num_train_epochs": 15,
    "lr_scheduler_type": "cosine",
    "warmup_epochs": 1,
    "label_smoothing": 0.1,
    "mixup": 0.0,
    "cutmix": 0.0,
    "rand_augment": "none",
    "random_erasing": 0.0,
    "min_crop_scale": 0.6,
    "horizontal_flip": 0.0,
    "eval_crop_pct": 1.0,
    "dataloader_num_workers": 0,
    "output_dir": "pvt-digits",
}


@dataclass
class ClassificationArguments:
    """The model and augmentation options of image classification; [recipe] marks recipe defaults."""

    _argument_group_name = "model and augmentation"

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Start from a pretrained PVT (folder or Hub id)."}
    )
    model_size: Literal["tiny", "small", "medium", "large"] | None = field(
        default=None, metadata={"help": "Train this paper size from scratch [recipe]."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "JSON object of PvtConfig fields to override, e.g. '{\"hidden_sizes\": [32, 64, 160, 256]}'."
        },
    )
    image_size: int | None = field(default=None, metadata={"help": "Training resolution [recipe]."})
    ignore_mismatched_sizes: bool = field(default=False, metadata={"help": "Allow a new classification head."})
    drop_path_rate: float | None = field(
        default=None, metadata={"help": "Stochastic depth; default 0.1 for tiny/small, 0.3 for medium/large."}
    )
    label_smoothing: float | None = field(default=None, metadata={"help": "[recipe]"})
    mixup: float | None = field(default=None, metadata={"help": "Mixup alpha, 0 disables [recipe]."})
    cutmix: float | None = field(default=None, metadata={"help": "CutMix alpha, 0 disables [recipe]."})
    rand_augment: str | None = field(default=None, metadata={"help": "timm RandAugment spec, or 'none' [recipe]."})
    random_erasing: float | None = field(default=None, metadata={"help": "Random-erasing probability [recipe]."})
    min_crop_scale: float | None = field(
        default=None, metadata={"help": "Smallest area fraction of random crops [recipe]."}
    )
    horizontal_flip: float | None = field(default=None, metadata={"help": "Horizontal flip probability [recipe]."})
    data_pipeline: Literal["cpu", "device"] = field(
        default="cpu",
        metadata={
            "help": "Where images are decoded and augmented: 'cpu' (PIL and timm in the loader's workers) or 'device' "
            "(workers read bytes; nvJPEG and tensor ops on the training device, see docs/device_data.md)."
        },
    )
    eval_crop_pct: float | None = field(
        default=None, metadata={"help": "Centre-crop fraction at evaluation [recipe]."}
    )

    def config_overrides_dict(self) -> dict:
        """`--config_overrides` as a dict; a field PvtConfig does not have raises `OptionError`."""
        return parse_config_overrides(self.config_overrides, PvtConfig)


RECIPE_SETTINGS = (
    "model_size",
    "image_size",
    "num_train_epochs",
    "learning_rate",
    "weight_decay",
    "warmup_epochs",
    "lr_scheduler_type",
    "label_smoothing",
    "mixup",
    "cutmix",
    "rand_augment",
    "random_erasing",
    "min_crop_scale",
    "horizontal_flip",
    "drop_path_rate",
    "max_grad_norm",
    "seed",
)
"""The settings a trained model's card lists."""


def complete_recipe(data_args: DataArguments, model_args: ClassificationArguments, args: TrainingArguments) -> None:
    """Fill every unset option from the recipe that fits the data, then the size-dependent ones."""
    apply_recipe((data_args, model_args, args), DIGITS_RECIPE if data_args.uses_embedded_dataset else PAPER_RECIPE)
    if model_args.rand_augment.lower() in ("none", "off", ""):
        model_args.rand_augment = None
    large = model_args.model_size in ("medium", "large")
    if model_args.drop_path_rate is None:
        model_args.drop_path_rate = 0.3 if large else 0.1
    if args.max_grad_norm is None and large:
        args.max_grad_norm = 1.0


def build_classifier(
    model_args: ClassificationArguments, data: ImageClassificationData
) -> tuple[PvtForImageClassification, PvtImageProcessor]:
    """The model (pretrained or of a paper size) with the data's labels, and the processor of its evaluation
    transform, so training's evaluation and users' inference agree."""
    label_kwargs = {"num_labels": len(data.labels), "id2label": data.id2label, "label2id": data.label2id}
    overrides = model_args.config_overrides_dict()
    if model_args.model_name_or_path:
        with loading_pretrained("--model_name_or_path", model_args.model_name_or_path):
            model = PvtForImageClassification.from_pretrained(
                model_args.model_name_or_path,
                ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
                drop_path_rate=model_args.drop_path_rate,
                **label_kwargs,
                **overrides,
            )
    else:
        config = PvtConfig.from_preset(
            model_args.model_size,
            image_size=model_args.image_size,
            drop_path_rate=model_args.drop_path_rate,
            **label_kwargs,
            **overrides,
        )
        model = PvtForImageClassification(config)
    image_processor = PvtImageProcessor(
        size={"shortest_edge": int(model_args.image_size / model_args.eval_crop_pct)},
        crop_size={"height": model_args.image_size, "width": model_args.image_size},
    )
    return model, image_processor


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases and norms (1-D), position embeddings and class tokens."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim <= 1 or name.endswith(("position_embeddings", "cls_token")):
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_criterion(model_args: ClassificationArguments, num_labels: int):
    """The loss of a batch, with Mixup/CutMix (timm) when the recipe has them: (mix or None, criterion)."""
    if model_args.mixup > 0 or model_args.cutmix > 0:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mixup = Mixup(
            mixup_alpha=model_args.mixup,
            cutmix_alpha=model_args.cutmix,
            label_smoothing=model_args.label_smoothing,
            num_classes=num_labels,
        )
        return mixup, SoftTargetCrossEntropy()
    return None, torch.nn.CrossEntropyLoss(label_smoothing=model_args.label_smoothing)


class ClassificationTask(TrainingTask):
    project_name = "pvt_image_classification"
    script = "scripts/train.py"

    def __init__(self, data_args: DataArguments, model_args: ClassificationArguments, args: TrainingArguments):
        super().__init__(args)
        self.data_args, self.model_args = data_args, model_args

    def hyperparameters(self) -> dict:
        return {**asdict(self.data_args), **asdict(self.model_args), **asdict(self.args)}

    def check_options(self) -> None:
        self.model_args.config_overrides_dict()

    def load_data(self) -> ImageClassificationData:
        return self.data_args.load()

    def build_model(self, data: ImageClassificationData, accelerator: Accelerator):
        model, self.image_processor = build_classifier(self.model_args, data)
        return model, self.image_processor

    def build_datasets(self, data: ImageClassificationData, processor) -> TaskDatasets:
        model_args, columns = self.model_args, (data.image_column, data.label_column)
        if model_args.data_pipeline == "device":
            self.augmentation_sampler = TrainAugmentationSampler(
                model_args.image_size,
                rand_augment=model_args.rand_augment,
                crop_scale=(model_args.min_crop_scale, 1.0),
                horizontal_flip=model_args.horizontal_flip,
                random_erasing=model_args.random_erasing,
                mean=processor.image_mean,
            )
            return TaskDatasets(
                train=EncodedImageDataset(data.train, *columns, "train", self.augmentation_sampler, self.args.seed),
                validation=EncodedImageDataset(data.validation, *columns, "validation"),
                train_collate=collate_encoded_batch,
                eval_collate=collate_encoded_batch,
            )
        train_transform = build_train_transform(
            model_args.image_size,
            rand_augment=model_args.rand_augment,
            crop_scale=(model_args.min_crop_scale, 1.0),
            horizontal_flip=model_args.horizontal_flip,
        )
        eval_transform = build_processor_transform(processor)
        return TaskDatasets(
            train=ImageClassificationDataset(data.train, *columns, train_transform, "train", self.args.seed),
            validation=ImageClassificationDataset(data.validation, *columns, eval_transform, "validation"),
            train_collate=collate_image_batch,
            eval_collate=collate_image_batch,
        )

    def batch_pixels(self, accelerator: Accelerator):
        """The training batch's pixels on the device: normalised, augmented as far as the workers did not."""
        mean, std = self.image_processor.image_mean, self.image_processor.image_std
        if self.model_args.data_pipeline == "device":
            return DeviceTrainTransform(self.augmentation_sampler, mean, std, accelerator.device)
        batch_transform = TrainBatchTransform(mean, std, self.model_args.random_erasing, accelerator.device)
        return lambda batch: batch_transform(batch["pixel_values"])

    def prepare(self, accelerator: Accelerator, global_batch_size: int) -> None:
        if self.args.learning_rate is None:  # the paper's rule
            self.args.learning_rate = 5e-4 * global_batch_size / 512

    def parameter_groups(self, model: torch.nn.Module) -> list[dict]:
        return parameter_groups(model, self.args.weight_decay)

    def build_loss(self, accelerator: Accelerator, model: torch.nn.Module, data: ImageClassificationData):
        mixup, criterion = build_criterion(self.model_args, len(data.labels))
        batch_pixels = self.batch_pixels(accelerator)

        def compute_loss(batch: dict) -> torch.Tensor:
            pixel_values, targets = batch_pixels(batch), batch["labels"]
            if mixup is not None:
                pixel_values, targets = mixup(pixel_values, targets)
            return criterion(model(pixel_values=pixel_values).logits.float(), targets)

        return compute_loss

    def evaluate(self, accelerator: Accelerator, model: torch.nn.Module, dataloader, data) -> dict:
        if self.model_args.data_pipeline == "device":
            transform = DeviceEvalTransform.from_image_processor(self.image_processor, accelerator.device)
            dataloader = TransformedBatches(dataloader, transform)
        return evaluate_classifier(accelerator, model, dataloader)

    def describe_scores(self, scores: dict) -> str:
        return f"top-1 {scores['eval_accuracy']:.4f}, top-5 {scores['eval_top5_accuracy']:.4f}"

    def model_card(self, data: ImageClassificationData, results: dict) -> str:
        model_args, args = self.model_args, self.args
        source = (
            f"fine-tuned from `{model_args.model_name_or_path}`"
            if model_args.model_name_or_path
            else "trained from scratch"
        )
        labels = ", ".join(data.labels[:20]) + (" ..." if len(data.labels) > 20 else "")
        settings = {**asdict(model_args), **asdict(args)}
        return render_trained_card(
            repo_id=default_repo_id(args),
            task=IMAGE_CLASSIFICATION,
            title=f"PVT ({model_args.model_name_or_path or model_args.model_size}) on {data.name}",
            summary=f"A Pyramid Vision Transformer (PVT v1, [arXiv 2102.12122](https://arxiv.org/abs/2102.12122)) "
            f"image classifier, {source} with `modeling_pvt`'s `{self.script}`. Labels: {labels} "
            f"({len(data.labels)} classes).",
            results=results,
            source=f"`{self.script}` at the end of training",
            run_summary=f"Training took {results['train_runtime']:.1f} s on {results['num_processes']} process(es) "
            f"({results['device']}, mixed precision: {results['mixed_precision']}), {results['completed_steps']} "
            f"optimizer steps over {results['epoch']} epoch(s), global batch size {results['global_batch_size']}; "
            "AdamW without weight decay on biases, norms, position embeddings and class tokens.",
            settings={name: settings[name] for name in RECIPE_SETTINGS},
            command=self.command,
            base_model=model_args.model_name_or_path,
        )
