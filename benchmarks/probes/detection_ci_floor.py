"""Measure the shortened detection default of `tests/test_detection_learns.py` for several seeds, to set its floor.

    python benchmarks/probes/detection_ci_floor.py --seeds 42 1 2 --output benchmarks/detection_ci_floor.json
    python benchmarks/probes/detection_ci_floor.py --seeds 42 1 2 --label two-stage \
        --detector_args --config_overrides '{"two_stage": true, "two_stage_num_proposals": 30}'

Each seed runs the test's own function (both stages in a fresh temporary folder); the figures, the wall time of each
run and the machine are appended to the output file under `--label`.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))

from machine import describe_machine  # noqa: E402
from test_detection_learns import CLASSIFIER_SHORTENING, DETECTOR_SHORTENING, shortened_default_run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--label", default="default")
    parser.add_argument("--detector_args", nargs=argparse.REMAINDER, default=[])
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "detection_ci_floor.json")
    args = parser.parse_args()
    runs = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            results = shortened_default_run(Path(folder), seed, *args.detector_args)
            wall = time.perf_counter() - start
        runs.append({"seed": seed, "wall_seconds": round(wall, 1), "eval_map_50": results["eval_map_50"],
                     "eval_map": results["eval_map"], "eval_history": results["eval_history"]})  # fmt: skip
        print(f"seed {seed}: mAP@50 {results['eval_map_50']:.4f} in {wall:.0f} s", flush=True)
    record = json.loads(args.output.read_text()) if args.output.exists() else {}
    record[args.label] = {
        "classifier_args": CLASSIFIER_SHORTENING,
        "detector_args": DETECTOR_SHORTENING + args.detector_args,
        "machine": describe_machine("cpu"),
        "runs": runs,
    }
    args.output.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
