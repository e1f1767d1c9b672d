"""How a training process starts: the one CPU-host launch rule, logging, the allocator, compilation and tracking,
and how every process of a run stops together on a user's mistake.

`accelerate launch --multi_gpu` on a host without GPUs starts N processes that accelerate joins into one gloo group
only when told to use the CPU (`cpu_only_host`); `trainer_launch_arguments` applies the same rule to a `Trainer`.

A mistake found before training (a `DataError` or an `OptionError`) ends the run through `stop_all_on_user_error`:
every process reaches the same decision, the main process prints the one line, and all exit at once with code 1,
without a traceback. Under `accelerate launch --multi_gpu` (torchrun) a non-zero exit always makes the launcher
print its `ChildFailedError` report; the processes hand torchrun the same line as their error, so the report ends
with it (`traceback : Data error: ...`, then torchrun's closing rule).
"""

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

import datasets
import torch
import transformers
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, DistributedType, broadcast_object_list, gather_object

from ..data.sources import DataError
from ..runtime import configure_allocator
from .options import OptionError, TrainingArguments

logger = get_logger(__name__)

Result = TypeVar("Result")

USER_ERRORS = {DataError: "Data error", OptionError: "Option error"}
"""The mistakes a user can fix, and the word their one line starts with."""


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
    return accelerator


def stop_all_on_user_error(step: Callable[[], Result], main_process_first: bool = False) -> Result:
    """`step()` on every process, or, when it raises a user's mistake (`USER_ERRORS`) on any of them, the end of
    every process with that one line (see the module docstring). With `main_process_first` the main process runs
    `step` alone first (e.g. to fill a cache the others reuse) and the others skip it when it failed there."""
    state = PartialState()
    result, problem = None, None
    if main_process_first and state.num_processes > 1:
        if state.is_main_process:
            result, problem = _attempt(step)
        problem = broadcast_object_list([problem])[0]
        if problem is None and not state.is_main_process:
            result, problem = _attempt(step)
    else:
        result, problem = _attempt(step)
    problems = gather_object([problem]) if state.num_processes > 1 else [problem]
    first = next((message for message in problems if message), None)
    if first is not None:
        _exit_together(state, first)
    return result


def _attempt(step: Callable[[], Result]) -> tuple[Result | None, str | None]:
    try:
        return step(), None
    except tuple(USER_ERRORS) as error:
        kind = next(word for error_type, word in USER_ERRORS.items() if isinstance(error, error_type))
        return None, f"{kind}: {error}"


def _exit_together(state: PartialState, message: str) -> NoReturn:
    """Every process calls this with the same `message`: the main process prints it, all exit with code 1."""
    if state.num_processes == 1:
        raise SystemExit(message)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:  # torchrun's per-process error record, which its failure report prints
        Path(error_file).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))
    state.wait_for_everyone()
    state.destroy_process_group()
    if state.is_main_process:
        sys.stderr.write(message + "\n")  # the script's last words, not a log record
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # At once, without the interpreter's teardown: torchrun stops the processes still running when one has ended,
    # and would report them as killed.
    os._exit(1)


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


def start_tracking(
    accelerator: Accelerator, args: TrainingArguments, project_name: str, hyperparameters: dict
) -> None:
    """With `--with_tracking`, start the trackers of `--report_to`, logging `hyperparameters` (values trackers cannot
    store, such as lists and None, as their text)."""
    if args.with_tracking:
        accelerator.init_trackers(
            project_name,
            {
                name: value if isinstance(value, (int, float, str, bool)) else str(value)
                for name, value in hyperparameters.items()
            },
        )


def setup_training(args: TrainingArguments, **accelerator_kwargs) -> Accelerator:
    """`setup_accelerator` for a training run's output folder, gradient accumulation and trackers."""
    return setup_accelerator(
        args.output_dir,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None,
        **accelerator_kwargs,
    )
