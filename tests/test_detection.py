"""modeling_pvt.detection: digit canvases, COCO/datasets loading with its bad-input errors, box-aware augmentation,
batching through the image processors, COCO mAP, and detectors on PvtBackbone."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import modeling_pvt  # noqa: F401  (registers the pvt backbone with transformers' Auto classes)
from modeling_pvt import PvtBackbone, PvtConfig
from modeling_pvt.data.detection import (
    DetectionCollator,
    DetectionDataset,
    build_detection_augmentation,
    load_detection_data,
)
from modeling_pvt.data.digit_canvases import INK_THRESHOLD, CanvasSpec, DigitCanvases, draw_canvas, load_digit_scans
from modeling_pvt.data.sources import DataError, UnreadableImageError
from modeling_pvt.tasks.detection_evaluation import DetectionEvaluator, box_xywh_to_xyxy
from modeling_pvt.tasks.detectors import (
    DETECTORS,
    build_detector,
    build_detector_config,
    build_image_processor,
    find_pvt_backbone,
)
from tests.conftest import TINY_CONFIG

BACKBONE = PvtConfig(**{**TINY_CONFIG, "num_labels": 10})
SMALL_HEADS = {
    "detr": dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=64, decoder_ffn_dim=64,
                 num_queries=5, encoder_attention_heads=2, decoder_attention_heads=2),
    "conditional_detr": dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=64, decoder_ffn_dim=64,
                             num_queries=5, encoder_attention_heads=2, decoder_attention_heads=2),
    "deformable_detr": dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=64, decoder_ffn_dim=64,
                            num_queries=5, encoder_attention_heads=2, decoder_attention_heads=2, two_stage=True,
                            with_box_refine=True, two_stage_num_proposals=5),
    "rt_detr": dict(d_model=32, encoder_hidden_dim=32, encoder_ffn_dim=64, decoder_ffn_dim=64, decoder_layers=1,
                    num_queries=5, num_denoising=4, encoder_attention_heads=2, decoder_attention_heads=2,
                    decoder_in_channels=[32, 32, 32]),
}  # fmt: skip


# ------------------------------------------------------------------------------------------------- digit canvases
@pytest.fixture(scope="module")
def digit_scans():
    return load_digit_scans()


def test_digit_boxes_are_the_exact_ink_extent(digit_scans):
    (scans, labels), _ = digit_scans
    spec = CanvasSpec(canvas_size=96, min_digits=1, max_digits=3, min_digit_size=16, max_digit_size=40)
    for seed in range(20):
        image, boxes, categories = draw_canvas(scans, labels, spec, np.random.default_rng(seed))
        pixels = np.asarray(image)[..., 0]
        assert image.size == (96, 96) and 1 <= len(boxes) <= 3 and len(boxes) == len(categories)
        covered = np.zeros_like(pixels, dtype=bool)
        for x, y, w, h in np.asarray(boxes, dtype=int):
            assert x >= 0 and y >= 0 and x + w <= 96 and y + h <= 96 and w > 0 and h > 0
            inside = pixels[y : y + h, x : x + w] > INK_THRESHOLD
            # Tight: ink on every edge of the box.
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            covered[y : y + h, x : x + w] = True
        assert pixels[~covered].max(initial=0) <= INK_THRESHOLD  # and no ink outside the boxes
    assert set(np.unique(labels)) == set(range(10))


def test_canvases_split_like_the_classifier_and_are_reproducible(digit_scans):
    (train_scans, _), (held_out_scans, _) = digit_scans
    assert len(train_scans) + len(held_out_scans) == 1797 and len(held_out_scans) == 360
    spec = CanvasSpec(canvas_size=64, min_digit_size=16, max_digit_size=24)
    fixed = DigitCanvases(*digit_scans[1], num_canvases=4, spec=spec, seed=1, fixed=True)
    varying = DigitCanvases(*digit_scans[0], num_canvases=4, spec=spec, seed=1, fixed=False)
    assert np.array_equal(np.asarray(fixed.sample(2, epoch=0).image), np.asarray(fixed.sample(2, epoch=5).image))
    assert np.array_equal(np.asarray(varying.sample(2, 3).image), np.asarray(varying.sample(2, 3).image))
    assert not np.array_equal(np.asarray(varying.sample(2, 0).image), np.asarray(varying.sample(2, 1).image))
    with pytest.raises(ValueError, match="min_digits"):
        CanvasSpec(min_digits=3, max_digits=2)


# ------------------------------------------------------------------------------------------------- COCO folders
def write_coco_folder(folder: Path, annotations: list[dict] | None = None, images: int = 3, size=(40, 30)) -> Path:
    (folder / "images").mkdir(parents=True)
    entries = []
    for index in range(images):
        name = f"img{index}.png"
        Image.fromarray(np.full((size[1], size[0], 3), 40 * index, dtype=np.uint8)).save(folder / "images" / name)
        entries.append({"id": 10 + index, "file_name": name, "width": size[0], "height": size[1]})
    if annotations is None:
        annotations = [
            {"id": 1, "image_id": 10, "category_id": 3, "bbox": [2, 3, 10, 12], "area": 120, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 7, "bbox": [20, 5, 19, 20], "area": 380, "iscrowd": 0},
            {"id": 3, "image_id": 11, "category_id": 7, "bbox": [0, 0, 40.5, 30], "area": 1200, "iscrowd": 0},
        ]  # image 12 has no boxes: valid, and kept
    coco = {
        "images": entries,
        "annotations": annotations,
        "categories": [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}],
    }
    (folder / "annotations.json").write_text(json.dumps(coco))
    return folder


def test_coco_folder_loads_maps_categories_and_keeps_empty_images(tmp_path):
    write_coco_folder(tmp_path / "train")
    write_coco_folder(tmp_path / "val")
    data = load_detection_data(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "val"))
    assert data.categories == ["a", "b"]  # COCO ids 3 and 7, in id order
    assert len(data.train) == 3 and len(data.validation) == 3
    samples = {data.train.sample(index).image_id: data.train.sample(index) for index in range(3)}
    assert samples[10].categories.tolist() == [0, 1]
    np.testing.assert_allclose(samples[10].boxes, [[2, 3, 10, 12], [20, 5, 19, 20]])
    np.testing.assert_allclose(samples[11].boxes, [[0, 0, 40, 30]])  # half a pixel over the edge: clipped
    assert samples[12].boxes.shape == (0, 4) and samples[12].categories.shape == (0,)


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        ({"id": 41, "image_id": 10, "category_id": 5, "bbox": [1, 1, 2, 2]}, "annotation 41: unknown category_id 5"),
        ({"id": 42, "image_id": 99, "category_id": 3, "bbox": [1, 1, 2, 2]}, "annotation 42: unknown image_id 99"),
        ({"id": 43, "image_id": 10, "category_id": 3, "bbox": [30, 1, 20, 2]}, "annotation 43.*outside the 40x30"),
        ({"id": 44, "image_id": 10, "category_id": 3, "bbox": [1, 1, 0, 2]}, "annotation 44.*no area"),
        ({"id": 45, "image_id": 10, "category_id": 3, "bbox": [1, 1, 2]}, r"annotation 45: bbox \[1, 1, 2\]"),
    ],
)
def test_bad_coco_annotations_are_named(tmp_path, annotation, message):
    write_coco_folder(tmp_path / "train", annotations=[annotation])
    with pytest.raises(DataError, match=message):
        load_detection_data(train_dir=str(tmp_path / "train"), train_val_split=0.34)


def test_missing_or_malformed_annotation_file_is_named(tmp_path):
    write_coco_folder(tmp_path / "train")
    (tmp_path / "train" / "annotations.json").unlink()
    with pytest.raises(DataError, match=r"train/annotations.json' is missing"):
        load_detection_data(train_dir=str(tmp_path / "train"))
    (tmp_path / "train" / "annotations.json").write_text("{not json")
    with pytest.raises(DataError, match="annotations.json' is not valid JSON"):
        load_detection_data(train_dir=str(tmp_path / "train"))
    with pytest.raises(DataError, match="does not exist"):
        load_detection_data(train_dir=str(tmp_path / "nowhere"))


def test_corrupt_and_missing_images_are_skipped_and_named(tmp_path, caplog):
    folder = write_coco_folder(tmp_path / "train", images=4)
    (folder / "images" / "img1.png").write_bytes(b"not a png")
    (folder / "images" / "img3.png").unlink()
    data = load_detection_data(train_dir=str(folder), validation_dir=str(write_coco_folder(tmp_path / "val")))
    assert len(data.train) == 2 and data.skipped_images == 2
    assert "img1.png" in caplog.text and "img3.png" in caplog.text
    # An image that breaks after the check stops the batch with its file name.
    (folder / "images" / "img0.png").write_bytes(b"broken later")
    with pytest.raises(UnreadableImageError, match="img0.png"):
        [data.train.sample(index) for index in range(len(data.train))]


# ------------------------------------------------------------------------------------------- datasets `objects`
def objects_dataset(categories: list[list[int]], boxes: list[list[list[float]]]) -> datasets.Dataset:
    images = [Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)) for _ in categories]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": datasets.Value("int64"),
            "objects": {
                "bbox": datasets.Sequence(datasets.Sequence(datasets.Value("float32"), length=4)),
                "category": datasets.Sequence(datasets.ClassLabel(names=["cat", "dog"])),
                "id": datasets.Sequence(datasets.Value("int64")),
            },
        }
    )
    objects = [
        {"bbox": b, "category": c, "id": [100 * row + k for k in range(len(c))]}
        for row, (b, c) in enumerate(zip(boxes, categories))
    ]
    return datasets.Dataset.from_dict(
        {"image": images, "image_id": list(range(len(images))), "objects": objects}, features=features
    )


def test_datasets_objects_layout_loads_and_validates(tmp_path):
    good = objects_dataset([[0, 1], [], [1]], [[[1, 1, 5, 5], [10, 2, 20, 18]], [], [[0, 0, 30, 20]]])
    datasets.DatasetDict({"train": good, "validation": good}).save_to_disk(tmp_path / "good")
    data = load_detection_data(dataset_name=str(tmp_path / "good"))
    assert data.categories == ["cat", "dog"] and len(data.train) == 3 and data.validation_split_name == "validation"
    assert data.train.sample(1).boxes.shape == (0, 4)
    np.testing.assert_allclose(data.train.sample(0).boxes, [[1, 1, 5, 5], [10, 2, 20, 18]])

    outside = objects_dataset([[0], [1]], [[[1, 1, 5, 5]], [[25, 2, 10, 5]]])
    datasets.DatasetDict({"train": outside}).save_to_disk(tmp_path / "outside")
    with pytest.raises(DataError, match="row 1 of the train split, annotation 100.*outside the 30x20 image"):
        load_detection_data(dataset_name=str(tmp_path / "outside"), train_val_split=0.5)

    no_objects = good.remove_columns("objects")
    datasets.DatasetDict({"train": no_objects}).save_to_disk(tmp_path / "plain")
    with pytest.raises(DataError, match="no 'objects' column"):
        load_detection_data(dataset_name=str(tmp_path / "plain"))


# ------------------------------------------------------------------------------------- augmentation and batching
def test_augmentation_moves_boxes_with_pixels_and_is_reproducible():
    image = np.zeros((20, 40, 3), dtype=np.uint8)
    image[5:10, 2:8] = 255  # one white block, box [2, 5, 6, 5]

    class OneImage:
        def __len__(self):
            return 1

        def sample(self, index, epoch=0):
            from modeling_pvt.data.detection import DetectionSample

            return DetectionSample(Image.fromarray(image), 0, np.array([[2, 5, 6, 5]], np.float32), np.array([1]), "x")

    dataset = DetectionDataset(OneImage(), build_detection_augmentation(horizontal_flip=1.0, photometric=False))
    item = dataset[0]
    (annotation,) = item["annotations"]["annotations"]
    assert annotation["bbox"] == [32.0, 5.0, 6.0, 5.0] and annotation["category_id"] == 1
    assert item["image"][:, 5:10, 32:38].min() == 255 and item["image"].sum() == 255 * 3 * 30
    randomised = DetectionDataset(OneImage(), build_detection_augmentation(), augmentation_seed=3)
    randomised.set_epoch(2)
    assert torch.equal(randomised[0]["image"], randomised[0]["image"])


@pytest.mark.parametrize("detector", sorted(DETECTORS))
def test_collator_output_trains_every_detector_and_post_processes(detector, digit_scans):
    canvases = DigitCanvases(*digit_scans[0], num_canvases=2, spec=CanvasSpec(64, 1, 2, 16, 24), seed=0, fixed=True)
    processor = build_image_processor(detector, {"height": 64, "width": 64})
    batch = DetectionCollator(processor)([DetectionDataset(canvases)[index] for index in range(2)])
    config = build_detector_config(detector, BACKBONE, {i: str(i) for i in range(10)}, **SMALL_HEADS[detector])
    backbone = PvtBackbone(BACKBONE)
    model = build_detector(detector, config, backbone)
    torch.testing.assert_close(find_pvt_backbone(model).state_dict(), backbone.state_dict(), rtol=0, atol=0)
    outputs = model(**batch)
    outputs.loss.backward()
    assert (
        torch.isfinite(outputs.loss)
        and find_pvt_backbone(model).encoder.block[0][0].mlp.dense1.weight.grad.abs().sum() > 0
    )
    model.eval()
    with torch.no_grad():
        outputs = model(pixel_values=batch["pixel_values"], pixel_mask=batch.get("pixel_mask"))
    results = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(64, 64)] * 2)
    assert all(result["boxes"].shape[-1] == 4 and (result["labels"] < 10).all() for result in results)


# ---------------------------------------------------------------------------------------------------- evaluation
def test_evaluator_reports_coco_map_per_class():
    evaluator = DetectionEvaluator({0: "a", 1: "b"})
    truth = [
        {"boxes": box_xywh_to_xyxy(torch.tensor([[0.0, 0, 10, 10], [20, 20, 10, 10]])), "labels": torch.tensor([0, 1])}
    ]
    predictions = [
        {"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 25, 30]]), "scores": torch.tensor([0.9, 0.8]),
         "labels": torch.tensor([0, 1])}
    ]  # fmt: skip
    evaluator.update(predictions, truth)
    results = evaluator.compute()
    # Class a: exact hit (AP 1). Class b: IoU 50/100 = 0.5 -> a hit at IoU 0.5, a miss from 0.55 up.
    assert results["eval_map_a"] == pytest.approx(1.0)
    assert results["eval_map_50"] == pytest.approx(1.0)
    assert results["eval_map_75"] == pytest.approx(0.5)
    assert results["eval_map_b"] == pytest.approx(0.1, abs=1e-3)
    assert results["eval_samples"] == 1


# ------------------------------------------------------------------------------------------------ Mask2Former
def test_docs_mask2former_example_trains_saves_and_reloads(tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "docs" / "dense_prediction.md").read_text()
    code = readme.split("<!-- mask2former-example -->\n```python\n", 1)[1].split("```", 1)[0]
    check = (
        "\nassert isinstance(model.model.pixel_level_module.encoder, modeling_pvt.PvtBackbone)\n"
        "assert torch.isfinite(loss) and len(instances) == 2 and instances[0]['segmentation'].shape == (128, 128)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-c", code + check], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "pvt-mask2former" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------- benchmark row
def test_benchmark_detector_row_smoke(tmp_path):
    """`scripts/benchmark.py --detectors --smoke`: DETR + PVT-small and DETR + ResNet-50 build, run, get timed and
    their peak memory measured (tiny input: the machinery, not the numbers)."""
    output = tmp_path / "detection.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    script = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
    command = [sys.executable, str(script), "--detectors", "--smoke", "--threads", "1", "--output", str(output)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(output.read_text())["detector"]
    assert set(row["latency_s"]) == {"pvt_small", "resnet50"} and all(v > 0 for v in row["latency_s"].values())
    assert all(30 < millions < 60 for millions in row["parameters_millions"].values())  # DETR-R50: 41.5 M
    assert set(row["memory"]["peak_mib"]) == {"pvt_small", "resnet50"}


def test_evaluation_frames_map_padded_labels_back_to_original_pixels():
    """Two images of different sizes are resized and padded into one batch; the frame `_to_original_pixels` gives
    turns each image's normalised (padded-frame) label boxes back into its original pixel boxes."""
    from transformers.image_transforms import center_to_corners_format

    from modeling_pvt.tasks.detection_evaluation import _to_original_pixels

    processor = build_image_processor("deformable_detr", {"shortest_edge": 64, "longest_edge": 96})
    images = [Image.new("RGB", (120, 80)), Image.new("RGB", (50, 100))]  # (width, height)
    boxes = [[10.0, 20.0, 30.0, 40.0], [5.0, 60.0, 40.0, 30.0]]
    annotations = [
        {"image_id": index, "annotations": [{"bbox": box, "category_id": 1, "area": box[2] * box[3], "iscrowd": 0}]}
        for index, box in enumerate(boxes)
    ]
    batch = DetectionCollator(processor)([{"image": i, "annotations": a} for i, a in zip(images, annotations)])
    assert batch["pixel_values"].shape[-2:] == (96, 96) and batch["pixel_mask"][1, :, 50:].sum() == 0  # padded
    for index, box in enumerate(boxes):
        height, width = _to_original_pixels(batch, index)
        restored = center_to_corners_format(batch["labels"][index]["boxes"]) * torch.tensor([width, height] * 2)
        torch.testing.assert_close(restored, box_xywh_to_xyxy(torch.tensor([box])), atol=1e-3, rtol=0)
