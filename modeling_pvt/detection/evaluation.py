"""COCO-style box mAP through torchmetrics' `MeanAveragePrecision` (pycocotools backend): mAP, mAP@50, mAP@75,
small/medium/large and per class, reported under transformers' `eval_*` names."""

from collections.abc import Sequence

import torch


def box_xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return torch.cat([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], dim=-1)


class DetectionEvaluator:
    """Accumulates predictions and ground truth (absolute `xyxy` pixel boxes) and computes COCO mAP.

    It never synchronises across processes itself: give it every image exactly once (e.g. after accelerate's
    `gather_for_metrics`), on every rank that will call `compute`.
    """

    def __init__(self, id2label: dict[int, str]):
        from torchmetrics.detection import MeanAveragePrecision

        self.id2label = {int(key): value for key, value in id2label.items()}
        self.metric = MeanAveragePrecision(
            box_format="xyxy", iou_type="bbox", class_metrics=True, backend="pycocotools", sync_on_compute=False
        )
        self.num_images = 0

    def update(self, predictions: Sequence[dict[str, torch.Tensor]], targets: Sequence[dict[str, torch.Tensor]]):
        """`predictions`: dicts with `boxes`, `scores`, `labels`; `targets`: dicts with `boxes`, `labels`."""
        self.metric.update(
            [
                {
                    key: prediction[key].detach().float().cpu() if key != "labels" else prediction[key].cpu()
                    for key in ("boxes", "scores", "labels")
                }
                for prediction in predictions
            ],
            [{"boxes": target["boxes"].float().cpu(), "labels": target["labels"].cpu()} for target in targets],
        )
        self.num_images += len(targets)

    def compute(self) -> dict[str, float]:
        scores = self.metric.compute()
        results = {
            f"eval_{name}": float(scores[name])
            for name in (
                "map",
                "map_50",
                "map_75",
                "map_small",
                "map_medium",
                "map_large",
                "mar_1",
                "mar_10",
                "mar_100",
                "mar_small",
                "mar_medium",
                "mar_large",
            )
        }
        classes = scores["classes"].reshape(-1).tolist()
        per_class = scores["map_per_class"].reshape(-1).tolist()
        for class_id, value in zip(classes, per_class):
            results[f"eval_map_{self.id2label.get(int(class_id), str(class_id))}"] = float(value)
        results["eval_samples"] = self.num_images
        return results

    def reset(self) -> None:
        self.metric.reset()
        self.num_images = 0
