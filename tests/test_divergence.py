"""Divergence analysis, the numbers (harness/results/divergence.py): computed by hand, numpy and scipy on
small fixed inputs. Real runners and a whole run: tests/test_analysis.py."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import rel_entr, softmax

from harness.core.decoding import Prompt
from harness.core.status import Status
from harness.results.divergence import (
    divergence_facts,
    encoder_snr,
    features_like,
    summarize_divergence,
    teacher_forced_metrics,
    teacher_targets,
    top_choices,
    verdict,
)

pytestmark = pytest.mark.unit  # pure logic: the unit tier

# a 6-token vocabulary: 0 = start, 5 = EOT, 4 never sampled, 3 (blank) not first
TOY = Prompt(tokens=(0,), eot=5, suppress=(4,), suppress_at_begin=(3, 5), max_new_tokens=3, n_ctx=10)


def test_encoder_snr_by_hand():
    ref = np.array([[[1.0, 2.0], [3.0, 4.0]]], np.float32)
    cand = ref + np.array([[[0.1, 0.0], [0.0, -0.2]]], np.float32)
    # Σ ref² = 30, Σ (ref - cand)² = 0.05
    snr, note = encoder_snr(torch.from_numpy(ref), cand)  # a torch reference, a numpy candidate
    assert note is None and snr == pytest.approx(10 * math.log10(30 / 0.05), abs=1e-4)
    assert encoder_snr(ref, ref.copy()) == (math.inf, None)  # identical: +inf, kept as such
    snr, note = encoder_snr(ref, ref[:, :1])
    assert snr is None and "(1, 1, 2)" in note
    snr, note = encoder_snr(ref, object())
    assert snr is None and "is not an array" in note


def test_features_are_swapped_only_as_arrays_of_one_shape():
    array = np.ones((1, 3, 2), np.float32)
    as_numpy = features_like(array, np.zeros((1, 3, 2), np.float16))
    assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == np.float16
    as_tensor = features_like(array, torch.zeros(1, 3, 2, dtype=torch.float64))
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.dtype == torch.float64 and float(as_tensor.sum()) == 6
    assert features_like(array, torch.zeros(1, 2, 3)) is None
    assert features_like(array, object()) is None


def test_teacher_forced_metrics_by_hand():
    ref = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 1.0, 4.0]], np.float32)
    cand = np.array([[2.5, 1.0, 0.0], [0.0, 1.0, 2.0], [1.0, 1.0, 4.0]], np.float32)
    out = teacher_forced_metrics(ref, cand)
    kl = [rel_entr(softmax(r.astype(float)), softmax(c.astype(float))).sum() for r, c in zip(ref, cand, strict=True)]
    assert kl[2] == 0 and kl[1] > kl[0] > 0
    assert out["tf_steps"] == 3 and out["tf_top1_agree"] == 2 and out["tf_top1_agreement"] == pytest.approx(2 / 3)
    assert out["tf_max_abs_dlogit"] == 2.0  # step 1, token 1: 3 - 1
    assert out["tf_mean_kl"] == pytest.approx(np.mean(kl), rel=1e-12)
    assert out["tf_max_kl"] == pytest.approx(kl[1], rel=1e-12)
    with pytest.raises(ValueError):
        teacher_forced_metrics(ref, cand[:2])


def test_teacher_targets_end_with_eot_within_the_step_limit():
    assert teacher_targets([1, 2], TOY) == [1, 2, 5]
    assert teacher_targets([1, 2, 3, 1], TOY) == [1, 2, 3]  # cut by the limit: no EOT


def test_top_choices_follow_the_loop_rules():
    logits = np.array([0.0, 1.0, 2.0, 5.0, 9.0, 3.0], np.float32)
    # first step: 4 never, 3 and 5 not first; left: 0, 1, 2
    first = top_choices(logits, TOY, step=0, k=3)
    p = softmax([0.0, 1.0, 2.0])
    assert [i for i, _ in first] == [2, 1, 0]
    assert [q for _, q in first] == pytest.approx([p[2], p[1], p[0]], rel=1e-12)
    later = top_choices(logits, TOY, step=1, k=2)  # blank and EOT allowed now
    p = softmax([0.0, 1.0, 2.0, 5.0, 3.0])
    assert later == [(3, pytest.approx(p[3], rel=1e-12)), (5, pytest.approx(p[4], rel=1e-12))]


def test_first_divergence_facts_by_hand():
    def decode(ids):
        return "".join(f"<{i}>" for i in ids)

    ref_logits = np.array([[0, 4, 1, 0, 0, 0], [0, 0, 3, 2, 0, 0], [0, 0, 0, 0, 0, 7]], np.float32)
    cand_logits = np.array([[0, 4, 1, 0, 0, 0], [0, 0, 2, 3, 0, 0], [0, 0, 0, 0, 0, 7]], np.float32)
    assert divergence_facts([1, 2], [1, 2], ref_logits, cand_logits, TOY, decode) == {}
    facts = divergence_facts([1, 2], [1, 3, 1], ref_logits, cand_logits, TOY, decode)
    assert facts["first_divergence"] == 1
    assert (facts["ref_token_id"], facts["cand_token_id"], facts["ref_token"], facts["cand_token"]) == (
        2,
        3,
        "<2>",
        "<3>",
    )
    assert (facts["common_prefix_text"], facts["ref_continuation"], facts["cand_continuation"]) == (
        "<1>",
        "<2>",
        "<3><1>",
    )
    p_ref, p_cand = softmax([0, 0, 3, 2, 0]), softmax([0, 0, 2, 3, 0])  # token 4 is never sampled
    assert [(c["id"], c["token"]) for c in facts["ref_top5"][:2]] == [(2, "<2>"), (3, "<3>")]
    assert facts["ref_top5"][0]["p"] == pytest.approx(p_ref[2]) and facts["cand_top5"][0]["p"] == pytest.approx(
        p_cand[3]
    )
    assert facts["cand_top5"][0]["id"] == 3 and len(facts["cand_top5"]) == 5
    ended = divergence_facts([1, 2], [1], ref_logits, cand_logits, TOY, decode)  # the candidate stopped
    assert (ended["first_divergence"], ended["cand_token_id"], ended["cand_continuation"]) == (1, 5, "")


def test_verdict():
    assert verdict([], [], []) == "-"
    assert verdict([True, True], [False], [True]) == "none"
    assert verdict([False, True], [], []) == "unknown"
    assert verdict([False, True], [False, False], [True, True]) == "encoder"
    assert verdict([False, False], [False, True], [False, False]) == "decoder"  # 2 ≥ 2·1
    assert verdict([False, False, False], [False, False, True], [False, False, True]) == "both"
    assert verdict([False, True], [True, True], [True, True]) == "both"  # only the two together


def test_summary_by_hand():
    rows = pd.DataFrame(
        {
            "size": "tiny.en", "target": "onnx", "quant": "int8", "utt_id": ["a", "b", "c"],
            "status": ["ok", "ok", "unavailable"], "error": [None, None, "decoded in long form"],
            "encoder_snr_db": [20.0, 30.0, None], "tf_steps": [10, 30, None], "tf_top1_agree": [9, 30, None],
            "tf_max_abs_dlogit": [1.5, 0.5, None], "tf_mean_kl": [0.2, 0.1, None], "tf_max_kl": [0.9, 0.3, None],
            "exact_match": [False, True, None], "hybrid_cand_encoder_exact": [False, True, None],
            "hybrid_cand_decoder_exact": [True, True, None],
        }
    )  # fmt: skip
    (s,) = summarize_divergence(rows).to_dict("records")
    assert (s["n"], s["analysed"], s["tf_steps"]) == (3, 2, 40)
    assert (s["encoder_snr_mean_db"], s["encoder_snr_min_db"]) == (25.0, 20.0)
    assert s["tf_top1_agreement"] == 39 / 40 and s["tf_max_abs_dlogit"] == 1.5 and s["tf_max_kl"] == 0.9
    assert s["tf_mean_kl"] == pytest.approx((0.2 * 10 + 0.1 * 30) / 40)
    assert (s["exact_match"], s["exact_cand_encoder"], s["exact_cand_decoder"], s["verdict"]) == (
        0.5,
        0.5,
        1.0,
        "encoder",
    )
    assert s["reason"] == "1 not analysed, e.g. decoded in long form"


def test_what_is_not_analysed_says_why():
    """From the main pass's rows: an utterance either model did not transcribe, or decoded in long
    form, gets its reason; the others their tokens."""
    from harness.core.decoding import LONG_FORM, SHORT_FORM
    from harness.job.spec import ModelCell
    from harness.results.run_dir import raw_frame
    from harness.results.schema import row
    from harness.run.divergence_pass import Transcripts, transcripts_of

    ref, cand = ModelCell("tiny.en", "reference", "fp32"), ModelCell("tiny.en", "onnx", "int8")
    ok = Status.OK
    raw = raw_frame(
        [
            row(ref, "a", "", ok, hyp_tokens=[1, 2], decoding=SHORT_FORM),
            row(cand, "a", "", ok, hyp_tokens=[1, 3], decoding=SHORT_FORM),
            row(ref, "b", "", ok, hyp_tokens=[1], decoding=LONG_FORM),
            row(cand, "b", "", ok, hyp_tokens=[1], decoding=LONG_FORM),
            row(ref, "c", "", Status.ERROR, "cannot decode audio"),
            row(cand, "c", "", Status.ERROR, "cannot decode audio"),
            row(ref, "d", "", ok, hyp_tokens=[4], decoding=SHORT_FORM),
            row(cand, "d", "", Status.WORKER_FAILED, "HarnessError: sha256 differs"),
        ]
    )
    got = transcripts_of(raw, cand)
    assert got["a"] == Transcripts((1, 2), (1, 3))
    assert got["b"].startswith("decoded in long form")
    assert got["c"] == "the reference has no transcript of it (error: cannot decode audio)"
    assert got["d"] == "the candidate has no transcript of it (worker failed: HarnessError: sha256 differs)"
