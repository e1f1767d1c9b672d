#!/usr/bin/env bash
# Every GPU measurement the training-throughput work needs, prepared to run on a lent H200 (the device tool; its
# README) in two calls of a few minutes each, so that a session with a GPU spends its minutes measuring.
#
# Here, once: download the wheels the H200's image lacks (the versions this checkout's .venv has) into .whl/:
#     bash benchmarks/gpu_session.sh wheels
# Then through the device tool, one call after the other (the second finds the machine still warm):
#     run(command="bash benchmarks/gpu_session.sh training", carry=[".whl"], timeout_s=540)
#     run(command="bash benchmarks/gpu_session.sh model", carry=[".whl"], timeout_s=420)
# `training`: scripts/benchmark_training.py --device cuda (loader, model step, train.py end to end with its profile,
#             eager and compiled) -> $OUT/training_cuda.json, .png, benchmark_training.log
# `model`:    tests/test_gpu.py, then scripts/benchmark.py --device cuda --compile -> $OUT/test_gpu.log,
#             results_cuda.json, .png, benchmark.log
# Commit what comes back under benchmarks/ and quote it in the README with the machine it names.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(transformers datasets evaluate dill multiprocess fsspec)

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
training | model) ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh wheels|training|model" >&2
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
else
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log"
    timeout 240 python3 scripts/benchmark.py --device cuda --compile --output "$OUT/results_cuda.json" 2>&1 |
        tee "$OUT/benchmark.log"
fi
