#!/usr/bin/env bash
# A layout sweep in one process group (Hydra multirun): every point gets its own target dir.
#   launch/sweep.sh 4 +model=tiny_llama3 parallel.target_tp=1,2,4 parallel.target_pp=1,2
set -euo pipefail
nproc=${1:?usage: launch/sweep.sh NPROC overrides...}
shift
exec torchrun --standalone --nproc-per-node "$nproc" -m reshard --multirun "$@"
