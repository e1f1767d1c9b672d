"""Collect the evaluation curves of scripts/train_detection.py runs from their logs into one JSON file.

Each run's log holds one line per evaluated epoch ("epoch E: train loss L, mAP@50 M50, mAP M (S s)"); the digit
canvases' default gives 125 optimizer steps per epoch (2000 canvases, global batch 16), and the last epoch's
evaluation is the "final: mAP@50 M50, mAP M" line. Usage:
    python benchmarks/probes/detection_curves.py OUT.json NAME=LOG [NAME=LOG ...]
"""

import json
import re
import sys

EPOCH_LINE = re.compile(r"epoch (\d+): train loss ([0-9.]+), mAP@50 ([0-9.]+), mAP ([0-9.]+) \((\d+) s\)")
FINAL_LINE = re.compile(r"final: mAP@50 ([0-9.]+), mAP ([0-9.]+)")
STEPS_PER_EPOCH = 125


def curve(log_path: str) -> list[dict]:
    with open(log_path, errors="replace") as log:
        text = log.read()
    found = EPOCH_LINE.findall(text)
    points = [
        {
            "completed_steps": (int(epoch) + 1) * STEPS_PER_EPOCH,
            "train_loss": float(loss),
            "eval_map_50": float(map_50),
            "eval_map": float(map_all),
            "elapsed_s": int(seconds),
        }
        for epoch, loss, map_50, map_all, seconds in found
    ]
    final = FINAL_LINE.search(text)
    if final:
        steps = (len(found) + 1) * STEPS_PER_EPOCH
        points.append({"completed_steps": steps, "eval_map_50": float(final[1]), "eval_map": float(final[2])})
    return points


if __name__ == "__main__":
    output, *runs = sys.argv[1:]
    curves = {name: curve(path) for name, path in (run.split("=", 1) for run in runs)}
    with open(output, "w") as file:
        json.dump(curves, file, indent=1)
        file.write("\n")
