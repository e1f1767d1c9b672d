"""Where a training loop's time goes: `LoopClock` (data waits, steady samples per second) and `--profile_steps`
(torch.profiler through accelerate: a Chrome trace, the operators by time, and a step's time by phase)."""

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProfileKwargs, find_batch_size

logger = get_logger(__name__)

PROFILE_DIR_NAME = "profile"


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
