"""Image-classification data decoded and augmented on the training device (the "device data path").

The CPU data path (`modeling_pvt.data`) decodes and augments every image in data-loader workers; on a GPU those
workers, not the model, then bound the training speed. Here the workers only read the encoded bytes and draw each
sample's random augmentation parameters, and the batch is decoded and augmented on the device:

- `EncodedImageDataset` (workers): a sample's encoded bytes, its label and, for training, its augmentation
  parameters, drawn by `TrainAugmentationSampler` with timm's own parameter code (RandomResizedCrop's `get_params`,
  the RandAugment object `rand_augment_transform` builds) under the per-sample seed of `EpochSeededDataset`, in the
  order the CPU path draws them: a sample gets the crop, flip and RandAugment ops the CPU path gives it, for any
  number of workers or processes and after a resume. Files nvJPEG cannot take (PNG, CMYK or progressive JPEGs, other
  formats; told from the header) are decoded here, on the CPU, file by file (torchvision, then PIL).
- `DeviceDecoder`: the JPEGs of a batch decoded in one `torchvision.io.decode_jpeg(..., device=...)` call on a GPU,
  file by file on a CPU; a file the device refuses is decoded on the CPU, and a file nothing can decode raises
  `UnreadableImageError` naming it, as the CPU path does.
- `DeviceTrainTransform`: per-sample crop and resize (one `roi_align` per image size in the batch), flip,
  RandAugment (each op applied at once to all the samples that drew it), normalisation and per-pixel random erasing,
  as tensors over the batch. Mixup/CutMix stays timm's `Mixup`, which works on device tensors.
- `DeviceEvalTransform`: decode, shortest-edge resize (bicubic, antialiased), centre crop and normalisation, as the
  image processor does on the host.

Differences from the CPU path, by construction: the crop is resampled by `roi_align` (bilinear, averaging
ceil(crop/output) samples per pixel in each direction) where PIL resizes bicubic with antialiasing; RandAugment's
geometric ops use `grid_sample`'s bicubic kernel (a=-0.75; PIL's is a=-0.5); nvJPEG's pixels may differ from
libjpeg's by a grey level or two; random erasing's box is drawn per sample from the sample's seed (the CPU path draws
it from the training process's generator), and its noise is a hash of that seed and the pixel's position.
"""

import io
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import datasets
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.io import ImageReadMode
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as tvf

from .sampling import EpochSeededDataset
from .sources import UnreadableImageError, decode_image, describe_image

JPEG_MODES_FOR_THE_DEVICE = frozenset({"RGB", "L"})
"""Colour modes of baseline JPEGs that `DeviceDecoder` hands to nvJPEG; others are decoded on the host."""

GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
PIXEL_OPS = ("AutoContrast", "Equalize", "Invert", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
             "Brightness", "Sharpness")  # fmt: skip
DEVICE_OPS = GEOMETRIC_OPS + PIXEL_OPS
"""RandAugment ops `DeviceTrainTransform` implements; timm's variants of one op (`PosterizeIncreasing`,
`TranslateXRel`, ...) differ only in how a magnitude becomes the op's argument, which timm computes."""

_TIMM_OP_TO_DEVICE_OP = {
    **{name: name for name in DEVICE_OPS},
    "PosterizeIncreasing": "Posterize",
    "PosterizeOriginal": "Posterize",
    "SolarizeIncreasing": "Solarize",
    "ColorIncreasing": "Color",
    "ContrastIncreasing": "Contrast",
    "BrightnessIncreasing": "Brightness",
    "SharpnessIncreasing": "Sharpness",
    "TranslateXRel": "TranslateX",
    "TranslateYRel": "TranslateY",
}
NO_OP = -1
_COLOR_JITTER_OPS = ("Brightness", "Contrast", "Color")
"""torchvision's ColorJitter factors in its order (brightness, contrast, saturation), as PIL ops: on PIL images it
applies them with ImageEnhance, saturation being ImageEnhance.Color."""


# ------------------------------------------------------------------------------------------------ host: workers
def _record_op(name: str, applied: list, *level_args, **_) -> list:
    """Stands in for a timm RandAugment op's image function: notes the op and its argument instead of applying it."""
    return [*applied, (name, level_args[0] if level_args else 0.0)]


class TrainAugmentationSampler:
    """Draws one training sample's augmentation parameters, as the CPU recipe (`modeling_pvt.data.
    build_train_transform`, timm's `create_transform`) draws them, with the same calls in the same order: timm's
    RandomResizedCrop parameters, the flip (`torch.rand(1) < horizontal_flip`), timm's RandAugment op choice,
    application and magnitude (or, with RandAugment off, torchvision's ColorJitter factors and order, as timm then
    applies them); then random erasing's box (timm's distribution, one box, 'pixel' mode) and a seed for its noise.
    Call it inside the sample's seeded random state (`EpochSeededDataset.augmentation`)."""

    def __init__(
        self,
        image_size: int,
        rand_augment: str | None = "rand-m9-mstd0.5-inc1",
        crop_scale: tuple[float, float] = (0.08, 1.0),
        horizontal_flip: float = 0.5,
        random_erasing: float = 0.25,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        color_jitter: float = 0.4,
    ):
        from timm.data.auto_augment import rand_augment_transform
        from timm.data.transforms import RandomResizedCropAndInterpolation
        from torchvision.transforms import ColorJitter

        self.image_size = image_size
        self.crop = RandomResizedCropAndInterpolation(image_size, scale=crop_scale, interpolation="bicubic")
        self.horizontal_flip = horizontal_flip
        self.random_erasing = random_erasing
        # What timm's create_transform passes to RandAugment: fill with the mean colour, bicubic resampling.
        self.fill = tuple(min(255, round(255 * value)) for value in mean)
        self.rand_augment, self.color_jitter, self.num_ops = None, None, 0
        if not rand_augment and color_jitter > 0:
            self.color_jitter = ColorJitter(color_jitter, color_jitter, color_jitter)
            self.num_ops = len(_COLOR_JITTER_OPS)
        if rand_augment:
            if not rand_augment.startswith("rand"):
                raise ValueError(f"The device data path takes RandAugment specs ('rand-...'), not {rand_augment!r}.")
            hparams = {
                "translate_const": int(image_size * 0.45),
                "img_mean": self.fill,
                "interpolation": Image.Resampling.BICUBIC,
            }
            self.rand_augment = rand_augment_transform(rand_augment, hparams)
            unsupported = sorted({op.name for op in self.rand_augment.ops} - set(_TIMM_OP_TO_DEVICE_OP))
            if unsupported:
                raise ValueError(
                    f"RandAugment {rand_augment!r} uses ops the device data path lacks: {unsupported} (it has "
                    f"{sorted(_TIMM_OP_TO_DEVICE_OP)}); use the CPU data path."
                )
            for op in self.rand_augment.ops:
                op.aug_fn = partial(_record_op, op.name)
            self.num_ops = self.rand_augment.num_layers

    def __call__(self, image: Image.Image) -> dict[str, np.ndarray]:
        """Parameters for `image` (opened, not decoded: only its size is read)."""
        top, left, height, width = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        flip = self.horizontal_flip > 0 and bool(torch.rand(1) < self.horizontal_flip)
        ops, op_arguments = np.full(self.num_ops, NO_OP, np.int64), np.zeros(self.num_ops, np.float64)
        for slot, (name, argument) in enumerate(self._colour_and_shape_ops()):
            ops[slot], op_arguments[slot] = DEVICE_OPS.index(name), argument
        return {
            "crop_boxes": np.array([top, left, height, width], np.int64),
            "flips": np.array(flip),
            "ops": ops,
            "op_arguments": op_arguments,
            "erase_boxes": self._erase_box(),
            "noise_seeds": np.array(np.random.randint(2**31), np.int64),
        }

    def _colour_and_shape_ops(self) -> list[tuple[str, float]]:
        """The ops to apply in order, as (`DEVICE_OPS` name, argument)."""
        if self.color_jitter is not None:
            jitter = self.color_jitter
            order, *factors = jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
            return [
                (_COLOR_JITTER_OPS[index], factors[index])
                for index in order.tolist()
                if index < len(_COLOR_JITTER_OPS) and factors[index] is not None
            ]
        if self.rand_augment is None:
            return []
        ops = []
        for name, argument in self.rand_augment([]):
            # the Rel translations are a fraction of the image's width or height
            ops.append((_TIMM_OP_TO_DEVICE_OP[name], argument * self.image_size if name.endswith("Rel") else argument))
        return ops

    def _erase_box(self) -> np.ndarray:
        """timm's RandomErasing box for one image of `image_size` (area 2%-33%, log-uniform aspect 0.3-3.3, ten
        tries), as (top, left, height, width); height 0 when it erases nothing."""
        size = self.image_size
        if self.random_erasing <= 0 or random.random() > self.random_erasing:
            return np.zeros(4, np.int64)
        for _ in range(10):
            area = random.uniform(0.02, 1 / 3) * size * size
            aspect = math.exp(random.uniform(math.log(0.3), math.log(1 / 0.3)))
            height, width = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if width < size and height < size:
                return np.array([random.randint(0, size - height), random.randint(0, size - width), height, width])
        return np.zeros(4, np.int64)


def _read_encoded(value: dict | None, description: str) -> bytes:
    try:
        if value is None or (value.get("bytes") is None and not value.get("path")):
            raise ValueError("no image data")
        if value.get("bytes") is not None:
            return value["bytes"]
        with open(value["path"], "rb") as handle:
            return handle.read()
    except Exception as error:
        raise UnreadableImageError(f"Cannot decode image {description}: {type(error).__name__}: {error}") from error


def _open_header(data: bytes, description: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except Exception as error:  # PIL raises several types for unknown or broken headers
        raise UnreadableImageError(f"Cannot decode image {description}: {type(error).__name__}: {error}") from error


def decode_on_host(data: bytes, description: str) -> np.ndarray:
    """(3, H, W) uint8 RGB pixels: torchvision's decoders (the pixels PIL gives for JPEG, PNG, WebP, GIF), else PIL's
    (`modeling_pvt.data.decode_image`, which raises `UnreadableImageError` naming the file)."""
    try:
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return torchvision.io.decode_image(encoded, mode=ImageReadMode.RGB).numpy()
    except RuntimeError:
        image = decode_image({"bytes": data, "path": None}, description)
        return np.asarray(image).transpose(2, 0, 1).copy()


def device_decodable(header: Image.Image) -> bool:
    """A baseline JPEG in RGB or greyscale: what `DeviceDecoder` gives nvJPEG."""
    progressive = header.info.get("progressive") or header.info.get("progression")
    return header.format == "JPEG" and header.mode in JPEG_MODES_FOR_THE_DEVICE and not progressive


@dataclass
class EncodedImageDataset(EpochSeededDataset):
    """A map-style dataset of undecoded images (`datasets.Image(decode=False)` rows, as `modeling_pvt.data` loads
    them): each sample is its label, its encoded bytes (or, for a file nvJPEG cannot take, its pixels decoded here)
    and, with `sampler`, its augmentation parameters, a pure function of (`augmentation_seed`, epoch, index) (see
    `EpochSeededDataset`). Batch samples with `collate_encoded_batch`."""

    dataset: datasets.Dataset
    image_column: str
    label_column: str
    split: str
    sampler: TrainAugmentationSampler | None = None
    augmentation_seed: int | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        row = self.dataset[int(index)]
        value = row[self.image_column]
        description = describe_image(value, index, self.split)
        data = _read_encoded(value, description)
        header = _open_header(data, description)
        sample = {"labels": row[self.label_column], "descriptions": description}
        if device_decodable(header):
            sample["encoded"] = np.frombuffer(data, np.uint8).copy()
        else:
            sample["encoded"] = decode_on_host(data, description)
        if self.sampler is not None:
            with self.augmentation(index):
                sample.update(self.sampler(header))
        return sample


def collate_encoded_batch(samples: Sequence[dict]) -> dict:
    """`labels` as a tensor (the training device's, once accelerate moves it); the rest as NumPy arrays and lists,
    which accelerate leaves on the host: the encoded images stay where `DeviceDecoder` reads them, and the
    augmentation parameters where `DeviceTrainTransform` plans its work without waiting for the device."""
    batch = {"labels": torch.tensor([sample["labels"] for sample in samples], dtype=torch.long)}
    batch["encoded"] = [sample["encoded"] for sample in samples]
    batch["descriptions"] = [sample["descriptions"] for sample in samples]
    for name in samples[0].keys() - batch.keys():
        batch[name] = np.stack([sample[name] for sample in samples])
    return batch


# ------------------------------------------------------------------------------------------------ the device
class DeviceDecoder:
    """Decodes a batch's images (`collate_encoded_batch`'s `encoded`) to (3, H, W) uint8 tensors on `device`."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)

    def __call__(self, encoded: Sequence[np.ndarray], descriptions: Sequence[str]) -> list[torch.Tensor]:
        images: list[torch.Tensor | None] = [None] * len(encoded)
        jpegs = []
        for index, item in enumerate(encoded):
            if item.ndim == 3:  # decoded by the worker
                images[index] = torch.from_numpy(item).to(self.device, non_blocking=True)
            else:
                jpegs.append(index)
        if not jpegs:
            return images
        data = [torch.from_numpy(encoded[index]) for index in jpegs]
        if self.device.type == "cuda":
            for index, image in zip(jpegs, self._decode_on_device(data, descriptions, jpegs), strict=True):
                images[index] = image
        else:
            for index in jpegs:
                images[index] = torch.from_numpy(decode_on_host(encoded[index].tobytes(), descriptions[index]))
        return images

    def _decode_on_device(
        self, data: list[torch.Tensor], descriptions: Sequence[str], indices: list[int]
    ) -> list[torch.Tensor]:
        try:
            return torchvision.io.decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:  # one file nvJPEG refuses fails the whole call: retry file by file
            pass
        images = []
        for item, index in zip(data, indices, strict=True):
            try:
                images.append(torchvision.io.decode_jpeg(item, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:
                pixels = decode_on_host(item.numpy().tobytes(), descriptions[index])
                images.append(torch.from_numpy(pixels).to(self.device, non_blocking=True))
        return images


def _by_size(images: Sequence[torch.Tensor]) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(tuple(image.shape[-2:]), []).append(index)
    return groups


def _to_device_indices(indices: Sequence[int] | np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(indices, np.int64)).to(device, non_blocking=True)


def _as_uint8_values(images: torch.Tensor) -> torch.Tensor:
    """Float images rounded and clamped to what a uint8 image can hold, as PIL's ops see their input."""
    return images.round_().clamp_(0, 255)


def crop_and_resize(images: Sequence[torch.Tensor], boxes: np.ndarray, size: int) -> torch.Tensor:
    """(B, 3, size, size) float images in [0, 255]: box (top, left, height, width) of each image resampled to
    `size` by `roi_align` (bilinear, ceil(box/size) samples averaged per output pixel in each direction), one call
    per distinct image size in the batch."""
    device = images[0].device
    output = torch.empty(len(images), 3, size, size, device=device)
    for indices in _by_size(images).values():
        stacked = torch.stack([images[index] for index in indices]).float()
        top, left, height, width = boxes[indices].T.astype(np.float32)
        rois = np.stack([np.arange(len(indices), dtype=np.float32), left, top, left + width, top + height], axis=1)
        resized = roi_align(
            stacked,
            torch.from_numpy(rois).to(device, non_blocking=True),
            output_size=size,
            sampling_ratio=-1,
            aligned=True,
        )
        output.index_copy_(0, _to_device_indices(indices, device), resized)
    return _as_uint8_values(output)


def _blend(degenerate: torch.Tensor, images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """PIL's `Image.blend(degenerate, images, factor)`, the core of `ImageEnhance`: truncated, clipped to uint8."""
    return (degenerate + factors.view(-1, 1, 1, 1) * (images - degenerate)).clamp_(0, 255).trunc_()


def _greyscale(images: torch.Tensor) -> torch.Tensor:
    """PIL's RGB to L conversion (ITU-R 601-2 luma in 16-bit fixed point, rounded), kept as one channel."""
    red, green, blue = images.unbind(1)
    return torch.floor((red * 19595 + green * 38470 + blue * 7471 + 32768) / 65536).unsqueeze(1)


def _sharpen_degenerate(images: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter (3x3, centre 5, others 1, over 13, rounded), border pixels unchanged."""
    kernel = torch.ones(3, 3, device=images.device, dtype=images.dtype)
    kernel[1, 1] = 5
    kernel = (kernel / 13).expand(3, 1, 3, 3)
    smoothed = torch.round(F.conv2d(images, kernel, groups=3))
    degenerate = images.clone()
    degenerate[..., 1:-1, 1:-1] = smoothed
    return degenerate


def _pixel_op(name: str, images: torch.Tensor, arguments: torch.Tensor) -> torch.Tensor:
    """RandAugment's colour ops as PIL computes them, each sample with its own argument."""
    per_sample = arguments.view(-1, 1, 1, 1)
    if name == "AutoContrast":
        return tvf.autocontrast(images.to(torch.uint8)).float()
    if name == "Equalize":
        return tvf.equalize(images.to(torch.uint8)).float()
    if name == "Invert":
        return 255 - images
    if name == "Posterize":  # keep the top `bits` bits
        step = torch.exp2(8 - per_sample.clamp(0, 8))
        return torch.floor(images / step) * step
    if name == "Solarize":
        return torch.where(images >= per_sample, 255 - images, images)
    if name == "SolarizeAdd":
        return torch.where(images < 128, (images + per_sample).clamp(max=255), images)
    if name == "Color":
        return _blend(_greyscale(images), images, arguments)
    if name == "Contrast":
        mean = torch.floor(_greyscale(images).mean(dim=(1, 2, 3), keepdim=True) + 0.5)
        return _blend(mean, images, arguments)
    if name == "Brightness":
        return _blend(torch.zeros_like(images), images, arguments)
    if name == "Sharpness":
        return _blend(_sharpen_degenerate(images), images, arguments)
    raise ValueError(f"not a colour op: {name}")


def _pil_affine(name: str, argument: float, size: int) -> np.ndarray:
    """PIL's affine data (a, b, c, d, e, f) of a RandAugment geometric op on a size x size image: output pixel
    centre (x, y) reads input (a x + b y + c, d x + e y + f)."""
    if name == "ShearX":
        return np.array([1, argument, 0, 0, 1, 0], np.float64)
    if name == "ShearY":
        return np.array([1, 0, 0, argument, 1, 0], np.float64)
    if name == "TranslateX":
        return np.array([1, 0, argument, 0, 1, 0], np.float64)
    if name == "TranslateY":
        return np.array([1, 0, 0, 0, 1, argument], np.float64)
    # Rotate: PIL's `Image.rotate(degrees)`, counter-clockwise about the image centre
    angle, centre = -math.radians(argument), size / 2
    cos, sin = math.cos(angle), math.sin(angle)
    return np.array([cos, sin, centre - cos * centre - sin * centre, -sin, cos, centre + sin * centre - cos * centre])


def _affine_theta(name_and_arguments: Iterable[tuple[str, float]], size: int) -> np.ndarray:
    """`affine_grid` matrices (normalised coordinates, align_corners=False) of PIL affine ops on size x size images."""
    thetas = []
    half = size / 2
    for name, argument in name_and_arguments:
        a, b, c, d, e, f = _pil_affine(name, argument, size)
        matrix = np.array([[a, b], [d, e]])
        # pixel p = half * (n + 1): n_in = M n_out + (M [half, half] + t) / half - 1
        shift = (matrix @ np.array([half, half]) + np.array([c, f])) / half - 1
        thetas.append(np.concatenate([matrix, shift[:, None]], axis=1))
    return np.stack(thetas).astype(np.float32)


_MASK32 = 0xFFFFFFFF


def _pcg_hash(state: torch.Tensor) -> torch.Tensor:
    """The PCG hash (RXS-M-XS) of 32-bit values held in int64, whose products stay below 2**63."""
    state = (state * 747796405 + 2891336453) & _MASK32
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & _MASK32
    return (word >> 22) ^ word


def hashed_normal(seeds: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """(len(seeds), *shape) standard normal values, each a function of its sample's seed (below 2**31) and its
    position only: the same sample gets the same noise in any batch, on any device."""
    count = math.prod(shape)
    counters = torch.arange(2 * count, device=seeds.device)
    state = _pcg_hash(_pcg_hash((seeds.view(-1, 1) * 0x9E3779B1 + counters) & _MASK32))
    uniform = ((state >> 8).float() + 0.5) / 2**24  # 24 bits: exact in float32, never 0 or 1
    first, second = uniform.view(len(seeds), 2, count).unbind(1)
    normal = torch.sqrt(-2 * torch.log(first)) * torch.cos(2 * math.pi * second)
    return normal.view(len(seeds), *shape)


class _Normalisation:
    """uint8-valued float images to `(x / 255 - mean) / std`, as one multiply-add."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device):
        std_tensor = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_tensor)
        self.shift = -torch.tensor(mean, device=device).view(1, -1, 1, 1) / std_tensor

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, images, self.scale)


class DeviceTrainTransform:
    """The training augmentation of a batch from `collate_encoded_batch` on `device`: decode, then each sample's crop
    and flip, RandAugment ops, normalisation and random erasing as drawn by `TrainAugmentationSampler`. Returns
    normalised float32 (B, 3, S, S) `pixel_values`; every op runs once per batch over the samples that drew it."""

    def __init__(
        self,
        sampler: TrainAugmentationSampler,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str,
    ):
        self.sampler = sampler
        self.device = torch.device(device)
        self.decoder = DeviceDecoder(self.device)
        self.normalise = _Normalisation(mean, std, self.device)
        self.fill = torch.tensor(sampler.fill, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)

    def __call__(self, batch: dict) -> torch.Tensor:
        size = self.sampler.image_size
        images = crop_and_resize(self.decoder(batch["encoded"], batch["descriptions"]), batch["crop_boxes"], size)
        flips = torch.from_numpy(batch["flips"]).to(self.device, non_blocking=True).view(-1, 1, 1, 1)
        images = torch.where(flips, images.flip(-1), images)
        for slot in range(batch["ops"].shape[1]):
            images = self._apply_ops(images, batch["ops"][:, slot], batch["op_arguments"][:, slot])
        images = self.normalise(images)
        return self._erase(images, batch["erase_boxes"], batch["noise_seeds"])

    def _apply_ops(self, images: torch.Tensor, ops: np.ndarray, arguments: np.ndarray) -> torch.Tensor:
        geometric = np.flatnonzero((ops >= 0) & (ops < len(GEOMETRIC_OPS)))
        if len(geometric):
            indices = _to_device_indices(geometric, self.device)
            theta = _affine_theta(((DEVICE_OPS[ops[i]], arguments[i]) for i in geometric), images.shape[-1])
            theta = torch.from_numpy(theta).to(self.device, non_blocking=True)
            grid = F.affine_grid(theta, [len(geometric), *images.shape[1:]], align_corners=False)
            moved = F.grid_sample(
                images[indices] - self.fill, grid, mode="bicubic", padding_mode="zeros", align_corners=False
            )
            images.index_copy_(0, indices, _as_uint8_values(moved + self.fill))
        for op in np.unique(ops[ops >= len(GEOMETRIC_OPS)]):
            selected = np.flatnonzero(ops == op)
            indices = _to_device_indices(selected, self.device)
            op_arguments = torch.from_numpy(arguments[selected].astype(np.float32)).to(self.device, non_blocking=True)
            images.index_copy_(0, indices, _pixel_op(DEVICE_OPS[op], images[indices], op_arguments))
        return images

    def _erase(self, images: torch.Tensor, boxes: np.ndarray, seeds: np.ndarray) -> torch.Tensor:
        erased = np.flatnonzero(boxes[:, 2] > 0)
        if not len(erased):
            return images
        indices = _to_device_indices(erased, self.device)
        top, left, height, width = torch.from_numpy(boxes[erased]).to(self.device, non_blocking=True).unbind(1)
        rows = torch.arange(images.shape[-2], device=self.device).view(1, -1, 1)
        columns = torch.arange(images.shape[-1], device=self.device).view(1, 1, -1)
        inside = (
            (rows >= top.view(-1, 1, 1))
            & (rows < (top + height).view(-1, 1, 1))
            & (columns >= left.view(-1, 1, 1))
            & (columns < (left + width).view(-1, 1, 1))
        ).unsqueeze(1)
        noise = hashed_normal(_to_device_indices(seeds[erased], self.device), images.shape[1:])
        return images.index_copy_(0, indices, torch.where(inside, noise, images[indices]))


class DeviceEvalTransform:
    """The evaluation transform of a batch from `collate_encoded_batch` on `device`, as `PvtImageProcessor` does it
    on the host: decode, shortest edge to `resize_to` (bicubic, antialiased), centre crop to `crop_size`, normalise."""

    def __init__(
        self, resize_to: int, crop_size: int, mean: Sequence[float], std: Sequence[float], device: torch.device | str
    ):
        self.resize_to, self.crop_size = resize_to, crop_size
        self.device = torch.device(device)
        self.decoder = DeviceDecoder(self.device)
        self.normalise = _Normalisation(mean, std, self.device)

    @classmethod
    def from_image_processor(cls, image_processor, device: torch.device | str) -> "DeviceEvalTransform":
        crop = image_processor.crop_size
        return cls(
            image_processor.size["shortest_edge"],
            min(crop["height"], crop["width"]),
            image_processor.image_mean,
            image_processor.image_std,
            device,
        )

    def __call__(self, batch: dict) -> torch.Tensor:
        images = self.decoder(batch["encoded"], batch["descriptions"])
        output = torch.empty(len(images), 3, self.crop_size, self.crop_size, device=self.device)
        for (height, width), indices in _by_size(images).items():
            short, long = min(height, width), max(height, width)
            resized_long = int(self.resize_to * long / short)
            new_size = (self.resize_to, resized_long) if height <= width else (resized_long, self.resize_to)
            stacked = torch.stack([images[index] for index in indices]).float()
            resized = _as_uint8_values(F.interpolate(stacked, size=new_size, mode="bicubic", antialias=True))
            top = (new_size[0] - self.crop_size) // 2
            left = (new_size[1] - self.crop_size) // 2
            cropped = resized[..., top : top + self.crop_size, left : left + self.crop_size]
            output.index_copy_(0, _to_device_indices(indices, self.device), cropped)
        return self.normalise(output)


class TransformedBatches:
    """A loader whose batches become `{"pixel_values": transform(batch), "labels": ...}` as they are read: what
    `modeling_pvt.tasks.evaluation.evaluate_classifier` takes, from an `EncodedImageDataset` loader and a
    `DeviceEvalTransform`."""

    def __init__(self, loader: Iterable, transform: Callable[[dict], torch.Tensor]):
        self.loader, self.transform = loader, transform

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            yield {"pixel_values": self.transform(batch), "labels": batch["labels"]}


__all__ = [
    "DEVICE_OPS",
    "DeviceDecoder",
    "DeviceEvalTransform",
    "DeviceTrainTransform",
    "EncodedImageDataset",
    "TrainAugmentationSampler",
    "TransformedBatches",
    "collate_encoded_batch",
    "crop_and_resize",
    "decode_on_host",
    "device_decodable",
    "hashed_normal",
]
