"""Top-1 and top-5 accuracy as an `evaluate` metric module that ships inside `modeling_pvt`.

`evaluate.load("accuracy")` fetches its script from the Hugging Face Hub; this module is loaded by path instead, so
evaluation works offline: `evaluate.load(path_to_this_file)` or `modeling_pvt.metrics.load_metric("accuracy")`.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-1 accuracy is the fraction of samples whose highest-scoring class is the reference label; top-5 accuracy is the
fraction whose reference label is among the five highest-scoring classes (all classes when there are five or fewer).
Pass `predictions` as per-class scores (logits or probabilities, one row per sample) to get both; pass predicted
class indices (one integer per sample) to get top-1 only.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`, or `list` of `int`):
        Per-class scores with shape (num_samples, num_classes), or predicted class indices with shape (num_samples,).
    references (`list` of `int`): Ground-truth class indices.
    top_k (`int`, *optional*, defaults to 5): The k of the second reported accuracy, whose key is `top{k}_accuracy`.
Returns:
    accuracy (`float`): Top-1 accuracy, a fraction in [0, 1].
    top5_accuracy (`float`): Top-k accuracy (k=5 by default), a fraction in [0, 1]; only when scores are given.
Examples:
    >>> metric = evaluate.load("modeling_pvt/metrics/accuracy")
    >>> metric.compute(predictions=[[0.1, 0.9], [0.8, 0.2]], references=[1, 1])
    {'accuracy': 0.5, 'top5_accuracy': 1.0}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # Two accepted formats: per-class scores (gives top-1 and top-k) or class indices (top-1 only).
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Sequence(datasets.Value("float32")),
                        "references": datasets.Value("int64"),
                    }
                ),
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            ],
        )

    def _compute(self, predictions, references, top_k: int = 5) -> dict[str, float]:
        references = np.asarray(references, dtype=np.int64)
        predictions = np.asarray(predictions)
        if len(references) == 0:
            raise ValueError("Cannot compute accuracy of zero samples.")
        if predictions.ndim == 1:
            return {"accuracy": float(np.mean(predictions.astype(np.int64) == references))}
        if predictions.ndim != 2 or predictions.shape[0] != len(references):
            raise ValueError(
                f"predictions must have shape (num_samples, num_classes) or (num_samples,), got {predictions.shape} "
                f"for {len(references)} references."
            )
        num_classes = predictions.shape[1]
        if references.min() < 0 or references.max() >= num_classes:
            raise ValueError(f"references must lie in [0, {num_classes}) for scores over {num_classes} classes.")
        k = min(top_k, num_classes)
        # A sample counts as a top-k hit when fewer than k classes score strictly higher than its label.
        reference_scores = predictions[np.arange(len(references)), references]
        rank_of_reference = (predictions > reference_scores[:, None]).sum(axis=1)
        top1 = predictions.argmax(axis=1) == references
        return {"accuracy": float(np.mean(top1)), f"top{top_k}_accuracy": float(np.mean(rank_of_reference < k))}
