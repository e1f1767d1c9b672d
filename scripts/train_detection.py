#!/usr/bin/env python
"""Fine-tune a transformers object detector on PvtBackbone with Accelerate, from one CPU process to many GPUs.

    accelerate launch --multi_gpu --num_processes 2 scripts/train_detection.py           # digit canvases, 2 processes
    accelerate launch --mixed_precision bf16 scripts/train_detection.py --train_dir coco/train \
        --validation_dir coco/val --backbone_name_or_path path/to/pvt-small --detector deformable_detr

Detectors: DETR, Conditional DETR, Deformable DETR and RT-DETR (`--detector`), all transformers' own, reading PVT's
feature maps through `AutoBackbone`. The backbone starts from a PVT classification checkpoint
(`--backbone_name_or_path`, folder or Hub id) or from scratch (`--model_size`).

Without a dataset argument it trains on the embedded default: handwritten digits pasted on black canvases, with the
backbone initialised from the digits classifier (`pvt-digits/`, trained in the same processes first when absent).
Data otherwise comes from COCO folders (`--train_dir`/`--validation_dir`: `annotations.json` + `images/`) or a
`datasets` dataset with an `objects` column (`--dataset_name`, the cppe-5 layout). Evaluation is COCO mAP from
torchmetrics (pycocotools backend). Checkpoints and `--resume_from_checkpoint` continue bit-exactly.
"""

from modeling_pvt.tasks.detection import (
    DIGITS_BACKBONE_DIR,
    DetectionArguments,
    DetectionTask,
    complete_recipe,
    ensure_digits_backbone,
)
from modeling_pvt.training.options import TrainingArguments, parse_arguments
from modeling_pvt.training.run import run_training


def parse_args(argv: list[str] | None = None) -> DetectionTask:
    parser, (detection_args, args) = parse_arguments(
        (DetectionArguments, TrainingArguments),
        argv,
        description=__doc__.split("\n\n")[0],
        epilog="Options marked [recipe] default to DIGITS_RECIPE without a dataset and DATASET_RECIPE with one "
        "(modeling_pvt.tasks.detection).",
    )
    complete_recipe(detection_args, args)
    problem = detection_args.check(args)
    if problem:
        parser.error(problem)
    return DetectionTask(detection_args, args)


def main(argv: list[str] | None = None) -> None:
    task = parse_args(argv)
    if task.detection_args.backbone_name_or_path == DIGITS_BACKBONE_DIR:
        ensure_digits_backbone(DIGITS_BACKBONE_DIR)
    run_training(task)


if __name__ == "__main__":
    main()
