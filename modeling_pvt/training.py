"""How the Accelerate training scripts run: launch setup, the optimizer-step loop, atomic checkpoints, exact resume.

Task-agnostic: a script builds its model, data and loss, and this module does the rest the same way for every task.

- `setup_accelerator` / `trainer_launch_arguments`: the one CPU-host launch rule. `accelerate launch --multi_gpu`
  on a host without GPUs starts N processes that accelerate joins into one gloo group only when told to use the CPU.
- `EpochShuffleSampler`, `EpochSeededDataset`, `build_train_dataloader`: sample order and random augmentation as pure
  functions of (seed, epoch, index), so a resumed run sees exactly the batches the uninterrupted run saw.
- `build_lr_scheduler`: the scheduler convention: stepped once per optimizer step, not prepared by accelerate (which
  would step it once per process), saved with the checkpoints.
- `TrainingLoop`: epochs of accumulated optimizer steps with gradient clipping, checkpoints every N steps or every
  epoch (written to a hidden folder and renamed into place when complete), bit-exact resume from any of them, and the
  weights trained so far saved to `interrupted_model/` when training fails.
- `add_checkpoint_arguments`, `add_hub_arguments`, `save_trained_model`, `push_output_dir`: the shared command-line
  options and the end of a run.
"""

import argparse
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, gather_object
from tqdm.auto import tqdm
from transformers import get_scheduler

from .runtime import configure_allocator

logger = get_logger(__name__)

CHECKPOINTS_DIR_NAME = "checkpoints"
TRAINING_STATE_NAME = "training_state.json"
INTERRUPTED_MODEL_DIR_NAME = "interrupted_model"


# -------------------------------------------------------------------------------------------------------- launch
def cpu_only_host() -> bool:
    """No GPU (or other accelerator): processes must be told to use the CPU to form one gloo process group."""
    return not torch.accelerator.is_available()


def trainer_launch_arguments() -> list[str]:
    """`TrainingArguments` options that apply the launch rule to a transformers `Trainer` script."""
    return ["--use_cpu", "True"] if cpu_only_host() else []


def setup_accelerator(output_dir: str | Path | None = None, **accelerator_kwargs) -> Accelerator:
    """An `Accelerator` for this host, with the logging every script uses (quiet on all but the main process)."""
    configure_allocator()  # keep big freed blocks in the process instead of re-faulting them on every step
    accelerator = Accelerator(
        cpu=cpu_only_host(), project_dir=str(output_dir) if output_dir else None, **accelerator_kwargs
    )
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    logging.getLogger("accelerate.checkpointing").setLevel(logging.WARNING)  # one line per saved file is noise
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
        transformers.utils.logging.set_verbosity_error()
    logger.info(accelerator.state, main_process_only=False)
    if output_dir and accelerator.is_main_process:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    return accelerator


def is_sharded(accelerator: Accelerator) -> bool:
    """FSDP and DeepSpeed hold different shards on each rank: no single rank can save or digest the whole model."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


# ------------------------------------------------------------------------------------------------- data order
@contextmanager
def seeded_random_state(seed: int):
    """Run a block with Python, NumPy and torch (CPU) random generators seeded by `seed`, then restore them."""
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class EpochSeededDataset(torch.utils.data.Dataset):
    """Base of the training datasets: `augmentation(index)` makes the random augmentation of sample `index` in the
    epoch set by `set_epoch` a pure function of (`augmentation_seed`, epoch, index), whatever the number of workers,
    the rank that loads the sample, or an interruption and resume. Without a seed it draws from the global state."""

    def __init__(self, augmentation_seed: int | None = None):
        self.augmentation_seed = augmentation_seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @contextmanager
    def augmentation(self, index: int):
        if self.augmentation_seed is None:
            yield
            return
        seed = int(np.random.SeedSequence([self.augmentation_seed, self.epoch, index]).generate_state(1)[0])
        with seeded_random_state(seed):
            yield


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A random order of `range(num_samples)` that depends only on `seed` and the epoch set with `set_epoch`.

    Every rank draws the same order (accelerate then deals the batches out), and a resumed run re-creates the order
    of the interrupted epoch exactly, without touching the global random generators.
    """

    def __init__(self, num_samples: int, seed: int):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        order_generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(self.num_samples, generator=order_generator).tolist()


def build_train_dataloader(
    dataset: torch.utils.data.Dataset, batch_size: int, seed: int, collate_fn: Callable, num_workers: int = 0
) -> torch.utils.data.DataLoader:
    """Shuffled by `EpochShuffleSampler`, incomplete batches dropped, and its own generator: creating an iterator
    must not draw from the global generators, or a resumed run (which creates one more) would drift."""
    return torch.utils.data.DataLoader(
        dataset,
        sampler=EpochShuffleSampler(len(dataset), seed=seed),
        batch_size=batch_size,
        drop_last=True,
        collate_fn=collate_fn,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )


def build_eval_dataloader(
    dataset: torch.utils.data.Dataset, batch_size: int, collate_fn: Callable, num_workers: int = 0
) -> torch.utils.data.DataLoader:
    """In order, every sample once (`gather_for_metrics` drops what accelerate repeats to even out the ranks)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collate_fn,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),  # see build_train_dataloader
    )


# ----------------------------------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class StepPlan:
    steps_per_epoch: int
    max_train_steps: int
    num_train_epochs: int


def plan_steps(
    batches_per_epoch: int, gradient_accumulation_steps: int, num_train_epochs: int, max_train_steps: int | None
) -> StepPlan:
    """Optimizer steps per epoch (of a prepared loader, i.e. per process), the total, and the epochs that covers."""
    if batches_per_epoch == 0:
        raise ValueError("The training data make no full batch on each process; lower the batch size.")
    steps_per_epoch = math.ceil(batches_per_epoch / gradient_accumulation_steps)
    total = max_train_steps if max_train_steps is not None else num_train_epochs * steps_per_epoch
    return StepPlan(steps_per_epoch, total, math.ceil(total / steps_per_epoch))


def build_lr_scheduler(
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    name: str,
    num_warmup_steps: int,
    num_training_steps: int,
    **scheduler_specific_kwargs,
) -> torch.optim.lr_scheduler.LRScheduler:
    """A transformers scheduler counted in optimizer steps, saved with the checkpoints (see the module docstring)."""
    lr_scheduler = get_scheduler(
        name,
        optimizer=optimizer,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=scheduler_specific_kwargs,
    )
    accelerator.register_for_checkpointing(lr_scheduler)
    return lr_scheduler


# -------------------------------------------------------------------------------------------------- checkpoints
@dataclass
class TrainingProgress:
    """Where a run is: optimizer steps done, the epoch it is in, and how many of that epoch's batches it consumed."""

    completed_steps: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def is_complete_checkpoint(folder: Path) -> bool:
    """Only a renamed-into-place checkpoint folder has its training-state record; temporaries start with '.'."""
    return folder.is_dir() and not folder.name.startswith(".") and (folder / TRAINING_STATE_NAME).is_file()


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `output_dir`, oldest first, as (completed steps, folder)."""
    checkpoints_dir = Path(output_dir) / CHECKPOINTS_DIR_NAME
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for folder in checkpoints_dir.iterdir():
        if is_complete_checkpoint(folder):
            state = json.loads((folder / TRAINING_STATE_NAME).read_text())
            found.append((state["completed_steps"], folder))
    return sorted(found)


def save_checkpoint(
    accelerator: Accelerator, output_dir: Path, name: str, progress: TrainingProgress, total_limit: int | None
) -> None:
    """Save the accelerate state (model, optimizer, registered objects, random generators of every rank) to
    `checkpoints/name` atomically: write `.name.tmp`, then rename it; keep the newest `total_limit`."""
    checkpoints_dir = Path(output_dir) / CHECKPOINTS_DIR_NAME
    final = checkpoints_dir / name
    temporary = checkpoints_dir / f".{name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)  # left by a crash during an earlier save
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / TRAINING_STATE_NAME).write_text(json.dumps(asdict(progress), indent=2) + "\n")
        _fsync_tree(temporary)
        if final.exists():  # same name again (e.g. re-running into the same folder): replace it
            stale = checkpoints_dir / f".{name}.stale"
            shutil.rmtree(stale, ignore_errors=True)
            final.rename(stale)
            shutil.rmtree(stale)
        temporary.rename(final)
        _fsync_tree(checkpoints_dir)
        if total_limit is not None:
            for _, old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
        logger.info(f"Saved checkpoint {final}")
    accelerator.wait_for_everyone()


def resolve_checkpoint(resume_from: str, output_dir: Path) -> Path:
    """The checkpoint folder `resume_from` names: a folder, or 'latest' (the newest complete one in `output_dir`)."""
    if resume_from == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise FileNotFoundError(
                f"No complete checkpoint under {Path(output_dir) / CHECKPOINTS_DIR_NAME} to resume from."
            )
        return checkpoints[-1][1]
    folder = Path(resume_from)
    if not is_complete_checkpoint(folder):
        raise FileNotFoundError(
            f"{folder} is not a complete checkpoint (no {TRAINING_STATE_NAME}; an interrupted save leaves only a "
            "hidden temporary folder). Pass another folder or 'latest'."
        )
    return folder


def load_checkpoint(accelerator: Accelerator, resume_from: str, output_dir: Path) -> TrainingProgress:
    """Restore the state saved by `save_checkpoint` (after `prepare` and `build_lr_scheduler`); where to go on."""
    checkpoint = resolve_checkpoint(resume_from, output_dir)
    accelerator.load_state(str(checkpoint))
    progress = TrainingProgress(**json.loads((checkpoint / TRAINING_STATE_NAME).read_text()))
    logger.info(
        f"Resumed from {checkpoint}: epoch {progress.epoch}, batch {progress.batches_in_epoch}, "
        f"step {progress.completed_steps}"
    )
    return progress


def save_interrupted_model(model: torch.nn.Module, processor, output_dir: Path) -> Path:
    """Keep the weights trained so far when the run fails; called by whichever rank caught the error."""
    final = Path(output_dir) / INTERRUPTED_MODEL_DIR_NAME
    temporary = Path(output_dir) / f".{INTERRUPTED_MODEL_DIR_NAME}.{os.getpid()}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    processor.save_pretrained(temporary)
    shutil.rmtree(final, ignore_errors=True)
    try:
        temporary.rename(final)
    except OSError:  # another rank got there first with the same (synchronised) weights
        shutil.rmtree(temporary, ignore_errors=True)
    return final


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer, in name order: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------------ the loop
@dataclass
class TrainingOutcome:
    train_loss: float
    """Mean training loss of the last epoch (NaN when resumed from the very last checkpoint)."""
    epochs: int
    """Epochs run, counting the one the loop stopped in."""
    completed_steps: int
    train_runtime: float


class TrainingLoop:
    """Epochs of optimizer steps over a prepared model, optimizer and loader (see the module docstring).

    `checkpointing_steps` is an int (every N optimizer steps), "epoch" or None. `resume_from` ("latest" or a folder)
    restores a checkpoint before the first step. The model of the last epoch is not evaluated by `run`: the script
    saves it first, so a failing evaluation loses nothing.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
        train_dataloader: torch.utils.data.DataLoader,
        plan: StepPlan,
        output_dir: Path,
        processor,
        max_grad_norm: float | None = None,
        checkpointing_steps: int | str | None = None,
        checkpoints_total_limit: int | None = None,
    ):
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.train_dataloader = train_dataloader
        self.plan = plan
        self.output_dir = Path(output_dir)
        self.processor = processor
        self.max_grad_norm = max_grad_norm
        self.checkpointing_steps = checkpointing_steps
        self.checkpoints_total_limit = checkpoints_total_limit
        self.start = TrainingProgress()

    def resume(self, resume_from: str | None) -> None:
        """Continue from a checkpoint ("latest" or a folder; nothing when None) at the first `run`."""
        if resume_from:
            self.start = load_checkpoint(self.accelerator, resume_from, self.output_dir)

    def _checkpoint(self, name: str, progress: TrainingProgress) -> None:
        save_checkpoint(self.accelerator, self.output_dir, name, progress, self.checkpoints_total_limit)

    def _epoch_batches(self, epoch: int) -> Iterator[tuple[int, dict]]:
        self.train_dataloader.set_epoch(epoch)  # the sampler's order
        if hasattr(self.train_dataloader.dataset, "set_epoch"):  # the augmentation (accelerate sets only one of them)
            self.train_dataloader.dataset.set_epoch(epoch)
        skip = self.start.batches_in_epoch if epoch == self.start.epoch else 0
        batches = self.accelerator.skip_first_batches(self.train_dataloader, skip) if skip else self.train_dataloader
        yield from enumerate(batches, start=skip)

    def run(
        self,
        compute_loss: Callable[[dict], torch.Tensor],
        on_epoch_end: Callable[[int, float, int], None] | None = None,
    ) -> TrainingOutcome:
        """Train to `plan.max_train_steps`. `compute_loss(batch)` returns the loss of one batch;
        `on_epoch_end(epoch, train_loss, completed_steps)` runs after every epoch but the last (evaluation, logging).
        """
        accelerator, model = self.accelerator, self.model
        completed_steps = self.start.completed_steps
        bar = tqdm(
            total=self.plan.max_train_steps,
            initial=completed_steps,
            desc="Training",
            disable=not accelerator.is_local_main_process,
        )
        train_loss, epoch, started = float("nan"), self.start.epoch, time.perf_counter()
        try:
            for epoch in range(self.start.epoch, self.plan.num_train_epochs):
                model.train()
                loss_sum, loss_count = torch.zeros((), device=accelerator.device), 0
                for batch_index, batch in self._epoch_batches(epoch):
                    with accelerator.accumulate(model):
                        loss = compute_loss(batch)
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and self.max_grad_norm:
                            accelerator.clip_grad_norm_(model.parameters(), self.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad()
                    loss_sum += loss.detach()
                    loss_count += 1
                    if not accelerator.sync_gradients:
                        continue
                    self.lr_scheduler.step()
                    completed_steps += 1
                    bar.update(1)
                    steps = self.checkpointing_steps
                    if isinstance(steps, int) and completed_steps % steps == 0:
                        position = TrainingProgress(completed_steps, epoch, batch_index + 1)
                        self._checkpoint(f"step_{completed_steps}", position)
                    if completed_steps >= self.plan.max_train_steps:
                        break
                train_loss = accelerator.reduce(loss_sum, "mean").item() / max(loss_count, 1)
                if self.checkpointing_steps == "epoch":
                    self._checkpoint(f"epoch_{epoch}", TrainingProgress(completed_steps, epoch + 1, 0))
                if completed_steps >= self.plan.max_train_steps or epoch == self.plan.num_train_epochs - 1:
                    break
                if on_epoch_end is not None:
                    on_epoch_end(epoch, train_loss, completed_steps)
        except BaseException:
            bar.close()
            if completed_steps > 0 and not is_sharded(accelerator):
                saved = save_interrupted_model(accelerator.unwrap_model(model), self.processor, self.output_dir)
                logger.error(
                    f"Training failed at epoch {epoch}, step {completed_steps}; the weights trained so far "
                    f"are in {saved} (the newest checkpoint, if any, resumes exactly).",
                    main_process_only=False,
                )
            raise
        bar.close()
        return TrainingOutcome(train_loss, epoch + 1, completed_steps, time.perf_counter() - started)


# ------------------------------------------------------------------------------------------- end of a training run
def save_trained_model(accelerator: Accelerator, model: torch.nn.Module, processor, output_dir: Path) -> list[str]:
    """Save the model (from every rank's shard if sharded) and its processor; the per-rank weight digests (empty
    when sharded), which must all be equal: a difference is logged as a warning."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(
        output_dir,
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
        state_dict=accelerator.get_state_dict(model),
    )
    if accelerator.is_main_process:
        processor.save_pretrained(output_dir)
    digests = [] if is_sharded(accelerator) else gather_object([weights_digest(unwrapped)])
    if len(set(digests)) > 1:
        logger.warning(f"The ranks ended with different weights: {digests}")
    return digests


def push_output_dir(output_dir: Path, repo_id: str | None, token: str | None, private: bool, script: str) -> str:
    """Upload a training output folder to the Hub, without its checkpoints and hidden files; the repo id."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id or Path(output_dir).name, private=private or None, exist_ok=True).repo_id
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        commit_message=f"Upload PVT trained with modeling_pvt {script}",
        ignore_patterns=[f"{CHECKPOINTS_DIR_NAME}/*", f"{INTERRUPTED_MODEL_DIR_NAME}/*", ".*", "*/.*"],
    )
    return repo_id


# ----------------------------------------------------------------------------------------------- command line
def _checkpointing_steps(value: str) -> int | str:
    if value == "epoch":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'epoch', got {value!r}")
    return int(value)


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpointing_steps, --checkpoints_total_limit, --resume_from_checkpoint, --with_tracking, --report_to."""
    group = parser.add_argument_group("checkpoints and tracking")
    group.add_argument(
        "--checkpointing_steps",
        type=_checkpointing_steps,
        help="Save the training state every N optimizer steps, or 'epoch'.",
    )
    group.add_argument("--checkpoints_total_limit", type=int, help="Keep only the newest N checkpoints.")
    group.add_argument("--resume_from_checkpoint", help="A checkpoint folder, or 'latest' in --output_dir.")
    group.add_argument("--with_tracking", action="store_true", help="Log metrics to --report_to.")
    group.add_argument("--report_to", default="tensorboard", help="Tracker(s) for accelerate, or 'all'.")


def add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    """--push_to_hub, --hub_model_id, --hub_token, --hub_private_repo."""
    group = parser.add_argument_group("hub")
    group.add_argument("--push_to_hub", action="store_true", help="Upload --output_dir to the Hub at the end.")
    group.add_argument("--hub_model_id", help="Repository id; default: the name of --output_dir.")
    group.add_argument("--hub_token", help="Token; default: the logged-in one or HF_TOKEN.")
    group.add_argument("--hub_private_repo", action="store_true")


__all__ = [
    "CHECKPOINTS_DIR_NAME",
    "INTERRUPTED_MODEL_DIR_NAME",
    "TRAINING_STATE_NAME",
    "EpochSeededDataset",
    "EpochShuffleSampler",
    "StepPlan",
    "TrainingLoop",
    "TrainingOutcome",
    "TrainingProgress",
    "add_checkpoint_arguments",
    "add_hub_arguments",
    "build_eval_dataloader",
    "build_lr_scheduler",
    "build_train_dataloader",
    "cpu_only_host",
    "is_complete_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "plan_steps",
    "push_output_dir",
    "resolve_checkpoint",
    "save_checkpoint",
    "save_interrupted_model",
    "save_trained_model",
    "seeded_random_state",
    "setup_accelerator",
    "trainer_launch_arguments",
    "weights_digest",
]
