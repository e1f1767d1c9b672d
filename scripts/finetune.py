#!/usr/bin/env python
"""Fine-tune a pretrained PVT on your own images with the transformers `Trainer`.

Arguments are those of transformers' `run_image_classification.py` (`ModelArguments`, `DataArguments` and every
`TrainingArguments` field), for example:

    python scripts/finetune.py --model_name_or_path path/or/hub-id --ignore_mismatched_sizes \\
        --train_dir my_images/train --validation_dir my_images/val --output_dir pvt-finetuned \\
        --do_train --do_eval --num_train_epochs 10 --learning_rate 5e-5 --per_device_train_batch_size 32

`--ignore_mismatched_sizes` replaces the classification head when the new dataset has other labels. Training and
evaluation transforms come from the model's image processor (random resized crop and flip at its crop size for
training; its own resize, centre crop and normalisation for evaluation). Without a dataset argument it fine-tunes on
scikit-learn's digits (the embedded default); without `--model_name_or_path` it starts from a freshly initialised
PVT of `--model_size`. Multi-GPU and mixed precision come from `accelerate launch` / `torchrun` and `--bf16`, as
for any `Trainer` script.
"""

import logging
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import transformers
from torchvision import transforms
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)
from transformers.image_utils import PILImageResampling
from transformers.trainer_utils import get_last_checkpoint

from modeling_pvt import PVT_PRESETS, PvtConfig, PvtForImageClassification, PvtImageProcessor
from modeling_pvt.data.classification import (
    DataArguments,
    ImageClassificationData,
    ImageClassificationDataset,
    build_processor_transform,
    collate_image_batch,
)
from modeling_pvt.hub.model_card import render_trained_card
from modeling_pvt.hub.results import IMAGE_CLASSIFICATION, RESULTS_FILE_NAME, write_results
from modeling_pvt.metrics import load_metric
from modeling_pvt.runtime import configure_allocator
from modeling_pvt.training.checkpoints import INTERRUPTED_MODEL_DIR_NAME
from modeling_pvt.training.launch import stop_all_on_user_error, trainer_launch_arguments
from modeling_pvt.training.options import HelpFormatter, loading_pretrained, parse_config_overrides

logger = logging.getLogger(__name__)

# Used only for the embedded default (no dataset argument); anything on the command line overrides them.
DIGITS_TRAINING_DEFAULTS = [
    "--output_dir", "pvt-digits-finetuned",
    "--do_train", "--do_eval",
    "--num_train_epochs", "15",
    "--learning_rate", "2e-3",
    "--warmup_steps", "0.07",  # a fraction of the steps when below 1
    "--weight_decay", "0.05",
    "--lr_scheduler_type", "cosine",
    "--per_device_train_batch_size", "64",
    "--per_device_eval_batch_size", "128",
    "--eval_strategy", "epoch",
    "--save_strategy", "no",
    "--logging_strategy", "epoch",
    "--seed", "42",
]  # fmt: skip
CARD_SETTINGS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "weight_decay",
    "lr_scheduler_type",
    "warmup_steps",
    "seed",
)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Pretrained PVT: a local folder or a Hub id. Without it: a new PVT of --model_size."},
    )
    model_size: str = field(
        default="tiny", metadata={"help": f"Size built from scratch without --model_name_or_path: {list(PVT_PRESETS)}"}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "JSON object of PvtConfig fields to override (models built from scratch)."}
    )
    image_size: int | None = field(
        default=None,
        metadata={"help": "Resolution for a model built from scratch (default 224; 32 for the digits default)."},
    )
    image_processor_name: str | None = field(
        default=None, metadata={"help": "Image processor to use; default: the model's own."}
    )
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Replace the classification head when the number of labels differs."}
    )
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model on the Hub."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models."})


@dataclass
class AugmentationArguments:
    horizontal_flip: bool | None = field(
        default=None, metadata={"help": "Random horizontal flips in training (default: on, off for digits)."}
    )
    min_crop_scale: float | None = field(
        default=None,
        metadata={"help": "Smallest area fraction of the random resized crop (default 0.08; 0.6 for digits)."},
    )


class PvtTrainer(Trainer):
    """A `Trainer` whose model card is `modeling_pvt`'s (written by `main` before saving or pushing)."""

    model_card: str | None = None

    def create_model_card(self, **kwargs) -> None:
        if self.model_card is not None and self.is_world_process_zero():
            (Path(self.args.output_dir) / "README.md").write_text(self.model_card)


def parse_arguments(
    argv: list[str] | None,
) -> tuple[ModelArguments, DataArguments, AugmentationArguments, TrainingArguments]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, AugmentationArguments, TrainingArguments), formatter_class=HelpFormatter
    )
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=str(Path(argv[0]).resolve()))
    data_probe, *_ = HfArgumentParser(DataArguments, add_help=False).parse_known_args(argv)
    if DataArguments(**vars(data_probe)).uses_embedded_dataset:
        argv = DIGITS_TRAINING_DEFAULTS + argv  # later occurrences win, so the user's arguments override these
    return parser.parse_args_into_dataclasses(args=trainer_launch_arguments() + argv)


def build_model_and_processor(model_args: ModelArguments, data_args: DataArguments, data: ImageClassificationData):
    label_kwargs = {"num_labels": len(data.labels), "id2label": data.id2label, "label2id": data.label2id}
    hub_kwargs = {"cache_dir": data_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token}
    if model_args.model_name_or_path:
        with loading_pretrained("--model_name_or_path", model_args.model_name_or_path):
            model = AutoModelForImageClassification.from_pretrained(
                model_args.model_name_or_path,
                ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
                **label_kwargs,
                **hub_kwargs,
            )
    else:
        logger.warning(f"No --model_name_or_path: training a new PVT-{model_args.model_size} from scratch.")
        image_size = model_args.image_size or (32 if data_args.uses_embedded_dataset else 224)
        overrides = parse_config_overrides(model_args.config_overrides, PvtConfig)
        config = PvtConfig.from_preset(model_args.model_size, image_size=image_size, **label_kwargs, **overrides)
        model = PvtForImageClassification(config)

    processor_source = model_args.image_processor_name or model_args.model_name_or_path
    image_processor = None
    if processor_source:
        try:
            image_processor = AutoImageProcessor.from_pretrained(processor_source, **hub_kwargs)
        except OSError:
            logger.warning(f"{processor_source} has no image processor; using PVT's default at the model's size.")
    if image_processor is None:
        height, width = model.config.image_hw if hasattr(model.config, "image_hw") else (224, 224)
        if data_args.uses_embedded_dataset and not model_args.model_name_or_path:
            resize = {"shortest_edge": min(height, width)}  # digits are already centred: no crop margin
        else:
            resize = {"shortest_edge": int(min(height, width) / 0.875)}
        image_processor = PvtImageProcessor(size=resize, crop_size={"height": height, "width": width})
    return model, image_processor


def train_transform_from_processor(image_processor, horizontal_flip: bool, min_crop_scale: float):
    """`run_image_classification.py`'s training transform at the processor's input size and normalisation."""
    size = image_processor.crop_size if getattr(image_processor, "do_center_crop", False) else image_processor.size
    size = dict(size)
    if "height" in size:
        output_size = (size["height"], size["width"])
    else:
        output_size = size["shortest_edge"]
    interpolation = transforms.InterpolationMode.BICUBIC
    if getattr(image_processor, "resample", None) == PILImageResampling.BILINEAR:
        interpolation = transforms.InterpolationMode.BILINEAR
    steps = [transforms.RandomResizedCrop(output_size, scale=(min_crop_scale, 1.0), interpolation=interpolation)]
    if horizontal_flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(image_processor.image_mean, image_processor.image_std)]
    return transforms.Compose(steps)


def write_model_card(
    trainer: PvtTrainer,
    model_args: ModelArguments,
    augmentation: dict,
    data: ImageClassificationData,
    results: dict | None,
) -> None:
    training_args = trainer.args
    source = model_args.model_name_or_path or f"a new PVT-{model_args.model_size}"
    settings = {name: getattr(training_args, name) for name in CARD_SETTINGS}
    trainer.model_card = render_trained_card(
        repo_id=training_args.hub_model_id or Path(training_args.output_dir).resolve().name,
        task=IMAGE_CLASSIFICATION,
        title=f"PVT fine-tuned on {data.name}",
        summary=f"A Pyramid Vision Transformer (PVT v1, [arXiv 2102.12122](https://arxiv.org/abs/2102.12122)) image "
        f"classifier: {source} fine-tuned with `modeling_pvt`'s `scripts/finetune.py` (the transformers `Trainer`) "
        f"on {len(data.labels)} classes.",
        results=results,
        source="`scripts/finetune.py` after training",
        settings={**settings, **augmentation},
        command=shlex.join(["scripts/finetune.py", *sys.argv[1:]]),
        base_model=model_args.model_name_or_path,
    )
    trainer.create_model_card()


def setup_logging(training_args: TrainingArguments) -> None:
    """transformers' example-script logging: to stdout, at the level of this process."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def train_and_evaluate(trainer: Trainer, training_args: TrainingArguments, checkpoint: str | None, eval_samples: int):
    """Train (saving the weights so far if training fails, and the model before evaluating it), then evaluate;
    the metrics of both."""
    results: dict = {}
    output_dir = Path(training_args.output_dir)
    if training_args.do_train:
        try:
            train_result = trainer.train(resume_from_checkpoint=checkpoint)
        except BaseException:
            if trainer.state.global_step > 0:
                saved = output_dir / INTERRUPTED_MODEL_DIR_NAME
                trainer.save_model(str(saved))
                logger.error(f"Training failed at step {trainer.state.global_step}; weights so far are in {saved}.")
            raise
        # Save before evaluating: a failing evaluation must not lose the trained model.
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_state()
        results.update(train_result.metrics)
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = eval_samples
        trainer.log_metrics("eval", metrics)
        results.update(metrics)
    return results


def main(argv: list[str] | None = None) -> None:
    configure_allocator()  # keep big freed blocks in the process instead of re-faulting them on every step
    model_args, data_args, augmentation_args, training_args = parse_arguments(argv)
    setup_logging(training_args)
    # Trainer passes a dict of tensors straight to the model; our dataset already yields exactly its inputs.
    training_args.remove_unused_columns = False
    training_args.label_names = ["labels"]
    transformers.set_seed(training_args.seed)

    output_dir = Path(training_args.output_dir)
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint == "latest":
        checkpoint = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if checkpoint is None:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no checkpoint-* folder in {output_dir}.")

    data = stop_all_on_user_error(data_args.load, main_process_first=True)
    model, image_processor = stop_all_on_user_error(lambda: build_model_and_processor(model_args, data_args, data))
    # Digits: a mirrored digit is not the same digit, and an 8x8 digit survives only mild crops.
    digits = data_args.uses_embedded_dataset
    horizontal_flip, min_crop_scale = augmentation_args.horizontal_flip, augmentation_args.min_crop_scale
    augmentation = {
        "horizontal_flip": not digits if horizontal_flip is None else horizontal_flip,
        "min_crop_scale": (0.6 if digits else 0.08) if min_crop_scale is None else min_crop_scale,
    }
    train_dataset = ImageClassificationDataset(
        data.train,
        data.image_column,
        data.label_column,
        train_transform_from_processor(image_processor, **augmentation),
        split="train",
    )
    eval_dataset = ImageClassificationDataset(
        data.validation,
        data.image_column,
        data.label_column,
        build_processor_transform(image_processor),
        split="validation",
    )
    metric = load_metric("accuracy", keep_in_memory=True)

    def compute_metrics(prediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        scores = metric.compute(predictions=np.asarray(logits, dtype=np.float32), references=prediction.label_ids)
        return {"accuracy": scores["accuracy"], "top5_accuracy": scores["top5_accuracy"]}

    trainer = PvtTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        compute_metrics=compute_metrics,
        processing_class=image_processor,
        data_collator=collate_image_batch,
    )

    results = train_and_evaluate(trainer, training_args, checkpoint, len(eval_dataset))
    results.update(data.results_fields())
    if trainer.is_world_process_zero():
        write_results(output_dir / RESULTS_FILE_NAME, results)
    write_model_card(trainer, model_args, augmentation, data, results if training_args.do_eval else None)
    if training_args.push_to_hub:
        trainer.push_to_hub()


if __name__ == "__main__":
    main()
