"""The CPU acceleration (`modeling_pvt.cpu_acceleration`): every route computes what the reference code computes, to
float32 rounding; the predicate steps aside wherever a route was not measured for or would change behaviour; the
measurement picks a route only when it is faster. Timing itself is the benchmark's job (scripts/benchmark.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from modeling_pvt import PvtForImageClassification, cpu_acceleration

REPO_ROOT = Path(__file__).resolve().parents[1]
needs_onednn = pytest.mark.skipif(not cpu_acceleration.ONEDNN_LINEAR, reason="no oneDNN linear kernel here")


def build(config, attn_implementation: str = "sdpa") -> PvtForImageClassification:
    return PvtForImageClassification._from_config(config, attn_implementation=attn_implementation).eval()


def first_layer(model: PvtForImageClassification):
    """The first layer (spatial reduction 8) and an input for it: `(layer, tokens, height, width)`."""
    layer = model.pvt.encoder.block[0][0]
    height, width = 16, 16
    return layer, torch.randn(2, height * width, layer.layer_norm_1.normalized_shape[0]), height, width


@needs_onednn
@pytest.mark.parametrize("route", ["onednn_products", "token_blocks"])
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
def test_training_route_matches_the_reference_code(tiny_config):
    layer, hidden_states, height, width = first_layer(build(tiny_config).train())
    results = {}
    for route in ("reference", "onednn_products"):
        inputs = hidden_states.clone().requires_grad_()
        output = cpu_acceleration.ROUTES[route](layer, inputs, height, width)
        gradients = torch.autograd.grad(output.square().sum(), [inputs, *layer.parameters()])
        results[route] = (output, *gradients)
    for actual, expected in zip(results["onednn_products"], results["reference"]):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_f_linear_to_second_order(bias):
    weight = torch.randn(24, 40, requires_grad=True)
    bias_tensor = torch.randn(24, requires_grad=True) if bias else None
    inputs = torch.randn(2, 7, 40, requires_grad=True)
    leaves = [t for t in (inputs, weight, bias_tensor) if t is not None]
    results = []
    for function in (cpu_acceleration.OneDnnLinear.apply, torch.nn.functional.linear):
        output = function(inputs, weight, bias_tensor)
        first = torch.autograd.grad(output.square().sum(), leaves, create_graph=True)
        second = torch.autograd.grad(sum(g.square().sum() for g in first), leaves)
        results.append((output, *first, *second))
    for actual, expected in zip(*results):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


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
    assert cpu_acceleration.fast_path_applies(layer, hidden_states)
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
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
    assert applies(layer, hidden_states)

    assert not applies(layer, hidden_states.to(torch.bfloat16))
    assert not applies(layer, hidden_states.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not applies(layer, hidden_states)
    with FlopCounterMode(display=False):  # a Python dispatch mode
        assert not applies(layer, hidden_states)
    seen = []
    torch.func.grad(lambda x: seen.append(applies(layer, hidden_states)) or x.sum())(torch.zeros(2))
    torch.func.vmap(lambda x: seen.append(applies(layer, hidden_states)) or x * 2)(torch.zeros(2))
    assert seen == [False, False]
    traced = []
    torch.jit.trace(lambda x: traced.append(applies(layer, hidden_states)) or x * 2, torch.zeros(2), check_trace=False)
    assert traced == [False]
    compiled = []
    torch.compile(lambda x: compiled.append(applies(layer, hidden_states)) or x * 2, backend="eager")(torch.zeros(2))
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

    model.gradient_checkpointing_enable()
    model.train()
    assert not applies(layer, hidden_states)
    with torch.no_grad():
        assert applies(layer, hidden_states)  # nothing is checkpointed without autograd
    model.gradient_checkpointing_disable()

    model.set_attn_implementation("eager")
    assert applies(layer, hidden_states)
    model.config._attn_implementation = layer.attention.self.config._attn_implementation = "flex_attention"
    assert not applies(layer, hidden_states)


def test_the_measurement_keeps_the_reference_unless_clearly_faster(tiny_config, monkeypatch):
    model = build(tiny_config).train()
    layer, hidden_states, height, width = first_layer(model)
    fake_seconds = {"reference": 1.0, "onednn_products": 0.99}
    monkeypatch.setattr(cpu_acceleration, "_time_route", lambda name, *args: fake_seconds[name])
    assert cpu_acceleration._measure(layer, hidden_states, height, width)[0] == "reference"
    fake_seconds["onednn_products"] = 0.8
    assert cpu_acceleration._measure(layer, hidden_states, height, width)[0] == "onednn_products"


@needs_onednn
def test_measuring_leaves_random_streams_and_gradients_alone(tiny_config, monkeypatch):
    tiny_config.hidden_dropout_prob = 0.1
    model = build(tiny_config).train()
    layer, hidden_states, height, width = first_layer(model)
    monkeypatch.setattr(cpu_acceleration, "measured_routes", {})
    torch.manual_seed(1)
    expected = layer(hidden_states, height, width)[0]  # measures first, then runs the chosen route
    assert cpu_acceleration.measured_routes
    assert all(p.grad is None for p in layer.parameters())
    torch.manual_seed(1)
    model.set_cpu_acceleration(False)
    torch.testing.assert_close(layer(hidden_states, height, width)[0], expected, atol=1e-5, rtol=1e-5)


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
    for row in results["eval"]:
        assert row["stock"] > 0 and row["ours"] > 0 and row["ours_straightforward"] > 0 and 0 < row["ours_mfu"]
    assert results["memory"]["stock_mib"] >= 0 and results["memory"]["ours_mib"] >= 0
    assert {target["target"] for target in results["targets"]} >= {"detection_speedup", "training_step_b8"}
