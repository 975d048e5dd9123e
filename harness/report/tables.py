"""The report's tables (`harness.report.page`): cells that sort by their number, the divergence tables
and the per-utterance view. Every string from data goes through `escape`.

utterances.parquet and divergence.parquet may hold a million rows: the views read from them only
what they show (the first rows of the per-utterance view; the divergent utterances listed, found
by a pass over the few columns that choose them), never a whole file."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from converters.census import CENSUS_FILE, Census, compute_line, precision_line, short_name
from converters.layer_drift import threshold_for
from harness.core.status import Status
from harness.report.plots import block_drift
from harness.results.record import parquet_stream

DIVERGENCE_CSV, DIVERGENCE_PARQUET = "divergence.csv", "divergence.parquet"
DIVERGENCE_HINT = "analysis: {divergence: true} in the job"
MAX_DIVERGENCES = 50  # shown per model, the earliest divergences first
MAX_UTTERANCE_ROWS = 5000  # of utterances.parquet, in the per-utterance view
OPEN_UP_TO = 12  # divergent utterances in all: each model's list starts open when there are no more
CLIP = 400  # characters of a text shown before and after a divergence
# characters of an utterance's reference, hypothesis or error shown in the per-utterance view: a
# runaway decode (or a hostile dataset) may hold megabytes, and 5000 rows of them would too
MAX_TEXT = 2000
# the columns of utterances.parquet the per-utterance view shows or filters on
UTTERANCE_VIEW_COLUMNS = [
    "size", "target", "quant", "utt_id", "status", "error", "wer_errors", "substitutions", "deletions",
    "insertions", "ref_words", "exact_match", "first_divergence", "total_ms", "ref_text", "hyp_text",
]  # fmt: skip
# rows of divergence.parquet read at a time, choosing the divergent utterances and reading them
SCAN_ROWS = 10_000
# the columns of divergence.parquet that choose them (the model's three first)
_CHOOSING = ["size", "target", "quant", "status", "first_divergence"]
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


def census_section(run_dir: Path) -> str:
    """A row per graph file of each converted model (`census.json`, `converters.census`): its
    engine, operators and how many run inside the delegate's partitions, the fallback operators,
    the weights' precision, the largest weight; then the device forms' checks."""
    path = run_dir / CENSUS_FILE
    if not path.is_file():
        return '<p class="muted">No census in this run (runs before the census was written have none).</p>'
    rows, checks = [], []
    for label, facts in json.loads(path.read_text()).items():
        if "error" in facts:
            rows.append("<tr>" + cell(label) + cell("", facts["error"]) + "".join(cell("") for _ in range(7)) + "</tr>")
            continue
        found = Census.from_dict(facts)
        for g in found.graphs:
            fallback = Counter(g.ops) - Counter(g.delegated or {})
            biggest = g.largest[0] if g.largest else None
            rows.append(
                "<tr>"
                + cell(label)
                + cell(g.file, title=g.engine)
                + cell(g.n_ops)
                + cell(g.delegated_share if g.delegated_share is not None else np.nan,
                       "-" if g.delegated_share is None else f"{g.delegated_share:.0%} in {g.partitions}")
                + cell(", ".join(f"{op} {n}" for op, n in fallback.most_common(6)) if g.delegated is not None else "")
                + cell(precision_line(g.weights))
                + cell(compute_line(g.compute) if g.ops else "")
                + cell(biggest.bytes / 1e6 if biggest else np.nan,
                       f"{short_name(biggest.name)} {list(biggest.shape)} {biggest.dtype}" if biggest else "")
                + "</tr>"
            )  # fmt: skip
        checks += [f"<li>{escape(f'{label}: {name}: {verdict}')}</li>" for name, verdict in found.checks.items()]
    headers = ["model", "file", "ops", "delegated", "fallback ops", "weights", "compute", "largest weight (MB)"]
    html = (
        '<p class="muted">Inside each converted artifact: operators per graph file, the share inside the '
        "delegate's partitions (XNNPACK for LiteRT and ExecuTorch; '-': the engine runs every operator "
        "itself), the operators left to the fallback kernels, the weights' bytes per precision, the "
        "multiply-accumulates of one call per precision (where the file's shapes are static), the largest "
        "weight. <code>python -m harness inspect MODEL</code> prints one artifact's. From "
        "<code>census.json</code>.</p>" + table(headers, rows, ident="census")
    )
    return html + (f"<ul>{''.join(checks)}</ul>" if checks else "")


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
    if per_utterance.is_file() and (curves := drift_curves(per_utterance)) is not None:
        parts.append(
            "<h3>Layer drift</h3>"
            '<p class="muted">Median output SNR of each block against openai-whisper\'s, over the utterances '
            "measured (every divergent one and a fixed sample of the others; the decoder at the first "
            "divergent step), for models whose runtime gives its blocks. The first block below a model's bar "
            "(its parity bar for encoder SNR) is where its drift starts: <code>first_drift_block</code> "
            "above.</p>" + block_drift(curves)
        )
    if per_utterance.is_file():
        parts.append(f"<h3>Divergent utterances ({DIVERGENCE_PARQUET})</h3>")
        parts.append(_divergent_utterances(per_utterance))
    return "\n".join(parts)


def drift_curves(path: Path) -> pd.DataFrame | None:
    """Per model and block, the median output SNR over the measured utterances of divergence.parquet
    and the model's bar; None when no model was measured (or the run predates the measure)."""
    if "layer_drift" not in pq.read_schema(path).names:  # a run from before the layer drift
        return None
    rows = pq.read_table(path, columns=["size", "target", "quant", "layer_drift"]).to_pandas()
    rows = rows[rows["layer_drift"].notna()]
    if rows.empty:
        return None
    flat = pd.DataFrame(
        [
            {"model": f"{r.size}/{r.target}/{r.quant}", "block": b["block"], "snr_db": b["snr_db"],
             "threshold_db": threshold_for(r.target, r.quant)}
            for r in rows.itertuples()
            for b in r.layer_drift
        ]
    )  # fmt: skip
    curves = flat.groupby(["model", "block"], sort=False)
    return curves.agg(snr_db=("snr_db", "median"), threshold_db=("threshold_db", "first")).reset_index()


@dataclass
class _Divergent:
    """One model's rows in divergence.parquet, counted over a pass through it: its divergent rows
    (tokens departing from the reference's, or not analysed: `failed`) with their first divergence
    and row number."""

    rows: int = 0
    failed: int = 0
    bad: list[pa.Table] = field(default_factory=list)


def _divergent_utterances(path: Path) -> str:
    """Per model, each utterance whose tokens depart from the reference's (or that failed): where,
    the two texts from there on, and the two top-5s at that step.

    Read in two passes, a batch at a time: the columns that choose the rows (keeping, of the
    divergent rows, their first divergence and row number); then only the rows listed, whole."""
    parquet = parquet_stream(path)
    models: dict[str, _Divergent] = {}  # in the order models first appear
    start = 0
    for batch in parquet.iter_batches(SCAN_ROWS, columns=_CHOOSING):
        rows = pa.Table.from_batches([batch]).append_column("row", pa.array(range(start, start + batch.num_rows)))
        start += batch.num_rows
        text = pa.large_string()  # the separator's type must be the columns' own
        labels = pc.binary_join_element_wise(*(pc.cast(rows[c], text) for c in _CHOOSING[:3]), pa.scalar("/", text))
        failed = pc.fill_null(pc.not_equal(rows["status"], Status.OK.value), True)
        bad = pc.or_(pc.is_valid(rows["first_divergence"]), failed)
        for label in pc.unique(labels).to_pylist():
            mine = pc.equal(labels, label)
            model = models.setdefault(label, _Divergent())
            model.rows += pc.sum(mine).as_py()
            model.failed += pc.sum(pc.and_(pc.and_(mine, bad), failed)).as_py()
            model.bad.append(rows.select(["first_divergence", "row"]).filter(pc.and_(mine, bad)))
    # each model's earliest divergences, failures last, as pandas sorts the column read as pandas
    # reads it (its dtype from the file's pandas metadata): the rows today's reports listed
    bad = {
        label: pa.concat_tables(model.bad).replace_schema_metadata(parquet.schema_arrow.metadata).to_pandas()
        for label, model in models.items()
    }
    listed = {
        label: rows.sort_values("first_divergence", na_position="last")["row"].head(MAX_DIVERGENCES).tolist()
        for label, rows in bad.items()
    }
    whole = _rows_at(parquet_stream(path), sorted(row for rows in listed.values() for row in rows))
    opened = " open" if sum(len(rows) for rows in bad.values()) <= OPEN_UP_TO else ""
    parts = []
    for label, model in models.items():
        shown = whole.loc[listed[label]]
        count = f"{len(bad[label]) - model.failed} of {model.rows} utterances diverge"
        count += f", {model.failed} not analysed" if model.failed else ""
        count += f" (the first {len(shown)} shown)" if len(shown) < len(bad[label]) else ""
        items = "\n".join(_divergence(row) for row in shown.to_dict("records"))
        parts.append(f"<details{opened}><summary>{escape(label)}: {count}</summary>\n{items}\n</details>")
    return "\n".join(parts)


def _rows_at(parquet: pq.ParquetFile, numbers: list[int]) -> pd.DataFrame:
    """The rows of a parquet file at the given row numbers (ascending), every column, as pandas
    reads them, indexed by their number: a pass in batches that keeps only those."""
    wanted = np.asarray(numbers, dtype=np.int64)
    found, start = [], 0
    for batch in parquet.iter_batches(SCAN_ROWS):
        here = wanted[(wanted >= start) & (wanted < start + batch.num_rows)]
        found.append(batch.take(pa.array(here - start)))
        start += batch.num_rows
    rows = pa.Table.from_batches(found, schema=parquet.schema_arrow).to_pandas()
    rows.index = wanted
    return rows


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


def _head(path: Path, columns: list[str], count: int) -> tuple[pd.DataFrame, int]:
    """The first `count` rows of a parquet file, `columns` only, as pandas reads them; and how many
    rows the file has (from its footer)."""
    parquet = parquet_stream(path)
    batches, read = [], 0
    for batch in parquet.iter_batches(batch_size=count, columns=columns):
        batches.append(batch)
        read += batch.num_rows
        if read >= count:
            break
    head = pa.Table.from_batches(batches) if batches else parquet.schema_arrow.empty_table().select(columns)
    return head.slice(0, count).to_pandas(), parquet.metadata.num_rows


def utterance_section(path: Path, summary: pd.DataFrame) -> str:
    """The rows of utterances.parquet at `path` (the first MAX_UTTERANCE_ROWS), with a filter:
    text, model, and only the rows with word errors, a token divergence or no transcript."""
    utts, total = _head(path, UTTERANCE_VIEW_COLUMNS, MAX_UTTERANCE_ROWS)
    utts = utts.assign(model=model_labels(utts))
    flagged = (
        (utts["status"] != Status.OK) | (utts["wer_errors"].fillna(0) > 0) | utts["exact_match"].eq(False).fillna(False)
    )
    rows = []
    for row, bad in zip(utts.to_dict("records"), flagged, strict=True):
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
        f'<p class="muted">the first {MAX_UTTERANCE_ROWS} of {total} rows (utterances.parquet has them all)</p>'
        if total > MAX_UTTERANCE_ROWS
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
