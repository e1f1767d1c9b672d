import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.pvt import PvtImageProcessor as StockPvtImageProcessor

from modeling_pvt import PvtImageProcessor


@pytest.fixture
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8))


def reference_eval_transform(image: Image.Image) -> torch.Tensor:
    """The original evaluation transform written out: bicubic shortest edge 256, centre crop 224, ImageNet stats."""
    width, height = image.size
    scale = 256 / min(width, height)
    resized = image.resize((round(width * scale), round(height * scale)), Image.BICUBIC)
    left, top = (resized.width - 224) // 2, (resized.height - 224) // 2
    cropped = np.asarray(resized.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255.0
    normalised = (cropped - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return torch.from_numpy(normalised.transpose(2, 0, 1)).float()


def test_default_is_the_original_evaluation_transform(photo):
    pixel_values = PvtImageProcessor()(photo, return_tensors="pt").pixel_values
    assert pixel_values.shape == (1, 3, 224, 224)
    torch.testing.assert_close(pixel_values[0], reference_eval_transform(photo), atol=1e-4, rtol=1e-4)


def test_inputs_of_every_kind_give_the_same_pixels(photo):
    processor = PvtImageProcessor()
    expected = processor(photo, return_tensors="pt").pixel_values
    array = np.asarray(photo)
    tensor = torch.from_numpy(array.transpose(2, 0, 1).copy())
    for image in (array, array.transpose(2, 0, 1), tensor):
        torch.testing.assert_close(processor(image, return_tensors="pt").pixel_values, expected)
    batch = processor([photo, array, tensor], return_tensors="pt").pixel_values
    assert batch.shape == (3, 3, 224, 224)
    assert processor(torch.stack([tensor, tensor]), return_tensors="pt").pixel_values.shape == (2, 3, 224, 224)


def test_greyscale_and_rgba_become_rgb(photo):
    processor = PvtImageProcessor()
    grey = photo.convert("L")
    grey_pixels = processor(grey, return_tensors="pt").pixel_values
    assert grey_pixels.shape == (1, 3, 224, 224)
    unnormalised = grey_pixels[0] * torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    unnormalised += torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    torch.testing.assert_close(unnormalised[0], unnormalised[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(processor(np.asarray(grey), return_tensors="pt").pixel_values, grey_pixels)
    rgba = photo.convert("RGBA")
    expected = processor(photo, return_tensors="pt").pixel_values
    torch.testing.assert_close(processor(rgba, return_tensors="pt").pixel_values, expected)
    torch.testing.assert_close(processor(np.asarray(rgba), return_tensors="pt").pixel_values, expected)


def test_configurable_crop_ratio_and_plain_resize(photo):
    assert PvtImageProcessor(crop_pct=0.875)(photo, return_tensors="pt").pixel_values.shape == (1, 3, 224, 224)
    torch.testing.assert_close(
        PvtImageProcessor(crop_pct=0.875)(photo, return_tensors="pt").pixel_values,
        PvtImageProcessor()(photo, return_tensors="pt").pixel_values,
    )
    cropped = PvtImageProcessor(crop_size={"height": 160, "width": 192}, size={"shortest_edge": 200})
    assert cropped(photo, return_tensors="pt").pixel_values.shape == (1, 3, 160, 192)
    plain = PvtImageProcessor(size={"height": 96, "width": 128})
    assert plain.do_center_crop is False
    assert plain(photo, return_tensors="pt").pixel_values.shape == (1, 3, 96, 128)
    with pytest.raises(ValueError, match="crop_pct"):
        PvtImageProcessor(crop_pct=1.5)(photo)


@pytest.mark.parametrize(
    "bad, error, message",
    [
        ([], ValueError, "No images"),
        (np.zeros((0, 10, 3), dtype=np.uint8), ValueError, "empty"),
        (np.zeros((5,)), ValueError, "shape"),
        (np.zeros((1, 2, 3, 4, 5)), ValueError, "shape"),
        (Image.new("RGB", (0, 5)), ValueError, "empty"),
        (3.5, TypeError, "float"),
    ],
)
def test_bad_input_is_a_clear_error(bad, error, message):
    with pytest.raises(error, match=message):
        PvtImageProcessor()(bad)


def test_save_and_load(tmp_path, photo):
    processor = PvtImageProcessor(crop_size={"height": 192, "width": 192}, crop_pct=0.9)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "PvtImageProcessor" and saved["crop_pct"] == 0.9
    assert saved["size"] == {"shortest_edge": 213}  # 192 / 0.9, for readers that ignore crop_pct
    assert "auto_map" not in saved
    loaded = PvtImageProcessor.from_pretrained(tmp_path)
    torch.testing.assert_close(
        loaded(photo, return_tensors="pt").pixel_values, processor(photo, return_tensors="pt").pixel_values
    )


def test_reads_stock_processor_configs(tmp_path, photo):
    StockPvtImageProcessor().save_pretrained(tmp_path)  # plain 224x224 bicubic resize, no crop
    ours = PvtImageProcessor.from_pretrained(tmp_path)
    assert ours.do_center_crop is False
    pixel_values = ours(photo, return_tensors="pt").pixel_values
    assert pixel_values.shape == (1, 3, 224, 224)
    resized = np.asarray(photo.resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255.0
    expected = (resized - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    expected = torch.from_numpy(expected.transpose(2, 0, 1)).float()
    torch.testing.assert_close(pixel_values[0], expected, atol=1e-4, rtol=0)


def test_do_convert_rgb_false_keeps_four_channels():
    """A model with `num_channels=4` gets its four channels, normalised per channel, as from stock's processor."""
    images = [np.random.default_rng(seed).integers(0, 256, size=(32, 32, 4), dtype=np.uint8) for seed in (0, 1)]
    settings = dict(do_convert_rgb=False, image_mean=[0.5, 0.4, 0.3, 0.2], image_std=[0.2, 0.3, 0.4, 0.5])
    settings.update(size={"height": 32, "width": 32}, do_resize=False)  # the pixels themselves, not two resizers
    ours = PvtImageProcessor(**settings)(images, return_tensors="pt").pixel_values
    stock = StockPvtImageProcessor(**settings)(images, return_tensors="pt")
    assert ours.shape == (2, 4, 32, 32)
    torch.testing.assert_close(ours, stock.pixel_values, atol=1e-4, rtol=1e-4)
    rgba = Image.fromarray(images[0], mode="RGBA")
    assert PvtImageProcessor()(rgba, return_tensors="pt").pixel_values.shape[1] == 3  # converted by default
