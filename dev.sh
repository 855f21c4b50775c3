#!/usr/bin/env bash
# Set up a virtual environment and run the quickstart example or the tests.
#   ./dev.sh example   run examples/quickstart.py on the embedded default (local Ray, local dir)
#   ./dev.sh test      run the test suite (pytest arguments may follow)
#   ./dev.sh lint      ruff check, ruff format --check and mypy --strict on the whole tree
# Needs only Python >= 3.10 with pip; installs uv into .venv for fast installs.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}

setup() {
  local extras=$1
  if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
  fi
  if [ ! -x .venv/bin/uv ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check uv
  fi
  # --system-certs: trust the machine's CA store, as pip does (some networks re-sign TLS).
  # If uv cannot install for any reason, pip does the same job, only slower.
  .venv/bin/uv pip install -q --system-certs -p .venv/bin/python -e ".[$extras]" \
    || .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]"
  if [ "$extras" = test ]; then
    # Test-only plugins, each a distribution of its own (the `faulty` storage scheme):
    # installed, not put on a path, so that Ray workers find them by their entry points.
    .venv/bin/uv pip install -q --system-certs -p .venv/bin/python -e tests/plugins/faulty_storage \
      || .venv/bin/python -m pip install -q --disable-pip-version-check \
        -e tests/plugins/faulty_storage
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  example)
    setup test
    exec .venv/bin/python examples/quickstart.py "$@"
    ;;
  test)
    setup test
    exec .venv/bin/python -m pytest "$@"
    ;;
  lint)
    setup test
    .venv/bin/ruff check .
    .venv/bin/ruff format --check .
    exec .venv/bin/mypy --strict src backends listeners tests/plugins/faulty_storage
    ;;
  *)
    echo "usage: ./dev.sh example | test [pytest args] | lint" >&2
    exit 2
    ;;
esac
