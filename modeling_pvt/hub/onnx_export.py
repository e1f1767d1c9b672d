"""ONNX export of a PVT classifier or backbone for any batch size and input size.

`export_onnx` traces the model with PyTorch's ONNX exporter (`torch.onnx.export(..., dynamo=True)`), with the
batch, height and width of `pixel_values` left symbolic: the patch grids, and the bilinear resize of the position
embeddings to them, are computed inside the graph, so one file serves every input size the model accepts. Before
anything is written, ONNX Runtime runs the graph at three input sizes and batch sizes and its outputs are compared
with the PyTorch model's; a graph that disagrees is not written. The output folder then holds:

- `model.onnx`: input `pixel_values` `(batch, channels, height, width)`, float32; outputs `logits` `(batch,
  num_labels)` for a classifier, or one `(batch, channels, height / stride, width / stride)` map per backbone stage
  named as the stage (`stage1`..`stage4`, those of `config.out_features`);
- `config.json`: the model's configuration (labels, sizes);
- `preprocessor_config.json`: the image processor that prepares its inputs.

`onnx`, `onnxscript` and `onnxruntime` are imported only when an export runs (`pip install "modeling-pvt[onnx]"`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..configuration_pvt import PvtConfig
from ..image_processing_pvt import PvtImageProcessor
from ..modeling_pvt import PvtBackbone, PvtForImageClassification, PvtLayer

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
TASKS = ("image-classification", "backbone")
# `(batch, height, width)` of the comparison with PyTorch; `None` stands for the configuration's own image size.
DEFAULT_CHECKS: tuple[tuple[int, int | None, int | None], ...] = ((2, None, None), (3, 320, 480), (1, 800, 1216))
# Largest accepted |ONNX - PyTorch| difference, relative to the largest output value where that exceeds 1.
DEFAULT_TOLERANCE = 1e-4


class OnnxExportError(ValueError):
    """The model cannot be exported, or its exported graph does not compute what the PyTorch model computes."""


class _GraphOutputs(nn.Module):
    """The model's tensors as the graph returns them: the logits, or the backbone's feature maps in order."""

    def __init__(self, model: PvtForImageClassification | PvtBackbone):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outputs = self.model(pixel_values=pixel_values, return_dict=True)
        if isinstance(self.model, PvtBackbone):
            return tuple(outputs.feature_maps)
        return outputs.logits


def output_names(model: PvtForImageClassification | PvtBackbone) -> list[str]:
    """The graph's output names: `logits`, or the backbone's stage names."""
    return list(model.out_features) if isinstance(model, PvtBackbone) else ["logits"]


def smallest_input_side(config: PvtConfig) -> int:
    """The smallest height (or width) the model accepts: every stage's patch convolution and spatial reduction need
    at least one kernel's worth of input."""

    def accepted(side: int) -> bool:
        for kernel, stride, reduction in zip(config.strides, config.patch_sizes, config.sequence_reduction_ratios):
            if side < kernel:
                return False
            side = (side - kernel) // stride + 1
            if side < reduction:
                return False
        return True

    return next(side for side in range(1, 1 << 16) if accepted(side))


def check_exportable(model: nn.Module) -> None:
    """Raise `OnnxExportError` for what this exporter does not handle, before any tracing."""
    if not isinstance(model, (PvtForImageClassification, PvtBackbone)):
        raise OnnxExportError(
            f"Cannot export {type(model).__name__}: the ONNX export handles this package's PvtForImageClassification "
            "and PvtBackbone (task 'image-classification' or 'backbone')."
        )
    wrong_dtypes = {
        str(tensor.dtype) for tensor in (*model.parameters(), *model.buffers()) if tensor.dtype != torch.float32
    }
    if wrong_dtypes:
        raise OnnxExportError(
            f"Cannot export a model holding {', '.join(sorted(wrong_dtypes))} tensors: the export is float32 (load "
            "the model with dtype=torch.float32 or call model.float())."
        )
    quantized = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("torch.ao.")})
    if quantized:
        raise OnnxExportError(
            f"Cannot export quantized modules ({', '.join(quantized)}): export the float32 model and quantize the "
            "ONNX graph with onnxruntime.quantization instead."
        )


def load_model(
    model_name_or_path: str | os.PathLike, task: str, out_features: Sequence[str] | None = None, **hub_kwargs
) -> nn.Module:
    """A saved folder or Hub id as a float32 classifier (`image-classification`) or `PvtBackbone` (`backbone`, with
    the stages `out_features`, else the configuration's)."""
    from transformers import AutoBackbone, AutoModelForImageClassification

    if task not in TASKS:
        raise OnnxExportError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    if task == "image-classification":
        if out_features:
            raise OnnxExportError("out_features applies to the backbone task only.")
        return AutoModelForImageClassification.from_pretrained(model_name_or_path, dtype=torch.float32, **hub_kwargs)
    if out_features:
        hub_kwargs["out_features"] = list(out_features)
    return AutoBackbone.from_pretrained(model_name_or_path, dtype=torch.float32, **hub_kwargs)


def load_image_processor(model_name_or_path: str | os.PathLike | None, config: PvtConfig, **hub_kwargs):
    """The checkpoint's image processor; where it has none (or the model came as an object), the original evaluation
    transform for the configuration's image size: centre crop to that size after resizing by 1 / 0.875."""
    from transformers import AutoImageProcessor

    if model_name_or_path is not None:
        try:
            return AutoImageProcessor.from_pretrained(model_name_or_path, **hub_kwargs)
        except OSError:
            logger.warning("%s has no image processor config; writing the default PVT one.", model_name_or_path)
    height, width = config.image_hw
    return PvtImageProcessor(crop_size={"height": height, "width": width}, crop_pct=0.875)


def export_program(model: PvtForImageClassification | PvtBackbone, opset_version: int | None = None):
    """The `torch.onnx.ONNXProgram` of `model` with batch, height and width symbolic (float32, eval mode)."""
    try:
        import onnxscript  # noqa: F401  (the exporter needs it; fail early with the extra to install)
    except ImportError as error:
        message = 'The ONNX export needs onnx, onnxscript and onnxruntime: pip install "modeling-pvt[onnx]".'
        raise OnnxExportError(message) from error
    config = model.config
    minimum = smallest_input_side(config)
    height, width = config.image_hw
    # An example input whose patch grids differ from the stored position-embedding grid, so that the traced graph
    # takes the resize path, which serves every size (at the stored size the resize is the identity).
    example = torch.randn(2, config.num_channels, height + minimum, width + 2 * minimum)
    dimensions = {
        0: torch.export.Dim("batch", min=1),
        2: torch.export.Dim("height", min=minimum),
        3: torch.export.Dim("width", min=minimum),
    }
    training = model.training
    model.eval()
    try:
        return torch.onnx.export(
            _GraphOutputs(model).eval(),
            (example,),
            dynamo=True,
            input_names=["pixel_values"],
            output_names=output_names(model),
            dynamic_shapes={"pixel_values": dimensions},
            opset_version=opset_version,
            verbose=False,
        )
    except Exception as error:  # the exporter raises many kinds; the caller needs one, with the cause attached
        raise OnnxExportError(f"torch.onnx.export failed for {type(model).__name__}: {error}") from error
    finally:
        model.train(training)


@contextmanager
def _reference_inference(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode with every layer on the reference code, as it was afterwards."""
    layers = [module for module in model.modules() if isinstance(module, PvtLayer)]
    accelerated, training = [layer.cpu_acceleration for layer in layers], model.training
    model.eval()
    for layer in layers:
        layer.cpu_acceleration = False
    try:
        yield
    finally:
        model.train(training)
        for layer, enabled in zip(layers, accelerated):
            layer.cpu_acceleration = enabled


def compare_with_pytorch(
    model: PvtForImageClassification | PvtBackbone,
    onnx_path: str | os.PathLike,
    checks: Sequence[tuple[int, int | None, int | None]] = DEFAULT_CHECKS,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
) -> list[dict]:
    """Run the ONNX graph by ONNX Runtime and the model's reference code (its CPU acceleration off) on the same
    random inputs, one per `(batch, height, width)` of `checks` (`None`: the configuration's image size). Raises
    `OnnxExportError` where an output's shape differs or its values differ by more than `tolerance` (relative to the
    largest output value where that exceeds 1). Returns, per check, the input shape and each output's largest
    difference."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = output_names(model)
    generator = torch.Generator().manual_seed(seed)
    default_height, default_width = model.config.image_hw
    report = []
    with _reference_inference(model), torch.inference_mode():
        for batch, height, width in checks:
            shape = (batch, model.config.num_channels, height or default_height, width or default_width)
            pixel_values = torch.randn(shape, generator=generator)
            expected = _GraphOutputs(model)(pixel_values)
            expected = expected if isinstance(expected, tuple) else (expected,)
            actual = session.run(names, {"pixel_values": pixel_values.numpy()})
            differences = {
                name: _difference(name, shape, torch.from_numpy(result), reference, tolerance)
                for name, reference, result in zip(names, expected, actual)
            }
            report.append({"input_shape": list(shape), "max_abs_difference": differences})
    return report


def _difference(
    name: str, input_shape: tuple, result: torch.Tensor, reference: torch.Tensor, tolerance: float
) -> float:
    """The largest |result - reference|, checked against the tolerance (see `compare_with_pytorch`)."""
    if result.shape != reference.shape:
        raise OnnxExportError(
            f"ONNX output {name} has shape {tuple(result.shape)} for input {input_shape}, PyTorch's "
            f"{tuple(reference.shape)}."
        )
    difference = (result - reference).abs().max().item()
    allowed = tolerance * max(1.0, reference.abs().max().item())
    if not difference <= allowed:
        raise OnnxExportError(
            f"ONNX output {name} differs from PyTorch's by {difference:.3g} for input {input_shape} (tolerance "
            f"{allowed:.3g})."
        )
    return difference


def export_onnx(
    model: str | os.PathLike | PvtForImageClassification | PvtBackbone,
    output_dir: str | os.PathLike,
    task: str = "image-classification",
    out_features: Sequence[str] | None = None,
    image_processor=None,
    checks: Sequence[tuple[int, int | None, int | None]] = DEFAULT_CHECKS,
    tolerance: float = DEFAULT_TOLERANCE,
    opset_version: int | None = None,
    overwrite: bool = False,
    **hub_kwargs,
) -> Path:
    """Export `model` (a model, a saved folder or a Hub id) to `output_dir/model.onnx` with symbolic batch, height
    and width, check it against PyTorch at `checks` (see `compare_with_pytorch`), then write it with the model's
    `config.json` and the image processor's `preprocessor_config.json` (`image_processor`, else the checkpoint's,
    else the package's default).

    `task` picks the head when loading from a folder or id: `image-classification` (logits) or `backbone` (feature
    maps of the stages `out_features`, else the configuration's); `hub_kwargs` (`revision`, `token`, ...) go to
    `from_pretrained`. Raises `OnnxExportError` for a model it cannot export or a graph that disagrees with PyTorch,
    and writes nothing then."""
    output_dir = Path(output_dir)
    if (output_dir / MODEL_FILE).exists() and not overwrite:
        raise FileExistsError(f"{output_dir / MODEL_FILE} exists; choose another folder or pass overwrite=True.")
    source = None
    if isinstance(model, (str, os.PathLike)):
        source = model
        model = load_model(source, task, out_features, **hub_kwargs)
    check_exportable(model)
    if image_processor is None:
        image_processor = load_image_processor(source, model.config, **hub_kwargs)
    program = export_program(model, opset_version)
    with tempfile.TemporaryDirectory(prefix="pvt-onnx-") as staging:
        staged = Path(staging) / MODEL_FILE
        program.save(staged)
        report = compare_with_pytorch(model, staged, checks, tolerance)
        for check in report:
            logger.info("ONNX vs PyTorch at %s: largest differences %s", *check.values())
        output_dir.mkdir(parents=True, exist_ok=True)
        for path in Path(staging).iterdir():  # the graph, and its weights file where they are stored apart
            shutil.move(str(path), output_dir / path.name)
    model.config.to_json_file(output_dir / "config.json")  # the configuration alone: the graph needs no code files
    image_processor.save_pretrained(output_dir)
    return output_dir
