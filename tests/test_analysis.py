"""The divergence analysis pass (harness/run/divergence_pass.py) with real tiny.en runners on real audio:
identity, a degraded int8 candidate checked against openai-whisper's own logits, an engine whose
features cannot be swapped; then a whole run with `analysis: {divergence: true}`."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import rel_entr, softmax

from harness.core.decoding import DecodingOptions, build_prompt, greedy_decode, tokenizer_for
from harness.core.status import Status
from harness.results.divergence import DIVERGENCE_COLUMNS
from tests.nightly_runs import in_process

# -- real tiny.en runners on real audio ------------------------------------------------------------

# short utterances (2-3.5 s): two tiny.en's int8 forms transcribe as the reference does, and two
# where they diverged here (at the first token and at the third; int8 kernels depend on the CPU)
SAME = ("2830-3980-0043", "1089-134691-0000")
DIVERGED = ("1089-134686-0001", "2414-128291-0003")


@pytest.fixture(scope="module")
def short(embedded_utterances):
    return {u.utt_id: u for u in embedded_utterances if u.utt_id in SAME + DIVERGED}


@pytest.fixture(scope="module")
def tiny_prompt(tiny_dims):
    return build_prompt(tiny_dims, DecodingOptions())


@pytest.fixture(scope="module")
def analysed(reference, reference_tokens, tiny_dims, tiny_prompt):
    """`analyse` of a runner against the reference: per utterance id its row's facts and the
    runner's own (free-running) tokens."""
    from harness.run.divergence_pass import Transcripts, analyse

    decode = tokenizer_for(tiny_dims, DecodingOptions()).decode

    def run(candidate, utterances):
        out = {}
        for u in utterances:
            own = greedy_decode(candidate, u.audio, tiny_dims, tiny_prompt).tokens
            given = Transcripts(reference_tokens(u), own)
            out[u.utt_id] = analyse(reference, candidate, u.audio, tiny_dims, tiny_prompt, given, decode), list(own)
        return out

    return run


def test_identity_reference_as_candidate_and_torchscript_fp32(analysed, tiny_artifacts, short):
    from converters.reference_target import ReferenceRunner
    from converters.torchscript_mtk_target import MtkTorchScriptRunner

    utterances = [short[SAME[0]]]
    for facts, _ in analysed(ReferenceRunner(tiny_artifacts["reference"]), utterances).values():
        assert facts["encoder_snr_db"] == math.inf and facts["tf_max_abs_dlogit"] == 0 and facts["tf_max_kl"] == 0
        assert facts["tf_top1_agreement"] == 1 and facts["exact_match"] and facts["note"] is None
        assert facts["hybrid_cand_encoder_exact"] and facts["hybrid_cand_decoder_exact"]
        assert "first_divergence" not in facts
    for facts, _ in analysed(MtkTorchScriptRunner(tiny_artifacts["torchscript-mtk"]), utterances).values():
        assert facts["encoder_snr_db"] > 60 and facts["tf_max_abs_dlogit"] < 1e-2 and facts["tf_max_kl"] < 1e-6
        assert facts["tf_top1_agreement"] == 1 and facts["exact_match"]
        assert facts["hybrid_cand_encoder_exact"] and facts["hybrid_cand_decoder_exact"]


@pytest.fixture(scope="module")
def int8_runner(tiny_checkpoint, models_root):
    from converters.registry import get_target
    from converters.store import ensure

    artifact = ensure(tiny_checkpoint, "tiny.en", "torchscript", "int8", models_root)[0]
    return get_target("torchscript").runner(artifact, 1)


def test_degraded_candidate_against_openai_whisper(
    analysed, int8_runner, tiny_checkpoint, tiny_dims, tiny_prompt, reference_tokens, short
):
    """torchscript int8: lower SNR, and at each first divergence top-5s that agree with the logits
    recomputed directly: openai-whisper's decoder on the whole teacher-forced sequence for the
    reference, the candidate's own steps for the candidate; KL and agreement by scipy."""
    from harness.core.audio import log_mel
    from harness.core.weights import load_model

    model = load_model(tiny_checkpoint)
    decode = tokenizer_for(tiny_dims, DecodingOptions()).decode
    rows = analysed(int8_runner, [short[u] for u in DIVERGED])
    diverged = [u for u in DIVERGED if not rows[u][0]["exact_match"]]
    assert diverged, "int8 matched the reference on every utterance: pick others"
    p0 = len(tiny_prompt.tokens)
    for utt_id in diverged:
        (facts, own), ref = rows[utt_id], list(reference_tokens(short[utt_id]))
        assert 5 < facts["encoder_snr_db"] < 40
        mel = log_mel(short[utt_id].audio, tiny_dims.n_mels)
        targets = [*ref, tiny_prompt.eot]
        with torch.inference_mode():
            whole = model.decoder(torch.tensor([[*tiny_prompt.tokens, *targets]]), model.encoder(torch.from_numpy(mel)))
        ref_logits = whole[0, p0 - 1 : p0 - 1 + len(targets)].double().numpy()
        features, cache, cand_logits, tokens = int8_runner.encode(mel), None, [], list(tiny_prompt.tokens)
        for t in targets:
            logits, cache = int8_runner.step(tokens, features, cache)
            cand_logits.append(np.array(logits, np.float64))
            tokens.append(t)
        kl = [rel_entr(softmax(r), softmax(c)).sum() for r, c in zip(ref_logits, cand_logits, strict=True)]
        assert facts["tf_steps"] == len(targets)
        assert facts["tf_mean_kl"] == pytest.approx(np.mean(kl), rel=1e-3, abs=1e-6)
        assert facts["tf_max_kl"] == pytest.approx(max(kl), rel=1e-3, abs=1e-6)
        assert facts["tf_max_abs_dlogit"] == pytest.approx(np.max(np.abs(ref_logits - cand_logits)), abs=1e-3)
        agree = sum(r.argmax() == c.argmax() for r, c in zip(ref_logits, cand_logits, strict=True))
        assert facts["tf_top1_agree"] == agree
        # the first divergence, from the free-running transcripts
        k = next((i for i, (a, b) in enumerate(zip(own, ref, strict=False)) if a != b), min(len(own), len(ref)))
        chosen = [*own, tiny_prompt.eot][k]
        assert (facts["first_divergence"], facts["ref_token_id"], facts["cand_token_id"]) == (k, targets[k], chosen)
        assert facts["ref_token"] == decode([targets[k]]) and facts["cand_token"] == decode([chosen])
        # each top-5 starts with the token its model chose, and holds that step's masked softmax
        for side, logits, token in (("ref", ref_logits[k], targets[k]), ("cand", cand_logits[k], chosen)):
            allowed = np.array(logits, copy=True)
            allowed[list(tiny_prompt.suppress) + (list(tiny_prompt.suppress_at_begin) if k == 0 else [])] = -np.inf
            p = softmax(allowed)
            expected = np.argsort(-p)[:5]
            top = facts[f"{side}_top5"]
            assert top[0]["id"] == token and [c["id"] for c in top] == list(expected)
            assert [c["p"] for c in top] == pytest.approx(p[expected], abs=1e-4)
            assert [c["token"] for c in top] == [decode([int(i)]) for i in expected]
        assert facts["common_prefix_text"] + facts["ref_continuation"] == decode(ref)
        assert facts["common_prefix_text"] + facts["cand_continuation"] == decode(own)
        for hybrid in ("hybrid_cand_encoder", "hybrid_cand_decoder"):
            assert facts[f"{hybrid}_exact"] == (facts[f"{hybrid}_tokens"] == ref)


def test_an_engine_whose_features_cannot_be_swapped_has_no_hybrid_with_its_decoder(
    analysed, tiny_checkpoint, models_root, short
):
    """CTranslate2 decodes by itself and its encoder output is a StorageView: its decoder cannot take
    the reference's features (a reason, not a crash); everything else is measured."""
    from converters.registry import get_target
    from converters.store import ensure

    artifact = ensure(tiny_checkpoint, "tiny.en", "ctranslate2", "int8", models_root)[0]
    ((facts, _),) = analysed(get_target("ctranslate2").runner(artifact, 1), [short[SAME[1]]]).values()
    assert facts["hybrid_cand_decoder_exact"] is None and facts["hybrid_cand_decoder_tokens"] is None
    assert "reference encoder + candidate decoder: not available" in facts["note"] and "StorageView" in facts["note"]
    assert facts["hybrid_cand_encoder_exact"] is not None and 10 < facts["encoder_snr_db"] < 60
    assert facts["tf_steps"] > 0 and 0 < facts["tf_top1_agreement"] <= 1


# -- a whole run -----------------------------------------------------------------------------------


JOB = """
name: divergence_tiny
dataset: {{path: {data}}}
models:
  sizes: [tiny.en]
  targets: {{torchscript: [int8], onnx: [int8]}}
cluster: {{shard_size: 2}}
analysis: {{divergence: true}}
"""


@pytest.fixture(scope="module")
def divergence_run(ray_local, tiny_artifacts, models_root, tmp_path_factory):
    """tiny.en and its torchscript and ONNX int8 forms on the four short utterances, through the
    command line (ONNX's runtime gives its blocks: the layer drift too)."""
    import contextlib
    import io
    import json
    import shutil

    from harness.cli import main
    from tests.conftest import EMBEDDED

    out = tmp_path_factory.mktemp("divergence")
    data = out / "data"
    meta = [json.loads(line) for line in (EMBEDDED / "metadata.jsonl").read_text().splitlines()]
    meta = [m for m in meta if m["id"] in SAME + DIVERGED]
    for m in meta:
        (data / m["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(EMBEDDED / m["file_name"], data / m["file_name"])
    (data / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    job = out / "divergence_tiny.yaml"
    job.write_text(JOB.format(data=data))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["run", str(job), "--out", str(out), "--models", str(models_root), "--no-progress",
                     "--history", str(out / "history.sqlite")])  # fmt: skip
    (run_dir,) = (out / "divergence_tiny").iterdir()
    return {"code": code, "stdout": printed.getvalue(), "run_dir": run_dir, "job": job}


def test_a_run_writes_the_divergence_tables(divergence_run):
    run_dir = divergence_run["run_dir"]
    assert divergence_run["code"] == 0
    every = pd.read_parquet(run_dir / "divergence.parquet")
    assert list(every.columns) == DIVERGENCE_COLUMNS and len(every) == 8 and (every["status"] == Status.OK).all()
    assert set(every["target"]) == {"torchscript", "onnx"} and (every["run_id"] == run_dir.name).all()
    rows = every[every["target"] == "torchscript"]
    assert len(list((run_dir / "divergence").glob("tiny.en__torchscript__int8-shard*.parquet"))) == 2
    # the candidate's own transcripts are the main pass's: the same exact matches and first divergences
    utts = pd.read_parquet(run_dir / "utterances.parquet").query("target == 'torchscript'").set_index("utt_id")
    rows = rows.set_index("utt_id")
    assert (rows["exact_match"] == utts.loc[rows.index, "exact_match"]).all()
    assert rows["first_divergence"].equals(utts.loc[rows.index, "first_divergence"])
    for _, r in rows[~rows["exact_match"]].iterrows():
        assert r["ref_top5"][0]["id"] == r["ref_token_id"] and r["cand_top5"][0]["id"] == r["cand_token_id"]
    assert rows["layer_drift"].isna().all()  # TorchScript gives no block outputs
    summary = pd.read_csv(run_dir / "divergence.csv", keep_default_na=False, na_values=[""]).set_index("target")
    assert sorted(summary.index) == ["onnx", "torchscript"] and list(summary["n"]) == [4, 4]
    ts = summary.loc["torchscript"]
    assert ts["drift_analysed"] == 0 and pd.isna(ts["first_drift_block"])
    assert ts["tf_top1_agreement"] == pytest.approx(rows["tf_top1_agree"].sum() / rows["tf_steps"].sum())
    assert ts["exact_match"] == pytest.approx(utts["exact_match"].mean())
    table = (run_dir / "divergence.md").read_text().strip()
    assert table in divergence_run["stdout"] and divergence_run["stdout"].index(table) > divergence_run["stdout"].index(
        (run_dir / "summary.md").read_text().strip()
    )


def test_the_layer_drift_of_a_model_that_gives_its_blocks(divergence_run):
    """ONNX int8: every divergent utterance, and the sampled agreeing ones, measured block by block;
    the first block below the bar (onnx int8's 12 dB) as the analysis found it."""
    from converters.layer_drift import sampled

    run_dir = divergence_run["run_dir"]
    rows = pd.read_parquet(run_dir / "divergence.parquet").query("target == 'onnx'").set_index("utt_id")
    measured = rows["layer_drift"].notna()
    assert list(measured) == [not exact or sampled(u) for u, exact in rows["exact_match"].items()]
    assert measured.any()
    for utt, drift in rows.loc[measured, "layer_drift"].items():
        blocks = [b["block"] for b in drift]
        assert blocks == [*(f"encoder.blocks.{i}" for i in range(4)), *(f"decoder.blocks.{i}" for i in range(4))]
        below = [b["block"] for b in drift if not b["snr_db"] >= 12.0]
        found = rows.loc[utt, "first_drift_block"]
        assert (None if pd.isna(found) else found) == (below[0] if below else None)
        assert all(10 < b["snr_db"] < 60 for b in drift)  # int8: drifts, within reason
    summary = pd.read_csv(run_dir / "divergence.csv", keep_default_na=False, na_values=[""]).set_index("target")
    assert summary.loc["onnx", "drift_analysed"] == measured.sum()
    # the report's chart: each block's median over the measured utterances
    from harness.report.tables import drift_curves

    curves = drift_curves(run_dir / "divergence.parquet")
    assert list(curves["model"].unique()) == ["tiny.en/onnx/int8"] and len(curves) == 8
    by_block = pd.DataFrame([{b["block"]: b["snr_db"] for b in d} for d in rows.loc[measured, "layer_drift"]])
    assert list(curves["snr_db"]) == pytest.approx(list(by_block.median()))
    code, _, _ = in_process("report", run_dir, "--history", run_dir.parent.parent / "history.sqlite")
    html = (run_dir / "report.html").read_text()
    assert code == 0 and "<h3>Layer drift</h3>" in html and 'id="chart-layer-drift"' in html


def test_missing_analysis_shards_are_redone_alone(divergence_run, tiny_artifacts, models_root):
    """As a resumed run does: only the (model, shard) without a file is analysed again, the same."""
    from harness.job.spec import load_job
    from harness.results.run_dir import RunDir
    from harness.run.dataset import check_datasets
    from harness.run.divergence_pass import DIVERGENCE, run_divergence
    from harness.run.execute import prepare_models

    run = RunDir(divergence_run["run_dir"])
    shard = run.path / DIVERGENCE / "tiny.en__torchscript__int8-shard00001.parquet"
    before = pd.read_parquet(shard)
    shard.unlink()
    spec = load_job(divergence_run["job"])
    rows, _ = check_datasets(spec.datasets, spec.breakdowns)
    models = prepare_models(spec, models_root, log=lambda *a: None)
    report = run_divergence(spec, models, run, run.read_raw(), rows, False, print)
    assert [w.shards for w in report.workers] == [1]
    after = pd.read_parquet(shard)
    assert after.to_json() == before.to_json()
