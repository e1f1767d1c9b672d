"""The embedded detection default: scikit-learn's handwritten digits placed on larger black canvases.

Each canvas holds a few digits at random positions and sizes, never overlapping, so every box is known exactly: the
box of a digit is the extent of its visible ink on the canvas (pixels brighter than `INK_THRESHOLD` after the 8x8 scan
is resized to its cell). Training
canvases are drawn from the classifier's training digits and change every epoch (a pure function of seed, epoch and
index); the held-out canvases are a fixed set drawn from the held-out digits of `scripts/train.py`'s split, so a
backbone pretrained on that split has never seen a digit it is evaluated on.
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .classification import load_image_classification_data
from .detection import DetectionSample

DIGIT_CATEGORIES = [str(digit) for digit in range(10)]
DIGITS_DETECTION_DATASET_NAME = "sklearn-digits-canvases"
INK_THRESHOLD = 32
"""Grey level (0..255) above which a pixel is ink; bicubic resizing leaves fainter halos around the strokes."""


@dataclass(frozen=True)
class CanvasSpec:
    """How canvases are drawn: side length, digits per canvas and digit cell sizes (pixels, inclusive ranges)."""

    canvas_size: int = 128
    min_digits: int = 1
    max_digits: int = 4
    min_digit_size: int = 24
    max_digit_size: int = 48

    def __post_init__(self):
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"Need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}.")
        if not 8 <= self.min_digit_size <= self.max_digit_size <= self.canvas_size:
            raise ValueError(
                f"Need 8 <= min_digit_size <= max_digit_size <= canvas_size, got {self.min_digit_size}, "
                f"{self.max_digit_size}, {self.canvas_size}."
            )


def load_digit_scans() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(train scans, train labels), (held-out scans, held-out labels): the split `scripts/train.py` uses.

    Scans are uint8 arrays of shape (n, 8, 8), ink 0..255 on a 0 background.
    """
    data = load_image_classification_data(check_images="none")

    def to_arrays(split) -> tuple[np.ndarray, np.ndarray]:
        split = split.cast_column(data.image_column, split.features[data.image_column].__class__(decode=True))
        scans = np.stack([np.asarray(image.convert("L")) for image in split[data.image_column]])
        return scans, np.asarray(split[data.label_column], dtype=np.int64)

    return to_arrays(data.train), to_arrays(data.validation)


def _ink_extent(digit: np.ndarray) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) pixel bounds of the ink, exclusive on the right and bottom; None without ink."""
    ink = digit > INK_THRESHOLD
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if len(rows) == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def draw_canvas(
    scans: np.ndarray, labels: np.ndarray, spec: CanvasSpec, rng: np.random.Generator
) -> tuple[Image.Image, list[list[float]], list[int]]:
    """One canvas: RGB image, boxes `[x, y, w, h]` (pixels) and digit classes."""
    canvas = np.zeros((spec.canvas_size, spec.canvas_size), dtype=np.uint8)
    cells: list[tuple[int, int, int]] = []
    boxes, categories = [], []
    for _ in range(int(rng.integers(spec.min_digits, spec.max_digits + 1))):
        for _attempt in range(50):  # rejection sampling of a free spot; a crowded canvas just gets fewer digits
            size = int(rng.integers(spec.min_digit_size, spec.max_digit_size + 1))
            x, y = (int(value) for value in rng.integers(0, spec.canvas_size - size + 1, size=2))
            if all(x + size <= cx or cx + cs <= x or y + size <= cy or cy + cs <= y for cx, cy, cs in cells):
                break
        else:
            continue
        index = int(rng.integers(len(scans)))
        digit = np.asarray(Image.fromarray(scans[index], mode="L").resize((size, size), Image.Resampling.BICUBIC))
        extent = _ink_extent(digit)
        if extent is None:
            continue
        canvas[y : y + size, x : x + size] = digit
        left, top, right, bottom = extent
        boxes.append([float(x + left), float(y + top), float(right - left), float(bottom - top)])
        categories.append(int(labels[index]))
        cells.append((x, y, size))
    return Image.fromarray(canvas, mode="L").convert("RGB"), boxes, categories


class DigitCanvases:
    """A detection source of digit canvases; `fixed=True` draws the same canvas for an index in every epoch."""

    def __init__(
        self, scans: np.ndarray, labels: np.ndarray, num_canvases: int, spec: CanvasSpec, seed: int, fixed: bool
    ):
        if len(scans) == 0:
            raise ValueError("No digit scans to draw canvases from.")
        self.scans, self.labels, self.spec = scans, labels, spec
        self.num_canvases, self.seed, self.fixed = num_canvases, seed, fixed
        self.categories = DIGIT_CATEGORIES

    def __len__(self) -> int:
        return self.num_canvases

    def sample(self, index: int, epoch: int = 0) -> DetectionSample:
        seed_words = [self.seed, index] if self.fixed else [self.seed, epoch, index]
        rng = np.random.default_rng(np.random.SeedSequence(seed_words))
        image, boxes, categories = draw_canvas(self.scans, self.labels, self.spec, rng)
        return DetectionSample(
            image=image,
            image_id=index,
            boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            categories=np.asarray(categories, dtype=np.int64),
            description=f"digit canvas {index}",
        )
