"""A newcomer's mistakes, each answered in one clear line, last on the screen, with exit code 1: under one process
and under `accelerate launch --multi_gpu --num_processes 2` (where torchrun's own failure report follows, and ends
with the same line), with every process stopping together and nothing left in the output folder.

The single-process checks call the scripts' `main` in this process (a user's mistake ends it with `SystemExit` of the
line, which Python prints as the last line, exit code 1); one of them and the 2-process ones run real commands.
"""

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from script_launch import REPO, SCRIPT_TIMEOUT_S, SCRIPTS, environment, launch_command, load_script

from modeling_pvt import PvtConfig, PvtForImageClassification, PvtImageProcessor, cpu_acceleration
from modeling_pvt.data.classification import load_image_classification_data
from modeling_pvt.data.detection import load_detection_data
from modeling_pvt.data.segmentation import load_segmentation_data
from modeling_pvt.data.sources import DataError

TOY_CONFIG = {"hidden_sizes": [8, 16, 24, 32], "num_attention_heads": [1, 1, 1, 2], "depths": [1, 1, 1, 1]}
TOY_OVERRIDES = json.dumps(TOY_CONFIG)
TORCHRUN_RULE = "=" * 20
"""How torchrun's failure report (`ChildFailedError`) opens and closes."""


def write_image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((16, 16, 3), value, dtype=np.uint8)
    pixels[4:12, 4:12] = 255 - value
    Image.fromarray(pixels).save(path)


def image_folder(root: Path, per_class: int, classes: tuple[str, ...] = ("circle", "square")) -> Path:
    for index, label in enumerate(classes):
        for number in range(per_class):
            write_image(root / label / f"{label}_{number}.png", 30 + 150 * index + number)
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """`train/` and `val/` in the ImageNet layout, the same images loose in `flat/`, and a toy classifier."""
    root = tmp_path_factory.mktemp("newcomer")
    image_folder(root / "train", per_class=4)
    image_folder(root / "val", per_class=2)
    for number in range(6):
        write_image(root / "flat" / f"image_{number}.png", 20 * number)
    config = PvtConfig(
        image_size=32, num_labels=2, id2label={0: "circle", 1: "square"}, label2id={"circle": 0, "square": 1}
    )
    PvtForImageClassification(PvtConfig(**{**config.to_dict(), **TOY_CONFIG})).save_pretrained(root / "classifier")
    processor = PvtImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(root / "classifier")
    return root


def screen(command: list[str]) -> tuple[int, list[str]]:
    """The exit code and the non-blank lines of what the command shows, stdout and stderr in the order written (a
    progress bar's carriage return starts a line, as on a terminal)."""
    result = subprocess.run(
        command,
        cwd=REPO,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
    )
    return result.returncode, [line for line in re.split(r"[\r\n]+", result.stdout) if line.strip()]


def main_exits_with(script: str, argv: list[str]) -> str:
    """The line `scripts/<script>.py` ends with when run in this process (exit code 1: `SystemExit` of a text)."""
    with pytest.raises(SystemExit) as stopped:
        load_script(script).main(argv)
    assert isinstance(stopped.value.code, str), stopped.value.code  # Python prints it last and exits with 1
    return stopped.value.code


# ------------------------------------------------------------------------------------------ one process, each mistake
def test_a_missing_folder_is_the_last_line_of_one_process_with_exit_code_1(tmp_path):
    output_dir = tmp_path / "run"
    code, lines = screen(
        [sys.executable, str(SCRIPTS / "train.py"), "--train_dir", "imagenet/train", "--output_dir", str(output_dir)]
    )
    assert code == 1
    assert lines[-1] == "Data error: train_dir 'imagenet/train' is not a folder."
    assert not any("Traceback" in line for line in lines)
    assert not output_dir.exists()


def test_evaluation_needs_no_training_folder_but_training_does(folders, tmp_path):
    output_file = tmp_path / "scores.json"
    classifier, validation = str(folders / "classifier"), str(folders / "val")
    load_script("eval_classification").main(
        ["--model_name_or_path", classifier, "--validation_dir", validation, "--output_file", str(output_file)]
    )
    results = json.loads(output_file.read_text())
    assert results["eval_samples"] == 4 and results["dataset_name"] == f"imagefolder:{validation}"
    assert main_exits_with("train", ["--validation_dir", validation, "--output_dir", str(tmp_path / "run")]) == (
        "Data error: --validation_dir alone can be evaluated, not trained on: pass --train_dir as well."
    )


@pytest.mark.parametrize("layout", ["flat", "flat_and_classes"])
def test_images_beside_the_class_folders_say_class_sub_folders_are_expected(folders, tmp_path, layout):
    train_dir = folders / "flat" if layout == "flat" else image_folder(tmp_path / "train", per_class=2)
    if layout == "flat_and_classes":
        write_image(train_dir / "image_0.png", 0)
    message = main_exits_with("train", ["--train_dir", str(train_dir), "--output_dir", str(tmp_path / "run")])
    assert message.startswith(f"Data error: train_dir '{train_dir}' holds ")
    assert "image(s) directly (e.g. image_0.png): class sub-folders are expected, one per class" in message


def test_a_single_class_folder_is_refused(tmp_path):
    train_dir = image_folder(tmp_path / "train", per_class=4, classes=("cat",))
    message = main_exits_with("train", ["--train_dir", str(train_dir), "--output_dir", str(tmp_path / "run")])
    assert message == (
        f"Data error: The training data of imagefolder:{train_dir} has 1 class(es) (['cat']): a classifier needs at "
        "least two (for image folders: one sub-folder per class)."
    )


def test_a_training_set_smaller_than_one_batch_per_process_is_a_data_error(folders, tmp_path):
    argv = ["--train_dir", str(folders / "train"), "--validation_dir", str(folders / "val")]
    argv += ["--config_overrides", TOY_OVERRIDES, "--image_size", "32", "--per_device_train_batch_size", "16"]
    message = main_exits_with("train", [*argv, "--output_dir", str(tmp_path / "run")])
    assert message == (
        "Data error: The training set has 8 sample(s), fewer than one batch on every process "
        "(--per_device_train_batch_size 16 x 1 process(es)): add data or lower the batch size."
    )
    assert not (tmp_path / "run").exists()


def test_unknown_config_overrides_are_refused_naming_the_nearest_field(tmp_path):
    message = main_exits_with("train", ["--config_overrides", '{"hidden_size": [32]}', "--output_dir", str(tmp_path)])
    assert message == (
        "Option error: --config_overrides: PvtConfig has no field 'hidden_size' (did you mean 'hidden_sizes'?)."
    )
    detection = ["--train_dir", str(tmp_path / "coco"), "--model_size", "tiny", "--detector", "deformable_detr"]
    message = main_exits_with("train_detection", [*detection, "--config_overrides", '{"num_querys": 10}'])
    assert message == (
        "Option error: --config_overrides: PvtDeformableDetrConfig has no field 'num_querys' (did you mean "
        "'num_queries'?)."
    )
    message = main_exits_with("train_detection", [*detection, "--config_overrides", '{"two_stage": true}'])
    assert message == (
        'Option error: --config_overrides {"two_stage": true}: If two_stage is True, with_box_refine must be True.'
    )
    assert main_exits_with("train", ["--config_overrides", "{hidden_sizes", "--output_dir", str(tmp_path)]).startswith(
        "Option error: --config_overrides '{hidden_sizes' is not valid JSON"
    )


@pytest.mark.parametrize("script", ["train", "eval_classification"])
def test_a_mistyped_model_name_is_no_such_folder_and_no_hub_model(script, tmp_path):
    argv = ["--model_name_or_path", "pvt-digitz"] + (["--output_dir", str(tmp_path)] if script == "train" else [])
    message = main_exits_with(script, argv)
    assert message == (
        "Option error: --model_name_or_path 'pvt-digitz': no such folder, and not a Hub model id that could be "
        "loaded (HF_HUB_OFFLINE is set: only models in the cache load)."
    )


# ------------------------------------------------------------------------------------------------ under 2 processes
@pytest.mark.parametrize(
    ("script", "arguments", "line"),
    [
        ("train.py", ["--train_dir", "imagenet/train"], "Data error: train_dir 'imagenet/train' is not a folder."),
        (
            "train.py",
            ["--config_overrides", '{"hidden_size": [32]}'],
            "Option error: --config_overrides: PvtConfig has no field 'hidden_size' (did you mean 'hidden_sizes'?).",
        ),
        (
            "train.py",
            [
                "--train_dir",
                "{folders}/train",
                "--validation_dir",
                "{folders}/val",
                "--config_overrides",
                TOY_OVERRIDES,
                "--per_device_train_batch_size",
                "6",
            ],
            "Data error: The training set has 8 sample(s), fewer than one batch on every process "
            "(--per_device_train_batch_size 6 x 2 process(es)): add data or lower the batch size.",
        ),
        (
            "eval_classification.py",
            ["--model_name_or_path", "pvt-digitz"],
            "Option error: --model_name_or_path 'pvt-digitz': no such folder, and not a Hub model id that could be "
            "loaded (HF_HUB_OFFLINE is set: only models in the cache load).",
        ),
    ],
    ids=["missing-folder", "config-typo", "too-small", "model-typo"],
)
def test_two_processes_stop_together_and_torchrun_report_ends_with_the_line(
    folders, tmp_path, script, arguments, line
):
    arguments = [argument.replace("{folders}", str(folders)) for argument in arguments]
    output_dir = tmp_path / "run"
    if script == "train.py":
        arguments += ["--output_dir", str(output_dir)]
    code, lines = screen(launch_command(script, *arguments))
    assert code == 1
    report = max(index for index, text in enumerate(lines) if text.startswith(TORCHRUN_RULE)) - 1
    # Before torchrun's report, the main process's line, once; no process's traceback, no lost connection.
    before = lines[: lines.index(next(text for text in lines if "ChildFailedError" in text or "Traceback" in text))]
    assert before.count(line) == 1 and not any(text.startswith("[rank") for text in lines)
    assert not any("Connection closed" in text or "SIGTERM)" in text for text in lines)
    # The report's last entry before its closing rule is the same line.
    assert lines[-1].startswith(TORCHRUN_RULE) and lines[report].strip() == f"traceback : {line}"
    assert not output_dir.exists()


def test_two_processes_evaluate_a_validation_folder_alone(folders, tmp_path):
    output_file = tmp_path / "scores.json"
    arguments = ["--model_name_or_path", str(folders / "classifier"), "--validation_dir", str(folders / "val")]
    code, lines = screen(launch_command("eval_classification.py", *arguments, "--output_file", str(output_file)))
    assert code == 0, "\n".join(lines[-30:])
    results = json.loads(output_file.read_text())
    assert results["eval_samples"] == 4 and results["num_processes"] == 2


# ------------------------------------------------------------------------------------------------- data, messages
def test_segmentation_skips_a_corrupt_image_with_a_counted_warning(tmp_path, caplog):
    folder = tmp_path / "train"
    (folder / "masks").mkdir(parents=True)
    for index in range(4):
        write_image(folder / "images" / f"{index}.png", 40 * index)
        Image.fromarray(np.eye(16, dtype=np.uint8)).save(folder / "masks" / f"{index}.png")
    (folder / "images" / "2.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING, logger="modeling_pvt.data"):
        data = load_segmentation_data(train_dir=str(folder), train_val_split=0.25)
    assert data.skipped_images == 1 and len(data.train) + len(data.validation) == 3
    assert "Skipping 1 unreadable image(s) of" in caplog.text and "2.png" in caplog.text


def test_coco_checks_report_every_bad_annotation_in_one_message(tmp_path):
    folder = tmp_path / "coco"
    write_image(folder / "images" / "a.png", 0)
    annotations = [
        {"id": 7, "image_id": 1, "category_id": 9, "bbox": [1, 1, 2, 2]},  # unknown category
        {"id": 8, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 3]},  # outside the 16x16 image
        {"id": 9, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4]},  # fine
    ]
    coco = {
        "images": [{"id": 1, "file_name": "a.png"}],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "x"}],
    }
    (folder / "annotations.json").write_text(json.dumps(coco))
    with pytest.raises(DataError) as error:
        load_detection_data(train_dir=str(folder))
    message = str(error.value)
    assert message.startswith("2 bad annotation(s) in the train split: annotation 7: unknown category_id 9")
    assert "annotation 8: box [x, y, w, h] = [10.0, 10.0, 30.0, 3.0] lies outside the 16x16 image" in message


def test_evaluation_help_lists_evaluation_options_with_each_default_said_once(capsys):
    with pytest.raises(SystemExit):
        load_script("eval_classification").parse_args(["--help"])
    text = capsys.readouterr().out
    for training_only in ("--max_train_samples", "--learning_rate", "--num_train_epochs", "--output_dir"):
        assert training_only not in text
    assert "(default: None)" not in text and "(default: 128)" in text


@pytest.mark.skipif(not cpu_acceleration.ONEDNN_LINEAR, reason="no oneDNN linear kernel here")
def test_choosing_a_cpu_route_logs_at_debug_only(caplog, monkeypatch):
    monkeypatch.setattr(cpu_acceleration, "measured_routes", {})
    model = PvtForImageClassification(PvtConfig(image_size=32, **TOY_CONFIG)).eval()
    with caplog.at_level(logging.DEBUG, logger="modeling_pvt.cpu_acceleration"), torch.no_grad():
        model(pixel_values=torch.rand(1, 3, 32, 32))
    records = [record for record in caplog.records if record.name == "modeling_pvt.cpu_acceleration"]
    assert records and {record.levelno for record in records} == {logging.DEBUG}


def test_model_cards_say_how_to_install_from_the_source():
    cards = [*(REPO / "model_cards").glob("*.md"), *(REPO / "modeling_pvt" / "hub" / "card_templates").glob("*")]
    assert cards and not any("pip install modeling-pvt" in path.read_text() for path in cards)


def test_a_split_without_labels_is_refused_naming_a_row(tmp_path):
    image = Image.new("RGB", (8, 8))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    train = datasets.Dataset.from_dict({"image": [image] * 4, "label": [0, 1, 0, 1]}, features=features)
    test = datasets.Dataset.from_dict({"image": [image] * 3, "label": [0, -1, None]}, features=features)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(tmp_path / "saved")
    with pytest.raises(DataError) as error:
        load_image_classification_data(dataset_name=str(tmp_path / "saved"), evaluation_only=True)
    assert str(error.value) == (
        "2 of the 3 images of the test split have no label (e.g. row 1 of the test split): a split "
        "without labels, such as a test split, cannot be used; pick a labelled one with --split."
    )
