"""The device data path on a CUDA GPU: nvJPEG's decoding against PIL's, the fallbacks, and the augmentation on the GPU
against the same batch on the CPU (the same parameters, so the same images up to decoding and float rounding).

Skipped where there is no GPU (CI); run on one with `python -m pytest tests/test_device_data_gpu.py`.
"""

import numpy as np
import pytest
import torch
from test_device_data import MEAN, RECIPE, STD, _dataset, _encode, _photo

from modeling_pvt.data.device import (
    DeviceDecoder,
    DeviceEvalTransform,
    DeviceTrainTransform,
    EncodedImageDataset,
    TrainAugmentationSampler,
    collate_encoded_batch,
)
from modeling_pvt.data.sources import UnreadableImageError, decode_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda"


def _files() -> list[bytes]:
    photos = [_photo(500, 375, seed=seed) for seed in range(4)] + [_photo(375, 500, seed=9)]
    return [
        *(_encode(photo, "JPEG", quality=90) for photo in photos),
        _encode(photos[0].convert("L"), "JPEG"),
        _encode(photos[1].convert("CMYK"), "JPEG"),
        _encode(photos[2], "JPEG", progressive=True),
        _encode(photos[3], "PNG"),
    ]


def test_nvjpeg_decodes_a_mixed_batch_as_pil_does():
    files = _files()
    dataset = EncodedImageDataset(_dataset(files), "image", "label", "train")
    batch = collate_encoded_batch([dataset[index] for index in range(len(files))])
    decoded = DeviceDecoder(DEVICE)(batch["encoded"], batch["descriptions"])
    for image, data in zip(decoded, files, strict=True):
        assert image.device.type == DEVICE and image.dtype == torch.uint8
        expected = np.asarray(decode_image({"bytes": data, "path": None}, "x"), np.int16).transpose(2, 0, 1)
        difference = np.abs(image.cpu().numpy().astype(np.int16) - expected)
        assert difference.mean() < 1.0 and difference.max() <= 16  # IDCT and upsampling differences only


def test_a_truncated_jpeg_raises_the_cpu_paths_error():
    whole = _encode(_photo(500, 375), "JPEG")
    sample = EncodedImageDataset(_dataset([whole[: len(whole) // 2]]), "image", "label", "train")[0]
    batch = collate_encoded_batch([sample])
    with pytest.raises(UnreadableImageError, match="row 0 of the train split"):
        DeviceDecoder(DEVICE)(batch["encoded"], batch["descriptions"])


def test_the_augmentation_on_the_gpu_gives_the_cpus_images():
    files = _files()
    sampler = TrainAugmentationSampler(224, RECIPE, random_erasing=0.5)
    dataset = EncodedImageDataset(_dataset(files), "image", "label", "train", sampler, augmentation_seed=1)
    batch = collate_encoded_batch([dataset[index] for index in range(len(files))])
    on_gpu = DeviceTrainTransform(sampler, MEAN, STD, DEVICE)(batch)
    on_cpu = DeviceTrainTransform(sampler, MEAN, STD, "cpu")(batch)
    assert on_gpu.shape == on_cpu.shape == (len(files), 3, 224, 224)
    # a grey level is 0.017 after normalisation; nvJPEG's pixels and float rounding move a few of them
    assert (on_gpu.cpu() - on_cpu).abs().mean() < 0.03


def test_evaluation_on_the_gpu_gives_the_cpus_images():
    files = _files()
    dataset = EncodedImageDataset(_dataset(files), "image", "label", "validation")
    batch = collate_encoded_batch([dataset[index] for index in range(len(files))])
    on_gpu = DeviceEvalTransform(256, 224, MEAN, STD, DEVICE)(batch)
    on_cpu = DeviceEvalTransform(256, 224, MEAN, STD, "cpu")(batch)
    assert (on_gpu.cpu() - on_cpu).abs().mean() < 0.03
