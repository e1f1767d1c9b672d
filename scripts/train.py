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
import hashlib
import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import datasets
import torch
import transformers
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, gather_object, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from modeling_pvt import PVT_PRESETS, PvtConfig, PvtForImageClassification, PvtImageProcessor
from modeling_pvt.data import (
    DIGITS_DATASET_NAME,
    DataError,
    EpochShuffleSampler,
    ImageClassificationData,
    ImageClassificationDataset,
    build_processor_transform,
    build_train_transform,
    collate_image_batch,
    load_image_classification_data,
)
from modeling_pvt.metrics import load_metric
from modeling_pvt.runtime import configure_allocator

logger = get_logger(__name__)

CHECKPOINTS_DIR_NAME = "checkpoints"
TRAINING_STATE_NAME = "training_state.json"
INTERRUPTED_MODEL_DIR_NAME = "interrupted_model"
RESULTS_NAME = "all_results.json"

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Arguments marked [recipe] default to the paper's recipe with a dataset, and to a digits recipe "
        "without one (see PAPER_RECIPE / DIGITS_RECIPE in this script).",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", help="A dataset on the Hub or saved on disk; none: scikit-learn's digits.")
    data.add_argument("--dataset_config_name", help="The dataset's configuration name.")
    data.add_argument("--train_dir", help="Folder of training images, one sub-folder per class.")
    data.add_argument("--validation_dir", help="Folder of validation images, one sub-folder per class.")
    data.add_argument(
        "--train_val_split", type=float, default=0.15, help="Fraction of train held out when there is no validation."
    )
    data.add_argument("--image_column_name", help="Column holding the images (default: the first image column).")
    data.add_argument("--label_column_name", help="Column holding the labels (default: the first class column).")
    data.add_argument(
        "--image_check",
        choices=["verify", "decode", "none"],
        default="verify",
        help="Up-front check of every image; unreadable ones are skipped with a warning. 'decode' also catches "
        "truncated files, at the cost of decoding everything once.",
    )
    data.add_argument(
        "--preprocessing_num_workers", type=int, help="Processes for the up-front image check (cached by datasets)."
    )
    data.add_argument("--max_train_samples", type=int, help="Use only the first N training samples.")
    data.add_argument("--max_eval_samples", type=int, help="Use only the first N validation samples.")
    data.add_argument("--num_workers", type=int, help="Data-loader worker processes per training process [recipe].")
    data.add_argument("--cache_dir", help="Where `datasets` caches downloads.")

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

    training = parser.add_argument_group("training")
    training.add_argument("--output_dir", default="pvt-digits", help="Where the model, results and checkpoints go.")
    training.add_argument("--per_device_train_batch_size", type=int, help="Batch size per process [recipe].")
    training.add_argument("--per_device_eval_batch_size", type=int, default=128)
    training.add_argument("--learning_rate", type=float, help="Peak learning rate [recipe; paper: 5e-4 x batch/512].")
    training.add_argument("--weight_decay", type=float, help="AdamW weight decay [recipe].")
    training.add_argument("--num_train_epochs", type=int, help="Epochs [recipe].")
    training.add_argument("--max_train_steps", type=int, help="Optimizer steps; overrides --num_train_epochs.")
    training.add_argument("--gradient_accumulation_steps", type=int, default=1)
    training.add_argument("--lr_scheduler_type", default="cosine", help="Any transformers scheduler name.")
    training.add_argument("--warmup_epochs", type=float, help="Linear warm-up length in epochs [recipe].")
    training.add_argument("--label_smoothing", type=float, help="[recipe]")
    training.add_argument("--mixup", type=float, help="Mixup alpha, 0 disables [recipe].")
    training.add_argument("--cutmix", type=float, help="CutMix alpha, 0 disables [recipe].")
    training.add_argument("--rand_augment", help="timm RandAugment spec, or 'none' [recipe].")
    training.add_argument("--random_erasing", type=float, help="Random-erasing probability [recipe].")
    training.add_argument("--min_crop_scale", type=float, help="Smallest area fraction of random crops [recipe].")
    training.add_argument("--horizontal_flip", type=float, help="Horizontal flip probability [recipe].")
    training.add_argument("--eval_crop_pct", type=float, help="Centre-crop fraction at evaluation [recipe].")
    training.add_argument(
        "--max_grad_norm", type=float, help="Gradient clipping; default 1.0 for medium/large, none otherwise."
    )
    training.add_argument("--seed", type=int, default=42)

    checkpoints = parser.add_argument_group("checkpoints and tracking")
    checkpoints.add_argument(
        "--checkpointing_steps", help="Save the training state every N optimizer steps, or 'epoch'."
    )
    checkpoints.add_argument("--checkpoints_total_limit", type=int, help="Keep only the newest N checkpoints.")
    checkpoints.add_argument("--resume_from_checkpoint", help="A checkpoint folder, or 'latest' in --output_dir.")
    checkpoints.add_argument("--with_tracking", action="store_true", help="Log metrics to --report_to.")
    checkpoints.add_argument("--report_to", default="tensorboard", help="Tracker(s) for accelerate, or 'all'.")

    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true", help="Upload --output_dir to the Hub at the end.")
    hub.add_argument("--hub_model_id", help="Repository id; default: the name of --output_dir.")
    hub.add_argument("--hub_token", help="Token; default: the logged-in one or HF_TOKEN.")
    hub.add_argument("--hub_private_repo", action="store_true")

    args = parser.parse_args(argv)
    args.uses_embedded_dataset = args.dataset_name is None and args.train_dir is None and args.validation_dir is None
    recipe = DIGITS_RECIPE if args.uses_embedded_dataset else PAPER_RECIPE
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
    if args.checkpointing_steps is not None and args.checkpointing_steps != "epoch":
        if not args.checkpointing_steps.isdigit() or int(args.checkpointing_steps) < 1:
            parser.error(
                f"--checkpointing_steps must be a positive integer or 'epoch', got {args.checkpointing_steps}"
            )
        args.checkpointing_steps = int(args.checkpointing_steps)
    if (args.mixup > 0 or args.cutmix > 0) and args.per_device_train_batch_size % 2:
        parser.error("Mixup/CutMix needs an even --per_device_train_batch_size (timm mixes each batch with its flip).")
    return args


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


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer, in name order: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------- checkpoints
def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def is_complete_checkpoint(folder: Path) -> bool:
    """Only a renamed-into-place checkpoint folder has its training-state record; temporaries start with '.'."""
    return folder.is_dir() and not folder.name.startswith(".") and (folder / TRAINING_STATE_NAME).is_file()


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `output_dir`, oldest first, as (completed steps, folder)."""
    checkpoints_dir = output_dir / CHECKPOINTS_DIR_NAME
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for folder in checkpoints_dir.iterdir():
        if is_complete_checkpoint(folder):
            state = json.loads((folder / TRAINING_STATE_NAME).read_text())
            found.append((state["completed_steps"], folder))
    return sorted(found)


def save_checkpoint(accelerator: Accelerator, output_dir: Path, name: str, state: dict, total_limit: int | None):
    """Save the accelerate state to `checkpoints/name` atomically: write `.name.tmp`, then rename it."""
    checkpoints_dir = output_dir / CHECKPOINTS_DIR_NAME
    final = checkpoints_dir / name
    temporary = checkpoints_dir / f".{name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)  # left by a crash during an earlier save
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))  # every rank writes its own random-generator states
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / TRAINING_STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
        _fsync_tree(temporary)
        if final.exists():  # same name again (e.g. re-running into the same folder): replace it
            stale = checkpoints_dir / f".{name}.stale"
            shutil.rmtree(stale, ignore_errors=True)
            final.rename(stale)
            shutil.rmtree(stale)
        temporary.rename(final)
        _fsync_tree(checkpoints_dir)
        if total_limit is not None:
            for _, old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
        logger.info(f"Saved checkpoint {final}")
    accelerator.wait_for_everyone()


def resolve_checkpoint(resume_from: str, output_dir: Path) -> Path:
    if resume_from == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise FileNotFoundError(
                f"No complete checkpoint under {output_dir / CHECKPOINTS_DIR_NAME} to resume from."
            )
        return checkpoints[-1][1]
    folder = Path(resume_from)
    if not is_complete_checkpoint(folder):
        raise FileNotFoundError(
            f"{folder} is not a complete checkpoint (no {TRAINING_STATE_NAME}; an interrupted save leaves only a "
            "hidden temporary folder). Pass another folder or 'latest'."
        )
    return folder


def save_interrupted_model(model: torch.nn.Module, image_processor: PvtImageProcessor, output_dir: Path) -> Path:
    """Keep the weights trained so far when the run fails; called by whichever rank caught the error."""
    final = output_dir / INTERRUPTED_MODEL_DIR_NAME
    temporary = output_dir / f".{INTERRUPTED_MODEL_DIR_NAME}.{os.getpid()}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    image_processor.save_pretrained(temporary)
    shutil.rmtree(final, ignore_errors=True)
    try:
        temporary.rename(final)
    except OSError:  # another rank got there first with the same (synchronised) weights
        shutil.rmtree(temporary, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------------------------------- evaluation
def evaluate_model(accelerator: Accelerator, model: torch.nn.Module, dataloader, metric) -> dict[str, float]:
    """Top-1/top-5 accuracy and loss over the whole validation split, each sample counted exactly once."""
    model.eval()
    loss_sum, count = 0.0, 0
    for batch in tqdm(dataloader, desc="Evaluating", leave=False, disable=not accelerator.is_local_main_process):
        with torch.no_grad():
            logits = model(pixel_values=batch["pixel_values"]).logits
        logits, labels = accelerator.gather_for_metrics((logits, batch["labels"]))
        logits = logits.float()
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        count += len(labels)
        metric.add_batch(predictions=logits.cpu().numpy(), references=labels.cpu().numpy())
    scores = metric.compute()
    return {
        "eval_accuracy": scores["accuracy"],
        "eval_top5_accuracy": scores["top5_accuracy"],
        "eval_loss": loss_sum / count,
        "eval_samples": count,
    }


# ------------------------------------------------------------------------------------------------------ model card
def write_model_card(output_dir: Path, args: argparse.Namespace, data: ImageClassificationData, results: dict):
    dataset = "scikit-learn digits (8x8 greyscale scans, upsampled)" if args.uses_embedded_dataset else data.name
    source = f"fine-tuned from `{args.model_name_or_path}`" if args.model_name_or_path else "trained from scratch"
    arguments = " ".join(shlex.quote(argument) for argument in sys.argv[1:]) or "(none: the embedded default)"
    repo_name = args.hub_model_id or output_dir.resolve().name
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "image-classification",
        "tags": ["pvt", "image-classification", "vision"],
        "metrics": ["accuracy"],
        "model-index": [
            {
                "name": repo_name,
                "results": [
                    {
                        "task": {"type": "image-classification", "name": "Image Classification"},
                        "dataset": {"name": dataset, "type": results["dataset"], "split": data.validation_split_name},
                        "metrics": [
                            {
                                "type": "accuracy",
                                "name": "Top-1 accuracy",
                                "value": round(results["eval_accuracy"], 4),
                            },
                            {
                                "type": "accuracy",
                                "name": "Top-5 accuracy",
                                "value": round(results["eval_top5_accuracy"], 4),
                            },
                        ],
                    }
                ],
            }
        ],
    }
    recipe_rows = "\n".join(
        f"| {name} | {getattr(args, name)} |"
        for name in (
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
    )
    card = f"""---
{yaml.safe_dump(metadata, sort_keys=False).strip()}
---

# PVT ({args.model_size if not args.model_name_or_path else "pretrained"}) on {dataset}

A Pyramid Vision Transformer (PVT v1, [arXiv 2102.12122](https://arxiv.org/abs/2102.12122)) image classifier,
{source} with `modeling_pvt`'s `scripts/train.py`.

## Results

Measured by the training script at the end of training on the held-out split `{data.validation_split_name}`
of {dataset} ({results["eval_samples"]} images, each counted once):

| metric | value |
|---|---|
| top-1 accuracy | {results["eval_accuracy"]:.4f} |
| top-5 accuracy | {results["eval_top5_accuracy"]:.4f} |
| evaluation loss | {results["eval_loss"]:.4f} |

Training took {results["train_runtime"]:.1f} s on {results["num_processes"]} process(es) ({results["device"]},
mixed precision: {results["mixed_precision"]}), {results["completed_steps"]} optimizer steps over
{results["epoch"]} epoch(s).

## Use

```python
import modeling_pvt  # registers the PVT classes with the Auto API
from transformers import AutoImageProcessor, AutoModelForImageClassification

processor = AutoImageProcessor.from_pretrained("{repo_name}")
model = AutoModelForImageClassification.from_pretrained("{repo_name}")
```

## Training

Labels: {", ".join(data.labels[:20])}{" ..." if len(data.labels) > 20 else ""} ({len(data.labels)} classes).
Global batch size {results["global_batch_size"]}, AdamW, no weight decay on biases, norms, position embeddings and
class tokens.

| setting | value |
|---|---|
{recipe_rows}

Arguments of `scripts/train.py`: `{arguments}`
"""
    (output_dir / "README.md").write_text(card)


def push_to_hub(args: argparse.Namespace, output_dir: Path) -> str:
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token)
    repo_id = args.hub_model_id or output_dir.name
    repo_id = api.create_repo(repo_id, private=args.hub_private_repo or None, exist_ok=True).repo_id
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        commit_message="Upload PVT trained with modeling_pvt scripts/train.py",
        ignore_patterns=[f"{CHECKPOINTS_DIR_NAME}/*", f"{INTERRUPTED_MODEL_DIR_NAME}/*", ".*", "*/.*"],
    )
    return repo_id


# ------------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    configure_allocator()  # keep big freed blocks in the process instead of re-faulting them on every step
    start_time = time.perf_counter()
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        # On a host without GPUs, `accelerate launch --multi_gpu --num_processes N` starts N processes that
        # accelerate only joins into one gloo group when told to use the CPU.
        cpu=not torch.accelerator.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=str(output_dir),
    )
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    logging.getLogger("accelerate.checkpointing").setLevel(logging.WARNING)  # one line per saved file is noise
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
        transformers.utils.logging.set_verbosity_error()
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    # Same weights on every rank from the start; then per-rank seeds, so Mixup and stochastic depth differ by rank.
    set_seed(args.seed)
    with accelerator.main_process_first():
        try:
            data = load_image_classification_data(
                dataset_name=args.dataset_name,
                dataset_config_name=args.dataset_config_name,
                train_dir=args.train_dir,
                validation_dir=args.validation_dir,
                train_val_split=args.train_val_split,
                image_column_name=args.image_column_name,
                label_column_name=args.label_column_name,
                cache_dir=args.cache_dir,
                check_images=args.image_check,
                num_proc=args.preprocessing_num_workers,
            )
        except DataError as error:  # a message for the user, not a traceback
            raise SystemExit(f"Data error: {error}") from error
    if args.max_train_samples is not None:
        data.train = data.train.select(range(min(args.max_train_samples, len(data.train))))
    if args.max_eval_samples is not None:
        data.validation = data.validation.select(range(min(args.max_eval_samples, len(data.validation))))
    model, image_processor = build_model_and_processor(args, data)
    set_seed(args.seed, device_specific=True)

    train_dataset = ImageClassificationDataset(
        data.train,
        data.image_column,
        data.label_column,
        build_train_transform(
            args.image_size,
            image_processor.image_mean,
            image_processor.image_std,
            rand_augment=args.rand_augment,
            random_erasing=args.random_erasing,
            crop_scale=(args.min_crop_scale, 1.0),
            horizontal_flip=args.horizontal_flip,
        ),
        split="train",
        augmentation_seed=args.seed,
    )
    eval_dataset = ImageClassificationDataset(
        data.validation, data.image_column, data.label_column, build_processor_transform(image_processor), "validation"
    )
    # Own generators for the loaders: creating an iterator must not draw from the global generators, or a resumed
    # run (which creates one more iterator than the uninterrupted run did) would drift.
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        sampler=EpochShuffleSampler(len(train_dataset), seed=args.seed),
        batch_size=args.per_device_train_batch_size,
        drop_last=True,
        collate_fn=collate_image_batch,
        num_workers=args.num_workers,
        generator=torch.Generator().manual_seed(args.seed),
    )
    eval_dataloader = torch.utils.data.DataLoader(
        eval_dataset,
        batch_size=args.per_device_eval_batch_size,
        collate_fn=collate_image_batch,
        num_workers=args.num_workers,
        generator=torch.Generator().manual_seed(args.seed),
    )
    global_batch_size = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    if args.learning_rate is None:
        args.learning_rate = 5e-4 * global_batch_size / 512
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.learning_rate)
    model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader
    )
    if len(train_dataloader) == 0:
        raise ValueError(
            f"{len(train_dataset)} training samples make no full batch of {args.per_device_train_batch_size} on each "
            f"of {accelerator.num_processes} process(es); lower --per_device_train_batch_size."
        )
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    # One scheduler step per optimizer step (not prepared by accelerate, which would step it once per process).
    lr_scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=round(args.warmup_epochs * steps_per_epoch),
        num_training_steps=args.max_train_steps,
    )
    accelerator.register_for_checkpointing(lr_scheduler)

    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        from timm.data import Mixup

        mixup = Mixup(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
            label_smoothing=args.label_smoothing,
            num_classes=len(data.labels),
        )
        from timm.loss import SoftTargetCrossEntropy

        criterion = SoftTargetCrossEntropy()
    else:
        criterion = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    metric = load_metric("accuracy", keep_in_memory=True)

    if args.with_tracking:
        tracked = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
        accelerator.init_trackers("pvt_image_classification", tracked)

    completed_steps, starting_epoch, resume_batches = 0, 0, 0
    if args.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / TRAINING_STATE_NAME).read_text())
        completed_steps, starting_epoch, resume_batches = (
            state["completed_steps"],
            state["epoch"],
            state["batches_in_epoch"],
        )
        logger.info(
            f"Resumed from {checkpoint}: epoch {starting_epoch}, batch {resume_batches}, step {completed_steps}"
        )

    logger.info(
        f"{len(train_dataset)} training / {len(eval_dataset)} validation images of {data.name}, "
        f"{len(data.labels)} classes; {accelerator.num_processes} process(es), global batch {global_batch_size}, "
        f"{args.max_train_steps} steps over {args.num_train_epochs} epochs, learning rate {args.learning_rate:g}"
    )
    progress = tqdm(
        total=args.max_train_steps,
        initial=completed_steps,
        desc="Training",
        disable=not accelerator.is_local_main_process,
    )
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    train_loss = float("nan")  # stays NaN when resuming from the very last checkpoint
    train_start = time.perf_counter()
    epoch = starting_epoch
    try:
        for epoch in range(starting_epoch, args.num_train_epochs):
            model.train()
            train_dataset.set_epoch(epoch)
            train_dataloader.set_epoch(epoch)
            skip = resume_batches if epoch == starting_epoch else 0
            batches = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
            loss_sum, loss_count = torch.zeros((), device=accelerator.device), 0
            for batch_index, batch in enumerate(batches, start=skip):
                with accelerator.accumulate(model):
                    pixel_values, targets = batch["pixel_values"], batch["labels"]
                    if mixup is not None:
                        pixel_values, targets = mixup(pixel_values, targets)
                    logits = model(pixel_values=pixel_values).logits
                    loss = criterion(logits.float(), targets)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                loss_sum += loss.detach()
                loss_count += 1
                if not accelerator.sync_gradients:
                    continue
                lr_scheduler.step()
                completed_steps += 1
                progress.update(1)
                if isinstance(args.checkpointing_steps, int) and completed_steps % args.checkpointing_steps == 0:
                    state = {"completed_steps": completed_steps, "epoch": epoch, "batches_in_epoch": batch_index + 1}
                    save_checkpoint(
                        accelerator, output_dir, f"step_{completed_steps}", state, args.checkpoints_total_limit
                    )
                if completed_steps >= args.max_train_steps:
                    break
            train_loss = accelerator.reduce(loss_sum, "mean").item() / max(loss_count, 1)
            last_epoch = completed_steps >= args.max_train_steps or epoch == args.num_train_epochs - 1
            if args.checkpointing_steps == "epoch":
                state = {"completed_steps": completed_steps, "epoch": epoch + 1, "batches_in_epoch": 0}
                save_checkpoint(accelerator, output_dir, f"epoch_{epoch}", state, args.checkpoints_total_limit)
            if last_epoch:
                break  # the final evaluation runs after the model is saved, so a failing evaluation loses nothing
            scores = evaluate_model(accelerator, model, eval_dataloader, metric)
            logger.info(
                f"epoch {epoch}: train loss {train_loss:.4f}, top-1 {scores['eval_accuracy']:.4f}, "
                f"top-5 {scores['eval_top5_accuracy']:.4f}"
            )
            if args.with_tracking:
                accelerator.log(
                    {
                        "train_loss": train_loss,
                        "learning_rate": lr_scheduler.get_last_lr()[0],
                        **scores,
                        "epoch": epoch,
                    },
                    step=completed_steps,
                )
    except BaseException:
        progress.close()
        if completed_steps > 0 and not sharded:  # a sharded model cannot be saved by one rank alone
            saved = save_interrupted_model(accelerator.unwrap_model(model), image_processor, output_dir)
            logger.error(
                f"Training failed at epoch {epoch}, step {completed_steps}; the weights trained so far are in "
                f"{saved} (the newest checkpoint, if any, resumes exactly).",
                main_process_only=False,
            )
        raise
    progress.close()
    train_runtime = time.perf_counter() - train_start

    # Save first: everything after this point can fail without losing the trained model.
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(
        output_dir,
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
        state_dict=accelerator.get_state_dict(model),
    )
    if accelerator.is_main_process:
        image_processor.save_pretrained(output_dir)
    # Every rank must end with the same weights; sharded models (FSDP, DeepSpeed) hold different shards by design.
    digests = [] if sharded else gather_object([weights_digest(unwrapped)])
    if len(set(digests)) > 1:
        logger.warning(f"The ranks ended with different weights: {digests}")

    try:
        scores = evaluate_model(accelerator, model, eval_dataloader, metric)
    except BaseException:
        logger.error(f"The final evaluation failed; the trained model is saved in {output_dir}.")
        raise
    logger.info(f"final: top-1 {scores['eval_accuracy']:.4f}, top-5 {scores['eval_top5_accuracy']:.4f}")
    results = {
        **scores,
        "train_loss": train_loss,
        "epoch": epoch + 1,
        "completed_steps": completed_steps,
        "train_samples": len(train_dataset),
        "train_runtime": train_runtime,
        "total_runtime": time.perf_counter() - start_time,
        "num_processes": accelerator.num_processes,
        "global_batch_size": global_batch_size,
        "device": str(accelerator.device.type),
        "mixed_precision": accelerator.mixed_precision,
        "dataset": DIGITS_DATASET_NAME if args.uses_embedded_dataset else data.name,
        "split": data.validation_split_name,
        "skipped_unreadable_images": data.skipped_images,
        "weights_sha256_per_rank": digests,
    }
    if args.with_tracking:
        accelerator.log({**scores, "train_loss": train_loss}, step=completed_steps)
    if accelerator.is_main_process:
        (output_dir / RESULTS_NAME).write_text(json.dumps(results, indent=2) + "\n")
        write_model_card(output_dir, args, data, results)
        print(json.dumps({key: results[key] for key in ("eval_accuracy", "eval_top5_accuracy", "train_runtime")}))
        if args.push_to_hub:
            try:
                repo_id = push_to_hub(args, output_dir)
            except Exception:
                logger.error(f"Pushing to the Hub failed; the model and results are saved in {output_dir}.")
                raise
            logger.info(f"Pushed {output_dir} to {repo_id}")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # closes the trackers and the process group: nothing collective after this
    return results


if __name__ == "__main__":
    main()
