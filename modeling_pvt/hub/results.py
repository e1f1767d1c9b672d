"""The one results schema every script writes (`all_results.json`) and every model card reads.

Keys follow transformers' scripts: each measured score is `eval_<metric>` (`eval_accuracy`, `eval_top5_accuracy`,
`eval_loss`, `eval_mean_iou`, `eval_map`, ...; fractions in [0, 1]), `eval_samples` counts the evaluated samples,
and `dataset_name` / `dataset_config_name` / `split` say what they were measured on; the optional `source` names
what measured them, for model cards. Scripts add what else they know (`train_loss`, `train_runtime`, `epoch`, ...).
Which scores a task reports, and how a card names them, is a `Task`; a new task (e.g. detection with `eval_map`)
declares its own `Task` and everything else works unchanged.
"""

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RESULTS_FILE_NAME = "all_results.json"
DATASET_KEYS = ("dataset_name", "split")


@dataclass(frozen=True)
class Metric:
    """One score of a task: its results key, its `model-index` metric type and its name in a card."""

    key: str
    type: str
    name: str
    required: bool = True


@dataclass(frozen=True)
class Task:
    """What a model does: its Hub pipeline tag, its `model-index` task name, its Auto class and its scores."""

    pipeline_tag: str
    name: str
    auto_class: str
    metrics: tuple[Metric, ...]


IMAGE_CLASSIFICATION = Task(
    "image-classification", "Image Classification", "AutoModelForImageClassification",
    (Metric("eval_accuracy", "accuracy", "Top-1 accuracy"),
     Metric("eval_top5_accuracy", "top_5_accuracy", "Top-5 accuracy", required=False)),
)  # fmt: skip
SEMANTIC_SEGMENTATION = Task(
    "image-segmentation", "Semantic Segmentation", "AutoModelForSemanticSegmentation",
    (Metric("eval_mean_iou", "mean_iou", "Mean IoU"),
     Metric("eval_mean_accuracy", "mean_accuracy", "Mean class accuracy", required=False),
     Metric("eval_overall_accuracy", "accuracy", "Pixel accuracy", required=False)),
)  # fmt: skip
OBJECT_DETECTION = Task(
    "object-detection", "Object Detection", "AutoModelForObjectDetection",
    (Metric("eval_map", "map", "mAP (COCO, IoU 0.50:0.95)"),
     Metric("eval_map_50", "map_50", "mAP@50"),
     Metric("eval_map_75", "map_75", "mAP@75", required=False)),
)  # fmt: skip


def dataset_fields(dataset_name: str, dataset_config_name: str | None, split: str) -> dict:
    """The schema's description of what was evaluated."""
    return {"dataset_name": dataset_name, "dataset_config_name": dataset_config_name, "split": split}


def check_results(results: Mapping, task: Task) -> None:
    """Raise `ValueError` naming what a results mapping lacks for `task`, or a score that is not a fraction."""
    required = [*DATASET_KEYS, "eval_samples", *(metric.key for metric in task.metrics if metric.required)]
    missing = [key for key in required if results.get(key) in (None, "")]
    if missing:
        raise ValueError(
            f"The results lack {', '.join(map(repr, missing))}; {task.name} results need {required} "
            f"(written by every script of modeling_pvt as {RESULTS_FILE_NAME})."
        )
    for metric in task.metrics:
        value = results.get(metric.key)
        if value is None and not metric.required:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"Results entry {metric.key!r} must be a fraction in [0, 1], got {value!r}.")


def _json_value(value):
    """Plain JSON: NumPy scalars and arrays become numbers and lists, NaN becomes null."""
    if isinstance(value, Mapping):
        return {str(key): _json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_value(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_results(path: str | Path, results: Mapping) -> Path:
    """Write `results` as JSON to `path` (usually `output_dir / RESULTS_FILE_NAME`); the schema's keys must be in."""
    missing = [key for key in DATASET_KEYS if key not in results]
    if missing:
        raise ValueError(f"Results to write lack the schema keys {missing}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_value(results), indent=2) + "\n")
    return path


def read_results(path: str | Path) -> dict | None:
    """The results in a results file, or in a folder's `all_results.json`; None when there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE_NAME
    return json.loads(path.read_text()) if path.is_file() else None


__all__ = [
    "DATASET_KEYS",
    "IMAGE_CLASSIFICATION",
    "RESULTS_FILE_NAME",
    "SEMANTIC_SEGMENTATION",
    "Metric",
    "Task",
    "check_results",
    "dataset_fields",
    "read_results",
    "write_results",
]
