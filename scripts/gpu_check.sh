#!/usr/bin/env bash
# Every GPU check of one lent CUDA machine, in one run that ends on its own (../.library/device's `run`):
#   tests    tests/test_gpu.py and test_cuda_graphs.py (the int8 kernel, the decode graphs, the stack on cuda
#            against transformers)
#   fp16     `bloomduo bench --launch` at bloom-7b1's shape, float16, one shard a GPU, beside transformers
#   eager    the same without the decode steps' CUDA graphs (BLOOMDUO_CUDA_GRAPHS=0), no baseline
#   int8     the same with --quantize int8 (triton_int8's kernel), graphs on
#   speed    scripts/gpu_int8_speed.py: the int8 Linears against float16, per path and tiling
#   attention  scripts/gpu_attention_speed.py: a decode step's attention, fused SDPA against unfused
#   profile  (only when named) py-spy over the float16 stack's processes and threads, waits included, at
#            PROFILE_STREAMS streams (default 16; py-spy in .whl/)
# The project is not installed there: its packages are laid out as the install maps them, and what the
# machine's Python lacks comes as wheels in .whl/ (carried). The stages' logs land in $OUT/stages.log, one
# after another, and the benches' JSON beside it ($OUT brings back 8 files at most).
# The wheels, fetched here once (Python 3.12 there; an H200 image of 2026-12 lacked all but transformers'
# version): echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: \
#   --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#   --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d .whl grpcio==1.85.3 grpcio-health-checking==1.85.1 \
#   grpcio-reflection==1.85.1 protobuf==7.36.2 structlog==26.1.0 fastapi==0.165.0 starlette==1.10.0 \
#   uvicorn==0.54.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#   annotated-doc==0.0.7 typing_extensions==4.16.0 opentelemetry-api==1.45.2 transformers==5.24.0 py-spy
#
#   bash scripts/gpu_check.sh [seconds the whole run may take, default 550] [stages, default all but profile]
set -u
budget=${1:-550}
shift
stages=" ${*:-tests fp16 eager int8 attention speed} "
started=$(date +%s)
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 BLOOMDUO_CACHE=/tmp/bloomduo-cache
# (in this copy of the tree: python -m puts the working folder first on the path)
for folder in gateway shard_worker client; do ln -sfn "../$folder" "bloomduo/$folder"; done
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/wheels .whl/*.whl
fi
export PYTHONPATH="/tmp/wheels:$PWD"


# stage NAME LIMIT COMMAND...: run with the smaller of LIMIT and what the budget leaves, its log added to $out/stages.log
stage() {
    local name=$1 limit=$2
    shift 2
    [[ $stages == *" $name "* ]] || return
    local left=$((budget - ($(date +%s) - started) - 5))
    ((left < limit)) && limit=$left
    if ((limit < 20)); then
        echo "== $name: skipped, ${left}s of the budget left"
        return
    fi
    echo "== $name (at most ${limit}s)"
    local began=$(date +%s)
    timeout -k 5 "$limit" "$@" >"/tmp/$name.log" 2>&1
    echo "   exit $? after $(($(date +%s) - began))s"
    tail -n 30 "/tmp/$name.log"
    { echo "== $name"; cat "/tmp/$name.log"; } >>"$out/stages.log"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    nproc
    # bloom-7b1's shape drawn on the GPU while the tests run (the CPU draws it in about a minute a core)
    if [[ $stages =~ fp16|int8|profile ]]; then
        time python3 -m bloomduo demo-model --preset bloom-7b1 --dtype float16 --draw-on cuda /tmp/bloom-7b1
        du -sh /tmp/bloom-7b1
    fi
} >"$out/setup.log" 2>&1 &
setup=$!

stage tests 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py tests/test_cuda_graphs.py
wait $setup
tail -n 12 "$out/setup.log"
load=(--launch --model /tmp/bloom-7b1 --num-shards 1 --device cuda --dtype float16 --concurrency 1,16
    --prompt-tokens 32 --new-tokens 16 --distinct-prompts --rounds 1)
stage fp16 180 python3 -m bloomduo bench "${load[@]}" --baseline transformers --out "$out/fp16.json"
stage eager 110 env BLOOMDUO_CUDA_GRAPHS=0 python3 -m bloomduo bench "${load[@]}" --out "$out/eager.json"
stage int8 120 python3 -m bloomduo bench "${load[@]}" --quantize int8 --out "$out/int8.json"
stage attention 60 python3 scripts/gpu_attention_speed.py
stage speed 150 python3 scripts/gpu_int8_speed.py --json "$out/speed.json"
# raw stacks of every process and thread (bench, gateway, worker), waits included, at PROFILE_STREAMS streams
# (default 16), long enough to sample the steps
stage profile 150 /tmp/wheels/bin/py-spy record --subprocesses --threads --idle --rate 250 --format raw \
    --output "$out/profile.txt" -- python3 -m bloomduo bench --launch --model /tmp/bloom-7b1 --num-shards 1 \
    --device cuda --dtype float16 --concurrency "${PROFILE_STREAMS:-16}" --requests-per-level 64 --prompt-tokens 32 \
    --new-tokens 64 --distinct-prompts
echo "== done in $(($(date +%s) - started))s"
