"""`scripts/benchmark_training.py --smoke`: the three measurements run and report what the loop measured."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from modeling_pvt.training.profiling import STEP_PHASES

REPO = Path(__file__).resolve().parents[1]


def test_training_benchmark_smoke_run_reports_every_row():
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark_training.py"), "--smoke", "--device", "cpu"],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads(completed.stdout)
    rows = report["rows"]
    assert set(rows) == {
        "data loader alone",
        "model step alone, eager, batch 4",
        "model step alone, eager, batch 8",
        "train.py end to end, eager",
    }
    assert all(row["images_per_second"] > 0 for row in rows.values())
    end_to_end = rows["train.py end to end, eager"]
    assert end_to_end["completed_steps"] == 24  # 3 epochs of 32 images in batches of 4
    assert 0.0 <= end_to_end["train_data_wait_fraction"] < 1.0
    assert end_to_end["torch_compile_graphs"] is None
    profile = end_to_end["profile"]
    assert profile["steps"] == 5 and set(profile["host_ms_per_step"]) == set(STEP_PHASES)
    assert 0 < sum(profile["host_ms_per_step"].values()) < profile["step_ms"]
    assert report["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
