"""Semantic segmentation: the data pipeline (`modeling_pvt.segmentation_data`), `scripts/train_segmentation.py`
(model set-up, a 2-process run with checkpoints, card and Hub push, exact resume) and the shipped mean_iou metric."""

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file
from script_launch import SCRIPTS, environment, launch_command, load_script, run

import modeling_pvt  # noqa: F401  (registers the pvt backbone for UperNet's from_pretrained)
from modeling_pvt import PvtBackbone, PvtConfig, PvtForImageClassification
from modeling_pvt.data.segmentation import (
    SegmentationDataset,
    build_segmentation_processor,
    find_image_mask_pairs,
    folder_dataset,
    infer_num_labels,
    load_segmentation_data,
    make_collate_eval,
    mask_to_array,
    read_labels_file,
    train_transform,
)
from modeling_pvt.metrics import load_metric
from modeling_pvt.tasks.segmentation import build_segmenter
from modeling_pvt.training.checkpoints import resolve_checkpoint

IGNORE = 255


@pytest.fixture(scope="module")
def script():
    return load_script("train_segmentation")


@pytest.fixture(scope="module")
def mean_iou():
    return load_metric("mean_iou")


# ------------------------------------------------------------------------------------------------------- metric


def test_mean_iou_pools_pixels_over_images(mean_iou):
    predictions = [np.array([[0, 1, 1], [1, 2, 2]]), np.array([[2, 2], [0, 0]])]
    references = [np.array([[0, 0, 1], [1, 2, IGNORE]]), np.array([[2, 2], [0, IGNORE]])]
    results = mean_iou.compute(predictions=predictions, references=references, num_labels=3, ignore_index=IGNORE)
    # Worked by hand over the 8 labelled pixels (the 2 ignored ones count nowhere, not even as predictions):
    #   class 0: labels 3, predicted 2, both 2 -> IoU 2 / (3 + 2 - 2) = 2/3, accuracy 2/3
    #   class 1: labels 2, predicted 3, both 2 -> IoU 2 / (2 + 3 - 2) = 2/3, accuracy 1
    #   class 2: labels 3, predicted 3, both 3 -> IoU 3 / 3 = 1,             accuracy 1
    # Averaging per image instead would give (13/18 + 1) / 2 = 31/36, not 7/9.
    np.testing.assert_allclose(results["per_category_iou"], [2 / 3, 2 / 3, 1.0])
    np.testing.assert_allclose(results["per_category_accuracy"], [2 / 3, 1.0, 1.0])
    assert results["mean_iou"] == pytest.approx(7 / 9)
    assert results["mean_accuracy"] == pytest.approx(8 / 9)
    assert results["overall_accuracy"] == pytest.approx(7 / 8)


def test_absent_classes_do_not_count_but_false_positives_do(mean_iou):
    reference = np.array([[0, 0], [1, 1]])
    perfect = mean_iou.compute(predictions=[reference], references=[reference], num_labels=4, ignore_index=IGNORE)
    assert perfect["mean_iou"] == 1.0  # classes 2 and 3 occur nowhere: NaN, left out of the mean
    assert np.isnan(perfect["per_category_iou"][2:]).all()
    filled = mean_iou.compute(
        predictions=[reference], references=[reference], num_labels=4, ignore_index=IGNORE, nan_to_num=0.0
    )
    np.testing.assert_array_equal(filled["per_category_iou"], [1.0, 1.0, 0.0, 0.0])
    # One pixel of class 1 predicted as the absent class 3: class 3 now counts with IoU 0.
    wrong = mean_iou.compute(
        predictions=[np.array([[0, 0], [1, 3]])], references=[reference], num_labels=4, ignore_index=IGNORE
    )
    np.testing.assert_allclose(wrong["per_category_iou"][[0, 1, 3]], [1.0, 0.5, 0.0])
    assert wrong["mean_iou"] == pytest.approx(0.5)


def test_reduce_labels_and_label_map(mean_iou):
    # reduce_labels: 0 becomes ignored, 1..3 become 0..2.
    references = [np.array([[0, 1], [2, 3]])]
    results = mean_iou.compute(
        predictions=[np.array([[2, 0], [1, 2]])],
        references=references,
        num_labels=3,
        ignore_index=IGNORE,
        reduce_labels=True,
    )
    assert results["mean_iou"] == 1.0
    mapped = mean_iou.compute(
        predictions=[np.array([[1, 1], [0, 0]])],
        references=[np.array([[5, 5], [0, 0]])],
        num_labels=2,
        ignore_index=IGNORE,
        label_map={5: 1},
    )
    assert mapped["mean_iou"] == 1.0


def test_metric_refuses_out_of_range_ids_and_shape_mismatches(mean_iou):
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        mean_iou.compute(predictions=[np.zeros((2, 2))], references=[np.full((2, 2), 3)], num_labels=3, ignore_index=9)
    with pytest.raises(ValueError, match="does not match"):
        mean_iou.compute(predictions=[np.zeros((2, 3))], references=[np.zeros((3, 2))], num_labels=3, ignore_index=9)


# ---------------------------------------------------------------------------------------------------------- data


def make_shapes_folder(folder: Path, count: int, seed: int) -> None:
    """Images of a square (class 1) and a disk (class 2) on background (class 0), each of its own size; the disk's
    rim is unlabelled (IGNORE), as object borders in Pascal VOC."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir(parents=True)
    colours = np.array([[40, 40, 40], [220, 60, 60], [60, 60, 220]], dtype=np.float64)
    for index in range(count):
        height, width = int(rng.integers(40, 64)), int(rng.integers(40, 72))
        mask = np.zeros((height, width), dtype=np.uint8)
        top, left = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
        side = int(rng.integers(10, 20))
        mask[top : top + side, left : left + side] = 1
        rows, columns = np.mgrid[:height, :width]
        distance = np.hypot(rows - rng.integers(0, height), columns - rng.integers(0, width))
        radius = int(rng.integers(6, 12))
        mask[distance <= radius] = 2
        mask[(distance > radius) & (distance <= radius + 1)] = IGNORE
        image = colours[np.minimum(mask, 2)] + rng.normal(0, 20, (height, width, 3))
        suffix = ".png" if index % 2 else ".jpg"  # both kinds of image file
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / "images" / f"{index:03d}{suffix}")
        Image.fromarray(mask).save(folder / "masks" / f"{index:03d}.png")


def test_folder_pairs_and_missing_masks(tmp_path):
    make_shapes_folder(tmp_path / "data", 3, seed=0)
    images, masks = find_image_mask_pairs(tmp_path / "data")
    assert [Path(path).stem for path in images] == [Path(path).stem for path in masks] == ["000", "001", "002"]
    (tmp_path / "data" / "masks" / "001.png").unlink()
    with pytest.raises(ValueError, match=r"001\.png"):
        find_image_mask_pairs(tmp_path / "data")
    with pytest.raises(ValueError, match="images/ and masks/"):
        find_image_mask_pairs(tmp_path / "nowhere")


def test_masks_are_checked_and_decoded(tmp_path):
    make_shapes_folder(tmp_path / "data", 2, seed=0)
    pairs = folder_dataset(tmp_path / "data")
    assert infer_num_labels(pairs, reduce_labels=False, ignore_index=IGNORE) == 3
    options = dict(ignore_index=IGNORE, reduce_labels=False, processor=None, augment=train_transform(32, IGNORE))
    # An id beyond num_labels names the mask file instead of failing inside the loss.
    too_few_classes = SegmentationDataset(pairs, num_labels=2, **options)
    with pytest.raises(ValueError, match=r"000\.png.*outside \[0, 2\)"):
        too_few_classes[0]
    dataset = SegmentationDataset(pairs, num_labels=3, augmentation_seed=0, **options)
    for sample in (dataset[0], dataset[1]):
        assert sample["pixel_values"].shape == (3, 32, 32) and sample["labels"].shape == (32, 32)
        assert set(sample["labels"].unique().tolist()) <= {0, 1, 2, IGNORE}
    # Seeded augmentation: the same sample in the same epoch, however often it is loaded; another in the next one.
    assert torch.equal(dataset[1]["pixel_values"], dataset[1]["pixel_values"])
    first_epoch = dataset[1]["labels"]
    dataset.set_epoch(1)
    assert not torch.equal(dataset[1]["labels"], first_epoch)
    rgb_mask = Image.new("RGB", (4, 4))
    with pytest.raises(ValueError, match="single-channel"):
        mask_to_array(rgb_mask, reduce_labels=False, ignore_index=IGNORE)
    reduced = mask_to_array(Image.fromarray(np.array([[0, 1], [2, IGNORE]], np.uint8)), True, IGNORE)
    np.testing.assert_array_equal(reduced, [[IGNORE, 0], [1, IGNORE]])
    # Evaluation samples go through the processor and keep the mask's own size.
    processor = build_segmentation_processor(32, reduce_labels=False)
    evaluation = SegmentationDataset(
        pairs, num_labels=3, ignore_index=IGNORE, reduce_labels=False, processor=processor
    )
    image = pairs[0]["image"]
    assert evaluation[0]["pixel_values"].shape == (3, 32, 32)
    assert evaluation[0]["labels"].shape == (image.height, image.width)


def test_datasets_source_finds_the_mask_column_and_validation_split(tmp_path):
    """A `datasets` dataset laid out like scene_parse_150 (image, annotation, scene_category; train + validation)."""
    import datasets

    make_shapes_folder(tmp_path / "train", 3, seed=0)
    make_shapes_folder(tmp_path / "validation", 2, seed=1)
    (tmp_path / "hub" / "data").mkdir(parents=True)
    for split in ("train", "validation"):
        images, masks = find_image_mask_pairs(tmp_path / split)
        table = {"image": images, "annotation": masks, "scene_category": [0] * len(images)}
        dataset = datasets.Dataset.from_dict(table).cast_column("image", datasets.Image())
        dataset.cast_column("annotation", datasets.Image()).to_parquet(tmp_path / "hub" / "data" / f"{split}.parquet")
    data = load_segmentation_data(dataset_name=str(tmp_path / "hub"))
    assert data.train.column_names == data.validation.column_names == ["image", "label"]
    assert (len(data.train), len(data.validation)) == (3, 2)
    assert data.results_fields() == {
        "dataset_name": str(tmp_path / "hub"),
        "dataset_config_name": None,
        "split": "validation",
    }
    # --reduce_labels (ADE20K's convention) turns 3 classes with a background into 2.
    assert infer_num_labels(data.train, reduce_labels=True, ignore_index=IGNORE) == 2
    with pytest.raises(ValueError, match="scene_category"):
        load_segmentation_data(dataset_name=str(tmp_path / "hub"), label_column_name="segmentation_map")
    # Without a validation split, part of train is held out; quick runs keep the first N of each split.
    held_out = load_segmentation_data(train_dir=str(tmp_path / "train"), train_val_split=0.3, max_train_samples=1)
    assert (len(held_out.train), len(held_out.validation)) == (1, 1)
    assert held_out.validation_split_name == "train[30% held out, seed 42]"


def test_evaluation_batches_pad_masks_with_ignore_index():
    collate = make_collate_eval(IGNORE)
    batch = collate(
        [
            {"pixel_values": torch.zeros(3, 8, 8), "labels": torch.ones(2, 5, dtype=torch.int64)},
            {"pixel_values": torch.zeros(3, 8, 8), "labels": torch.zeros(4, 3, dtype=torch.int64)},
        ]
    )
    assert batch["labels"].shape == (2, 4, 5)
    assert batch["label_sizes"].tolist() == [[2, 5], [4, 3]]
    assert (batch["labels"][0, 2:] == IGNORE).all() and (batch["labels"][1, :, 3:] == IGNORE).all()


@pytest.mark.parametrize(
    ("file_name", "content"),
    [
        ("labels.json", json.dumps(["sky", "road", "car"])),
        ("labels.json", json.dumps({"2": "car", "0": "sky", "1": "road"})),
        ("labels.txt", "sky\nroad\ncar\n"),
    ],
)
def test_labels_files(tmp_path, file_name, content):
    (tmp_path / file_name).write_text(content)
    assert read_labels_file(str(tmp_path / file_name)) == ["sky", "road", "car"]


@pytest.mark.parametrize(
    "arguments",
    [
        ["--output_dir", "out", "--model_size", "tiny"],  # no data
        ["--output_dir", "out", "--train_dir", "d"],  # no model
        ["--output_dir", "out", "--train_dir", "d", "--model_size", "tiny", "--backbone_name_or_path", "x"],
        ["--output_dir", "out", "--train_dir", "d", "--model_size", "tiny", "--num_labels", "300"],  # 255 is a class
    ],
)
def test_contradictory_arguments_are_refused(script, arguments):
    with pytest.raises(SystemExit):
        script.parse_args(arguments)


def save_tiny_classifier(folder: Path, tiny_config) -> PvtForImageClassification:
    classifier = PvtForImageClassification(tiny_config)
    classifier.save_pretrained(folder)
    return classifier


def test_backbone_weights_come_from_the_classification_checkpoint(script, tmp_path, tiny_config):
    classifier = save_tiny_classifier(tmp_path / "classifier", tiny_config)
    arguments = ["--output_dir", "out", "--train_dir", "d", "--backbone_name_or_path", str(tmp_path / "classifier")]
    task = script.parse_args(arguments + ["--head_hidden_size", "16"])
    model = build_segmenter(task.model_args, ["a", "b", "c"], task.data_args.ignore_index)
    assert isinstance(model.backbone, PvtBackbone)
    assert model.config.num_labels == 3 and model.config.loss_ignore_index == IGNORE
    assert model.config.backbone_config.drop_path_rate == 0.1
    classifier_weights = classifier.state_dict()
    for name, weight in model.backbone.state_dict().items():
        torch.testing.assert_close(weight, classifier_weights[f"pvt.{name}"], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------- the script
SEGMENTATION_HUB_REPO = "trainer/pvt-upernet-shapes"


def training_arguments(data: Path, output_dir: Path) -> list[str]:
    return [
        "--train_dir", str(data / "train"), "--validation_dir", str(data / "validation"),
        "--backbone_name_or_path", str(data / "classifier"), "--output_dir", str(output_dir),
        "--image_size", "64", "--head_hidden_size", "16", "--auxiliary_head_channels", "16",
        "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2", "--num_train_epochs", "2",
        "--learning_rate", "1e-5", "--dataloader_num_workers", "1", "--checkpointing_steps", "1",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def segmentation_data(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("segmentation_data")
    make_shapes_folder(data / "train", 8, seed=0)
    make_shapes_folder(data / "validation", 5, seed=1)  # 5: uneven over 2 processes x batches of 2
    save_tiny_classifier(data / "classifier", PvtConfig(**TINY_CONFIG))
    return data


@pytest.fixture(scope="module")
def segmentation_run(segmentation_data, tmp_path_factory, hub) -> Path:
    """2 processes, 2 epochs of 2 steps, a checkpoint after every step; pushed to the test Hub."""
    output_dir = tmp_path_factory.mktemp("segmentation") / "output"
    arguments = [
        *training_arguments(segmentation_data, output_dir),
        "--push_to_hub",
        "--hub_model_id",
        SEGMENTATION_HUB_REPO,
    ]
    run(launch_command("train_segmentation.py", *arguments), env=environment(hub, tmp_path_factory.mktemp("hf_home")))
    return output_dir


def test_two_process_training_run(segmentation_run, segmentation_data, mean_iou):
    """Outputs written, mIoU per epoch, and the reported mIoU equals an independent evaluation of the saved model
    through its saved image processor (every image counted once).

    The learning rate is tiny on purpose: weights near their initialisation predict every class somewhere, so each
    image weighs on every score; a few real steps already collapse the predictions to background, which hides errors.
    That training lowers the loss is `test_backbone.py::test_upernet_training_lowers_the_loss`."""
    output_dir, tmp_path = segmentation_run, segmentation_data
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "all_results.json"):
        assert (output_dir / name).is_file(), name
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["num_processes"] == 2
    assert results["eval_samples"] == 5 and results["train_samples"] == 8
    assert [epoch["epoch"] for epoch in results["eval_history"]] == [0, 1]
    assert results["completed_steps"] == 4  # 8 pairs / (2 processes x 2) per epoch, 2 epochs
    assert results["dataset_name"] == f"folder:{tmp_path / 'train'}" and results["split"] == "validation"
    for scores in [results, *results["eval_history"]]:
        assert isinstance(scores["eval_mean_iou"], float) and 0.0 <= scores["eval_mean_iou"] <= 1.0
    assert math.isfinite(results["train_loss"])
    assert set(results["eval_per_category_iou"]) == {"class_0", "class_1", "class_2"}

    from transformers import AutoImageProcessor, UperNetForSemanticSegmentation

    model = UperNetForSemanticSegmentation.from_pretrained(output_dir).eval()
    assert isinstance(model.backbone, PvtBackbone)
    processor = AutoImageProcessor.from_pretrained(output_dir)
    predictions, references = [], []
    for image_path in sorted((tmp_path / "validation" / "images").iterdir()):
        image = Image.open(image_path).convert("RGB")
        with torch.no_grad():
            outputs = model(**processor(images=image, return_tensors="pt"))
        prediction = processor.post_process_semantic_segmentation(outputs, target_sizes=[(image.height, image.width)])
        predictions.append(prediction[0].numpy())
        references.append(np.asarray(Image.open(tmp_path / "validation" / "masks" / f"{image_path.stem}.png")))
    independent = mean_iou.compute(predictions=predictions, references=references, num_labels=3, ignore_index=IGNORE)
    # A lost or doubly counted image moves these by ~1e-2 (checked by swapping in a plain `gather`), far more than
    # the odd pixel whose argmax could flip with another batch composition.
    for name in ("mean_iou", "mean_accuracy", "overall_accuracy"):
        assert results[f"eval_{name}"] == pytest.approx(independent[name], abs=2e-3), name
    reported_per_class = [results["eval_per_category_iou"][f"class_{index}"] for index in range(3)]
    np.testing.assert_allclose(reported_per_class, independent["per_category_iou"], atol=2e-3)

    # The card states the measured mean IoU, in its text and its model-index.
    card = ModelCard((output_dir / "README.md").read_text())
    assert card.data.pipeline_tag == "image-segmentation"
    scores = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert scores["mean_iou"] == results["eval_mean_iou"]
    assert f"| Mean IoU | {100 * results['eval_mean_iou']:.2f}% |" in card.text
    assert "AutoModelForSemanticSegmentation" in card.text


def test_torch_compile_captures_one_graph_for_training_and_one_for_evaluation(segmentation_data, tmp_path):
    """One process, 5 validation images in batches of 2: the last, smaller batch must not compile again."""
    output_dir = tmp_path / "compiled"
    arguments = [
        *training_arguments(segmentation_data, output_dir),
        "--torch_compile",
        "--torch_compile_backend",
        "eager",
    ]
    run([sys.executable, str(SCRIPTS / "train_segmentation.py"), *arguments])
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["torch_compile_graphs"] == 2
    assert results["eval_samples"] == 5


def test_push_to_hub_uploads_the_model_without_checkpoints(segmentation_run, hub):
    uploads = [commit for commit in hub.commits(SEGMENTATION_HUB_REPO) if "train_segmentation.py" in commit.title]
    assert len(uploads) == 1
    files = set(uploads[0].files)
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md", "all_results.json"} <= files
    assert not any(path.startswith("checkpoints/") for path in files)
    assert hub.file_bytes(SEGMENTATION_HUB_REPO, "README.md") == (segmentation_run / "README.md").read_bytes()


def test_resume_from_a_checkpoint_matches_the_uninterrupted_run(segmentation_run, segmentation_data, tmp_path):
    """Resumed mid-epoch (after step 3 of 4, the middle of epoch 1): seeded augmentation, sample order, stochastic
    depth and the schedule all continue as if never interrupted, so the weights are bit-identical."""
    output_dir = tmp_path / "resumed"
    shutil.copytree(segmentation_run / "checkpoints" / "step_3", output_dir / "checkpoints" / "step_3")
    arguments = [*training_arguments(segmentation_data, output_dir), "--resume_from_checkpoint", "latest"]
    resumed = run(launch_command("train_segmentation.py", *arguments))
    assert "Resumed from" in resumed.stdout + resumed.stderr
    reference = load_file(segmentation_run / "model.safetensors")
    final = load_file(output_dir / "model.safetensors")
    assert reference.keys() == final.keys()
    assert all(torch.equal(reference[name], final[name]) for name in reference)
    expected, actual = (json.loads((path / "all_results.json").read_text()) for path in (segmentation_run, output_dir))
    assert actual["eval_mean_iou"] == expected["eval_mean_iou"]
    with pytest.raises(FileNotFoundError, match="No complete checkpoint"):
        resolve_checkpoint("latest", tmp_path / "nothing")
