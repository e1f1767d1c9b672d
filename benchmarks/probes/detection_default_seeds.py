"""The README's detection command, from an empty folder per seed: wall time (the digits classifier trained first
included) and the held-out mAP curve of each seed, written to `benchmarks/detection_default.json`.

    python benchmarks/probes/detection_default_seeds.py --seeds 42 1 2
    python benchmarks/probes/detection_default_seeds.py --seeds 42 --label two-stage \
        --detector_args --config_overrides '{"two_stage": true, "two_stage_num_proposals": 30}'

Each run is `accelerate launch --multi_gpu --num_processes 2 scripts/train_detection.py --seed S` (what the README
shows, plus the seed); its log goes to `--log_dir` as `detection_default.<label>.seed<S>.log`. On one GPU
(`benchmarks/gpu_session.sh detection`), `--launch_args "--num_processes 1"` replaces the launch options.
"""

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

from machine import describe_machine  # noqa: E402

OUTPUT_FOLDER = "pvt-detection-digits"


README_LAUNCH_ARGS = "--multi_gpu --num_processes 2"


def run_seed(
    seed: int, launch_args: list[str], detector_args: list[str], log_path: Path, card_path: Path | None
) -> dict:
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *launch_args,
        str(REPO / "scripts" / "train_detection.py"), "--seed", str(seed), *detector_args,
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as folder, log_path.open("w") as log:
        start = time.perf_counter()
        subprocess.run(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, check=True)
        wall = time.perf_counter() - start
        backbone = json.loads((Path(folder) / "pvt-digits" / "all_results.json").read_text())
        results = json.loads((Path(folder) / OUTPUT_FOLDER / "all_results.json").read_text())
        if card_path is not None:
            shutil.copyfile(Path(folder) / OUTPUT_FOLDER / "README.md", card_path)
    return {
        "seed": seed,
        "wall_seconds": round(wall, 1),
        "classifier_eval_accuracy": backbone["eval_accuracy"],
        "classifier_total_runtime": round(backbone["total_runtime"], 1),
        "detector_total_runtime": round(results["total_runtime"], 1),
        "eval_map_50": results["eval_map_50"],
        "eval_map": results["eval_map"],
        "eval_map_75": results["eval_map_75"],
        "completed_steps": results["completed_steps"],
        "eval_history": results["eval_history"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--label", default="default")
    parser.add_argument("--launch_args", default=README_LAUNCH_ARGS, help="accelerate launch's options, one string")
    parser.add_argument("--detector_args", nargs=argparse.REMAINDER, default=[])
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "detection_default.json")
    parser.add_argument("--card_output", type=Path, help="Where to copy the model card of the run with seed 42.")
    parser.add_argument("--log_dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    runs = []
    for seed in args.seeds:
        log_path = args.log_dir / f"detection_default.{args.label}.seed{seed}.log"
        card_path = args.card_output if seed == 42 else None
        runs.append(run_seed(seed, shlex.split(args.launch_args), args.detector_args, log_path, card_path))
        print(f"seed {seed}: mAP@50 {runs[-1]['eval_map_50']:.4f}, {runs[-1]['wall_seconds']:.0f} s", flush=True)
    record = json.loads(args.output.read_text()) if args.output.exists() else {}
    record[args.label] = {
        "command": f"accelerate launch {args.launch_args} scripts/train_detection.py --seed S"
        + "".join(f" {arg}" for arg in args.detector_args),
        "machine": describe_machine("cuda" if torch.cuda.is_available() else "cpu"),
        "runs": runs,
    }
    args.output.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
