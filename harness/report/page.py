"""`python -m harness report RUN`: one self-contained HTML file for a completed run.

It reads only the run folder's files (run.json, summary.csv, utterances.parquet, and gate.json,
divergence.csv, divergence.parquet when present) and the history (for the trends, read-only): it
never decodes or scores anything again. The page needs no network: styles, script and charts
(inline SVG, `harness.report.plots`) are inside it, and its Content-Security-Policy forbids loading
anything and runs no script but its own, named by its sha256. Every string from data is
HTML-escaped (texts come from datasets others assembled).
"""

from __future__ import annotations

import base64
import hashlib
import time
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd

from harness.core.errors import HarnessError
from harness.core.status import Status
from harness.nightly.history import History, HistoryError, NotAHistory, masked
from harness.nightly.verdict import comparison_rows, describe_run, read_verdict, verdict_lines
from harness.report.tables import cell, census_section, divergence_section, table, utterance_section
from harness.results import run_info
from harness.results.run_dir import list_runs, write_atomic
from harness.results.run_info import RUN_JSON, RunInfo
from harness.results.summary import BREAKDOWN_FILE, DELTA_COLUMN, POOLED, breakdown_cells, status_notes, summary_cells

REPORT_FILE = "report.html"
RUN_FILES = (RUN_JSON, "summary.csv", "utterances.parquet")  # a complete run has them all
TREND_RUNS = 30  # the trends show at most the job's last this many runs
_ASSETS = Path(__file__).with_name("assets")


def find_run(results_root: Path, which: str, job: str | None = None) -> Path:
    """A complete run's folder: a run id, `latest` (the newest complete run, of `job` if given), or a
    folder path."""
    folder = Path(which)
    if folder.is_dir():
        return _complete(folder)
    runs = list_runs(results_root, job)
    of_job = f" of job '{job}'" if job else ""
    if which == "latest":
        complete = [r for r in runs if all((r.path / f).is_file() for f in RUN_FILES)]
        if not complete:
            raise HarnessError(f"latest: no complete run{of_job} in {results_root}")
        return complete[-1].path
    named = [r for r in runs if r.run_id == which]
    if not named:
        raise HarnessError(f"{which}: no run{of_job} with that id in {results_root} (`python -m harness runs`)")
    return _complete(named[-1].path)


def _complete(folder: Path) -> Path:
    missing = [f for f in RUN_FILES if not (folder / f).is_file()]
    if missing:
        raise HarnessError(f"{folder}: not a complete run (no {', '.join(missing)}); resume it first")
    return folder


def write_report(run_dir: Path, history: str, out: Path | None = None, history_failure: str | None = None) -> Path:
    """Write the run's report (default: report.html in its folder), atomically; returns its path.
    `history_failure`: why the history is not to be read (`run` could not append to it), said
    where the trends and the verdict would be."""
    path = out or run_dir / REPORT_FILE
    page = render(run_dir, history, history_failure)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return path


def render(run_dir: Path, history: str, history_failure: str | None = None) -> str:
    info = run_info.read(run_dir / RUN_JSON)
    summary = pd.read_csv(run_dir / "summary.csv", keep_default_na=False, na_values=[""])
    sections = [
        ("verdict", "Gate", _verdict(run_dir, history_failure)),
        ("summary", "Summary", _summary(summary)),
        *_breakdowns(run_dir),
        ("pareto", "WER vs latency", _scatter(_overall(summary))),
        ("trends", "Trends", _trends(info, history, history_failure)),
        ("divergence", "Divergence", divergence_section(run_dir)),
        ("census", "What executes where", census_section(run_dir)),
        ("utterances", "Utterances", utterance_section(run_dir / "utterances.parquet", summary)),
    ]
    nav = " · ".join(f'<a href="#{key}">{title}</a>' for key, title, _ in sections)
    body = "\n".join(f'<section id="{key}">\n<h2>{title}</h2>\n{html}\n</section>' for key, title, html in sections)
    title = f"{info.job_name} · {info.run_id}"
    # the one inline script, exactly as between its tags: the policy runs it by its hash, so markup
    # that got past escaping could not run a script or an event handler of its own
    script = "\n" + (_ASSETS / "report.js").read_text()
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; \
script-src 'sha256-{digest}'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<style>
{(_ASSETS / "report.css").read_text()}</style>
</head>
<body data-js="off">
<header>
<h1>{escape(title)}</h1>
{_run_facts(info, run_dir)}
<nav>{nav}</nav>
<p id="js-errors" hidden></p>
</header>
<main>
{body}
</main>
<footer>written by <code>python -m harness report</code> at {time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())}
from {escape(str(run_dir))}</footer>
<script>{script}</script>
</body>
</html>
"""


def _run_facts(info: RunInfo, run_dir: Path) -> str:
    facts = {
        "dataset": f"{info.dataset_label} ({info.utterances} utterances)",
        "started": f"{info.started} → {info.finished}",
        "git commit": str(info.git_commit or "-"),
        "host": f"{info.host.hostname or '-'} · {info.host.cpu or '-'}",
        "folder": str(run_dir),
    }
    items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in facts.items())
    models = [f"<li>{escape(m.model)}: {escape(str(m.status))} {escape(m.artifact or '')}</li>" for m in info.models]
    packages = ", ".join(f"{k} {v}" for k, v in (info.packages or {}).items())
    return (
        f'<dl class="facts">{items}</dl>\n<details><summary>artifacts and packages</summary>'
        f"<ul>{''.join(models)}</ul><p>{escape(packages)}</p></details>"
    )


def _verdict(run_dir: Path, history_failure: str | None) -> str:
    verdict = read_verdict(run_dir)
    if verdict is None and history_failure:
        return f'<p class="muted">not gated: {escape(history_failure)}</p>'
    if verdict is None:
        return (
            '<p class="muted">not gated (gate a run with <code>run --baseline previous|latest|TAG</code> or '
            "<code>python -m harness compare BASELINE RUN_ID</code>)</p>"
        )
    asked = f"<p>baseline asked for: <code>{escape(verdict.requested)}</code>, gated {escape(verdict.gated)}</p>"
    if verdict.comparison is None:
        return f'<p class="verdict ok">{escape(verdict.note)}</p>{asked}'
    comparison = verdict.comparison
    bad = bool(comparison.regressed)
    *notes, last = verdict_lines(comparison)
    rows = comparison_rows(comparison)
    body = [
        "<tr>" + "".join(cell(v, cls="bad" if v == "REGRESSION" else "") for v in row.values()) + "</tr>"
        for row in rows
    ]
    lines = "".join(f"<li>{escape(line)}</li>" for line in notes)
    limits = ", ".join(f"{k} {'off' if v is None else v}" for k, v in vars(comparison.thresholds).items())
    return (
        f'<p class="verdict {"bad" if bad else "ok"}">{escape(last)}</p>{asked}'
        f"<p>baseline: {escape(describe_run(comparison.baseline))}<br>"
        f"candidate: {escape(describe_run(comparison.candidate))}</p>"
        + table(list(rows[0]) if rows else [], body, ident="gate-table")
        + (f'<ul class="lines">{lines}</ul>' if lines else "")
        + f'<p class="muted">thresholds: {escape(limits)}</p>'
    )


def _summary(summary: pd.DataFrame) -> str:
    shown = summary_cells(summary)
    source = {DELTA_COLUMN: "wer_delta"}  # a shown column sorts by the number it was made from
    rows = []
    for i in range(len(shown)):
        cells = []
        for col in shown.columns:
            value, text = summary[source.get(col, col)].iloc[i], shown[col].iloc[i]
            text = "" if isinstance(text, float) and np.isnan(text) else str(text)
            cls = "bad" if col == "status" and text != Status.OK else ""
            cells.append(cell(value, text, cls))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    notes = "".join(f"<li>{escape(note)}</li>" for note in status_notes(summary))
    return (
        '<p class="muted">Click a column header to sort. Columns as in <code>summary.csv</code> '
        "(README: what each means).</p>"
        + table(list(shown.columns), rows, ident="summary-table")
        + (f'<ul class="lines">{notes}</ul>' if notes else "")
    )


def _overall(models: pd.DataFrame) -> pd.DataFrame:
    """A run's rows over all its data: a suite's pooled rows, or its one dataset's."""
    if "dataset" in models and (models["dataset"] == POOLED).any():
        return models[models["dataset"] == POOLED]
    return models


def _breakdowns(run_dir: Path) -> list[tuple[str, str, str]]:
    """A section per breakdown of breakdown.csv (none without one): a row per group, a column per
    model: its headline rate and Δ against the reference with its 95% interval."""
    path = run_dir / BREAKDOWN_FILE
    if not path.is_file():
        return []
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"group": str})
    sections = []
    for name, rows in frame.groupby("breakdown", sort=False):
        wide = breakdown_cells(rows)
        body = [
            "<tr>" + cell(group) + "".join(cell(v) for v in values) + "</tr>"
            for group, values in zip(wide.index, wide.itertuples(index=False), strict=True)
        ]
        html = (
            f'<p class="muted">Per {escape(str(name))}: utterances, each model\'s headline rate (cer where the '
            "group's words are characters) and, for a converted model, Δ against the reference on the same "
            "utterances with its 95% paired bootstrap interval, in points. From <code>breakdown.csv</code>.</p>"
            + table([str(name), *map(str, wide.columns)], body, ident=f"breakdown-{_ident(str(name))}")
        )
        sections.append((f"breakdown-{_ident(str(name))}", f"By {escape(str(name))}", html))
    return sections


def _ident(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


def _scatter(summary: pd.DataFrame) -> str:
    from harness.report.plots import scatter

    svg, front = scatter(summary)
    return (
        f"<figure>{svg}<figcaption>A point per model: WER against its median latency per utterance "
        "(p50_ms). The Pareto front, dashed, joins the models no other model beats on both: "
        f"{escape(', '.join(front)) or 'none'}.</figcaption></figure>"
    )


def _trends(info: RunInfo, where: str, history_failure: str | None) -> str:
    """The job's runs on this dataset in the history, up to this run (the last TREND_RUNS). A
    history that is missing or fails leaves the report without trends, saying why; a store that is
    not a history at all is refused (`NotAHistory` reaches the command: a wrong --history)."""
    from harness.report.plots import trends

    if history_failure:
        return f'<p class="muted">no trends: {escape(history_failure)}</p>'
    job, dataset, run_id = info.job_name, info.dataset_label, info.run_id
    try:
        with History(where, access="read") as history:
            runs = [r for r in history.runs(job) if r["dataset"] == dataset and r["started"] <= info.started]
            runs = runs[-TREND_RUNS:]
            models = [history.models(r["run_id"]).assign(started=r["started"]) for r in runs]
    except NotAHistory:
        raise
    except HistoryError as exc:
        return f'<p class="muted">no trends: {escape(str(exc))}</p>'
    if not models:
        return f'<p class="muted">no runs of {escape(job)} on this dataset in history {escape(masked(where))}</p>'
    frame = _overall(pd.concat(models, ignore_index=True))  # a suite's: its pooled rows
    frame["model"] = frame["size"] + "/" + frame["target"] + "/" + frame["quant"]
    cpus = sorted(frame["cpu"].dropna().unique())
    notes = [
        f"{len(runs)} runs of job {job} on {dataset} in history {masked(where)} (the last {TREND_RUNS} at most), "
        f"oldest first."
    ]
    if run_id not in {r["run_id"] for r in runs}:
        notes.append("This run is not in the history: `python -m harness history add RUN_DIR` appends it.")
    if len(cpus) > 1:
        notes.append(f"Latency comes from {len(cpus)} kinds of CPU ({'; '.join(cpus)}): compare like with like.")
    return f"<figure>{trends(frame, run_id)}<figcaption>{escape(' '.join(notes))}</figcaption></figure>"
