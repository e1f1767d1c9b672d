"""Semantic segmentation: UperNet (transformers) on a PvtBackbone.

The recipe follows the PVT authors' ADE20K segmentation configuration (which used a Semantic FPN head; here the head
is UperNet) where it maps onto this package: AdamW with learning rate 1e-4 and weight decay 1e-4, polynomial decay
(power 0.9), random rescaling to 0.5-2x of `image_size` (shortest edge), random `image_size` crops (padded with
ignore_index) and horizontal flips. Not reproduced: photometric distortion and the crop's category-ratio cap.
"""

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from accelerate import Accelerator

from ..configuration_pvt import PvtConfig
from ..configuration_pvt_heads import PvtUperNetConfig
from ..data.segmentation import (
    SegmentationData,
    SegmentationDataArguments,
    SegmentationDataset,
    build_segmentation_processor,
    collate_train,
    make_collate_eval,
    train_transform,
)
from ..hub.model_card import render_trained_card
from ..hub.results import SEMANTIC_SEGMENTATION
from ..modeling_pvt import PvtBackbone
from ..modeling_pvt_heads import UperNetForSemanticSegmentation
from ..training.options import TrainingArguments, apply_recipe, loading_pretrained
from ..training.run import TaskDatasets, TrainingTask, default_repo_id
from .evaluation import evaluate_segmentation

RECIPE = {
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 4,
    "learning_rate": 1e-4,
    "weight_decay": 1e-4,
    "num_train_epochs": 10,
    "lr_scheduler_type": "polynomial",
    "lr_scheduler_kwargs": '{"power": 0.9}',
    "warmup_epochs": 0,
    "dataloader_num_workers": 2,
    "output_dir": "pvt-upernet-segmentation",
}

CARD_SETTINGS = (
    "image_size",
    "num_train_epochs",
    "per_device_train_batch_size",
    "learning_rate",
    "weight_decay",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_epochs",
    "head_hidden_size",
    "auxiliary_head_channels",
    "drop_path_rate",
    "seed",
)


@dataclass
class SegmentationModelArguments:
    """Where the segmentation model starts, and its heads."""

    _argument_group_name = "model"

    backbone_name_or_path: str | None = field(
        default=None,
        metadata={"help": "PVT classification checkpoint (folder or Hub id) whose encoder initialises the backbone."},
    )
    model_size: Literal["tiny", "small", "medium", "large"] | None = field(
        default=None, metadata={"help": "Randomly initialised PVT of this size."}
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A UperNet + PVT segmentation model saved by this script, to fine-tune further."},
    )
    image_size: int = field(default=512, metadata={"help": "Training crop and evaluation size (square)."})
    head_hidden_size: int = field(default=512, metadata={"help": "Channels of the UperNet decode head."})
    auxiliary_head_channels: int = field(default=256, metadata={"help": "Channels of the auxiliary head."})
    no_auxiliary_head: bool = field(default=False, metadata={"help": "Train without the auxiliary FCN head."})
    drop_path_rate: float = field(default=0.1, metadata={"help": "Stochastic depth of the backbone."})
    no_sync_batchnorm: bool = field(
        default=False,
        metadata={"help": "Keep per-GPU BatchNorm statistics in the heads (default: synchronised on multi-GPU runs)."},
    )

    def check(self) -> str | None:
        sources = [self.backbone_name_or_path, self.model_size, self.model_name_or_path]
        if sum(source is not None for source in sources) != 1:
            return (
                "Give exactly one of --backbone_name_or_path (classification weights), --model_size (random weights) "
                "or --model_name_or_path (a saved segmentation model)."
            )
        return None


def complete_recipe(args: TrainingArguments) -> None:
    apply_recipe((args,), RECIPE)


def build_segmenter(
    model_args: SegmentationModelArguments, labels: list[str], ignore_index: int
) -> UperNetForSemanticSegmentation:
    """UperNet on a PvtBackbone fed by every stage, from a saved segmenter, classification weights or a size."""
    id2label = dict(enumerate(labels))
    label_kwargs = {"num_labels": len(labels), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    if model_args.model_name_or_path:
        with loading_pretrained("--model_name_or_path", model_args.model_name_or_path):
            return UperNetForSemanticSegmentation.from_pretrained(
                model_args.model_name_or_path,
                loss_ignore_index=ignore_index,
                ignore_mismatched_sizes=True,
                **label_kwargs,
            )
    backbone = None
    if model_args.backbone_name_or_path:
        with loading_pretrained("--backbone_name_or_path", model_args.backbone_name_or_path):
            backbone = PvtBackbone.from_pretrained(
                model_args.backbone_name_or_path,
                drop_path_rate=model_args.drop_path_rate,
                out_features=["stage1", "stage2", "stage3", "stage4"],
            )
        backbone_config = backbone.config
    else:
        backbone_config = PvtConfig.from_preset(model_args.model_size, drop_path_rate=model_args.drop_path_rate)
    config = PvtUperNetConfig(
        backbone_config=backbone_config,
        hidden_size=model_args.head_hidden_size,
        auxiliary_channels=model_args.auxiliary_head_channels,
        auxiliary_in_channels=None,  # the third stage's width, read from the backbone
        use_auxiliary_head=not model_args.no_auxiliary_head,
        loss_ignore_index=ignore_index,
        **label_kwargs,
    )
    model = UperNetForSemanticSegmentation(config)
    if backbone is not None:
        model.backbone.load_state_dict(backbone.state_dict())
    return model


class SegmentationTask(TrainingTask):
    project_name = "pvt_semantic_segmentation"
    script = "scripts/train_segmentation.py"

    def __init__(
        self, data_args: SegmentationDataArguments, model_args: SegmentationModelArguments, args: TrainingArguments
    ):
        super().__init__(args)
        self.data_args, self.model_args = data_args, model_args

    def hyperparameters(self) -> dict:
        return {**asdict(self.data_args), **asdict(self.model_args), **asdict(self.args)}

    def load_data(self) -> SegmentationData:
        return self.data_args.load(split_seed=self.args.seed)

    def build_model(self, data: SegmentationData, accelerator: Accelerator):
        model = build_segmenter(self.model_args, data.labels, self.data_args.ignore_index)
        if (
            accelerator.num_processes > 1
            and accelerator.device.type == "cuda"
            and not self.model_args.no_sync_batchnorm
        ):
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model, build_segmentation_processor(self.model_args.image_size, self.data_args.reduce_labels)

    def build_datasets(self, data: SegmentationData, processor) -> TaskDatasets:
        data_args = self.data_args
        pairs = {
            "num_labels": len(data.labels),
            "ignore_index": data_args.ignore_index,
            "reduce_labels": data_args.reduce_labels,
        }
        augment = train_transform(self.model_args.image_size, data_args.ignore_index)
        return TaskDatasets(
            train=SegmentationDataset(
                data.train, processor=processor, augment=augment, augmentation_seed=self.args.seed, **pairs
            ),
            validation=SegmentationDataset(data.validation, processor=processor, **pairs),
            # Incomplete batches are dropped: a batch of one sample breaks the heads' BatchNorm on the 1x1 pooled map.
            train_collate=collate_train,
            eval_collate=make_collate_eval(data_args.ignore_index),
        )

    def build_loss(self, accelerator: Accelerator, model: torch.nn.Module, data: SegmentationData):
        return lambda batch: model(**batch).loss

    def evaluate(self, accelerator: Accelerator, model: torch.nn.Module, dataloader, data: SegmentationData) -> dict:
        return evaluate_segmentation(accelerator, model, dataloader, data.labels, self.data_args.ignore_index)

    def describe_scores(self, scores: dict) -> str:
        return (
            f"mean IoU {scores['eval_mean_iou']:.4f}, mean accuracy {scores['eval_mean_accuracy']:.4f}, "
            f"pixel accuracy {scores['eval_overall_accuracy']:.4f}"
        )

    def results_fields(self, data: SegmentationData) -> dict:
        return {
            "num_labels": len(data.labels),
            "ignore_index": self.data_args.ignore_index,
            "image_size": self.model_args.image_size,
        }

    def model_card(self, data: SegmentationData, results: dict) -> str:
        model_args = self.model_args
        backbone = (
            model_args.backbone_name_or_path
            or model_args.model_name_or_path
            or f"PVT-{model_args.model_size} (random weights)"
        )
        per_class = ", ".join(
            f"{name} {score:.3f}" if not math.isnan(score) else f"{name} n/a"
            for name, score in results["eval_per_category_iou"].items()
        )
        settings = {**asdict(model_args), **asdict(self.args)}
        return render_trained_card(
            repo_id=default_repo_id(self.args),
            task=SEMANTIC_SEGMENTATION,
            title=f"UperNet + PVT on {data.name}",
            summary="A semantic-segmentation model: UperNet (transformers) on a Pyramid Vision Transformer backbone "
            f"(PVT v1, [arXiv 2102.12122](https://arxiv.org/abs/2102.12122)) initialised from {backbone}, trained "
            f"with `modeling_pvt`'s `{self.script}` on {results['num_labels']} classes.\n\n"
            "**Loading needs the PVT code**: pass `trust_remote_code=True` (the folder carries the code), or "
            "`import modeling_pvt` first. Stock transformers has no PVT v1 backbone; without either, it asks for "
            "`trust_remote_code=True`.",
            results=results,
            source=f"`{self.script}` at the end of training",
            run_summary=f"Per-class IoU: {per_class}. Training took {results['train_runtime']:.1f} s on "
            f"{results['num_processes']} process(es), {results['completed_steps']} optimizer steps over "
            f"{results['epoch']} epoch(s).",
            settings={name: settings[name] for name in CARD_SETTINGS},
            command=self.command,
            base_model=model_args.backbone_name_or_path or model_args.model_name_or_path,
            tags=("upernet", "semantic-segmentation"),
        )
