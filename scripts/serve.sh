#!/usr/bin/env bash
# Set up a virtual environment with the project installed, then run the host on config.yaml.
#   bash scripts/serve.sh [server.py arguments...]     (default: --config config.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
if [ "$#" -eq 0 ]; then set -- --config config.yaml; fi
exec .venv/bin/python server.py "$@"
