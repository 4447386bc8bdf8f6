#!/usr/bin/env bash
# Set up a virtual environment from this project's own files (once) and start the whole stack.
# Usage: scripts/up.sh [bloomduo up options...]   e.g. scripts/up.sh --model /models/bloom-7b1
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
# Installed again when pyproject.toml changed since (an entry point or a package mapping may have moved).
if [ ! -x "$venv/bin/bloomduo" ] || [ pyproject.toml -nt "$venv/.installed" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet -c constraints.txt torch
  "$venv/bin/pip" install --quiet -c constraints.txt -e .
  touch "$venv/.installed"
fi
exec "$venv/bin/bloomduo" up "$@"
