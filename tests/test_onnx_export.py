"""The ONNX export (`modeling_pvt.hub.onnx_export`, `scripts/export_onnx.py`): one export serves every batch and input
size and agrees with PyTorch, for the classifier and the backbone; what cannot be exported is refused clearly, and a
graph that disagrees with PyTorch is not written."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_CONFIG
from script_launch import load_script

from modeling_pvt import PvtBackbone, PvtConfig, PvtForImageClassification, PvtImageProcessor, PvtModel
from modeling_pvt.modeling_pvt import PvtLayer

onnx_export = pytest.importorskip("modeling_pvt.hub.onnx_export")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# (batch, height, width): the sizes the issue names at batch 1 and 3, the stored grid, and a size no stride divides
PARITY_INPUTS = [(batch, *size) for size in [(224, 224), (320, 480), (800, 1216)] for batch in (1, 3)]
PARITY_INPUTS += [(1, 64, 64), (2, 97, 131)]
TOLERANCE = 1e-4


def session(path) -> "onnxruntime.InferenceSession":
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # the test machine's cores are shared
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def largest_differences(graph, model: torch.nn.Module, names: list[str], shape: tuple[int, ...]) -> dict[str, float]:
    """Largest |ONNX - PyTorch| per output for one random input, the model on its reference code (which the CPU
    acceleration matches to float32 rounding, tests/test_performance.py; measuring its routes at every size here
    would take minutes)."""
    pixel_values = torch.randn(shape)
    model.set_cpu_acceleration(False)
    with torch.inference_mode():
        outputs = model(pixel_values)
    model.set_cpu_acceleration(True)
    expected = [outputs.logits] if names == ["logits"] else list(outputs.feature_maps)
    actual = graph.run(names, {"pixel_values": pixel_values.numpy()})
    assert [tuple(array.shape) for array in actual] == [tuple(tensor.shape) for tensor in expected]
    return {name: (torch.from_numpy(a) - e).abs().max().item() for name, a, e in zip(names, actual, expected)}


@pytest.fixture(scope="module")
def classifier_export(tmp_path_factory):
    """A tiny classifier saved with its processor, exported by the command-line script: `(model, export folder)`."""
    torch.manual_seed(0)
    model = PvtForImageClassification(PvtConfig(**TINY_CONFIG)).eval()
    source = tmp_path_factory.mktemp("source")
    model.save_pretrained(source)
    PvtImageProcessor(size={"height": 64, "width": 64}).save_pretrained(source)
    output = tmp_path_factory.mktemp("onnx")
    script = load_script("export_onnx")
    assert script.main(["--model_name_or_path", str(source), "--output_dir", str(output), "--overwrite"]) == 0
    return model, output


def test_one_export_matches_pytorch_at_every_size_and_batch(classifier_export):
    model, output = classifier_export
    graph = session(output / "model.onnx")
    for shape in PARITY_INPUTS:
        differences = largest_differences(graph, model, ["logits"], (shape[0], 3, *shape[1:]))
        assert differences["logits"] <= TOLERANCE, (shape, differences)


def test_the_export_has_symbolic_batch_height_width_and_its_configs(classifier_export):
    model, output = classifier_export
    (graph_input,) = session(output / "model.onnx").get_inputs()
    assert graph_input.name == "pixel_values" and graph_input.shape == ["batch", 3, "height", "width"]
    assert PvtConfig.from_pretrained(output).id2label == model.config.id2label
    processor = json.loads((output / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 64, "width": 64}  # the checkpoint's processor, not a default
    assert sorted(path.name for path in output.iterdir()) == ["config.json", "model.onnx", "preprocessor_config.json"]


def test_a_backbone_export_gives_the_feature_maps(tmp_path):
    backbone = PvtBackbone(PvtConfig(**TINY_CONFIG, out_features=["stage1", "stage3", "stage4"])).eval()
    output = onnx_export.export_onnx(backbone, tmp_path, checks=[(1, None, None)])
    graph = session(output / "model.onnx")
    assert [item.name for item in graph.get_outputs()] == ["stage1", "stage3", "stage4"]
    assert all(layer.cpu_acceleration for layer in backbone.modules() if isinstance(layer, PvtLayer))  # restored
    assert output.joinpath("config.json").exists()
    for shape in [(1, 3, 224, 224), (3, 3, 320, 480)]:
        differences = largest_differences(graph, backbone, ["stage1", "stage3", "stage4"], shape)
        assert max(differences.values()) <= TOLERANCE, (shape, differences)
    processor = PvtImageProcessor.from_pretrained(output)  # the default for the model's image size
    assert processor.crop_size == {"height": 64, "width": 64}


def test_what_cannot_be_exported_is_refused_before_tracing(tmp_path, tiny_config):
    with pytest.raises(onnx_export.OnnxExportError, match="PvtModel.*PvtForImageClassification and PvtBackbone"):
        onnx_export.export_onnx(PvtModel(tiny_config), tmp_path / "base")
    with pytest.raises(onnx_export.OnnxExportError, match="bfloat16.*float32"):
        onnx_export.export_onnx(PvtForImageClassification(tiny_config).to(torch.bfloat16), tmp_path / "bf16")
    model = PvtForImageClassification(tiny_config).eval()
    quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    with pytest.raises(onnx_export.OnnxExportError, match="quantized"):
        onnx_export.export_onnx(quantized, tmp_path / "quantized")
    with pytest.raises(onnx_export.OnnxExportError, match="backbone task only"):
        onnx_export.load_model(tmp_path, "image-classification", out_features=["stage1"])
    assert not any(tmp_path.iterdir())


def test_a_graph_that_disagrees_with_pytorch_is_not_written(classifier_export, tmp_path, monkeypatch):
    model, exported = classifier_export
    other = PvtForImageClassification(model.config).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.classifier.bias.add_(1e-3)  # the exported graph's logits are now 1e-3 off
    graph = SimpleNamespace(save=lambda path: shutil.copy(exported / "model.onnx", path))
    monkeypatch.setattr(onnx_export, "export_program", lambda model, opset: graph)
    with pytest.raises(onnx_export.OnnxExportError, match="logits differs from PyTorch's"):
        onnx_export.export_onnx(other, tmp_path / "out", checks=[(1, None, None)])
    assert not (tmp_path / "out").exists()


def test_the_command_reports_errors_without_a_traceback(tmp_path, capsys, tiny_config):
    PvtForImageClassification(tiny_config).save_pretrained(tmp_path / "model")
    script = load_script("export_onnx")
    argv = ["--model_name_or_path", str(tmp_path / "model"), "--output_dir", str(tmp_path / "out")]
    assert script.main([*argv, "--out_features", "stage1"]) == 1
    assert "backbone task only" in capsys.readouterr().err
