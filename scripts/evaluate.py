#!/usr/bin/env python
"""Top-1 and top-5 accuracy of a PVT checkpoint on a dataset split, written to a JSON file for model cards.

    python scripts/evaluate.py --model_name_or_path pvt-digits --output_file pvt-digits/eval_results.json
    accelerate launch --multi_gpu --num_processes 2 scripts/evaluate.py --model_name_or_path my-org/pvt-tiny \\
        --validation_dir imagenet/val --output_file pvt-tiny-imagenet.json

The checkpoint's own image processor prepares the images, exactly as for inference. Without a dataset argument it
evaluates on the held-out 20% of scikit-learn's digits, the same images `scripts/train.py` held out. The dataset's
labels are matched to the model's by name when the model has named labels. Unreadable images are skipped with a
counted warning (see `modeling_pvt.data`).
"""

import argparse
import importlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModelForImageClassification

import modeling_pvt  # noqa: F401  (registers PVT with the Auto classes)
from modeling_pvt.data import (
    DIGITS_DATASET_NAME,
    DataError,
    ImageClassificationDataset,
    build_processor_transform,
    collate_image_batch,
    load_image_classification_data,
)
from modeling_pvt.metrics import load_metric
from modeling_pvt.runtime import configure_allocator

if __name__ == "evaluate":
    # Python puts the folder of the running script first on sys.path, so for every script in this folder
    # (train.py, train_segmentation.py, ...) `import evaluate` finds this file before the `evaluate` library. Hand
    # the importer the library instead: `import` returns whatever is in sys.modules once this module has run.
    _scripts_dir = os.path.dirname(os.path.abspath(__file__))
    _saved_path = list(sys.path)
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _scripts_dir]
    del sys.modules["evaluate"]
    try:
        importlib.import_module("evaluate")
    finally:
        sys.path[:] = _saved_path

logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", required=True, help="A saved model folder or a Hub id.")
    parser.add_argument("--revision", default="main", help="Branch, tag or commit of a Hub model.")
    parser.add_argument("--token", help="Hub token for private models.")
    parser.add_argument("--dataset_name", help="A dataset on the Hub or on disk; none: scikit-learn's digits.")
    parser.add_argument("--dataset_config_name")
    parser.add_argument("--train_dir", help="Training image folder (only to carve a validation split out of).")
    parser.add_argument("--validation_dir", help="Folder of images to evaluate on, one sub-folder per class.")
    parser.add_argument(
        "--split",
        help="Split of --dataset_name to evaluate (default: validation, else test, else the held-out part of train).",
    )
    parser.add_argument("--train_val_split", type=float, default=0.15, help="Held-out fraction when carving.")
    parser.add_argument("--image_column_name")
    parser.add_argument("--label_column_name")
    parser.add_argument("--image_check", choices=["verify", "decode", "none"], default="verify")
    parser.add_argument("--max_eval_samples", type=int, help="Evaluate only the first N images.")
    parser.add_argument("--per_device_eval_batch_size", type=int, default=128)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--cache_dir")
    parser.add_argument("--output_file", help="Where to write the JSON results (default: print only).")
    return parser.parse_args(argv)


def label_mapping(model_id2label: dict[int, str], dataset_labels: list[str]) -> list[int] | None:
    """Model class id for each dataset class id, matched by name; None when the ids are used as they are."""
    model_names = {str(name): int(index) for index, name in model_id2label.items()}
    if all(name in model_names for name in dataset_labels):
        mapping = [model_names[name] for name in dataset_labels]
        return None if mapping == list(range(len(dataset_labels))) else mapping
    generic = all(str(name) == f"LABEL_{index}" for index, name in model_id2label.items())
    if generic and len(model_id2label) >= len(dataset_labels):
        logger.warning("The model's labels are unnamed (LABEL_i): assuming dataset class i is model class i.")
        return None
    missing = [name for name in dataset_labels if name not in model_names][:10]
    raise DataError(
        f"The dataset's labels do not match the model's: {missing} are not among the model's "
        f"{len(model_names)} labels ({sorted(model_names)[:10]}...). Evaluate on a dataset with the model's classes."
    )


def main(argv: list[str] | None = None) -> dict:
    configure_allocator()
    args = parse_args(argv)
    accelerator = Accelerator(cpu=not torch.accelerator.is_available())
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
        transformers.utils.logging.set_verbosity_error()

    hub_kwargs = {"revision": args.revision, "token": args.token, "cache_dir": args.cache_dir}
    model = AutoModelForImageClassification.from_pretrained(args.model_name_or_path, **hub_kwargs)
    image_processor = AutoImageProcessor.from_pretrained(args.model_name_or_path, **hub_kwargs)
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
                validation_split_name=args.split,
            )
        except DataError as error:  # a message for the user, not a traceback
            raise SystemExit(f"Data error: {error}") from error
    evaluation = data.validation
    if args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(args.max_eval_samples, len(evaluation))))
    mapping = label_mapping(model.config.id2label, data.labels)
    dataset = ImageClassificationDataset(
        evaluation, data.image_column, data.label_column, build_processor_transform(image_processor), "evaluation"
    )
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.per_device_eval_batch_size,
        collate_fn=collate_image_batch,
        num_workers=args.num_workers,
    )
    model, dataloader = accelerator.prepare(model, dataloader)
    model.eval()
    metric = load_metric("accuracy", keep_in_memory=True)
    to_model_ids = torch.tensor(mapping, device=accelerator.device) if mapping is not None else None
    loss_sum, count = 0.0, 0
    start = time.perf_counter()
    for batch in tqdm(dataloader, desc="Evaluating", disable=not accelerator.is_local_main_process):
        with torch.no_grad():
            logits = model(pixel_values=batch["pixel_values"]).logits
        labels = batch["labels"] if to_model_ids is None else to_model_ids[batch["labels"]]
        logits, labels = accelerator.gather_for_metrics((logits, labels))
        logits = logits.float()
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        count += len(labels)
        metric.add_batch(predictions=logits.cpu().numpy(), references=labels.cpu().numpy())
    scores = metric.compute()
    results = {
        "eval_accuracy": scores["accuracy"],
        "eval_top5_accuracy": scores["top5_accuracy"],
        "eval_loss": loss_sum / count,
        "num_samples": count,
        "skipped_unreadable_images": data.skipped_images,
        "dataset": DIGITS_DATASET_NAME if data.name == DIGITS_DATASET_NAME else data.name,
        "split": data.validation_split_name,
        "model": args.model_name_or_path,
        "revision": args.revision,
        "image_size": list(dataset[0]["pixel_values"].shape[-2:]),
        "eval_runtime": time.perf_counter() - start,
        "num_processes": accelerator.num_processes,
    }
    if accelerator.is_main_process:
        print(json.dumps(results, indent=2))
        if args.output_file:
            Path(args.output_file).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output_file).write_text(json.dumps(results, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return results


if __name__ == "__main__":
    main()
