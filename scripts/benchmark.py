#!/usr/bin/env python
"""Side-by-side benchmark: this package's PVT against stock transformers' PVT on the same weights.

    python scripts/benchmark.py                      # full CPU run (~5-10 min on 2 cores), writes benchmarks/*
    python scripts/benchmark.py --compile            # adds torch.compile rows
    python scripts/benchmark.py --smoke              # tiny model, tiny sizes: checks the machinery in seconds
    python scripts/benchmark.py --device cuda        # GPU: bf16, SDPA (flash) attention, CUDA memory counters
    python scripts/benchmark.py --detectors          # only detectors, PVT-small vs ResNet-50: DETR inference at
                                                     # 800x1333, DETR and Deformable DETR training steps at 800x1216

Every comparison builds the models from one state dict (our `conv_layer_norm_eps` set to `layer_norm_eps`, as
stock uses that epsilon everywhere), checks that they compute the same function, then times them interleaved in one
process (warm-up, then rounds that rotate which model goes first) and reports the median of the per-round ratios,
so that a slow spell of the machine hits both sides of a ratio. On a CPU three models are timed: stock, ours, and
ours with its CPU acceleration switched off (`set_cpu_acceleration(False)`, "straightforward"), so the
acceleration's own effect is a row too; where onnxruntime and onnxscript are installed (the `onnx` extra), a fourth
is our model exported to ONNX (`modeling_pvt.hub.onnx_export`, symbolic batch and size) and run by ONNX Runtime on the
same number of threads, in the eval and 800x1216 rows. ONNX Runtime picks its instruction set itself: the AVX2 caps
below do not reach it. The process follows the allocator settings we document
(`modeling_pvt.runtime.configure_allocator()`) for every model, so no ratio comes from the allocator alone. Rows:

* eval throughput at 224x224, batch 1 and 16, PVT-tiny and PVT-small;
* one 800x1216 image (a detection input) with PVT-small: latency in-process, and peak forward memory, each model in
  a fresh process of its own (resident-set high-water mark around a forward pass: the first, which includes the
  acceleration's one-time measurement, and the next);
* a training step (forward, backward, AdamW) at 224x224, batch 8;
* model FLOP utilisation (MFU): 2 x multiply-adds x images/s (x3 for a training step) / FLOP/s of a large matrix
  product timed in the same rounds of the same process (the faster of PyTorch's two CPU GEMMs, its BLAS and oneDNN,
  both recorded with the CPU model and its instruction set);
* optionally `torch.compile` of both models.

Results go to a JSON file and a PNG chart; a markdown table for the README is printed at the end.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from modeling_pvt.scripts.machine import describe_machine
from tqdm.auto import tqdm
from transformers.models.pvt import PvtConfig as StockPvtConfig
from transformers.models.pvt import PvtForImageClassification as StockPvtForImageClassification

from modeling_pvt import PvtConfig, PvtForImageClassification, cpu_acceleration
from modeling_pvt.cpu_acceleration import onednn_linear_available
from modeling_pvt.hub.model_facts import count_multiply_adds
from modeling_pvt.runtime import allocator_settings, configure_allocator
from modeling_pvt.tasks.detectors import DETECTORS

REPO_ROOT = Path(__file__).resolve().parents[1]

# The project's speed targets (CPU, ratios against stock in the same run); speed-ups are "at least", memory "at most".
TARGETS = {
    "no_row_below_stock": 1.0,
    "never_slower_than_straightforward": 1.0,
    "eval_224_b16": 1.3,
    "training_step_b8": 1.2,
    "detection_speedup": 2.0,
    "detection_memory_ratio": 0.3,
    "mfu_eval_224_b16": 0.75,
    "mfu_training_step": 0.55,
    "at_least_onnxruntime": 1.0,
}
# Largest |ours - stock| logit difference accepted as "the same function" (fp32 on CPU, fp32 parity pass on GPU).
PARITY_TOLERANCE = 1e-4

SMOKE_CONFIG = dict(
    hidden_sizes=[16, 32, 40, 64], num_attention_heads=[1, 2, 5, 8], depths=[1, 1, 2, 1], mlp_ratios=[2, 2, 2, 2]
)


@dataclass
class Plan:
    """What to run: the full benchmark or the smoke version of every row."""

    presets: tuple[str, ...]
    eval_batches: tuple[int, ...]
    image_size: int
    detection_size: tuple[int, int]
    detection_preset: str
    train_batch: int
    detector_train_batch: int
    mfu_preset: str
    mfu_batch: int
    warmup: int
    rounds: int
    min_measure_s: float
    gemm_size: int
    # Rounds during which other processes kept more than this fraction of the CPUs busy are repeated.
    max_foreign_load: float = 0.05

    @classmethod
    def build(cls, smoke: bool, device: str, rounds: int | None) -> Plan:
        if smoke:
            return cls(
                presets=("smoke",),
                eval_batches=(1, 2),
                image_size=64,
                detection_size=(96, 128),
                detection_preset="smoke",
                train_batch=2,
                detector_train_batch=1,
                mfu_preset="smoke",
                mfu_batch=2,
                warmup=1,
                rounds=rounds or 2,
                min_measure_s=0.0,
                gemm_size=256,
                max_foreign_load=1.0,  # the smoke run checks the machinery; its numbers mean nothing anyway
            )
        # A GPU only fills up with large batches: there the MFU is read at batch 256 and the training step runs at
        # batch 64 (at batch 8 both models wait on kernel launches, not on the GPU).
        gpu = device == "cuda"
        return cls(
            presets=("tiny", "small"),
            eval_batches=(1, 16, 256) if gpu else (1, 16),
            image_size=224,
            detection_size=(800, 1216),
            detection_preset="small",
            train_batch=64 if gpu else 8,
            detector_train_batch=2 if gpu else 1,
            mfu_preset="small",
            mfu_batch=256 if gpu else 16,
            warmup=2,
            rounds=rounds or 5,
            min_measure_s=0.5,
            gemm_size=8192 if gpu else 2048,
        )


# ---------------------------------------------------------------------------------------------- models and checks
def our_config(preset: str, image_size: int | tuple[int, int]) -> PvtConfig:
    """Our config for a preset, position embeddings stored at `image_size`, epsilons as stock's."""
    size = list(image_size) if isinstance(image_size, tuple) else image_size
    if preset == "smoke":
        config = PvtConfig(**SMOKE_CONFIG, image_size=size, num_labels=1000)
    else:
        config = PvtConfig.from_preset(preset, image_size=size, num_labels=1000)
    config.conv_layer_norm_eps = config.layer_norm_eps
    return config


def build_pair(
    preset: str, image_size: int | tuple[int, int], seed: int = 0
) -> tuple[PvtForImageClassification, StockPvtForImageClassification]:
    """Our model and stock transformers' on one set of weights.

    Stock PVT only runs at the grid its position embeddings were built for (its resize reshapes the stored grid to
    the new one); for a non-square size we hand it position embeddings of that grid, exactly as ours stores them.
    """
    torch.manual_seed(seed)
    config = our_config(preset, image_size)
    ours = PvtForImageClassification(config)
    fields = {key: value for key, value in config.to_dict().items() if key != "conv_layer_norm_eps"}
    fields["image_size"] = image_size if isinstance(image_size, int) else max(image_size)
    stock = StockPvtForImageClassification(StockPvtConfig(**fields))
    for stock_embeddings, our_embeddings in zip(stock.pvt.encoder.patch_embeddings, ours.pvt.encoder.patch_embeddings):
        stock_embeddings.position_embeddings = torch.nn.Parameter(torch.empty_like(our_embeddings.position_embeddings))
    stock.load_state_dict(ours.state_dict(), strict=True)
    return ours, stock


def build_models(preset: str, image_size: int | tuple[int, int], device: str) -> dict[str, torch.nn.Module]:
    """Stock, ours and (on a CPU) ours with the CPU acceleration off, on one set of weights."""
    ours, stock = build_pair(preset, image_size)
    models = {"stock": stock, "ours": ours}
    if device == "cpu":
        straightforward = PvtForImageClassification(ours.config)
        straightforward.load_state_dict(ours.state_dict())
        straightforward.set_cpu_acceleration(False)
        models["ours_straightforward"] = straightforward
    return models


def check_models(
    name: str,
    models: dict[str, torch.nn.Module],
    pixel_values: torch.Tensor,
    graphs: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> dict:
    """Every model, and every graph (a function from pixel values to logits, e.g. an ONNX Runtime session), computes
    stock's logits (float32, before any of them moves to the benchmark's dtype)."""
    differences = {
        model: logits_difference(models[model].eval(), models["stock"].eval(), pixel_values)
        for model in models
        if model != "stock"
    }
    with torch.inference_mode():
        stock_logits = models["stock"](pixel_values).logits
    for graph_name, graph in (graphs or {}).items():
        differences[graph_name] = (graph(pixel_values) - stock_logits).abs().max().item()
    return {**check_parity(name, max(differences.values())), "per_model": differences}


def onnxruntime_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnxscript"))


# per (preset, image size of the config): the ONNX Runtime session of our model's export (one export serves every
# batch and input size; models built for the same preset and size share their seed, so their weights)
_onnx_sessions: dict[tuple, object] = {}


def onnxruntime_session(model: PvtForImageClassification, key: tuple):
    """An ONNX Runtime session running `model`'s ONNX export on as many threads as PyTorch uses here."""
    if key not in _onnx_sessions:
        import onnxruntime

        from modeling_pvt.hub.onnx_export import export_program

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        model_bytes = export_program(model).model_proto.SerializeToString()
        _onnx_sessions[key] = onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return _onnx_sessions[key]


def onnxruntime_graphs(
    models: dict[str, torch.nn.Module], preset: str, image_size: int | tuple[int, int], device: str
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """`{"onnxruntime": pixel values -> logits}` on a CPU where onnxruntime is installed, else nothing."""
    if device != "cpu" or not onnxruntime_available():
        return {}
    session = onnxruntime_session(models["ours"], (preset, image_size))

    def logits(pixel_values: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(["logits"], {"pixel_values": pixel_values.numpy()})[0])

    return {"onnxruntime": logits}


def onnxruntime_description() -> dict:
    """ONNX Runtime's version and the instruction sets its CPU kernels (MLAS) can use here: it chooses them from the
    CPU itself, whatever PyTorch's, MKL's or oneDNN's caps say."""
    if not onnxruntime_available():
        return {}
    import onnxruntime

    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags = next((set(line.split()[2:]) for line in cpuinfo.open() if line.startswith("flags")), set())
    return {
        "onnxruntime": onnxruntime.__version__,
        "cpu_flags_avx": sorted(flag for flag in flags if flag.startswith(("avx", "fma", "amx"))),
    }


def graph_function(graph: Callable[[torch.Tensor], torch.Tensor], pixel_values: torch.Tensor) -> Callable[[], object]:
    return lambda: graph(pixel_values)


def logits_difference(ours: torch.nn.Module, stock: torch.nn.Module, pixel_values: torch.Tensor) -> float:
    with torch.inference_mode():
        return (ours(pixel_values).logits.float() - stock(pixel_values).logits.float()).abs().max().item()


def check_parity(name: str, difference: float, tolerance: float = PARITY_TOLERANCE) -> dict:
    if not difference <= tolerance:
        raise SystemExit(f"{name}: ours and stock disagree by {difference:.3g} (> {tolerance}); not timing them.")
    return {"case": name, "max_abs_logit_difference": difference, "tolerance": tolerance}


# --------------------------------------------------------------------------------------------------------- timing
def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def calibrate_repeats(function: Callable[[], object], device: str, min_measure_s: float) -> int:
    """How many calls make one measurement last at least `min_measure_s` (one call for anything slow)."""
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    elapsed = time.perf_counter() - start
    return max(1, round(min_measure_s / max(elapsed, 1e-6))) if elapsed < min_measure_s else 1


def _machine_busy_seconds() -> float:
    """CPU seconds all processes have spent busy since boot (Linux /proc/stat; 0 where it does not exist)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_busy_seconds() -> float:
    times = os.times()
    return times.user + times.system


@dataclass
class Timing:
    """Per-round seconds per call of each function (undisturbed rounds only, unless there were none) and how the
    rounds went: other processes' CPU use while each round ran, as a fraction of all the machine's CPUs."""

    times: dict[str, list[float]]
    rounds_run: int
    rounds_kept: int
    foreign_load: list[float]

    def summary(self) -> dict:
        return {
            "rounds_run": self.rounds_run,
            "rounds_kept": self.rounds_kept,
            "foreign_load_per_round": [round(load, 3) for load in self.foreign_load],
            "times_s": self.times,
        }


def time_interleaved(functions: dict[str, Callable[[], object]], plan: Plan, device: str, desc: str) -> Timing:
    """Seconds per call of each function, one measurement per round; the order rotates every round.

    On a shared machine another process's burst slows whichever model runs at that moment (with several OpenMP
    threads, many times over). A round during which other processes used more than `plan.max_foreign_load` of the
    machine's CPUs is run again (up to twice the planned number of rounds); the medians use the undisturbed
    rounds, or every round if there were none (the record says which).
    """
    for function in functions.values():
        for _ in range(plan.warmup):
            function()
    repeats = {name: calibrate_repeats(function, device, plan.min_measure_s) for name, function in functions.items()}
    names = list(functions)
    all_times: list[dict[str, float]] = []
    foreign_loads: list[float] = []
    kept: list[int] = []
    progress = tqdm(total=plan.rounds, desc=desc, leave=False)
    while len(kept) < plan.rounds and len(all_times) < 2 * plan.rounds:
        round_index = len(all_times)
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        round_times = {}
        machine_before, own_before, wall_before = _machine_busy_seconds(), _own_busy_seconds(), time.perf_counter()
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats[name]):
                functions[name]()
            synchronize(device)
            round_times[name] = (time.perf_counter() - start) / repeats[name]
        wall = time.perf_counter() - wall_before
        foreign = (_machine_busy_seconds() - machine_before) - (_own_busy_seconds() - own_before)
        foreign_loads.append(max(0.0, foreign) / (wall * (os.cpu_count() or 1)))
        all_times.append(round_times)
        if foreign_loads[-1] <= plan.max_foreign_load:
            kept.append(round_index)
            progress.update()
    progress.close()
    used = kept or list(range(len(all_times)))
    times = {name: [all_times[index][name] for index in used] for name in names}
    return Timing(times=times, rounds_run=len(all_times), rounds_kept=len(kept), foreign_load=foreign_loads)


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    return statistics.median(n / d for n, d in zip(numerators, denominators))


def gemm_functions(size: int, device: str, dtype: torch.dtype) -> tuple[dict[str, Callable[[], object]], float]:
    """Square matrix products and their FLOPs: the machine's practical peak for dense work.

    On a CPU PyTorch has two float32 GEMMs: its BLAS (`torch.mm`; MKL in the x86 wheels) and oneDNN (what
    `PvtLinear` uses). Both are timed; the faster one is the reference for the model FLOP utilisation, so that a
    model cannot look efficient by beating a slow reference.
    """
    left = torch.randn(size, size, device=device, dtype=dtype)
    right = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    functions = {"gemm torch.mm": lambda: torch.mm(left, right, out=out)}
    if device == "cpu" and onednn_linear_available():
        right_transposed = right.t().contiguous()
        functions["gemm oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(
            left, right_transposed, None, "none", [], ""
        )
    return functions, 2.0 * size**3


def gemm_rates(times: dict[str, list[float]], flops: float) -> dict[str, float]:
    return {name: flops / statistics.median(values) for name, values in times.items() if name.startswith("gemm")}


def eval_function(model: torch.nn.Module, pixel_values: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return model(pixel_values)

    return run


# ------------------------------------------------------------------------------------------------------ the rows
def ratios_to_stock(times: dict[str, list[float]]) -> dict:
    """Speed-ups (median of per-round ratios): every model against stock, and ours against its straightforward path;
    `per_round_range` holds the lowest and highest per-round ratio of each, the spread a reader weighs a median by."""
    pairs = {f"{model}_vs_stock": ("stock", model) for model in times if model != "stock" and "gemm" not in model}
    if "ours_straightforward" in times:
        pairs["ours_vs_straightforward"] = ("ours_straightforward", "ours")
    if "onnxruntime" in times:
        pairs["ours_vs_onnxruntime"] = ("onnxruntime", "ours")
    per_round = {name: [n / d for n, d in zip(times[slow], times[fast])] for name, (slow, fast) in pairs.items()}
    return {
        **{name: statistics.median(ratios) for name, ratios in per_round.items()},
        "per_round_range": {name: [min(ratios), max(ratios)] for name, ratios in per_round.items()},
    }


def run_eval_row(preset: str, batch: int, plan: Plan, device: str, dtype: torch.dtype) -> tuple[dict, dict]:
    models = build_models(preset, plan.image_size, device)
    graphs = onnxruntime_graphs(models, preset, plan.image_size, device)
    pixel_values = torch.randn(batch, 3, plan.image_size, plan.image_size)
    parity = check_models(f"eval {preset} b{batch}", models, pixel_values, graphs)
    models = {name: model.to(device=device, dtype=dtype) for name, model in models.items()}
    pixel_values = pixel_values.to(device=device, dtype=dtype)
    gemms, gemm_flops = gemm_functions(plan.gemm_size, device, dtype)
    functions = {name: eval_function(model, pixel_values) for name, model in models.items()}
    functions.update({name: graph_function(graph, pixel_values) for name, graph in graphs.items()})
    timing = time_interleaved({**functions, **gemms}, plan, device, f"eval {preset} b{batch}")
    times = timing.times
    rates = gemm_rates(times, gemm_flops)
    gemm_rate = max(rates.values())
    flops_per_image = 2.0 * count_multiply_adds(our_config(preset, plan.image_size), plan.image_size)
    row = {
        "case": f"eval {preset} {plan.image_size}x{plan.image_size} batch {batch}",
        "preset": preset,
        "batch": batch,
        "images_per_s": {model: batch / statistics.median(times[model]) for model in functions},
        "mfu": {model: flops_per_image * batch / statistics.median(times[model]) / gemm_rate for model in functions},
        **ratios_to_stock({model: times[model] for model in functions}),
        "gemm_flops_per_s": gemm_rate,
        "gemm_flops_per_s_by_kernel": rates,
        "timing": timing.summary(),
    }
    return row, parity


def run_detection_row(plan: Plan, device: str, dtype: torch.dtype) -> tuple[dict, dict]:
    models = build_models(plan.detection_preset, plan.detection_size, device)
    graphs = onnxruntime_graphs(models, plan.detection_preset, plan.detection_size, device)
    pixel_values = torch.randn(1, 3, *plan.detection_size)
    parity = check_models("detection size", models, pixel_values, graphs)
    models = {name: model.to(device=device, dtype=dtype) for name, model in models.items()}
    pixel_values = pixel_values.to(device=device, dtype=dtype)
    functions = {name: eval_function(model, pixel_values) for name, model in models.items()}
    functions.update({name: graph_function(graph, pixel_values) for name, graph in graphs.items()})
    timing = time_interleaved(functions, plan, device, "detection size")
    height, width = plan.detection_size
    row = {
        "case": f"eval {plan.detection_preset} {height}x{width} batch 1",
        "latency_s": {model: statistics.median(values) for model, values in timing.times.items()},
        **ratios_to_stock(timing.times),
        "timing": timing.summary(),
    }
    return row, parity


def training_step(model: torch.nn.Module, device: str, dtype: torch.dtype, **inputs) -> Callable[[], torch.Tensor]:
    """One training step on `inputs` as the training scripts take it: fp32 weights, autocast to `dtype` where it is
    not fp32 (Accelerate's mixed precision), backward, AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=dtype) if dtype != torch.float32 else nullcontext():
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        return loss

    return step


def run_training_row(plan: Plan, device: str, dtype: torch.dtype) -> tuple[dict, dict]:
    preset = plan.mfu_preset
    models = build_models(preset, plan.image_size, device)
    pixel_values = torch.randn(plan.train_batch, 3, plan.image_size, plan.image_size, device=device)
    labels = torch.randint(0, 1000, (plan.train_batch,), device=device)
    steps = {
        name: training_step(model.to(device).train(), device, dtype, pixel_values=pixel_values, labels=labels)
        for name, model in models.items()
    }
    first_losses = {name: step().item() for name, step in steps.items()}
    parity = check_parity(
        "training step (first loss)",
        max(abs(loss - first_losses["stock"]) for loss in first_losses.values()),
        PARITY_TOLERANCE if dtype == torch.float32 else 5e-2,
    )
    gemms, gemm_flops = gemm_functions(plan.gemm_size, device, dtype)
    timing = time_interleaved({**steps, **gemms}, plan, device, "training step")
    times = timing.times
    rates = gemm_rates(times, gemm_flops)
    # forward, then backward at twice the forward's products
    flops_per_step = 3 * 2.0 * count_multiply_adds(our_config(preset, plan.image_size), plan.image_size)
    flops_per_step *= plan.train_batch
    row = {
        "case": f"training step {preset} {plan.image_size}x{plan.image_size} batch {plan.train_batch}",
        "step_s": {model: statistics.median(times[model]) for model in models},
        "mfu": {model: flops_per_step / statistics.median(times[model]) / max(rates.values()) for model in models},
        **ratios_to_stock({model: times[model] for model in models}),
        "gemm_flops_per_s_by_kernel": rates,
        "timing": timing.summary(),
    }
    return row, parity


def run_compile_row(plan: Plan, device: str, dtype: torch.dtype) -> dict:
    preset, batch = plan.mfu_preset, plan.mfu_batch
    ours, stock = build_pair(preset, plan.image_size)
    ours, stock = (model.to(device=device, dtype=dtype).eval() for model in (ours, stock))
    pixel_values = torch.randn(batch, 3, plan.image_size, plan.image_size, device=device, dtype=dtype)
    compiled, compile_seconds = {}, {}
    for name, model in (("stock", stock), ("ours", ours)):
        compiled[name] = torch.compile(model)
        start = time.perf_counter()
        with torch.inference_mode():
            compiled[name](pixel_values)
        synchronize(device)
        compile_seconds[name] = time.perf_counter() - start
    difference = logits_difference(compiled["ours"], ours, pixel_values)
    timing = time_interleaved(
        {
            "stock eager": eval_function(stock, pixel_values),
            "stock compiled": eval_function(compiled["stock"], pixel_values),
            "ours eager": eval_function(ours, pixel_values),
            "ours compiled": eval_function(compiled["ours"], pixel_values),
        },
        plan,
        device,
        "torch.compile",
    )
    times = timing.times
    return {
        "case": f"eval {preset} {plan.image_size}x{plan.image_size} batch {batch}, torch.compile",
        "compile_seconds": compile_seconds,
        "ours_compiled_vs_eager_max_abs_logit_difference": difference,
        "images_per_s": {name: batch / statistics.median(values) for name, values in times.items()},
        "ours_compiled_vs_stock_compiled": median_ratio(times["stock compiled"], times["ours compiled"]),
        "ours_compiled_vs_stock_eager": median_ratio(times["stock eager"], times["ours compiled"]),
        "timing": timing.summary(),
    }


# -------------------------------------------------------------------------------- fresh-process rows (children)
def run_child(specs: list[dict], threads: int) -> list[dict]:
    """Run `specs` one after the other in a fresh Python process of this script; their results, in order."""
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "TRANSFORMERS_VERBOSITY": "error"}
    command = [sys.executable, str(Path(__file__).resolve()), "--threads", str(threads), "--child", json.dumps(specs)]
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=REPO_ROOT)
    if completed.returncode != 0:
        raise RuntimeError(f"benchmark child {specs} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run_children(specs: list[dict], threads: int, smoke: bool) -> list[dict]:
    """Each spec in a fresh process of its own; in smoke mode (machinery only, numbers meaningless) all of them in
    one process, to keep the check quick."""
    if smoke:
        return run_child(specs, threads)
    return [run_child([spec], threads)[0] for spec in specs]


def read_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_resident_memory() -> bool:
    """Restart the kernel's resident-set high-water mark (VmHWM) at the current resident size (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child_memory(spec: dict) -> dict:
    """Resident memory of this fresh process around two forward passes: the first (which includes the acceleration's
    one-time measurement) and the next. The allocator is left at its default here: with the documented settings
    freed blocks stay in the process, so the resident set would count memory that is free, not what is in use.

    Where Linux lets us restart the high-water mark (VmHWM) after the model is built, the peak above that resting
    state is measured directly. Elsewhere the process reports its lifetime peak (`ru_maxrss`) and the parent
    subtracts the peak of a twin process that builds the same model and skips the forward passes.
    """
    models = build_models(spec["preset"], tuple(spec["image_size"]), "cpu")
    model = models[spec["model"]].eval()
    del models
    pixel_values = torch.randn(1, 3, *spec["image_size"])
    peaks = {}
    for forward in ("first", "next"):
        if platform.libc_ver()[0] == "glibc":
            # give freed memory (the model build's scratch, the first forward's blocks) back to the kernel, so that
            # the baseline is what is alive and the next forward's peak is not hidden by blocks kept from the first
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        can_reset = reset_peak_resident_memory()
        before = read_status_kib("VmHWM") if can_reset else 0
        if spec["forward"]:
            with torch.inference_mode():
                model(pixel_values)
        if can_reset:
            peaks[forward] = (read_status_kib("VmHWM") - before) / 1024
    if can_reset:
        return {"method": "VmHWM", "peak_above_resting_mib": peaks, "resting_mib": before / 1024}
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"method": "ru_maxrss", "max_rss_mib": maxrss / (2**20 if sys.platform == "darwin" else 1024)}


def run_memory_rows(plan: Plan, threads: int, smoke: bool) -> dict:
    def spec(model: str, forward: bool) -> dict:
        return {
            "mode": "memory",
            "model": model,
            "preset": plan.detection_preset,
            "image_size": list(plan.detection_size),
            "forward": forward,
        }

    names = ("stock", "ours", "ours_straightforward")
    children = dict(zip(names, run_children([spec(name, True) for name in names], threads, smoke)))
    peaks = {}
    for model, child in list(children.items()):
        if child["method"] == "VmHWM":
            peaks[model] = child["peak_above_resting_mib"]
        else:  # no way to restart the high-water mark: difference with a twin process that skips the forward
            (twin,) = run_children([spec(model, False)], threads, smoke)
            children[f"{model} without forward"] = twin
            peak = child["max_rss_mib"] - twin["max_rss_mib"]
            peaks[model] = {"first": peak, "next": peak}
    return {
        "case": f"peak forward memory {plan.detection_preset} {plan.detection_size[0]}x{plan.detection_size[1]}",
        "method": (
            "fresh process per model, default allocator; resident-set high-water mark restarted after "
            "building the model and after the first forward (or, where that is impossible, lifetime peak minus a "
            "twin process without the forwards), inference forwards"
        ),
        "peak_mib": peaks,
        "ratio_first_forward": peaks["ours"]["first"] / peaks["stock"]["first"],
        "ratio": peaks["ours"]["next"] / peaks["stock"]["next"],
        "children": children,
    }


def cuda_peak_mib(function: Callable[[], object]) -> float:
    """MiB the CUDA allocator held at the peak of one call of `function` (a forward, a training step), above what it
    held before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resting = torch.cuda.memory_allocated()
    function()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - resting) / 2**20


def run_gpu_memory_row(plan: Plan, dtype: torch.dtype) -> dict:
    """On a GPU the CUDA allocator's counters give the forward's peak directly, in this process."""
    ours, stock = build_pair(plan.detection_preset, plan.detection_size)
    pixel_values = torch.randn(1, 3, *plan.detection_size, device="cuda", dtype=dtype)
    peaks = {}
    for name, model in (("stock", stock), ("ours", ours)):
        model.to(device="cuda", dtype=dtype).eval()
        peak = cuda_peak_mib(eval_function(model, pixel_values))
        peaks[name] = {"first": peak, "next": peak}
        model.cpu()
    return {
        "case": f"peak forward memory {plan.detection_preset} {plan.detection_size[0]}x{plan.detection_size[1]}",
        "method": "torch.cuda.max_memory_allocated above the resting allocation",
        "peak_mib": peaks,
        "ratio": peaks["ours"]["next"] / peaks["stock"]["next"],
    }


# ------------------------------------------------------------------------------- detector row (--detectors)
DETECTOR_BACKBONES = ("pvt_small", "resnet50")
TRAINED_DETECTORS = ("detr", "deformable_detr")
COCO_LABELS = 91


def build_detector_model(detector: str, backbone: str) -> torch.nn.Module:
    """Transformers' own DETR or Deformable DETR (COCO's 91 labels) on PVT-small or on transformers' ResNet-50, built
    the same way: `use_timm_backbone=False`, random weights, the backbone through `AutoBackbone`. DETR reads the last
    stage; Deformable DETR the last three (strides 8, 16, 32) and adds a fourth level by a strided convolution, as
    the detection script's detectors do (`DETECTORS`)."""
    from transformers import (
        DeformableDetrConfig,
        DeformableDetrForObjectDetection,
        DetrConfig,
        DetrForObjectDetection,
        ResNetConfig,
    )

    stages = list(DETECTORS[detector].backbone_stages)
    if backbone == "pvt_small":
        backbone_config = PvtConfig.from_preset("small", out_features=stages)
    else:
        backbone_config = ResNetConfig(out_features=stages)  # the defaults are ResNet-50
    settings = {
        "backbone_config": backbone_config,
        "use_timm_backbone": False,
        "use_pretrained_backbone": False,
        "backbone": None,
        "num_labels": COCO_LABELS,
    }
    if detector == "detr":
        return DetrForObjectDetection(DetrConfig(**settings))
    return DeformableDetrForObjectDetection(DeformableDetrConfig(**settings, num_feature_levels=len(stages) + 1))


def detector_size(plan: Plan) -> tuple[int, int]:
    return (96, 160) if plan.presets == ("smoke",) else (800, 1333)


def detector_child_memory(spec: dict) -> dict:
    """Peak resident memory of DETR forwards above the built model, in a fresh process (as `child_memory`), with
    glibc's default allocator: the documented settings keep freed blocks in the process, so a second forward would
    reuse the first one's memory and show no peak at all. The second forward is the steady state (the first also
    holds PVT's one-time CPU route measurement)."""
    model = build_detector_model("detr", spec["backbone"]).eval()
    pixel_values = torch.randn(1, 3, *spec["image_size"])
    if platform.libc_ver()[0] == "glibc":
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if not reset_peak_resident_memory():
        return {"method": "unavailable"}
    peaks = {}
    for forward in ("first", "next"):
        before = read_status_kib("VmHWM")
        with torch.inference_mode():
            model(pixel_values)
        peaks[forward] = (read_status_kib("VmHWM") - before) / 1024
        reset_peak_resident_memory()
    return {"method": "VmHWM", "peak_above_resting_mib": peaks}


def run_detector_row(plan: Plan, device: str, dtype: torch.dtype, threads: int) -> dict:
    """The paper's detection comparison at detection size: DETR + PVT-small against DETR + ResNet-50, one image,
    inference: latency timed interleaved in this process, and peak forward memory (fresh processes on a CPU, the
    CUDA allocator's counters on a GPU)."""
    size = detector_size(plan)
    models = {name: build_detector_model("detr", name).eval().to(device, dtype) for name in DETECTOR_BACKBONES}
    pixel_values = torch.randn(1, 3, *size, device=device, dtype=dtype)
    functions = {name: eval_function(model, pixel_values) for name, model in models.items()}
    timing = time_interleaved(functions, plan, device, "DETR: PVT-small vs ResNet-50")
    if device == "cuda":
        peaks = {}
        for name, model in models.items():
            peaks[name] = cuda_peak_mib(eval_function(model, pixel_values))
        memory = {"method": "torch.cuda.max_memory_allocated above the resting allocation", "peak_mib": peaks}
    else:
        specs = [{"mode": "detector_memory", "backbone": name, "image_size": list(size)} for name in models]
        children = dict(zip(models, run_children(specs, threads, plan.presets == ("smoke",))))
        memory = {
            "method": "fresh process per model, default glibc allocator, resident-set high-water mark above the built "
            "model during the second forward",
            "peak_mib": {name: child["peak_above_resting_mib"]["next"] for name, child in children.items()},
            "children": children,
        }
    latency = {name: statistics.median(values) for name, values in timing.times.items()}
    return {
        "case": f"DETR eval {size[0]}x{size[1]} batch 1",
        "parameters_millions": {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in models.items()},
        "latency_s": latency,
        "pvt_small_vs_resnet50_speedup": median_ratio(timing.times["resnet50"], timing.times["pvt_small"]),
        "memory": memory,
        "memory_ratio_pvt_small_to_resnet50": memory["peak_mib"]["pvt_small"] / memory["peak_mib"]["resnet50"],
        "timing": timing.summary(),
    }


def random_detection_labels(batch: int, device: str, generator: torch.Generator) -> list[dict]:
    """Five boxes per image (normalised centre x, centre y, width, height, as the DETR family's loss takes them) of
    random COCO classes."""
    labels = []
    for _ in range(batch):
        centres = torch.rand(5, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(5, 2, generator=generator) * 0.3 + 0.05
        labels.append(
            {
                "class_labels": torch.randint(0, COCO_LABELS, (5,), generator=generator).to(device),
                "boxes": torch.cat([centres, sizes], dim=1).to(device),
            }
        )
    return labels


def run_detector_training_row(detector: str, plan: Plan, device: str, dtype: torch.dtype) -> dict:
    """A training step of `detector` on PVT-small against the same on ResNet-50: the same random images and boxes,
    timed interleaved in this process."""
    height, width = plan.detection_size
    batch = plan.detector_train_batch
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(batch, 3, height, width, generator=generator).to(device)
    labels = random_detection_labels(batch, device, generator)
    models = {name: build_detector_model(detector, name).to(device).train() for name in DETECTOR_BACKBONES}
    steps = {
        name: training_step(model, device, dtype, pixel_values=pixel_values, labels=labels)
        for name, model in models.items()
    }
    first_losses = {name: step().item() for name, step in steps.items()}
    if not all(map(math.isfinite, first_losses.values())):
        raise RuntimeError(f"{detector}: a training step's loss is not finite: {first_losses}")
    peaks = {name: cuda_peak_mib(step) for name, step in steps.items()} if device == "cuda" else None
    timing = time_interleaved(steps, plan, device, f"{detector} training step: PVT-small vs ResNet-50")
    step_s = {name: statistics.median(values) for name, values in timing.times.items()}
    row = {
        "case": f"{detector} training step {height}x{width} batch {batch}, {str(dtype).removeprefix('torch.')}",
        "parameters_millions": {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in models.items()},
        "first_loss": first_losses,
        "step_s": step_s,
        "images_per_s": {name: batch / seconds for name, seconds in step_s.items()},
        "pvt_small_vs_resnet50_speedup": median_ratio(timing.times["resnet50"], timing.times["pvt_small"]),
        "timing": timing.summary(),
    }
    if peaks is not None:
        row["cuda_peak_mib"] = peaks
    return row


def run_detector_benchmark(args: argparse.Namespace, device: str, dtype: torch.dtype, plan: Plan) -> dict:
    """`--detectors`: only the detector rows (DETR inference; DETR and Deformable DETR training steps), written to
    benchmarks/detection_<device>.json after each row, so that a run cut off keeps the rows it finished."""
    output = args.output or REPO_ROOT / "benchmarks" / f"detection_{device}{'_smoke' if args.smoke else ''}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = {
        "machine": describe_machine(device, ("modeling_pvt", "scripts/benchmark.py")),
        "load_average": {"start": [round(value, 2) for value in os.getloadavg()]},
        "dtype": str(dtype),
    }

    def save(row: dict, summary: tuple[str, ...]) -> None:
        results["load_average"]["end"] = [round(value, 2) for value in os.getloadavg()]
        results["elapsed_s"] = time.perf_counter() - started
        output.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps({name: row[name] for name in summary}), flush=True)

    results["detector"] = run_detector_row(plan, device, dtype, args.threads)
    save(results["detector"], ("case", "latency_s", "memory"))
    results["detector_training"] = []
    for detector in TRAINED_DETECTORS:
        results["detector_training"].append(run_detector_training_row(detector, plan, device, dtype))
        save(results["detector_training"][-1], ("case", "step_s", "pvt_small_vs_resnet50_speedup"))
    print(f"Wrote {output} in {results['elapsed_s']:.0f} s.")
    return results


# ------------------------------------------------------------------------------------------------------ reporting
def speed_rows(results: dict) -> list[dict]:
    return [*results["eval"], results["detection"], results["training"]]


def evaluate_targets(results: dict) -> list[dict]:
    """Each speed target with its measured figure (CPU targets; on a GPU they are reported, not judged).

    The targets are for PVT-small at 224x224 (batch 16 eval, batch 8 training) and one 800x1216 image; a
    smoke run judges its tiny stand-ins the same way, which only checks the bookkeeping."""
    plan = results["plan"]
    size = f"{plan['image_size']}x{plan['image_size']}"
    detection = "x".join(str(side) for side in plan["detection_size"])
    mfu_row = next(
        row for row in results["eval"] if row["preset"] == plan["mfu_preset"] and row["batch"] == plan["mfu_batch"]
    )
    rows = speed_rows(results)
    targets = []

    def add(name: str, measured: float, what: str) -> None:
        goal = TARGETS[name]
        met = measured <= goal if name.endswith("memory_ratio") else measured >= goal
        targets.append({"target": name, "what": what, "goal": goal, "measured": measured, "met": met})

    add("no_row_below_stock", min(row["ours_vs_stock"] for row in rows), "slowest row, ours vs stock")
    add(
        "never_slower_than_straightforward",
        min(row["ours_vs_straightforward"] for row in rows),
        "slowest row, ours vs ours with the acceleration off",
    )
    add("eval_224_b16", mfu_row["ours_vs_stock"], f"{size} batch {plan['mfu_batch']} eval speed-up")
    add(
        "training_step_b8",
        results["training"]["ours_vs_stock"],
        f"training step speed-up, {size} batch {plan['train_batch']}",
    )
    add("detection_speedup", results["detection"]["ours_vs_stock"], f"{detection} one image speed-up")
    add("detection_memory_ratio", results["memory"]["ratio"], f"{detection} peak forward memory, ours/stock")
    add("mfu_eval_224_b16", mfu_row["mfu"]["ours"], f"MFU, {size} batch {plan['mfu_batch']} eval")
    add("mfu_training_step", results["training"]["mfu"]["ours"], f"MFU, training step batch {plan['train_batch']}")
    onnx_rows = [row for row in rows if "ours_vs_onnxruntime" in row]
    if onnx_rows:
        slowest = min(onnx_rows, key=lambda row: row["ours_vs_onnxruntime"])
        add("at_least_onnxruntime", slowest["ours_vs_onnxruntime"], f"slowest row vs ONNX Runtime ({slowest['case']})")
    return targets


def machine_label(machine: dict) -> str:
    if machine["device"] == "cuda":
        return f"{machine['gpu']} (host: {machine['cpu']}, {machine['logical_cpus']} logical CPUs)"
    limits = (
        " with " + ", ".join(f"{k}={v}" for k, v in machine["isa_limits"].items()) if machine["isa_limits"] else ""
    )
    return (
        f"{machine['cpu']}, PyTorch CPU capability {machine['cpu_capability']}{limits} "
        f"({machine['logical_cpus']} logical CPUs, {machine['torch_threads']} threads)"
    )


def markdown_table(results: dict) -> str:
    machine = results["machine"]
    timings = [row["timing"] for row in speed_rows(results)]
    kept, run = sum(timing["rounds_kept"] for timing in timings), sum(timing["rounds_run"] for timing in timings)
    rates = ", ".join(
        f"{name.removeprefix('gemm ')} {rate / 1e9:.0f} GFLOP/s" for name, rate in results["gemm_flops_per_s"].items()
    )
    size = results["plan"]["gemm_size"]
    three = "ours_straightforward" in results["training"]["step_s"]
    onnx = any("onnxruntime" in row["images_per_s"] for row in results["eval"])
    lines = [
        f"Measured {results['finished']} on {machine_label(machine)}, torch {machine['torch']}, transformers "
        f"{machine['transformers']}, {results['dtype'].removeprefix('torch.')}, allocator settings as documented for "
        f"every timed model (memory: default allocator, see the JSON); load average "
        f"{results['load_average']['start']} at start, {results['load_average']['end']} at end. "
        f"{size}x{size} GEMMs in the same rounds: {rates}; MFU is against the faster. Speed-up = median of "
        f"per-round ratios (lowest-highest round in brackets); {kept} of {run} timed rounds kept (rounds during "
        f"which other processes used more than {results['plan']['max_foreign_load']:.0%} of the CPUs were repeated).",
        "",
        "| Case | stock transformers | modeling_pvt | "
        + ("ours, acceleration off | " if three else "")
        + ("ONNX Runtime (our export) | " if onnx else "")
        + "ours vs stock |"
        + (" ours vs acceleration off |" if three else "")
        + (" ours vs ONNX Runtime |" if onnx else ""),
        "|---|---:|---:|" + "---:|" * (1 + 2 * three + 2 * onnx),
    ]

    def ratio(row: dict, name: str) -> str:
        low, high = row["per_round_range"][name]
        return f"{row[name]:.2f}x ({low:.2f}-{high:.2f})"

    def line(case: str, values: list[str], row: dict) -> None:
        ratios = [ratio(row, "ours_vs_stock")]
        if three:
            ratios.append(ratio(row, "ours_vs_straightforward"))
        if onnx:
            ratios.append(ratio(row, "ours_vs_onnxruntime") if "ours_vs_onnxruntime" in row else "")
        lines.append(f"| {case} | " + " | ".join(values + ratios) + " |")

    models = ("stock", "ours") + ("ours_straightforward",) * three + ("onnxruntime",) * onnx
    for row in results["eval"]:
        line(
            row["case"],
            [
                f"{row['images_per_s'][m]:.1f} img/s (MFU {row['mfu'][m]:.0%})" if m in row["mfu"] else ""
                for m in models
            ],
            row,
        )
    detection = results["detection"]
    latency = detection["latency_s"]
    line(detection["case"], [f"{latency[m] * 1000:.0f} ms" if m in latency else "" for m in models], detection)
    memory = results["memory"]
    peaks = memory["peak_mib"]
    lines.append(
        f"| {memory['case']} (first forward / next) | "
        + " | ".join(f"{peaks[m]['first']:.0f} / {peaks[m]['next']:.0f} MiB" if m in peaks else "" for m in models)
        + f" | {memory['ratio']:.2f}x memory |"
        + " |" * (three + onnx)
    )
    training = results["training"]
    line(
        training["case"],
        [
            f"{training['step_s'][m] * 1000:.0f} ms (MFU {training['mfu'][m]:.0%})" if m in training["step_s"] else ""
            for m in models
        ],
        training,
    )
    if results.get("compile"):
        compiled = results["compile"]
        images = compiled["images_per_s"]
        lines += [
            "",
            f"torch.compile, {compiled['case']}: stock {images['stock compiled']:.1f} img/s, ours "
            f"{images['ours compiled']:.1f} img/s ({compiled['ours_compiled_vs_stock_compiled']:.2f}x).",
        ]
    return "\n".join(lines + targets_table(results["targets"]))


def targets_table(targets: list[dict]) -> list[str]:
    """The speed targets as Markdown table lines (none when there are no targets)."""
    lines = ["", "| Target | goal | measured | met |", "|---|---:|---:|:---:|"] if targets else []
    for target in targets:
        if target["target"].startswith("mfu"):
            goal, measured = f">= {target['goal']:.0%}", f"{target['measured']:.1%}"
        elif target["target"].endswith("memory_ratio"):
            goal, measured = f"<= {target['goal']:.2f}x", f"{target['measured']:.2f}x"
        else:
            goal, measured = f">= {target['goal']:.2f}x", f"{target['measured']:.2f}x"
        lines.append(f"| {target['what']} | {goal} | {measured} | {'yes' if target['met'] else 'no'} |")
    return lines


def write_chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = speed_rows(results)
    labels = [f"{row['preset']} b{row['batch']}" for row in results["eval"]]
    labels += ["x".join(str(side) for side in results["plan"]["detection_size"]), "train"]
    series = [("ours vs stock", "ours_vs_stock", "#4C72B0")]
    if "ours_vs_straightforward" in rows[0]:
        series += [
            ("acceleration off vs stock", "ours_straightforward_vs_stock", "#DD8452"),
            ("ours vs acceleration off", "ours_vs_straightforward", "#55A868"),
        ]
    if any("ours_vs_onnxruntime" in row for row in rows):
        series.append(("ours vs ONNX Runtime", "ours_vs_onnxruntime", "#C44E52"))
    figure, (speed_axis, mfu_axis) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1.3]})
    width = 0.8 / len(series)
    for index, (label, key, colour) in enumerate(series):
        positions = [position + (index - (len(series) - 1) / 2) * width for position in range(len(rows))]
        bars = speed_axis.bar(positions, [row.get(key, 0.0) for row in rows], width, label=label, color=colour)
        speed_axis.bar_label(bars, fmt="%.2f", fontsize=6)
    speed_axis.axhline(1.0, color="black", linewidth=0.8)
    speed_axis.set_xticks(range(len(rows)), labels, fontsize=8)
    speed_axis.set_ylabel("speed ratio (x)")
    speed_axis.legend(fontsize=7)
    speed_axis.set_title("modeling_pvt vs transformers' PVT (and ONNX Runtime), same weights, same allocator settings")

    mfu_row = next(row for row in results["eval"] if row["batch"] == results["plan"]["mfu_batch"])
    mfu_labels, mfu_values = [], []
    for name, row in (("eval", mfu_row), ("train", results["training"])):
        for model, value in row["mfu"].items():
            mfu_labels.append(f"{name} {model.replace('ours_straightforward', 'accel. off')}")
            mfu_values.append(value)
    bars = mfu_axis.bar(range(len(mfu_labels)), [100 * value for value in mfu_values], color="#8172B2")
    mfu_axis.set_xticks(range(len(mfu_labels)), mfu_labels, fontsize=7, rotation=30)
    mfu_axis.set_ylabel("% of same-run GEMM FLOP/s")
    mfu_axis.bar_label(bars, fmt="%.0f%%", fontsize=7)
    mfu_axis.set_title(f"model FLOP utilisation, {mfu_row['preset']}")
    machine = results["machine"]
    figure.suptitle(f"{machine_label(machine)}, torch {machine['torch']}", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--smoke", action="store_true", help="tiny model and sizes: runs in seconds")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows (minutes of compiling)")
    parser.add_argument("--rounds", type=int, help="timed rounds per in-process comparison")
    parser.add_argument("--presets", nargs="+", choices=("tiny", "small"), help="eval presets (default: tiny small)")
    parser.add_argument("--output", type=Path, help="JSON results (default benchmarks/results_<device>.json)")
    parser.add_argument("--chart", type=Path, help="PNG chart (default next to the JSON)")
    parser.add_argument(
        "--detectors",
        action="store_true",
        help="only detectors, PVT-small vs ResNet-50: DETR inference at 800x1333, DETR and Deformable DETR training "
        "steps at 800x1216",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:
        torch.set_num_threads(args.threads)
        specs = json.loads(args.child)
        print(
            json.dumps(
                [detector_child_memory(s) if s["mode"] == "detector_memory" else child_memory(s) for s in specs]
            )
        )
        return {}

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here.")
    torch.set_num_threads(args.threads)
    configure_allocator()  # the documented settings, for every model alike
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    plan = Plan.build(args.smoke, device, args.rounds)
    if args.presets and not args.smoke:
        plan.presets = tuple(args.presets)
    output = args.output or REPO_ROOT / "benchmarks" / f"results_{device}{'_smoke' if args.smoke else ''}.json"
    chart = args.chart or output.with_suffix(".png")
    if args.detectors:
        return run_detector_benchmark(args, device, dtype, plan)

    results: dict = {
        "machine": describe_machine(device, ("modeling_pvt", "scripts/benchmark.py")) | onnxruntime_description(),
        "load_average": {"start": [round(value, 2) for value in os.getloadavg()]},
        "allocator": allocator_settings(),
        "plan": plan.__dict__,
        "dtype": str(dtype),
        "parity": [],
        "eval": [],
    }
    started = time.perf_counter()
    cases = [(preset, batch) for preset in plan.presets for batch in plan.eval_batches]
    for preset, batch in tqdm(cases, desc="eval throughput"):
        row, parity = run_eval_row(preset, batch, plan, device, dtype)
        results["eval"].append(row)
        results["parity"].append(parity)
    mfu_row = next(
        row for row in results["eval"] if row["preset"] == plan.mfu_preset and row["batch"] == plan.mfu_batch
    )
    results["gemm_flops_per_s"] = mfu_row["gemm_flops_per_s_by_kernel"]
    results["detection"], parity = run_detection_row(plan, device, dtype)
    results["parity"].append(parity)
    if device == "cuda":
        results["memory"] = run_gpu_memory_row(plan, dtype)
    else:
        results["memory"] = run_memory_rows(plan, args.threads, args.smoke)
    results["training"], parity = run_training_row(plan, device, dtype)
    results["parity"].append(parity)
    if args.compile:
        results["compile"] = run_compile_row(plan, device, dtype)
    if device == "cpu":
        results["cpu_acceleration_routes"] = [
            {"layer": list(key), "route": route, "seconds": seconds}
            for key, (route, seconds) in cpu_acceleration.measured_routes.items()
        ]
    results["targets"] = evaluate_targets(results) if device == "cpu" else []
    results["load_average"]["end"] = [round(value, 2) for value in os.getloadavg()]
    results["elapsed_s"] = time.perf_counter() - started
    results["finished"] = time.strftime("%Y-%m-%d")

    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    write_chart(results, chart)
    print(markdown_table(results))
    print(f"\nWrote {output} and {chart} in {results['elapsed_s']:.0f} s.")
    return results


if __name__ == "__main__":
    main()
