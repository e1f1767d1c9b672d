"""Detectors and UperNet on a PVT backbone, saved or pushed, run in plain transformers with `trust_remote_code=True`.

Each client runs in a subprocess that never imports this package, as on a machine without it: the folder (or the
Hub repo) must carry the code, PvtBackbone included. The Hub is the in-process test Hub of `tests/hub_server.py`.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from script_launch import HUB_TOKEN

from modeling_pvt import PvtConfig
from modeling_pvt.configuration_pvt_heads import PvtDeformableDetrConfig, PvtUperNetConfig
from modeling_pvt.data.segmentation import build_segmentation_processor
from modeling_pvt.modeling_pvt_heads import UperNetForSemanticSegmentation
from modeling_pvt.tasks.detectors import DETECTORS, build_detector, build_detector_config, build_image_processor

IMAGE_SIZE = 128  # Deformable DETR's extra level halves the last map once more: it needs 2x2 there
BACKBONE = dict(hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 1, 1, 2], depths=[1, 1, 1, 1], image_size=32)
DETR_HEADS = dict(
    d_model=32,
    encoder_layers=1,
    decoder_layers=2,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    num_queries=5,
)
HEADS = {
    "detr": DETR_HEADS,
    "conditional_detr": DETR_HEADS,
    "deformable_detr": dict(DETR_HEADS, two_stage=True, with_box_refine=True, two_stage_num_proposals=5),
    "rt_detr": dict(
        d_model=32,
        encoder_hidden_dim=32,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        decoder_in_channels=[32, 32, 32],
        num_queries=5,
        num_denoising=0,
    ),
}
LABELS = {0: "cat", 1: "dog"}
HEAD_CODE_FILES = {
    "configuration_pvt.py",
    "configuration_pvt_heads.py",
    "modeling_pvt.py",
    "modeling_pvt_heads.py",
    "cpu_acceleration.py",
}

# Runs where the package is not installed, in effect: loads every folder named on the command line through remote
# code, compares its outputs with the reference saved beside it, runs the task's pipeline, and tries each without
# trust_remote_code.
CLIENT_CODE = """
import json, sys
import torch
from PIL import Image
from transformers import AutoModelForObjectDetection, AutoModelForSemanticSegmentation, pipeline

output_path, task, *sources = sys.argv[1:]
auto_class = AutoModelForObjectDetection if task == "object-detection" else AutoModelForSemanticSegmentation
image = Image.new("RGB", (150, 110), (40, 90, 160))
report = {}
for source, reference in zip(sources[::2], sources[1::2]):
    expected = torch.load(reference)
    model = auto_class.from_pretrained(source, trust_remote_code=True).eval()
    with torch.no_grad():
        outputs = model(pixel_values=expected["pixel_values"])
    entry = {"class": type(model).__module__ + "." + type(model).__name__}
    entry["max_difference"] = (outputs.logits - expected["logits"]).abs().max().item()
    options = {"threshold": 0.0} if task == "object-detection" else {}
    found = pipeline(task, model=source, trust_remote_code=True)(image, **options)
    entry["pipeline"] = [sorted(item) for item in found[:1]]
    try:
        auto_class.from_pretrained(source)
        entry["without_trust_remote_code"] = "loaded"
    except ValueError as error:
        entry["without_trust_remote_code"] = str(error)
    report[source] = entry
report["imported_modeling_pvt"] = "modeling_pvt" in sys.modules
json.dump(report, open(output_path, "w"))
"""


def save_head(model: torch.nn.Module, processor, folder: Path) -> Path:
    """Save `model` and `processor` to `folder`, and the model's output on a fixed input as `reference.pt`."""
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    pixel_values = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits
    torch.save({"pixel_values": pixel_values, "logits": logits}, folder / "reference.pt")
    return folder


@pytest.fixture(scope="module")
def detector_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("detectors")
    folders = {}
    for detector, heads in HEADS.items():
        torch.manual_seed(0)
        config = build_detector_config(detector, PvtConfig(**BACKBONE), LABELS, **heads)
        processor = build_image_processor(detector, size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        folders[detector] = save_head(build_detector(detector, config), processor, root / detector)
    return folders


@pytest.fixture(scope="module")
def upernet_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    # A backbone config as a classification checkpoint gives it: its own auto_map and path must not reach the head.
    backbone = PvtConfig(**BACKBONE, auto_map={"AutoConfig": "configuration_pvt.PvtConfig"}, _name_or_path="pvt-x")
    config = PvtUperNetConfig(
        backbone_config=backbone, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}, hidden_size=16,
        auxiliary_channels=16, auxiliary_in_channels=None,
    )  # fmt: skip
    model = UperNetForSemanticSegmentation(config)
    processor = build_segmentation_processor(IMAGE_SIZE, reduce_labels=False)
    return save_head(model, processor, tmp_path_factory.mktemp("upernet") / "upernet")


def run_client(task: str, sources: list[tuple[str, Path]], output: Path, env: dict[str, str]) -> dict:
    arguments = [str(value) for source, reference in sources for value in (source, reference)]
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CLIENT_CODE), str(output), task, *arguments],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,  # transformers asks on a terminal before running remote code; never here
    )
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads(output.read_text())


def offline_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}


def assert_runs_remotely(entry: dict) -> None:
    assert entry["class"].startswith("transformers_modules.") and ".modeling_pvt_heads." in entry["class"]
    assert entry["max_difference"] < 1e-5
    assert entry["pipeline"], "the pipeline returned nothing"
    assert "trust_remote_code=True" in entry["without_trust_remote_code"]


def test_folders_carry_the_code_and_an_auto_map(detector_folders, upernet_folder):
    for detector, folder in detector_folders.items():
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == f"pvt_{detector}"
        assert config["auto_map"]["AutoModelForObjectDetection"].startswith("modeling_pvt_heads.")
        assert config["auto_map"]["AutoConfig"].startswith("configuration_pvt_heads.")
        assert HEAD_CODE_FILES <= {path.name for path in folder.iterdir()}
        assert "auto_map" not in config["backbone_config"]
    config = json.loads((upernet_folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_pvt_heads.PvtUperNetConfig",
        "AutoModelForSemanticSegmentation": "modeling_pvt_heads.UperNetForSemanticSegmentation",
    }
    assert "auto_map" not in config["backbone_config"] and config["backbone_config"]["_name_or_path"] == ""


def test_head_configs_check_their_fields_against_each_other_like_the_stock_ones():
    with pytest.raises(StrictDataclassError, match="with_box_refine must be True"):
        PvtDeformableDetrConfig(two_stage=True)
    assert PvtDeformableDetrConfig(two_stage=True, with_box_refine=True).two_stage


def test_in_this_process_the_auto_classes_load_the_folders(detector_folders):
    from transformers import AutoModelForObjectDetection

    for detector, folder in detector_folders.items():
        model = AutoModelForObjectDetection.from_pretrained(folder).eval()
        assert type(model) is DETECTORS[detector].model_class
        expected = torch.load(folder / "reference.pt")
        with torch.no_grad():
            assert torch.equal(model(pixel_values=expected["pixel_values"]).logits, expected["logits"])


def test_plain_transformers_runs_saved_detectors_and_upernet_with_remote_code(
    detector_folders, upernet_folder, tmp_path
):
    detectors = [(str(folder), folder / "reference.pt") for folder in detector_folders.values()]
    report = run_client("object-detection", detectors, tmp_path / "detectors.json", offline_env(tmp_path))
    assert report.pop("imported_modeling_pvt") is False
    assert len(report) == len(HEADS)
    for entry in report.values():
        assert_runs_remotely(entry)
    assert all(entry["pipeline"] == [["box", "label", "score"]] for entry in report.values())

    upernet = [(str(upernet_folder), upernet_folder / "reference.pt")]
    report = run_client("image-segmentation", upernet, tmp_path / "upernet.json", offline_env(tmp_path))
    assert report.pop("imported_modeling_pvt") is False
    assert_runs_remotely(report[str(upernet_folder)])


def test_detector_pushed_to_the_hub_runs_in_the_pipeline_with_remote_code(detector_folders, hub, tmp_path):
    repo_id = "trainer/pvt-detector"
    folder = detector_folders["deformable_detr"]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING", "TRANSFORMERS"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "home"), HF_HUB_DISABLE_XET="1")
    upload = (
        "import sys\nfrom huggingface_hub import HfApi\napi = HfApi(token=sys.argv[3])\n"
        "api.create_repo(sys.argv[1])\n"
        "api.upload_folder(repo_id=sys.argv[1], folder_path=sys.argv[2], ignore_patterns=['reference.pt'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", upload, repo_id, str(folder), HUB_TOKEN], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert HEAD_CODE_FILES <= set(hub.commits(repo_id)[0].files)
    report = run_client("object-detection", [(repo_id, folder / "reference.pt")], tmp_path / "hub.json", env)
    assert report.pop("imported_modeling_pvt") is False
    assert_runs_remotely(report[repo_id])
