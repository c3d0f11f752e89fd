#!/usr/bin/env bash
# One node: launch/local.sh [NPROC] <hydra overrides...>
#   launch/local.sh 8 +model=llama2_7b parallel.target_tp=8
set -euo pipefail
nproc=${1:?usage: launch/local.sh NPROC overrides...}
shift
exec torchrun --standalone --nproc-per-node "$nproc" -m reshard "$@"
