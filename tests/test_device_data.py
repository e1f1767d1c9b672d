"""The device data path (`modeling_pvt.data.device`) on the CPU: its decoding against PIL's, its random parameters
against timm's CPU recipe (the very same draws, and their distribution), its ops against PIL's, and per-sample
determinism across batches, workers and processes. Its speed needs a GPU and is measured in the benchmark."""

import io
import json
import math
import shutil
from collections import Counter

import datasets
import numpy as np
import pytest
import torch
import torchvision.transforms.functional
from PIL import Image
from timm.data import auto_augment, create_transform
from timm.data.auto_augment import NAME_TO_OP
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation

from modeling_pvt import PvtImageProcessor
from modeling_pvt.data.device import (
    DEVICE_OPS,
    DeviceDecoder,
    DeviceEvalTransform,
    DeviceTrainTransform,
    EncodedImageDataset,
    TrainAugmentationSampler,
    _affine_theta,
    _pixel_op,
    collate_encoded_batch,
    crop_and_resize,
    hashed_normal,
)
from modeling_pvt.data.sampling import seeded_random_state
from modeling_pvt.data.sources import UnreadableImageError, decode_image

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RECIPE = "rand-m9-mstd0.5-inc1"


def _photo(width: int = 80, height: int = 60, seed: int = 0) -> Image.Image:
    """A smooth, textured RGB image: random colours upsampled, so resampling differences stay small."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height // 10, width // 10, 3), dtype=np.uint8)
    return Image.fromarray(pixels).resize((width, height), Image.BICUBIC)


def _encode(image: Image.Image, file_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, file_format, **options)
    return buffer.getvalue()


def _dataset(encoded: list[bytes]) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")})
    rows = {"image": [{"bytes": data, "path": None} for data in encoded], "label": list(range(len(encoded)))}
    return datasets.Dataset.from_dict(rows, features=features)


FILES = {
    "jpeg": lambda: _encode(_photo(), "JPEG", quality=90),
    "progressive jpeg": lambda: _encode(_photo(), "JPEG", progressive=True),
    "greyscale jpeg": lambda: _encode(_photo().convert("L"), "JPEG"),
    "cmyk jpeg": lambda: _encode(_photo().convert("CMYK"), "JPEG"),
    "png": lambda: _encode(_photo(), "PNG"),
    "greyscale png": lambda: _encode(_photo().convert("L"), "PNG"),
    "rgba png": lambda: _encode(_photo().convert("RGBA"), "PNG"),
    "bmp": lambda: _encode(_photo(), "BMP"),
}


@pytest.mark.parametrize("kind", sorted(FILES))
def test_decoded_pixels_are_pils(kind):
    data = FILES[kind]()
    dataset = EncodedImageDataset(_dataset([data]), "image", "label", "validation")
    batch = collate_encoded_batch([dataset[0]])
    (decoded,) = DeviceDecoder("cpu")(batch["encoded"], batch["descriptions"])
    expected = np.asarray(decode_image({"bytes": data, "path": None}, "x")).transpose(2, 0, 1)
    np.testing.assert_array_equal(decoded.numpy(), expected)


def test_unreadable_files_raise_the_cpu_paths_error_naming_the_file(tmp_path):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")})
    rows = {"image": [{"bytes": None, "path": str(garbage)}], "label": [0]}
    with pytest.raises(UnreadableImageError, match="garbage.jpg"):
        EncodedImageDataset(datasets.Dataset.from_dict(rows, features=features), "image", "label", "train")[0]
    # A truncated JPEG has a good header: the worker passes it on, and decoding it fails on the device's side.
    whole = FILES["jpeg"]()
    sample = EncodedImageDataset(_dataset([whole[: len(whole) // 2]]), "image", "label", "train")[0]
    batch = collate_encoded_batch([sample])
    with pytest.raises(UnreadableImageError, match="row 0 of the train split"):
        DeviceDecoder("cpu")(batch["encoded"], batch["descriptions"])


# ------------------------------------------------------------------------------------- parameters vs timm's recipe
class _CpuRecipeRecorder:
    """timm's CPU training transform (as `modeling_pvt.data.build_train_transform` builds it) with its random
    choices recorded: the crop box, the flip and the RandAugment ops (or, without RandAugment, ColorJitter's) with
    their arguments (not applied)."""

    def __init__(self, monkeypatch, image_size: int, rand_augment: str | None = RECIPE):
        self.records: list[dict] = []
        self.recording = False  # the patched get_params also serves the device path's sampler: not recorded
        get_params = RandomResizedCropAndInterpolation.get_params

        def recorded_get_params(image, scale, ratio):
            box = get_params(image, scale, ratio)
            if self.recording:
                self.records[-1]["crop"] = box
            return box

        def recorded_hflip(image):
            self.records[-1]["flip"] = True
            return image

        monkeypatch.setattr(RandomResizedCropAndInterpolation, "get_params", staticmethod(recorded_get_params))
        monkeypatch.setattr(torchvision.transforms.functional, "hflip", recorded_hflip)
        for function, name in (("adjust_brightness", "Brightness"), ("adjust_contrast", "Contrast")):
            monkeypatch.setattr(torchvision.transforms.functional, function, self._recorder(name))
        monkeypatch.setattr(torchvision.transforms.functional, "adjust_saturation", self._recorder("Color"))
        self.transform = create_transform(
            input_size=image_size,
            is_training=True,
            auto_augment=rand_augment,
            color_jitter=0.4,
            interpolation="bicubic",
            use_prefetcher=True,
        )
        for transform in self.transform.transforms:
            for op in getattr(transform, "ops", []):  # RandAugment's
                op.aug_fn = self._recorder(op.name)

    def _recorder(self, name: str):
        def record(image, *arguments, **_):
            self.records[-1]["ops"].append((name, arguments[0] if arguments else 0.0))
            return image

        return record

    def __call__(self, image: Image.Image, seed: int) -> dict:
        self.records.append({"flip": False, "ops": []})
        self.recording = True
        with seeded_random_state(seed):
            self.transform(image)
        self.recording = False
        return self.records[-1]


def _sampler_record(sampler: TrainAugmentationSampler, image: Image.Image, seed: int) -> dict:
    with seeded_random_state(seed):
        drawn = sampler(image)
    ops = [
        (DEVICE_OPS[op], argument) for op, argument in zip(drawn["ops"], drawn["op_arguments"], strict=True) if op >= 0
    ]
    return {"crop": tuple(drawn["crop_boxes"].tolist()), "flip": bool(drawn["flips"]), "ops": ops}


@pytest.mark.parametrize("rand_augment", [RECIPE, None])
def test_a_sample_draws_the_crop_flip_and_ops_the_cpu_recipe_draws_for_it(monkeypatch, rand_augment):
    image, size = _photo(500, 375), 224
    cpu = _CpuRecipeRecorder(monkeypatch, size, rand_augment)
    sampler = TrainAugmentationSampler(size, rand_augment)
    names = {
        "PosterizeIncreasing": "Posterize",
        "SolarizeIncreasing": "Solarize",
        "ColorIncreasing": "Color",
        "ContrastIncreasing": "Contrast",
        "BrightnessIncreasing": "Brightness",
        "SharpnessIncreasing": "Sharpness",
        "TranslateXRel": "TranslateX",
        "TranslateYRel": "TranslateY",
    }
    for seed in range(40):
        expected = cpu(image, seed)
        expected_ops = [
            (names.get(name, name), argument * size if name.endswith("Rel") else argument)
            for name, argument in expected["ops"]
        ]
        drawn = _sampler_record(sampler, image, seed)
        assert drawn["crop"] == expected["crop"] and drawn["flip"] == expected["flip"]
        assert expected_ops or rand_augment  # ColorJitter changes every image
        assert [name for name, _ in drawn["ops"]] == [name for name, _ in expected_ops]
        np.testing.assert_allclose([a for _, a in drawn["ops"]], [a for _, a in expected_ops], rtol=1e-12)


def test_crop_and_op_statistics_match_the_cpu_recipe_over_independent_draws(monkeypatch):
    """Distributions, not identical draws: the device path's samples (seeds 0..N) against the CPU recipe's (other
    seeds), compared within a few standard errors."""
    image, size, count = _photo(200, 150), 32, 1500
    cpu = _CpuRecipeRecorder(monkeypatch, size)
    sampler = TrainAugmentationSampler(size, RECIPE)
    ours = [_sampler_record(sampler, image, seed) for seed in range(count)]
    theirs = [cpu(image, 10**6 + seed) for seed in range(count)]

    def crop_statistics(records):
        boxes = np.array([record["crop"] for record in records], dtype=np.float64)
        area = boxes[:, 2] * boxes[:, 3] / (image.width * image.height)
        return area, np.log(boxes[:, 3] / boxes[:, 2])

    for ours_values, theirs_values in zip(crop_statistics(ours), crop_statistics(theirs), strict=True):
        standard_error = math.sqrt(ours_values.var() / count + theirs_values.var() / count)
        assert abs(ours_values.mean() - theirs_values.mean()) < 4 * standard_error
        assert abs(np.median(ours_values) - np.median(theirs_values)) < 6 * standard_error
    assert abs(np.mean([r["flip"] for r in ours]) - np.mean([r["flip"] for r in theirs])) < 4 * math.sqrt(0.5 / count)

    our_ops = Counter(name for record in ours for name, _ in record["ops"])
    their_ops = Counter(
        name.replace("Increasing", "").replace("Rel", "") for record in theirs for name, _ in record["ops"]
    )
    assert set(our_ops) == set(their_ops) == set(DEVICE_OPS)
    total = sum(their_ops.values())
    for name in DEVICE_OPS:  # each op: 2 layers x 1/15 x p 0.5 per sample
        assert abs(our_ops[name] - their_ops[name]) < 4 * math.sqrt(2 * total / len(DEVICE_OPS))
    rotations = [abs(argument) for record in ours for name, argument in record["ops"] if name == "Rotate"]
    their_rotations = [abs(argument) for record in theirs for name, argument in record["ops"] if name == "Rotate"]
    assert abs(np.mean(rotations) - np.mean(their_rotations)) < 0.5  # 9 +- 0.5 of 10 -> 27 +- 1.5 degrees


def test_erasing_boxes_follow_timms_random_erasing():
    size, count = 32, 2000
    sampler = TrainAugmentationSampler(size, None, random_erasing=0.25)
    image = _photo(size, size)
    ours = []
    for seed in range(count):
        with seeded_random_state(seed):
            ours.append(sampler(image)["erase_boxes"])
    ours = np.array(ours)
    erasing = RandomErasing(0.25, mode="const", max_count=1, device="cpu")
    theirs = []
    for seed in range(count):
        with seeded_random_state(10**6 + seed):
            erased = erasing(torch.ones(3, size, size))[0] == 0
        theirs.append(erased.sum().item())
    ours_areas = ours[:, 2] * ours[:, 3]
    assert abs((ours_areas > 0).mean() - np.mean(np.array(theirs) > 0)) < 4 * math.sqrt(0.25 * 0.75 / count)
    ours_erased, theirs_erased = ours_areas[ours_areas > 0], np.array([a for a in theirs if a > 0])
    standard_error = math.sqrt(ours_erased.var() / len(ours_erased) + theirs_erased.var() / len(theirs_erased))
    assert abs(ours_erased.mean() - theirs_erased.mean()) < 4 * standard_error


# ------------------------------------------------------------------------------------------------- ops vs PIL
@pytest.mark.parametrize(
    ("name", "argument", "tolerance"),
    [
        ("AutoContrast", 0.0, 0.05),
        ("Equalize", 0.0, 0.0),
        ("Invert", 0.0, 0.0),
        ("Posterize", 2, 0.0),
        ("Solarize", 100, 0.0),
        ("SolarizeAdd", 60, 0.0),
        ("Color", 1.6, 0.0),
        ("Contrast", 0.4, 0.0),
        ("Brightness", 1.3, 0.0),
        ("Sharpness", 1.8, 0.0),
        ("Sharpness", 0.3, 0.0),
    ],
)
def test_colour_ops_match_pils(name, argument, tolerance):
    image = _photo(48, 40, seed=3)
    expected = np.asarray(NAME_TO_OP[name](image, argument) if argument else NAME_TO_OP[name](image), np.float64)
    tensor = torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy()).float()[None]
    ours = _pixel_op(name, tensor, torch.tensor([float(argument)]))[0].numpy().transpose(1, 2, 0)
    assert np.abs(ours - expected).mean() <= tolerance


PIL_GEOMETRIC_OPS = {
    "Rotate": auto_augment.rotate,
    "ShearX": auto_augment.shear_x,
    "ShearY": auto_augment.shear_y,
    "TranslateX": auto_augment.translate_x_abs,
    "TranslateY": auto_augment.translate_y_abs,
}


@pytest.mark.parametrize(
    ("name", "argument"),
    [
        ("Rotate", 25.0),
        ("Rotate", -12.0),
        ("ShearX", 0.25),
        ("ShearY", -0.2),
        ("TranslateX", 9.0),
        ("TranslateY", -7.0),
    ],
)
def test_geometric_ops_match_pils(name, argument):
    """Same mapping of pixels as PIL's affine transforms: the mean difference stays at resampling level (different
    bicubic kernels), far below what a wrong direction or centre would give."""
    size, fill = 48, (124, 116, 104)
    image = _photo(size, size, seed=4)
    op = PIL_GEOMETRIC_OPS[name]
    expected = np.asarray(op(image, argument, fillcolor=fill, resample=Image.BICUBIC), np.float64)
    tensor = torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy()).float()[None]
    theta = torch.from_numpy(_affine_theta([(name, argument)], size))
    grid = torch.nn.functional.affine_grid(theta, [1, 3, size, size], align_corners=False)
    fill_tensor = torch.tensor(fill, dtype=torch.float32).view(1, 3, 1, 1)
    moved = torch.nn.functional.grid_sample(tensor - fill_tensor, grid, mode="bicubic", align_corners=False)
    ours = (moved + fill_tensor).round().clamp(0, 255)[0].numpy().transpose(1, 2, 0)
    assert np.abs(ours - expected).mean() < 2.0
    shifted_wrong_way = np.asarray(op(image, -argument, fillcolor=fill, resample=Image.BICUBIC), np.float64)
    assert np.abs(ours - shifted_wrong_way).mean() > 10 * max(np.abs(ours - expected).mean(), 1.0)


def test_crop_and_resize_matches_pils_resized_crop():
    image = _photo(160, 120, seed=5)
    tensor = torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy())
    boxes = np.array([[10, 20, 90, 120], [0, 0, 120, 160], [50, 60, 20, 30]])
    resized = crop_and_resize([tensor, tensor, tensor], boxes, 48)
    for index, (top, left, height, width) in enumerate(boxes):
        expected = image.crop((left, top, left + width, top + height)).resize((48, 48), Image.BICUBIC)
        difference = np.abs(resized[index].numpy().transpose(1, 2, 0) - np.asarray(expected, np.float64))
        assert difference.mean() < 2.0


def test_evaluation_matches_the_image_processor():
    processor = PvtImageProcessor(size={"shortest_edge": 73}, crop_size={"height": 64, "width": 64})
    images = [_photo(160, 120, seed=6), _photo(90, 130, seed=7)]
    dataset = EncodedImageDataset(_dataset([_encode(image, "PNG") for image in images]), "image", "label", "val")
    batch = collate_encoded_batch([dataset[0], dataset[1]])
    ours = DeviceEvalTransform.from_image_processor(processor, "cpu")(batch)
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    assert ours.shape == expected.shape
    assert (ours - expected).abs().mean() < 0.02  # a grey level is 0.017 after normalisation


# ----------------------------------------------------------------------------------------- per-sample seeding
def _train_setup(image_size: int = 32, count: int = 6, seed: int = 3):
    encoded = [_encode(_photo(60 + 10 * (index % 2), 50, seed=index), "JPEG") for index in range(count)]
    sampler = TrainAugmentationSampler(image_size, RECIPE, random_erasing=0.5)
    dataset = EncodedImageDataset(_dataset(encoded), "image", "label", "train", sampler, augmentation_seed=seed)
    return dataset, DeviceTrainTransform(sampler, MEAN, STD, "cpu")


def test_a_sample_is_a_function_of_seed_epoch_and_index_whatever_its_batch():
    dataset, transform = _train_setup()
    first = transform(collate_encoded_batch([dataset[index] for index in (0, 1, 2, 3)]))
    second = transform(collate_encoded_batch([dataset[index] for index in (5, 2, 4)]))
    torch.testing.assert_close(first[2], second[1], rtol=0, atol=0)
    assert torch.isfinite(first).all() and first.shape == (4, 3, 32, 32)
    dataset.set_epoch(1)
    next_epoch = transform(collate_encoded_batch([dataset[2]]))
    assert not torch.equal(next_epoch[0], first[2])


def test_workers_and_process_shards_give_the_samples_of_one_process():
    """Loaded by two worker processes, or split over two ranks as accelerate deals batches, each sample's parameters
    are those of a single-process run: what exact resume and sharding rely on."""
    dataset, _ = _train_setup(count=8)
    dataset.set_epoch(2)
    alone = collate_encoded_batch([dataset[index] for index in range(8)])
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_encoded_batch)
    loaded = list(loader)
    shards = [collate_encoded_batch([dataset[index] for index in range(rank, 8, 2)]) for rank in range(2)]
    for name in ("crop_boxes", "flips", "ops", "op_arguments", "erase_boxes", "noise_seeds"):
        np.testing.assert_array_equal(np.concatenate([batch[name] for batch in loaded]), alone[name])
        np.testing.assert_array_equal(shards[1][name], alone[name][1::2])


def test_hashed_noise_is_standard_normal_and_per_sample():
    seeds = torch.tensor([7, 123456789, 7])
    noise = hashed_normal(seeds, (3, 64, 64))
    torch.testing.assert_close(noise[0], noise[2], rtol=0, atol=0)
    assert abs(noise.mean().item()) < 0.03 and abs(noise.std().item() - 1) < 0.03
    assert abs(torch.corrcoef(torch.stack([noise[0].flatten(), noise[1].flatten()]))[0, 1].item()) < 0.05


def test_a_batch_is_cropped_flipped_normalised_and_erased_as_its_parameters_say():
    image = _photo(40, 30, seed=8)
    sampler = TrainAugmentationSampler(16, None, color_jitter=0.0)
    transform = DeviceTrainTransform(sampler, MEAN, STD, "cpu")
    pixels = np.asarray(image).transpose(2, 0, 1).copy()
    batch = {
        "labels": torch.tensor([0, 1]),
        "encoded": [pixels, pixels],
        "descriptions": ["a", "b"],
        "crop_boxes": np.array([[0, 0, 30, 40], [5, 10, 20, 20]]),
        "flips": np.array([True, False]),
        "ops": np.zeros((2, 0), np.int64),
        "op_arguments": np.zeros((2, 0)),
        "erase_boxes": np.array([[0, 0, 0, 0], [2, 3, 4, 5]]),
        "noise_seeds": np.array([11, 12]),
    }
    output = transform(batch)
    tensor = torch.from_numpy(pixels)
    expected = crop_and_resize([tensor, tensor], batch["crop_boxes"], 16)
    expected[0] = expected[0].flip(-1)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    expected = (expected / 255 - mean) / std
    expected[1, :, 2:6, 3:8] = hashed_normal(torch.tensor([12]), (3, 16, 16))[0, :, 2:6, 3:8]
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


def test_augmentations_the_device_path_lacks_are_refused_up_front():
    with pytest.raises(ValueError, match="GaussianBlur"):
        TrainAugmentationSampler(32, "rand-m9-t3a")
    with pytest.raises(ValueError, match="RandAugment specs"):
        TrainAugmentationSampler(32, "augmix-m5-w4-d2")


def test_train_script_with_the_device_data_path_trains_evaluates_and_resumes_exactly(tmp_path):
    """`scripts/train.py --data_pipeline device` on the digits (CPU as the device): a run resumed from its checkpoint
    ends with the weights of the uninterrupted run, and evaluation scores every held-out image."""
    from script_launch import load_script

    train = load_script("train")
    toy = '{"hidden_sizes": [8, 16, 24, 32], "num_attention_heads": [1, 1, 1, 2], "depths": [1, 1, 1, 1]}'
    arguments = ["--data_pipeline", "device", "--config_overrides", toy, "--max_train_samples", "32"]
    arguments += ["--max_eval_samples", "21", "--per_device_train_batch_size", "8", "--num_train_epochs", "2"]
    arguments += ["--rand_augment", "rand-m9-mstd0.5-inc1", "--random_erasing", "0.25", "--checkpointing_steps", "3"]
    results = {}
    for name, extra in (("uninterrupted", []), ("resumed", ["--resume_from_checkpoint", "latest"])):
        output_dir = tmp_path / name
        if name == "resumed":
            checkpoint = tmp_path / "uninterrupted" / "checkpoints" / "step_6"
            shutil.copytree(checkpoint, output_dir / "checkpoints" / "step_6")
        train.main([*arguments, *extra, "--output_dir", str(output_dir)])
        results[name] = json.loads((output_dir / "all_results.json").read_text())
    assert results["uninterrupted"]["eval_samples"] == 21
    assert results["resumed"]["weights_sha256_per_rank"] == results["uninterrupted"]["weights_sha256_per_rank"]
