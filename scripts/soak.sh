#!/usr/bin/env bash
# Soak the real stack: rounds of concurrent mixed requests, then a summary table (requests, outcomes,
# latency, resident memory of every process per round). Several minutes; not part of the default run.
# Usage: scripts/soak.sh [pytest args...]
# Sizes: BLOOMDUO_SOAK_ROUNDS (6), BLOOMDUO_SOAK_CLIENTS (64), BLOOMDUO_SOAK_ROUND_S (30 seconds per
# round); BLOOMDUO_SOAK_MODEL=DIR soaks another checkpoint than the tiny demo model.
# BLOOMDUO_VENV=DIR runs it in another virtual environment that has the project's test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${BLOOMDUO_VENV:-.venv-test}"
# Reuse the test environment scripts/test.sh builds (it is not rebuilt: a soak tests the service, not
# the install); build it the same way when there is none.
if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    # torch first and pinned: on a CPU machine a bare "torch" requirement would pull a multi-GB CUDA build.
    "$venv/bin/pip" install --quiet -c constraints.txt torch
    "$venv/bin/pip" install --quiet -c constraints.txt -e ".[test]"
fi
# Demo models go into a private cache, never into the user's.
export BLOOMDUO_CACHE="${BLOOMDUO_CACHE:-$(cd "$venv" && pwd)/cache}"
exec "$venv/bin/python" -m pytest tests/test_soak.py -m soak -s "$@"
