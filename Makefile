# The two commands of the README:
#   make demo   set everything up, convert the built-in tiny models on 2 ranks (HF -> torch_dist TP=2 PP=2;
#               a tiny Mixtral -> torch_dist TP=2 EP=2)
#   make test   set everything up, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt

.PHONY: setup slurm-deps demo test bench gpu-check clean

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
	# 2 ranks started by reshard itself (one import, forked ranks); torchrun works the same (below)
	RESHARD_ROOT=demo $(PY) -m reshard launch.nproc=2 +model=tiny_llama3 parallel.target_tp=2 parallel.target_pp=2
	$(PY) -m reshard.report demo/tiny_llama3/torch_dist_tp2_pp2
	# a mixture of experts: 8 experts over EP=2, expert weights split over TP=2
	$(PY) -m reshard.synthetic tiny_mixtral demo/tiny_mixtral/hf --shards 3
	RESHARD_ROOT=demo $(VENV)/bin/torchrun --standalone --nproc-per-node 2 -m reshard \
		+model=tiny_mixtral parallel.target_tp=2 parallel.target_ep=2
	$(PY) -m reshard.report demo/tiny_mixtral/torch_dist_tp2_pp1_ep2

# The Slurm tests start a real single-node cluster: they need Debian's slurm-wlm and munge.
slurm-deps:
	@if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing slurm-wlm and munge for the Slurm tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      slurm-wlm munge >/dev/null; \
	  else echo "the Slurm tests need slurm-wlm and munge: sudo apt-get install slurm-wlm munge" >&2; exit 1; fi; \
	fi

test: setup slurm-deps
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_plan.py --dry-run
	$(PY) benchmarks/bench_plan.py --moe
	$(PY) benchmarks/bench_plan.py --deepseek
	# HF -> torch_dist, legacy -> legacy, torch_dist -> HF, HF -> Meta against cp -r + sync and the
	# single-process pattern, with ratios (add --cases moe for the MoE import)
	$(PY) benchmarks/bench_all.py
	# live resharding (reshard.api) against full-gather-then-slice, trainer TP=2 PP=2 -> TP=4 on 4 ranks
	$(PY) benchmarks/bench_api.py

gpu-check: setup
	bash benchmarks/gpu_check.sh

clean:
	rm -rf demo checkpoints outputs multirun .pytest_cache
