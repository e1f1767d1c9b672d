"""Fine-tune UperNet + PvtBackbone for semantic segmentation with Accelerate; mean IoU after every epoch.

The backbone starts from a PVT image-classification checkpoint (`--backbone_name_or_path`: a folder or a Hub id; its
encoder weights load, the class token, final norm and classifier are dropped), from random weights of one of the
paper's sizes (`--model_size`), or a whole segmentation model saved by this script (`--model_name_or_path`).

Data, one of:

* `--train_dir` (and optionally `--validation_dir`): folders laid out as

      <dir>/images/<stem>.<jpg|png|...>   RGB (or greyscale) images
      <dir>/masks/<stem>.png              single-channel masks of the same size: pixel value = class id,
                                          `--ignore_index` (255) = not scored; palette ("P" mode) PNGs such as
                                          Pascal VOC's are read as their palette indices

  Every image needs a mask with the same stem (masks without an image are ignored). Without `--validation_dir`,
  `--train_val_split` of the training pairs is held out (fixed seed).
* `--dataset_name` (and `--dataset_config_name`): a `datasets` dataset with an image column and a mask column, such as
  `scene_parse_150` (with `--reduce_labels`: ADE20K's label 0 "other" becomes ignore_index, giving 150 classes).

Class names come from `--labels_file` (a JSON list, a JSON `{"id": "name"}` object, or a text file with one name a
line); with only `--num_labels` (or neither: the largest class id found in the training masks + 1) they are
`class_0`, `class_1`, ...

The defaults follow the PVT authors' ADE20K segmentation configuration where it maps onto UperNet (see
`modeling_pvt.tasks.segmentation`).

Evaluation resizes each image to `--image_size` x `--image_size` (the image processor saved with the model does the
same; the authors instead rescale the shortest edge to 512), upsamples the logits to the mask's own size and scores
every validation image once across processes (`gather_for_metrics`) with the mean-IoU metric that ships in
`modeling_pvt/metrics/mean_iou`.

    accelerate launch scripts/train_segmentation.py --train_dir data/train --validation_dir data/val \
        --backbone_name_or_path path/to/pvt-small-classification --output_dir pvt-upernet-seg

Training runs through the same skeleton as `scripts/train.py` (`modeling_pvt.training.run`): `--checkpointing_steps
N|epoch` writes atomic checkpoints and `--resume_from_checkpoint PATH|latest` continues bit-exactly.

`--output_dir` receives the model (safetensors), the image processor, `all_results.json` (the schema of
`modeling_pvt.hub.results`: `eval_mean_iou` and the other scores of the final evaluation, per-class IoU, and every
epoch's scores under `eval_history`), a model card (`README.md`) with the measured mean IoU and, with
`--with_tracking`, TensorBoard logs; `--push_to_hub` uploads it. The saved model loads after `import modeling_pvt`, or
in plain transformers with `trust_remote_code=True` (the folder carries the model's code).
"""

from modeling_pvt.data.segmentation import SegmentationDataArguments
from modeling_pvt.tasks.segmentation import SegmentationModelArguments, SegmentationTask, complete_recipe
from modeling_pvt.training.options import TrainingArguments, parse_arguments
from modeling_pvt.training.run import run_training


def parse_args(argv: list[str] | None = None) -> SegmentationTask:
    parser, (data_args, model_args, args) = parse_arguments(
        (SegmentationDataArguments, SegmentationModelArguments, TrainingArguments),
        argv,
        description=__doc__.split("\n\n")[0],
    )
    problem = data_args.check() or model_args.check()
    if problem:
        parser.error(problem)
    complete_recipe(args)
    return SegmentationTask(data_args, model_args, args)


def main(argv: list[str] | None = None) -> None:
    run_training(parse_args(argv))


if __name__ == "__main__":
    main()
