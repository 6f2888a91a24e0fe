#!/usr/bin/env bash
# Sets up a fresh machine and runs the test suite: ./test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q --upgrade pip >/dev/null
# The CPU build of torch first (the parity tests need it); an unpinned torch pulls GPU builds.
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test]"
export JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2
python3 -m pytest -q "$@"
