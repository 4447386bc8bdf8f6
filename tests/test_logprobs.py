"""summarize: a worker's summary of its vocabulary slice (best logit, its column, log-sum-exp) per row;
join_slices: the gateway's pick over all slices from those summaries."""

from __future__ import annotations

import itertools

import pytest
import torch

from bloomduo.core import logprobs
from bloomduo.core.logprobs import summarize


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_bytes", [1, 3 * 4 * 1000, 1 << 20])  # a row, 3 rows, every row at a time
def test_summarize_in_row_blocks_equals_the_whole_rows_in_float64(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, block_bytes: int
) -> None:
    monkeypatch.setattr(logprobs, "SUMMARY_BLOCK_BYTES", block_bytes)
    rows = (torch.randn(7, 1000, generator=torch.Generator().manual_seed(0)) * 8).to(dtype)
    rows[2, 17] = rows[2, 900] = rows[2].max() + 1  # a tie: the lower column wins, as argmax's
    best, index, logsumexp = summarize(rows[:, :1000])
    exact = rows.double()
    assert torch.equal(index, exact.argmax(dim=-1))
    assert index[2] == 17
    assert torch.equal(best, exact.max(dim=-1).values.float())
    torch.testing.assert_close(logsumexp.double(), torch.logsumexp(exact, dim=-1), rtol=2e-7, atol=0)
    # The blocks change nothing: each row's sum is computed exactly as when all rows go at once.
    monkeypatch.setattr(logprobs, "SUMMARY_BLOCK_BYTES", 1 << 30)
    assert torch.equal(summarize(rows).logsumexp, logsumexp)


@pytest.mark.parametrize("slices", [1, 2, 3, 4])
def test_joined_slice_summaries_pick_what_the_whole_row_picks(slices: int) -> None:
    rows = torch.randn(6, 1000, generator=torch.Generator().manual_seed(slices)) * 8
    rows[3, 10] = rows[3, 990] = rows[3].max() + 1  # a tie across slices: the lower token wins, as argmax's
    bounds = [1000 * part // slices for part in range(slices + 1)]
    summaries = [summarize(rows[:, start:end]) for start, end in itertools.pairwise(bounds)]
    joined = logprobs.join_slices(
        [s.best_logit.tolist() for s in summaries],
        [(s.best_index + start).tolist() for s, start in zip(summaries, bounds, strict=False)],
        [s.logsumexp.tolist() for s in summaries],
    )
    exact = torch.log_softmax(rows.double(), dim=-1)
    assert [token for token, _ in joined] == exact.argmax(dim=-1).tolist()
    assert joined[3][0] == 10
    for (token, logprob), row in zip(joined, exact, strict=True):
        # the slices' float32 log-sum-exps, joined in float64: within a few float32 roundings of the row's
        assert logprob == pytest.approx(float(row[token]), abs=4 * 2**-23 * (abs(float(row[token])) + 8))
