# The two commands of the README:
#   make demo   set everything up, convert the built-in tiny model on 2 ranks (HF -> torch_dist TP=2 PP=2)
#   make test   set everything up, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	# megatron-core is a test-only referee; see FORMATS.md §6 for why it installs this way
	$(PIP) --no-deps --ignore-requires-python megatron-core==0.19.2
	$(PIP) --no-deps triton
	touch $@

demo: setup
	rm -rf demo
	$(PY) -m reshard.synthetic tiny_llama3 demo/tiny_llama3/hf --shards 3
	RESHARD_ROOT=demo $(VENV)/bin/torchrun --standalone --nproc-per-node 2 -m reshard \
		+model=tiny_llama3 parallel.target_tp=2 parallel.target_pp=2
	$(PY) -m reshard.report demo/tiny_llama3/torch_dist_tp2_pp2

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_hf_to_torch_dist.py

clean:
	rm -rf demo checkpoints outputs multirun .pytest_cache
