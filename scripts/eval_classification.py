#!/usr/bin/env python
"""Top-1 and top-5 accuracy of a PVT checkpoint on a dataset split, written as a results file for model cards.

    python scripts/eval_classification.py --model_name_or_path pvt-digits --output_file pvt-digits/eval_results.json
    accelerate launch --multi_gpu --num_processes 2 scripts/eval_classification.py \\
        --model_name_or_path my-org/pvt-tiny --validation_dir imagenet/val --output_file pvt-tiny-imagenet.json

The checkpoint's own image processor prepares the images, exactly as for inference. Without a dataset argument it
evaluates on the held-out 20% of scikit-learn's digits, the same images `scripts/train.py` held out. The dataset's
labels are matched to the model's by name when the model has named labels. Unreadable images are skipped with a
counted warning (see `modeling_pvt.data`). The results follow `modeling_pvt.results` (`eval_accuracy`,
`eval_top5_accuracy`, `eval_loss`, `eval_samples`, `dataset_name`, `split`, ...).
"""

import argparse
import json
import time

from transformers import AutoImageProcessor, AutoModelForImageClassification, HfArgumentParser

import modeling_pvt  # noqa: F401  (registers PVT with the Auto classes)
from modeling_pvt.data.classification import (
    DataArguments,
    ImageClassificationDataset,
    build_processor_transform,
    collate_image_batch,
)
from modeling_pvt.data.sampling import build_eval_dataloader
from modeling_pvt.data.sources import exit_on_data_error
from modeling_pvt.hub.results import write_results
from modeling_pvt.tasks.evaluation import evaluate_classifier, label_mapping
from modeling_pvt.training.launch import setup_accelerator


def parse_args(argv: list[str] | None = None) -> tuple[DataArguments, argparse.Namespace]:
    parser = HfArgumentParser(DataArguments, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", required=True, help="A saved model folder or a Hub id.")
    parser.add_argument("--revision", default="main", help="Branch, tag or commit of a Hub model.")
    parser.add_argument("--token", help="Hub token for private models.")
    parser.add_argument("--per_device_eval_batch_size", type=int, default=128)
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument("--output_file", help="Where to write the JSON results (default: print only).")
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> None:
    data_args, args = parse_args(argv)
    accelerator = setup_accelerator()
    hub_kwargs = {"revision": args.revision, "token": args.token, "cache_dir": data_args.cache_dir}
    model = AutoModelForImageClassification.from_pretrained(args.model_name_or_path, **hub_kwargs)
    image_processor = AutoImageProcessor.from_pretrained(args.model_name_or_path, **hub_kwargs)
    with accelerator.main_process_first(), exit_on_data_error():
        data = data_args.load()
        label_ids = label_mapping(model.config.id2label, data.labels)
    dataset = ImageClassificationDataset(
        data.validation, data.image_column, data.label_column, build_processor_transform(image_processor), "evaluation"
    )
    dataloader = build_eval_dataloader(
        dataset, args.per_device_eval_batch_size, collate_image_batch, args.dataloader_num_workers
    )
    model, dataloader = accelerator.prepare(model, dataloader)
    start = time.perf_counter()
    scores = evaluate_classifier(accelerator, model, dataloader, label_ids)
    results = {
        **scores,
        **data.results_fields(),
        "eval_runtime": time.perf_counter() - start,
        "skipped_unreadable_images": data.skipped_images,
        "model": args.model_name_or_path,
        "revision": args.revision,
        "image_size": list(dataset[0]["pixel_values"].shape[-2:]),
        "num_processes": accelerator.num_processes,
        "source": "`scripts/eval_classification.py`",
    }
    if accelerator.is_main_process:
        print(json.dumps(results, indent=2))
        if args.output_file:
            write_results(args.output_file, results)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
