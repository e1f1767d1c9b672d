"""The optimizer-step loop: epochs of accumulated steps with gradient clipping, checkpoints every N steps or every
epoch, bit-exact resume from any of them, and the weights trained so far kept when training fails."""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from .checkpoints import TrainingProgress, load_checkpoint, save_checkpoint, save_interrupted_model
from .launch import is_sharded
from .optimization import StepPlan
from .options import TrainingArguments
from .profiling import LoopClock, start_step_profiler

logger = get_logger(__name__)


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
        """What a results file says about the training run (`modeling_pvt.hub.results`): its length and its speed."""
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


class TrainingLoop:
    """Epochs of optimizer steps over a prepared model, optimizer and loader (see the module docstring).

    From `args`: `output_dir`, `checkpointing_steps` (every N optimizer steps, "epoch" or None),
    `checkpoints_total_limit`, `resume_from_checkpoint` ("latest", a folder or None, restored before the first step),
    `max_grad_norm` and `profile_steps`. The model of the last epoch is not evaluated by `run`: the caller saves it
    first (`save_and_evaluate`), so a failing evaluation loses nothing.
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
        args: TrainingArguments,
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
        self.max_grad_norm = args.max_grad_norm
        self.profile_steps = args.profile_steps
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

    def _start_profiler(self, clock: LoopClock, completed_steps: int) -> torch.profiler.profile | None:
        if not self.profile_steps:
            return None
        needed = LoopClock.warmup_steps + 1 + self.profile_steps
        remaining = self.plan.max_train_steps - completed_steps
        if remaining < needed:
            raise ValueError(
                f"--profile_steps {self.profile_steps} needs {needed} optimizer steps in this run (the warm-up's "
                f"{LoopClock.warmup_steps} and one more come first); it has {remaining}."
            )
        clock.warmup_steps += 1 + self.profile_steps  # profiled steps run slower: not the steady rate
        return start_step_profiler(self.accelerator, self.profile_steps, self.output_dir)

    def _train_on(self, batch: dict, compute_loss: Callable[[dict], torch.Tensor]) -> torch.Tensor:
        """Forward, backward and (when the accumulation is complete) clipping and the optimizer step; the loss."""
        accelerator = self.accelerator
        with accelerator.accumulate(self.model):
            with torch.profiler.record_function("forward and loss"):
                loss = compute_loss(batch)
            with torch.profiler.record_function("backward"):
                accelerator.backward(loss)
            with torch.profiler.record_function("optimizer step"):
                if accelerator.sync_gradients and self.max_grad_norm:
                    accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
        return loss.detach()

    def _keep_what_was_trained(self, epoch: int, completed_steps: int) -> None:
        if completed_steps > 0 and not is_sharded(self.accelerator):
            model = self.accelerator.unwrap_model(self.model)
            saved = save_interrupted_model(model, self.processor, self.output_dir)
            logger.error(
                f"Training failed at epoch {epoch}, step {completed_steps}; the weights trained so far "
                f"are in {saved} (the newest checkpoint, if any, resumes exactly).",
                main_process_only=False,
            )

    def run(
        self,
        compute_loss: Callable[[dict], torch.Tensor],
        on_epoch_end: Callable[[int, float, int], object] | None = None,
    ) -> TrainingOutcome:
        """Train to `plan.max_train_steps`. `compute_loss(batch)` returns the loss of one batch;
        `on_epoch_end(epoch, train_loss, completed_steps)` runs after every epoch but the last (evaluation, logging).
        """
        accelerator = self.accelerator
        if self.resume_from:
            self.start = load_checkpoint(accelerator, self.resume_from, self.output_dir)
        completed_steps = self.start.completed_steps
        clock = LoopClock()
        profiler = self._start_profiler(clock, completed_steps)
        bar = tqdm(
            total=self.plan.max_train_steps,
            initial=completed_steps,
            desc="Training",
            disable=not accelerator.is_local_main_process,
        )
        train_loss, epoch, started = float("nan"), self.start.epoch, time.perf_counter()
        try:
            for epoch in range(self.start.epoch, self.plan.num_train_epochs):
                self.model.train()
                loss_sum, loss_count = torch.zeros((), device=accelerator.device), 0
                for batch_index, batch in self._epoch_batches(epoch, clock):
                    loss_sum += self._train_on(batch, compute_loss)
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
            self._keep_what_was_trained(epoch, completed_steps)
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
