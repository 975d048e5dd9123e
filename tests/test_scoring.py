"""Scoring rules that need no model: divergence indices and the paired bootstrap."""

from __future__ import annotations

import pandas as pd
import pytest

from harness.results.scoring import first_divergence
from harness.results.summary import wer_delta

pytestmark = pytest.mark.unit  # pure logic: the unit tier


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 9, 3], [1, 2, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2
    assert first_divergence([], [5]) == 0


def _rows(errors: list[int], words: list[int], failed: tuple[int, ...] = ()) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "utt_id": [f"u{i}" for i in range(len(errors))],
            "wer_errors": errors,
            "ref_words": words,
            "status": [("error" if i in failed else "ok") for i in range(len(errors))],
        }
    )


def test_wer_delta_pairs_utterances_and_brackets_the_estimate():
    words = [10, 20, 5, 30, 15, 8, 12, 25]
    ref = _rows([1, 2, 0, 3, 1, 0, 1, 2], words)
    worse = _rows([2, 4, 1, 5, 2, 1, 2, 3], words)
    delta, lo, hi = wer_delta(worse, ref)
    assert delta == (20 - 10) / sum(words)
    assert 0 < lo <= delta <= hi
    same = wer_delta(ref, ref)
    assert same == (0.0, 0.0, 0.0)
    # an utterance the model failed on is left out of both sides
    partial = wer_delta(_rows([1, 2, 0, 3, 1, 0, 1, 50], words, failed=(7,)), ref)
    assert partial[0] == 0.0
