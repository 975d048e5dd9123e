"""Suites: a job over several datasets, results per dataset, pooled and per group, all recomputed
independently (jiwer over openai-whisper's own normalisers) from utterances.parquet; a resumed
suite run equal to an uninterrupted one. Real runs: base (multilingual) and its CTranslate2 int8
form on four LibriSpeech utterances and one clip in each of four languages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jiwer
import pandas as pd
import pytest
import yaml
from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer

from harness.results.run_dir import RunDir, RunState
from tests.conftest import EMBEDDED, ROOT
from tests.nightly_runs import in_process

MULTILINGUAL = ROOT / "data" / "multilingual"
LANGUAGES = ("de", "es", "zh", "ja")  # two written without spaces: their headline is CER
MODELS = ("reference", "ctranslate2")


def _clips(folder: Path) -> Path:
    """An audiofolder of the first clip of each of LANGUAGES from data/multilingual."""
    rows = [json.loads(line) for line in (MULTILINGUAL / "metadata.jsonl").read_text().splitlines()]
    chosen = [next(r for r in rows if r["language"] == language) for language in LANGUAGES]
    folder.mkdir()
    for row in chosen:
        shutil.copy(MULTILINGUAL / row["file_name"], folder / Path(row["file_name"]).name)
        row["file_name"] = Path(row["file_name"]).name
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen))
    return folder


@pytest.fixture(scope="module")
def suite(tmp_path_factory, models_root):
    """The suite job, run once: (job file, results folder, run folder)."""
    from tests.conftest import embedded_ray

    embedded_ray()
    root = tmp_path_factory.mktemp("suite")
    job = {
        "name": "suite",
        "datasets": {
            "libri": {"path": str(EMBEDDED), "limit": 4},
            "multi": {"path": str(_clips(root / "clips")), "language_column": "language"},
        },
        "models": {"sizes": ["base"], "targets": {"ctranslate2": ["int8"]}},
        "breakdown": ["language", "duration"],
        "latency": {"sample": 2},
        "decoding": {"batch_size": 4},
        "cluster": {"shard_size": 2, "slots": 2},
    }
    path = root / "suite.yaml"
    path.write_text(yaml.safe_dump(job))
    results = root / "results"
    code, out, err = in_process("run", path, "--out", results, "--models", models_root, "--no-progress")
    assert code == 0, out + err
    (run_dir,) = (results / "suite").iterdir()
    return path, results, run_dir, out, models_root


def _normalised(rows: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Reference and hypothesis texts under openai-whisper's normaliser for each row's language."""
    refs, hyps = [], []
    for ref, hyp, language in zip(rows["ref_text"], rows["hyp_text"], rows["scoring_language"], strict=True):
        if language == "en":
            normalise = EnglishTextNormalizer()
        else:
            normalise = BasicTextNormalizer(split_letters=language in ("zh", "ja"))
        refs.append(normalise(ref).strip())
        hyps.append(normalise(hyp).strip())
    return refs, hyps


def _wer(rows: pd.DataFrame) -> float:
    """Σ errors / Σ words by jiwer over the rows' texts (CER languages: their letters are the words)."""
    refs, hyps = _normalised(rows)
    out = jiwer.process_words(refs, hyps)
    return (out.substitutions + out.deletions + out.insertions) / sum(len(r.split()) for r in refs)


def test_a_suite_has_rows_per_dataset_and_pooled_recomputed_by_jiwer(suite):
    _, _, run_dir, printed, _ = suite
    utts = pd.read_parquet(run_dir / "utterances.parquet")
    summary = pd.read_csv(run_dir / "summary.csv")
    assert list(dict.fromkeys(summary["dataset"])) == ["libri", "multi", "all"]
    assert len(summary) == 3 * len(MODELS) and (summary["errors"] == 0).all()
    # ids are the datasets' own, prefixed with the suite's name for them: unique across the suite
    assert utts["utt_id"].str.startswith(("libri/", "multi/")).all() and len(utts) == 2 * 8
    for (dataset, target), row in summary.set_index(["dataset", "target"]).iterrows():
        rows = utts[utts["target"] == target]
        if dataset != "all":
            rows = rows[rows["dataset"] == dataset]
        assert row["n"] == len(rows)
        # pooled: Σ errors / Σ words over both datasets, never a mean of their rates
        assert row["wer"] == pytest.approx(_wer(rows), abs=1e-12), (dataset, target)
    pooled = summary[(summary["dataset"] == "all") & (summary["target"] == "reference")].iloc[0]
    means = summary[(summary["dataset"] != "all") & (summary["target"] == "reference")]["wer"].mean()
    assert pooled["wer"] != pytest.approx(means)
    assert "libri" in printed and "by language:" in printed


def test_breakdowns_by_language_and_duration_are_recomputed_by_jiwer(suite):
    _, _, run_dir, _, _ = suite
    utts = pd.read_parquet(run_dir / "utterances.parquet")
    table = pd.read_csv(run_dir / "breakdown.csv", keep_default_na=False, na_values=[""])
    by_language = table[table["breakdown"] == "language"]
    assert set(by_language["group"]) == {"en", *LANGUAGES}
    for row in by_language.itertuples():
        rows = utts[(utts["target"] == row.target) & (utts["scoring_language"] == row.group)]
        assert row.n == len(rows)
        assert row.wer == pytest.approx(_wer(rows), abs=1e-12), (row.group, row.target)
        assert row.headline == ("cer" if row.group in ("zh", "ja") else "wer")
        if row.target == "reference":
            assert pd.isna(row.wer_delta)
        else:  # Δ against the reference on the same utterances, inside its interval
            reference = utts[(utts["target"] == "reference") & (utts["scoring_language"] == row.group)]
            assert row.wer_delta == pytest.approx(_wer(rows) - _wer(reference), abs=1e-12)
            assert row.wer_delta_lo <= row.wer_delta <= row.wer_delta_hi
    by_duration = table[table["breakdown"] == "duration"]
    assert by_duration.groupby("target")["n"].sum().to_dict() == dict.fromkeys(MODELS, 8)


def test_latency_is_the_sample_decoded_alone(suite):
    """Two utterances of each dataset are timed alone (the same for every model); the rest are
    decoded in batches, and the latency columns count the timed ones only."""
    _, _, run_dir, _, _ = suite
    utts = pd.read_parquet(run_dir / "utterances.parquet")
    timed = utts[utts["timed"]]
    assert (timed["batch"] == 1).all()
    per_model = timed.groupby("target")["utt_id"].apply(frozenset)
    assert per_model["reference"] == per_model["ctranslate2"] and len(per_model["reference"]) == 4
    assert (utts.loc[~utts["timed"], "batch"] > 1).any()
    summary = pd.read_csv(run_dir / "summary.csv")
    assert set(summary["n_timed"]) == {2, 4}  # each dataset's two; pooled, four


def test_a_resumed_suite_run_equals_an_uninterrupted_one(suite):
    """Half the shard files of both datasets gone and the run interrupted: --resume redoes only
    those, and its results are the uninterrupted run's (tokens, errors, every accuracy column)."""
    job, results, run_dir, _, models = suite
    copy = results / "suite" / (run_dir.name + "-cut")
    shutil.copytree(run_dir, copy)
    for name in ("utterances.parquet", "summary.csv", "summary.md", "breakdown.csv", "run.json"):
        (copy / name).unlink()
    shards = sorted((copy / "raw").glob("*.parquet"))
    removed = shards[::2]
    for file in removed:
        file.unlink()
    RunDir(copy).stop(RunState.INTERRUPTED, "interrupted")
    code, out, err = in_process(
        "run", job, "--resume", copy.name, "--out", results, "--models", models, "--no-progress"
    )
    assert code == 0, out + err
    resumed = pd.read_parquet(copy / "utterances.parquet").drop(columns=["run_id"])
    first = pd.read_parquet(run_dir / "utterances.parquet").drop(columns=["run_id"])
    accuracy = [c for c in first.columns if not c.endswith("_ms") and c not in ("node", "attempt", "batch")]
    key = ["target", "utt_id"]
    a, b = (f.sort_values(key).reset_index(drop=True)[accuracy] for f in (first, resumed))
    pd.testing.assert_frame_equal(a.astype(str), b.astype(str))
    columns = ["dataset", "target", "n", "wer", "cer", "wer_delta", "exact_match", "n_timed"]
    pd.testing.assert_frame_equal(
        pd.read_csv(run_dir / "summary.csv")[columns], pd.read_csv(copy / "summary.csv")[columns]
    )
