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

Training runs through `modeling_pvt.training`, as `scripts/train.py` does: `--checkpointing_steps N|epoch` writes
atomic checkpoints (model, optimizer, scheduler, random generators, position in the epoch) and
`--resume_from_checkpoint PATH|latest` continues bit-exactly; the learning-rate schedule counts optimizer steps.

`--output_dir` receives the model (safetensors), the image processor, `all_results.json` (the schema of
`modeling_pvt.results`: `eval_mean_iou` and the other scores of the final evaluation, per-class IoU, and every
epoch's scores under `history`), a model card (`README.md`) with the measured mean IoU and, with `--with_tracking`,
TensorBoard logs; `--push_to_hub` uploads it. The saved model loads after `import modeling_pvt`, or in plain
transformers with `trust_remote_code=True` (the folder carries the model's code).
"""

import argparse
import math
import shlex
import sys
from pathlib import Path

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed

from modeling_pvt import PVT_PRESETS, PvtBackbone, PvtConfig, training
from modeling_pvt.configuration_pvt_heads import PvtUperNetConfig
from modeling_pvt.data import exit_on_data_error
from modeling_pvt.evaluation import evaluate_segmentation
from modeling_pvt.model_card import render_trained_card
from modeling_pvt.modeling_pvt_heads import UperNetForSemanticSegmentation
from modeling_pvt.results import SEMANTIC_SEGMENTATION
from modeling_pvt.segmentation_data import (
    MASK_COLUMN_CANDIDATES,
    SegmentationData,
    SegmentationDataset,
    build_segmentation_processor,
    class_names,
    collate_train,
    load_segmentation_data,
    make_collate_eval,
    train_transform,
)

logger = get_logger(__name__)

# Options passed to `load_segmentation_data` under their own names.
DATA_OPTIONS = (
    "dataset_name",
    "dataset_config_name",
    "train_dir",
    "validation_dir",
    "train_val_split",
    "image_column_name",
    "label_column_name",
    "max_train_samples",
    "max_eval_samples",
)
CARD_SETTINGS = (
    "image_size",
    "num_train_epochs",
    "per_device_train_batch_size",
    "learning_rate",
    "weight_decay",
    "lr_scheduler_type",
    "poly_power",
    "num_warmup_steps",
    "head_hidden_size",
    "auxiliary_head_channels",
    "drop_path_rate",
    "seed",
)


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

    schedule = parser.add_argument_group("training")
    schedule.add_argument("--output_dir", required=True)
    schedule.add_argument("--image_size", type=int, default=512, help="Training crop and evaluation size (square).")
    schedule.add_argument("--per_device_train_batch_size", type=int, default=4)
    schedule.add_argument("--per_device_eval_batch_size", type=int, default=4)
    schedule.add_argument("--learning_rate", type=float, default=1e-4)
    schedule.add_argument("--weight_decay", type=float, default=1e-4)
    schedule.add_argument("--num_train_epochs", type=int, default=10)
    schedule.add_argument("--max_train_steps", type=int, help="Stop after this many optimiser steps.")
    schedule.add_argument("--gradient_accumulation_steps", type=int, default=1)
    schedule.add_argument("--lr_scheduler_type", default="polynomial", help="A transformers scheduler name.")
    schedule.add_argument("--poly_power", type=float, default=0.9, help="Power of the polynomial schedule.")
    schedule.add_argument("--num_warmup_steps", type=int, default=0)
    schedule.add_argument("--seed", type=int, default=42)
    training.add_checkpoint_arguments(parser)
    training.add_hub_arguments(parser)
    training.add_speed_arguments(parser)
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
    config = PvtUperNetConfig(
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


# ------------------------------------------------------------------------------------------------------ training
def model_card(args: argparse.Namespace, data: SegmentationData, results: dict) -> str:
    backbone = args.backbone_name_or_path or args.model_name_or_path or f"PVT-{args.model_size} (random weights)"
    per_class = ", ".join(
        f"{name} {score:.3f}" if not math.isnan(score) else f"{name} n/a"
        for name, score in results["eval_per_category_iou"].items()
    )
    return render_trained_card(
        repo_id=args.hub_model_id or Path(args.output_dir).resolve().name,
        task=SEMANTIC_SEGMENTATION,
        title=f"UperNet + PVT on {data.name}",
        summary="A semantic-segmentation model: UperNet (transformers) on a Pyramid Vision Transformer backbone "
        f"(PVT v1, [arXiv 2102.12122](https://arxiv.org/abs/2102.12122)) initialised from {backbone}, trained with "
        f"`modeling_pvt`'s `scripts/train_segmentation.py` on {results['num_labels']} classes.",
        results=results,
        source="`scripts/train_segmentation.py` at the end of training",
        run_summary=f"Per-class IoU: {per_class}. Training took {results['train_runtime']:.1f} s on "
        f"{results['num_processes']} process(es), {results['completed_steps']} optimizer steps over "
        f"{results['epoch']} epoch(s).",
        settings={name: getattr(args, name) for name in CARD_SETTINGS},
        command=shlex.join(["scripts/train_segmentation.py", *sys.argv[1:]]),
        base_model=args.backbone_name_or_path or args.model_name_or_path,
        tags=("upernet", "semantic-segmentation"),
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    accelerator = training.setup_training(args)
    set_seed(args.seed)
    # The main process reads (and caches) first; the others reuse its work.
    with accelerator.main_process_first(), exit_on_data_error():
        data = load_segmentation_data(split_seed=args.seed, **{name: getattr(args, name) for name in DATA_OPTIONS})
        labels = class_names(data.train, args.labels_file, args.num_labels, args.reduce_labels, args.ignore_index)
    logger.info(
        f"{len(data.train)} training and {len(data.validation)} validation pairs from {data.name}; "
        f"{len(labels)} classes."
    )
    processor = build_segmentation_processor(args.image_size, args.reduce_labels)
    pairs = {"num_labels": len(labels), "ignore_index": args.ignore_index, "reduce_labels": args.reduce_labels}
    train_dataset = SegmentationDataset(
        data.train,
        processor=processor,
        augment=train_transform(args.image_size, args.ignore_index),
        augmentation_seed=args.seed,
        **pairs,
    )
    eval_dataset = SegmentationDataset(data.validation, processor=processor, **pairs)
    # Incomplete batches are dropped: a batch of one sample breaks the heads' BatchNorm on the 1x1 pooled map.
    train_dataloader = training.build_train_dataloader(
        train_dataset, args.per_device_train_batch_size, args.seed, collate_train, args.dataloader_num_workers
    )
    eval_dataloader = training.build_eval_dataloader(
        eval_dataset,
        args.per_device_eval_batch_size,
        make_collate_eval(args.ignore_index),
        args.dataloader_num_workers,
    )

    model = build_model(args, labels)
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda" and not args.no_sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    training.compile_model(model, args.torch_compile)
    optimizer = training.build_optimizer(
        model.parameters(), accelerator.device, lr=args.learning_rate, weight_decay=args.weight_decay
    )
    model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader
    )
    plan = training.plan_steps(
        len(train_dataloader), args.gradient_accumulation_steps, args.num_train_epochs, args.max_train_steps
    )
    scheduler_options = {"power": args.poly_power} if args.lr_scheduler_type == "polynomial" else {}
    lr_scheduler = training.build_lr_scheduler(
        accelerator,
        optimizer,
        args.lr_scheduler_type,
        args.num_warmup_steps,
        plan.max_train_steps,
        **scheduler_options,
    )
    history = []

    def evaluate(epoch: int, train_loss: float, completed_steps: int) -> dict:
        scores = evaluate_segmentation(accelerator, model, eval_dataloader, labels, args.ignore_index)
        history.append({"epoch": epoch, "train_loss": train_loss, "completed_steps": completed_steps, **scores})
        logger.info(
            f"epoch {epoch}: train loss {train_loss:.4f}, mean IoU {scores['eval_mean_iou']:.4f}, mean accuracy "
            f"{scores['eval_mean_accuracy']:.4f}, pixel accuracy {scores['eval_overall_accuracy']:.4f}"
        )
        if args.with_tracking:
            scalars = {name: value for name, value in scores.items() if isinstance(value, (int, float))}
            accelerator.log({"train_loss": train_loss, **scalars}, step=completed_steps)
        return scores

    training.start_tracking(accelerator, args, "train_segmentation")
    loop = training.TrainingLoop(accelerator, model, optimizer, lr_scheduler, train_dataloader, plan, processor, args)
    global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"{plan.num_train_epochs} epoch(s), {plan.max_train_steps} optimizer steps, global batch {global_batch}."
    )
    outcome = loop.run(lambda batch: model(**batch).loss, evaluate)

    _, scores = training.save_and_evaluate(
        accelerator,
        model,
        processor,
        args.output_dir,
        lambda: evaluate(outcome.epochs - 1, outcome.train_loss, outcome.completed_steps),
    )
    results = {
        **scores,
        **data.results_fields(),
        **outcome.results_fields(),
        "torch_compile_graphs": training.compiled_graph_count(model),
        "train_samples": len(train_dataset),
        "num_labels": len(labels),
        "ignore_index": args.ignore_index,
        "image_size": args.image_size,
        "history": history,
    }
    training.publish_run(accelerator, args, results, model_card(args, data, results), "scripts/train_segmentation.py")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
