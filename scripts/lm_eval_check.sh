#!/usr/bin/env bash
# lm-evaluation-harness against the stack: its `local-completions` model over the OpenAI HTTP front scores a
# small multiple-choice task (local files, no hub) with the same per-choice loglikelihoods (within 1e-3)
# and the same accuracy as its own `hf` model on the same float32 checkpoint (scripts/lm_eval_check.py).
# A script rather than a test: lm-eval brings ~50 packages (pandas, pyarrow, scipy, scikit-learn,
# datasets, nltk) that the test command should not have to install.
# Usage: scripts/lm_eval_check.sh [--workdir DIR] [--preset tiny] [--num-shards W] [--questions N]
#        [--long-questions L] [--batch-size B] [--num-concurrent C] [--up-args "FLAGS"] [--tolerance T]
#        (all of them: scripts/lm_eval_check.sh --help)
# Exit status: 0 agreed, 1 a mismatch, 2 a step failed. BLOOMDUO_LMEVAL_VENV=DIR puts its environment
# elsewhere (default .venv-lmeval, built on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
# lm-eval 0.4.13 accepts the transformers that constraints.txt pins (it asks transformers>=4.1); [api]
# brings tenacity for local-completions, [hf] accelerate for the hf model.
LM_EVAL="lm-eval[api,hf]==0.4.13"
venv="${BLOOMDUO_LMEVAL_VENV:-.venv-lmeval}"
stamp="$venv/.bloomduo-lmeval"
want="$LM_EVAL $(sha256sum constraints.txt pyproject.toml | sha256sum | cut -c1-16)"
if [[ ! -x "$venv/bin/lm_eval" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    echo "building $venv ($LM_EVAL and the project; once)" >&2
    python3 -m venv "$venv"
    # torch first and pinned: on a CPU machine a bare "torch" requirement would pull a multi-GB CUDA build.
    "$venv/bin/pip" install --quiet -c constraints.txt torch
    "$venv/bin/pip" install --quiet -c constraints.txt -e . "$LM_EVAL"
    echo "$want" >"$stamp"
fi
# Demo checkpoints and whatever else bloomduo caches go into a private cache, never into the user's.
export BLOOMDUO_CACHE="${BLOOMDUO_CACHE:-$(cd "$venv" && pwd)/cache}"
exec "$venv/bin/python" scripts/lm_eval_check.py "$@"
