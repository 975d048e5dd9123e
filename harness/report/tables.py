"""The report's tables (`harness.report.page`): cells that sort by their number, the divergence tables
and the per-utterance view. Every string from data goes through `escape`."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.core.status import Status

DIVERGENCE_CSV, DIVERGENCE_PARQUET = "divergence.csv", "divergence.parquet"
DIVERGENCE_HINT = "analysis: {divergence: true} in the job"
MAX_DIVERGENCES = 50  # shown per model, the earliest divergences first
MAX_UTTERANCE_ROWS = 5000  # of utterances.parquet, in the per-utterance view
OPEN_UP_TO = 12  # divergent utterances in all: each model's list starts open when there are no more
CLIP = 400  # characters of a text shown before and after a divergence
# characters of an utterance's reference, hypothesis or error shown in the per-utterance view: a
# runaway decode (or a hostile dataset) may hold megabytes, and 5000 rows of them would too
MAX_TEXT = 2000
# the per-utterance divergence metrics, as each reads (format of its value)
_METRICS = {
    "encoder_snr_db": "encoder SNR {:.1f} dB",
    "tf_steps": "{:.0f} teacher-forced steps",
    "tf_top1_agreement": "top-1 agreement {:.1%}",
    "tf_max_abs_dlogit": "max |Δlogit| {:.3g}",
    "tf_mean_kl": "mean KL {:.3g}",
    "tf_max_kl": "max KL {:.3g}",
}
_EXACT = {
    "exact_match": "full",
    "hybrid_cand_encoder_exact": "cand-enc+ref-dec",
    "hybrid_cand_decoder_exact": "ref-enc+cand-dec",
}


def fmt(value: Any) -> str:
    """Any value of a frame as text: numbers to 4 significant digits, lists joined, missing as '-'."""
    if isinstance(value, dict):
        return ", ".join(f"{k}: {fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple, np.ndarray)):
        return " ".join(fmt(v) for v in value)
    if value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and np.isnan(value)):
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)


def cell(value: Any, text: str | None = None, cls: str = "", title: str = "") -> str:
    """A table cell showing `text` (default: the value as `fmt` writes it), sorting by the value
    when it is a number (`data-v`; empty for a missing one, which sorts last)."""
    attrs = ""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
        number = float(value)  # an infinite SNR (identical encoders) sorts as JavaScript's Infinity
        attrs = ' data-v=""' if np.isnan(number) else f' data-v="{number:.10g}"'.replace("inf", "Infinity")
    if cls:
        attrs += f' class="{cls}"'
    if title:
        attrs += f' title="{escape(title)}"'
    return f"<td{attrs}>{escape(fmt(value) if text is None else text)}</td>"


def table(headers: list[str], rows: list[str], ident: str, cls: str = "sortable") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    return (
        f'<div class="scroll"><table class="{cls}" id="{ident}"><thead><tr>{head}</tr></thead><tbody>\n'
        + "\n".join(rows)
        + "\n</tbody></table></div>"
    )


def frame_table(frame: pd.DataFrame, ident: str) -> str:
    """Any frame, every column, as a sortable table."""
    rows = [
        "<tr>"
        + "".join(
            cell(v, cls="bad" if c == "status" and v != Status.OK else "")
            for c, v in zip(frame.columns, r, strict=True)
        )
        + "</tr>"
        for r in frame.itertuples(index=False)
    ]
    return table([str(c) for c in frame.columns], rows, ident)


def model_labels(frame: pd.DataFrame) -> pd.Series:
    return frame["size"] + "/" + frame["target"] + "/" + frame["quant"]


def divergence_section(run_dir: Path) -> str:
    per_model, per_utterance = run_dir / DIVERGENCE_CSV, run_dir / DIVERGENCE_PARQUET
    if not per_model.is_file() and not per_utterance.is_file():
        return (
            f'<p class="muted">not run (enable with <code>{escape(DIVERGENCE_HINT)}</code>: teacher-forced '
            "decoding, encoder SNR and hybrid models, which cost extra decoding)</p>"
        )
    parts = []
    if per_model.is_file():
        parts.append(f"<h3>Per model ({DIVERGENCE_CSV})</h3>" + frame_table(pd.read_csv(per_model), "divergence-table"))
    if per_utterance.is_file():
        parts.append(f"<h3>Divergent utterances ({DIVERGENCE_PARQUET})</h3>")
        parts.append(_divergent_utterances(pd.read_parquet(per_utterance)))
    return "\n".join(parts)


def _divergent_utterances(rows: pd.DataFrame) -> str:
    """Per model, each utterance whose tokens depart from the reference's (or that failed): where,
    the two texts from there on, and the two top-5s at that step."""
    rows = rows.assign(model=model_labels(rows))
    diverged = rows["first_divergence"].notna() | (rows["status"] != Status.OK)
    parts = []
    for model, group in rows.groupby("model", sort=False):
        bad = group[diverged[group.index]].sort_values("first_divergence", na_position="last")
        shown = bad.head(MAX_DIVERGENCES)
        failed = int((bad["status"] != Status.OK).sum())
        count = f"{len(bad) - failed} of {len(group)} utterances diverge"
        count += f", {failed} not analysed" if failed else ""
        count += f" (the first {len(shown)} shown)" if len(shown) < len(bad) else ""
        items = "\n".join(_divergence(row) for row in shown.to_dict("records"))
        opened = " open" if diverged.sum() <= OPEN_UP_TO else ""
        parts.append(f"<details{opened}><summary>{escape(model)}: {count}</summary>\n{items}\n</details>")
    return "\n".join(parts)


def _divergence(row: dict[str, Any]) -> str:
    facts = [fmt_metric.format(row[k]) for k, fmt_metric in _METRICS.items() if fmt(row.get(k)) != "-"]
    exact = [f"{label} {fmt(row[k])}" for k, label in _EXACT.items() if k in row]
    if exact:
        facts.append("exact: " + ", ".join(exact))
    where = row.get("first_divergence")
    head = f"<b>{escape(str(row['utt_id']))}</b> · {escape(str(row['status']))}"
    if fmt(where) != "-":
        head += (
            f" · first divergent token #{int(where)}: <code>{escape(_token(row.get('ref_token')))}</code> → "
            f"<code>{escape(_token(row.get('cand_token')))}</code>"
        )
    prefix = str(row.get("common_prefix_text") or "")
    prefix = prefix if len(prefix) <= CLIP else "…" + prefix[-CLIP:]
    sides = []
    for side, label in (("ref", "reference"), ("cand", "candidate")):
        rest = str(row.get(f"{side}_continuation") or "")
        rest = rest if len(rest) <= CLIP else rest[:CLIP] + "…"
        top5 = row.get(f"{side}_top5")
        listed = isinstance(top5, (list, tuple, np.ndarray))  # a missing list reads as None or NaN
        ranked = "".join(f"<li>{escape(_choice(t))}</li>" for t in top5) if listed else ""
        sides.append(
            f'<div><h4>{label}</h4><p class="text">{escape(prefix)}<mark>{escape(rest)}</mark></p>'
            + (f'<ol class="top5">{ranked}</ol>' if ranked else "")
            + "</div>"
        )
    error = f'<p class="bad">{escape(str(row["error"]))}</p>' if fmt(row.get("error")) != "-" else ""
    note = f'<p class="muted">{escape(str(row["note"]))}</p>' if fmt(row.get("note")) != "-" else ""
    return (
        f'<div class="divergence"><p>{head}</p><p class="muted">{escape(" · ".join(facts))}</p>'
        f'<div class="sides">{"".join(sides)}</div>{error}{note}</div>'
    )


def _token(value: Any) -> str:
    """A token's text quoted, so its leading space shows (' the' is not 'the')."""
    return repr(value) if isinstance(value, str) else fmt(value)


def _choice(choice: Any) -> str:
    """One of a top-5: {id, token, p} as `' the' p=0.912 #262`; any other shape as `fmt` writes it."""
    if isinstance(choice, dict) and "token" in choice:
        p, ident = choice.get("p"), choice.get("id")
        return (
            _token(choice["token"])
            + (f" p={fmt(p)}" if p is not None else "")
            + (f" #{ident}" if ident is not None else "")
        )
    return fmt(choice)


def _cut(value: Any) -> str:
    """A text as the per-utterance view shows it: its first MAX_TEXT characters, and how long it is
    when that is not all of it."""
    text = fmt(value)
    if len(text) <= MAX_TEXT:
        return text
    return f"{text[:MAX_TEXT]}… ({len(text):,} characters; utterances.parquet has them all)"


def utterance_section(utts: pd.DataFrame, summary: pd.DataFrame) -> str:
    """Every row of utterances.parquet (up to MAX_UTTERANCE_ROWS), with a filter: text, model, and
    only the rows with word errors, a token divergence or no transcript."""
    utts = utts.assign(model=model_labels(utts))
    flagged = (
        (utts["status"] != Status.OK) | (utts["wer_errors"].fillna(0) > 0) | utts["exact_match"].eq(False).fillna(False)
    )
    rows = []
    for row, bad in zip(utts.head(MAX_UTTERANCE_ROWS).to_dict("records"), flagged, strict=False):
        ok = row["status"] == Status.OK
        errors = row["wer_errors"]
        counts = ", ".join(f"{k} {fmt(row[k])}" for k in ("substitutions", "deletions", "insertions"))
        hyp = row["hyp_text"] if ok else row["error"]
        rows.append(
            f'<tr data-model="{escape(row["model"])}" data-bad="{int(bool(bad))}">'
            + cell(row["model"], cls="tight")
            + cell(row["utt_id"], cls="tight")
            + cell(row["status"], cls="tight" if ok else "tight bad")
            + cell(
                float("nan") if errors is pd.NA else errors, f"{fmt(errors)} / {fmt(row['ref_words'])}", title=counts
            )
            + cell(row["exact_match"], cls="bad" if row["exact_match"] is False else "")
            + cell(float("nan") if row["first_divergence"] is pd.NA else row["first_divergence"])
            + cell(row["total_ms"], f"{row['total_ms']:.1f}" if row["total_ms"] == row["total_ms"] else "-")
            + cell(row["ref_text"], _cut(row["ref_text"]), cls="text")
            + cell(hyp, _cut(hyp), cls="text" if ok else "text bad")
            + "</tr>"
        )
    models = "".join(f'<option value="{escape(m)}">{escape(m)}</option>' for m in model_labels(summary))
    clipped = (
        f'<p class="muted">the first {MAX_UTTERANCE_ROWS} of {len(utts)} rows (utterances.parquet has them all)</p>'
        if len(utts) > MAX_UTTERANCE_ROWS
        else ""
    )
    controls = (
        '<div class="filters"><input id="utt-filter" type="search" placeholder="filter: id, text, error…" '
        'aria-label="filter the rows by text">'
        f'<select id="utt-model" aria-label="model"><option value="">all models</option>{models}</select>'
        '<label><input id="utt-bad" type="checkbox"> only errors or divergence</label>'
        '<span id="utt-count" class="muted"></span></div>'
    )
    headers = ["model", "utterance", "status", "word errors", "exact", "first div", "ms", "reference", "hypothesis"]
    return controls + clipped + table(headers, rows, "utterance-table")
