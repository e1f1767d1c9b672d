"""What a benchmark's figures were measured on (`describe_machine`), for the benchmark scripts."""

import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path

# Environment variables that cap the instruction set PyTorch, MKL and oneDNN use (how an AVX2-only CPU is emulated).
ISA_LIMIT_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def describe_machine(device: str, code_paths: Sequence[str] = ("modeling_pvt",)) -> dict:
    """What a benchmark's figures were measured on: the CPU's model and the instruction set PyTorch uses on it (with
    any cap set through `ISA_LIMIT_VARIABLES`), CPUs and threads, versions, the GPU on `device` "cuda", and the git
    commit of this checkout, marked when `code_paths` (relative to it) have uncommitted changes."""
    import torch
    import transformers

    cpu_model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    description = {
        "cpu": cpu_model,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "isa_limits": {name: os.environ[name] for name in ISA_LIMIT_VARIABLES if name in os.environ},
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
    }
    if device == "cuda":
        description["gpu"] = torch.cuda.get_device_name()
    checkout = Path(__file__).resolve().parents[1]  # scripts/ sits in the checkout's root
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=checkout)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", *code_paths], capture_output=True, text=True, cwd=checkout
        ).stdout
    except OSError:  # no git
        return description
    if commit.returncode == 0:  # else not a checkout (an installed package)
        description["git_commit"] = commit.stdout.strip() + (" (with uncommitted changes)" if dirty.strip() else "")
    return description
