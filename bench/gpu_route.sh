#!/usr/bin/env bash
# The GPU route benchmark (bench/bench_gpu.py) and the GPU tests, on the project's GPU runner: one
# H100/H200, Python 3.12 with its own torch, no network, no Dask, s3fs or S3 server, and at most
# 64 MiB carried along with the repository (bench/gpu_machine.txt lists its packages; what the
# route needs beyond them travels as the wheels of bench/gpu_carry.txt, moto as the S3 server).
#
#   bash bench/gpu_route.sh download   # here, with network: the carried wheels into .whl/ (ignored)
#   bash bench/gpu_route.sh rehearse   # here, on the CPU: the runner's Python and packages in a
#                                      #   virtual environment, the wheels installed as `run` does,
#                                      #   then `run`'s steps with the CPU fallbacks, to a record
#   bash bench/gpu_route.sh run        # there, in the repository root, .whl/ carried
#
# `run` ends within BUDGET_S (6 minutes), wheel install included: the benchmark starts no pass
# that would end past its share (the most telling passes go first, and its record is rewritten
# after every pass, to bench/results/ and to $OUT where the runner sets it), then `pytest -m gpu`
# gets 2 minutes and its summary line joins the record; bench/decoders.py (TorchCodec against
# torchvision's nvJPEG, and on the CPU against PIL) gets 40 s and bench/bench_fsdp.py (one NCCL
# rank, FSDP against DDP; tiny sizes on a CPU) 75 s, each for a record of its own, noted in the
# route's.
# With network and `make install`, a GPU machine runs the same benchmark with `make bench-gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."

BUDGET_S=${BUDGET_S:-360}
TESTS_S=120
DECODERS_S=40
FSDP_S=75
START=$(date +%s)

# The route after the wheels are in: the benchmark within the time left, then the GPU tests.
# $1: the python, $2: where the record goes.
route() {
    local py=$1 results=$2 left bench_s rec
    left=$((BUDGET_S - ($(date +%s) - START)))
    bench_s=$((left - TESTS_S - DECODERS_S - FSDP_S - 15))
    echo "== bench_gpu: ${bench_s} s of the ${BUDGET_S} s budget"
    timeout -k 10 $((bench_s + 20)) "$py" -m bench.bench_gpu --backend moto \
        --budget-s "$bench_s" --out "$results" | tee "${OUT:-$results}/bench_gpu.txt" || true
    rec=$(ls -t "$results"/bench_gpu-*.json 2>/dev/null | head -1)
    [ -n "$rec" ] || { echo "bench_gpu wrote no record" >&2; return 1; }
    echo "== pytest -m gpu (at most ${TESTS_S} s)"
    local log="${OUT:-$results}/pytest_gpu.txt" line
    timeout -k 5 "$TESTS_S" "$py" -m pytest -m gpu -q -p no:cacheprovider \
        $("$py" bench/gpu_env.py tests) > "$log" 2>&1 || true
    line=$(grep -E "passed|failed|skipped|error|deselected" "$log" | tail -1)
    line=${line:-"no summary line: pytest -m gpu ended after ${TESTS_S} s (see $log)"}
    echo "$line"
    "$py" -m bench.bench_gpu --note "$rec" "pytest -m gpu" "$line"
    echo "== decoders: TorchCodec against today's decoders (at most ${DECODERS_S} s)"
    timeout -k 5 "$DECODERS_S" "$py" -m bench.decoders --rounds 5 --records "$results" \
        > "${OUT:-$results}/decoders.txt" 2>&1 || true
    line=$(grep -E "speed nvjpeg|speed torchcodec\+augment|^record:" \
        "${OUT:-$results}/decoders.txt" | tr '\n' ' ')
    "$py" -m bench.bench_gpu --note "$rec" "decoders" "${line:-"no result within ${DECODERS_S} s"}"
    echo "== bench_fsdp: one NCCL rank a GPU, FSDP against DDP (at most ${FSDP_S} s)"
    local sizes="--cluster cuda --batch 64 --image 224 --steps 10"
    "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" ||
        sizes="--arch resnet18 --batch 4 --image 32 --steps 2"  # the rehearsal's CPU
    timeout -k 5 "$FSDP_S" "$py" -m bench.bench_fsdp $sizes --repeats 1 --records "$results" \
        > "${OUT:-$results}/bench_fsdp.txt" 2>&1 || true
    line=$(grep -E "^median:|^record:" "${OUT:-$results}/bench_fsdp.txt" | tr '\n' ' ')
    "$py" -m bench.bench_gpu --note "$rec" "bench_fsdp" "${line:-"no result within ${FSDP_S} s"}"
    echo "== record: $rec ($(($(date +%s) - START)) s in all)"
}

case "${1:-}" in
download)
    mkdir -p .whl
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        $(python3 bench/gpu_env.py carry)
    python3 bench/gpu_env.py size
    ;;
run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    echo "== wheels in after $(($(date +%s) - START)) s"
    python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
    route python3 bench/results
    ;;
rehearse)
    env=build/gpu-rehearsal
    py3=$(PYENV_VERSION=3.12.1 command -v python3.12 2>/dev/null || true)
    [ -n "$py3" ] || { echo "rehearse needs Python 3.12 (python3.12 on PATH, or pyenv)" >&2; exit 2; }
    ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl/: bash $0 download" >&2; exit 2; }
    want=$(python3 bench/gpu_env.py route-packages)
    if [ "$(cat "$env/packages.txt" 2>/dev/null)" != "$want" ]; then
        rm -rf "$env" && mkdir -p "$env"
        PYENV_VERSION=3.12.1 "$py3" -m venv "$env/venv"
        echo "== the runner's packages the route imports (torch's CUDA build runs on the CPU)"
        "$env/venv/bin/python" -m pip install -q $want
        echo "$want" > "$env/packages.txt"
    fi
    rm -rf "$env/site" "$env/results" && mkdir -p "$env/results"
    START=$(date +%s)  # the budget counts from here, as on the runner
    "$env/venv/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$env/site" .whl/*.whl
    export PYTHONPATH=$PWD/$env/site PYTHONUNBUFFERED=1
    echo "== wheels in after $(($(date +%s) - START)) s"
    # Every module the route loads, CUDA's included, must import here as it would there.
    "$env/venv/bin/python" -c "import dask_cuda, distributed, moto.server, s3fs, helpers.ddp"
    route "$env/venv/bin/python" "$env/results"
    python3 bench/gpu_env.py size
    ;;
*)
    sed -n '2,17p' "$0"
    exit 2
    ;;
esac
