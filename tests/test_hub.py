"""Publishing to the Hub, end to end, against the in-process test Hub of `tests/hub_server.py`.

The story: `scripts/push_to_hub.py` publishes a checkpoint; then, on a "fresh machine" (a new process with an empty
`HF_HOME`), stock transformers, `trust_remote_code=True` and `pipeline(...)` load it from the Hub and give the
published model's outputs, then again offline from the cache alone. Every client runs in a subprocess with its own
environment: `huggingface_hub` reads `HF_ENDPOINT`, `HF_HOME` and `HF_HUB_DISABLE_XET` once, at import, and other
test files import it in this process first; the clients must also never import this package.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hub_server import HubServer
from PIL import Image
from safetensors.torch import load, load_file
from script_launch import load_script

from modeling_pvt import PvtConfig, PvtForImageClassification, PvtImageProcessor
from modeling_pvt.hub.model_card import render_paper_size_card

IMAGENET_STD = (0.229, 0.224, 0.225)

REPO_ROOT = Path(__file__).resolve().parent.parent
PUSH_SCRIPT = REPO_ROOT / "scripts" / "push_to_hub.py"
TOKEN = "hf_" + secrets.token_hex(16)  # random per run, so finding it in an output cannot be a coincidence
USER, ORGS = "pvt-publisher", ["org", "lab"]
REPO_ID = "org/pvt-tiny"
HUB_CODE_FILES = {"configuration_pvt.py", "modeling_pvt.py", "cpu_acceleration.py", "image_processing_pvt.py"}
EXPECTED_REPO_FILES = {"README.md", "config.json", "model.safetensors", "preprocessor_config.json", *HUB_CODE_FILES}

# Runs on the "fresh machine": loads the repo three ways and writes what it got as JSON. It must not import
# modeling_pvt, so the stock path really is stock transformers and the remote path really is the Hub's code.
CLIENT_CODE = """
import json, os, sys
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

repo_id, image_path, output_path = sys.argv[1:4]
image = Image.open(image_path).convert("RGB")
result = {}
with torch.no_grad():
    stock = AutoModelForImageClassification.from_pretrained(repo_id).eval()
    stock_processor = AutoImageProcessor.from_pretrained(repo_id)
    pixels = stock_processor(image, return_tensors="pt").pixel_values
    result["stock"] = {"class": type(stock).__module__, "logits": stock(pixels).logits[0].tolist(),
                       "pixels": pixels.flatten().tolist()}
    classifier = pipeline("image-classification", model=repo_id)
    result["pipeline"] = {"class": type(classifier.model).__module__, "scores": classifier(image, top_k=None)}
    if not os.environ.get("HF_HUB_OFFLINE"):  # the task comes from the model card's metadata, via the Hub API
        result["inferred_task"] = pipeline(model=repo_id).task
    remote = AutoModelForImageClassification.from_pretrained(repo_id, trust_remote_code=True).eval()
    remote_processor = AutoImageProcessor.from_pretrained(repo_id, trust_remote_code=True)
    pixels = remote_processor(image, return_tensors="pt").pixel_values
    result["remote"] = {"class": type(remote).__module__, "logits": remote(pixels).logits[0].tolist(),
                        "pixels": pixels.flatten().tolist()}
result["imported_modeling_pvt"] = "modeling_pvt" in sys.modules
json.dump(result, open(output_path, "w"))
"""


# ------------------------------------------------------------------------------------------------------- helpers
def client_env(hub: HubServer, hf_home: Path, *, token: bool = False, offline: bool = False) -> dict[str, str]:
    """A clean environment for a client process: the test Hub, its own cache, LFS instead of Xet."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING", "TRANSFORMERS"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(hf_home),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONUNBUFFERED="1",
    )
    if token:
        env["HF_TOKEN"] = TOKEN
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def run_python(args: list[str], env: dict[str, str], expect_success: bool = True) -> subprocess.CompletedProcess:
    """Runs `python ARGS`, non-interactively; the token must never appear in what it prints."""
    process = subprocess.run(
        [sys.executable, *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,  # transformers asks on a terminal before running remote code; never here
        timeout=300,
    )
    output = process.stdout + process.stderr
    assert TOKEN not in output, "the token was printed"
    assert (process.returncode == 0) == expect_success, output[-5000:]
    return process


def push(hub: HubServer, hf_home: Path, *args: str, expect_success: bool = True) -> subprocess.CompletedProcess:
    return run_python([str(PUSH_SCRIPT), *args], client_env(hub, hf_home, token=True), expect_success)


def assert_no_token_in_files(*folders: Path) -> None:
    for folder in folders:
        for path in Path(folder).rglob("*"):
            if path.is_file():
                assert TOKEN.encode() not in path.read_bytes(), f"the token was written to {path}"


def toy_results(accuracy: float) -> dict:
    """A results file of the schema every script writes (`modeling_pvt.hub.results`)."""
    return {"eval_accuracy": accuracy, "eval_samples": 16, "dataset_name": "toy-shapes", "split": "validation"}


def make_checkpoint(folder: Path, seed: int, results: dict | None = None) -> Path:
    """A tiny PVT classifier saved like the conversion script's output (weights, config, processor, results)."""
    torch.manual_seed(seed)
    # Both LayerNorm epsilons equal: stock transformers has only `layer_norm_eps`, and this test wants it to
    # reproduce the published logits to float precision (see the README on `conv_layer_norm_eps`).
    config = PvtConfig(
        image_size=32,
        hidden_sizes=[8, 16, 24, 32],
        num_attention_heads=[1, 1, 1, 2],
        depths=[1, 1, 1, 1],
        num_labels=3,
        id2label={0: "cat", 1: "dog", 2: "bird"},
        label2id={"cat": 0, "dog": 1, "bird": 2},
        conv_layer_norm_eps=1e-6,
    )
    model = PvtForImageClassification(config).eval()
    model.save_pretrained(folder)
    PvtImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    if results is not None:
        (folder / "all_results.json").write_text(json.dumps(results))
    return folder


def card_metadata(readme: str) -> dict:
    assert readme.startswith("---\n"), readme[:200]
    return yaml.safe_load(readme.split("---\n")[1])


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def hub():
    with HubServer() as server:
        server.state.add_token(TOKEN, USER, ORGS)
        yield server
    assert not server.state.errors, f"the test Hub met requests it does not understand: {server.state.errors}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("checkpoint"), seed=0, results=toy_results(0.8125))


@pytest.fixture(scope="module")
def reference(checkpoint, tmp_path_factory) -> dict:
    """The published model's outputs on one image, computed here with this package."""
    rng = np.random.default_rng(0)
    image_path = tmp_path_factory.mktemp("image") / "image.png"
    Image.fromarray(rng.integers(0, 256, size=(48, 40, 3), dtype=np.uint8)).save(image_path)  # PNG: lossless
    model = PvtForImageClassification.from_pretrained(checkpoint).eval()
    pixels = PvtImageProcessor.from_pretrained(checkpoint)(Image.open(image_path), return_tensors="pt").pixel_values
    with torch.no_grad():
        logits = model(pixels).logits[0]
    return {
        "model": model,
        "image": image_path,
        "pixels": pixels.flatten(),
        "logits": logits,
        "labels": model.config.id2label,
    }


@pytest.fixture(scope="module")
def published(hub, checkpoint, tmp_path_factory) -> dict:
    """Pushes the checkpoint once for the tests that need it on the Hub."""
    hf_home = tmp_path_factory.mktemp("publisher_home")
    process = push(hub, hf_home, "--model_dir", str(checkpoint), "--repo_id", REPO_ID)
    return {"hf_home": hf_home, "output": process.stdout + process.stderr}


# --------------------------------------------------------------------------------------------------------- tests
def test_dry_run_writes_the_repo_folder_and_pushes_nothing(hub, checkpoint, tmp_path):
    requests_before = hub.request_count()
    output_dir = tmp_path / "repo"
    push(hub, tmp_path / "home", "--model_dir", str(checkpoint), "--repo_id", REPO_ID, "--dry_run",
         "--output_dir", str(output_dir))  # fmt: skip

    assert hub.request_count() == requests_before, "a dry run must not talk to the Hub"
    files = {path.relative_to(output_dir).as_posix() for path in output_dir.rglob("*") if path.is_file()}
    assert files == EXPECTED_REPO_FILES
    config = json.loads((output_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_pvt.PvtForImageClassification"
    assert config["auto_map"]["AutoConfig"] == "configuration_pvt.PvtConfig"
    assert json.loads((output_dir / "preprocessor_config.json").read_text())["crop_size"] == {
        "height": 32,
        "width": 32,
    }
    for name in HUB_CODE_FILES:  # the code the Hub serves is this package's code
        assert (output_dir / name).read_bytes() == (REPO_ROOT / "modeling_pvt" / name).read_bytes()
    published_weights = load_file(output_dir / "model.safetensors")
    original = PvtForImageClassification.from_pretrained(checkpoint).state_dict()
    assert published_weights.keys() == original.keys()
    assert all(torch.equal(published_weights[key], original[key]) for key in original)
    metadata = card_metadata((output_dir / "README.md").read_text())
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "image-classification"
    assert "0.8125" in (output_dir / "README.md").read_text(), "the measured result is missing from the card"
    assert_no_token_in_files(output_dir, tmp_path / "home")


def test_push_then_load_on_a_fresh_machine_online_and_offline(hub, published, reference, tmp_path):
    commits = hub.commits(REPO_ID)
    assert [commit.title for commit in commits][1:] == ["initial commit"], "one commit for the whole upload"
    assert set(commits[0].files) == EXPECTED_REPO_FILES | {".gitattributes"}
    assert commits[0].files["model.safetensors"].is_lfs and not commits[0].files["config.json"].is_lfs
    writes = [r for r in hub.state.requests if "/commit/" in r.path or r.path == "/api/repos/create"]
    assert writes and all(r.authorization == f"Bearer {TOKEN}" for r in writes), "the token was not sent"
    uploads = [r for r in hub.state.requests if r.method == "PUT"]
    assert uploads and all(r.authorization is None for r in uploads), "the token must not go to the storage URL"
    assert "new commit" in published["output"]

    results = {}
    hf_home = tmp_path / "fresh_home"
    for mode in ("online", "offline"):
        requests_before = hub.request_count()
        env = client_env(hub, hf_home, offline=mode == "offline")
        run_python(["-c", CLIENT_CODE, REPO_ID, str(reference["image"]), str(tmp_path / f"{mode}.json")], env)
        results[mode] = json.loads((tmp_path / f"{mode}.json").read_text())
        if mode == "offline":
            assert hub.request_count() == requests_before, "offline loading must not touch the network"
        else:
            assert hub.request_count() > requests_before

    one_level = 1 / 255 / min(IMAGENET_STD) + 1e-6  # one 8-bit level after normalisation
    for mode, result in results.items():
        assert not result["imported_modeling_pvt"], mode
        assert result["stock"]["class"] == "transformers.models.pvt.modeling_pvt", mode
        assert result["pipeline"]["class"] == "transformers.models.pvt.modeling_pvt", mode
        assert result["remote"]["class"].startswith("transformers_modules."), mode
        for path, tolerance in (("stock", 1e-5), ("remote", 1e-6)):
            # preprocessor_config.json is in the standard format, so AutoImageProcessor gives transformers' own PVT
            # processor (torchvision backend): its bicubic resize puts a few pixels one 8-bit level away from this
            # package's (PIL) processor. Everything after the pixels must be the published model exactly.
            pixels = torch.tensor(result[path]["pixels"])
            torch.testing.assert_close(pixels, reference["pixels"], atol=one_level, rtol=0)
            assert (pixels - reference["pixels"]).abs().gt(1e-6).float().mean() < 0.02, (mode, path)
            with torch.no_grad():
                expected_logits = reference["model"](pixels.reshape(1, 3, 32, 32)).logits[0]
            torch.testing.assert_close(torch.tensor(result[path]["logits"]), expected_logits, atol=tolerance, rtol=0)
            torch.testing.assert_close(
                torch.tensor(result[path]["logits"]), reference["logits"], atol=0.05, rtol=0
            )  # and close to the outputs on the package's own pixels
        # The pipeline is stock transformers too (no remote code asked for): the softmax of the stock logits.
        expected_scores = torch.softmax(torch.tensor(result["stock"]["logits"]), dim=-1)
        scores = {entry["label"]: entry["score"] for entry in result["pipeline"]["scores"]}
        assert set(scores) == set(reference["labels"].values())
        for index, label in reference["labels"].items():
            assert scores[label] == pytest.approx(expected_scores[index].item(), abs=1e-6), (mode, label)
    assert results["online"]["inferred_task"] == "image-classification"
    assert_no_token_in_files(hf_home, published["hf_home"])
    for repo in list(hub.state.repos.values()):
        for commit in repo.commits.values():
            for path in commit.files:
                assert TOKEN.encode() not in hub.file_bytes(repo.repo_id, path, commit.commit_id), path


def test_pushing_an_unchanged_folder_makes_no_commit(hub, published, checkpoint, tmp_path):
    head_before = hub.commits(REPO_ID)[0].commit_id
    process = push(hub, tmp_path / "home", "--model_dir", str(checkpoint), "--repo_id", REPO_ID)
    assert [commit.commit_id for commit in hub.commits(REPO_ID)][0] == head_before
    assert len(hub.commits(REPO_ID)) == 2
    assert "no new commit" in process.stdout

    # Control: the same push with one changed file is not skipped; on a branch, main stays as it was.
    changed = Path(shutil.copytree(checkpoint, tmp_path / "changed"))
    (changed / "all_results.json").write_text(json.dumps(toy_results(0.6875)))
    push(hub, tmp_path / "home", "--model_dir", str(changed), "--repo_id", REPO_ID, "--revision", "candidate",
         "--commit_message", "Update the results")  # fmt: skip
    assert hub.commits(REPO_ID)[0].commit_id == head_before
    candidate = hub.commits(REPO_ID, branch="candidate")
    assert len(candidate) == 3 and candidate[0].title == "Update the results"
    assert candidate[0].parent_id == head_before
    changed_files = {path for path, stored in candidate[0].files.items() if candidate[1].files.get(path) != stored}
    assert changed_files == {"README.md"}
    assert b"0.6875" in hub.file_bytes(REPO_ID, "README.md", "candidate")


def test_sizes_mode_publishes_each_size_to_its_own_repo(hub, tmp_path):
    checkpoints = tmp_path / "converted"
    for seed, size in enumerate(("tiny", "small")):
        make_checkpoint(checkpoints / f"pvt-{size}", seed=seed)
    # As scripts/train.py writes it.
    tiny_results = {
        "eval_accuracy": 0.7512,
        "eval_top5_accuracy": 0.9275,
        "eval_samples": 50000,
        "dataset_name": "imagenet-1k",
        "split": "validation",
        "epoch": 300,
    }
    (checkpoints / "pvt-tiny" / "all_results.json").write_text(json.dumps(tiny_results))

    # All requested folders are checked before anything is published.
    process = push(hub, tmp_path / "home", "--sizes", "--checkpoints_dir", str(checkpoints), "--namespace", "lab",
                   expect_success=False)  # fmt: skip
    assert "pvt-medium" in process.stderr and "nothing was published" in process.stderr
    assert not [repo_id for (_, repo_id) in hub.state.repos if repo_id.startswith("lab/")]

    push(hub, tmp_path / "home", "--sizes", "tiny", "small", "--checkpoints_dir", str(checkpoints),
         "--namespace", "lab", "--private")  # fmt: skip
    for size in ("tiny", "small"):
        repo = hub.repo(f"lab/pvt-{size}")
        assert repo.private and len(hub.commits(repo.repo_id)) == 2
        weights = load_file(checkpoints / f"pvt-{size}" / "model.safetensors")
        published_weights = load(hub.file_bytes(repo.repo_id, "model.safetensors"))
        assert published_weights.keys() == weights.keys()
        assert all(torch.equal(published_weights[key], weights[key]) for key in weights)
        readme = hub.file_bytes(repo.repo_id, "README.md").decode()
        assert card_metadata(readme)["pipeline_tag"] == "image-classification"
        # The size's card (as scripts/make_model_cards.py writes it), with the measured results where there are some.
        results = tiny_results if size == "tiny" else None
        assert readme == render_paper_size_card(size, results, repo.repo_id)
    model_index = card_metadata(hub.file_bytes("lab/pvt-tiny", "README.md").decode())["model-index"]
    assert [metric["value"] for metric in model_index[0]["results"][0]["metrics"]][0] == pytest.approx(0.7512)
    assert "model-index" not in card_metadata(hub.file_bytes("lab/pvt-small", "README.md").decode())
    # A private repo is invisible without the owner's token.
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(f"{hub.url}/api/models/lab/pvt-tiny")
    assert error.value.code == 404 and error.value.headers["X-Error-Code"] == "RepoNotFound"


def test_pickled_weights_are_converted_and_mismatched_weights_refused(tmp_path):
    push_to_hub = load_script("push_to_hub")
    checkpoint = make_checkpoint(tmp_path / "pickled", seed=3)
    state_dict = load_file(checkpoint / "model.safetensors")
    (checkpoint / "model.safetensors").unlink()
    torch.save(state_dict, checkpoint / "pytorch_model.bin")

    files = push_to_hub.assemble_repo_folder(checkpoint, tmp_path / "repo", REPO_ID)
    assert set(files) == EXPECTED_REPO_FILES, "the pickle must be republished as safetensors only"
    republished = load_file(tmp_path / "repo" / "model.safetensors")
    assert all(torch.equal(republished[key], value) for key, value in state_dict.items())

    torch.save({**state_dict, "pvt.encoder.extra.weight": torch.zeros(1)}, checkpoint / "pytorch_model.bin")
    with pytest.raises(push_to_hub.PublishError, match="pvt.encoder.extra.weight"):
        push_to_hub.assemble_repo_folder(checkpoint, tmp_path / "repo2", REPO_ID)
    with pytest.raises(push_to_hub.PublishError, match="not empty"):
        push_to_hub.assemble_repo_folder(checkpoint, tmp_path / "repo", REPO_ID)


def test_push_without_a_token_fails_before_any_upload(hub, checkpoint, tmp_path):
    requests_before = hub.request_count()
    env = client_env(hub, tmp_path / "home")  # no HF_TOKEN and no stored login
    process = run_python([str(PUSH_SCRIPT), "--model_dir", str(checkpoint), "--repo_id", "org/other"], env, False)
    assert "No Hugging Face token" in process.stderr
    assert hub.request_count() == requests_before


def test_hub_server_speaks_the_download_protocol(hub, published):
    """The details `huggingface_hub` relies on: commit and etag headers, byte ranges and typed 404s."""
    commit_id = hub.commits(REPO_ID)[0].commit_id
    weights = hub.file_bytes(REPO_ID, "model.safetensors")
    request = urllib.request.Request(f"{hub.url}/{REPO_ID}/resolve/main/model.safetensors", method="HEAD")
    with urllib.request.urlopen(request) as response:
        assert response.headers["X-Repo-Commit"] == commit_id
        assert response.headers["X-Linked-Size"] == str(len(weights))
        assert (
            response.headers["X-Linked-Etag"].strip('"')
            == hub.repo(REPO_ID).resolve("main").files["model.safetensors"].lfs_sha256
        )
    request = urllib.request.Request(f"{hub.url}/{REPO_ID}/resolve/{commit_id}/model.safetensors")
    request.add_header("Range", "bytes=100-")
    with urllib.request.urlopen(request) as response:
        assert response.status == 206 and response.read() == weights[100:]
        assert response.headers["Content-Range"] == f"bytes 100-{len(weights) - 1}/{len(weights)}"
    for url, code in (
        (f"{hub.url}/{REPO_ID}/resolve/main/missing.json", "EntryNotFound"),
        (f"{hub.url}/{REPO_ID}/resolve/no-such-branch/config.json", "RevisionNotFound"),
        (f"{hub.url}/org/no-such-repo/resolve/main/config.json", "RepoNotFound"),
    ):
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(url)
        assert error.value.code == 404 and error.value.headers["X-Error-Code"] == code, url
    with urllib.request.urlopen(f"{hub.url}/api/models/{REPO_ID}/tree/main?recursive=true") as response:
        tree = {entry["path"]: entry for entry in json.load(response)}
    assert set(tree) == EXPECTED_REPO_FILES | {".gitattributes"}
    assert tree["model.safetensors"]["lfs"]["size"] == len(weights)


def test_card_choice(tmp_path):
    push_to_hub = load_script("push_to_hub")
    assert push_to_hub.infer_size(PvtConfig.from_preset("small")) == "small"
    # A fine-tuned head on another label set is not the ImageNet-1k model the size's card describes.
    assert push_to_hub.infer_size(PvtConfig.from_preset("small", num_labels=10)) is None
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# My fine-tuned PVT\n")
    assert push_to_hub.render_card(None, None, "me/pvt-ft", tmp_path) == (tmp_path / "README.md").read_text()
    minimal = push_to_hub.render_card(None, toy_results(0.5), "me/pvt-ft", tmp_path / "elsewhere")
    assert card_metadata(minimal)["library_name"] == "transformers" and "| Top-1 accuracy | 50.00% |" in minimal
    with pytest.raises(push_to_hub.PublishError, match="dataset_name"):
        push_to_hub.render_card(None, {"eval_accuracy": 0.5}, "me/pvt-ft", tmp_path / "elsewhere")
    with pytest.raises(push_to_hub.PublishError, match="eval_accuracy"):
        push_to_hub.render_card("tiny", {"dataset": "imagenet-1k", "eval_loss": 1.0}, "me/pvt-tiny")
