"""scripts/train_detection.py end to end on toy sizes: two gloo processes on COCO folders, checkpoints and bit-exact
resume, TensorBoard, the push to the test Hub, the digits default, and the saved folder used like any transformers
detector (Auto class, pipeline on a real photo, post-processing), from a folder and from the Hub."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from script_launch import COMPILE_EAGER, REPO, SCRIPT_TIMEOUT_S, environment, launch_command, run

import modeling_pvt  # noqa: F401  (registers the pvt backbone with transformers' Auto classes)
from modeling_pvt import PvtConfig, PvtForImageClassification

HUB_REPO = "trainer/pvt-toy-detector"
TOY_BACKBONE = dict(hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 1, 1, 2], depths=[1, 1, 1, 1], image_size=32)
TOY_HEADS = dict(
    d_model=32,
    encoder_layers=1,
    decoder_layers=1,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    num_queries=6,
    two_stage=True,
    with_box_refine=True,
    two_stage_num_proposals=6,
)
# 10 training images (one without boxes), 2 per batch and process: 2 steps per epoch on 2 processes, 3 epochs.
# Flips and photometric distortion are on, so exact resume covers the augmentation's random generators.
# 5 validation images do not split evenly over 2 processes x 2, which exercises `gather_for_metrics`.
COCO_ARGS = [
    "--detector", "deformable_detr",
    "--config_overrides", json.dumps(TOY_HEADS),
    "--image_size", "64",
    "--per_device_train_batch_size", "2",
    "--per_device_eval_batch_size", "2",
    "--num_train_epochs", "3",
    "--learning_rate", "1e-3",
    "--backbone_learning_rate", "1e-4",
    "--warmup_epochs", "0.5",
    "--horizontal_flip", "0.5",
    "--photometric", "true",
    "--dataloader_num_workers", "0",
    "--checkpointing_steps", "2",
    "--seed", "3",
]  # fmt: skip


def launch(*args: str, processes: int = 2, env: dict | None = None, expect_success: bool = True):
    return run(launch_command("train_detection.py", *args, processes=processes), expect_success, env)


def make_coco_folder(folder: Path, num_images: int, seed: int) -> Path:
    """Squares and discs of two colours on noise; image 0 has no objects."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    images, annotations = [], []
    for index in range(num_images):
        width, height = int(rng.integers(48, 80)), int(rng.integers(48, 80))
        pixels = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
        for _ in range(0 if index == 0 else int(rng.integers(1, 3))):
            size = int(rng.integers(10, 24))
            x, y = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
            category = int(rng.integers(1, 3))
            pixels[y : y + size, x : x + size] = (230, 40, 40) if category == 1 else (40, 40, 230)
            annotations.append(
                {"id": len(annotations) + 1, "image_id": index, "category_id": category, "bbox": [x, y, size, size],
                 "area": size * size, "iscrowd": 0}
            )  # fmt: skip
        Image.fromarray(pixels).save(folder / "images" / f"{index:03d}.png")
        images.append({"id": index, "file_name": f"{index:03d}.png", "width": width, "height": height})
    categories = [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}]
    (folder / "annotations.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("detection_data")
    classifier = root / "classifier"
    torch.manual_seed(0)
    PvtForImageClassification(PvtConfig(**TOY_BACKBONE, num_labels=10)).save_pretrained(classifier)
    return {
        "train": make_coco_folder(root / "train", 10, seed=0),
        "validation": make_coco_folder(root / "validation", 5, seed=1),
        "classifier": classifier,
    }


def coco_args(data: dict[str, Path]) -> list[str]:
    return [
        "--train_dir", str(data["train"]), "--validation_dir", str(data["validation"]),
        "--backbone_name_or_path", str(data["classifier"]), *COCO_ARGS,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(data, hub, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    extra = ["--with_tracking", "--push_to_hub", "--hub_model_id", HUB_REPO]
    launch(*coco_args(data), "--output_dir", str(output_dir), *extra, env=environment(hub, output_dir / "hf_home"))
    return output_dir


def results_of(output_dir: Path) -> dict:
    return json.loads((output_dir / "all_results.json").read_text())


# ------------------------------------------------------------------------------------------ training and outputs
def test_two_process_coco_run_writes_model_results_card_and_logs(uninterrupted):
    results = results_of(uninterrupted)
    assert results["num_processes"] == 2 and results["completed_steps"] == 6
    assert len(set(results["weights_sha256_per_rank"])) == 1
    assert results["eval_samples"] == 5 and results["train_samples"] == 10
    for key in ("eval_map", "eval_map_50", "eval_map_75"):
        assert 0.0 <= results[key] <= 1.0
    assert {"eval_map_red", "eval_map_blue"} <= set(results)
    assert [entry["completed_steps"] for entry in results["eval_history"]] == [2, 4, 6]
    assert results["dataset_name"].startswith("coco:") and results["split"].startswith("coco:")
    card = ModelCard((uninterrupted / "README.md").read_text())
    assert card.data.pipeline_tag == "object-detection"
    assert {r.metric_name: r.metric_value for r in card.data.eval_results}["mAP@50"] == results["eval_map_50"]
    assert "import modeling_pvt" in card.text
    assert list((uninterrupted / "pvt_object_detection").rglob("events.out.tfevents.*"))
    assert sorted(path.name for path in (uninterrupted / "checkpoints").iterdir()) == ["step_2", "step_4", "step_6"]


def test_push_to_hub_uploads_the_output_without_checkpoints(uninterrupted, hub):
    uploads = [commit for commit in hub.commits(HUB_REPO) if "train_detection.py" in commit.title]
    assert len(uploads) == 1
    files = set(uploads[0].files)
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md", "all_results.json"} <= files
    assert not any(path.startswith("checkpoints/") for path in files)
    assert hub.file_bytes(HUB_REPO, "model.safetensors") == (uninterrupted / "model.safetensors").read_bytes()


def test_resume_from_a_checkpoint_ends_bit_identical(uninterrupted, data, tmp_path):
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(uninterrupted / "checkpoints" / "step_2", resumed_dir / "checkpoints" / "step_2")
    launch(*coco_args(data), "--output_dir", str(resumed_dir), "--resume_from_checkpoint", "latest")
    assert results_of(resumed_dir)["weights_sha256_per_rank"] == results_of(uninterrupted)["weights_sha256_per_rank"]
    assert results_of(resumed_dir)["eval_map"] == results_of(uninterrupted)["eval_map"]


def test_bad_data_stops_before_training_with_the_file_named(data, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(data["train"], broken)
    coco = json.loads((broken / "annotations.json").read_text())
    coco["annotations"][0]["bbox"] = [70, 0, 30, 30]
    (broken / "annotations.json").write_text(json.dumps(coco))
    result = launch(
        "--train_dir", str(broken), "--backbone_name_or_path", str(data["classifier"]), "--output_dir",
        str(tmp_path / "out"), *COCO_ARGS, processes=1, expect_success=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Data error" in result.stderr and "annotation 1" in result.stderr and "outside" in result.stderr


def test_torch_compile_captures_one_backbone_graph_for_training_and_one_for_evaluation(data, tmp_path):
    """One process, 2 epochs, 5 digit canvases held out in batches of 2: neither a new epoch nor the last, smaller
    evaluation batch may compile the backbone again (without the padding the count is 3)."""
    output_dir = tmp_path / "compiled"
    launch(
        "--backbone_name_or_path", str(data["classifier"]), "--image_size", "64", "--num_train_canvases", "8",
        "--num_eval_canvases", "5", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "2",
        "--num_train_epochs", "2", *COMPILE_EAGER, "--output_dir", str(output_dir), processes=1,
    )  # fmt: skip
    results = results_of(output_dir)
    assert results["torch_compile_graphs"] == 2
    assert results["eval_samples"] == 5 and results["completed_steps"] == 4


def test_torch_compile_without_a_fixed_input_size_is_refused(data, tmp_path):
    arguments = [arg for arg in coco_args(data) if arg not in ("--image_size", "64")]
    result = launch(*arguments, "--torch_compile", "--output_dir", str(tmp_path), processes=1, expect_success=False)
    assert result.returncode != 0 and "--image_size" in result.stderr
    assert not (tmp_path / "model.safetensors").exists()


# --------------------------------------------------------------------------------- the digits default and its use
@pytest.fixture(scope="module")
def digits_run(data, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("digits")
    launch(
        "--backbone_name_or_path", str(data["classifier"]), "--image_size", "64", "--num_train_canvases", "8",
        "--num_eval_canvases", "4", "--max_train_steps", "2", "--per_device_train_batch_size", "4",
        "--output_dir", str(output_dir), processes=1,
    )  # fmt: skip
    return output_dir


def test_digits_default_is_deformable_detr_on_canvases(digits_run):
    results = results_of(digits_run)
    assert results["dataset_name"] == "sklearn-digits-canvases" and results["detector"] == "deformable_detr"
    assert results["eval_samples"] == 4 and results["completed_steps"] == 2
    config = json.loads((digits_run / "config.json").read_text())
    assert config["model_type"] == "pvt_deformable_detr" and config["backbone_config"]["model_type"] == "pvt"
    assert config["id2label"] == {str(digit): str(digit) for digit in range(10)}


def test_config_overrides_apply_on_top_of_the_digits_detector():
    from modeling_pvt.tasks.detection import DIGITS_DETECTOR_SETTINGS, DetectionArguments

    digits = DetectionArguments(detector="deformable_detr", config_overrides='{"num_queries": 12, "two_stage": true}')
    expected = {**DIGITS_DETECTOR_SETTINGS["deformable_detr"], "num_queries": 12, "two_stage": True}
    assert digits.detector_overrides() == expected
    coco = DetectionArguments(detector="deformable_detr", train_dir="coco", config_overrides='{"num_queries": 12}')
    assert coco.detector_overrides() == {"num_queries": 12}


def test_saved_detector_loads_with_auto_class_and_runs_in_the_pipeline_on_a_photo(digits_run):
    from skimage import data as skimage_data
    from transformers import AutoImageProcessor, AutoModelForObjectDetection, pipeline

    photo = Image.fromarray(skimage_data.astronaut())  # 512x512 RGB photograph
    model = AutoModelForObjectDetection.from_pretrained(digits_run).eval()
    processor = AutoImageProcessor.from_pretrained(digits_run)
    with torch.no_grad():
        outputs = model(**processor(images=photo, return_tensors="pt"))
    (detections,) = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(512, 512)])
    assert len(detections["scores"]) > 0 and detections["boxes"].shape[-1] == 4
    assert (detections["labels"] < 10).all()

    detector = pipeline("object-detection", model=str(digits_run))
    found = detector(photo, threshold=0.0)
    assert found and {item["label"] for item in found} <= {str(digit) for digit in range(10)}
    top = found[0]
    assert set(top["box"]) == {"xmin", "ymin", "xmax", "ymax"} and 0 <= top["box"]["xmin"] <= 512
    assert top["score"] == pytest.approx(float(detections["scores"].max()), abs=1e-5)


def test_without_the_import_or_remote_code_transformers_asks_for_trust_remote_code(digits_run):
    client = (
        "from transformers import AutoModelForObjectDetection\n"
        f"AutoModelForObjectDetection.from_pretrained({str(digits_run)!r})\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", client],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode != 0
    assert "trust_remote_code=True" in result.stderr and str(digits_run) in result.stderr


def test_detector_from_the_hub_matches_the_trained_weights(uninterrupted, hub, tmp_path):
    client = (
        "import json, sys\nimport modeling_pvt\nfrom modeling_pvt.training.checkpoints import weights_digest\n"
        "from transformers import AutoModelForObjectDetection\n"
        f"model = AutoModelForObjectDetection.from_pretrained({HUB_REPO!r})\n"
        "print(json.dumps({'digest': weights_digest(model), 'class': type(model).__name__}))\n"
    )
    env = environment(hub, tmp_path / "fresh_home")
    result = subprocess.run([sys.executable, "-c", client], env=env, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["class"] == "DeformableDetrForObjectDetection"
    assert loaded["digest"] == results_of(uninterrupted)["weights_sha256_per_rank"][0]


def test_the_digits_default_starts_training_its_backbone_in_an_empty_folder(tmp_path):
    """The README's command in an empty folder first trains `pvt-digits/` in-process: that start (logging before any
    Accelerator exists) must neither fail nor leave the processes each running alone. The training itself is replaced
    by a stub that reports its output folder and how many processes it trains with."""
    client = tmp_path / "client.py"
    client.write_text(
        "from accelerate import PartialState\n"
        "from modeling_pvt.tasks import detection\n"
        "detection.run_training = lambda task, **kwargs: print("
        "f'trains {task.args.output_dir} on {PartialState().num_processes} processes')\n"
        "detection.ensure_digits_backbone('pvt-digits')\n"
    )
    command = launch_command("train.py", processes=2)[:-1] + [str(client)]
    result = subprocess.run(
        command, cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trains pvt-digits on 2 processes") == 2, result.stdout[-3000:]
