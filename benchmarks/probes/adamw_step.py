"""What one AdamW step costs on this CPU in PyTorch's three implementations, for PVT-tiny's and PVT-small's parameters.

    python benchmarks/probes/adamw_step.py > benchmarks/probes/adamw_step.log
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 DNNL_MAX_CPU_ISA=AVX2 \
        python benchmarks/probes/adamw_step.py > benchmarks/probes/adamw_step.avx2.log    # the same CPU, AVX2 only

PyTorch's default on a CPU is a Python loop over the parameters (`foreach` is its default on GPUs only);
`training.build_optimizer` asks for the fused kernel. Each variant takes 3 untimed steps, then the median of 5 rounds
of 10 steps, on fixed random gradients.
"""

import statistics
import time
from pathlib import Path

import torch

from modeling_pvt import PvtConfig, PvtForImageClassification

VARIANTS = {"default (loop)": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def milliseconds_per_step(optimizer: torch.optim.Optimizer) -> float:
    for _ in range(3):
        optimizer.step()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(10):
            optimizer.step()
        rounds.append((time.perf_counter() - start) / 10 * 1e3)
    return statistics.median(rounds)


def main() -> None:
    cpu = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    print(
        f"torch {torch.__version__}, {cpu.split(':', 1)[1].strip()}, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"
    )
    for size in ("tiny", "small"):
        model = PvtForImageClassification(PvtConfig.from_preset(size, num_labels=1000))
        for parameter in model.parameters():
            parameter.grad = torch.randn_like(parameter) * 1e-3
        millions = sum(parameter.numel() for parameter in model.parameters()) / 1e6
        times = {
            name: milliseconds_per_step(torch.optim.AdamW(model.parameters(), lr=1e-4, **options))
            for name, options in VARIANTS.items()
        }
        fused = times["fused"]
        print(
            f"PVT-{size} ({millions:.1f} M parameters): "
            + ", ".join(f"{name} {value:.1f} ms ({value / fused:.1f}x fused)" for name, value in times.items())
        )


if __name__ == "__main__":
    main()
