#!/usr/bin/env bash
# Chaos run: a `bloomduo up` of its own (tiny demo model, two workers) under steady gRPC and HTTP load,
# with faults injected at random moments (SIGKILL, SIGSTOP, SIGTERM of a worker or the gateway), each
# checked (no request lost or hung, serving again within 30 s, same tokens), then a check that nothing
# leaked and a summary table. About 15 minutes; not part of the default run (tests/test_chaos.py has a
# short version that is).
# Usage: scripts/chaos.sh [pytest args...]
# Sizes: BLOOMDUO_CHAOS_FAULTS (30), BLOOMDUO_CHAOS_MAX_S (1800 seconds at most), BLOOMDUO_CHAOS_SEED
# (random; printed, to replay a run).
# BLOOMDUO_VENV=DIR runs it in another virtual environment (scripts/test-venv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/test-venv.sh
exec "$venv/bin/python" -m pytest tests/test_chaos.py -m chaos -s "$@"
