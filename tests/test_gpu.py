"""What the model does on a CUDA GPU: bf16, the fused attention kernels, training under autocast, torch.compile.

Skipped where there is no GPU (CI); run on one with `python -m pytest tests/test_gpu.py`.
"""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from script_launch import load_script
from torch.nn.attention import SDPBackend, sdpa_kernel

from modeling_pvt import PvtBackbone, PvtConfig, PvtForImageClassification
from modeling_pvt.tasks import evaluation
from modeling_pvt.training.loop import TrainingLoop

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.double().cpu(), reference.double().cpu()
    return ((value - reference).norm() / reference.norm()).item()


@pytest.fixture(autouse=True)
def _exact_float32():
    """fp32 comparisons mean fp32: TF32 matrix units would round to 10 mantissa bits."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@pytest.fixture
def tiny_preset() -> PvtConfig:
    """PVT-tiny as published (head size 64 in every stage, as the flash kernel wants), 10 classes."""
    return PvtConfig.from_preset("tiny", num_labels=10)


def test_cuda_float32_matches_cpu_float64(tiny_preset):
    model = PvtForImageClassification(tiny_preset).eval()
    pixel_values = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        reference = model.double()(pixel_values.double()).logits
        on_gpu = model.float().cuda()(pixel_values.cuda()).logits
    assert relative_error(on_gpu, reference) < 1e-5


@pytest.mark.parametrize("backend", [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
def test_bf16_with_each_fused_kernel_is_close_to_float64(tiny_preset, backend):
    model = PvtForImageClassification(tiny_preset).eval()
    pixel_values = torch.randn(4, 3, 224, 224)
    with torch.inference_mode():
        reference = model.double()(pixel_values.double(), output_hidden_states=True)
        model = model.to(device="cuda", dtype=torch.bfloat16)
        with sdpa_kernel(backend):  # only this kernel: an error here means it cannot run PVT's attention
            output = model(pixel_values.to(device="cuda", dtype=torch.bfloat16), output_hidden_states=True)
    for hidden, hidden_reference in zip(output.hidden_states, reference.hidden_states):
        assert torch.isfinite(hidden).all()
        assert relative_error(hidden, hidden_reference) < 2e-2
    assert relative_error(output.logits, reference.logits) < 3e-2


def test_sdpa_and_eager_attention_agree_in_bf16(tiny_preset):
    pixel_values = torch.randn(4, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    sdpa = PvtForImageClassification(tiny_preset).to(device="cuda", dtype=torch.bfloat16).eval()
    eager = PvtForImageClassification._from_config(tiny_preset, attn_implementation="eager")
    eager.load_state_dict(sdpa.state_dict())
    eager = eager.to(device="cuda", dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        assert relative_error(sdpa(pixel_values).logits, eager(pixel_values).logits) < 2e-2


def test_bf16_autocast_training_learns_a_fixed_batch(tiny_preset):
    model = PvtForImageClassification(tiny_preset).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    pixel_values = torch.randn(8, 3, 224, 224, device="cuda")
    labels = torch.arange(8, device="cuda") % 10
    losses = []
    for _ in range(15):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(pixel_values, labels=labels).loss
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bf16_autocast_gradients_are_close_to_float32(tiny_preset):
    model = PvtForImageClassification(tiny_preset).cuda().train()
    pixel_values = torch.randn(4, 3, 224, 224, device="cuda")
    labels = torch.tensor([0, 1, 2, 3], device="cuda")

    def gradient_vector(autocast: bool) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            model(pixel_values, labels=labels).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    assert relative_error(gradient_vector(True), gradient_vector(False)) < 5e-2


def test_backbone_feature_maps_at_detection_size_in_bf16():
    config = PvtConfig.from_preset("small")
    backbone = PvtBackbone(config).to(device="cuda", dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        maps = backbone(torch.randn(1, 3, 800, 1216, device="cuda", dtype=torch.bfloat16)).feature_maps
    assert [tuple(feature_map.shape[2:]) for feature_map in maps] == [(200, 304), (100, 152), (50, 76), (25, 38)]
    assert all(torch.isfinite(feature_map).all() for feature_map in maps)


def test_compiled_forward_agrees_with_eager_on_gpu(tiny_preset):
    model = PvtForImageClassification(tiny_preset).to(device="cuda", dtype=torch.bfloat16).eval()
    pixel_values = torch.randn(4, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(model, fullgraph=True)
    with torch.inference_mode():
        eager_logits = model(pixel_values).logits
        compiled_logits = compiled(pixel_values).logits
    assert relative_error(compiled_logits, eager_logits) < 2e-2


def test_train_script_steps_and_evaluation_never_wait_for_the_gpu(tmp_path, monkeypatch):
    """The host must run ahead of the GPU. A step of `scripts/train.py` (the next batch from pinned memory,
    normalising, erasing, Mixup/CutMix, forward, backward, clipping, fused AdamW, the schedule) and an evaluation batch
    (forward, loss, gathering the logits) queue work and never wait for the device. PyTorch's sync debug mode flags
    every wait; they are counted from the start of the second step (batch) to the start of the last. The end of an
    epoch reads the loss once, and the evaluation reads its scores at its end, which is allowed."""
    generator = np.random.default_rng(0)
    for index in range(64):
        folder = tmp_path / "images" / f"class_{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = generator.integers(0, 256, (48, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.jpg", quality=90)
    train = load_script("train")
    arguments = ["--train_dir", str(tmp_path / "images"), "--validation_dir", str(tmp_path / "images")]
    arguments += ["--output_dir", str(tmp_path / "run"), "--image_size", "32", "--num_train_epochs", "1"]
    arguments += [
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "8",
        "--dataloader_num_workers",
        "2",
    ]
    arguments += ["--max_grad_norm", "1.0"]
    arguments += ["--config_overrides", json.dumps({"hidden_sizes": [16, 32, 40, 64], "depths": [1, 1, 1, 1]})]
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")

    # How many warnings had been issued when each training step and each evaluation batch began.
    step_starts: list[int] = []
    evaluation_starts: list[int] = []
    run, batches_with_logits = TrainingLoop.run, evaluation._batches_with_logits
    with warnings.catch_warnings(record=True) as issued:

        def run_marking_step_starts(loop, compute_loss, on_epoch_end=None):
            def compute_loss_marking_the_start(batch):
                step_starts.append(len(issued))
                return compute_loss(batch)

            return run(loop, compute_loss_marking_the_start, on_epoch_end)

        def batches_marking_their_starts(*args):
            for batch_and_logits in batches_with_logits(*args):
                evaluation_starts.append(len(issued))
                yield batch_and_logits

        monkeypatch.setattr(TrainingLoop, "run", run_marking_step_starts)
        monkeypatch.setattr(evaluation, "_batches_with_logits", batches_marking_their_starts)
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train.main(arguments)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def syncs_between(start: int, end: int) -> list[str]:
        messages = [str(warning.message) for warning in issued[start:end]]
        return [message for message in messages if "synchronizing CUDA operation" in message]

    assert len(step_starts) == 8 and len(evaluation_starts) == 8  # 64 images in batches of 8, one epoch
    assert syncs_between(step_starts[1], step_starts[-1]) == []
    assert syncs_between(evaluation_starts[1], evaluation_starts[-1]) == []
    assert json.loads((tmp_path / "run" / "all_results.json").read_text())["device"] == "cuda"
