"""The read side of a large run: `history add` and `report` on a synthetic run of N utterance rows.

For each N, a complete run folder is written in the project's own schema (`harness.results.schema`:
every declared column of utterances.parquet, typed by its SQL type, so a column added there is
in the file too; summary.csv by `harness.results.summary.summarize`; run.json by `RunInfo`; a
divergence.parquet with a row per converted model and utterance): 4 models of one size, N / 4
utterances, texts of about 100 characters, token lists of about 20, a share of the converted
models' rows diverging, one row in 500 failed. Then, each in a fresh interpreter:
- add: `History(sqlite).add(read_run(folder))`, the driver's append after a run;
- report: `write_report(folder, sqlite)`, its history being the one just appended to.
Printed per step: seconds, ms per utterance row, the process's peak RSS (`ru_maxrss`) at its end
and after its imports alone (what the step itself adds is the difference).

Target (issue 17): each step well under 1 GB peak RSS at 1 M rows, its time linear in N (the
whole driver path ≤ 0.05 ms per row).

    python benchmarks/history_scale.py [--rows 10000,100000,1000000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = (("base", "reference", "fp32"), ("base", "torchscript-mtk", "fp32"), ("base", "onnx", "int8"),
          ("base", "ctranslate2", "int8"))  # fmt: skip
DIVERGING = (0.0, 0.05, 0.3, 0.4)  # each model's share of utterances whose tokens leave the reference's
FAILED_EVERY = 500  # one row in this many did not decode
CPU = "Synthetic CPU @ 3.0GHz [avx2]"
SUMMARY_SAMPLE = 2000  # utterances per model that summary.csv is computed over (see `_summary`)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# -- the synthetic run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Utterances:
    """What every model's row of an utterance shares: its id, reference text, tokens and duration."""

    ids: list[str]
    texts: list[str]  # about 100 characters: 17 words of 2 to 9 letters
    lengths: np.ndarray  # text tokens, 15 to 25
    tokens: list[list[int]]  # the reference's: start and end of text around them
    audio_s: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, count: int) -> Utterances:
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        words = ["".join(rng.choice(letters, size=int(k))) for k in rng.integers(2, 10, size=3000)]
        texts = [" ".join(words[i] for i in row) for row in rng.integers(0, len(words), size=(count, 17))]
        ids = [f"{1000 + u // 5000}-{u % 5000:06d}" for u in range(count)]
        lengths = rng.integers(15, 26, size=count)
        flat = rng.integers(0, 50000, size=int(lengths.sum())).tolist()
        starts = np.concatenate([[0], np.cumsum(lengths)]).tolist()
        tokens = [[50257, *flat[starts[u] : starts[u + 1]], 50256] for u in range(count)]
        return cls(ids, texts, lengths, tokens, rng.uniform(2.0, 15.0, size=count))


def _model_rows(rng: np.random.Generator, m: int, utts: Utterances, run_id: str) -> tuple[dict, dict]:
    """Model `m`'s utterance rows (column → values) and, per utterance, where its tokens diverge
    (`first`), its tokens and its text from there on (`continuation`)."""
    size, target, quant = MODELS[m]
    n = len(utts.ids)
    diverges = rng.random(n) < DIVERGING[m]
    at = (rng.random(n) * utts.lengths).astype(int) + 1
    failed = (np.arange(n) + m) % FAILED_EVERY == 0
    tokens, texts, first, continuation = [], [], [], []
    for u in range(n):
        hyp, text = utts.tokens[u], utts.texts[u]
        if diverges[u]:  # a token and a word swapped
            hyp = [*hyp[: at[u]], (hyp[at[u]] + 1) % 50000, *hyp[at[u] + 1 :]]
            words = text.split()
            text = " ".join([*words[: at[u] % len(words)], "uh", *words[at[u] % len(words) + 1 :]])
        tokens.append(None if failed[u] else hyp)
        texts.append(None if failed[u] else text)
        first.append(int(at[u]) if diverges[u] and not failed[u] else None)
        words = text.split()
        continuation.append(words[at[u] % len(words) :] if diverges[u] and not failed[u] else None)
    ok = ~failed
    encode, decode = utts.audio_s * (20 + 10 * m), (utts.lengths + 2) * (4.0 + m)
    none = -1  # in integer columns: no value (a failed row's counts)
    rows = {
        "run_id": [run_id] * n, "utt_id": utts.ids, "size": [size] * n, "target": [target] * n,
        "quant": [quant] * n, "audio_ctx": [1500] * n, "ref_text": utts.texts, "hyp_text": texts,
        "ref_norm": utts.texts, "hyp_norm": texts, "hyp_tokens": tokens, "reference_tokens": utts.tokens,
        "wer_errors": np.where(ok, diverges.astype(int), none), "substitutions": np.where(ok, diverges, none),
        "deletions": np.where(ok, 0, none), "insertions": np.where(ok, 0, none),
        "ref_words": np.array([t.count(" ") + 1 for t in utts.texts]),
        "cer_errors": np.where(ok, 2 * diverges, none), "ref_chars": [len(t) for t in utts.texts],
        "exact_match": np.where(ok, ~diverges, None), "first_divergence": first,
        "token_edit_rate": np.where(ok, diverges / (utts.lengths + 2), np.nan), "audio_s": utts.audio_s,
        "frontend_ms": np.where(ok, 5.0, np.nan), "encode_ms": np.where(ok, encode, np.nan),
        "decode_ms": np.where(ok, decode, np.nan), "total_ms": np.where(ok, 5.0 + encode + decode, np.nan),
        "n_steps": np.where(ok, utts.lengths + 1, none), "n_windows": np.where(ok, 1, none),
        "n_tokens": np.where(ok, utts.lengths + 2, none), "decoding": ["short form"] * n,
        "task": ["transcribe"] * n, "language": ["en"] * n, "detected_language": ["en"] * n,
        "language_prob": np.where(ok, 0.99, np.nan), "ref_language": ["en"] * n, "scoring_language": ["en"] * n,
        "language_match": np.where(ok, True, None), "node": [f"node-{u % 3}" for u in range(n)],
        "cpu": np.where(ok, CPU, None), "runtime": [target] * n, "attempt": [0] * n,
        "status": np.where(ok, "ok", "error"), "error": np.where(ok, None, "cannot decode audio: synthetic failure"),
    }  # fmt: skip
    return rows, {"at": at, "first": first, "tokens": tokens, "continuation": continuation}


def _divergence_rows(rng: np.random.Generator, rows: dict, facts: dict, utts: Utterances) -> dict:
    """divergence.parquet's rows of one converted model (column → values)."""
    n = len(utts.ids)
    diverged = [f is not None for f in facts["first"]]
    top5 = [
        [
            {"id": int(t), "token": f" {w}", "p": 0.9 / (k + 1)}
            for k, (t, w) in enumerate(zip(utts.tokens[u][at : at + 5], utts.texts[u].split()[:5], strict=False))
        ]
        for u, at in enumerate(facts["at"])
    ]

    def where_diverged(values: list) -> list:
        return [v if d else None for v, d in zip(values, diverged, strict=True)]

    return {
        **{c: rows[c] for c in ("run_id", "utt_id", "size", "target", "quant")},
        "status": list(rows["status"]), "error": list(rows["error"]), "note": [None] * n,
        "encoder_snr_db": rng.uniform(25, 45, n), "tf_steps": utts.lengths + 1, "tf_top1_agree": utts.lengths,
        "tf_top1_agreement": rng.uniform(0.9, 1, n), "tf_max_abs_dlogit": rng.uniform(0, 1, n),
        "tf_mean_kl": rng.uniform(0, 1e-3, n), "tf_max_kl": rng.uniform(0, 1e-2, n),
        "exact_match": [not d for d in diverged], "hybrid_cand_encoder_exact": [True] * n,
        "hybrid_cand_decoder_exact": [not d for d in diverged], "hybrid_cand_encoder_tokens": [None] * n,
        "hybrid_cand_decoder_tokens": where_diverged(facts["tokens"]), "first_divergence": facts["first"],
        "ref_token_id": [None] * n, "cand_token_id": [None] * n, "ref_token": where_diverged([" ref"] * n),
        "cand_token": where_diverged([" uh"] * n), "ref_top5": where_diverged(top5), "cand_top5": where_diverged(top5),
        "common_prefix_text": where_diverged([" ".join(t.split()[:2]) for t in utts.texts]),
        "ref_continuation": where_diverged([" " + t for t in utts.texts]),
        "cand_continuation": [" " + " ".join(c) if c else None for c in facts["continuation"]],
    }  # fmt: skip


def synthetic_rows(n_rows: int, run_id: str, seed: int = 0) -> tuple[dict, dict]:
    """The columns of utterances.parquet (model after model; every declared column, typed by its
    SQL type: a column the schema gains later gets a plain value of its type) and of
    divergence.parquet, as lists."""
    from harness.results.schema import BOOL, INT, JSON, REAL, UTTERANCE_HISTORY_COLUMNS

    rng = np.random.default_rng(seed)
    utts = Utterances.draw(rng, n_rows // len(MODELS))
    columns: dict[str, list] = {c: [] for c in UTTERANCE_HISTORY_COLUMNS}
    divergence: dict[str, list] = {}
    for m, (_, target, _) in enumerate(MODELS):
        rows, facts = _model_rows(rng, m, utts, run_id)
        for col, kind in UTTERANCE_HISTORY_COLUMNS.items():
            default = {INT: 0, REAL: 0.0, BOOL: True, JSON: None}.get(kind, "synthetic")
            values = list(rows.get(col, [default] * len(utts.ids)))
            columns[col] += [None if v is None or v == -1 else int(v) for v in values] if kind == INT else values
        if target != "reference":
            for col, values in _divergence_rows(rng, rows, facts, utts).items():
                divergence.setdefault(col, []).extend(list(values))
    return columns, divergence


def write_run(folder: Path, n_rows: int) -> None:
    """A complete run folder of `n_rows` utterance rows (see the module's docstring)."""
    import pandas as pd

    from harness.job.spec import ModelCell
    from harness.results.divergence import DIVERGENCE_COLUMNS, ROW_COLUMNS
    from harness.results.run_info import Host, ModelInfo, RunInfo
    from harness.results.schema import BOOL, INT, REAL, SCHEMA_VERSION, TEXT, UTTERANCE_HISTORY_COLUMNS

    run_id = f"20270101-020000-{n_rows:06x}"[:22]
    cols, div = synthetic_rows(n_rows, run_id)
    dtypes = {INT: "Int64", REAL: "float64", BOOL: "boolean", TEXT: "string"}
    utts = pd.DataFrame(cols).astype({c: dtypes[k] for c, k in UTTERANCE_HISTORY_COLUMNS.items() if k in dtypes})
    folder.mkdir(parents=True)
    utts.to_parquet(folder / "utterances.parquet", index=False)  # as harness.results.run_dir writes it
    _summary(utts).to_csv(folder / "summary.csv", index=False)
    per_utt = pd.DataFrame(div, columns=DIVERGENCE_COLUMNS).astype(
        {c: t for c, t in ROW_COLUMNS.items() if t != "object"}
    )
    per_utt.to_parquet(folder / "divergence.parquet", index=False)
    per_model = per_utt.groupby(["size", "target", "quant"], sort=False).agg(
        n=("utt_id", "size"), encoder_snr_mean_db=("encoder_snr_db", "mean"), exact_match=("exact_match", "mean")
    )
    per_model.assign(verdict=np.where(per_model["exact_match"] < 1, "decoder", "none")).reset_index().to_csv(
        folder / "divergence.csv", index=False
    )
    RunInfo(
        run_id=run_id, schema_version=SCHEMA_VERSION,
        job={"name": "history_scale", "dataset": {"path": "synthetic", "limit": None}},
        models=tuple(ModelInfo(model=ModelCell(*m).label, status="reused") for m in MODELS),
        utterances=n_rows // len(MODELS), packages={"pandas": pd.__version__}, git_commit="0" * 40,
        host=Host(hostname="synthetic", cpu=CPU), started="2027-01-01T02:00:00Z", finished="2027-01-01T04:00:00Z",
    ).write(folder / "run.json")  # fmt: skip


def _summary(utts):
    """summary.csv by the harness's own `summarize`, over each model's first SUMMARY_SAMPLE
    utterances: it has a row per model whatever N, and its paired bootstrap over all of them would
    hold (1000 x N / 4) index arrays (gigabytes at 1 M rows) for numbers no step here depends on."""
    from harness.results.summary import summarize

    sample = utts.groupby(["size", "target", "quant"], sort=False).head(SUMMARY_SAMPLE)
    return summarize(sample, {(*m, 1500): {"runtime": m[1], "artifact_mb": 150.0} for m in MODELS})


# -- the measured steps, each in its own interpreter ---------------------------------------------


def step(name: str, folder: Path, history: str) -> dict:
    """One step, timed from after its imports; its peak RSS then and at its end."""
    from harness.nightly.history import History
    from harness.report.page import write_report
    from harness.results.record import read_run

    before, started = peak_mib(), time.perf_counter()
    if name == "add":
        with History(history) as store:
            assert store.add(read_run(folder))
    else:
        write_report(folder, history)
    return {"seconds": time.perf_counter() - started, "rss_mib": peak_mib(), "imports_rss_mib": before}


def _child(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)}: exit {proc.returncode}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="10000,100000,1000000", help="comma-separated utterance row counts")
    parser.add_argument("--dir", type=Path, help="where the run folders and histories go (default: a temporary one)")
    parser.add_argument("--child", nargs=3, metavar=("STEP", "FOLDER", "HISTORY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, folder, history = args.child
        if name == "write":
            write_run(Path(folder), int(history))
            print("{}")
        else:
            print(json.dumps(step(name, Path(folder), history)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp)
        print("| rows | step | seconds | ms/row | peak RSS MiB | after imports MiB |\n|---|---|---|---|---|---|")
        for n in (int(r) for r in args.rows.split(",")):
            folder, history = root / f"run-{n}", root / f"history-{n}.sqlite"
            if not folder.exists():
                _child("write", str(folder), str(n))
            history.unlink(missing_ok=True)
            for name in ("add", "report"):
                r = _child(name, str(folder), str(history))
                print(
                    f"| {n:,} | {name} | {r['seconds']:.2f} | {1000 * r['seconds'] / n:.4f} | "
                    f"{r['rss_mib']:.0f} | {r['imports_rss_mib']:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
