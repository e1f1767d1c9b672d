"""Running the scripts as users do, in subprocesses: `accelerate launch --multi_gpu --num_processes N` makes N gloo
processes on a CPU host; the test Hub server (`hub_server.py`, the `hub` fixture of conftest.py) can stand in for
huggingface.co. `load_script` imports a script instead, to call its functions in the test's process."""

import importlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import HubServer

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
SCRIPT_TIMEOUT_S = 300
HUB_TOKEN = "hf_test_training_token"


COMPILE_EAGER = ("--torch_compile", "--torch_compile_backend", "eager")
"""Options that compile the model and check the capture without generating code (fast)."""


def load_script(name: str):
    """`scripts/<name>.py` as the package ships it (`modeling_pvt.scripts.<name>`, the console entry points' module),
    executed afresh."""
    return importlib.reload(importlib.import_module(f"modeling_pvt.scripts.{name}"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def environment(hub: HubServer | None = None, hf_home: Path | None = None) -> dict[str, str]:
    """Offline, one thread per process: on a busy 2-core host, a second OpenMP thread that waits for a core slows
    every operation many times over. With `hub`, the in-process test Hub (it speaks LFS, not Xet) and its token."""
    variables = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    if hub is not None:
        variables.update(
            HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_TOKEN=HUB_TOKEN, HF_HOME=str(hf_home)
        )
    return variables


def launch_command(script: str, *args: str, processes: int = 2) -> list[str]:
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    if processes > 1:
        # An explicit free port: other test runs on the machine may hold the default 29500.
        launcher += ["--multi_gpu", "--main_process_port", str(free_port())]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*launcher, str(SCRIPTS / script), *args]


def run(command: list[str], expect_success: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=REPO, env=env or environment(), capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S
    )
    if expect_success and result.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result
