"""Where a batch-1 PVT-small forward at 224x224 spends its time, in PyTorch (this package) and in ONNX Runtime
(this package's ONNX export), on the same threads and the same weights, timed in alternating rounds in one process.

    python benchmarks/probes/batch1_vs_onnxruntime.py > benchmarks/probes/batch1_vs_onnxruntime.log

Prints: the alternating-round timing (median ratio and its spread); the route the CPU acceleration kept for each
layer shape, with every route's median time in its measurement; PyTorch's profile by operator (self CPU time,
calls) and per stage; ONNX Runtime's own profile by node type; the share of PyTorch's wall time the operators do
not account for (Python and dispatch between kernels).
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict

import torch
from modeling_pvt.scripts.machine import describe_machine

from modeling_pvt import PvtConfig, PvtForImageClassification, cpu_acceleration
from modeling_pvt.hub.onnx_export import export_program
from modeling_pvt.runtime import configure_allocator


def alternating(functions: dict, rounds: int, calls: int) -> dict[str, list[float]]:
    """Seconds per call of each function, per round, the order reversed every round (after two warm-up calls)."""
    for function in functions.values():
        function(), function()
    seconds = {name: [] for name in functions}
    for index in range(rounds):
        for name in list(functions)[:: 1 if index % 2 == 0 else -1]:
            start = time.perf_counter()
            for _ in range(calls):
                functions[name]()
            seconds[name].append((time.perf_counter() - start) / calls)
    return seconds


def torch_profile(forward, calls: int) -> tuple[list[tuple[str, float, int]], float]:
    """Per operator: (name, self CPU ms per forward, calls per forward), and the wall ms per forward."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        start = time.perf_counter()
        for _ in range(calls):
            forward()
        wall = (time.perf_counter() - start) / calls * 1e3
    rows = [
        (event.key, event.self_cpu_time_total / 1e3 / calls, event.count // calls)
        for event in profile.key_averages()
        if event.self_cpu_time_total > 0
    ]
    return sorted(rows, key=lambda row: -row[1]), wall


def onnxruntime_profile(model_bytes: bytes, threads: int, inputs: dict, calls: int) -> dict[str, float]:
    """ONNX Runtime's node time per forward, by op type (ms), from its own profiler."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    session = onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    for _ in range(calls + 2):
        session.run(None, inputs)
    with open(session.end_profiling()) as file:
        events = json.load(file)
    by_type: dict[str, float] = defaultdict(float)
    runs = [event for event in events if event.get("name") == "model_run"]
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_type[event["args"]["op_name"]] += event["dur"] / 1e3
    total_runs = len(runs)
    return {
        "model_run_ms_median": statistics.median(event["dur"] / 1e3 for event in runs),
        **{name: ms / total_runs for name, ms in sorted(by_type.items(), key=lambda item: -item[1])},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    import onnxruntime

    torch.set_num_threads(args.threads)
    configure_allocator()
    torch.manual_seed(0)
    model = PvtForImageClassification(PvtConfig.from_preset("small")).eval()
    pixel_values = torch.randn(1, 3, 224, 224)
    model_bytes = export_program(model).model_proto.SerializeToString()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    session = onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    inputs = {"pixel_values": pixel_values.numpy()}

    def ours():
        with torch.inference_mode():
            return model(pixel_values)

    def reference():
        model.set_cpu_acceleration(False)
        try:
            with torch.inference_mode():
                return model(pixel_values)
        finally:
            model.set_cpu_acceleration(True)

    seconds = alternating(
        {"ours": ours, "reference": reference, "onnxruntime": lambda: session.run(None, inputs)},
        args.rounds,
        args.calls,
    )
    machine = describe_machine("cpu")
    print(json.dumps({"machine": machine, "onnxruntime": onnxruntime.__version__, "load": os.getloadavg()}))
    for name, times in seconds.items():
        print(f"{name}: median {statistics.median(times) * 1e3:.1f} ms per forward ({len(times)} rounds)")
    for name in ("ours", "reference"):
        ratios = [mine / theirs for mine, theirs in zip(seconds[name], seconds["onnxruntime"])]
        print(
            f"{name} / onnxruntime time: median {statistics.median(ratios):.2f} (rounds {min(ratios):.2f}-"
            f"{max(ratios):.2f})"
        )

    print("\nRoute kept per layer shape (hidden, heads, reduction, mlp, batch, log2 tokens) and route medians (ms):")
    for key, (route, medians) in cpu_acceleration.measured_routes.items():
        print(f"{key}: {route:20s}", " ".join(f"{name} {seconds * 1e3:.2f}" for name, seconds in medians.items()))

    rows, wall = torch_profile(ours, args.calls)
    kernel_ms = sum(ms for _, ms, _ in rows)
    print(f"\nPyTorch (ours), profiled: {wall:.1f} ms wall per forward, operators' self time {kernel_ms:.1f} ms")
    print(f"{'operator':45s} {'ms/forward':>10s} {'calls':>6s}")
    for name, ms, calls in rows[:25]:
        print(f"{name:45s} {ms:10.2f} {calls:6d}")
    print("\nONNX Runtime by node type (ms per forward):")
    for name, ms in onnxruntime_profile(model_bytes, args.threads, inputs, args.calls).items():
        print(f"{name:45s} {ms:10.2f}")


if __name__ == "__main__":
    main()
