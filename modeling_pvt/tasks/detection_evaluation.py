"""COCO-style box mAP through torchmetrics' `MeanAveragePrecision` (pycocotools backend): mAP, mAP@50, mAP@75,
small/medium/large and per class, reported under transformers' `eval_*` names."""

from collections.abc import Sequence

import torch
from accelerate import Accelerator
from transformers.image_transforms import center_to_corners_format

from .evaluation import evaluation_batches


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

    def compute(self) -> dict[str, float | None]:
        """The scores; None where COCO has nothing to score (a size range or class with no objects: its -1)."""
        scores = self.metric.compute()

        def value(score) -> float | None:
            score = float(score)
            return None if score == -1.0 else score

        results = {
            f"eval_{name}": value(scores[name])
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
        for class_id, score in zip(classes, per_class):
            results[f"eval_map_{self.id2label.get(int(class_id), str(class_id))}"] = value(score)
        results["eval_samples"] = self.num_images
        return results

    def reset(self) -> None:
        self.metric.reset()
        self.num_images = 0


def _to_original_pixels(batch: dict, index: int) -> tuple[float, float]:
    """(height, width) that turn image `index`'s normalised boxes into pixels of the image before resizing.

    The processors normalise training boxes by the padded batch size (their `size` label becomes that padded size
    too), so the detector predicts in that frame; the resized image's own extent is where its pixel mask is set.
    """
    padded_height, padded_width = batch["pixel_values"].shape[-2:]
    resized_height, resized_width = padded_height, padded_width
    if batch.get("pixel_mask") is not None:
        mask = batch["pixel_mask"][index].bool()
        resized_height, resized_width = int(mask.any(dim=1).sum()), int(mask.any(dim=0).sum())
    original_height, original_width = batch["labels"][index]["orig_size"].tolist()
    return padded_height * original_height / resized_height, padded_width * original_width / resized_width


def evaluate_detector(
    accelerator: Accelerator,
    model: torch.nn.Module,
    dataloader: torch.utils.data.DataLoader,
    image_processor,
    id2label: dict[int, str],
) -> dict[str, float]:
    """COCO mAP (`DetectionEvaluator.compute`'s keys) over the whole split, every image counted once.

    Predictions go through the image processor's own `post_process_object_detection` (what users call), with no
    score threshold: mAP ranks all of them.
    """
    evaluator = DetectionEvaluator(id2label)
    for batch, inputs, size in evaluation_batches(accelerator, model, dataloader, ("pixel_values", "pixel_mask")):
        with torch.no_grad():
            outputs = model(**inputs)
        outputs.logits, outputs.pred_boxes = outputs.logits[:size].float(), outputs.pred_boxes[:size].float()
        frames = torch.tensor([_to_original_pixels(batch, index) for index in range(len(batch["labels"]))])
        predictions = image_processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=frames)
        items = []
        for prediction, labels, (height, width) in zip(predictions, batch["labels"], frames.tolist()):
            scale = torch.tensor([width, height, width, height])
            target = {
                "boxes": center_to_corners_format(labels["boxes"].float().cpu()) * scale,
                "labels": labels["class_labels"].cpu(),
            }
            items.append(({key: value.cpu() for key, value in prediction.items()}, target))
        items = accelerator.gather_for_metrics(items, use_gather_object=True)
        evaluator.update([prediction for prediction, _ in items], [target for _, target in items])
    return evaluator.compute()
