#!/usr/bin/env bash
# Soak the real stack: rounds of concurrent mixed requests, then a summary table (requests, outcomes,
# latency, resident memory of every process per round). Several minutes; not part of the default run.
# Usage: scripts/soak.sh [pytest args...]
# Sizes: BLOOMDUO_SOAK_ROUNDS (6), BLOOMDUO_SOAK_CLIENTS (64), BLOOMDUO_SOAK_ROUND_S (30 seconds per
# round); BLOOMDUO_SOAK_MODEL=DIR soaks another checkpoint than the tiny demo model.
# BLOOMDUO_VENV=DIR runs it in another virtual environment (scripts/test-venv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/test-venv.sh
exec "$venv/bin/python" -m pytest tests/test_soak.py -m soak -s "$@"
