"""Where images come from, and what goes wrong with them: the bad-data policy every task's data shares.

- `load_named_dataset`: a dataset saved on disk (`save_to_disk`) or one `datasets` can load by name;
- `drop_unreadable_images`: the up-front check; unreadable images are skipped with one warning that counts them;
- `decode_image`: decoding while a batch is built; a failure raises `UnreadableImageError` naming the file;
- `DataError`: the dataset cannot be used as asked; the scripts end every process with its one line, not a
  traceback (`modeling_pvt.training.launch.stop_all_on_user_error`).
"""

import io
import logging
import os
from pathlib import Path

import datasets
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif"}
)


MAX_NAMED_BAD_FILES = 10


class DataError(ValueError):
    """The dataset cannot be used as asked (missing column, empty folder, unknown dataset, ...)."""


class UnreadableImageError(RuntimeError):
    """An image could not be decoded while building a batch."""


def find_image_files(folder: Path, limit: int = 1) -> list[Path]:
    found = []
    for root, _, files in os.walk(folder):
        for file_name in files:
            if Path(file_name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(Path(root) / file_name)
                if len(found) >= limit:
                    return found
    return found


def load_named_dataset(
    dataset_name: str, dataset_config_name: str | None, cache_dir: str | None
) -> datasets.DatasetDict:
    try:
        if Path(dataset_name).is_dir() and (Path(dataset_name) / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(dataset_name)
        else:
            loaded = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
    except (datasets.exceptions.DatasetNotFoundError, FileNotFoundError, ConnectionError) as error:
        raise DataError(
            f"Cannot load dataset {dataset_name!r}"
            + (f" (config {dataset_config_name!r})" if dataset_config_name else "")
            + f": it is neither a local dataset nor one the Hugging Face Hub could provide ({error}). Check the "
            "name and your connection (HF_HUB_OFFLINE=1 allows only cached datasets), or pass image folders with "
            "--train_dir/--validation_dir."
        ) from error
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def _image_problem(value: dict | None, full_decode: bool) -> str:
    """Why the undecoded image `value` cannot be read, or an empty string when it can."""
    if value is None or (value.get("bytes") is None and not value.get("path")):
        return "no image data"
    try:
        source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
        with Image.open(source) as image:
            if full_decode:
                image.load()
            else:
                image.verify()
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for bad files.
        return f"{type(error).__name__}: {error}"
    return ""


def describe_image(value: dict | None, index: int, split: str) -> str:
    path = (value or {}).get("path")
    return f"{path!r}" if path else f"row {index} of the {split} split"


def drop_unreadable_images(
    dataset: datasets.Dataset,
    image_column: str,
    split: str,
    full_decode: bool = False,
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, int]:
    """Skip rows whose image cannot be opened; warn once with the count and the first file names."""
    if len(dataset) == 0:
        return dataset, 0
    checked = dataset.select_columns([image_column]).map(
        lambda batch: {"problem": [_image_problem(value, full_decode) for value in batch[image_column]]},
        batched=True,
        remove_columns=[image_column],
        num_proc=num_proc,
        desc=f"Checking {split} images",
    )
    problems = checked["problem"]
    bad_rows = [index for index, problem in enumerate(problems) if problem]
    if not bad_rows:
        return dataset, 0
    if len(bad_rows) == len(dataset):
        raise DataError(f"None of the {len(dataset)} images of the {split} split can be read: {problems[0]}")
    named = [
        f"{describe_image(dataset[index][image_column], index, split)} ({problems[index]})"
        for index in bad_rows[:MAX_NAMED_BAD_FILES]
    ]
    more = f" and {len(bad_rows) - len(named)} more" if len(bad_rows) > len(named) else ""
    logger.warning(
        "Skipping %d unreadable image(s) of %d in the %s split: %s%s",
        len(bad_rows),
        len(dataset),
        split,
        "; ".join(named),
        more,
    )
    bad = set(bad_rows)
    return dataset.select([index for index in range(len(dataset)) if index not in bad]), len(bad_rows)


def decode_image(value: dict | None, description: str) -> Image.Image:
    """Decode an undecoded `datasets` image (`{"bytes", "path"}`) to RGB, or raise `UnreadableImageError`."""
    try:
        if value is None:
            raise ValueError("no image data")
        source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
        with Image.open(source) as image:
            image.load()
            return image.convert("RGB")
    except Exception as error:  # PIL raises many types for bad files; re-raise one that names the file.
        raise UnreadableImageError(f"Cannot decode image {description}: {type(error).__name__}: {error}") from error
