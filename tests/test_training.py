"""Training, fine-tuning and evaluation scripts, the shipped accuracy metric and the bad-data handling.

The script tests run the real command lines in subprocesses (`accelerate launch --multi_gpu --num_processes 2` runs
two gloo processes on a CPU host) on scikit-learn's digits with a toy-width PVT, so each run takes seconds.
"""

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file
from script_launch import REPO, SCRIPT_TIMEOUT_S, SCRIPTS, environment, launch_command, load_script, run

from modeling_pvt import PvtConfig, PvtForImageClassification, PvtImageProcessor
from modeling_pvt.data.classification import (
    ImageClassificationDataset,
    build_processor_transform,
    load_image_classification_data,
)
from modeling_pvt.data.sampling import EpochSeededDataset, build_train_dataloader
from modeling_pvt.data.sources import DataError, UnreadableImageError
from modeling_pvt.hub.model_card import render_paper_size_card
from modeling_pvt.metrics import load_metric, metric_path
from modeling_pvt.tasks import classification, evaluation
from modeling_pvt.tasks.evaluation import evaluate_classifier
from modeling_pvt.training.checkpoints import list_checkpoints, resolve_checkpoint, weights_digest
from modeling_pvt.training.loop import TrainingLoop
from modeling_pvt.training.optimization import build_lr_scheduler, build_optimizer, plan_steps
from modeling_pvt.training.options import TrainingArguments, parse_arguments
from modeling_pvt.training.profiling import PROFILE_DIR_NAME, STEP_PHASES, device_busy_seconds

TOY_CONFIG = {"hidden_sizes": [8, 16, 24, 32], "num_attention_heads": [1, 1, 1, 2], "depths": [1, 1, 1, 1]}
HUB_REPO = "trainer/pvt-toy-digits"

# 64 training images, 4 per batch and process, 2 batches per optimizer step: 4 steps per epoch on 2 processes.
# Every random part of the paper's recipe is on (Mixup/CutMix, RandAugment, random erasing, flips, stochastic
# depth) and the loader runs in a worker process, so exact resume covers all the random generators involved.
# 21 validation images do not split evenly over 2 processes x 4, which exercises `gather_for_metrics`.
TRAIN_ARGS = [
    "--config_overrides", json.dumps(TOY_CONFIG),
    "--max_train_samples", "64",
    "--max_eval_samples", "21",
    "--per_device_train_batch_size", "4",
    "--per_device_eval_batch_size", "4",
    "--gradient_accumulation_steps", "2",
    "--num_train_epochs", "4",
    "--warmup_epochs", "1",
    "--learning_rate", "1e-3",
    "--mixup", "0.8",
    "--cutmix", "1.0",
    "--rand_augment", "rand-m9-mstd0.5-inc1",
    "--random_erasing", "0.25",
    "--min_crop_scale", "0.08",
    "--horizontal_flip", "0.5",
    "--drop_path_rate", "0.1",
    "--dataloader_num_workers", "1",
    "--seed", "7",
    "--checkpointing_steps", "3",
]  # fmt: skip


def _results(output_dir: Path) -> dict:
    return json.loads((output_dir / "all_results.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, hub) -> Path:
    """The reference 2-process run; it also logs to TensorBoard and pushes its output folder to the test Hub."""
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    extra = ["--with_tracking", "--push_to_hub", "--hub_model_id", HUB_REPO]
    command = launch_command("train.py", *TRAIN_ARGS, "--output_dir", str(output_dir), *extra)
    run(command, env=environment(hub, tmp_path_factory.mktemp("hf_home")))
    return output_dir


# ------------------------------------------------------------------------------------------------- train.py
def test_two_processes_end_with_identical_weights_and_count_every_sample_once(uninterrupted_run):
    results = _results(uninterrupted_run)
    assert results["num_processes"] == 2
    digests = results["weights_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    # The saved model is those weights.
    model = PvtForImageClassification.from_pretrained(uninterrupted_run)
    assert weights_digest(model) == digests[0]
    assert results["eval_samples"] == 21
    assert 0.0 <= results["eval_accuracy"] <= results["eval_top5_accuracy"] <= 1.0
    assert results["completed_steps"] == 16
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md"):
        assert (uninterrupted_run / name).is_file(), name
    card = ModelCard((uninterrupted_run / "README.md").read_text())
    assert f"| Top-1 accuracy | {100 * results['eval_accuracy']:.2f}% |" in card.text
    assert {result.metric_name: result.metric_value for result in card.data.eval_results} == {
        "Top-1 accuracy": results["eval_accuracy"],
        "Top-5 accuracy": results["eval_top5_accuracy"],
    }
    assert card.data.eval_results[0].dataset_name == results["dataset_name"] == "sklearn-digits"
    checkpoints = sorted(path.name for path in (uninterrupted_run / "checkpoints").iterdir())
    assert checkpoints == ["step_12", "step_15", "step_3", "step_6", "step_9"]


def test_tensorboard_logs_and_push_to_hub_from_the_main_process_only(uninterrupted_run, hub):
    assert list((uninterrupted_run / "pvt_image_classification").rglob("events.out.tfevents.*"))
    uploads = [commit for commit in hub.commits(HUB_REPO) if "train.py" in commit.title]
    assert len(uploads) == 1, [commit.title for commit in hub.commits(HUB_REPO)]
    files = set(uploads[0].files)
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md", "all_results.json"} <= files
    assert not any(path.startswith("checkpoints/") for path in files)
    assert hub.file_bytes(HUB_REPO, "model.safetensors") == (uninterrupted_run / "model.safetensors").read_bytes()


def test_resume_after_sigkill_matches_uninterrupted_run(uninterrupted_run, tmp_path):
    output_dir = tmp_path / "killed"
    process = subprocess.Popen(
        launch_command("train.py", *TRAIN_ARGS, "--output_dir", str(output_dir)),
        cwd=REPO,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill reaches the launcher and both workers at once
    )
    first_checkpoint = output_dir / "checkpoints" / "step_3" / "training_state.json"
    deadline = time.monotonic() + SCRIPT_TIMEOUT_S
    try:
        while not first_checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert first_checkpoint.exists(), "the run ended or timed out before its first checkpoint"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (output_dir / "all_results.json").exists(), "the run finished before it could be killed"

    # What a crash in the middle of a save leaves behind must never be taken for a checkpoint.
    (output_dir / "checkpoints" / ".step_900.tmp").mkdir()
    (output_dir / "checkpoints" / ".step_900.tmp" / "model.safetensors").write_bytes(b"partial")
    (output_dir / "checkpoints" / "step_901").mkdir()
    resumed = run(
        launch_command("train.py", *TRAIN_ARGS, "--output_dir", str(output_dir), "--resume_from_checkpoint", "latest")
    )
    assert "Resumed from" in resumed.stderr + resumed.stdout

    expected, actual = _results(uninterrupted_run), _results(output_dir)
    assert actual["weights_sha256_per_rank"] == expected["weights_sha256_per_rank"]
    assert actual["eval_accuracy"] == expected["eval_accuracy"]
    reference = load_file(uninterrupted_run / "model.safetensors")
    final = load_file(output_dir / "model.safetensors")
    assert reference.keys() == final.keys()
    assert all(torch.equal(reference[name], final[name]) for name in reference)


@pytest.mark.parametrize("processes", [1, 2])
def test_torch_compile_captures_one_graph_for_training_and_one_for_evaluation(tmp_path, processes):
    """Mixup/CutMix and random erasing on, a loader worker, 3 epochs with an evaluation after each: nothing may
    compile again. One process meets a last, smaller evaluation batch (21 images in batches of 4); two run DDP
    (accelerate evens their batches out)."""
    output_dir = tmp_path / "compiled"
    arguments = [
        *TRAIN_ARGS,
        "--num_train_epochs",
        "3",
        "--output_dir",
        str(output_dir),
        "--torch_compile",
        "--torch_compile_backend",
        "eager",
    ]
    single = [sys.executable, str(SCRIPTS / "train.py"), *arguments]
    run(launch_command("train.py", *arguments) if processes == 2 else single)
    results = _results(output_dir)
    assert results["torch_compile_graphs"] == 2
    assert results["completed_steps"] == 24 // processes and results["eval_samples"] == 21
    digests = results["weights_sha256_per_rank"]
    assert len(digests) == processes and len(set(digests)) == 1
    # The saved weights carry the model's own names, not the compiled wrapper's.
    model = PvtForImageClassification.from_pretrained(output_dir)
    assert weights_digest(model) == digests[0]
    assert 0.0 <= results["train_data_wait_fraction"] < 1.0 and results["train_samples_per_second"] > 0
    assert results["train_max_epoch_start_wait"] >= 0.0


def test_resume_rejects_incomplete_checkpoint(tmp_path):
    (tmp_path / "checkpoints" / ".step_4.tmp").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="No complete checkpoint"):
        resolve_checkpoint("latest", tmp_path)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_checkpoint(str(tmp_path / "checkpoints" / ".step_4.tmp"), tmp_path)


def test_no_weight_decay_on_biases_norms_position_embeddings_and_class_token():
    model = PvtForImageClassification(PvtConfig(image_size=32, num_labels=3, **TOY_CONFIG))
    decay, no_decay = classification.parameter_groups(model, 0.05)
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    no_decay_names = {names[id(parameter)] for parameter in no_decay["params"]}
    decay_names = {names[id(parameter)] for parameter in decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    assert "pvt.encoder.patch_embeddings.3.cls_token" in no_decay_names
    assert "pvt.encoder.patch_embeddings.0.position_embeddings" in no_decay_names
    assert "pvt.encoder.block.0.0.layer_norm_1.weight" in no_decay_names
    assert "classifier.bias" in no_decay_names
    assert "classifier.weight" in decay_names
    assert "pvt.encoder.block.0.0.attention.self.query.weight" in decay_names
    assert "pvt.encoder.patch_embeddings.0.projection.weight" in decay_names


# ----------------------------------------------------------------------------- eval_classification.py, finetune.py
def test_evaluation_script_reproduces_the_training_result(uninterrupted_run, tmp_path):
    output_file = tmp_path / "eval.json"
    command = [sys.executable, str(SCRIPTS / "eval_classification.py"), "--model_name_or_path", str(uninterrupted_run)]
    run([*command, "--max_eval_samples", "21", "--output_file", str(output_file)])
    results = json.loads(output_file.read_text())
    trained = _results(uninterrupted_run)
    for key in ("eval_samples", "dataset_name", "dataset_config_name", "split"):
        assert results[key] == trained[key], key
    assert results["eval_samples"] == 21
    assert results["model"] == str(uninterrupted_run)
    for key in ("eval_accuracy", "eval_top5_accuracy", "eval_loss"):
        assert results[key] == pytest.approx(trained[key]), key
    # A card built from this script's real output keeps every row, "Images evaluated" included.
    card = render_paper_size_card("tiny", results=results)
    assert "| Images evaluated | 21 |" in card and "`scripts/eval_classification.py`" in card


def test_finetune_from_saved_folder_with_new_labels(tmp_path):
    pretrained_dir = tmp_path / "pretrained"
    config = PvtConfig(image_size=32, num_labels=3, id2label={0: "cat", 1: "dog", 2: "fox"}, **TOY_CONFIG)
    pretrained = PvtForImageClassification(config)
    pretrained.save_pretrained(pretrained_dir)
    PvtImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        pretrained_dir
    )

    output_dir = tmp_path / "finetuned"
    run(
        [
            sys.executable,
            str(SCRIPTS / "finetune.py"),
            "--model_name_or_path",
            str(pretrained_dir),
            "--ignore_mismatched_sizes",
            "--output_dir",
            str(output_dir),
            "--max_train_samples",
            "64",
            "--max_eval_samples",
            "40",
            "--per_device_train_batch_size",
            "16",
            "--per_device_eval_batch_size",
            "16",
            "--max_steps",
            "4",
            "--eval_strategy",
            "no",
            "--logging_strategy",
            "no",
            "--dataloader_num_workers",
            "0",
        ]  # fmt: skip
    )
    results = _results(output_dir)
    assert results["eval_samples"] == 40
    assert 0.0 <= results["eval_accuracy"] <= results["eval_top5_accuracy"] <= 1.0
    finetuned = PvtForImageClassification.from_pretrained(output_dir)
    assert finetuned.config.num_labels == 10
    assert finetuned.config.id2label == {index: str(index) for index in range(10)}
    assert finetuned.classifier.weight.shape == (10, 32)
    # The body started from the saved weights and was trained further.
    original = pretrained.state_dict()["pvt.encoder.block.0.0.mlp.dense1.weight"]
    tuned = finetuned.state_dict()["pvt.encoder.block.0.0.mlp.dense1.weight"]
    assert tuned.shape == original.shape and not torch.equal(tuned, original)
    assert (output_dir / "preprocessor_config.json").is_file()
    # The card is the package's, built from this run's results file.
    assert results["dataset_name"] == "sklearn-digits" and results["split"] == "train[20% held out, seed 42]"
    card = ModelCard((output_dir / "README.md").read_text())
    assert card.data.base_model == str(pretrained_dir)
    assert {result.metric_name: result.metric_value for result in card.data.eval_results} == {
        "Top-1 accuracy": results["eval_accuracy"],
        "Top-5 accuracy": results["eval_top5_accuracy"],
    }
    assert "| Images evaluated | 40 |" in card.text and "scripts/finetune.py" in card.text


def test_finetune_help_lists_its_own_options(capsys):
    with pytest.raises(SystemExit):
        load_script("finetune").parse_arguments(["--help"])
    printed = capsys.readouterr().out
    for option in ("--dataset_name", "--horizontal_flip", "--model_name_or_path", "--learning_rate"):
        assert option in printed, option


# --------------------------------------------------------------------------------------------------- the metric
def test_accuracy_metric_loads_offline_by_path():
    metric_file = metric_path("accuracy") / "accuracy.py"
    import evaluate

    by_file = evaluate.load(str(metric_file))
    scores = np.array(
        [
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 0: rank 1
            [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 2: rank 5 -> top-5 hit only
            [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 1: rank 6 -> miss
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.2, 0.1],  # label 6: rank 2 -> top-5 hit only
        ]
    )
    references = [0, 2, 1, 6]
    assert by_file.compute(predictions=scores, references=references) == {
        "accuracy": 0.25,
        "top5_accuracy": 0.75,
    }
    by_folder = load_metric("accuracy")
    for start in (0, 2):  # batches accumulate like any evaluate metric
        by_folder.add_batch(predictions=scores[start : start + 2], references=references[start : start + 2])
    assert by_folder.compute() == {"accuracy": 0.25, "top5_accuracy": 0.75}
    assert by_folder.compute(predictions=[0, 2, 2], references=[0, 2, 1]) == {"accuracy": 2 / 3}
    with pytest.raises(ValueError, match="available"):
        load_metric("no_such_metric")


# ------------------------------------------------------------------------------------------------------ bad data
def _write_image(path: Path, value: int, image_format: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((16, 16, 3), value, dtype=np.uint8)
    pixels[4:12, 4:12] = 255 - value
    Image.fromarray(pixels).save(path, format=image_format)


def _write_truncated_jpeg(path: Path) -> None:
    """A JPEG whose header is fine (so PIL's verify passes) but whose data stops half-way (decoding fails)."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def _image_folder(root: Path, per_class: int = 4) -> Path:
    for label, value in (("circle", 30), ("square", 200)):
        for index in range(per_class):
            _write_image(root / label / f"{label}_{index}.png", value + index)
    return root


def test_corrupt_image_is_skipped_with_a_counted_warning_naming_it(tmp_path, caplog):
    train_dir = _image_folder(tmp_path / "train")
    (train_dir / "circle" / "broken.png").write_bytes(b"this is not a PNG")
    with caplog.at_level(logging.WARNING, logger="modeling_pvt.data"):
        data = load_image_classification_data(train_dir=str(train_dir), train_val_split=0.25)
    assert data.skipped_images == 1
    assert len(data.train) + len(data.validation) == 8
    assert data.labels == ["circle", "square"]
    assert "Skipping 1 unreadable image(s)" in caplog.text and "broken.png" in caplog.text


def test_image_that_fails_only_at_decoding_names_the_file(tmp_path):
    train_dir = _image_folder(tmp_path / "train")
    _write_truncated_jpeg(train_dir / "square" / "truncated.jpg")
    data = load_image_classification_data(train_dir=str(train_dir), train_val_split=0.25)
    assert data.skipped_images == 0  # the cheap check cannot see truncation
    everything = datasets.concatenate_datasets([data.train, data.validation])
    dataset = ImageClassificationDataset(
        everything, data.image_column, data.label_column, build_processor_transform(PvtImageProcessor()), "train"
    )
    with pytest.raises(UnreadableImageError, match="truncated.jpg"):
        for index in range(len(dataset)):
            dataset[index]
    decoded = load_image_classification_data(train_dir=str(train_dir), train_val_split=0.25, check_images="decode")
    assert decoded.skipped_images == 1


def test_missing_label_column_names_it_and_lists_the_columns(tmp_path):
    image = Image.new("RGB", (8, 8))
    table = datasets.Dataset.from_dict(
        {"image": [image] * 4, "target": [0, 1, 0, 1]},
        features=datasets.Features({"image": datasets.Image(), "target": datasets.Value("int64")}),
    )
    datasets.DatasetDict({"train": table}).save_to_disk(tmp_path / "saved")
    with pytest.raises(DataError, match=r"no label column 'label'; available columns: \['image', 'target'\]"):
        load_image_classification_data(dataset_name=str(tmp_path / "saved"), label_column_name="label")
    # Without a ClassLabel column or a conventional name, the error asks for the column.
    with pytest.raises(DataError, match=r"which column holds the labels; available columns: \['image', 'target'\]"):
        load_image_classification_data(dataset_name=str(tmp_path / "saved"))
    # Named correctly, plain integer labels work.
    data = load_image_classification_data(
        dataset_name=str(tmp_path / "saved"), label_column_name="target", train_val_split=0.5
    )
    assert data.labels == ["0", "1"]


def test_empty_or_missing_folder_is_named(tmp_path):
    (tmp_path / "empty" / "some_class").mkdir(parents=True)
    with pytest.raises(DataError, match=r"train_dir '.*empty' holds no image files"):
        load_image_classification_data(train_dir=str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"validation_dir '.*nowhere' is not a folder"):
        load_image_classification_data(
            train_dir=str(_image_folder(tmp_path / "train")), validation_dir=str(tmp_path / "nowhere")
        )


def test_unknown_dataset_is_named():
    with pytest.raises(DataError, match="Cannot load dataset 'no-such-org/no-such-dataset'"):
        load_image_classification_data(dataset_name="no-such-org/no-such-dataset")


def test_failures_after_training_keep_the_trained_weights(tmp_path):
    train_dir = _image_folder(tmp_path / "train", per_class=8)
    validation_dir = _image_folder(tmp_path / "validation", per_class=2)
    _write_truncated_jpeg(validation_dir / "circle" / "truncated.jpg")
    common = [
        sys.executable, str(SCRIPTS / "train.py"),
        "--train_dir", str(train_dir), "--validation_dir", str(validation_dir),
        "--config_overrides", json.dumps(TOY_CONFIG), "--image_size", "32",
        "--per_device_train_batch_size", "4", "--dataloader_num_workers", "0",
    ]  # fmt: skip

    # The evaluation after epoch 0 of 2 fails: the weights trained so far are kept.
    interrupted = run([*common, "--num_train_epochs", "2", "--output_dir", str(tmp_path / "a")], expect_success=False)
    assert interrupted.returncode != 0
    assert "truncated.jpg" in interrupted.stderr
    kept = PvtForImageClassification.from_pretrained(tmp_path / "a" / "interrupted_model")
    assert kept.config.num_labels == 2
    assert (tmp_path / "a" / "interrupted_model" / "preprocessor_config.json").is_file()

    # The final evaluation fails: the model was saved before it.
    final = run([*common, "--num_train_epochs", "1", "--output_dir", str(tmp_path / "b")], expect_success=False)
    assert final.returncode != 0
    assert "truncated.jpg" in final.stderr and "the trained model is saved" in final.stderr
    assert PvtForImageClassification.from_pretrained(tmp_path / "b").config.num_labels == 2


# ------------------------------------------------------------------------------------------- the shared training loop
class _NoisyPoints(EpochSeededDataset):
    """Points whose augmentation (random noise) must replay exactly after a resume."""

    def __init__(self):
        self.points = torch.linspace(-1, 1, 24).unsqueeze(1)
        self.augmentation_seed = 3

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, index: int) -> dict:
        with self.augmentation(index):
            noise = torch.randn(1)
        return {"inputs": self.points[index] + 0.1 * noise, "targets": 3 * self.points[index]}


def _train_toy_model(output_dir: Path, resume_from: str | None = None) -> dict:
    """Any task's model, data and loss run through `TrainingLoop` (here: dropout regression, 2 epochs of 3 steps)."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    set_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = build_train_dataloader(_NoisyPoints(), 4, seed=5, collate_fn=torch.utils.data.default_collate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    plan = plan_steps(len(loader), 2, num_train_epochs=2, max_train_steps=None)
    scheduler = build_lr_scheduler(accelerator, optimizer, "cosine", 1, plan.max_train_steps)
    options = TrainingArguments(output_dir=output_dir, checkpointing_steps="1", resume_from_checkpoint=resume_from)
    loop = TrainingLoop(accelerator, model, optimizer, scheduler, loader, plan, PvtImageProcessor(), options)
    loop.run(lambda batch: torch.nn.functional.mse_loss(model(batch["inputs"]), batch["targets"]))
    return {name: tensor.clone() for name, tensor in accelerator.unwrap_model(model).state_dict().items()}


def test_training_loop_resumes_any_model_exactly_from_any_checkpoint(tmp_path):
    reference = _train_toy_model(tmp_path / "reference")
    steps = [path.name for _, path in list_checkpoints(tmp_path / "reference")]
    assert steps == [f"step_{step}" for step in range(1, 7)]
    for checkpoint in ("step_2", "step_4"):  # mid-epoch and at an epoch boundary
        resumed_dir = tmp_path / f"from_{checkpoint}"
        shutil.copytree(tmp_path / "reference" / "checkpoints" / checkpoint, resumed_dir / "checkpoints" / checkpoint)
        resumed = _train_toy_model(resumed_dir, resume_from="latest")
        assert all(torch.equal(reference[name], resumed[name]) for name in reference), checkpoint
    # The position in the epoch matters: resumed as if at the start of the epoch, the weights differ.
    state_file = tmp_path / "from_step_2" / "checkpoints" / "step_2" / "training_state.json"
    assert json.loads(state_file.read_text()) == {"completed_steps": 2, "epoch": 0, "batches_in_epoch": 4}
    state_file.write_text(json.dumps({"completed_steps": 2, "epoch": 0, "batches_in_epoch": 0}))
    misplaced = _train_toy_model(tmp_path / "from_step_2", resume_from=str(state_file.parent))
    assert not all(torch.equal(reference[name], misplaced[name]) for name in reference)


def test_optimizer_steps_as_adamw_does_and_is_fused_where_pytorch_has_the_kernel():
    torch.manual_seed(0)
    start = torch.randn(5, 7)
    gradients = [torch.randn(5, 7) for _ in range(3)]
    updated = {}
    for name, build in (
        ("ours", lambda params: build_optimizer(params, torch.device("cpu"), lr=2e-2, weight_decay=0.05)),
        ("reference", lambda params: torch.optim.AdamW(params, lr=2e-2, weight_decay=0.05, foreach=False)),
    ):
        parameter = torch.nn.Parameter(start.clone())
        optimizer = build([parameter])
        for gradient in gradients:
            parameter.grad = gradient.clone()
            optimizer.step()
        updated[name] = parameter.detach()
    assert not torch.equal(updated["ours"], start)
    torch.testing.assert_close(updated["ours"], updated["reference"], rtol=1e-5, atol=1e-6)
    # Which devices get the fused kernel: a step on a CUDA tensor needs a GPU, so only the choice is checked there.
    parameters = [torch.nn.Parameter(torch.zeros(3))]
    for device, fused in (("cuda", True), ("cpu", True), ("meta", False)):
        assert bool(build_optimizer(parameters, torch.device(device)).defaults["fused"]) is fused, device


def _run_toy_loop(output_dir: Path, profile_steps: int) -> None:
    """A linear regression through `TrainingLoop`: one epoch of 12 optimizer steps."""
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(1, 1)
    optimizer = build_optimizer(model.parameters(), accelerator.device, lr=1e-2)
    loader = build_train_dataloader(_NoisyPoints(), 2, seed=5, collate_fn=torch.utils.data.default_collate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    plan = plan_steps(len(loader), 1, num_train_epochs=1, max_train_steps=None)
    scheduler = build_lr_scheduler(accelerator, optimizer, "constant", 0, plan.max_train_steps)
    options = TrainingArguments(output_dir=output_dir, profile_steps=profile_steps)
    loop = TrainingLoop(accelerator, model, optimizer, scheduler, loader, plan, PvtImageProcessor(), options)
    loop.run(lambda batch: torch.nn.functional.mse_loss(model(batch["inputs"]), batch["targets"]))


def test_profile_steps_write_a_trace_and_where_a_step_went(tmp_path):
    _run_toy_loop(tmp_path, profile_steps=3)
    folder = tmp_path / PROFILE_DIR_NAME
    summary = json.loads((folder / "steps_rank0.json").read_text())
    assert summary["steps"] == 3
    phases = summary["host_ms_per_step"]
    assert list(phases) == list(STEP_PHASES) and all(value > 0 for value in phases.values())
    assert sum(phases.values()) < summary["step_ms"]  # the phases lie inside a step
    assert "device_busy_ms_per_step" not in summary  # no GPU
    trace = json.loads((folder / "trace_rank0.json").read_text())
    labelled = {event["name"] for event in trace["traceEvents"]} & set(STEP_PHASES)
    assert labelled == set(STEP_PHASES)
    assert "aten::mse_loss" in (folder / "operators_rank0.txt").read_text()


def test_profile_steps_beyond_the_run_or_below_zero_are_refused_before_training(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"--profile_steps 7 needs 13 optimizer steps .* it has 12"):
        _run_toy_loop(tmp_path, profile_steps=7)
    assert not (tmp_path / PROFILE_DIR_NAME).exists()
    assert parse_arguments([TrainingArguments], ["--profile_steps", "4"])[1][0].profile_steps == 4
    assert parse_arguments([TrainingArguments], [])[1][0].profile_steps == 0
    with pytest.raises(SystemExit):
        parse_arguments([TrainingArguments], ["--profile_steps", "-2"])
    assert "must be a whole number of steps" in capsys.readouterr().err


def test_device_busy_time_counts_overlapping_kernels_once_and_annotations_never():
    def event(start: float, end: float, on_gpu: bool = True, annotation: bool = False) -> SimpleNamespace:
        device = torch.autograd.DeviceType.CUDA if on_gpu else torch.autograd.DeviceType.CPU
        return SimpleNamespace(
            device_type=device, is_user_annotation=annotation, time_range=SimpleNamespace(start=start, end=end)
        )

    events = [
        event(0, 10),
        event(5, 12),  # overlaps the first: 12 us so far
        event(20, 30),
        event(22, 25),  # inside the third
        event(40, 90, on_gpu=False),  # host time
        event(0, 100, annotation=True),  # a label's range on the GPU's timeline
    ]
    assert device_busy_seconds(events) == pytest.approx(22e-6)


def test_classifier_evaluation_scores_the_same_whether_handed_to_the_metric_at_once_or_in_parts(monkeypatch):
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = PvtForImageClassification(PvtConfig(**TOY_CONFIG, image_size=32, num_labels=7)).eval()
    images, labels = torch.randn(23, 3, 32, 32), torch.randint(0, 7, (23,))
    with torch.no_grad():
        logits = model(images).logits
    examples = [{"pixel_values": image, "labels": label} for image, label in zip(images, labels)]
    loader = torch.utils.data.DataLoader(examples, batch_size=5, collate_fn=torch.utils.data.default_collate)
    model, loader = accelerator.prepare(model, loader)
    at_once = evaluate_classifier(accelerator, model, loader)
    monkeypatch.setattr(evaluation, "SCORES_HELD_ON_DEVICE", 70)  # two batches of 5 x 7 logits at a time
    in_parts = evaluate_classifier(accelerator, model, loader)
    assert at_once["eval_samples"] == in_parts["eval_samples"] == 23
    top1 = (logits.argmax(1) == labels).double().mean().item()
    top5 = (logits.topk(5).indices == labels[:, None]).any(1).double().mean().item()
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    for scores in (at_once, in_parts):
        assert scores["eval_accuracy"] == pytest.approx(top1) and scores["eval_top5_accuracy"] == pytest.approx(top5)
        assert scores["eval_loss"] == pytest.approx(loss, rel=1e-5)


def test_paper_recipe_rand_augment_survives_its_strongest_posterize():
    """RandAugment "inc1" at magnitude 10 posterizes to 0 bits (a black image); Pillow 13 refuses that, which stopped
    training runs with the paper recipe at random (hence the pin `pillow<13`)."""
    from timm.data.auto_augment import rand_augment_transform

    strongest = rand_augment_transform("rand-m10-mstd0-n1-inc1", {})
    strongest.ops = [op for op in strongest.ops if op.name == "PosterizeIncreasing"]
    assert strongest.ops, "timm no longer names the op PosterizeIncreasing"
    strongest.ops[0].prob = 1.0
    image = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    assert np.asarray(strongest(image)).max() == 0
