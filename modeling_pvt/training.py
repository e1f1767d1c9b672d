"""How the Accelerate training scripts run: launch setup, the optimizer-step loop, atomic checkpoints, exact resume.

Task-agnostic: a script builds its model, data and loss, and this module does the rest the same way for every task.

- `setup_accelerator` / `trainer_launch_arguments`: the one CPU-host launch rule. `accelerate launch --multi_gpu`
  on a host without GPUs starts N processes that accelerate joins into one gloo group only when told to use the CPU.
- `EpochShuffleSampler`, `EpochSeededDataset`, `build_train_dataloader`: sample order and random augmentation as pure
  functions of (seed, epoch, index), so a resumed run sees exactly the batches the uninterrupted run saw.
- `build_optimizer`: AdamW, fused where PyTorch has the kernel (CPU, CUDA).
- `build_lr_scheduler`: the scheduler convention: stepped once per optimizer step, not prepared by accelerate (which
  would step it once per process), saved with the checkpoints.
- `TrainingLoop`: epochs of accumulated optimizer steps with gradient clipping, checkpoints every N steps or every
  epoch (written to a hidden folder and renamed into place when complete), bit-exact resume from any of them, and the
  weights trained so far saved to `interrupted_model/` when training fails.
- `setup_training`, `add_checkpoint_arguments`, `add_hub_arguments`, `save_and_evaluate`, `publish_run`: the
  shared command-line options, and the end of a run (save, evaluate, results, card, upload).
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
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProfileKwargs, find_batch_size, gather_object
from tqdm.auto import tqdm
from transformers import get_scheduler

from .results import RESULTS_FILE_NAME, write_results
from .runtime import configure_allocator

logger = get_logger(__name__)

CHECKPOINTS_DIR_NAME = "checkpoints"
TRAINING_STATE_NAME = "training_state.json"
INTERRUPTED_MODEL_DIR_NAME = "interrupted_model"
PROFILE_DIR_NAME = "profile"


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
        cpu=cpu_only_host(),
        project_dir=str(output_dir) if output_dir else None,
        # Batches come from pinned memory on a GPU host (see `_loader_options`): copy them without waiting.
        dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available()),
        **accelerator_kwargs,
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


def compile_model(model: torch.nn.Module, backend: str | None) -> None:
    """`torch.compile` the model in place, whole (`fullgraph=True`) and for static shapes, when `backend` is given
    ("inductor"; "eager" and "aot_eager" only check the capture). In place, before `accelerator.prepare`: the
    module keeps its class and parameter names, so DDP/FSDP wrap it, and saving and checkpoints work, as for an
    eager model. A run then compiles once for training and once for evaluation, and never again: training batches
    all have one size, and the evaluation pads its last, smaller batch (`evaluation.py`)."""
    if backend:
        model.compile(backend=backend, fullgraph=True, dynamic=False)


def compiled_graph_count(model: torch.nn.Module) -> int | None:
    """Graphs torch.compile has captured in this process when `model` (prepared or not), or a module inside it, was
    compiled by `compile_model`; else None. A count that grows after the first training step and the first
    evaluation means recompilation."""
    if not is_compiled(model):
        return None
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def is_compiled(model: torch.nn.Module) -> bool:
    """Whether `model` or a module inside it (the module DDP/FSDP wrap, a detector's backbone) was compiled in
    place."""
    return any(getattr(module, "_compiled_call_impl", None) is not None for module in model.modules())


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
        # The CPU generator alone, which is all fork_rng saves: `torch.manual_seed` also queues the seed for every
        # accelerator type, recording a stack trace each time, which cost more than the rest of this block together.
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class EpochSeededDataset(torch.utils.data.Dataset):
    """Base of the training datasets (dataclasses with an `augmentation_seed` field): `augmentation(index)` makes the
    random augmentation of sample `index` in the epoch set by `set_epoch` a pure function of (`augmentation_seed`,
    epoch, index), whatever the number of workers, the rank that loads the sample, or an interruption and resume.
    Without a seed it draws from the global random state."""

    augmentation_seed: int | None = None

    @property
    def epoch(self) -> int:
        shared = self.__dict__.get("_shared_epoch")
        return 0 if shared is None else int(shared)

    def set_epoch(self, epoch: int) -> None:
        # Persistent data-loader workers keep the copy of the dataset made when they started, so the epoch lives in
        # shared memory, made at the first call (the training loop makes it before any worker starts).
        if "_shared_epoch" not in self.__dict__:
            self._shared_epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._shared_epoch.fill_(epoch)

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


def _loader_options(num_workers: int) -> dict:
    """Workers that live for the whole run (no restart, and no stall, at each epoch) and, with a GPU, batches in
    page-locked memory so that their copy to the device overlaps the computation."""
    return {
        "num_workers": num_workers,
        "persistent_workers": num_workers > 0,
        "pin_memory": torch.cuda.is_available(),
    }


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
        generator=torch.Generator().manual_seed(seed),
        **_loader_options(num_workers),
    )


def build_eval_dataloader(
    dataset: torch.utils.data.Dataset, batch_size: int, collate_fn: Callable, num_workers: int = 0
) -> torch.utils.data.DataLoader:
    """In order, every sample once (`gather_for_metrics` drops what accelerate repeats to even out the ranks)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(0),  # see build_train_dataloader
        **_loader_options(num_workers),
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


FUSED_ADAMW_DEVICES = ("cpu", "cuda")
"""Devices where `build_optimizer` uses PyTorch's fused AdamW (PyTorch has the kernel for both)."""


def build_optimizer(parameters: Iterable, device: torch.device, **options) -> torch.optim.AdamW:
    """The AdamW every script trains with on `device` (`options`: its learning rate, weight decay ...): PyTorch's fused
    AdamW, one kernel for the whole update, where PyTorch has it (`FUSED_ADAMW_DEVICES`), and its default elsewhere.
    The default runs a loop over the parameters on a CPU and a few multi-tensor kernels per update term on a GPU; an
    AdamW step of PVT-small's parameters took 3x longer that way than fused on a 2-core AMD EPYC, with AVX-512 and
    capped at AVX2 (`benchmarks/probes/adamw_step*.log`). It may be built before `accelerator.prepare` moves the
    model: the fused kernel needs the parameters on the device only when it steps."""
    return torch.optim.AdamW(parameters, fused=device.type in FUSED_ADAMW_DEVICES, **options)


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
    num_processes: int
    samples_per_second: float | None = None
    """Training samples per second over all processes after the first `LoopClock.warmup_steps` optimizer steps of
    the run (and after the profiled ones, with `profile_steps`), evaluation left out (None when the run had no more
    steps than that)."""
    data_wait_fraction: float | None = None
    """Share of the training time spent waiting for the next batch: near 0 when the data pipeline keeps up."""
    max_epoch_start_wait: float | None = None
    """Longest wait for the first batch of an epoch after the first (the stall at an epoch boundary), seconds."""

    def results_fields(self) -> dict:
        """What a results file says about the training run (see `modeling_pvt.results`): its length and its speed."""
        return {
            "train_loss": self.train_loss,
            "epoch": self.epochs,
            "completed_steps": self.completed_steps,
            "train_runtime": self.train_runtime,
            "num_processes": self.num_processes,
            "train_samples_per_second": self.samples_per_second,
            "train_data_wait_fraction": self.data_wait_fraction,
            "train_max_epoch_start_wait": self.max_epoch_start_wait,
        }


class LoopClock:
    """Where a training loop's time goes, without synchronising the device on every step.

    Step times are host times: on a GPU the host runs ahead of the device, so they are only summed over spans that
    end in a synchronisation (`epoch_end`, after the loss of the epoch has been read).
    """

    warmup_steps = 5
    """Steps left out of the steady rate: compilation, allocator and cache warm-up happen there."""

    def __init__(self):
        self.steps = 0
        self.steady_samples = 0
        self.steady_seconds = 0.0
        self.training_seconds = 0.0
        self.data_wait = 0.0
        self.epoch_start_waits: list[float] = []
        self._step_samples = 0
        self._last = time.perf_counter()

    def batches(self, batches: Iterable, first_epoch: bool) -> Iterator:
        """`batches`, timing each wait for the next one and counting their samples."""
        self._last = time.perf_counter()  # evaluation between epochs is not training time
        iterator = iter(batches)
        at_epoch_start = not first_epoch  # the first epoch's first wait is the loader starting up
        while True:
            started = time.perf_counter()
            try:
                with torch.profiler.record_function("next batch"):
                    item = next(iterator)
            except StopIteration:
                return
            waited = time.perf_counter() - started
            self.data_wait += waited
            if at_epoch_start:
                self.epoch_start_waits.append(waited)
                at_epoch_start = False
            self._step_samples += find_batch_size(item)
            yield item

    def step_done(self) -> None:
        """An optimizer step ended (after as many batches as the gradient accumulation takes)."""
        self._count(time.perf_counter())
        self.steps += 1
        if self.steps > self.warmup_steps:
            self.steady_samples += self._step_samples
        self._step_samples = 0

    def epoch_end(self) -> None:
        self._count(time.perf_counter())

    def _count(self, now: float) -> None:
        elapsed = now - self._last
        self.training_seconds += elapsed
        if self.steps >= self.warmup_steps:
            self.steady_seconds += elapsed
        self._last = now

    def samples_per_second(self, num_processes: int) -> float | None:
        if not self.steady_samples:
            return None
        return self.steady_samples * num_processes / self.steady_seconds


STEP_PHASES = ("next batch", "forward and loss", "backward", "optimizer step")
"""The parts of an optimizer step that `TrainingLoop` labels for the profiler (`torch.profiler.record_function`)."""


def device_busy_seconds(events: Iterable) -> float:
    """Seconds in which at least one GPU kernel or copy of `events` (profiler `FunctionEvent`s) ran: the union of
    their time ranges, so kernels that overlap on several streams count once, and the profiler's own annotations
    (ranges copied from the host's labels) not at all."""
    ranges = sorted(
        (event.time_range.start, event.time_range.end)
        for event in events
        if event.device_type == torch.autograd.DeviceType.CUDA and not event.is_user_annotation
    )
    busy, covered_until = 0.0, float("-inf")
    for start, end in ranges:
        if end > covered_until:
            busy += end - max(start, covered_until)
            covered_until = end
    return busy / 1e6  # the profiler counts microseconds


def write_step_profile(profiler: torch.profiler.profile, folder: Path, process_index: int, steps: int) -> dict:
    """Write what `profiler` recorded of `steps` optimizer steps to `folder`: the Chrome trace (`trace_rankN.json`,
    for chrome://tracing or Perfetto), the operators by time (`operators_rankN.txt`) and where a step's time went
    (`steps_rankN.json`, also returned): the wall time of a step, the host's time in each of `STEP_PHASES` and, on
    a GPU, the time the GPU was busy. A step that takes much longer than the GPU was busy waits on the host.

    Times are read from the host's events only: a GPU trace repeats each label (`ProfilerStep#N`, the phases) as a
    device-side annotation without host time. A trace without host step labels takes the step's wall time from the
    span of all its events; `device_busy_fraction` is None when a step's wall time is zero."""
    folder.mkdir(parents=True, exist_ok=True)
    profiler.export_chrome_trace(str(folder / f"trace_rank{process_index}.json"))
    events = profiler.events()
    on_gpu = any(event.device_type == torch.autograd.DeviceType.CUDA for event in events)
    table = profiler.key_averages().table(
        sort_by="self_device_time_total" if on_gpu else "self_cpu_time_total", row_limit=40
    )
    (folder / f"operators_rank{process_index}.txt").write_text(table + "\n")
    host_microseconds: dict[str, float] = {}
    for event in events:
        if event.device_type == torch.autograd.DeviceType.CPU:
            host_microseconds[event.key] = host_microseconds.get(event.key, 0.0) + event.time_range.elapsed_us()
    step_microseconds = sum(value for key, value in host_microseconds.items() if key.startswith("ProfilerStep"))
    if not step_microseconds and events:
        step_microseconds = max(event.time_range.end for event in events) - min(
            event.time_range.start for event in events
        )
    summary = {
        "steps": steps,
        "step_ms": step_microseconds / 1e3 / steps,
        "host_ms_per_step": {phase: host_microseconds.get(phase, 0.0) / 1e3 / steps for phase in STEP_PHASES},
    }
    if on_gpu:
        summary["device_busy_ms_per_step"] = device_busy_seconds(events) * 1e3 / steps
        summary["device_busy_fraction"] = (
            summary["device_busy_ms_per_step"] / summary["step_ms"] if summary["step_ms"] > 0 else None
        )
    (folder / f"steps_rank{process_index}.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info(f"profile of {steps} steps in {folder}: {json.dumps(summary)}", main_process_only=False)
    return summary


def start_step_profiler(accelerator: Accelerator, steps: int, output_dir: Path) -> torch.profiler.profile:
    """A started profiler (accelerate's `ProfileKwargs`) that records `steps` optimizer steps after the loop's warm-up
    (`LoopClock.warmup_steps` and one more) and then writes them with `write_step_profile` to `PROFILE_DIR_NAME` in
    `output_dir`. The loop calls its `step()` after every optimizer step and `stop()` at the end."""
    handler = ProfileKwargs(
        activities=["cpu", "cuda"] if accelerator.device.type == "cuda" else ["cpu"],
        schedule_option={"wait": LoopClock.warmup_steps, "warmup": 1, "active": steps, "repeat": 1},
        on_trace_ready=lambda profiler: write_step_profile(
            profiler, output_dir / PROFILE_DIR_NAME, accelerator.process_index, steps
        ),
    )
    profiler = handler.build()
    profiler.start()
    return profiler


class TrainingLoop:
    """Epochs of optimizer steps over a prepared model, optimizer and loader (see the module docstring).

    `args` holds the script's options: `output_dir` and those of `add_checkpoint_arguments` (`checkpointing_steps`:
    every N optimizer steps, "epoch" or None; `checkpoints_total_limit`; `resume_from_checkpoint`: "latest", a folder
    or None, restored before the first step), and `profile_steps` of `add_speed_arguments` (absent: none profiled).
    The model of the last epoch is not evaluated by `run`: the script saves it first (`save_and_evaluate`), so a
    failing evaluation loses nothing.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
        train_dataloader: torch.utils.data.DataLoader,
        plan: StepPlan,
        processor,
        args: argparse.Namespace,
        max_grad_norm: float | None = None,
    ):
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.train_dataloader = train_dataloader
        self.plan = plan
        self.processor = processor
        self.output_dir = Path(args.output_dir)
        self.checkpointing_steps = args.checkpointing_steps
        self.checkpoints_total_limit = args.checkpoints_total_limit
        self.resume_from = args.resume_from_checkpoint
        self.max_grad_norm = max_grad_norm
        self.profile_steps = getattr(args, "profile_steps", None) or 0
        self.start = TrainingProgress()

    def _checkpoint(self, name: str, progress: TrainingProgress) -> None:
        save_checkpoint(self.accelerator, self.output_dir, name, progress, self.checkpoints_total_limit)

    def _epoch_batches(self, epoch: int, clock: LoopClock) -> Iterator[tuple[int, dict]]:
        self.train_dataloader.set_epoch(epoch)  # the sampler's order
        if hasattr(self.train_dataloader.dataset, "set_epoch"):  # the augmentation (accelerate sets only one of them)
            self.train_dataloader.dataset.set_epoch(epoch)
        skip = self.start.batches_in_epoch if epoch == self.start.epoch else 0
        batches = self.accelerator.skip_first_batches(self.train_dataloader, skip) if skip else self.train_dataloader
        yield from enumerate(clock.batches(batches, first_epoch=epoch == self.start.epoch), start=skip)

    def run(
        self,
        compute_loss: Callable[[dict], torch.Tensor],
        on_epoch_end: Callable[[int, float, int], None] | None = None,
    ) -> TrainingOutcome:
        """Train to `plan.max_train_steps`. `compute_loss(batch)` returns the loss of one batch;
        `on_epoch_end(epoch, train_loss, completed_steps)` runs after every epoch but the last (evaluation, logging).
        """
        accelerator, model = self.accelerator, self.model
        if self.resume_from:
            self.start = load_checkpoint(accelerator, self.resume_from, self.output_dir)
        completed_steps = self.start.completed_steps
        clock, profiler = LoopClock(), None
        if self.profile_steps:
            needed = LoopClock.warmup_steps + 1 + self.profile_steps
            if self.plan.max_train_steps - completed_steps < needed:
                raise ValueError(
                    f"--profile_steps {self.profile_steps} needs {needed} optimizer steps in this run (the warm-up's "
                    f"{LoopClock.warmup_steps} and one more come first); it has "
                    f"{self.plan.max_train_steps - completed_steps}."
                )
            profiler = start_step_profiler(accelerator, self.profile_steps, self.output_dir)
            clock.warmup_steps += 1 + self.profile_steps  # profiled steps run slower: not the steady rate
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
                for batch_index, batch in self._epoch_batches(epoch, clock):
                    with accelerator.accumulate(model):
                        with torch.profiler.record_function("forward and loss"):
                            loss = compute_loss(batch)
                        with torch.profiler.record_function("backward"):
                            accelerator.backward(loss)
                        with torch.profiler.record_function("optimizer step"):
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
                    clock.step_done()
                    if profiler is not None:
                        profiler.step()
                    bar.update(1)
                    steps = self.checkpointing_steps
                    if isinstance(steps, int) and completed_steps % steps == 0:
                        position = TrainingProgress(completed_steps, epoch, batch_index + 1)
                        self._checkpoint(f"step_{completed_steps}", position)
                    if completed_steps >= self.plan.max_train_steps:
                        break
                # Every rank runs as many batches: the reduction is collective, and an epoch resumed at its very end
                # has no batches, hence no loss.
                train_loss = accelerator.reduce(loss_sum, "mean").item() / loss_count if loss_count else float("nan")
                clock.epoch_end()  # after `.item()`: the device has finished the epoch's steps
                if self.checkpointing_steps == "epoch":
                    self._checkpoint(f"epoch_{epoch}", TrainingProgress(completed_steps, epoch + 1, 0))
                if completed_steps >= self.plan.max_train_steps or epoch == self.plan.num_train_epochs - 1:
                    break
                if on_epoch_end is not None:
                    on_epoch_end(epoch, train_loss, completed_steps)
        except BaseException:
            bar.close()
            if profiler is not None:
                profiler.stop()
            if completed_steps > 0 and not is_sharded(accelerator):
                saved = save_interrupted_model(accelerator.unwrap_model(model), self.processor, self.output_dir)
                logger.error(
                    f"Training failed at epoch {epoch}, step {completed_steps}; the weights trained so far "
                    f"are in {saved} (the newest checkpoint, if any, resumes exactly).",
                    main_process_only=False,
                )
            raise
        bar.close()
        if profiler is not None:
            profiler.stop()
        return TrainingOutcome(
            train_loss,
            epoch + 1,
            completed_steps,
            time.perf_counter() - started,
            accelerator.num_processes,
            samples_per_second=clock.samples_per_second(accelerator.num_processes),
            data_wait_fraction=clock.data_wait / clock.training_seconds if clock.training_seconds else None,
            max_epoch_start_wait=max(clock.epoch_start_waits, default=None),
        )


# ------------------------------------------------------------------------------------------- end of a training run
def start_tracking(accelerator: Accelerator, args: argparse.Namespace, project_name: str) -> None:
    """With `--with_tracking`, start the trackers of `add_checkpoint_arguments`' `--report_to`, logging every
    argument as a hyperparameter (values trackers cannot store, such as lists and None, as their text)."""
    if args.with_tracking:
        hyperparameters = {
            name: value if isinstance(value, (int, float, str, bool)) else str(value)
            for name, value in vars(args).items()
        }
        accelerator.init_trackers(project_name, hyperparameters)


def setup_training(args: argparse.Namespace) -> Accelerator:
    """`setup_accelerator` for a training script's `output_dir`, `gradient_accumulation_steps` and tracking options."""
    return setup_accelerator(
        args.output_dir,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None,
    )


def save_and_evaluate(
    accelerator: Accelerator, model: torch.nn.Module, processor, output_dir: Path, evaluate: Callable[[], dict]
) -> tuple[list[str], dict]:
    """Save the trained model first (`save_trained_model`: the per-rank digests), then run the final `evaluate()`;
    a failing evaluation says where the model is."""
    digests = save_trained_model(accelerator, model, processor, output_dir)
    try:
        return digests, evaluate()
    except BaseException:
        logger.error(f"The final evaluation failed; the trained model is saved in {output_dir}.")
        raise


def publish_run(accelerator: Accelerator, args: argparse.Namespace, results: dict, card: str, script: str) -> None:
    """Main process: `all_results.json` and the model card into `args.output_dir`, then the upload when
    `--push_to_hub` (options of `add_hub_arguments`); a failing push says where everything is saved."""
    if not accelerator.is_main_process:
        return
    output_dir = Path(args.output_dir)
    write_results(output_dir / RESULTS_FILE_NAME, results)
    (output_dir / "README.md").write_text(card)
    if args.push_to_hub:
        try:
            repo_id = push_output_dir(output_dir, args.hub_model_id, args.hub_token, args.hub_private_repo, script)
        except Exception:
            logger.error(f"Pushing to the Hub failed; the model and results are saved in {output_dir}.")
            raise
        logger.info(f"Pushed {output_dir} to {repo_id}")


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


def _step_count(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number of steps (0 or more), got {value!r}")
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


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """--torch_compile [BACKEND] (compile the model once, see `compile_model`) and --profile_steps N (see
    `start_step_profiler`)."""
    group = parser.add_argument_group("speed")
    group.add_argument(
        "--torch_compile",
        nargs="?",
        const="inductor",
        choices=["inductor", "aot_eager", "eager"],
        help="Compile the model with torch.compile (default backend: inductor): one graph for training and one for "
        "evaluation, no recompilation afterwards (see modeling_pvt.training.compile_model).",
    )
    group.add_argument(
        "--profile_steps",
        type=_step_count,
        default=0,
        help=f"Profile N optimizer steps after the first {LoopClock.warmup_steps + 1} (torch.profiler, host and GPU) "
        f"and write a Chrome trace, the operators by time and where a step's time went to "
        f"OUTPUT_DIR/{PROFILE_DIR_NAME}/.",
    )


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
    "FUSED_ADAMW_DEVICES",
    "EpochShuffleSampler",
    "StepPlan",
    "TrainingLoop",
    "TrainingOutcome",
    "TrainingProgress",
    "LoopClock",
    "PROFILE_DIR_NAME",
    "STEP_PHASES",
    "add_checkpoint_arguments",
    "add_speed_arguments",
    "add_hub_arguments",
    "build_eval_dataloader",
    "build_lr_scheduler",
    "build_optimizer",
    "build_train_dataloader",
    "compile_model",
    "compiled_graph_count",
    "device_busy_seconds",
    "cpu_only_host",
    "is_compiled",
    "is_complete_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "plan_steps",
    "publish_run",
    "push_output_dir",
    "resolve_checkpoint",
    "save_and_evaluate",
    "save_checkpoint",
    "save_interrupted_model",
    "save_trained_model",
    "seeded_random_state",
    "setup_accelerator",
    "setup_training",
    "start_step_profiler",
    "start_tracking",
    "trainer_launch_arguments",
    "weights_digest",
    "write_step_profile",
]
