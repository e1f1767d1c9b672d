"""Mean intersection-over-union for semantic segmentation, as an `evaluate` metric module that ships in `modeling_pvt`.

`evaluate.load("mean_iou")` fetches its script from the Hugging Face Hub; this module is loaded by path instead, so
evaluation works offline: `evaluate.load(path_to_this_folder)` or `modeling_pvt.metrics.load_metric("mean_iou")`.
Arguments and outputs follow the Hub's `mean_iou` metric, so code written for one works with the other.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Mean intersection-over-union (mIoU), the standard score of semantic segmentation. All pixels of all images are pooled
per class (the totals are not averaged per image): for class c, IoU_c = |pred == c and label == c| /
|pred == c or label == c|, counted over the pixels whose label is not `ignore_index`. The mean IoU is the mean of
IoU_c over the classes present in the predictions or the labels; a class absent from both has IoU NaN and does not
count. Also reported: per-class accuracy (recall) |pred == c and label == c| / |label == c|, its mean over the classes
present in the labels, and the overall pixel accuracy.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of 2-D integer arrays): Predicted class ids, one (height, width) map per image.
    references (`list` of 2-D integer arrays): Ground-truth class ids, each of its prediction's shape.
    num_labels (`int`): Number of classes; class ids are 0 .. num_labels - 1.
    ignore_index (`int`): Label of pixels that are not scored (e.g. 255 for "unlabelled" or padding).
    nan_to_num (`float`, *optional*): Replaces NaN (classes absent from predictions and labels) in every output.
    label_map (`dict[int, int]`, *optional*): Relabels the references (old id -> new id) before scoring.
    reduce_labels (`bool`, *optional*, defaults to `False`): Treats reference label 0 as background: it becomes
        `ignore_index` and every other label is lowered by one (as for ADE20K's 150 classes). Applied after
        `label_map`.
Returns:
    mean_iou (`float`): Mean of the per-class IoU over the classes that occur, in [0, 1].
    mean_accuracy (`float`): Mean of the per-class accuracy over the classes present in the labels.
    overall_accuracy (`float`): Correct pixels / labelled pixels.
    per_category_iou (`ndarray` of shape (num_labels,)): IoU of each class (NaN where a class occurs nowhere).
    per_category_accuracy (`ndarray` of shape (num_labels,)): Accuracy of each class (NaN where it has no labels).
Examples:
    >>> metric = evaluate.load("modeling_pvt/metrics/mean_iou")
    >>> predictions = [np.array([[0, 1], [1, 1]])]
    >>> references = [np.array([[0, 1], [0, 255]])]
    >>> results = metric.compute(predictions=predictions, references=references, num_labels=2, ignore_index=255)
    >>> round(results["mean_iou"], 4)  # class 0: 1/2, class 1: 1/2
    0.5
"""

_CITATION = """
@inproceedings{everingham2010pascal,
  title={The Pascal Visual Object Classes (VOC) Challenge},
  author={Everingham, Mark and Van Gool, Luc and Williams, Christopher K. I. and Winn, John and Zisserman, Andrew},
  booktitle={International Journal of Computer Vision},
  volume={88},
  pages={303--338},
  year={2010}
}
"""


def confusion_matrix(
    prediction: np.ndarray,
    reference: np.ndarray,
    num_labels: int,
    ignore_index: int,
) -> np.ndarray:
    """`(num_labels, num_labels)` pixel counts, rows = reference class, columns = predicted class, of one image."""
    prediction = np.asarray(prediction)
    reference = np.asarray(reference)
    if prediction.shape != reference.shape:
        raise ValueError(
            f"A prediction of shape {prediction.shape} does not match its reference of shape {reference.shape}."
        )
    labelled = reference != ignore_index
    reference = reference[labelled].astype(np.int64)
    prediction = prediction[labelled].astype(np.int64)
    # Out-of-range ids would silently land in another class's cell of the flattened matrix: refuse them.
    for name, values in (("reference", reference), ("prediction", prediction)):
        if values.size and (values.min() < 0 or values.max() >= num_labels):
            raise ValueError(
                f"A {name} holds class ids in [{values.min()}, {values.max()}], outside [0, {num_labels}) for "
                f"num_labels={num_labels} (ignore_index={ignore_index} is not scored). Check num_labels and "
                "ignore_index."
            )
    cells = reference * num_labels + prediction
    return np.bincount(cells, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def relabel(reference: np.ndarray, label_map: dict | None, reduce_labels: bool, ignore_index: int) -> np.ndarray:
    """Applies `label_map` (old id -> new id), then `reduce_labels` (0 -> ignore_index, others minus one)."""
    reference = np.asarray(reference).astype(np.int64)
    if label_map:
        relabelled = reference.copy()
        for old_id, new_id in label_map.items():
            relabelled[reference == int(old_id)] = new_id
        reference = relabelled
    if reduce_labels:
        background = reference == 0
        ignored = reference == ignore_index
        reference = reference - 1
        reference[background | ignored] = ignore_index
    return reference


def scores_from_confusion(confusion: np.ndarray) -> dict:
    """mIoU, accuracies and per-class scores from a summed confusion matrix (rows = reference)."""
    intersection = np.diag(confusion).astype(np.float64)
    reference_area = confusion.sum(axis=1).astype(np.float64)
    prediction_area = confusion.sum(axis=0).astype(np.float64)
    union = reference_area + prediction_area - intersection
    if reference_area.sum() == 0:
        raise ValueError("No labelled pixels to score: every reference pixel equals ignore_index.")
    with np.errstate(divide="ignore", invalid="ignore"):
        per_category_iou = np.where(union > 0, intersection / union, np.nan)
        per_category_accuracy = np.where(reference_area > 0, intersection / reference_area, np.nan)
    return {
        # Some class always occurs (there are labelled pixels), so these means never average an empty set.
        "mean_iou": float(np.nanmean(per_category_iou)),
        "mean_accuracy": float(np.nanmean(per_category_accuracy)),
        "overall_accuracy": float(intersection.sum() / reference_area.sum()),
        "per_category_iou": per_category_iou,
        "per_category_accuracy": per_category_accuracy,
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanIoU(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # int64 rather than uint16 so negative ids reach the range check instead of wrapping around.
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                }
            ),
        )

    def _compute(
        self,
        predictions,
        references,
        num_labels: int,
        ignore_index: int,
        nan_to_num: float | None = None,
        label_map: dict | None = None,
        reduce_labels: bool = False,
    ) -> dict:
        if num_labels < 1:
            raise ValueError(f"num_labels must be at least 1, got {num_labels}.")
        if len(predictions) != len(references):
            raise ValueError(f"Got {len(predictions)} predictions for {len(references)} references.")
        confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
        for prediction, reference in zip(predictions, references, strict=True):
            reference = relabel(reference, label_map, reduce_labels, ignore_index)
            confusion += confusion_matrix(prediction, reference, num_labels, ignore_index)
        scores = scores_from_confusion(confusion)
        if nan_to_num is not None:
            scores = {name: np.nan_to_num(value, nan=nan_to_num) for name, value in scores.items()}
            scores = {name: float(value) if np.ndim(value) == 0 else value for name, value in scores.items()}
        return scores
