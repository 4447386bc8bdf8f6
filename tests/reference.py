"""The truth the stack is held to: transformers' BloomForCausalLM on the same checkpoint."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from transformers import BloomForCausalLM
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor


@cache
def hf_model(model_dir: Path, dtype: torch.dtype = torch.float32) -> BloomForCausalLM:
    return BloomForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


@torch.inference_mode()
def hf_greedy(
    model_dir: Path, prompt_ids: list[int], new_tokens: int, repetition_penalty: float = 1.0
) -> tuple[list[int], list[float]]:
    """Greedy continuation and each chosen token's log_softmax(logits), ignoring EOS; with a repetition
    penalty, of the logits transformers' RepetitionPenaltyLogitsProcessor makes over every token so far."""
    model = hf_model(model_dir)
    ids = torch.tensor([prompt_ids])
    out = model(ids, use_cache=True)
    penalty = RepetitionPenaltyLogitsProcessor(repetition_penalty)
    chosen: list[int] = []
    logprobs: list[float] = []
    for _ in range(new_tokens):
        scores = out.logits[0, -1].float()
        if repetition_penalty != 1.0:
            scores = penalty(torch.tensor([prompt_ids + chosen]), scores[None])[0]
        logp = torch.log_softmax(scores, dim=-1)
        token = int(torch.argmax(logp))
        chosen.append(token)
        logprobs.append(float(logp[token]))
        out = model(torch.tensor([[token]]), cache=out.cache, use_cache=True)
    return chosen, logprobs


@torch.inference_mode()
def hf_log_softmax(model_dir: Path, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: row i is log_softmax of the logits after ids[: i + 1], in float32."""
    return torch.log_softmax(hf_model(model_dir)(torch.tensor([ids])).logits[0].float(), dim=-1)
