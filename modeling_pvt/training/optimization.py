"""The step plan, the optimizer and the learning-rate schedule of every training run.

The schedule counts optimizer steps; it is not prepared by accelerate (which would step it once per process) and is
saved with the checkpoints.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from transformers import get_scheduler


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
    The default runs a loop over the parameters on a CPU and a few multi-tensor kernels per update term on a GPU
    (`benchmarks/probes/adamw_step.py` compares them). It may be built before `accelerator.prepare` moves the model:
    the fused kernel needs the parameters on the device only when it steps."""
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
