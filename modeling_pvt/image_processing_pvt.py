"""Image processor for PVT: the original evaluation transform, reading transformers' stock PVT configs too."""

import numpy as np
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling, is_pil_image
from transformers.processing_utils import ImagesKwargs


class PvtImageProcessorKwargs(ImagesKwargs, total=False):
    """
    crop_pct (`float`, *optional*):
        timm's crop ratio: when set, the shortest edge is resized to `crop_size / crop_pct` before the centre crop
        (0.875 turns a 224 crop into the original 256 resize), overriding `size`.
    """

    crop_pct: float | None


class PvtImageProcessor(PilBackend):
    r"""
    Prepares images for PVT. The default is the evaluation transform of the original code (DeiT's): shortest edge
    resized to 256 with bicubic interpolation, centre crop to 224x224, rescale to [0, 1], ImageNet mean/std.
    A plain resize (transformers' stock PVT processor) is `size={"height": H, "width": W}, do_center_crop=False`;
    stock `preprocessor_config.json` files load as that.

    Accepts PIL images, NumPy arrays and torch tensors (channels first or last), one image or a batch; greyscale and
    RGBA inputs become RGB unless `do_convert_rgb=False`, which keeps the channels as given (with a matching
    `image_mean`/`image_std`, e.g. four values each for a model with `num_channels=4`).
    """

    valid_kwargs = PvtImageProcessorKwargs
    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BICUBIC
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"shortest_edge": 256}
    default_to_square = False
    crop_size = {"height": 224, "width": 224}
    crop_pct = None
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True

    def __init__(self, **kwargs):
        size = kwargs.get("size")
        # A stock PVT config resizes straight to height x width and has no crop: keep it that way.
        if isinstance(size, dict) and "height" in size and "do_center_crop" not in kwargs:
            kwargs["do_center_crop"] = False
        super().__init__(**kwargs)
        if self.crop_pct is not None:
            # Saved `size` then reflects the crop ratio, so processors that ignore `crop_pct` resize the same way.
            self.size = self._standardize_kwargs(crop_pct=self.crop_pct, crop_size=self.crop_size)["size"]

    def _standardize_kwargs(self, crop_pct: float | None = None, **kwargs) -> dict:
        kwargs = super()._standardize_kwargs(**kwargs)
        if crop_pct is not None:
            if not 0.0 < crop_pct <= 1.0:
                raise ValueError(f"crop_pct must lie in (0, 1], got {crop_pct}.")
            crop_size = kwargs["crop_size"]
            if crop_size is None:
                raise ValueError("crop_pct needs a crop_size to derive the resize from.")
            kwargs["size"] = type(crop_size)(shortest_edge=int(min(crop_size.height, crop_size.width) / crop_pct))
        kwargs["crop_pct"] = crop_pct
        return kwargs

    def preprocess(self, images, *args, **kwargs):
        check_images(images)
        return super().preprocess(with_channel_axis(images), *args, **kwargs)

    def process_image(self, image, do_convert_rgb: bool | None = None, **kwargs) -> np.ndarray:
        image = super().process_image(image, do_convert_rgb=do_convert_rgb, **kwargs)
        if not (self.do_convert_rgb if do_convert_rgb is None else do_convert_rgb):
            return image  # channels as given, e.g. 4 for a model with `num_channels=4`
        if image.shape[0] == 1:
            image = np.repeat(image, 3, axis=0)
        elif image.shape[0] == 4:
            image = image[:3]
        return image


def with_channel_axis(images):
    """Greyscale `(height, width)` arrays and tensors gain a trailing channel axis, which transformers expects."""
    if isinstance(images, (list, tuple)):
        return [with_channel_axis(image) for image in images]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 2:
        return images[..., None]
    return images


def check_images(images) -> None:
    """Reject inputs that cannot be images with an error that says what was wrong, before any work is done."""
    batch = list(images) if isinstance(images, (list, tuple)) else [images]
    if not batch:
        raise ValueError("No images were given: pass a PIL image, an array or tensor, or a non-empty list of them.")
    for index, image in enumerate(batch):
        if isinstance(image, (list, tuple)):
            check_images(image)
            continue
        if is_pil_image(image):
            width, height = image.size
            if width == 0 or height == 0:
                raise ValueError(f"Image {index} is empty ({width}x{height} pixels).")
            continue
        if isinstance(image, str):  # a path or URL, which transformers fetches
            continue
        if not isinstance(image, (np.ndarray, torch.Tensor)):
            raise TypeError(
                f"Image {index} is a {type(image).__name__}; expected a PIL image, a numpy array, a torch tensor or "
                "a path."
            )
        shape = tuple(image.shape)
        if len(shape) not in (2, 3, 4):
            raise ValueError(
                f"Image {index} has shape {shape}; expected (height, width), (height, width, channels), "
                "(channels, height, width) or a batch of those."
            )
        if 0 in shape:
            raise ValueError(f"Image {index} is empty (shape {shape}).")


__all__ = ["PvtImageProcessor"]
