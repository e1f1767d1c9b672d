#!/usr/bin/env python
"""Train PVT for image classification with Accelerate, from one CPU process to many GPUs.

The same command runs everywhere; `accelerate launch` decides the processes, devices and precision:

    accelerate launch --multi_gpu --num_processes 2 scripts/train.py                  # digits, 2 CPU/GPU processes
    accelerate launch --mixed_precision bf16 scripts/train.py --train_dir ... --validation_dir ...

Without a dataset argument it trains PVT-tiny on scikit-learn's digits (the embedded default, tuned to reach >= 95%
top-1 in a few minutes on a 2-core CPU). With a dataset it follows the PVT paper's recipe (DeiT's): AdamW at
5e-4 x global batch / 512, weight decay 0.05 (none on biases, norms, position embeddings and class tokens), cosine
schedule with 5 warm-up epochs, label smoothing 0.1, Mixup 0.8 / CutMix 1.0, RandAugment, random erasing 0.25,
stochastic depth 0.1 (tiny, small) or 0.3 (medium, large), gradient clipping at 1.0 for medium and large. Every part
of the recipe is an argument and can be switched off.

Checkpoints (`--checkpointing_steps`) hold the full `accelerate` state (model, optimiser, scheduler, random
generators, step counter) plus the position in the epoch; each is written to a hidden temporary folder and renamed
into place only when complete, and `--resume_from_checkpoint PATH|latest` continues bit-exactly.
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from transformers import HfArgumentParser

from modeling_pvt import PVT_PRESETS, PvtConfig, PvtForImageClassification, PvtImageProcessor, training
from modeling_pvt.data import (
    DataArguments,
    ImageClassificationData,
    ImageClassificationDataset,
    TrainBatchTransform,
    build_processor_transform,
    build_train_transform,
    collate_image_batch,
    exit_on_data_error,
)
from modeling_pvt.evaluation import evaluate_classifier
from modeling_pvt.model_card import render_trained_card
from modeling_pvt.results import IMAGE_CLASSIFICATION

logger = get_logger(__name__)

# The paper's recipe (DeiT's, arXiv 2012.12877, as used by PVT arXiv 2102.12122 Sec. 5.1) for real datasets.
PAPER_RECIPE = {
    "model_size": "tiny",
    "image_size": 224,
    "per_device_train_batch_size": 128,
    "learning_rate": None,  # 5e-4 x global batch / 512, computed once the number of processes is known
    "weight_decay": 0.05,
    "num_train_epochs": 300,
    "warmup_epochs": 5,
    "label_smoothing": 0.1,
    "mixup": 0.8,
    "cutmix": 1.0,
    "rand_augment": "rand-m9-mstd0.5-inc1",
    "random_erasing": 0.25,
    "min_crop_scale": 0.08,
    "horizontal_flip": 0.5,
    "eval_crop_pct": 0.875,
    "num_workers": 8,
}

# The embedded default: PVT-tiny on 8x8 digit scans. Upsampled to 32x32 the digits are 8x8 tokens in stage 1, and
# the paper's heavy augmentation (crops down to 8% of the image, flips, Mixup/CutMix, RandAugment) destroys what
# little there is of a digit and slows convergence far beyond a few minutes, so this recipe keeps only mild crops.
# Batch 64 per process, learning rate 2e-3 and 15 epochs were measured on 2 CPU processes: 98.3-98.9% top-1 over three
# seeds in about 105 s (a global batch of 256 was faster per epoch but needed more epochs for less accuracy).
DIGITS_RECIPE = {
    "model_size": "tiny",
    "image_size": 32,
    "per_device_train_batch_size": 64,
    "learning_rate": 2e-3,
    "weight_decay": 0.05,
    "num_train_epochs": 15,
    "warmup_epochs": 1,
    "label_smoothing": 0.1,
    "mixup": 0.0,
    "cutmix": 0.0,
    "rand_augment": "none",
    "random_erasing": 0.0,
    "min_crop_scale": 0.6,
    "horizontal_flip": 0.0,
    "eval_crop_pct": 1.0,
    "num_workers": 0,
}


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


def parse_args(argv: list[str] | None = None) -> tuple[DataArguments, argparse.Namespace]:
    parser = HfArgumentParser(
        DataArguments,
        description=__doc__.split("\n\n")[0],
        epilog="Arguments marked [recipe] default to the paper's recipe with a dataset, and to a digits recipe "
        "without one (see PAPER_RECIPE / DIGITS_RECIPE in this script).",
    )
    parser.add_argument("--num_workers", type=int, help="Data-loader worker processes per training process [recipe].")

    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", help="Start from a pretrained PVT (folder or Hub id).")
    model.add_argument(
        "--model_size", choices=sorted(PVT_PRESETS), help="Train this paper size from scratch [recipe]."
    )
    model.add_argument(
        "--config_overrides",
        type=json.loads,
        default={},
        help="JSON object of PvtConfig fields to override, e.g. '{\"hidden_sizes\": [32, 64, 160, 256]}'.",
    )
    model.add_argument("--image_size", type=int, help="Training resolution [recipe].")
    model.add_argument("--ignore_mismatched_sizes", action="store_true", help="Allow a new classification head.")
    model.add_argument(
        "--drop_path_rate", type=float, help="Stochastic depth; default 0.1 for tiny/small, 0.3 for medium/large."
    )

    schedule = parser.add_argument_group("training")
    schedule.add_argument("--output_dir", default="pvt-digits", help="Where the model, results and checkpoints go.")
    schedule.add_argument("--per_device_train_batch_size", type=int, help="Batch size per process [recipe].")
    schedule.add_argument("--per_device_eval_batch_size", type=int, default=128)
    schedule.add_argument("--learning_rate", type=float, help="Peak learning rate [recipe; paper: 5e-4 x batch/512].")
    schedule.add_argument("--weight_decay", type=float, help="AdamW weight decay [recipe].")
    schedule.add_argument("--num_train_epochs", type=int, help="Epochs [recipe].")
    schedule.add_argument("--max_train_steps", type=int, help="Optimizer steps; overrides --num_train_epochs.")
    schedule.add_argument("--gradient_accumulation_steps", type=int, default=1)
    schedule.add_argument("--lr_scheduler_type", default="cosine", help="Any transformers scheduler name.")
    schedule.add_argument("--warmup_epochs", type=float, help="Linear warm-up length in epochs [recipe].")
    schedule.add_argument("--label_smoothing", type=float, help="[recipe]")
    schedule.add_argument("--mixup", type=float, help="Mixup alpha, 0 disables [recipe].")
    schedule.add_argument("--cutmix", type=float, help="CutMix alpha, 0 disables [recipe].")
    schedule.add_argument("--rand_augment", help="timm RandAugment spec, or 'none' [recipe].")
    schedule.add_argument("--random_erasing", type=float, help="Random-erasing probability [recipe].")
    schedule.add_argument("--min_crop_scale", type=float, help="Smallest area fraction of random crops [recipe].")
    schedule.add_argument("--horizontal_flip", type=float, help="Horizontal flip probability [recipe].")
    schedule.add_argument("--eval_crop_pct", type=float, help="Centre-crop fraction at evaluation [recipe].")
    schedule.add_argument(
        "--max_grad_norm", type=float, help="Gradient clipping; default 1.0 for medium/large, none otherwise."
    )
    schedule.add_argument("--seed", type=int, default=42)
    training.add_speed_arguments(parser)
    training.add_checkpoint_arguments(parser)
    training.add_hub_arguments(parser)

    data_args, args = parser.parse_args_into_dataclasses(args=argv)
    recipe = DIGITS_RECIPE if data_args.uses_embedded_dataset else PAPER_RECIPE
    for name, value in recipe.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.rand_augment.lower() in ("none", "off", ""):
        args.rand_augment = None
    large = args.model_size in ("medium", "large")
    if args.drop_path_rate is None:
        args.drop_path_rate = 0.3 if large else 0.1
    if args.max_grad_norm is None and large:
        args.max_grad_norm = 1.0
    if (args.mixup > 0 or args.cutmix > 0) and args.per_device_train_batch_size % 2:
        parser.error("Mixup/CutMix needs an even --per_device_train_batch_size (timm mixes each batch with its flip).")
    return data_args, args


def build_model_and_processor(
    args: argparse.Namespace, data: ImageClassificationData
) -> tuple[PvtForImageClassification, PvtImageProcessor]:
    label_kwargs = {"num_labels": len(data.labels), "id2label": data.id2label, "label2id": data.label2id}
    if args.model_name_or_path:
        model = PvtForImageClassification.from_pretrained(
            args.model_name_or_path,
            ignore_mismatched_sizes=args.ignore_mismatched_sizes,
            drop_path_rate=args.drop_path_rate,
            **label_kwargs,
            **args.config_overrides,
        )
    else:
        config = PvtConfig.from_preset(
            args.model_size,
            image_size=args.image_size,
            drop_path_rate=args.drop_path_rate,
            **label_kwargs,
            **args.config_overrides,
        )
        model = PvtForImageClassification(config)
    # The processor describes the evaluation transform, so training's evaluation and users' inference agree.
    image_processor = PvtImageProcessor(
        size={"shortest_edge": int(args.image_size / args.eval_crop_pct)},
        crop_size={"height": args.image_size, "width": args.image_size},
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


def build_criterion(args: argparse.Namespace, num_labels: int):
    """The loss of a batch, with Mixup/CutMix (timm) when the recipe has them: (mix or None, criterion)."""
    if args.mixup > 0 or args.cutmix > 0:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mixup = Mixup(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
            label_smoothing=args.label_smoothing,
            num_classes=num_labels,
        )
        return mixup, SoftTargetCrossEntropy()
    return None, torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)


def model_card(args: argparse.Namespace, data: ImageClassificationData, results: dict) -> str:
    source = f"fine-tuned from `{args.model_name_or_path}`" if args.model_name_or_path else "trained from scratch"
    labels = ", ".join(data.labels[:20]) + (" ..." if len(data.labels) > 20 else "")
    return render_trained_card(
        repo_id=args.hub_model_id or Path(args.output_dir).resolve().name,
        task=IMAGE_CLASSIFICATION,
        title=f"PVT ({args.model_name_or_path or args.model_size}) on {data.name}",
        summary=f"A Pyramid Vision Transformer (PVT v1, [arXiv 2102.12122](https://arxiv.org/abs/2102.12122)) image "
        f"classifier, {source} with `modeling_pvt`'s `scripts/train.py`. Labels: {labels} ({len(data.labels)} "
        "classes).",
        results=results,
        source="`scripts/train.py` at the end of training",
        run_summary=f"Training took {results['train_runtime']:.1f} s on {results['num_processes']} process(es) "
        f"({results['device']}, mixed precision: {results['mixed_precision']}), {results['completed_steps']} "
        f"optimizer steps over {results['epoch']} epoch(s), global batch size {results['global_batch_size']}; "
        "AdamW without weight decay on biases, norms, position embeddings and class tokens.",
        settings={name: getattr(args, name) for name in RECIPE_SETTINGS},
        command=shlex.join(["scripts/train.py", *sys.argv[1:]]),
        base_model=args.model_name_or_path,
    )


def main(argv: list[str] | None = None) -> None:
    start_time = time.perf_counter()
    data_args, args = parse_args(argv)
    accelerator = training.setup_training(args)

    # Same weights on every rank from the start; then per-rank seeds, so Mixup and stochastic depth differ by rank.
    set_seed(args.seed)
    with accelerator.main_process_first(), exit_on_data_error():
        data = data_args.load()
    model, image_processor = build_model_and_processor(args, data)
    training.compile_model(model, args.torch_compile)
    set_seed(args.seed, device_specific=True)

    train_dataset = ImageClassificationDataset(
        data.train,
        data.image_column,
        data.label_column,
        build_train_transform(
            args.image_size,
            rand_augment=args.rand_augment,
            crop_scale=(args.min_crop_scale, 1.0),
            horizontal_flip=args.horizontal_flip,
        ),
        split="train",
        augmentation_seed=args.seed,
    )
    eval_dataset = ImageClassificationDataset(
        data.validation, data.image_column, data.label_column, build_processor_transform(image_processor), "validation"
    )
    train_dataloader = training.build_train_dataloader(
        train_dataset, args.per_device_train_batch_size, args.seed, collate_image_batch, args.num_workers
    )
    eval_dataloader = training.build_eval_dataloader(
        eval_dataset, args.per_device_eval_batch_size, collate_image_batch, args.num_workers
    )
    global_batch_size = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    if args.learning_rate is None:
        args.learning_rate = 5e-4 * global_batch_size / 512
    optimizer = training.build_optimizer(
        parameter_groups(model, args.weight_decay), accelerator.device, lr=args.learning_rate
    )
    model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader
    )
    plan = training.plan_steps(
        len(train_dataloader), args.gradient_accumulation_steps, args.num_train_epochs, args.max_train_steps
    )
    args.max_train_steps, args.num_train_epochs = plan.max_train_steps, plan.num_train_epochs
    lr_scheduler = training.build_lr_scheduler(
        accelerator,
        optimizer,
        args.lr_scheduler_type,
        num_warmup_steps=round(args.warmup_epochs * plan.steps_per_epoch),
        num_training_steps=plan.max_train_steps,
    )
    mixup, criterion = build_criterion(args, len(data.labels))
    batch_transform = TrainBatchTransform(
        image_processor.image_mean, image_processor.image_std, args.random_erasing, accelerator.device
    )

    def compute_loss(batch: dict) -> torch.Tensor:
        pixel_values, targets = batch_transform(batch["pixel_values"]), batch["labels"]
        if mixup is not None:
            pixel_values, targets = mixup(pixel_values, targets)
        return criterion(model(pixel_values=pixel_values).logits.float(), targets)

    def on_epoch_end(epoch: int, train_loss: float, completed_steps: int) -> None:
        scores = evaluate_classifier(accelerator, model, eval_dataloader)
        logger.info(
            f"epoch {epoch}: train loss {train_loss:.4f}, top-1 {scores['eval_accuracy']:.4f}, "
            f"top-5 {scores['eval_top5_accuracy']:.4f}"
        )
        if args.with_tracking:
            learning_rate = lr_scheduler.get_last_lr()[0]
            accelerator.log(
                {"train_loss": train_loss, "learning_rate": learning_rate, **scores, "epoch": epoch},
                step=completed_steps,
            )

    training.start_tracking(accelerator, args, "pvt_image_classification")
    loop = training.TrainingLoop(
        accelerator, model, optimizer, lr_scheduler, train_dataloader, plan, image_processor, args, args.max_grad_norm
    )
    logger.info(
        f"{len(train_dataset)} training / {len(eval_dataset)} validation images of {data.name}, "
        f"{len(data.labels)} classes; {accelerator.num_processes} process(es), global batch {global_batch_size}, "
        f"{plan.max_train_steps} steps over {plan.num_train_epochs} epochs, learning rate {args.learning_rate:g}"
    )
    outcome = loop.run(compute_loss, on_epoch_end)

    digests, scores = training.save_and_evaluate(
        accelerator,
        model,
        image_processor,
        args.output_dir,
        lambda: evaluate_classifier(accelerator, model, eval_dataloader),
    )
    logger.info(f"final: top-1 {scores['eval_accuracy']:.4f}, top-5 {scores['eval_top5_accuracy']:.4f}")
    results = {
        **scores,
        **data.results_fields(),
        **outcome.results_fields(),
        "train_samples": len(train_dataset),
        "torch_compile_graphs": training.compiled_graph_count(model),
        "total_runtime": time.perf_counter() - start_time,
        "global_batch_size": global_batch_size,
        "device": str(accelerator.device.type),
        "mixed_precision": accelerator.mixed_precision,
        "skipped_unreadable_images": data.skipped_images,
        "weights_sha256_per_rank": digests,
    }
    if args.with_tracking:
        accelerator.log({**scores, "train_loss": outcome.train_loss}, step=outcome.completed_steps)
    accelerator.print(
        json.dumps({key: results[key] for key in ("eval_accuracy", "eval_top5_accuracy", "train_runtime")})
    )
    training.publish_run(accelerator, args, results, model_card(args, data, results), "scripts/train.py")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # closes the trackers and the process group: nothing collective after this


if __name__ == "__main__":
    main()
