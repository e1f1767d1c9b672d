#!/usr/bin/env bash
# Every GPU measurement the training-throughput work needs, prepared to run on a lent H200 (the device tool; its
# README) in two calls of a few minutes each, so that a session with a GPU spends its minutes measuring.
#
# Here, once: download the wheels the H200's image lacks (the versions this checkout's .venv has) into .whl/:
#     bash benchmarks/gpu_session.sh wheels
# Then through the device tool, one call after the other (the second finds the machine still warm):
#     run(command="bash benchmarks/gpu_session.sh training", carry=[".whl"], timeout_s=540)
#     run(command="bash benchmarks/gpu_session.sh model", carry=[".whl"], timeout_s=420)
# or, for the two data paths (train.py --data_pipeline cpu|device, see docs/device_data.md), one call on its own:
#     run(command="bash benchmarks/gpu_session.sh data-paths", carry=[".whl"], timeout_s=540)
# or, for detection (issue 20), one call on its own:
#     run(command="bash benchmarks/gpu_session.sh detection", carry=[".whl"], timeout_s=560)
# `training`: scripts/benchmark_training.py --device cuda (loader, model step, train.py end to end with its profile,
#             eager and compiled) -> $OUT/training_cuda.json, .png, benchmark_training.log
# `model`:    tests/test_gpu.py, then scripts/benchmark.py --device cuda --compile -> $OUT/test_gpu.log,
#             results_cuda.json, .png, benchmark.log
# `data-paths`: tests/test_device_data_gpu.py (nvJPEG against PIL, GPU against CPU augmentation), then
#             scripts/benchmark_training.py --device cuda for the device and the CPU data path (loader alone, model
#             step, train.py end to end at batch 256 and 128, eager then compiled) on 4,096 JPEGs written first, in
#             at most 440 s: the report is written after every row, so a cut-off run keeps the rows it finished
#             (device path and batch 256 first) -> $OUT/test_device_data_gpu.log, training_cuda_data_paths.json,
#             .png, benchmark_training_data_paths.log
# `detection`: scripts/benchmark.py --device cuda --detectors (DETR inference at 800x1333; DETR and Deformable DETR
#             training steps at 800x1216, batch 2, bf16 autocast; PVT-small against ResNet-50, with peak CUDA memory)
#             -> $OUT/detection_cuda.json, benchmark_detection.log; then the embedded detection default on one GPU
#             from an empty folder (the digits classifier trained first, as the README's command does), seed 42
#             -> $OUT/detection_default_cuda.json, detection_default.one-gpu.seed42.log
# Commit what comes back under benchmarks/ and quote it in the README with the machine it names.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(transformers datasets evaluate dill multiprocess fsspec torchmetrics lightning-utilities pycocotools)

case "${1:-}" in
wheels)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
    for name in "${WHEELS[@]}"; do
        version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$name'))") || exit 1
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$name==$version" || exit 1
    done
    ls .whl
    exit 0
    ;;
training | model | data-paths | detection) ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh wheels|training|model|data-paths|detection" >&2
    exit 2
    ;;
esac

: "${OUT:?run through the device tool, which sets OUT}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
    exit 1
export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, datasets; print(torch.__version__, transformers.__version__, \
datasets.__version__, torch.cuda.get_device_name())" || exit 1

if [[ "$1" == training ]]; then
    timeout 500 python3 scripts/benchmark_training.py --device cuda --data_dir /tmp/jpegs \
        --output "$OUT/training_cuda.json" 2>&1 | tee "$OUT/benchmark_training.log"
elif [[ "$1" == data-paths ]]; then
    timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_device_data_gpu.py 2>&1 |
        tee "$OUT/test_device_data_gpu.log"
    timeout 440 python3 scripts/benchmark_training.py --device cuda --data_dir /tmp/jpegs_4096 --num_images 4096 \
        --data_paths device cpu --end_to_end_batch_sizes 256 128 --output "$OUT/training_cuda_data_paths.json" 2>&1 |
        tee "$OUT/benchmark_training_data_paths.log"
elif [[ "$1" == detection ]]; then
    timeout 150 python3 scripts/benchmark.py --device cuda --detectors --output "$OUT/detection_cuda.json" 2>&1 |
        tee "$OUT/benchmark_detection.log"
    # the default's digits come from scikit-learn (not carried: the image's own) and its mAP from torchmetrics
    python3 -c "import sklearn, torchmetrics, pycocotools" || exit 1
    timeout 380 python3 benchmarks/probes/detection_default_seeds.py --seeds 42 --label one-gpu \
        --launch_args "--num_processes 1" --output "$OUT/detection_default_cuda.json" --log_dir "$OUT" 2>&1 |
        tee "$OUT/detection_default_cuda.log"
else
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log"
    timeout 240 python3 scripts/benchmark.py --device cuda --compile --output "$OUT/results_cuda.json" 2>&1 |
        tee "$OUT/benchmark.log"
fi
