"""The HTML report, on three nights of one job in a history of their own: the session's real short
run (`nightly_run`), a real second night run with `report: true` and `--baseline previous`, and a
third derived from it with words dropped on purpose (gated: a regression), with divergence
fixture frames; and on a synthetic 15-model, 70-utterance run for the size budget. The pages are
loaded in headless Chromium (Debian's `chromium`): no console message, charts and tables present,
sorting and the filter working."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html import escape, unescape
from html.parser import HTMLParser
from pathlib import Path

import jiwer
import numpy as np
import pandas as pd
import pytest

from harness.exit_codes import ExitCode
from harness.nightly.gate import compare
from harness.nightly.history import History
from harness.nightly.verdict import read_verdict, verdict_lines
from harness.report.page import TREND_RUNS, write_report
from harness.report.plots import pareto_front
from harness.results.record import read_run
from tests.conftest import EMBEDDED, embedded_ray
from tests.nightly_runs import MTK, derive_run, drop_words, in_process
from tests.report_runs import HOSTILE, later_night, synthetic_run, write_divergence

CHROMIUM = Path("/usr/bin/chromium")
JOB = """name: librispeech_tiny_en
dataset: {{path: {data}}}
models: {{sizes: [tiny.en], targets: {{torchscript-mtk: [fp32]}}}}
cluster: {{shard_size: 2}}
thresholds: {{max_latency_ratio: null}}  # same artifacts, same words; a shared CPU's timings vary
report: true
"""


@pytest.fixture(scope="module")
def nights(nightly_run, models_root, tmp_path_factory) -> dict:
    results = tmp_path_factory.mktemp("report")
    history = str(results / "history.sqlite")
    first = Path(shutil.copytree(nightly_run["run_dir"], results / "librispeech_tiny_en" / nightly_run["run_dir"].name))
    with History(history) as store:
        store.add(read_run(first))
    job = results / "job.yaml"
    job.write_text(JOB.format(data=EMBEDDED))
    embedded_ray()
    code, stdout, _ = in_process(
        "run", job, "--limit", 6, "--out", results, "--models", models_root, "--no-progress",
        "--history", history, "--baseline", "previous",
    )  # fmt: skip
    (second,) = [p for p in first.parent.iterdir() if p != first]
    third = derive_run(second, results, 3, drop_words(4))
    info = json.loads((third / "run.json").read_text())  # a night after the second
    day_after = pd.Timestamp(json.loads((second / "run.json").read_text())["started"]) + pd.Timedelta(days=1)
    for key, time in (("started", day_after), ("finished", day_after + pd.Timedelta(minutes=10))):
        info[key] = time.strftime("%Y-%m-%dT%H:%M:%SZ")
    (third / "run.json").write_text(json.dumps(info))
    with History(history) as store:
        store.add(read_run(third))
    gated = in_process("compare", "previous", third.name, "--history", history)
    write_divergence(third)
    reported = in_process("report", third, "--history", history)
    return {
        "results": results, "history": history, "runs": (first, second, third), "run": (code, stdout),
        "gated": gated, "reported": reported,
    }  # fmt: skip


class _Tables(HTMLParser):
    """Each table's rows (header row first) as cell texts, by the table's id."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table: list[list[str]] | None = None
        self._cell: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._table = self.tables.setdefault(dict(attrs).get("id", ""), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self._table[-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _records(html: str, table: str) -> list[dict[str, str]]:
    header, *rows = _Tables(html).tables[table]
    return [dict(zip(header, row, strict=True)) for row in rows]


def test_run_writes_the_report_after_its_gate(nights):
    first, second, _ = nights["runs"]
    code, stdout = nights["run"]
    assert code == ExitCode.OK, stdout
    page = second / "report.html"
    assert stdout.rstrip().splitlines()[-1] == f"report: {page}"
    verdict = read_verdict(second)
    assert verdict.requested == "previous" and verdict.exit_code == 0
    assert verdict.comparison.baseline["run_id"] == first.name
    with History(nights["history"]) as store:  # what gate.json kept is what the gate decides again
        assert verdict.comparison == compare(store, first.name, second.name)
    html = page.read_text()
    assert '<p class="verdict ok">gate: ok, 2 models within thresholds</p>' in html
    assert "not run (enable with <code>analysis: {divergence: true} in the job</code>" in html
    assert f"<code>previous</code>, gated {verdict.gated}" in html


def test_the_numbers_shown_are_the_summary_s(nights):
    """Every WER, n and p50 cell against summary.csv, and both against the utterance rows (jiwer, numpy)."""
    for run in nights["runs"][1:]:
        summary = pd.read_csv(run / "summary.csv")
        utts = pd.read_parquet(run / "utterances.parquet")
        shown = _records((run / "report.html").read_text(), "summary-table")
        assert len(shown) == len(summary)
        for cells, row in zip(shown, summary.to_dict("records"), strict=True):
            assert (cells["size"], cells["target"], cells["quant"]) == (row["size"], row["target"], row["quant"])
            assert cells["wer"] == f"{100 * row['wer']:.2f}%" and cells["n"] == str(row["n"])
            assert cells["p50_ms"] == f"{row['p50_ms']:.1f}"
            rows = utts[(utts["target"] == row["target"]) & (utts["quant"] == row["quant"])]
            assert row["wer"] == pytest.approx(jiwer.wer(list(rows["ref_norm"]), list(rows["hyp_norm"])), abs=1e-12)
            assert row["p50_ms"] == pytest.approx(float(np.percentile(rows["total_ms"], 50)), abs=1e-9)


def test_the_regression_the_trends_and_the_divergence_are_shown(nights):
    _, _, third = nights["runs"]
    assert nights["gated"][0] == ExitCode.REGRESSION and nights["reported"][0] == ExitCode.OK
    html = (third / "report.html").read_text()
    lines = verdict_lines(read_verdict(third).comparison)
    assert lines[-1] == "gate: 1 of 2 models regressed (exit 3)"
    assert f'<p class="verdict bad">{escape(lines[-1])}</p>' in html
    assert all(escape(line) in html for line in lines if line.startswith("REGRESSION"))
    gate_rows = _records(html, "gate-table")
    assert [(r["model"], r["verdict"]) for r in gate_rows] == [
        ("tiny.en/reference/fp32", "ok"),
        ("/".join(MTK), "REGRESSION"),
    ]
    assert "3 runs of job librispeech_tiny_en" in html and 'id="chart-trends"' in html
    per_model = pd.read_csv(third / "divergence.csv")
    assert len(_records(html, "divergence-table")) == len(per_model) == 1
    per_utt = pd.read_parquet(third / "divergence.parquet")
    diverged = per_utt[per_utt["first_divergence"].notna()]
    assert len(diverged) == 4  # the four utterances that lost words
    for row in diverged.to_dict("records"):
        for side in ("ref", "cand"):
            marked = f"{escape(row['common_prefix_text'])}<mark>{escape(row[f'{side}_continuation'])}</mark>"
            assert marked in html
        tokens = f"<code>{escape(repr(row['ref_token']))}</code> → <code>{escape(repr(row['cand_token']))}</code>"
        assert f"first divergent token #{row['first_divergence']}: {tokens}" in html
        assert all(f"<li>{escape(repr(t['token']))} p=" in html for t in row["cand_top5"])


def test_the_census_shows_what_executes_where(nights):
    """The real night's converted model: its two TorchScript graphs, counted from its files (tiny.en:
    4 encoder blocks of 6 linears; 4 decoder blocks of 10, cross keys and values included)."""
    second = nights["runs"][1]
    found = json.loads((second / "census.json").read_text())
    assert list(found) == ["/".join(MTK)]  # converted models only
    graphs = {g["file"]: g for g in found["/".join(MTK)]["graphs"]}
    assert set(graphs) == {"encoder.pt", "decoder.pt"}  # token_embedding.npy is no graph
    assert graphs["encoder.pt"]["ops"]["linear"] == 24 and graphs["decoder.pt"]["ops"]["linear"] == 40
    shown = _records((second / "report.html").read_text(), "census")
    assert [(r["model"], r["file"]) for r in shown] == [("/".join(MTK), "decoder.pt"), ("/".join(MTK), "encoder.pt")]
    assert all(r["delegated"] == "-" and r["weights"].startswith("float32 100%") for r in shown)


def test_the_report_command_finds_runs_and_refuses_others(nights, tmp_path):
    results, history = nights["results"], nights["history"]
    _, second, _ = nights["runs"]
    (second / "report.html").unlink()
    code, out, _ = in_process("report", "latest", "--results", results, "--history", history)
    assert (code, out.strip()) == (0, f"report: {second / 'report.html'}")
    code, out, _ = in_process("report", second.name, "--results", results, "--out", tmp_path / "r.html")
    assert code == 0 and (tmp_path / "r.html").is_file() and 'id="chart-trends"' in (tmp_path / "r.html").read_text()
    code, _, _ = in_process("report", second, "--history", tmp_path / "none.sqlite", "--out", tmp_path / "s.html")
    assert code == 0 and "no trends: history " in (tmp_path / "s.html").read_text()  # nothing else missing
    assert not (tmp_path / "none.sqlite").exists()
    code, _, err = in_process("report", "20990101-000000-ffffff", "--results", results)
    assert code == ExitCode.BAD_INPUT and err.startswith("error: 20990101-000000-ffffff: no run with that id")
    half = tmp_path / "job" / "half"
    half.mkdir(parents=True)
    (half / "run.json").write_text("{}")
    code, _, err = in_process("report", half)
    assert code == ExitCode.BAD_INPUT and "not a complete run (no summary.csv, utterances.parquet)" in err
    assert len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """The synthetic run and TREND_RUNS - 1 slower copies of it in a history, its divergence files."""
    results = tmp_path_factory.mktemp("synthetic")
    history = str(results / "history.sqlite")
    first = synthetic_run(results)
    nights = [first, *(later_night(first, n, 1 + 0.02 * n) for n in range(1, TREND_RUNS))]
    with History(history) as store:
        for night in nights:
            store.add(read_run(night))
    write_divergence(nights[-1])
    return write_report(nights[-1], history)


def test_a_15_model_70_utterance_report_is_well_under_5_mb_and_escapes_data(synthetic):
    html = synthetic.read_text()
    assert synthetic.stat().st_size < 5_000_000
    assert len(_records(html, "utterance-table")) == 15 * 70 and len(_records(html, "summary-table")) == 15
    assert html.count("<svg") == 2 and f"{TREND_RUNS} runs of job synthetic" in html
    for hostile in (HOSTILE, "runtime <not> installed & unusable", '"</td>" <b>bad</b>'):
        assert hostile not in html and escape(hostile) in html
    # nothing to fetch: every src/href in the markup is a link within the page
    assert re.findall(r"""<[^>]*\b(?:src|href)\s*=\s*(?!["']?#)[^>]*>""", html) == []
    assert "<link" not in html and "@import" not in html and "url(" not in html.replace("url(#", "")


@pytest.mark.unit
def test_pareto_front_by_hand():
    wer = np.array([0.10, 0.08, 0.08, 0.12, np.nan, 0.05])
    latency = np.array([100.0, 200.0, 250.0, 90.0, 10.0, 400.0])
    # 2 is beaten by 1 (same WER, slower), the NaN model decoded nothing
    assert pareto_front(wer, latency).tolist() == [True, True, False, True, False, True]


def _chromium(page: Path, profile: Path, *args: str) -> tuple[str, str]:
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
        "--enable-logging=stderr", "--v=0", *args, page.as_uri(),
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, proc.stderr


def _csp(html: str) -> dict[str, str]:
    """The page's Content-Security-Policy, by directive."""
    (policy,) = re.findall(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', html)
    return {d.split()[0]: d.split(" ", 1)[1] for d in map(str.strip, policy.split(";")) if d}


def _script_hash(script: str) -> str:
    """As a Content-Security-Policy names an inline script: its text's sha256, in base64."""
    import base64
    import hashlib

    return f"'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'"


@pytest.fixture
def small_page(tmp_path) -> Path:
    """The report of a synthetic night, without a history (no real run, no history behind it)."""
    from tests.synthetic_nights import night

    return write_report(night(tmp_path / "results", 1), str(tmp_path / "none.sqlite"))


@pytest.mark.unit
def test_the_page_runs_its_own_script_only(small_page):
    """script-src names the sha256 of the page's one inline script, and nothing that lets any other
    inline script or handler run."""
    html = small_page.read_text()
    (script,) = re.findall(r"<script>(.*?)</script>", html, re.S)
    policy = _csp(html)
    assert policy["default-src"] == "'none'" and policy["script-src"] == _script_hash(script)
    assert "unsafe" not in policy["script-src"]


@pytest.mark.unit
def test_a_long_transcript_is_cut_with_its_length_said(tmp_path):
    from tests.synthetic_nights import night

    long = " ".join(f"word{i:05d}" for i in range(10_000))  # 99,999 characters
    hyp = long[:50_000] + " and then some"

    def talkative(utts: pd.DataFrame) -> pd.DataFrame:
        utts = utts.astype({"ref_text": object, "hyp_text": object})
        utts.loc[0, ["ref_text", "hyp_text"]] = [long, hyp]
        return utts

    page = write_report(night(tmp_path / "results", 1, talkative), str(tmp_path / "none.sqlite"))
    html = page.read_text()
    row = _records(html, "utterance-table")[0]
    assert row["reference"] == f"{long[:2000]}… ({len(long):,} characters; utterances.parquet has them all)"
    assert row["hypothesis"] == f"{hyp[:2000]}… ({len(hyp):,} characters; utterances.parquet has them all)"
    assert long[1990:2010] not in html and hyp[-100:] not in html
    short = _records(html, "utterance-table")[1]  # a text within the limit is shown whole
    assert "has them all" not in short["reference"] + short["hypothesis"]


# an inline script and an inline handler, as markup that escaped escaping would bring in
INJECTED = (
    '<script>document.body.setAttribute("data-injected", "script")</script>'
    "<img src=\"#\" onerror=\"document.body.setAttribute('data-injected', 'handler')\">"
)


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="no /usr/bin/chromium: `bash scripts/chromium.sh` installs it")
def test_an_injected_script_does_not_run(small_page, tmp_path):
    page = tmp_path / "injected.html"
    page.write_text(small_page.read_text().replace("<main>", "<main>" + INJECTED))
    dom, log = _chromium(page, tmp_path / "profile", "--dump-dom")
    assert '<body data-js="ok">' in dom  # the page's own script ran
    assert "data-injected" not in dom.split("<main>")[0]  # neither injected one did
    assert "Content Security Policy" in log


# clicks the wer header twice, then filters the utterances: one model, only errors or divergence
PROBE = """<script>
(() => {
  const table = document.getElementById("summary-table"), order = [];
  const th = Array.from(table.tHead.rows[0].cells).find((c) => c.textContent === "wer");
  for (const _ of [1, 2]) {
    th.click();
    order.push(Array.from(table.tBodies[0].rows, (r) => r.cells[th.cellIndex].getAttribute("data-v")));
  }
  const model = document.getElementById("utt-model"), bad = document.getElementById("utt-bad");
  model.value = MODEL;
  model.dispatchEvent(new Event("change"));
  bad.checked = true;
  bad.dispatchEvent(new Event("change"));
  const rows = Array.from(document.getElementById("utterance-table").tBodies[0].rows);
  const shown = rows.filter((r) => !r.hidden).map((r) => r.cells[1].textContent);
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({order, shown, count: document.getElementById("utt-count").textContent});
  document.body.appendChild(out);
})();
</script>
"""


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="no /usr/bin/chromium: `bash scripts/chromium.sh` installs it")
def test_reports_load_in_headless_chromium(nights, synthetic, tmp_path):
    for page in (nights["runs"][2] / "report.html", synthetic):
        dom, log = _chromium(page, tmp_path / "profile", "--dump-dom")
        assert [line for line in log.splitlines() if ":CONSOLE" in line or "Uncaught" in line] == []
        assert '<body data-js="ok">' in dom  # the page's script ran to its end
        for ident in ("chart-scatter", "chart-trends"):
            assert re.search(rf'<svg [^>]*id="{ident}"', dom)
        for ident in ("summary-table", "utterance-table"):
            assert f'id="{ident}"' in dom
        rows = len(pd.read_parquet(page.parent / "utterances.parquet"))
        assert f'<span id="utt-count" class="muted">{rows} of {rows} rows</span>' in dom
    # sorting and the filter, driven by a script added to a copy of the page
    model = "base/torchscript/fp32"
    probe = tmp_path / "probe.html"
    script = PROBE.replace("MODEL", json.dumps(model))
    html = synthetic.read_text().replace("</body>", script + "</body>")
    # the page runs only the scripts its policy names by hash: name the probe's too
    inline = script.removeprefix("<script>").removesuffix("</script>\n")
    html = html.replace("script-src ", f"script-src {_script_hash(inline)} ", 1)
    probe.write_text(html)
    dom, log = _chromium(probe, tmp_path / "profile", "--dump-dom")
    assert not [line for line in log.splitlines() if ":CONSOLE" in line]
    result = json.loads(unescape(re.search(r'<pre id="probe">(.*?)</pre>', dom).group(1)))
    wer = pd.read_csv(synthetic.parent / "summary.csv")["wer"].dropna()
    ascending, descending = result["order"]
    assert [float(v) for v in ascending[: len(wer)]] == pytest.approx(sorted(wer), rel=1e-9)
    assert [float(v) for v in descending[: len(wer)]] == pytest.approx(sorted(wer, reverse=True), rel=1e-9)
    assert ascending[len(wer) :] == descending[len(wer) :] == [""]  # the unavailable model: last both ways
    utts = pd.read_parquet(synthetic.parent / "utterances.parquet")
    rows = utts[(utts["size"] + "/" + utts["target"] + "/" + utts["quant"]) == model]
    flagged = rows[(rows["status"] != "ok") | (rows["wer_errors"].fillna(0) > 0) | ~rows["exact_match"].fillna(True)]
    assert result["shown"] == list(flagged["utt_id"]) and result["count"] == f"{len(flagged)} of {len(utts)} rows"
