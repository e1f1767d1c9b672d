#!/usr/bin/env python
"""Where training time goes: the data loader alone, the model's training step alone, and the real `train.py` loop.

From a generated folder of photo-sized JPEGs (crops of scikit-image's photographs, 500x375, quality 90, so decoding
costs what it costs on ImageNet), it measures, side by side in one run:

- **loader**: images/s that `train.py`'s data pipeline delivers to the device (decode, the paper recipe's
  augmentation in worker processes, uint8 batches copied to the device, normalised and erased there); with
  `--data_paths cpu device` also the device data path's (`modeling_pvt.data.device`: workers read the bytes and draw
  the parameters, the device decodes and augments);
- **model step**: images/s of the training step alone on a batch already on the device (`TrainBatchTransform`,
  forward, loss, backward, AdamW), eager and under `torch.compile`;
- **end to end**: the steady-state images/s that `scripts/train.py` itself reports on that folder over three epochs
  with an evaluation after each, its share of time waiting for data, its longest stall at an epoch boundary, the
  number of graphs torch.compile captured, and its profile of a few steps (`--profile_steps`: a step's wall time,
  the host's time in each part of it and, on a GPU, the time the GPU was busy); per data path of `--data_paths`
  (train.py's `--data_pipeline`) and batch size of `--end_to_end_batch_sizes`.

The end-to-end figure can reach neither of the other two: whichever of them is lower is what limits it. On a CPU
every row computes with the same number of threads (`accelerate launch` alone would give train.py's one process a
single thread), and the loader's workers share the cores with them in the end-to-end run.

    python scripts/benchmark_training.py                  # on a CPU: a small run (PVT-tiny, 64 px)
    python scripts/benchmark_training.py --device cuda    # on a GPU: PVT-small, 224 px, bf16, batch 128
    python scripts/benchmark_training.py --device cuda --data_paths device cpu --end_to_end_batch_sizes 256 128

It writes `benchmarks/training_<device>.json` and a chart `benchmarks/training_<device>.png`.
"""

import argparse
import concurrent.futures
import functools
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from modeling_pvt.scripts.machine import describe_machine
from PIL import Image

from modeling_pvt import PvtConfig, PvtForImageClassification, PvtImageProcessor
from modeling_pvt.data.classification import (
    ImageClassificationDataset,
    TrainBatchTransform,
    build_train_transform,
    collate_image_batch,
    load_image_classification_data,
)
from modeling_pvt.data.device import (
    DeviceTrainTransform,
    EncodedImageDataset,
    TrainAugmentationSampler,
    collate_encoded_batch,
)
from modeling_pvt.data.sampling import build_train_dataloader
from modeling_pvt.training.launch import compile_model
from modeling_pvt.training.optimization import build_optimizer
from modeling_pvt.training.profiling import PROFILE_DIR_NAME

logger = logging.getLogger("benchmark_training")
REPO = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")

DATA_PATHS = ("cpu", "device")
"""train.py's `--data_pipeline` choices."""

PROFILE_STEPS = 5
"""Steps of each end-to-end run that `train.py --profile_steps` records (after its warm-up; its images/s leave them
out)."""

# Per device: what a user of that device would train. The CPU run is small so that it ends in minutes on 2 cores.
DEFAULTS = {
    "cpu": {"model_size": "tiny", "image_size": 64, "batch_size": 16, "num_images": 512, "dataloader_num_workers": 1},
    "cuda": {
        "model_size": "small",
        "image_size": 224,
        "batch_size": 128,
        "num_images": 8192,
        "dataloader_num_workers": 15,
    },
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=sorted(DEFAULTS), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model_size", help="PVT size (default: tiny on CPU, small on GPU).")
    parser.add_argument("--image_size", type=int)
    parser.add_argument("--batch_size", type=int, help="Training batch size (the model step also runs at 2x).")
    parser.add_argument("--num_images", type=int, help="Training JPEGs to generate (validation: 1/8 as many).")
    parser.add_argument("--dataloader_num_workers", type=int, help="Data-loader workers.")
    parser.add_argument("--steps", type=int, default=30, help="Timed steps for the loader and the model step.")
    parser.add_argument("--data_paths", nargs="+", choices=DATA_PATHS, default=["cpu"], help="Data paths to time "
                        "(loader and end to end), in this order: 'cpu' (decode and augment in workers) and/or "
                        "'device' (modeling_pvt.data.device).")  # fmt: skip
    parser.add_argument("--end_to_end_batch_sizes", nargs="+", type=int, help="Batch sizes of the train.py runs, in "
                        "this order (default: --batch_size).")  # fmt: skip
    parser.add_argument("--compile", choices=["auto", "yes", "no"], default="auto", help="Also time torch.compile "
                        "(auto: on GPUs only; inductor's CPU compile takes minutes on 2 cores).")  # fmt: skip
    parser.add_argument("--data_dir", type=Path, help="Keep the generated JPEGs here (reused when present).")
    parser.add_argument("--output", type=Path, help="Results JSON (default: benchmarks/training_<device>.json).")
    parser.add_argument("--smoke", action="store_true", help="A few seconds' check of the machinery.")
    args = parser.parse_args()
    for name, value in DEFAULTS[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.smoke:
        args.model_size, args.image_size, args.batch_size, args.num_images, args.steps = "tiny", 32, 4, 32, 3
    args.compile = args.compile == "yes" or (args.compile == "auto" and args.device == "cuda")
    args.end_to_end_batch_sizes = args.end_to_end_batch_sizes or [args.batch_size]
    args.output = args.output or REPO / "benchmarks" / f"training_{args.device}.json"
    return args


# ------------------------------------------------------------------------------------------------------- data
@functools.cache
def _photos() -> tuple[np.ndarray, ...]:
    import skimage.data

    return tuple(getattr(skimage.data, name)() for name in PHOTOS)


def _write_jpeg(root: Path, index: int, num_classes: int, seed: int) -> None:
    photos = _photos()
    generator = np.random.default_rng([seed, index])  # each file its own stream: any order, any process
    photo = photos[index % len(photos)]
    height, width = photo.shape[:2]
    crop = int(min(height, width) * generator.uniform(0.5, 1.0))
    top, left = generator.integers(0, height - crop + 1), generator.integers(0, width - crop + 1)
    image = Image.fromarray(photo[top : top + crop, left : left + crop]).resize((500, 375), Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32) * generator.uniform(0.7, 1.3, size=3)
    if generator.random() < 0.5:
        pixels = pixels[:, ::-1]
    folder = root / f"class_{index % num_classes}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{index:06d}.jpg", quality=90)


def write_jpeg_folder(root: Path, num_images: int, num_classes: int = 10, seed: int = 0) -> None:
    """`num_images` 500x375 JPEGs (quality 90) in `num_classes` class folders: random crops, scales, flips and
    colour casts of scikit-image's photographs, so every file differs and decodes like a real photo. Written by as
    many processes as there are CPUs (the GPU run writes 9,216)."""
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count()) as pool:
        write = functools.partial(_write_jpeg, root, num_classes=num_classes, seed=seed)
        list(pool.map(write, range(num_images), chunksize=64))


def prepare_folders(args: argparse.Namespace, scratch: Path) -> tuple[Path, Path]:
    root = args.data_dir or scratch / "jpegs"
    train_dir, validation_dir = root / "train", root / "val"
    if not train_dir.is_dir():
        logger.info(f"Writing {args.num_images} training JPEGs to {train_dir}")
        write_jpeg_folder(train_dir, args.num_images)
        write_jpeg_folder(validation_dir, max(args.num_images // 8, 10), seed=1)
    return train_dir, validation_dir


# ------------------------------------------------------------------------------------------------- measurements
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loader(
    args: argparse.Namespace, train_dir: Path, validation_dir: Path, device: torch.device, path: str
) -> dict:
    """Images/s of train.py's pipeline on data path `path` (paper recipe, same transforms and loader) delivered
    normalised on `device`: "cpu" decodes and augments in the workers, "device" on `device`."""
    data = load_image_classification_data(
        train_dir=str(train_dir), validation_dir=str(validation_dir), check_images="none"
    )
    processor = PvtImageProcessor()
    if path == "device":
        sampler = TrainAugmentationSampler(args.image_size, mean=processor.image_mean)
        dataset = EncodedImageDataset(data.train, data.image_column, data.label_column, "train", sampler, 0)
        loader = build_train_dataloader(
            dataset, args.batch_size, 0, collate_encoded_batch, args.dataloader_num_workers
        )
        deliver = DeviceTrainTransform(sampler, processor.image_mean, processor.image_std, device)
    else:
        dataset = ImageClassificationDataset(
            data.train, data.image_column, data.label_column, build_train_transform(args.image_size), "train", 0
        )
        loader = build_train_dataloader(dataset, args.batch_size, 0, collate_image_batch, args.dataloader_num_workers)
        batch_transform = TrainBatchTransform(processor.image_mean, processor.image_std, 0.25, device)

        def deliver(batch: dict) -> torch.Tensor:
            return batch_transform(batch["pixel_values"].to(device, non_blocking=True))

    warmup = min(3, len(loader) // 2)
    delivered, started = 0, None
    epoch = 0
    while delivered < args.steps:
        dataset.set_epoch(epoch)
        loader.sampler.set_epoch(epoch)
        for index, batch in enumerate(loader):
            pixel_values = deliver(batch)
            if started is None and index + 1 == warmup:
                synchronize(device)
                started = time.perf_counter()
            elif started is not None:
                delivered += 1
                if delivered == args.steps:
                    break
        epoch += 1
    del pixel_values
    synchronize(device)
    seconds = time.perf_counter() - started
    return {"images_per_second": delivered * args.batch_size / seconds, "batches": delivered}


def time_model_step(args: argparse.Namespace, device: torch.device, batch_size: int, backend: str | None) -> dict:
    """Images/s of one training step on a uint8 batch already on `device` (bf16 autocast on a GPU)."""
    config = PvtConfig.from_preset(args.model_size, image_size=args.image_size, num_labels=1000, drop_path_rate=0.1)
    model = PvtForImageClassification(config).to(device).train()
    compile_model(model, backend)
    optimizer = build_optimizer(model.parameters(), device, lr=1e-4)
    processor = PvtImageProcessor()
    batch_transform = TrainBatchTransform(processor.image_mean, processor.image_std, 0.25, device)
    images = torch.randint(0, 256, (batch_size, 3, args.image_size, args.image_size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 1000, (batch_size,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(pixel_values=batch_transform(images)).logits
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    compile_started = time.perf_counter()
    for _ in range(3):
        step()
    synchronize(device)
    warmup_seconds = time.perf_counter() - compile_started
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    seconds = time.perf_counter() - started
    return {
        "images_per_second": args.steps * batch_size / seconds,
        "batch_size": batch_size,
        "warmup_seconds": warmup_seconds,
    }


def time_train_script(
    args: argparse.Namespace,
    train_dir: Path,
    validation_dir: Path,
    backend: str | None,
    batch_size: int,
    path: str,
) -> dict:
    """Run `scripts/train.py` (one process, the paper recipe, 3 epochs, `--data_pipeline path`) and return what it
    measured of itself."""
    with tempfile.TemporaryDirectory() as output_dir:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
        command += ["--mixed_precision", "bf16" if args.device == "cuda" else "no", "--dynamo_backend", "no"]
        if args.device == "cpu":  # accelerate launch would give the one process a single thread
            command += ["--num_cpu_threads_per_process", str(torch.get_num_threads())]
        command += [str(REPO / "scripts" / "train.py"), "--output_dir", output_dir, "--image_check", "none"]
        command += ["--train_dir", str(train_dir), "--validation_dir", str(validation_dir)]
        command += ["--model_size", args.model_size, "--image_size", str(args.image_size), "--num_train_epochs", "3"]
        command += ["--per_device_train_batch_size", str(batch_size)]
        command += ["--dataloader_num_workers", str(args.dataloader_num_workers)]
        command += ["--per_device_eval_batch_size", str(batch_size), "--profile_steps", str(PROFILE_STEPS)]
        if path != "cpu":  # the default: the command of the runs measured before the option existed
            command += ["--data_pipeline", path]
        if backend:
            command += ["--torch_compile", "--torch_compile_backend", backend]
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        started = time.perf_counter()
        completed = subprocess.run(command, env=environment, capture_output=True, text=True)
        if completed.returncode != 0:
            raise RuntimeError(f"train.py failed:\n{completed.stderr[-4000:]}")
        results = json.loads((Path(output_dir) / "all_results.json").read_text())
        profile = json.loads((Path(output_dir) / PROFILE_DIR_NAME / "steps_rank0.json").read_text())
    keys = ("train_samples_per_second", "train_data_wait_fraction", "train_max_epoch_start_wait")
    return {
        "images_per_second": results["train_samples_per_second"],
        **{key: results[key] for key in keys[1:]},
        "torch_compile_graphs": results["torch_compile_graphs"],
        "completed_steps": results["completed_steps"],
        "wall_seconds": time.perf_counter() - started,
        "profile": profile,
    }


def _path_suffix(path: str) -> str:
    """Row names of the CPU data path keep the names they had before there was another."""
    return "" if path == "cpu" else f", {path} data path"


# ------------------------------------------------------------------------------------------------------ report
def draw_chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["rows"])
    values = [report["rows"][name]["images_per_second"] for name in names]
    figure, axes = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5))
    axes.barh(names[::-1], values[::-1], color="#4c72b0")
    for position, value in enumerate(values[::-1]):
        axes.text(value, position, f" {value:,.0f}", va="center")
    setup = report["setup"]
    where = report["machine"].get("gpu") or f"{report['machine']['cpu']} ({report['machine']['cpu_capability']})"
    axes.set_title(f"PVT-{setup['model_size']} {setup['image_size']}px, batch {setup['batch_size']}: {where}")
    axes.set_xlabel("images / second")
    axes.set_xlim(0, max(values) * 1.25)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args()
    device = torch.device(args.device)
    backends = [None, "inductor"] if args.compile else [None]
    report = {
        "machine": {
            **describe_machine(args.device, ("modeling_pvt", "scripts/benchmark_training.py", "scripts/train.py")),
            "load_average_at_start": os.getloadavg()[0],
        },
        "setup": {
            **{name: getattr(args, name) for name in DEFAULTS["cpu"] if name != "num_images"},
            "data_paths": args.data_paths,
            "end_to_end_batch_sizes": args.end_to_end_batch_sizes,
            "torch_threads": torch.get_num_threads(),
        },
        "rows": {},
    }
    if not args.smoke:
        args.output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        folders = prepare_folders(args, Path(scratch))
        measurements = {
            "data loader alone" + _path_suffix(path): functools.partial(time_loader, args, *folders, device, path)
            for path in args.data_paths
        }
        for backend in backends:  # eager first: a run stopped by a time limit still has the eager rows
            mode = "compiled" if backend else "eager"
            for batch_size in (args.batch_size, 2 * args.batch_size):
                name = f"model step alone, {mode}, batch {batch_size}"
                measurements[name] = functools.partial(time_model_step, args, device, batch_size, backend)
            for path in args.data_paths:
                for batch_size in args.end_to_end_batch_sizes:
                    name = f"train.py end to end, {mode}" + _path_suffix(path)
                    name += f", batch {batch_size}" if batch_size != args.batch_size else ""
                    measure = functools.partial(time_train_script, args, *folders, backend, batch_size, path)
                    measurements[name] = measure
        for name, measure in measurements.items():
            report["rows"][name] = measure()
            logger.info(f"{name}: {report['rows'][name]}")
            if not args.smoke:  # after every row, so that an interrupted run keeps what it measured
                args.output.write_text(json.dumps(report, indent=2) + "\n")
    if args.smoke:
        print(json.dumps(report, indent=2))
        return
    draw_chart(report, args.output.with_suffix(".png"))
    logger.info(f"Wrote {args.output} and {args.output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
