"""The evaluation loops: every sample of a split scored exactly once across processes, as results-schema keys.

`evaluate_classifier` (top-1/top-5 accuracy and loss) serves `scripts/train.py` and `scripts/eval_classification.py`;
`evaluate_segmentation` (mean IoU and the rest of the `mean_iou` metric) serves `scripts/train_segmentation.py`.
Both run a prepared model over a prepared loader; `gather_for_metrics` drops the samples accelerate repeats to even
out the processes, so the scores equal a single-process evaluation.
"""

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from ..data.sources import DataError
from ..metrics import load_metric
from ..training.launch import is_compiled

logger = get_logger(__name__)


def evaluation_batches(
    accelerator: Accelerator,
    model: torch.nn.Module,
    dataloader: torch.utils.data.DataLoader,
    input_names: Sequence[str] = ("pixel_values",),
) -> Iterator[tuple[dict, dict[str, torch.Tensor], int]]:
    """`(batch, model inputs, real size)` for each batch, with the model put in eval mode.

    A compiled model is specialised to the batch size it first saw: the last, smaller batch is padded with copies of
    its last image instead of compiling another graph; keep only the first `real size` outputs.
    """
    model.eval()
    padded_size = 0 if is_compiled(model) else None
    for batch in tqdm(dataloader, desc="Evaluating", leave=False, disable=not accelerator.is_local_main_process):
        inputs = {name: batch[name] for name in input_names if batch.get(name) is not None}
        size = len(inputs["pixel_values"])
        if padded_size is not None:
            padded_size = max(padded_size, size)
            inputs = {
                name: torch.cat([value, value[-1:].expand(padded_size - size, *value.shape[1:])])
                for name, value in inputs.items()
            }
        yield batch, inputs, size


def _batches_with_logits(
    accelerator: Accelerator, model: torch.nn.Module, dataloader: torch.utils.data.DataLoader
) -> Iterator[tuple[dict, torch.Tensor]]:
    for batch, inputs, size in evaluation_batches(accelerator, model, dataloader):
        with torch.no_grad():
            yield batch, model(**inputs).logits[:size]


def label_mapping(model_id2label: dict[int, str], dataset_labels: Sequence[str]) -> list[int] | None:
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


SCORES_HELD_ON_DEVICE = 2**26
"""Logits `evaluate_classifier` keeps on the device before handing them to the metric (256 MiB of float32): enough for
ImageNet's 50,000 x 1,000 in one transfer, few enough for any number of classes."""


def evaluate_classifier(
    accelerator: Accelerator,
    model: torch.nn.Module,
    dataloader: torch.utils.data.DataLoader,
    label_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """`eval_accuracy`, `eval_top5_accuracy`, `eval_loss` and `eval_samples` over the whole split.

    `label_ids` maps dataset class ids to the model's (from `label_mapping`); None uses them as they are. The logits
    and the loss stay on the device until `SCORES_HELD_ON_DEVICE` of them have gathered (or the split ends), so the
    host queues the next batches instead of waiting for each one's scores.
    """
    metric = load_metric("accuracy", keep_in_memory=True)
    to_model_ids = torch.tensor(label_ids, device=accelerator.device) if label_ids is not None else None
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count, held_logits, held_labels = 0, [], []

    def hand_to_metric() -> None:
        if held_logits:
            metric.add_batch(
                predictions=torch.cat(held_logits).cpu().numpy(), references=torch.cat(held_labels).cpu().numpy()
            )
            held_logits.clear()
            held_labels.clear()

    for batch, logits in _batches_with_logits(accelerator, model, dataloader):
        labels = batch["labels"] if to_model_ids is None else to_model_ids[batch["labels"]]
        logits, labels = accelerator.gather_for_metrics((logits, labels))
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        count += len(labels)
        held_logits.append(logits)
        held_labels.append(labels)
        if sum(held.numel() for held in held_logits) >= SCORES_HELD_ON_DEVICE:
            hand_to_metric()
    hand_to_metric()
    scores = metric.compute()
    return {
        "eval_accuracy": scores["accuracy"],
        "eval_top5_accuracy": scores["top5_accuracy"],
        "eval_loss": loss_sum.item() / count,
        "eval_samples": count,
    }


def evaluate_segmentation(
    accelerator: Accelerator,
    model: torch.nn.Module,
    dataloader: torch.utils.data.DataLoader,
    labels: Sequence[str],
    ignore_index: int,
) -> dict:
    """`eval_mean_iou`, `eval_mean_accuracy`, `eval_overall_accuracy`, per-class `eval_per_category_iou` and
    `eval_per_category_accuracy` ({class name: score}, None where a class occurs nowhere) and `eval_samples`.

    Batches carry `labels` padded with `ignore_index` and each mask's own `label_sizes`: the logits are upsampled
    to each mask's size, so scores are taken at the masks' resolution. Only the main process feeds the metric; every
    process returns its scores.
    """
    metric = load_metric("mean_iou") if accelerator.is_main_process else None
    count = 0
    for batch, logits in _batches_with_logits(accelerator, model, dataloader):
        references = batch["labels"]
        predictions = torch.zeros_like(references)
        for index, (height, width) in enumerate(batch["label_sizes"].tolist()):
            upsampled = F.interpolate(
                logits[index : index + 1].float(), size=(height, width), mode="bilinear", align_corners=False
            )
            predictions[index, :height, :width] = upsampled.argmax(dim=1)[0]
        # Processes hold batches of different mask sizes: pad to a common one (the references with ignore_index).
        for dim in (1, 2):
            predictions = accelerator.pad_across_processes(predictions, dim=dim, pad_index=0)
            references = accelerator.pad_across_processes(references, dim=dim, pad_index=ignore_index)
        predictions, references = accelerator.gather_for_metrics((predictions, references))
        count += len(references)
        if metric is not None:
            metric.add_batch(predictions=predictions.cpu().numpy(), references=references.cpu().numpy())
    scores = [None]
    if metric is not None:
        computed = metric.compute(num_labels=len(labels), ignore_index=ignore_index)
        scores = [{f"eval_{name}": _per_class(value, labels) for name, value in computed.items()}]
    broadcast_object_list(scores)
    return {**scores[0], "eval_samples": count}


def _per_class(value, labels: Sequence[str]):
    """A scalar as a float, a per-class array as {class name: float}; NaN stays NaN (the results file writes null)."""
    if np.ndim(value) == 0:
        return float(value)
    return {label: float(item) for label, item in zip(labels, value, strict=True)}


__all__ = ["SCORES_HELD_ON_DEVICE", "evaluate_classifier", "evaluate_segmentation", "label_mapping"]
