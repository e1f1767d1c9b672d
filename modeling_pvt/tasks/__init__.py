"""The tasks floor: what each task supplies to the training skeleton (`modeling_pvt.training.run`): its options,
recipes, model builders, losses, evaluation and model card.

- `classification`, `segmentation` (UperNet), `detection` (DETR family, RT-DETR);
- `evaluation`, `detection_evaluation`: the evaluation loops; `detectors`: building detectors on a PvtBackbone.
"""
