"""What a PyTorch user relies on works with this model on the CPU, with its CPU acceleration on (the default):
reduced precision, autocast, hooks, dynamic quantization, switching the attention implementation, gradients of
gradients, torch.func and torch.compile."""

import sys

import pytest
import torch
from torch import nn

from modeling_pvt import PvtForImageClassification, cpu_acceleration
from modeling_pvt import modeling_pvt as modeling


@pytest.fixture(autouse=True)
def accelerated_routes(monkeypatch):
    """Wherever the predicate lets a layer through, run the acceleration's own route in several token blocks rather
    than whatever this machine measured fastest at these toy sizes."""
    monkeypatch.setattr(cpu_acceleration, "TOKEN_BLOCK_BYTES", 2048)
    monkeypatch.setattr(cpu_acceleration, "_route_key", lambda *args: "every layer")
    monkeypatch.setattr(cpu_acceleration, "measured_routes", {"every layer": ("fused_token_blocks", {})})


def build(config, attn_implementation: str = "sdpa") -> PvtForImageClassification:
    return PvtForImageClassification._from_config(config, attn_implementation=attn_implementation).eval()


def assert_close_in_bf16(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """bfloat16 keeps 8 bits of mantissa: a few percent of the values' scale after a dozen layers."""
    scale = expected.abs().max().item()
    assert (actual.float() - expected).abs().max().item() <= 0.05 * scale + 1e-3


def test_bfloat16_model_matches_float32(tiny_config):
    model = build(tiny_config)
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(pixel_values).logits
        model.to(torch.bfloat16)
        logits = model(pixel_values.to(torch.bfloat16)).logits
    assert logits.dtype == torch.bfloat16
    assert_close_in_bf16(logits, expected)


def test_cpu_autocast_inference_and_training_step_match_float32(tiny_config):
    model = build(tiny_config)
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    with torch.no_grad():
        expected = model(pixel_values).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(pixel_values).logits
    assert_close_in_bf16(logits, expected)

    model.train()
    model(pixel_values, labels=labels).loss.backward()
    expected_gradients = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(pixel_values, labels=labels).loss
    loss.backward()  # what `accelerate launch --mixed_precision bf16` does on a CPU host
    gradients = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.nn.functional.cosine_similarity(gradients, expected_gradients, dim=0) > 0.99
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_forward_hooks_fire(tiny_config, mode):
    model = build(tiny_config)
    calls = []
    layers = [layer for stage in model.pvt.encoder.block for layer in stage]
    for layer in layers:
        for module in (layer.attention, layer.mlp, layer.mlp.dense1):
            module.register_forward_hook(lambda module, args, output: calls.append(module))
    pixel_values = torch.randn(2, 3, 64, 64)
    if mode == "eval":
        with torch.no_grad():
            model(pixel_values)
    else:
        model.train()(pixel_values, labels=torch.tensor([0, 1])).loss.backward()
    assert len(calls) == 3 * len(layers)


def test_dynamic_quantization_reaches_every_projection(tiny_config):
    model = build(tiny_config)
    linears = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    assert len(linears) == 6 * sum(tiny_config.depths) + 1  # q, k, v, output, two MLP products; the classifier
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    modules = dict(quantized.named_modules())
    assert all(type(modules[name]) is torch.ao.nn.quantized.dynamic.Linear for name in linears)
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(quantized(pixel_values).logits, model(pixel_values).logits, atol=0.05, rtol=0.05)


def test_set_attn_implementation_switches_at_run_time(tiny_config, monkeypatch):
    model = build(tiny_config, "sdpa")
    model.set_cpu_acceleration(False)  # the acceleration's own routes do not go through the interface
    eager_calls = []
    eager = modeling.eager_attention_forward
    monkeypatch.setattr(modeling, "eager_attention_forward", lambda *a, **k: eager_calls.append(1) or eager(*a, **k))
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        sdpa_logits = model(pixel_values).logits
        assert not eager_calls
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"
        eager_logits = model(pixel_values).logits
        assert len(eager_calls) == sum(tiny_config.depths)
        model.set_attn_implementation("sdpa")
        torch.testing.assert_close(model(pixel_values).logits, sdpa_logits)
    assert len(eager_calls) == sum(tiny_config.depths)
    torch.testing.assert_close(eager_logits, sdpa_logits, atol=1e-5, rtol=1e-4)


def input_gradient_penalty(model: PvtForImageClassification, pixel_values: torch.Tensor) -> torch.Tensor:
    """A gradient penalty: differentiating it needs the gradient of a gradient."""
    pixel_values = pixel_values.clone().requires_grad_()
    (grad,) = torch.autograd.grad(model(pixel_values).logits.square().sum(), pixel_values, create_graph=True)
    return grad.square().sum()


def test_double_backward_matches_the_reference_code(tiny_config):
    # eager attention: PyTorch's fused SDPA kernels have no second derivative on the CPU
    model = build(tiny_config, "eager").train()
    pixel_values = torch.randn(2, 3, 64, 64)
    input_gradient_penalty(model, pixel_values).backward()
    accelerated = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.set_cpu_acceleration(False)
    input_gradient_penalty(model, pixel_values).backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(accelerated[name], parameter.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_torch_func_grad_and_jacrev(tiny_config):
    model = build(tiny_config)
    parameters = dict(model.named_parameters())
    pixel_values = torch.randn(1, 3, 64, 64)

    def loss(params):
        return torch.func.functional_call(model, params, (pixel_values,)).logits.square().sum()

    gradients = torch.func.grad(loss)(parameters)
    loss(parameters).backward()
    for name, parameter in parameters.items():
        torch.testing.assert_close(gradients[name], parameter.grad, atol=1e-6, rtol=1e-4, msg=name)
    jacobian = torch.func.jacrev(lambda x: model(x).logits)(pixel_values)
    assert jacobian.shape == (1, tiny_config.num_labels, 1, 3, 64, 64)


def compile_available() -> bool:
    try:
        import torch._dynamo  # noqa: F401
    except Exception:
        return False
    return sys.platform != "win32"


@pytest.mark.skipif(not compile_available(), reason="torch.compile is not available on this platform")
def test_compiled_forward_and_backward_agree_with_eager(tiny_config):
    """One graph (`fullgraph=True` fails on any graph break) with the same logits and gradients. `aot_eager` traces
    exactly what inductor would compile, without minutes of C++ compilation."""
    model = build(tiny_config)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    with torch.no_grad():
        torch.testing.assert_close(compiled(pixel_values).logits, model(pixel_values).logits, atol=1e-5, rtol=1e-4)
    model.train()
    model(pixel_values, labels=labels).loss.backward()
    eager = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    compiled(pixel_values, labels=labels).loss.backward()  # the compiled module shares the model's parameters
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, eager[name], atol=1e-6, rtol=1e-4, msg=name)
