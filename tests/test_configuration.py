import json

import pytest
from transformers.models.pvt import PvtConfig as StockPvtConfig

from modeling_pvt import PVT_PRESETS, PvtConfig


@pytest.mark.parametrize(
    "size, depths",
    [("tiny", [2, 2, 2, 2]), ("small", [3, 4, 6, 3]), ("medium", [3, 4, 18, 3]), ("large", [3, 8, 27, 3])],
)
def test_presets_match_the_paper(size, depths):
    config = PvtConfig.from_preset(size)
    assert config.depths == depths
    assert config.hidden_sizes == [64, 128, 320, 512]
    assert config.num_attention_heads == [1, 2, 5, 8]
    assert config.mlp_ratios == [8, 8, 4, 4]
    assert config.sequence_reduction_ratios == [8, 4, 2, 1]
    assert config.patch_sizes == [4, 2, 2, 2]
    assert config.num_labels == 1000


def test_preset_overrides_and_unknown_name():
    assert PvtConfig.from_preset("small", num_labels=10, drop_path_rate=0.1).num_labels == 10
    with pytest.raises(ValueError, match="huge"):
        PvtConfig.from_preset("huge")
    assert sorted(PVT_PRESETS) == ["large", "medium", "small", "tiny"]


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"depths": [2, 2]}, "depths"),
        ({"hidden_sizes": [64, 128, 320, 500]}, r"hidden_sizes\[3\]"),
        ({"mlp_ratios": [8, 8, 0, 4]}, "mlp_ratios"),
        ({"sequence_reduction_ratios": [8, 4, 2, 2]}, "sequence_reduction_ratios"),
        ({"num_attention_heads": [1, 2, -5, 8]}, "num_attention_heads"),
        ({"image_size": 0}, "image_size"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
        ({"drop_path_rate": 1.5}, "drop_path_rate"),
        ({"out_features": ["stage9"]}, "out_features"),
    ],
)
def test_invalid_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        PvtConfig(**overrides)


def test_labels_are_named_and_saved_for_stock(tmp_path):
    config = PvtConfig(num_labels=3)
    assert config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "pvt" and saved["num_labels"] == 3
    assert StockPvtConfig.from_pretrained(tmp_path).num_labels == 3
    assert PvtConfig.from_pretrained(tmp_path).num_labels == 3


def test_stock_config_json_loads_with_original_epsilons(tmp_path):
    stock = StockPvtConfig(depths=[3, 4, 6, 3], num_labels=7)
    stock.save_pretrained(tmp_path)
    ours = PvtConfig.from_pretrained(tmp_path)
    assert ours.depths == [3, 4, 6, 3]
    assert ours.num_labels == 7
    assert ours.layer_norm_eps == 1e-6
    assert ours.conv_layer_norm_eps == 1e-5  # absent from stock files: the original code's value


def test_our_config_json_loads_in_stock(tmp_path):
    ours = PvtConfig.from_preset("medium", image_size=[256, 320], qkv_bias=False)
    ours.save_pretrained(tmp_path)
    stock = StockPvtConfig.from_pretrained(tmp_path)
    for field in ("depths", "hidden_sizes", "sequence_reduction_ratios", "num_attention_heads", "image_size"):
        assert list(getattr(stock, field)) == getattr(ours, field)
    assert stock.qkv_bias is False


def test_backbone_stage_selection():
    config = PvtConfig(out_indices=[1, 3])
    assert config.out_features == ["stage2", "stage4"]
    assert PvtConfig().out_features == ["stage1", "stage2", "stage3", "stage4"]
