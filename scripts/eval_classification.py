#!/usr/bin/env python
"""Top-1 and top-5 accuracy of a PVT checkpoint on a dataset split, written as a results file for model cards.

    python scripts/eval_classification.py --model_name_or_path pvt-digits --output_file pvt-digits/eval_results.json
    accelerate launch --multi_gpu --num_processes 2 scripts/eval_classification.py \\
        --model_name_or_path my-org/pvt-tiny --validation_dir imagenet/val --output_file pvt-tiny-imagenet.json

The checkpoint's own image processor prepares the images, exactly as for inference. Without a dataset argument it
evaluates on the held-out 20% of scikit-learn's digits, the same images `scripts/train.py` held out; `--validation_dir`
alone evaluates every image of that folder (one sub-folder per class). The dataset's
labels are matched to the model's by name when the model has named labels. Unreadable images are skipped with a
counted warning (see `modeling_pvt.data.sources`). The results follow `modeling_pvt.hub.results` (`eval_accuracy`,
`eval_top5_accuracy`, `eval_loss`, `eval_samples`, `dataset_name`, `split`, ...).
"""

import json
import time
from dataclasses import dataclass, field

from transformers import AutoImageProcessor, AutoModelForImageClassification

import modeling_pvt  # noqa: F401  (registers PVT with the Auto classes)
from modeling_pvt.data.classification import (
    EvaluationDataArguments,
    ImageClassificationData,
    ImageClassificationDataset,
    build_processor_transform,
    collate_image_batch,
)
from modeling_pvt.data.sampling import build_eval_dataloader
from modeling_pvt.hub.results import write_results
from modeling_pvt.tasks.evaluation import evaluate_classifier, label_mapping
from modeling_pvt.training.launch import setup_accelerator, stop_all_on_user_error
from modeling_pvt.training.options import loading_pretrained, parse_arguments


@dataclass
class EvaluationArguments:
    """The model to evaluate, and where its scores go."""

    _argument_group_name = "model and results"  # HfArgumentParser's --help section

    model_name_or_path: str = field(metadata={"help": "A saved model folder or a Hub id."})
    revision: str = field(default="main", metadata={"help": "Branch, tag or commit of a Hub model."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Images per batch and process."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Data-loader worker processes per process."})
    output_file: str | None = field(
        default=None, metadata={"help": "Where to write the JSON results; without it they are only printed."}
    )


def parse_args(argv: list[str] | None = None) -> tuple[EvaluationDataArguments, EvaluationArguments]:
    _, (args, data_args) = parse_arguments(
        (EvaluationArguments, EvaluationDataArguments), argv, description=__doc__.split("\n\n")[0]
    )
    return data_args, args


def load_model(args: EvaluationArguments, cache_dir: str | None) -> tuple:
    """The model and its image processor; a name that is neither a folder nor a Hub model raises `OptionError`."""
    hub_kwargs = {"revision": args.revision, "token": args.token, "cache_dir": cache_dir}
    with loading_pretrained("--model_name_or_path", args.model_name_or_path):
        model = AutoModelForImageClassification.from_pretrained(args.model_name_or_path, **hub_kwargs)
        image_processor = AutoImageProcessor.from_pretrained(args.model_name_or_path, **hub_kwargs)
    return model, image_processor


def load_data(data_args: EvaluationDataArguments, model) -> tuple[ImageClassificationData, list[int]]:
    """The held-out images and, for each of the dataset's labels, the model's id for it."""
    data = data_args.load()
    return data, label_mapping(model.config.id2label, data.labels)


def main(argv: list[str] | None = None) -> None:
    data_args, args = parse_args(argv)
    accelerator = setup_accelerator()
    model, image_processor = stop_all_on_user_error(lambda: load_model(args, data_args.cache_dir))
    data, label_ids = stop_all_on_user_error(lambda: load_data(data_args, model), main_process_first=True)
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
