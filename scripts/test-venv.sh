# Sourced by the long opt-in runs (soak.sh, chaos.sh): they test the service, not the install, so they
# reuse the environment scripts/test.sh builds, and build it the same way when there is none.
# BLOOMDUO_VENV=DIR picks another virtual environment that has the project's test dependencies.
venv="${BLOOMDUO_VENV:-.venv-test}"
if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    # torch first and pinned: on a CPU machine a bare "torch" requirement would pull a multi-GB CUDA build.
    "$venv/bin/pip" install --quiet -c constraints.txt torch
    "$venv/bin/pip" install --quiet -c constraints.txt -e ".[test]"
fi
# Demo models go into a private cache, never into the user's.
export BLOOMDUO_CACHE="${BLOOMDUO_CACHE:-$(cd "$venv" && pwd)/cache}"
