import pytest
import torch
from transformers.models.pvt import PvtConfig as StockPvtConfig
from transformers.models.pvt import PvtForImageClassification as StockPvtForImageClassification

from modeling_pvt import PvtConfig, PvtForImageClassification, PvtModel


def build(config: PvtConfig, attn_implementation: str = "sdpa") -> PvtForImageClassification:
    return PvtForImageClassification._from_config(config, attn_implementation=attn_implementation).eval()


def stock_twin(config: PvtConfig) -> StockPvtForImageClassification:
    fields = {key: value for key, value in config.to_dict().items() if key != "conv_layer_norm_eps"}
    return StockPvtForImageClassification(StockPvtConfig(**fields)).eval()


def test_default_attention_is_sdpa(tiny_config):
    assert PvtForImageClassification(tiny_config).config._attn_implementation == "sdpa"


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_parity_with_stock_on_the_same_weights(tiny_config, attn_implementation):
    # Stock transformers uses layer_norm_eps in every norm; with that epsilon both compute the same function.
    tiny_config.conv_layer_norm_eps = tiny_config.layer_norm_eps
    ours = build(tiny_config, attn_implementation)
    stock = stock_twin(tiny_config)
    stock.load_state_dict(ours.state_dict(), strict=True)
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(pixel_values).logits, stock(pixel_values).logits, atol=1e-5, rtol=1e-4)
    # and the other way round
    other = build(tiny_config, attn_implementation)
    other.load_state_dict(stock.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(other(pixel_values).logits, stock(pixel_values).logits, atol=1e-5, rtol=1e-4)


def test_checkpoint_round_trips_with_stock(tiny_config, tmp_path):
    ours = build(tiny_config)
    ours.save_pretrained(tmp_path / "ours")
    stock, info = StockPvtForImageClassification.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        # stock's patch-embedding and reduction norms use eps 1e-6 instead of 1e-5: nearly the same logits
        torch.testing.assert_close(stock.eval()(pixel_values).logits, ours(pixel_values).logits, atol=1e-3, rtol=1e-3)

    stock.save_pretrained(tmp_path / "stock")
    back, info = PvtForImageClassification.from_pretrained(
        tmp_path / "stock", output_loading_info=True, conv_layer_norm_eps=1e-6
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(pixel_values).logits, stock(pixel_values).logits, atol=1e-5, rtol=1e-4)


def test_original_epsilons_are_used(tiny_config):
    model = PvtModel(tiny_config)
    embeddings = model.encoder.patch_embeddings[0]
    attention = model.encoder.block[0][0].attention.self
    assert embeddings.layer_norm.eps == 1e-5 and attention.layer_norm.eps == 1e-5
    assert model.encoder.block[0][0].layer_norm_1.eps == 1e-6 and model.encoder.layer_norm.eps == 1e-6


@pytest.mark.parametrize("height, width", [(64, 64), (96, 96), (65, 71), (32, 96), (225, 231)])
def test_any_input_size(tiny_config, height, width):
    model = build(tiny_config)
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, height, width), output_hidden_states=True)
    assert outputs.logits.shape == (1, 5)
    assert outputs.hidden_states[-1].shape == (1, 1 + (height // 32) * (width // 32), 64)


def test_large_input_with_a_real_size():
    model = build(PvtConfig.from_preset("tiny", num_labels=3))
    with torch.no_grad():
        hidden = model.pvt(torch.randn(1, 3, 512, 512)).last_hidden_state
    assert hidden.shape == (1, 1 + 16 * 16, 512)
    assert torch.isfinite(hidden).all()


def test_resized_position_embeddings_are_bilinear(tiny_config):
    embeddings = PvtModel(tiny_config).encoder.patch_embeddings[0]
    stored = embeddings.position_embeddings  # 16x16 grid at image_size 64
    assert embeddings.interpolate_pos_encoding(16, 16) is stored
    grid = stored.reshape(1, 16, 16, -1).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(20, 12), mode="bilinear", align_corners=False)
    expected = expected.reshape(1, -1, 20 * 12).permute(0, 2, 1)
    torch.testing.assert_close(embeddings.interpolate_pos_encoding(20, 12), expected)


def test_eager_and_sdpa_agree(tiny_config):
    sdpa = build(tiny_config, "sdpa")
    eager = build(tiny_config, "eager")
    eager.load_state_dict(sdpa.state_dict())
    pixel_values = torch.randn(3, 3, 80, 64)
    with torch.no_grad():
        torch.testing.assert_close(sdpa(pixel_values).logits, eager(pixel_values).logits, atol=1e-5, rtol=1e-4)


def test_attention_maps_and_hidden_states(tiny_config):
    model = build(tiny_config, "eager")
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 64, 64), output_attentions=True, output_hidden_states=True)
    assert len(outputs.attentions) == sum(tiny_config.depths)
    # stage 1: 16x16 queries attend to the 2x2 map left by the reduction ratio 8
    assert outputs.attentions[0].shape == (2, 1, 256, 4)
    assert outputs.attentions[-1].shape == (2, 8, 5, 5)
    torch.testing.assert_close(outputs.attentions[0].sum(-1), torch.ones(2, 1, 256))
    assert len(outputs.hidden_states) == sum(tiny_config.depths) + 1


def test_return_dict_false_gives_tuples(tiny_config):
    model = build(tiny_config)
    with torch.no_grad():
        as_tuple = model(torch.randn(1, 3, 64, 64), return_dict=False)
        base = model.pvt(torch.randn(1, 3, 64, 64), return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].shape == (1, 5)
    assert isinstance(base, tuple) and base[0].shape == (1, 5, 64) and base[1].shape == (1, 64)


def test_batch_equivalence_and_determinism(tiny_config):
    model = build(tiny_config)
    pixel_values = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        batched = model(pixel_values).logits
        single = torch.cat([model(image[None]).logits for image in pixel_values])
        again = model(pixel_values).logits
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)
    assert torch.equal(batched, again)


def test_forward_features_and_head(tiny_config):
    model = build(tiny_config)
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(pixel_values)
        torch.testing.assert_close(model.forward_head(features), model(pixel_values).logits)
        assert model.forward_head(features, pre_logits=True).shape == (2, 64)
    assert [info["reduction"] for info in model.feature_info] == [4, 8, 16, 32]


def test_wrong_channel_count_is_a_clear_error(tiny_config):
    with pytest.raises(ValueError, match="3 input channels"):
        build(tiny_config)(torch.randn(1, 1, 64, 64))


def test_gradient_checkpointing_gives_the_same_gradients(tiny_config):
    model = PvtForImageClassification(tiny_config).train()
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])

    def gradients():
        model.zero_grad()
        model(pixel_values, labels=labels).loss.backward()
        return {name: param.grad.clone() for name, param in model.named_parameters()}

    plain = gradients()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    checkpointed = gradients()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_stochastic_depth_follows_the_linear_rule(tiny_config):
    tiny_config.drop_path_rate = 0.3
    model = PvtModel(tiny_config)
    layers = [layer for stage in model.encoder.block for layer in stage]
    rates = [getattr(layer.drop_path, "drop_prob", 0.0) for layer in layers]
    assert rates == pytest.approx(torch.linspace(0, 0.3, 5).tolist())
    model.train()
    pixel_values = torch.randn(8, 3, 64, 64)
    assert not torch.equal(model(pixel_values).pooler_output, model(pixel_values).pooler_output)
    model.eval()
    assert torch.equal(model(pixel_values).pooler_output, model(pixel_values).pooler_output)


def test_original_initialisation():
    model = PvtForImageClassification(PvtConfig.from_preset("tiny", num_labels=10))
    dense = model.pvt.encoder.block[2][0].mlp.dense1
    assert dense.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert abs(dense.weight.mean().item()) < 1e-3
    assert torch.count_nonzero(dense.bias) == 0
    norm = model.pvt.encoder.block[0][0].layer_norm_1
    assert torch.all(norm.weight == 1) and torch.count_nonzero(norm.bias) == 0
    position = model.pvt.encoder.patch_embeddings[0].position_embeddings
    assert position.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize(
    "problem_type, labels",
    [
        ("single_label_classification", torch.tensor([0, 4])),
        ("multi_label_classification", torch.tensor([[1.0, 0, 0, 1, 0], [0, 1, 0, 0, 0]])),
        ("regression", torch.randn(2, 5)),
    ],
)
def test_losses(tiny_config, problem_type, labels):
    tiny_config.problem_type = problem_type
    model = PvtForImageClassification(tiny_config)
    outputs = model(torch.randn(2, 3, 64, 64), labels=labels)
    logits = outputs.logits
    expected = {
        "single_label_classification": lambda: torch.nn.functional.cross_entropy(logits, labels),
        "multi_label_classification": lambda: torch.nn.functional.binary_cross_entropy_with_logits(logits, labels),
        "regression": lambda: torch.nn.functional.mse_loss(logits, labels),
    }[problem_type]()
    torch.testing.assert_close(outputs.loss, expected)
    outputs.loss.backward()
    assert model.classifier.weight.grad is not None
