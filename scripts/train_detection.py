#!/usr/bin/env python
"""Fine-tune a transformers object detector on PvtBackbone with Accelerate, from one CPU process to many GPUs.

    accelerate launch --multi_gpu --num_processes 2 scripts/train_detection.py           # digit canvases, 2 processes
    accelerate launch --mixed_precision bf16 scripts/train_detection.py --train_dir coco/train \
        --validation_dir coco/val --backbone_name_or_path path/to/pvt-small --detector deformable_detr

Detectors: DETR, Conditional DETR, Deformable DETR (two-stage, box refinement) and RT-DETR (`--detector`), all
transformers' own, reading PVT's feature maps through `AutoBackbone`. The backbone starts from a PVT classification
checkpoint (`--backbone_name_or_path`, folder or Hub id) or from scratch (`--model_size`).

Without a dataset argument it trains on the embedded default: handwritten digits (scikit-learn's) pasted on black
canvases, several per canvas at random positions and sizes, with the backbone initialised from the digits classifier
`scripts/train.py` makes (`pvt-digits/`, trained on the fly when absent) — pretrain, then detect. The held-out
canvases are drawn only from the digits that classifier held out. Data otherwise comes from COCO folders
(`--train_dir`/`--validation_dir`: `annotations.json` + `images/`) or a `datasets` dataset with an `objects` column
(`--dataset_name`, the cppe-5 layout). Evaluation is COCO mAP from torchmetrics (pycocotools backend).

Checkpoints (`--checkpointing_steps`) and `--resume_from_checkpoint` continue bit-exactly (modeling_pvt.training).
"""

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, set_seed

from modeling_pvt import PVT_PRESETS, PvtBackbone, PvtConfig
from modeling_pvt.data import DataError
from modeling_pvt.detection.data import (
    DetectionCollator,
    DetectionData,
    DetectionDataset,
    build_detection_augmentation,
    load_detection_data,
)
from modeling_pvt.detection.digits import (
    DIGIT_CATEGORIES,
    DIGITS_DETECTION_DATASET_NAME,
    CanvasSpec,
    DigitCanvases,
    load_digit_scans,
)
from modeling_pvt.detection.evaluation import OBJECT_DETECTION, evaluate_detector
from modeling_pvt.detection.modeling import (
    DETECTORS,
    build_detector,
    build_detector_config,
    build_image_processor,
    find_pvt_backbone,
    freeze_backbone_stages,
    parameter_groups,
)
from modeling_pvt.model_card import render_trained_card
from modeling_pvt.results import dataset_fields
from modeling_pvt.training import (
    TrainingLoop,
    add_checkpoint_arguments,
    add_hub_arguments,
    add_speed_arguments,
    build_eval_dataloader,
    build_lr_scheduler,
    build_optimizer,
    build_train_dataloader,
    compile_model,
    compiled_graph_count,
    plan_steps,
    publish_run,
    save_and_evaluate,
    setup_accelerator,
    start_tracking,
)

logger = get_logger(__name__)

DIGITS_BACKBONE_DIR = "pvt-digits"  # scripts/train.py's default output folder

# The embedded default, chosen by the convergence study in benchmarks/detection_digits.json (2 CPU processes).
DIGITS_RECIPE = {
    "detector": "deformable_detr",
    "image_size": 96,
    "per_device_train_batch_size": 8,
    "learning_rate": 5e-4,
    "backbone_learning_rate": 1e-4,
    "num_train_epochs": 8,
    "warmup_steps": 30,
    "freeze_backbone_stages": 2,
    "horizontal_flip": 0.0,  # a flipped digit is not a digit
    "photometric": False,
    "num_workers": 0,
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
    "deformable_detr": dict(
        DIGITS_DETR_FAMILY,
        two_stage=True,
        with_box_refine=True,
        two_stage_num_proposals=30,
        auxiliary_loss=True,
    ),
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
# With a dataset: the transformers detectors' own defaults (DETR/Deformable DETR papers): AdamW 1e-4, backbone 1e-5,
# weight decay 1e-4, gradient clipping 0.1, flips and photometric distortion; resize per the detector's processor.
DATASET_RECIPE = {
    "detector": "deformable_detr",
    "image_size": None,
    "per_device_train_batch_size": 2,
    "learning_rate": 1e-4,
    "backbone_learning_rate": 1e-5,
    "num_train_epochs": 50,
    "warmup_steps": 0,
    "freeze_backbone_stages": 0,
    "horizontal_flip": 0.5,
    "photometric": True,
    "num_workers": 4,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Arguments marked [recipe] default to DIGITS_RECIPE without a dataset and DATASET_RECIPE with one.",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--train_dir", help="COCO folder for training: annotations.json and images/.")
    data.add_argument("--validation_dir", help="COCO folder for validation (same categories, by name).")
    data.add_argument("--dataset_name", help="A datasets dataset (Hub id or save_to_disk folder) with 'objects'.")
    data.add_argument("--dataset_config_name")
    data.add_argument("--validation_split_name", help="Held-out split (default: validation, else test).")
    data.add_argument("--image_column_name", default="image")
    data.add_argument("--train_val_split", type=float, default=0.15, help="Held out of train without validation.")
    data.add_argument("--image_check", choices=["verify", "decode", "none"], default="verify")
    data.add_argument("--preprocessing_num_workers", type=int)
    data.add_argument("--max_train_samples", type=int, help="Use only the first N training images.")
    data.add_argument("--max_eval_samples", type=int, help="Use only the first N validation images.")
    data.add_argument("--num_workers", type=int, help="Data-loader workers per process [recipe].")
    data.add_argument("--cache_dir")
    digits = parser.add_argument_group("digit canvases (the default data)")
    digits.add_argument("--num_train_canvases", type=int, default=2000, help="Canvases per epoch (new every epoch).")
    digits.add_argument("--num_eval_canvases", type=int, default=300, help="Fixed held-out canvases.")
    digits.add_argument("--min_digits", type=int, default=1)
    digits.add_argument("--max_digits", type=int, default=4)
    digits.add_argument("--min_digit_size", type=int, help="Smallest digit cell in pixels (default: 3/16 canvas).")
    digits.add_argument("--max_digit_size", type=int, help="Largest digit cell in pixels (default: 3/8 canvas).")

    model = parser.add_argument_group("model")
    model.add_argument("--detector", choices=sorted(DETECTORS), help="[recipe]")
    model.add_argument(
        "--backbone_name_or_path",
        help=f"PVT checkpoint (classification or backbone; folder or Hub id) to start the backbone from; default "
        f"for the digits: {DIGITS_BACKBONE_DIR}/ (scripts/train.py's output, trained first when absent).",
    )
    model.add_argument("--model_size", choices=sorted(PVT_PRESETS), help="Random backbone of this paper size.")
    model.add_argument(
        "--config_overrides",
        type=json.loads,
        default={},
        help='JSON object of detector config fields, e.g. \'{"num_queries": 100, "d_model": 256}\'.',
    )
    model.add_argument(
        "--image_size",
        type=int,
        help="Square input size; default: the canvas size for digits, else the detector processor's resize "
        "(800/1333 shortest/longest edge for the DETR family, 640x640 for RT-DETR) [recipe].",
    )
    model.add_argument("--freeze_backbone_stages", type=int, help="Freeze the first N PVT stages [recipe].")

    training = parser.add_argument_group("training")
    training.add_argument("--output_dir", default="pvt-detection-digits")
    training.add_argument("--per_device_train_batch_size", type=int, help="[recipe]")
    training.add_argument("--per_device_eval_batch_size", type=int, default=16)
    training.add_argument("--learning_rate", type=float, help="Peak rate of the detection heads [recipe].")
    training.add_argument("--backbone_learning_rate", type=float, help="Peak rate of the backbone [recipe].")
    training.add_argument("--weight_decay", type=float, default=1e-4)
    training.add_argument("--num_train_epochs", type=int, help="[recipe]")
    training.add_argument("--max_train_steps", type=int, help="Optimizer steps; overrides --num_train_epochs.")
    training.add_argument("--gradient_accumulation_steps", type=int, default=1)
    training.add_argument("--lr_scheduler_type", default="cosine")
    training.add_argument("--warmup_steps", type=int, help="[recipe]")
    training.add_argument("--max_grad_norm", type=float, default=0.1, help="Gradient clipping (DETR's 0.1).")
    training.add_argument("--horizontal_flip", type=float, help="Flip probability [recipe].")
    training.add_argument("--photometric", type=lambda value: value.lower() in ("1", "true", "yes"), help="[recipe]")
    training.add_argument("--seed", type=int, default=42)
    add_speed_arguments(parser)
    add_checkpoint_arguments(parser)
    add_hub_arguments(parser)

    args = parser.parse_args(argv)
    args.uses_embedded_dataset = args.dataset_name is None and args.train_dir is None
    if args.validation_dir is not None and args.train_dir is None:
        parser.error("--validation_dir needs --train_dir.")
    if args.dataset_name is not None and args.train_dir is not None:
        parser.error("Pass either --dataset_name or --train_dir, not both.")
    if args.backbone_name_or_path is not None and args.model_size is not None:
        parser.error("Pass either --backbone_name_or_path (pretrained) or --model_size (from scratch), not both.")
    recipe = DIGITS_RECIPE if args.uses_embedded_dataset else DATASET_RECIPE
    for name, value in recipe.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.uses_embedded_dataset and args.model_size is None and args.backbone_name_or_path is None:
        args.backbone_name_or_path = DIGITS_BACKBONE_DIR
    if not args.uses_embedded_dataset and args.model_size is None and args.backbone_name_or_path is None:
        parser.error("Pass --backbone_name_or_path (a PVT checkpoint) or --model_size (random backbone).")
    if args.torch_compile and args.image_size is None and args.detector != "rt_detr":
        parser.error(
            "--torch_compile compiles the backbone for one input size: pass --image_size (the DETR family's default "
            "resize, 800/1333 pixels on the shortest/longest edge, gives images of different shapes)."
        )
    if args.uses_embedded_dataset and args.config_overrides == {}:
        args.config_overrides = dict(DIGITS_DETECTOR_SETTINGS[args.detector])
    return args


# ------------------------------------------------------------------------------------------------------- backbone
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_digits_backbone(accelerator, folder: Path) -> None:
    """Run `scripts/train.py` (the digits classifier) into `folder` with as many processes as this run, once; every
    rank learns whether it worked, so a failure stops all of them instead of leaving some waiting."""
    failure = [None]
    if accelerator.is_main_process:
        logger.info(f"No digits classifier in {folder}: training one with scripts/train.py first (about 2 minutes).")
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            str(accelerator.num_processes),
        ]
        if accelerator.num_processes > 1:
            command += ["--multi_gpu", "--main_process_port", str(_free_port())]
        command += [str(Path(__file__).resolve().parent / "train.py"), "--output_dir", str(folder)]
        # The child launch must not inherit this launch's process-group variables.
        launch_variables = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        environment = {
            key: value
            for key, value in os.environ.items()
            if key not in launch_variables and not key.startswith(("ACCELERATE_", "TORCHELASTIC_", "GROUP_"))
        }
        if subprocess.run(command, env=environment).returncode != 0:
            failure = [f"Training the digits backbone failed (command: {shlex.join(command)}); see its output above."]
    broadcast_object_list(failure)
    if failure[0] is not None:
        raise SystemExit(failure[0])


def build_model(args: argparse.Namespace, data: DetectionData):
    pretrained = None
    if args.backbone_name_or_path is not None:
        pretrained = PvtBackbone.from_pretrained(args.backbone_name_or_path)
        backbone_config = pretrained.config
    else:
        backbone_config = PvtConfig.from_preset(args.model_size)
    config = build_detector_config(args.detector, backbone_config, data.id2label, **args.config_overrides)
    model = build_detector(args.detector, config, pretrained)
    if args.freeze_backbone_stages:
        freeze_backbone_stages(model, args.freeze_backbone_stages)
    size = {"height": args.image_size, "width": args.image_size} if args.image_size else None
    processor_kwargs = {} if size is None else {"size": size}
    if size is None and args.detector == "rt_detr":
        processor_kwargs["size"] = {"height": 640, "width": 640}
    elif size is None:
        processor_kwargs["size"] = {"shortest_edge": 800, "longest_edge": 1333}
    image_processor = build_image_processor(args.detector, **processor_kwargs)
    return model, image_processor


# ----------------------------------------------------------------------------------------------------------- data
def load_data(args: argparse.Namespace) -> DetectionData:
    if args.uses_embedded_dataset:
        (train_scans, train_labels), (held_out_scans, held_out_labels) = load_digit_scans()
        spec = CanvasSpec(
            canvas_size=args.image_size,
            min_digits=args.min_digits,
            max_digits=args.max_digits,
            min_digit_size=args.min_digit_size or args.image_size * 3 // 16,
            max_digit_size=args.max_digit_size or args.image_size * 3 // 8,
        )
        return DetectionData(
            train=DigitCanvases(train_scans, train_labels, args.num_train_canvases, spec, args.seed, fixed=False),
            validation=DigitCanvases(held_out_scans, held_out_labels, args.num_eval_canvases, spec, 0, fixed=True),
            categories=DIGIT_CATEGORIES,
            name=DIGITS_DETECTION_DATASET_NAME,
            validation_split_name=f"{args.num_eval_canvases} canvases of the held-out digits",
        )
    data = load_detection_data(
        train_dir=args.train_dir,
        validation_dir=args.validation_dir,
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        image_column_name=args.image_column_name,
        validation_split_name=args.validation_split_name,
        train_val_split=args.train_val_split,
        cache_dir=args.cache_dir,
        check_images=args.image_check,
        num_proc=args.preprocessing_num_workers,
    )
    for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        source = getattr(data, split)
        if limit is not None:
            source.dataset = source.dataset.select(range(min(limit, len(source.dataset))))
    return data


# ------------------------------------------------------------------------------------------------------ model card
def model_card(output_dir: Path, args: argparse.Namespace, data: DetectionData, results: dict) -> str:
    backbone = args.backbone_name_or_path or f"a randomly initialised PVT-{args.model_size}"
    summary = (
        f"A {args.detector} object detector (transformers' own) on a Pyramid Vision Transformer backbone (PVT v1, "
        f"[arXiv 2102.12122](https://arxiv.org/abs/2102.12122)), fine-tuned from {backbone} with `modeling_pvt`'s "
        f"`scripts/train_detection.py`. Categories: {', '.join(data.categories[:20])}"
        f"{' ...' if len(data.categories) > 20 else ''} ({len(data.categories)}).\n\n"
        "**Loading needs the PVT code**: pass `trust_remote_code=True` (the folder carries the code), or "
        "`import modeling_pvt` first (`pip install modeling-pvt`). Stock transformers has no PVT v1 backbone; without "
        "either, it stops and asks for `trust_remote_code=True`."
    )
    if args.uses_embedded_dataset:
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
        f"{results['num_processes']} process(es) ({results['device']}, mixed precision: {results['mixed_precision']}),"
        f" {results['completed_steps']} optimizer steps, global batch {results['global_batch_size']}.\n\n"
        "| seconds since start | steps | mAP@50 | mAP |\n|---|---|---|---|\n" + history
    )
    return render_trained_card(
        repo_id=args.hub_model_id or output_dir.resolve().name,
        task=OBJECT_DETECTION,
        title=f"PVT + {args.detector} on {data.name}",
        summary=summary,
        results=results,
        source="`scripts/train_detection.py` at the end of training (COCO mAP, torchmetrics with pycocotools)",
        run_summary=run_summary,
        settings={
            name: getattr(args, name)
            for name in (
                "detector",
                "image_size",
                "per_device_train_batch_size",
                "learning_rate",
                "backbone_learning_rate",
                "weight_decay",
                "num_train_epochs",
                "warmup_steps",
                "lr_scheduler_type",
                "max_grad_norm",
                "freeze_backbone_stages",
                "horizontal_flip",
                "photometric",
                "config_overrides",
                "seed",
            )
        },
        command=shlex.join(["scripts/train_detection.py", *sys.argv[1:]]),
        base_model=None
        if args.backbone_name_or_path is None or Path(args.backbone_name_or_path).is_dir()
        else args.backbone_name_or_path,
        tags=("object-detection", args.detector),
    )


# ------------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    start_time = time.perf_counter()
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    accelerator = setup_accelerator(
        output_dir,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None,
        # Some heads take part in the loss only on some configurations (e.g. per-layer class heads without the
        # auxiliary loss, denoising parts of RT-DETR): DDP must not wait for their gradients.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    backbone_dir = Path(args.backbone_name_or_path) if args.backbone_name_or_path == DIGITS_BACKBONE_DIR else None
    if backbone_dir is not None and not (backbone_dir / "config.json").is_file():
        train_digits_backbone(accelerator, backbone_dir)

    set_seed(args.seed)  # same initial weights on every rank
    with accelerator.main_process_first():
        try:
            data = load_data(args)
        except DataError as error:  # a message for the user, not a traceback
            raise SystemExit(f"Data error: {error}") from error
    model, image_processor = build_model(args, data)
    # The backbone only: the detectors match predictions to objects (scipy's Hungarian algorithm) inside their
    # forward, which no graph can hold. The backbone is one graph, for one input size.
    compile_model(find_pvt_backbone(model), args.torch_compile)
    set_seed(args.seed, device_specific=True)

    augmentation = None
    if args.horizontal_flip > 0 or args.photometric:
        augmentation = build_detection_augmentation(args.horizontal_flip, args.photometric)
    train_dataset = DetectionDataset(data.train, augmentation, augmentation_seed=args.seed)
    eval_dataset = DetectionDataset(data.validation)
    collator = DetectionCollator(image_processor)
    train_dataloader = build_train_dataloader(
        train_dataset, args.per_device_train_batch_size, args.seed, collator, args.num_workers
    )
    eval_dataloader = build_eval_dataloader(eval_dataset, args.per_device_eval_batch_size, collator, args.num_workers)
    global_batch_size = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    optimizer = build_optimizer(
        parameter_groups(model, args.learning_rate, args.backbone_learning_rate, args.weight_decay), accelerator.device
    )
    model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader
    )
    plan = plan_steps(
        len(train_dataloader), args.gradient_accumulation_steps, args.num_train_epochs, args.max_train_steps
    )
    args.max_train_steps, args.num_train_epochs = plan.max_train_steps, plan.num_train_epochs
    lr_scheduler = build_lr_scheduler(
        accelerator,
        optimizer,
        args.lr_scheduler_type,
        num_warmup_steps=args.warmup_steps,
        num_training_steps=plan.max_train_steps,
    )

    def compute_loss(batch: dict) -> torch.Tensor:
        return model(
            pixel_values=batch["pixel_values"], pixel_mask=batch.get("pixel_mask"), labels=batch["labels"]
        ).loss

    history = []

    def record(scores: dict, completed_steps: int) -> None:
        history.append(
            {
                "elapsed_s": round(time.perf_counter() - start_time, 1),
                "completed_steps": completed_steps,
                **{key: scores[key] for key in ("eval_map", "eval_map_50", "eval_map_75")},
            }
        )

    def on_epoch_end(epoch: int, train_loss: float, completed_steps: int) -> None:
        scores = evaluate_detector(accelerator, model, eval_dataloader, image_processor, data.id2label)
        record(scores, completed_steps)
        logger.info(
            f"epoch {epoch}: train loss {train_loss:.4f}, mAP@50 {scores['eval_map_50']:.4f}, "
            f"mAP {scores['eval_map']:.4f} ({history[-1]['elapsed_s']:.0f} s)"
        )
        if args.with_tracking:
            learning_rate = lr_scheduler.get_last_lr()[-1]
            accelerator.log(
                {"train_loss": train_loss, "learning_rate": learning_rate, **scores, "epoch": epoch},
                step=completed_steps,
            )

    start_tracking(accelerator, args, "pvt_object_detection")
    loop = TrainingLoop(
        accelerator, model, optimizer, lr_scheduler, train_dataloader, plan, image_processor, args, args.max_grad_norm
    )
    logger.info(
        f"{len(train_dataset)} training / {len(eval_dataset)} validation images of {data.name}, "
        f"{len(data.categories)} categories; {args.detector}, {accelerator.num_processes} process(es), global batch "
        f"{global_batch_size}, {plan.max_train_steps} steps over {plan.num_train_epochs} epochs"
    )
    outcome = loop.run(compute_loss, on_epoch_end)

    digests, scores = save_and_evaluate(
        accelerator,
        model,
        image_processor,
        output_dir,
        lambda: evaluate_detector(accelerator, model, eval_dataloader, image_processor, data.id2label),
    )
    record(scores, outcome.completed_steps)
    logger.info(f"final: mAP@50 {scores['eval_map_50']:.4f}, mAP {scores['eval_map']:.4f}")
    results = {
        **scores,
        **dataset_fields(data.name, args.dataset_config_name, data.validation_split_name),
        **outcome.results_fields(),
        "train_samples": len(train_dataset),
        "total_runtime": time.perf_counter() - start_time,
        "eval_history": history,
        "global_batch_size": global_batch_size,
        "device": str(accelerator.device.type),
        "mixed_precision": accelerator.mixed_precision,
        "detector": args.detector,
        "torch_compile_graphs": compiled_graph_count(model),
        "skipped_unreadable_images": data.skipped_images,
        "weights_sha256_per_rank": digests,
    }
    if args.with_tracking:
        accelerator.log({**scores, "train_loss": outcome.train_loss}, step=outcome.completed_steps)
    accelerator.print(json.dumps({key: results[key] for key in ("eval_map_50", "eval_map", "train_runtime")}))
    publish_run(accelerator, args, results, model_card(output_dir, args, data, results), "scripts/train_detection.py")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # closes the trackers and the process group: nothing collective after this


if __name__ == "__main__":
    main()
