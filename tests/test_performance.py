"""The CPU acceleration (`modeling_pvt.cpu_acceleration`): every route computes what the reference code computes, to
float32 rounding; the predicate steps aside wherever a route was not measured for or would change behaviour; the
measurement picks a route only when it is faster. Timing itself is the benchmark's job (scripts/benchmark.py)."""

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from script_launch import load_script
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from modeling_pvt import PvtForImageClassification, cpu_acceleration
from modeling_pvt.training.optimization import build_optimizer

REPO_ROOT = Path(__file__).resolve().parents[1]
needs_onednn = pytest.mark.skipif(not cpu_acceleration.ONEDNN_LINEAR, reason="no oneDNN linear kernel here")


@pytest.fixture(autouse=True)
def fresh_measurements(monkeypatch):
    """No route kept by an earlier test in this process: a shape that kept the reference code skips the predicate."""
    monkeypatch.setattr(cpu_acceleration, "measured_routes", {})


def build(config, attn_implementation: str = "sdpa") -> PvtForImageClassification:
    return PvtForImageClassification._from_config(config, attn_implementation=attn_implementation).eval()


def first_layer(model: PvtForImageClassification):
    """The first layer (spatial reduction 8) and an input for it: `(layer, tokens, height, width)`."""
    layer = model.pvt.encoder.block[0][0]
    height, width = 16, 16
    return layer, torch.randn(2, height * width, layer.layer_norm_1.normalized_shape[0]), height, width


@needs_onednn
@pytest.mark.parametrize("route", ["fused", "fused_token_blocks"])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_inference_routes_match_the_reference_code(tiny_config, route, qkv_bias, monkeypatch):
    tiny_config.qkv_bias = qkv_bias
    model = build(tiny_config)
    monkeypatch.setattr(cpu_acceleration, "TOKEN_BLOCK_BYTES", 2048)  # several blocks, whole images and parts
    for stage in model.pvt.encoder.block:
        layer = stage[0]
        hidden_size = layer.layer_norm_1.normalized_shape[0]
        for batch_size, height, width in [(3, 16, 16), (1, 8, 12)]:
            hidden_states = torch.randn(batch_size, height * width, hidden_size)
            with torch.no_grad():
                expected = cpu_acceleration.ROUTES["reference"](layer, hidden_states, height, width)
                actual = cpu_acceleration.ROUTES[route](layer, hidden_states, height, width)
            torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@needs_onednn
@pytest.mark.parametrize("route", ["fused", "fused_token_blocks"])
def test_inference_after_training_steps_uses_the_updated_weights(tiny_config, route, monkeypatch):
    """Evaluation between epochs: a route kept for a shape must compute with the weights as the optimizer left them
    (PyTorch's fused AdamW updates them in place), never with anything made from earlier weights."""
    monkeypatch.setattr(cpu_acceleration, "choose_route", lambda seconds: route)
    model = build(tiny_config)
    images = torch.randn(4, 3, 32, 32)
    optimizer = build_optimizer(model.parameters(), torch.device("cpu"), lr=1e-2)
    for _ in range(2):
        model.eval()
        with torch.no_grad():
            accelerated = model(pixel_values=images).logits
            model.set_cpu_acceleration(False)
            torch.testing.assert_close(accelerated, model(pixel_values=images).logits, atol=1e-4, rtol=1e-4)
            model.set_cpu_acceleration(True)
        model.train()
        model(pixel_values=images, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_token_blocks_cover_every_token_once():
    for batch_size, num_tokens, per_block in [(3, 10, 4), (3, 10, 25), (2, 7, 7), (1, 5, 1)]:
        seen = torch.zeros(batch_size, num_tokens, dtype=torch.int)
        for images, tokens in cpu_acceleration.token_blocks(batch_size, num_tokens, per_block):
            seen[images, tokens] += 1
        assert (seen == 1).all()


@needs_onednn
def test_the_model_takes_the_fast_path_by_default_and_matches(tiny_config):
    model = build(tiny_config)
    layer, hidden_states, *_ = first_layer(model)
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert cpu_acceleration.fast_path_applies(layer, hidden_states)
        accelerated = model(pixel_values).logits
        model.set_cpu_acceleration(False)
        assert not cpu_acceleration.fast_path_applies(layer, hidden_states)
        torch.testing.assert_close(accelerated, model(pixel_values).logits, atol=1e-5, rtol=1e-5)


class _Wrapped(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, inputs):
        return self.inner(inputs)


@needs_onednn
def test_the_predicate_steps_aside(tiny_config):
    model = build(tiny_config)
    layer, hidden_states, *_ = first_layer(model)
    applies = cpu_acceleration.fast_path_applies
    assert not applies(layer, hidden_states)  # autograd records: training and gradients run the reference code
    torch.set_grad_enabled(False)
    try:
        assert applies(layer, hidden_states)
        model.train()
        assert not applies(layer, hidden_states)  # dropout and drop-path act in training mode
        model.eval()

        assert not applies(layer, hidden_states.to(torch.bfloat16))
        assert not applies(layer, hidden_states.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not applies(layer, hidden_states)
        with FlopCounterMode(display=False):  # a Python dispatch mode
            assert not applies(layer, hidden_states)
        seen = []
        torch.func.vmap(lambda x: seen.append(applies(layer, hidden_states)) or x * 2)(torch.zeros(2))
        assert seen == [False]
        traced = []
        trace_input = torch.zeros(2)

        def record(x):
            traced.append(applies(layer, hidden_states))
            return x * 2

        torch.jit.trace(record, trace_input, check_trace=False)
        assert traced == [False]
        compiled = []
        torch.compile(lambda x: compiled.append(applies(layer, hidden_states)) or x * 2, backend="eager")(trace_input)
        assert compiled == [False]

        handle = layer.mlp.dense1.register_forward_pre_hook(lambda *args: None)
        assert not applies(layer, hidden_states)
        handle.remove()
        handle = nn.modules.module.register_module_forward_hook(lambda *args: None)
        assert not applies(layer, hidden_states)
        handle.remove()
        assert applies(layer, hidden_states)

        original = layer.mlp.dense1
        layer.mlp.dense1 = _Wrapped(original)  # an adapter (LoRA and the like) around a projection
        assert not applies(layer, hidden_states)
        layer.mlp.dense1 = original

        model.set_attn_implementation("eager")
        assert applies(layer, hidden_states)
        model.config._attn_implementation = layer.attention.self.config._attn_implementation = "flex_attention"
        assert not applies(layer, hidden_states)
    finally:
        torch.set_grad_enabled(True)


def test_a_route_is_kept_only_if_faster_than_the_reference_in_every_round():
    def choose(fused: list[float], blocks: list[float]) -> str:
        return cpu_acceleration.choose_route({"reference": [1.0] * 4, "fused": fused, "fused_token_blocks": blocks})

    assert choose([0.99] * 4, [1.2] * 4) == "reference"  # faster every time, but under MIN_GAIN
    assert choose([0.9] * 4, [0.8] * 4) == "fused_token_blocks"
    assert choose([0.9, 0.9, 0.99, 0.99], [2.0] * 4) == "fused"  # the median round gained over MIN_GAIN
    # faster by median, slower in one round (another process's burst, say): not kept
    assert choose([0.5, 0.5, 0.5, 1.1], [2.0] * 4) == "reference"
    assert cpu_acceleration.choose_route({"reference": [], "fused": [], "fused_token_blocks": []}) == "reference"


@needs_onednn
def test_a_layer_shape_that_kept_the_reference_code_runs_it_directly(tiny_config, monkeypatch):
    layer, hidden_states, *_ = first_layer(build(tiny_config))
    key = cpu_acceleration._route_key(layer, hidden_states)
    with torch.no_grad():
        monkeypatch.setattr(cpu_acceleration, "measured_routes", {key: ("fused", {})})
        assert cpu_acceleration.fast_path_applies(layer, hidden_states)
        monkeypatch.setattr(cpu_acceleration, "measured_routes", {key: ("reference", {})})
        assert not cpu_acceleration.fast_path_applies(layer, hidden_states)


@needs_onednn
def test_the_measurement_alternates_the_routes_times_each_and_leaves_out_the_warm_up_round(tiny_config, monkeypatch):
    """The real routes run, in alternating order, each call timed on its own and the first round left out. The clock
    is the test's: a route's call takes 1 s, "fused" 2 s, and every route's first call 100 s."""
    layer, hidden_states, height, width = first_layer(build(tiny_config))
    clock, calls, outputs = [0.0], [], {}

    def timed(name: str, route):
        def run(*args):
            clock[0] += 100.0 if name not in outputs else 2.0 if name == "fused" else 1.0
            calls.append(name)
            outputs[name] = route(*args)
            return outputs[name]

        return run

    real = dict(cpu_acceleration.ROUTES)
    monkeypatch.setattr(cpu_acceleration, "ROUTES", {name: timed(name, route) for name, route in real.items()})
    monkeypatch.setattr(cpu_acceleration.time, "perf_counter", lambda: clock[0])
    with torch.no_grad():
        seconds = cpu_acceleration._measure(layer, hidden_states, height, width)
    names = list(real)
    assert calls[: 2 * len(names)] == names + names[::-1]
    assert len(calls) == cpu_acceleration.MEASUREMENT_ROUNDS * len(names)
    rounds = cpu_acceleration.MEASUREMENT_ROUNDS - 1
    assert seconds == {name: [2.0 if name == "fused" else 1.0] * rounds for name in names}
    for name in names:  # each call computed the layer
        torch.testing.assert_close(outputs[name], outputs["reference"], atol=1e-5, rtol=1e-5)


@needs_onednn
def test_only_inference_is_measured_and_accelerated(tiny_config, monkeypatch):
    tiny_config.hidden_dropout_prob = 0.1
    model = build(tiny_config)
    layer, hidden_states, height, width = first_layer(model)
    layer(hidden_states, height, width)[0].sum().backward()  # eval mode, autograd on (a saliency map, say)
    with torch.no_grad():
        model.train()
        layer(hidden_states, height, width)
    assert not cpu_acceleration.measured_routes
    model.eval()
    with torch.no_grad():
        accelerated = layer(hidden_states, height, width)[0]
        ((route, seconds),) = cpu_acceleration.measured_routes.values()
        assert route in cpu_acceleration.ROUTES and set(seconds) == set(cpu_acceleration.ROUTES)
        model.set_cpu_acceleration(False)
        torch.testing.assert_close(layer(hidden_states, height, width)[0], accelerated, atol=1e-5, rtol=1e-5)


@needs_onednn
@pytest.mark.parametrize("route", ["reference", "fused", "fused_token_blocks"])
def test_repeated_forwards_are_identical_from_the_first_call(tiny_config, route, monkeypatch):
    """Whatever route the measurement keeps, every call gives its output, the measuring call included."""
    monkeypatch.setattr(cpu_acceleration, "choose_route", lambda seconds: route)
    models = [build(tiny_config) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        first, second, other = (model(pixel_values).logits for model in (models[0], models[0], models[1]))
    assert torch.equal(first, second) and torch.equal(first, other)
    assert {kept for kept, _ in cpu_acceleration.measured_routes.values()} == {route}


def test_benchmark_smoke_runs_end_to_end(tmp_path):
    output = tmp_path / "results.json"
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "benchmark.py"), "--smoke", "--output", str(output)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(output.read_text())
    assert output.with_suffix(".png").stat().st_size > 10_000
    assert results["machine"]["cpu_capability"] and results["gemm_flops_per_s"]
    assert all(check["max_abs_logit_difference"] <= check["tolerance"] for check in results["parity"])
    models = {"stock", "ours", "ours_straightforward"}
    # ONNX Runtime on our export, where the `onnx` extra is installed, in the eval and detection-size rows
    onnx_extra = all(importlib.util.find_spec(name) for name in ("onnxruntime", "onnxscript"))
    graphs = {"onnxruntime"} if onnx_extra else set()
    for row in results["eval"]:
        assert set(row["images_per_s"]) == models | graphs
        times = row["timing"]["times_s"]  # the rounds kept: every figure of the row comes from them
        for model, rate in row["images_per_s"].items():
            assert rate == pytest.approx(row["batch"] / statistics.median(times[model])), model
        for ratio, (faster, slower) in {
            "ours_vs_stock": ("ours", "stock"),
            "ours_vs_straightforward": ("ours", "ours_straightforward"),
        }.items():
            per_round = [base / taken for taken, base in zip(times[faster], times[slower])]
            assert row[ratio] == pytest.approx(statistics.median(per_round)), ratio
            assert row["per_round_range"][ratio] == pytest.approx([min(per_round), max(per_round)]), ratio
        assert ("ours_vs_onnxruntime" in row) == bool(graphs)
    assert set(results["detection"]["latency_s"]) == models | graphs
    forward_checks = [check for check in results["parity"] if not check["case"].startswith("training")]
    assert all(set(check["per_model"]) == {"ours", "ours_straightforward"} | graphs for check in forward_checks)
    assert set(results["memory"]["peak_mib"]) == models and set(results["training"]["step_s"]) == models
    assert results["allocator"]["configured_by_mallopt"] or sys.platform != "linux"  # documented settings, all rows
    assert {target["target"] for target in results["targets"]} >= {"detection_speedup", "training_step_b8"}


@pytest.mark.parametrize(("detector", "dtype"), [("deformable_detr", torch.float32), ("detr", torch.bfloat16)])
def test_detector_training_rows_time_pvt_small_against_resnet50_on_the_same_batch(detector, dtype):
    """The GPU session's detection training rows, on a CPU at a small size: bf16 takes the autocast branch the GPU
    rows take."""
    benchmark = load_script("benchmark")
    plan = benchmark.Plan.build(smoke=True, device="cpu", rounds=1)
    plan.warmup, plan.detection_size = 0, (64, 96)
    row = benchmark.run_detector_training_row(detector, plan, "cpu", dtype)
    assert row["case"] == f"{detector} training step 64x96 batch 1, {str(dtype).removeprefix('torch.')}"
    times = row["timing"]["times_s"]
    assert set(times) == set(row["step_s"]) == {"pvt_small", "resnet50"}
    assert row["pvt_small_vs_resnet50_speedup"] == pytest.approx(times["resnet50"][0] / times["pvt_small"][0])
    assert row["parameters_millions"]["pvt_small"] != row["parameters_millions"]["resnet50"]
    assert all(math.isfinite(loss) and loss > 0 for loss in row["first_loss"].values())
