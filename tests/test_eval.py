"""`bloomduo eval` against the real stack on the tiny demo model: float32 parity shows as full agreement."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from bloomduo.apps import eval as bloomduo_eval

TEXT = "The quick brown fox jumps over the lazy dog. 北京是中国的首都。 def add(a, b):\n    return a + b\n"


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    bloomduo_eval.add_arguments(parser)
    return bloomduo_eval.run(parser.parse_args(argv))


def _check(report: dict, prompts: int) -> None:
    assert len(report["prompts"]) == prompts
    for row in report["prompts"]:
        assert row["generated_tokens"] == 8
        assert row["agreement"] == 1.0 and row["first_divergence"] is None, row
        assert row["max_abs_logprob_diff"] < 1e-4, row


def test_eval_of_a_running_stack(tiny_stack, demo_model: Callable[..., Path], tmp_path: Path, capsys) -> None:
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 4, encoding="utf-8")
    out = tmp_path / "eval.json"
    argv = ["--model", str(demo_model()), "--target", tiny_stack.target, "--dtype", "float32"]
    assert _run(*argv, "--max-new-tokens", "8", "--text", str(text), "--json", str(out)) == 0

    report = json.loads(out.read_text(encoding="utf-8"))
    _check(report, len(bloomduo_eval.DEFAULT_PROMPTS))
    assert report["stack"]["num_shards"] == 2
    ppl = report["perplexity"]
    assert ppl["tokens"] > 50 and ppl["in_process_dtype"] == "float32"
    assert ppl["bloomduo_in_process"] == pytest.approx(ppl["transformers"], rel=1e-3)
    assert ppl["relative_difference"] < 1e-3

    printed = capsys.readouterr().out
    assert "'北京是中国的首都，'" in printed and "bloomduo model (in-process, float32, cpu)" in printed
    assert "not through the deployed stack" in printed


def test_eval_launches_a_stack_with_a_prompts_file(
    demo_model: Callable[..., Path], tmp_path: Path, capsys
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\n\nBonjour 🌍! Les\n", encoding="utf-8")
    argv = ["--model", str(demo_model()), "--prompts", str(prompts)]
    assert _run(*argv, "--max-new-tokens", "8", "--json", str(tmp_path / "eval.json")) == 0
    report = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))
    _check(report, 2)
    assert report["stack"]["num_shards"] == 2 and "perplexity" not in report
    assert "Bonjour" in capsys.readouterr().out


def test_bad_input_exits_1(demo_model: Callable[..., Path], tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    assert _run("--model", str(demo_model()), "--prompts", str(empty)) == 1
    assert "holds no prompts" in capsys.readouterr().err
