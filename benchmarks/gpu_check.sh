#!/usr/bin/env bash
# The GPU path, checked on a machine with CUDA (CI has none): convert a synthetic model with
# device=cuda (NCCL; exchange buffers, casts and writes from the GPU) and with device=cpu (gloo),
# and compare the two checkpoints bit for bit. Uses 2 ranks when there are 2+ GPUs (so pieces
# move over NCCL), else 1. A few minutes at most:   bash benchmarks/gpu_check.sh [SIZE_GB]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PY:-.venv/bin/python}
[ -x "$py" ] || py=python3
gb=${1:-0.5}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD
"$py" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device here: this check needs a GPU"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, "
      f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
PY
"$py" -m reshard.synthetic tiny_llama3 "$work/hf" --scale-to-gb "$gb" --dtype bfloat16 --shards 2
ngpu=$("$py" -c "import torch; print(torch.cuda.device_count())")
n=$(( ngpu >= 2 ? 2 : 1 ))
for dev in cpu cuda; do
  start=$(date +%s.%N)
  "$py" -m torch.distributed.run --standalone --nproc-per-node "$n" -m reshard \
    source.path="$work/hf" target.path="$work/$dev" parallel.target_tp=2 parallel.target_pp=2 \
    device="$dev" io.assign=layout io.buffer_mb=64 target.dtype=float32 io.progress=none paths.root="$work"
  echo "device=$dev on $n rank(s): $(echo "$(date +%s.%N) - $start" | bc) s"
done
"$py" benchmarks/compare_dcp.py "$work/cpu/release" "$work/cuda/release"
# the whole-file writers (pieces written straight from GPU memory) against their CPU results
for fmt in hf megatron_legacy; do
  for dev in cpu cuda; do
    "$py" -m torch.distributed.run --standalone --nproc-per-node "$n" -m reshard \
      source.path="$work/hf" target.path="$work/${fmt}_$dev" target.format="$fmt" device="$dev" \
      io.assign=layout io.buffer_mb=64 target.dtype=float32 io.progress=none paths.root="$work"
  done
  "$py" -m reshard compare "$work/${fmt}_cpu" "$work/${fmt}_cuda"
done
# reshard.api over NCCL with CUDA tensors (one GPU per rank, so 2+ GPUs), checksums equal to the gloo run's
if [ "$ngpu" -ge 2 ]; then
  for dev in cpu cuda; do
    "$py" -m torch.distributed.run --standalone --nproc-per-node 2 examples/live_reshard.py --device "$dev" \
      --layouts small | sed "s/^/api $dev: /" | tee "$work/api_$dev.txt"
  done
  diff <(grep -o 'rank .*checksum.*' "$work/api_cpu.txt" | sort) <(grep -o 'rank .*checksum.*' "$work/api_cuda.txt" | sort) \
    && echo "reshard.api: NCCL/CUDA result bit-equal to gloo/CPU (per-rank checksums)"
else
  echo "reshard.api NCCL check skipped: it needs 2+ GPUs (NCCL refuses two ranks on one GPU)"
fi
