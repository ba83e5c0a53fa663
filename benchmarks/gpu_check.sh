#!/usr/bin/env bash
# GPU acceptance check (BENCHMARKS.md, "GPU check"): on a CUDA machine, from any directory,
#   benchmarks/gpu_check.sh                  # about 5-10 minutes on one GPU; the log goes to runs/gpu_check.log
# runs benchmarks/layer_speed.py and benchmarks/speed.py with --device cuda --dtype bfloat16, a short bf16
# training run of the built-in demo, the same run under configs/accelerate/fsdp.yaml on one GPU, and AlphaLoRA's
# spectra at Llama-2-7B's shapes on the GPU (benchmarks/alphalora_speed.py), then prints
# one summary table against the targets (loop >= 3x slower than moela, step <= 1.10x PEFT LoRA, memory <= 1.10x,
# generation tokens/s >= PEFT LoRA's, AlphaLoRA float64 spectra of 7B <= 5 min).
# Exit status: 0 all targets met, 1 a target missed or a run failed, 2 no CUDA device.
#   benchmarks/gpu_check.sh --device cpu --quick   # CPU dry run of every command with tiny sizes (no numbers)
# Needs the project's environment with the peft and demo extras (make setup); PYTHON picks another interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
if [[ " $* " != *" --device cpu "* ]] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device: $("$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuda.is_available() False")' 2>&1 | tail -1)" >&2
  echo "gpu_check: run it on a machine with an NVIDIA GPU (or --device cpu --quick for a dry run of the commands)" >&2
  exit 2
fi
mkdir -p runs
"$PY" benchmarks/gpu_check.py "$@" 2>&1 | tee runs/gpu_check.log
exit "${PIPESTATUS[0]}"
