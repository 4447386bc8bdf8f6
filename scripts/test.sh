#!/usr/bin/env bash
# Build a fresh virtual environment from this project's own files, then lint and run every test.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
# docker-compose (Debian's) validates the compose files; installed when missing and run as root.
bash .ci/install-system-deps
venv=.venv-test
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
# torch first and pinned: on a CPU machine a bare "torch" requirement would pull a multi-GB CUDA build.
"$venv/bin/pip" install --quiet -c constraints.txt torch
"$venv/bin/pip" install --quiet -c constraints.txt -e ".[test]"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
# The import contracts (pyproject.toml). import-linter reads packages from disk, and bloomduo.gateway & co
# live in folders that the editable install maps, so it reads a wheel's layout built into a scratch folder.
layout=$(mktemp -d)
trap 'rm -rf "$layout" build' EXIT
rm -rf build  # setuptools builds in ./build; a stale copy would carry deleted modules into the layout
"$venv/bin/pip" install --quiet --no-deps --target "$layout" .
(cd "$layout" && PYTHONPATH="$layout" "$OLDPWD/$venv/bin/lint-imports" "$OLDPWD/pyproject.toml")
# Tests write demo models into a private cache, never into the user's.
export BLOOMDUO_CACHE="${BLOOMDUO_CACHE:-$PWD/$venv/cache}"
"$venv/bin/python" -m pytest "$@"
