"""lm-evaluation-harness against the stack: its `local-completions` model over our OpenAI HTTP front must
score a multiple-choice task exactly as its own `hf` model scores the same float32 checkpoint in-process.

Run by scripts/lm_eval_check.sh, inside the environment that script builds (lm-eval pinned, the project
installed). Steps: a float32 demo checkpoint, a small multiple-choice task written to local files (lm-eval's
`json` dataset builder, no hub), `lm_eval --model local-completions` against a `bloomduo up` of its own,
`lm_eval --model hf` on the same directory, then a comparison of every sample lm-eval logged: each choice's
loglikelihood within --tolerance and the same accuracy. Exits 1 on a mismatch, 2 when a step fails.

Random weights are enough: the claim is that the two paths compute the same numbers, not that the model
knows arithmetic. Everything is local: the HF_*_OFFLINE variables make any attempt to reach a hub fail
instead of downloading.
"""

from __future__ import annotations

import argparse
import glob
import importlib.resources
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import tokenizers

TASK = "bloomduo_mc"
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


class CheckFailed(Exception):
    """A step could not run (not a mismatch): exit status 2."""


def write_task(
    directory: Path, questions: int, long_questions: int, long_tokens: int, seed: int, tokenizer_json: Path
) -> tuple[Path, int]:
    """Arithmetic questions with 2, 3 or 4 choices each (the count varies, as in real MC tasks, so a
    choice/request misalignment in either path would show), one JSON object a line. The last
    `long_questions` open with a passage of `long_tokens` tokens, as few-shot prompts (MMLU's, say) run
    past the server's default --max-input-tokens of 1024; with --up-args "--max-batch-prefill-tokens N"
    their prefill runs in chunks. The YAML, and the longest prompt in tokens."""
    tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    corpus = (importlib.resources.files("bloomduo.apps") / "demo_corpus.txt").read_text()
    while len(tokenizer.encode(corpus).ids) <= long_tokens:
        corpus += "\n" + corpus
    passage = corpus[: tokenizer.encode(corpus).offsets[long_tokens][0]].strip()
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "mc.jsonl"
    longest = 0
    with data.open("w") as out:
        for i in range(questions):
            a, b = rng.randint(1, 30), rng.randint(1, 30)
            answer = a + b
            distractors = rng.sample([d for d in range(answer - 9, answer + 10) if d not in (answer, 0)], 3)
            choices = [answer, *distractors[: 1 + i % 3]]
            rng.shuffle(choices)
            question = f"What is {a} plus {b}?"
            if i >= questions - long_questions:
                question = f"{passage}\n{question}"
            doc = {"question": question, "choices": [str(c) for c in choices], "label": choices.index(answer)}
            out.write(json.dumps(doc) + "\n")
            # The template's words around it, and the longest choice: what a request carries at most.
            prompt = f"Question: {question}\nAnswer: {max(choices)}"
            longest = max(longest, len(tokenizer.encode(prompt).ids))
    yaml = directory / f"{TASK}.yaml"
    yaml.write_text(TASK_YAML.format(task=TASK, data=json.dumps(str(data))))
    return yaml, longest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], log: Path, env: dict[str, str]) -> float:
    """Runs a step to completion, its output in `log`; the seconds it took. Its log's tail on failure."""
    print("$ " + " ".join(cmd), flush=True)
    start = time.monotonic()
    with log.open("w") as out, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env) as step:
        try:
            rc = step.wait()
        except BaseException:
            # Stopped from outside (SIGTERM, Ctrl-C): the step must not outlive us.
            step.terminate()
            raise
    if rc != 0:
        raise CheckFailed(f"{cmd[0]} exited {rc}; last lines of {log}:\n{tail(log)}")
    return time.monotonic() - start


def tail(log: Path, lines: int = 25) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


class Stack:
    """`bloomduo up` in a process group of its own, so that stop() reaches its workers even if `up` itself
    is wedged; stopped on every way out (the caller's finally, SIGTERM turned into SystemExit)."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        print("$ " + " ".join(cmd), flush=True)
        self._out = log.open("w")
        self.proc = subprocess.Popen(
            cmd, stdout=self._out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def wait_ready(self, http_port: int, timeout_s: float) -> None:
        # /health answers 200 only once every worker serves (503 while loading), and needs no token.
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CheckFailed(
                    f"bloomduo up exited {self.proc.returncode}; last lines of {self.log}:\n{tail(self.log)}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise CheckFailed(
            f"the stack did not serve within {timeout_s:.0f} s; last lines of {self.log}:\n{tail(self.log)}"
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            # SIGTERM is `up`'s orderly stop (drains, stops its workers); the group kill is only the fallback.
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._out.close()


def served_model(http_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/models", timeout=5) as reply:
        return json.load(reply)["data"][0]["id"]


def load_run(output_dir: Path) -> tuple[dict[int, dict], float]:
    """lm-eval's logged samples by doc_id, and the task's acc from its results file."""
    samples_files = glob.glob(str(output_dir / "**" / f"samples_{TASK}_*.jsonl"), recursive=True)
    results_files = glob.glob(str(output_dir / "**" / "results_*.json"), recursive=True)
    if len(samples_files) != 1 or len(results_files) != 1:
        raise CheckFailed(
            f"expected one samples and one results file under {output_dir}, "
            f"found {samples_files + results_files}"
        )
    samples = {}
    with open(samples_files[0]) as f:
        for line in f:
            sample = json.loads(line)
            samples[sample["doc_id"]] = sample
    acc = json.loads(Path(results_files[0]).read_text())["results"][TASK]["acc,none"]
    return samples, acc


def compare(hf_dir: Path, api_dir: Path, tolerance: float) -> bool:
    """Prints the comparison table; whether everything agreed."""
    hf, hf_acc = load_run(hf_dir)
    api, api_acc = load_run(api_dir)
    problems = []
    if hf.keys() != api.keys():
        problems.append(f"different questions: hf {sorted(hf)} vs local-completions {sorted(api)}")
    max_delta, worst, choices, greedy_agree, acc_agree = 0.0, None, 0, 0, 0
    # The smallest gap between the two likeliest choices of a question: if it were under the tolerance,
    # equal accuracies would be luck, not evidence.
    min_margin = float("inf")
    for doc_id in sorted(hf.keys() & api.keys()):
        # filtered_resps: one [loglikelihood, is_greedy] per choice, in the task's choice order.
        ours, theirs = api[doc_id]["filtered_resps"], hf[doc_id]["filtered_resps"]
        if len(ours) != len(theirs):
            problems.append(f"doc {doc_id}: {len(ours)} choices scored over HTTP, {len(theirs)} by hf")
            continue
        for index, ((ll_api, greedy_api), (ll_hf, greedy_hf)) in enumerate(zip(ours, theirs, strict=True)):
            delta = abs(float(ll_api) - float(ll_hf))
            choices += 1
            greedy_agree += greedy_api == greedy_hf
            if delta > max_delta:
                max_delta, worst = delta, (doc_id, index, float(ll_hf), float(ll_api))
        top = sorted((float(ll) for ll, _ in theirs), reverse=True)
        if len(top) > 1:
            min_margin = min(min_margin, top[0] - top[1])
        acc_agree += api[doc_id]["acc"] == hf[doc_id]["acc"]
    if max_delta > tolerance:
        doc_id, index, ll_hf, ll_api = worst
        problems.append(
            f"doc {doc_id} choice {index}: loglikelihood {ll_api:.6f} over HTTP vs {ll_hf:.6f} by hf "
            f"(|Δ| {max_delta:.2e} > {tolerance:g})"
        )
    if api_acc != hf_acc or acc_agree != len(hf):
        problems.append(
            f"accuracy differs: {api_acc} over HTTP vs {hf_acc} by hf ({acc_agree}/{len(hf)} questions agree)"
        )

    print()
    print(f"| {TASK} | questions | choices | max abs Δ loglikelihood | acc |")
    print("|---|---:|---:|---:|---:|")
    print(f"| lm-eval `hf` (transformers, in-process) | {len(hf)} | {choices} | (reference) | {hf_acc:.4f} |")
    print(
        f"| lm-eval `local-completions` (bloomduo HTTP) | {len(api)} | {choices} | "
        f"{max_delta:.2e} | {api_acc:.4f} |"
    )
    print(
        f"\ntolerance {tolerance:g}; per-question acc agrees {acc_agree}/{len(hf)}; is_greedy agrees "
        f"{greedy_agree}/{choices}; smallest gap between a question's two likeliest choices {min_margin:.2e}"
    )
    for problem in problems:
        print(f"MISMATCH: {problem}")
    if not problems:
        print("OK: local-completions scores every choice as hf does, and the accuracy is the same.")
    return not problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="demo-model shape (bloomduo demo-model --preset)")
    parser.add_argument("--num-shards", type=int, default=2)
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--long-questions", type=int, default=3, help="of them, how many open with a passage")
    parser.add_argument("--long-tokens", type=int, default=1500, help="the passage's length in tokens")
    parser.add_argument(
        "--up-args", default="", help='more `bloomduo up` flags, e.g. "--max-batch-prefill-tokens 256"'
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the questions")
    parser.add_argument("--batch-size", default="1", help="lm-eval --batch_size for both models")
    parser.add_argument("--num-concurrent", type=int, default=1, help="local-completions' parallel requests")
    parser.add_argument(
        "--string-prompts",
        action="store_true",
        help="tokenized_requests=False: lm-eval sends text, which the server tokenizes",
    )
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument(
        "--workdir", type=Path, help="keep the checkpoint, task, logs and lm-eval outputs here"
    )
    args = parser.parse_args()

    bin_dir = Path(sys.executable).parent
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bloomduo-lmeval-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # Nothing from a hub: datasets' json builder and transformers' loaders must find everything on disk,
    # and fail rather than download. A private HF_HOME keeps datasets' cache out of the user's.
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(workdir / "hf-home"),
    )
    # SIGTERM (a CI timeout, kill) must run the finally below, which stops the stack.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    # The seed in the name: a kept --workdir reuses a checkpoint only when it has the weights asked for.
    model = workdir / f"bloom-{args.preset}-f32-seed{args.seed}"
    timings: dict[str, float] = {}
    stack = None
    try:
        if not (model / "config.json").exists():
            timings["checkpoint"] = run(
                [str(bin_dir / "bloomduo"), "demo-model", str(model), "--preset", args.preset,
                 "--dtype", "float32", "--seed", str(args.seed)],
                workdir / "demo-model.log", env,
            )  # fmt: skip
        task_yaml, longest = write_task(
            workdir / "task",
            args.questions,
            args.long_questions,
            args.long_tokens,
            args.seed,
            model / "tokenizer.json",
        )
        common = [
            "--tasks", TASK, "--include_path", str(task_yaml.parent), "--batch_size", args.batch_size,
            "--log_samples", "--seed", str(args.seed),
        ]  # fmt: skip

        port, http_port = free_port(), free_port()
        start = time.monotonic()
        stack = Stack(
            [str(bin_dir / "bloomduo"), "up", "--model", str(model), "--dtype", "float32",
             "--num-shards", str(args.num_shards), "--port", str(port), "--http-port", str(http_port),
             # lm-eval sends up to its max_length (2048, BLOOM's training length) - 1 prompt tokens, and
             # asks for one more: the default 1024 would refuse longer prompts with 400.
             "--max-input-tokens", "2047", *shlex.split(args.up_args)],
            workdir / "up.log", env,
        )  # fmt: skip
        stack.wait_ready(http_port, timeout_s=300)
        timings["stack start"] = time.monotonic() - start
        name = served_model(http_port)
        api_dir = workdir / "out-local-completions"
        shutil.rmtree(api_dir, ignore_errors=True)
        # tokenized_requests=True (local-completions' default, spelled out): lm-eval tokenizes context and
        # continuation itself with the checkpoint's tokenizer and sends token ids, so both models score the
        # very same tokens. With False it sends their decoded text, and relies on the server's tokenizer
        # giving those tokens back. max_retries=1: a refusal fails the run rather than being retried.
        model_args = (
            f"model={name},base_url=http://127.0.0.1:{http_port}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={model},tokenized_requests={not args.string_prompts},"
            f"num_concurrent={args.num_concurrent},max_retries=1"
        )
        timings["local-completions"] = run(
            [str(bin_dir / "lm_eval"), "--model", "local-completions", "--model_args", model_args, *common,
             "--output_path", str(api_dir)],
            workdir / "lm_eval-local-completions.log", env,
        )  # fmt: skip
        # Stopped before the hf run, so the two do not share the CPU.
        stack.stop()
        stack = None

        hf_dir = workdir / "out-hf"
        shutil.rmtree(hf_dir, ignore_errors=True)
        timings["hf"] = run(
            [str(bin_dir / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
             "--device", "cpu", *common, "--output_path", str(hf_dir)],
            workdir / "lm_eval-hf.log", env,
        )  # fmt: skip

        ok = compare(hf_dir, api_dir, args.tolerance)
        print(f"longest prompt: {longest} tokens")
        print("seconds: " + ", ".join(f"{step} {seconds:.1f}" for step, seconds in timings.items()))
        if args.workdir:
            print(f"files: {workdir}")
        elif ok:
            shutil.rmtree(workdir)
        else:
            print(f"files kept for a look: {workdir}")
        return 0 if ok else 1
    except CheckFailed as failure:
        print(f"FAILED: {failure}\nfiles kept for a look: {workdir}", file=sys.stderr)
        return 2
    finally:
        if stack is not None:
            stack.stop()


if __name__ == "__main__":
    sys.exit(main())
