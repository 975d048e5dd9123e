"""End to end on a real embedded Ray: tiny.en reference vs torchscript-mtk on the session's tiny run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jiwer
import pandas as pd
import pytest

from harness.results.schema import SCHEMA_VERSION, UTTERANCE_COLUMNS
from harness.results.scoring import normalize
from harness.results.summary import format_summary
from harness.results.timing import cpu_description
from harness.run.execute import run_job
from tests.conftest import EMBEDDED, ROOT, TINY_RUN, csv_audiofolder


def test_run_writes_complete_results(tiny_run):
    files = {p.name for p in tiny_run.run_dir.iterdir()}
    assert {"utterances.parquet", "summary.csv", "summary.md", "run.json", "raw"} <= files
    assert not [p for p in tiny_run.run_dir.parent.iterdir() if p.name.startswith(".")]
    utts = pd.read_parquet(tiny_run.run_dir / "utterances.parquet")
    assert len(utts) == 2 * TINY_RUN and utts["error"].isna().all() and (utts["status"] == "ok").all()
    assert set(utts["target"]) == {"reference", "torchscript-mtk"}
    info = json.loads((tiny_run.run_dir / "run.json").read_text())
    assert info["utterances"] == TINY_RUN and info["packages"]["openai-whisper"] == "20250625"
    # the CPU that timed each row and picked its kernels (int8 results depend on it): this machine's
    assert set(utts["cpu"]) == {cpu_description()} == {info["host"]["cpu"]}
    assert info["schema_version"] == SCHEMA_VERSION and list(utts.columns) == UTTERANCE_COLUMNS
    assert pd.read_csv(tiny_run.run_dir / "summary.csv").shape[0] == 2


def test_summary_wer_is_jiwer_over_the_rows(tiny_run):
    utts = pd.read_parquet(tiny_run.run_dir / "utterances.parquet")
    summary = pd.read_csv(tiny_run.run_dir / "summary.csv").set_index("target")
    for target, rows in utts.groupby("target"):
        refs = [normalize(t) for t in rows["ref_text"]]
        hyps = [normalize(t) for t in rows["hyp_text"]]
        out = jiwer.process_words(refs, hyps)
        assert summary.loc[target, "wer"] == pytest.approx(jiwer.wer(refs, hyps), abs=1e-12)
        assert (summary.loc[target, "sub"], summary.loc[target, "del"], summary.loc[target, "ins"]) == (
            out.substitutions,
            out.deletions,
            out.insertions,
        )
        assert summary.loc[target, "cer"] == pytest.approx(jiwer.cer(refs, hyps), abs=1e-12)
        assert summary.loc[target, "rtfx"] == pytest.approx(rows["audio_s"].sum() / (rows["total_ms"].sum() / 1e3))


def test_reference_wer_equals_openai_whisper_own_output(tiny_run, whisper_decoded):
    """An independent path: jiwer over whisper.decode's text, no harness code in between."""
    utts = pd.read_parquet(tiny_run.run_dir / "utterances.parquet")
    ref = utts[utts["target"] == "reference"]
    refs = [normalize(t) for t in ref["ref_text"]]
    hyps = [normalize(whisper_decoded[u].text) for u in ref["utt_id"]]
    summary = tiny_run.summary.set_index("target")
    assert summary.loc["reference", "wer"] == pytest.approx(jiwer.wer(refs, hyps), abs=1e-12)
    assert list(ref["hyp_text"]) == [whisper_decoded[u].text for u in ref["utt_id"]]


def test_divergence_against_the_reference(tiny_run):
    summary = tiny_run.summary.set_index("target")
    assert summary.loc["reference", "exact_match"] == 1.0
    assert summary.loc["torchscript-mtk", "exact_match"] >= 0.95
    utts = tiny_run.utterances
    mtk = utts[utts["target"] == "torchscript-mtk"]
    for _, row in mtk.iterrows():
        same = list(row["hyp_tokens"]) == list(row["reference_tokens"])
        assert bool(row["exact_match"]) == same
        assert pd.isna(row["first_divergence"]) == same


@pytest.mark.slow  # minutes of real runs: the integration tier keeps to its 12-minute budget
def test_another_audiofolder_with_a_bad_file_runs_through_the_cli(tiny_artifacts, models_root, tmp_path):
    """A different layout (metadata.csv, nested folders, no id column) and one corrupt file."""
    folder = tmp_path / "other"
    csv_audiofolder(folder, 8, 3)
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "run", str(ROOT / "jobs" / "librispeech_tiny_en.yaml"),
         "--dataset", str(folder), "--out", str(out), "--models", str(models_root), "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 4, proc.stderr[-2000:]  # finished, with an utterance that has no transcript
    (run_dir,) = (out / "librispeech_tiny_en").iterdir()
    assert (run_dir / "summary.md").read_text().strip() in proc.stdout  # the table printed at the end
    summary = pd.read_csv(run_dir / "summary.csv")
    assert summary["n"].tolist() == [4, 4] and summary["errors"].tolist() == [1, 1]
    utts = pd.read_parquet(run_dir / "utterances.parquet")
    broken = utts[utts["utt_id"] == "broken"]
    assert len(broken) == 2 and broken["error"].str.startswith("cannot decode audio").all()
    assert (broken["status"] == "error").all()
    assert utts[utts["utt_id"] != "broken"]["error"].isna().all()


def test_wer_delta_is_the_difference_with_a_paired_interval(tiny_run):
    summary = tiny_run.summary.set_index("target")
    mtk = summary.loc["torchscript-mtk"]
    assert mtk["wer_delta"] == pytest.approx(mtk["wer"] - summary.loc["reference", "wer"], abs=1e-12)
    assert mtk["wer_delta_lo"] <= mtk["wer_delta"] <= mtk["wer_delta_hi"]
    assert pd.isna(summary.loc["reference", "wer_delta"])
    files = tiny_run.utterances  # artifact size comes from the manifest's file sizes
    assert mtk["artifact_mb"] > 100 and len(files) == 2 * TINY_RUN
    assert mtk["runtime"] == "torch"
    assert (files["runtime"] == "torch").all()  # each row says what executed it


@pytest.mark.slow  # minutes of real runs: the integration tier keeps to its 12-minute budget
def test_more_models_than_cpus_all_run(ray_local, tiny_artifacts, models_root, tmp_path):
    """Three models on a 2-CPU Ray: a worker whose model has no shards left gives its CPU back,
    so the third model starts instead of waiting for ever."""
    import threading

    from harness.job.spec import ClusterSpec, DatasetSpec, JobSpec, ModelsSpec

    assert ray_local.cluster_resources()["CPU"] == 2
    spec = JobSpec(
        name="three-models",
        datasets=(DatasetSpec(path=EMBEDDED, limit=2),),
        models=ModelsSpec(sizes=("tiny.en",), targets=(("torchscript-mtk", ("fp32",)), ("transformers", ("fp32",)))),
        cluster=ClusterSpec(shard_size=1),
    )
    done: dict = {}
    thread = threading.Thread(
        target=lambda: done.update(result=run_job(spec, tmp_path, models_root, progress=False, log=lambda *a: None)),
        daemon=True,
    )
    thread.start()
    thread.join(timeout=600)
    assert "result" in done, "the third model never got a CPU"
    utts = done["result"].utterances
    assert sorted(utts["target"].unique()) == ["reference", "torchscript-mtk", "transformers"]
    assert len(utts) == 6 and utts["error"].isna().all()


def test_a_worker_that_cannot_load_its_model_becomes_rows_with_the_reason(
    ray_local, tiny_artifacts, models_root, tmp_path, monkeypatch
):
    """The artifact breaks after the driver checked it (another node's copy, a disk): that model's
    utterances become rows naming the worker's own error, and the rest of the run completes."""
    from converters.store import Prepared
    from harness.core.status import Status
    from harness.core.target import Artifact
    from harness.job.spec import ClusterSpec, DatasetSpec, JobSpec, ModelsSpec
    from harness.run import execute
    from harness.run.node_cache import cache_root
    from harness.run.passes import PreparedModel
    from tests.conftest import broken_copy

    # a node that already holds a verified copy of the key rightly never fetches the broken one:
    # this node's copy goes, so the worker must fetch the driver's (broken) files
    for cached in cache_root().glob(f"{tiny_artifacts['torchscript-mtk'].manifest['key']}*"):
        shutil.rmtree(cached)

    def prepare_then_break(*args, **kwargs):
        prepared = real(*args, **kwargs)
        good = prepared[1].prepared.artifact
        broken = broken_copy(good, tmp_path)
        (broken / "token_embedding.npy").write_bytes(b"changed after the driver's check")
        moved = Artifact(good.size, good.target, good.quant, broken, good.manifest)
        return [prepared[0], PreparedModel(prepared[1].cell, Prepared(moved, Status.REUSED))]

    real = execute.prepare_models
    monkeypatch.setattr(execute, "prepare_models", prepare_then_break)
    spec = JobSpec(
        name="broken-worker",
        datasets=(DatasetSpec(path=EMBEDDED, limit=3),),
        models=ModelsSpec(sizes=("tiny.en",), targets=(("torchscript-mtk", ("fp32",)),)),
        cluster=ClusterSpec(shard_size=1),
    )
    result = run_job(spec, tmp_path / "results", models_root, progress=False, log=lambda *a: None)
    summary = result.summary.set_index("target")
    assert summary.loc["reference", "status"] == "ok" and summary.loc["reference", "errors"] == 0
    reason = summary.loc["torchscript-mtk", "reason"]
    assert summary.loc["torchscript-mtk", "status"] == "worker failed" and summary.loc["torchscript-mtk", "errors"] == 3
    assert reason.startswith("HarnessError: ") and "sha256 differs" in reason, reason
    assert len(list((result.run_dir / "raw").glob("tiny.en__torchscript-mtk__fp32-shard*.parquet"))) == 3
    table = format_summary(result.summary)
    assert "| worker failed |" in table and f"- tiny.en/torchscript-mtk/fp32: worker failed: {reason}" in table


def test_worker_errors_read_as_one_line(ray_local):
    """The three shapes Ray hands a worker's failure to the driver in: a failed `__init__` (only as
    traceback text), a failed task (the exception object), a dead process (Ray's own words)."""
    import os

    from harness.core.errors import HarnessError
    from harness.run.actors import worker_error

    class Worker:  # local, so Ray ships it by value
        def __init__(self, fail: bool) -> None:
            if fail:
                raise HarnessError("model.bin: sha256 differs from manifest.json\nsecond line")

        def fail(self) -> None:
            raise ValueError("bad shard\nmore detail")

        def crash(self) -> None:
            os._exit(1)

    remote = ray_local.remote(num_cpus=0)(Worker)

    def failure(call) -> BaseException:
        with pytest.raises(ray_local.exceptions.RayError) as info:
            ray_local.get(call())
        return info.value

    init = failure(lambda: remote.remote(True).fail.remote())
    assert worker_error(init) == "HarnessError: model.bin: sha256 differs from manifest.json"
    assert worker_error(failure(lambda: remote.remote(False).fail.remote())) == "ValueError: bad shard"
    died = worker_error(failure(lambda: remote.remote(False).crash.remote()))
    assert "\n" not in died and "died" in died, died
