"""One training skeleton for every task: a `TrainingTask` supplies its data, model, loss, evaluation and card;
`run_training` does the rest the same way for all of them.

The skeleton's order, which every task shares:

1. the accelerator (launch rule, logging, gradient accumulation, trackers);
2. the task's own option checks, then the data, read by the main process first (the others reuse its cache); a
   user's mistake found before training (`DataError`, `OptionError`: an unknown config field, a model that is not
   there, a dataset smaller than one batch per process) ends every process with one line
   (`launch.stop_all_on_user_error`);
3. the model, with the same initial weights on every rank (`set_seed(seed)`), compiled in place when asked; then
   per-rank seeds, so augmentation noise, Mixup and stochastic depth differ between ranks;
4. loaders ordered and augmented as pure functions of (seed, epoch, index), the fused AdamW, the step plan and the
   scheduler (registered for checkpointing);
5. the loop (`TrainingLoop`: checkpoints, exact resume, profiling), with an evaluation after every epoch but the
   last;
6. the model saved before its final evaluation, then `all_results.json` (one schema: `modeling_pvt.hub.results`)
   and the model card, and the upload.
"""

import dataclasses
import shlex
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed

from ..data.sampling import build_eval_dataloader, build_train_dataloader
from ..data.sources import DataError
from .launch import compile_model, compiled_graph_count, setup_training, start_tracking, stop_all_on_user_error
from .loop import TrainingLoop
from .optimization import build_lr_scheduler, build_optimizer, plan_steps
from .options import TrainingArguments
from .publishing import publish_run, save_and_evaluate

logger = get_logger(__name__)


@dataclasses.dataclass
class TaskDatasets:
    """The torch datasets of a run and how their samples make batches."""

    train: torch.utils.data.Dataset
    validation: torch.utils.data.Dataset
    train_collate: Callable
    eval_collate: Callable


class TrainingTask:
    """What a task supplies to `run_training`. `args` is the run's `TrainingArguments`; a task keeps its own model and
    data options as attributes. `data` is what `load_data` returns: it has a `name`, `results_fields()` (the dataset
    part of the results schema) and `skipped_images`."""

    project_name: str
    """The trackers' project name."""
    script: str
    """The script that trains this task, as cards and upload messages name it."""

    def __init__(self, args: TrainingArguments):
        self.args = args
        self.command = shlex.join([self.script, *sys.argv[1:]])
        """The command line a model card shows."""

    def check_options(self) -> None:
        """Checks of the task's options that need no data (e.g. `--config_overrides` fields), before the data is
        read; a mistake raises `OptionError`."""

    def accelerator_kwargs(self) -> dict:
        """Extra `Accelerator` arguments (e.g. DDP options)."""
        return {}

    def load_data(self):
        raise NotImplementedError

    def build_model(self, data, accelerator: Accelerator) -> tuple[torch.nn.Module, object]:
        """The model and the processor saved beside it."""
        raise NotImplementedError

    def module_to_compile(self, model: torch.nn.Module) -> torch.nn.Module:
        """The part of the model `--torch_compile` compiles (one graph)."""
        return model

    def build_datasets(self, data, processor) -> TaskDatasets:
        raise NotImplementedError

    def parameter_groups(self, model: torch.nn.Module) -> Iterable:
        """The optimizer's parameter groups; settings a group lacks come from `args`."""
        return model.parameters()

    def num_warmup_steps(self, steps_per_epoch: int) -> int:
        return round(self.args.warmup_epochs * steps_per_epoch)

    def build_loss(self, accelerator: Accelerator, model: torch.nn.Module, data) -> Callable[[dict], torch.Tensor]:
        """`compute_loss(batch)`, the loss of one training batch on the prepared `model`."""
        raise NotImplementedError

    def evaluate(self, accelerator: Accelerator, model: torch.nn.Module, dataloader, data) -> dict:
        """The scores of the prepared `model` on the validation loader (`eval_*` keys)."""
        raise NotImplementedError

    def describe_scores(self, scores: dict) -> str:
        """The scores a log line shows."""
        raise NotImplementedError

    def results_fields(self, data) -> dict:
        """What the task adds to the results file beside the shared fields."""
        return {}

    def model_card(self, data, results: dict) -> str:
        raise NotImplementedError

    def hyperparameters(self) -> dict:
        """Every option of the run, for the trackers."""
        return dataclasses.asdict(self.args)

    def prepare(self, accelerator: Accelerator, global_batch_size: int) -> None:
        """Settings that depend on the launch (e.g. a learning rate scaled with the global batch), before the
        optimizer is built."""


class EvaluationRecorder:
    """Evaluates the prepared model, logs the scores, and keeps every evaluation's scalars in `history`."""

    def __init__(self, task: TrainingTask, accelerator: Accelerator, model, dataloader, data, lr_scheduler, started):
        self.task, self.accelerator, self.model = task, accelerator, model
        self.dataloader, self.data, self.lr_scheduler = dataloader, data, lr_scheduler
        self.started = started
        """`time.perf_counter()` when the run started: `elapsed_s` counts from there."""
        self.history: list[dict] = []

    def __call__(self, epoch: int, train_loss: float, completed_steps: int) -> dict:
        scores = self.task.evaluate(self.accelerator, self.model, self.dataloader, self.data)
        scalars = {name: value for name, value in scores.items() if isinstance(value, (int, float))}
        elapsed = round(time.perf_counter() - self.started, 1)
        progress = {"epoch": epoch, "completed_steps": completed_steps, "elapsed_s": elapsed, "train_loss": train_loss}
        self.history.append(progress | scalars)
        logger.info(
            f"epoch {epoch}: train loss {train_loss:.4f}, {self.task.describe_scores(scores)} ({elapsed:.0f} s)"
        )
        if self.task.args.with_tracking:
            learning_rate = self.lr_scheduler.get_last_lr()[-1]
            self.accelerator.log(
                {"train_loss": train_loss, "learning_rate": learning_rate, **scalars, "epoch": epoch},
                step=completed_steps,
            )
        return scores


def build_dataloaders(task: TrainingTask, datasets: TaskDatasets) -> tuple:
    """The training and evaluation loaders of `datasets` (see `modeling_pvt.data.sampling`)."""
    args = task.args
    workers = args.dataloader_num_workers
    train = build_train_dataloader(
        datasets.train, args.per_device_train_batch_size, args.seed, datasets.train_collate, workers
    )
    validation = build_eval_dataloader(
        datasets.validation, args.per_device_eval_batch_size, datasets.eval_collate, workers
    )
    return train, validation


def build_task_datasets(task: TrainingTask, data, processor, num_processes: int) -> TaskDatasets:
    """The task's datasets; a training set smaller than one batch on every process (the training loader drops
    incomplete batches) makes no optimizer step: a `DataError`."""
    datasets = task.build_datasets(data, processor)
    batch = task.args.per_device_train_batch_size
    if len(datasets.train) < batch * num_processes:
        raise DataError(
            f"The training set has {len(datasets.train)} sample(s), fewer than one batch on every process "
            f"(--per_device_train_batch_size {batch} x {num_processes} process(es)): add data or lower the batch size."
        )
    return datasets


def build_schedule(task: TrainingTask, accelerator: Accelerator, optimizer, train_dataloader) -> tuple:
    """The step plan of the prepared loader (written back into the options) and the scheduler."""
    args = task.args
    plan = plan_steps(
        len(train_dataloader), args.gradient_accumulation_steps, args.num_train_epochs, args.max_train_steps
    )
    args.max_train_steps, args.num_train_epochs = plan.max_train_steps, plan.num_train_epochs
    warmup = task.num_warmup_steps(plan.steps_per_epoch)
    kwargs = args.scheduler_kwargs()
    lr_scheduler = build_lr_scheduler(
        accelerator, optimizer, args.lr_scheduler_type, warmup, plan.max_train_steps, **kwargs
    )
    return plan, lr_scheduler


def run_training(task: TrainingTask, *, end_process_group: bool = True) -> dict:
    """Train `task` as the module docstring says; the results written to `all_results.json`. With
    `end_process_group=False` the process group outlives the run, for a script that trains something else next."""
    start_time = time.perf_counter()
    args = task.args
    accelerator = setup_training(args, **task.accelerator_kwargs())
    set_seed(args.seed)  # the same initial weights on every rank
    stop_all_on_user_error(task.check_options)
    data = stop_all_on_user_error(task.load_data, main_process_first=True)
    model, processor = stop_all_on_user_error(lambda: task.build_model(data, accelerator))
    compile_model(task.module_to_compile(model), args.compile_backend)
    set_seed(args.seed, device_specific=True)

    datasets = stop_all_on_user_error(lambda: build_task_datasets(task, data, processor, accelerator.num_processes))
    train_dataloader, eval_dataloader = build_dataloaders(task, datasets)
    global_batch_size = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    task.prepare(accelerator, global_batch_size)
    groups = task.parameter_groups(model)
    optimizer = build_optimizer(groups, accelerator.device, lr=args.learning_rate, weight_decay=args.weight_decay)
    model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader
    )
    plan, lr_scheduler = build_schedule(task, accelerator, optimizer, train_dataloader)
    compute_loss = task.build_loss(accelerator, model, data)
    evaluate = EvaluationRecorder(task, accelerator, model, eval_dataloader, data, lr_scheduler, start_time)

    start_tracking(accelerator, args, task.project_name, task.hyperparameters())
    loop = TrainingLoop(accelerator, model, optimizer, lr_scheduler, train_dataloader, plan, processor, args)
    logger.info(
        f"{len(datasets.train)} training / {len(datasets.validation)} validation samples of {data.name}; "
        f"{accelerator.num_processes} process(es), global batch {global_batch_size}, {plan.max_train_steps} steps "
        f"over {plan.num_train_epochs} epochs, learning rate {args.learning_rate:g}"
    )
    outcome = loop.run(compute_loss, evaluate)
    final_evaluation = lambda: evaluate(outcome.epochs - 1, outcome.train_loss, outcome.completed_steps)  # noqa: E731
    digests, scores = save_and_evaluate(accelerator, model, processor, args.output_dir, final_evaluation)
    results = {
        **scores,
        **data.results_fields(),
        **outcome.results_fields(),
        "train_samples": len(datasets.train),
        "total_runtime": time.perf_counter() - start_time,
        "global_batch_size": global_batch_size,
        "device": str(accelerator.device.type),
        "mixed_precision": accelerator.mixed_precision,
        "torch_compile_graphs": compiled_graph_count(model),
        "skipped_unreadable_images": data.skipped_images,
        "weights_sha256_per_rank": digests,
        "eval_history": evaluate.history,
        **task.results_fields(data),
    }
    publish_run(accelerator, args, results, task.model_card(data, results), task.script)
    end_run(accelerator, end_process_group)
    return results


def end_run(accelerator: Accelerator, end_process_group: bool) -> None:
    """Close the trackers, and the process group unless something else trains next: nothing collective after it."""
    accelerator.wait_for_everyone()
    if end_process_group:
        accelerator.end_training()
        return
    for tracker in accelerator.trackers:
        tracker.finish()


def default_repo_id(args: TrainingArguments) -> str:
    """The repository a run's card names: `--hub_model_id`, else the output folder's name."""
    return args.hub_model_id or Path(args.output_dir).resolve().name
