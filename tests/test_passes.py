"""What every pass checks of its rows before they count (`harness.run.passes.Pass.check_complete`):
exactly one per model and utterance, else an error that names what is missing, repeated or
unexpected."""

from __future__ import annotations

import pytest

from harness.core.status import Status
from harness.job.spec import ModelCell
from harness.results.divergence import divergence_row
from harness.results.run_dir import raw_frame
from harness.results.schema import row
from harness.run.divergence_pass import ANALYSIS
from harness.run.execute import TRANSCRIPTION

pytestmark = pytest.mark.unit

IDS = [f"u{i}" for i in range(4)]
REF, TS = ModelCell("tiny.en", "reference", "fp32"), ModelCell("tiny.en", "torchscript", "fp32")
TRIMMED = ModelCell("tiny.en", "reference", "fp32", 750)


def _index() -> tuple[list[str], list[str]]:
    return IDS, [""] * len(IDS)


def _rows(*per_model: tuple[ModelCell, list[str]]):
    return raw_frame([row(cell, u, "", Status.OK) for cell, ids in per_model for u in ids])


def test_one_row_per_model_and_utterance_passes():
    TRANSCRIPTION.check_complete(_rows((REF, IDS), (TRIMMED, IDS)), [REF, TRIMMED], len(IDS), _index)
    analysis = divergence_row(TS, "u0", Status.OK), divergence_row(TS, "u1", Status.UNAVAILABLE, "long form")
    ANALYSIS.check_complete(ANALYSIS.frame(list(analysis)), [TS], 2, lambda: (["u0", "u1"], ["", ""]))
    ANALYSIS.check_complete(ANALYSIS.frame([]), [], 2, _index)  # no candidates: no rows


def test_what_is_missing_repeated_or_unexpected_is_named():
    rows = _rows((REF, ["u0", "u1", "u1", "u9"]), (TS, IDS))
    with pytest.raises(RuntimeError) as raised:
        TRANSCRIPTION.check_complete(rows, [REF, TRIMMED], len(IDS), _index)
    assert str(raised.value) == (
        "transcription: not one row per model and utterance: "
        "tiny.en/reference/fp32: more than one row for u1; "
        "tiny.en/reference/fp32: 2 of 4 utterances missing (u2, u3); "
        "tiny.en/reference/fp32: utterances not in the dataset (u9); "
        "tiny.en/reference/fp32@ctx750: no rows; "
        "tiny.en/torchscript/fp32: rows of a model the job does not have"
    )


def test_the_index_is_read_only_to_name_what_is_missing():
    def unread() -> tuple[list[str], list[str]]:
        raise AssertionError("the index was read")

    TRANSCRIPTION.check_complete(_rows((REF, IDS)), [REF], len(IDS), unread)
    with pytest.raises(RuntimeError, match=r"more than one row for u0, u1, u2$"):
        TRANSCRIPTION.check_complete(_rows((REF, ["u0", "u0", "u1", "u1", "u2", "u2"])), [REF], 3, unread)
