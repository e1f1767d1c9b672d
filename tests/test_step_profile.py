"""`write_step_profile` on traces shaped like a GPU's, built from the profiler's own event class: no GPU needed.

A CUDA trace repeats the host's labels (`ProfilerStep#N`, the loop's phases) as device-side annotations that have no
host time, and holds kernels; some traces have no host step labels at all, or steps of zero length.
"""

import itertools
import json

import pytest
from accelerate import PartialState
from torch.autograd import DeviceType
from torch.autograd.profiler_util import EventList, FunctionEvent

from modeling_pvt.training.profiling import STEP_PHASES, write_step_profile

HOST, GPU = DeviceType.CPU, DeviceType.CUDA
_event_ids = itertools.count()


@pytest.fixture(autouse=True)
def _accelerate_state():
    """`write_step_profile` logs through accelerate, which needs its process state, as in a training run."""
    PartialState(cpu=True)


class _RecordedProfiler:
    """What `write_step_profile` reads of a finished `torch.profiler.profile`: events, their averages, the trace."""

    def __init__(self, events: list[FunctionEvent]):
        self._events = EventList(events, use_device="cuda")
        self._events._build_tree()  # the parent/child links the profiler makes after parsing its trace

    def events(self) -> EventList:
        return self._events

    def key_averages(self) -> EventList:
        return self._events.key_averages()

    def export_chrome_trace(self, path: str) -> None:
        with open(path, "w") as handle:
            json.dump({"traceEvents": [{"name": event.name} for event in self._events]}, handle)


def _event(name: str, start: float, end: float, device: DeviceType = HOST, annotation: bool = False) -> FunctionEvent:
    return FunctionEvent(
        id=next(_event_ids),
        name=name,
        thread=0,
        start_us=start,
        end_us=end,
        use_device="cuda",
        device_type=device,
        is_user_annotation=annotation,
        stack=[],
    )


def _gpu_step(step: int, start: float) -> list[FunctionEvent]:
    """One 1 ms optimizer step: its host label and phases, the same labels on the GPU's timeline, two kernels."""
    label = f"ProfilerStep#{step}"
    return [
        _event(label, start, start + 1000, annotation=True),
        _event("next batch", start, start + 100, annotation=True),
        _event("forward and loss", start + 100, start + 400, annotation=True),
        _event("backward", start + 400, start + 800, annotation=True),
        _event("optimizer step", start + 800, start + 950, annotation=True),
        _event("aten::mm", start + 150, start + 200),
        # The device's copies of the labels come after the host's, as in a CUDA trace: they must not replace them.
        _event(label, start + 50, start + 1050, GPU, annotation=True),
        _event("forward and loss", start + 150, start + 450, GPU, annotation=True),
        _event("backward", start + 450, start + 850, GPU, annotation=True),
        _event("sm90_gemm_kernel", start + 200, start + 500, GPU),
        _event("elementwise_kernel", start + 600, start + 800, GPU),
    ]


def test_a_gpu_trace_reports_host_phases_and_a_busy_fraction(tmp_path):
    events = _gpu_step(6, 0) + _gpu_step(7, 1000)
    summary = write_step_profile(_RecordedProfiler(events), tmp_path, process_index=0, steps=2)
    assert summary["step_ms"] == pytest.approx(1.0)
    assert summary["host_ms_per_step"] == pytest.approx(
        {"next batch": 0.1, "forward and loss": 0.3, "backward": 0.4, "optimizer step": 0.15}
    )
    assert list(summary["host_ms_per_step"]) == list(STEP_PHASES)
    assert summary["device_busy_ms_per_step"] == pytest.approx(0.5)
    assert summary["device_busy_fraction"] == pytest.approx(0.5)
    assert json.loads((tmp_path / "steps_rank0.json").read_text()) == summary
    assert "sm90_gemm_kernel" in (tmp_path / "operators_rank0.txt").read_text()


def test_steps_without_host_labels_take_the_wall_time_of_the_trace(tmp_path):
    events = [
        _event("aten::mm", 0, 300),
        _event("ProfilerStep#6", 100, 1200, GPU, annotation=True),
        _event("sm90_gemm_kernel", 200, 1200, GPU),
        _event("aten::add", 1300, 2000),
    ]
    summary = write_step_profile(_RecordedProfiler(events), tmp_path, process_index=1, steps=2)
    assert summary["step_ms"] == pytest.approx(1.0)  # 2 ms from the first event's start to the last one's end
    assert summary["host_ms_per_step"] == dict.fromkeys(STEP_PHASES, 0.0)
    assert summary["device_busy_fraction"] == pytest.approx(0.5)
    assert (tmp_path / "steps_rank1.json").is_file()


def test_zero_length_steps_give_no_busy_fraction_instead_of_a_division_by_zero(tmp_path):
    events = [
        _event("ProfilerStep#6", 500, 500, annotation=True),
        _event("ProfilerStep#6", 500, 500, GPU, annotation=True),
        _event("sm90_gemm_kernel", 500, 500, GPU),
    ]
    summary = write_step_profile(_RecordedProfiler(events), tmp_path, process_index=0, steps=1)
    assert summary["step_ms"] == 0.0
    assert summary["device_busy_ms_per_step"] == 0.0
    assert summary["device_busy_fraction"] is None


def test_a_cpu_trace_has_no_device_fields(tmp_path):
    events = [_event("ProfilerStep#6", 0, 2000, annotation=True), _event("backward", 100, 900, annotation=True)]
    summary = write_step_profile(_RecordedProfiler(events), tmp_path, process_index=0, steps=1)
    assert summary["step_ms"] == pytest.approx(2.0)
    assert summary["host_ms_per_step"]["backward"] == pytest.approx(0.8)
    assert "device_busy_ms_per_step" not in summary and "device_busy_fraction" not in summary
