#!/usr/bin/env bash
# Issue 13's GPU checks in one call of the device tool (one H200, ~9 minutes of its 10-minute limit).
#
#   1. here, once (needs pip and the network):    bash docs/results/gpu/run.sh fetch
#      saves into .whl/ (git-ignored) the wheels the GPU image lacks: rlhf-gym's own dependencies
#      that are not in the image, trl 1.16.0 (rloo, dpo, reward) and trl 1.12.0 (ppo)
#   2. the device tool:  run(command="bash docs/results/gpu/run.sh", carry=[".whl"], timeout_s=600)
#      (`run.sh env` or `run.sh trl` runs one half, e.g. to redo it in a second call)
#
# On the GPU machine it installs the wheels and rlhf-gym into /tmp (nothing can be downloaded there),
# then writes under $OUT (each step bounded by `timeout`, so a slow step leaves time for the next):
#   machine.txt      GPU, driver, python and package versions
#   gpu-tests.txt    pytest tests/test_gpu.py: the CUDA-graph step against the eager one (float32, bf16),
#                    the env, env rollouts and agents' training (float32, bf16) on cuda
#   env-sft.txt      rlhf-zoo bench env --device cuda at 64/256/1024 rows, the micro world's SFT policy
#   env-403m.txt     the same with a 403M-parameter Llama (bf16) as policy and reference
#   trl/bench-trl.md rlhf-zoo bench trl --device cuda --dtype bfloat16, every training pair, both sides
#                    starting from a 113M-parameter Llama, bf16 autocast on float32 weights (TRL's bf16=True,
#                    rlhf-gym's precision=bfloat16)
#   log.txt          everything printed
# Copy what comes back to docs/results/gpu/<date>/ and the tables into the README's Performance section.
#
# A dry run on a CPU machine (same steps, tiny sizes; fetch with WHEEL_PY=3.11 for a Python 3.11 there):
#   DEVICE=cpu BATCHES=8 BIG=llama-tiny MID=llama-tiny UPDATES=2 OUT=/tmp/gpu-dry bash docs/results/gpu/run.sh
set -uo pipefail
cd "$(dirname "$0")/../../.."

WHEELS=(gymnasium==1.4.0 farama-notifications==0.0.6 stable-baselines3==2.9.2 dill==0.4.1 multiprocess==0.70.19
        datasets==5.2.0 datasets==5.0.0 trl==1.16.0)
PART=${1:-all}
case "$PART" in all|env|trl|fetch) ;; *) echo "usage: run.sh [fetch|all|env|trl]"; exit 2 ;; esac
if [ "$PART" = fetch ]; then
    mkdir -p .whl  # git-ignored (.gitignore)
    get() { python3 -m pip download --no-deps --only-binary=:all: --python-version "${WHEEL_PY:-3.12}" --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$@"; }
    for w in "${WHEELS[@]}"; do get -d .whl "$w" || exit 1; done
    get -d .whl/trl112 trl==1.12.0 || exit 1
    ls -la .whl .whl/trl112
    exit 0
fi

OUT=${OUT:-/tmp/gpu-out} DEVICE=${DEVICE:-cuda} BATCHES=${BATCHES:-64,256,1024}
BIG=${BIG:-llama-403m} MID=${MID:-llama-113m} UPDATES=${UPDATES:+--updates $UPDATES}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
PY=${PYTHON:-python3}
[ -d .whl ] || { echo "no .whl/: run 'bash docs/results/gpu/run.sh fetch' here first and carry .whl"; exit 2; }

# datasets 5.1+ wants pyarrow >= 24; older images have less (both wheels travel; --no-deps installs one)
if $PY -c "import pyarrow, sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)"; then DS=5.2.0; else DS=5.0.0; fi
install=$(ls .whl/*.whl | grep -v -e "datasets-" ; ls .whl/datasets-$DS-*.whl)
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $install || exit 1
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site112 .whl/trl112/*.whl || exit 1
$PY -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
printf '#!/bin/sh\nPYTHONPATH=/tmp/site112:/tmp/site exec %s "$@"\n' "$(command -v $PY)" > /tmp/python-trl112
chmod +x /tmp/python-trl112
zoo() { $PY -m rlhfgym.zoo.cli "$@"; }

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    $PY -c "import sys, torch, transformers, datasets, gymnasium, trl; print(sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'datasets', datasets.__version__, 'gymnasium',
gymnasium.__version__, 'trl', trl.__version__)"
    PYTHONPATH=/tmp/site112:/tmp/site $PY -c "import trl.experimental.ppo as p; print('trl (ppo)', p.__name__)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if [ "$PART" != trl ]; then  # ~5 minutes
    RLHFGYM_TEST_DEVICE="$DEVICE" timeout 90 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 \
        | tee "$OUT/gpu-tests.txt"
    zoo bench policy "$BIG" --out "/tmp/$BIG" || exit 1
    timeout 90 $PY -m rlhfgym.zoo.cli bench env --device "$DEVICE" --batch "$BATCHES" --repeats 3 | tee "$OUT/env-sft.txt"
    timeout 120 $PY -m rlhfgym.zoo.cli bench env --device "$DEVICE" --batch "$BATCHES" --repeats 3 \
        --reference "/tmp/$BIG" --dtype bfloat16 | tee "$OUT/env-${BIG#llama-}.txt"
fi
if [ "$PART" != env ]; then  # ~4.5 minutes; the report is rewritten after every pair, so a cut run keeps its pairs
    timeout 270 $PY -m rlhfgym.zoo.cli bench trl --device "$DEVICE" --policy "$MID" --dtype bfloat16 \
        --pair rloo,dpo,reward,ppo --repeats 1 --timeout 120 --trl-ppo-python /tmp/python-trl112 --out "$OUT/trl" $UPDATES
fi
echo "done: $(date -u)"
