#!/usr/bin/env python
"""Train PVT for image classification with Accelerate, from one CPU process to many GPUs.

The same command runs everywhere; `accelerate launch` decides the processes, devices and precision:

    accelerate launch --multi_gpu --num_processes 2 scripts/train.py                  # digits, 2 CPU/GPU processes
    accelerate launch --mixed_precision bf16 scripts/train.py --train_dir ... --validation_dir ...

Without a dataset argument it trains PVT-tiny on scikit-learn's digits (the embedded default). With a dataset it
follows the PVT paper's recipe (see `modeling_pvt.tasks.classification`); every part of a recipe is an option.
Checkpoints (`--checkpointing_steps`) hold the full training state and `--resume_from_checkpoint PATH|latest`
continues bit-exactly.
"""

from modeling_pvt.data.classification import DataArguments
from modeling_pvt.tasks.classification import ClassificationArguments, ClassificationTask, complete_recipe
from modeling_pvt.training.options import TrainingArguments, parse_arguments
from modeling_pvt.training.run import run_training


def parse_args(argv: list[str] | None = None) -> ClassificationTask:
    parser, (data_args, model_args, args) = parse_arguments(
        (DataArguments, ClassificationArguments, TrainingArguments),
        argv,
        description=__doc__.split("\n\n")[0],
        epilog="Options marked [recipe] default to the paper's recipe with a dataset, and to the digits recipe "
        "without one (PAPER_RECIPE / DIGITS_RECIPE in modeling_pvt.tasks.classification).",
    )
    complete_recipe(data_args, model_args, args)
    if (model_args.mixup > 0 or model_args.cutmix > 0) and args.per_device_train_batch_size % 2:
        parser.error("Mixup/CutMix needs an even --per_device_train_batch_size (timm mixes each batch with its flip).")
    return ClassificationTask(data_args, model_args, args)


def main(argv: list[str] | None = None) -> None:
    run_training(parse_args(argv))


if __name__ == "__main__":
    main()
