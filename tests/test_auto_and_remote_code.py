"""Save/load round trips, the Auto classes, `trust_remote_code` and stock loading of one folder, pipelines."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image
from skimage import data as sample_images
from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    pipeline,
)

from modeling_pvt import PvtBackbone, PvtConfig, PvtForImageClassification, PvtImageProcessor, PvtModel


@pytest.fixture
def saved_folder(tmp_path, tiny_config):
    model = PvtForImageClassification(tiny_config).eval()
    model.save_pretrained(tmp_path)
    PvtImageProcessor(size={"shortest_edge": 73}, crop_size={"height": 64, "width": 64}).save_pretrained(tmp_path)
    return tmp_path, model


def run_clean_python(code: str, folder) -> dict:
    """Run code in a fresh interpreter that never imports modeling_pvt, as a user of plain transformers would."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(folder / "modules")}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_folder_layout_and_auto_map(saved_folder):
    folder, _ = saved_folder
    names = {path.name for path in folder.iterdir()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json"} <= names
    assert {"configuration_pvt.py", "modeling_pvt.py", "image_processing_pvt.py"} <= names
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in names)
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_pvt.PvtConfig",
        "AutoModel": "modeling_pvt.PvtModel",
        "AutoModelForImageClassification": "modeling_pvt.PvtForImageClassification",
        "AutoBackbone": "modeling_pvt.PvtBackbone",
        "AutoImageProcessor": "image_processing_pvt.PvtImageProcessor",
    }


def test_auto_classes_resolve_to_this_package(saved_folder, tiny_config):
    folder, model = saved_folder
    assert type(AutoConfig.from_pretrained(folder)) is PvtConfig
    assert type(AutoModel.from_pretrained(folder)) is PvtModel
    loaded = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert type(loaded) is PvtForImageClassification
    assert type(AutoImageProcessor.from_pretrained(folder)) is PvtImageProcessor
    assert type(AutoBackbone.from_config(tiny_config)) is PvtBackbone
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values).logits, model(pixel_values).logits)


def test_base_model_loads_from_a_classification_folder(saved_folder):
    folder, model = saved_folder
    base = PvtModel.from_pretrained(folder).eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(base(pixel_values).pooler_output, model.pvt(pixel_values).pooler_output)


def test_trust_remote_code_and_stock_load_the_same_folder(saved_folder):
    folder, model = saved_folder
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    torch.save(pixel_values, folder / "inputs.pt")
    with torch.no_grad():
        expected = model(pixel_values).logits
    code = f"""
        import json, sys, torch
        from transformers import AutoImageProcessor, AutoModelForImageClassification
        remote = AutoModelForImageClassification.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        stock = AutoModelForImageClassification.from_pretrained({str(folder)!r}).eval()
        processor = AutoImageProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        pixel_values = torch.load({str(folder / "inputs.pt")!r})
        with torch.no_grad():
            print(json.dumps({{
                "remote_module": type(remote).__module__,
                "stock_module": type(stock).__module__,
                "processor_module": type(processor).__module__,
                "imported_package": "modeling_pvt" in sys.modules,
                "remote": remote(pixel_values).logits.tolist(),
                "stock": stock(pixel_values).logits.tolist(),
            }}))
    """
    result = run_clean_python(code, folder)
    assert result["remote_module"].startswith("transformers_modules.")
    # preprocessor_config.json is standard: plain transformers reads it with its own PVT processor
    assert result["processor_module"].startswith("transformers.models.pvt")
    assert result["stock_module"] == "transformers.models.pvt.modeling_pvt"
    assert not result["imported_package"]
    torch.testing.assert_close(torch.tensor(result["remote"]), expected, atol=1e-5, rtol=1e-5)
    # stock uses eps 1e-6 in the patch-embedding and reduction norms instead of the original 1e-5
    torch.testing.assert_close(torch.tensor(result["stock"]), expected, atol=1e-3, rtol=1e-3)


def test_pipelines_on_a_real_photograph(saved_folder):
    folder, model = saved_folder
    photo = Image.fromarray(sample_images.chelsea())  # a cat, shipped with scikit-image
    classifier = pipeline("image-classification", model=str(folder))
    assert type(classifier.model) is PvtForImageClassification
    predictions = classifier(photo, top_k=5)
    processor = PvtImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        probabilities = model(**processor(photo, return_tensors="pt")).logits.softmax(-1)[0]
    assert [prediction["label"] for prediction in predictions] == [
        model.config.id2label[index] for index in probabilities.argsort(descending=True).tolist()
    ]
    assert predictions[0]["score"] == pytest.approx(probabilities.max().item(), abs=1e-5)

    extractor = pipeline("image-feature-extraction", model=str(folder))
    features = torch.tensor(extractor(photo, return_tensors=False))
    assert features.shape == (1, 1 + 2 * 2, 64)
    pooled = pipeline("image-feature-extraction", model=str(folder), pool=True)(photo, return_tensors=True)
    assert pooled.shape == (1, 64)
