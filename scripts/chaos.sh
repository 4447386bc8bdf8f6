#!/usr/bin/env bash
# Chaos run: a `bloomduo up` of its own (tiny demo model, two workers) under steady gRPC and HTTP load,
# with faults injected at random moments (SIGKILL, SIGSTOP, SIGTERM of a worker or the gateway), each
# checked (no request lost or hung, serving again within 30 s, same tokens), then a check that nothing
# leaked and a summary table. About 15 minutes; not part of the default run (tests/test_chaos.py has a
# short version that is).
# Usage: scripts/chaos.sh [pytest args...]
# Sizes: BLOOMDUO_CHAOS_FAULTS (30), BLOOMDUO_CHAOS_MAX_S (1800 seconds at most), BLOOMDUO_CHAOS_SEED
# (random; printed, to replay a run).
# BLOOMDUO_VENV=DIR runs it in another virtual environment that has the project's test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${BLOOMDUO_VENV:-.venv-test}"
# Reuse the test environment scripts/test.sh builds (a chaos run tests the service, not the install);
# build it the same way when there is none.
if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    # torch first and pinned: on a CPU machine a bare "torch" requirement would pull a multi-GB CUDA build.
    "$venv/bin/pip" install --quiet -c constraints.txt torch
    "$venv/bin/pip" install --quiet -c constraints.txt -e ".[test]"
fi
# Demo models go into a private cache, never into the user's.
export BLOOMDUO_CACHE="${BLOOMDUO_CACHE:-$(cd "$venv" && pwd)/cache}"
exec "$venv/bin/python" -m pytest tests/test_chaos.py -m chaos -s "$@"
