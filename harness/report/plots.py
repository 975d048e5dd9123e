"""The report's charts: matplotlib figures as lean inline SVG (text as text, no embedded fonts).

Each chart is drawn on its own `Figure` (no pyplot: no global state) and saved as SVG with
`svg.fonttype: none`, so labels are `<text>` in the page's sans-serif font instead of glyph
outlines, and with a salt of its own, so two charts on one page never share a generated id.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd

MARKERS = "osD^vP*X"
LABEL_SIZE = 7
_RC = {
    "svg.fonttype": "none",
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],  # with fonttype none only the name is written: keep the list short
    "font.size": 9,
    "text.parse_math": False,  # a label with "$" in it (a checkpoint's path) is text, not mathtext
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e4e4e4",
    "grid.linewidth": 0.6,
}


def pareto_front(wer: np.ndarray, latency: np.ndarray) -> np.ndarray:
    """Which points no other point beats: none has lower-or-equal WER and latency with one of the two
    lower. NaN points (a model that decoded nothing) are never on it."""
    ok = ~(np.isnan(wer) | np.isnan(latency))
    front = np.zeros(len(wer), dtype=bool)
    for i in np.flatnonzero(ok):
        others = ok & (wer <= wer[i]) & (latency <= latency[i]) & ((wer < wer[i]) | (latency < latency[i]))
        front[i] = not others.any()
    return front


def to_svg(figure, name: str) -> str:
    """The figure as an `<svg>` element for inlining: no XML prolog, no metadata, no ids but the
    ones the drawing refers to, and `name` as its id."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({**_RC, "svg.hashsalt": name, "svg.id": name}):
        figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None}, bbox_inches="tight")
    text = buffer.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text, flags=re.S)
    referenced = set(re.findall(r"#([\w.-]+)", text))
    keep = referenced | {name}
    text = re.sub(r' id="([^"]+)"', lambda m: m.group(0) if m.group(1) in keep else "", text)
    return text.strip()


def _figure(width: float, height: float, rows: int = 1):
    """A figure and its axes, stacked; call it under `rc_context(_RC)`: axes take their style when made."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    return figure, figure.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]


def scatter(summary: pd.DataFrame) -> tuple[str, list[str]]:
    """WER against median latency, a point per model (colour: target, marker: size), the Pareto
    front drawn; returns the SVG and the front's models, fastest first."""
    import matplotlib
    from matplotlib.lines import Line2D

    data = summary.assign(model=summary["size"] + "/" + summary["target"] + "/" + summary["quant"])
    wer, latency = data["wer"].to_numpy(float) * 100, data["p50_ms"].to_numpy(float)
    front = pareto_front(wer, latency)
    targets, sizes = list(dict.fromkeys(data["target"])), list(dict.fromkeys(data["size"]))
    colours = matplotlib.colormaps["tab10"]
    with matplotlib.rc_context(_RC):
        figure, (ax,) = _figure(8.5, 4.6)
        shown = ~(np.isnan(wer) | np.isnan(latency))  # a model that decoded nothing has no point
        for i in np.flatnonzero(shown):
            ax.scatter(
                latency[i], wer[i], s=44, color=colours(targets.index(data["target"].iloc[i]) % 10),
                marker=MARKERS[sizes.index(data["size"].iloc[i]) % len(MARKERS)], zorder=3, clip_on=False,
                edgecolors="black" if front[i] else "white", linewidths=1.2 if front[i] else 0.5,
            )  # fmt: skip
        labels = data["target"] + "/" + data["quant"] if len(sizes) == 1 else data["model"]
        order = np.argsort(latency[front])
        ax.plot(latency[front][order], wer[front][order], "--", color="#555", lw=1, drawstyle="steps-post", zorder=2)
        if shown.any() and latency[shown].min() > 0 and latency[shown].max() / latency[shown].min() > 20:
            ax.set_xscale("log")
        ax.margins(x=0.15, y=0.12)  # room for the labels of the points at the edges
        ax.set_ylim(bottom=0)
        _label(ax, latency[shown], wer[shown], list(labels[shown]))
        ax.set_xlabel("median latency per utterance, p50_ms (lower is better)")
        ax.set_ylabel("WER, % (lower is better)")
        handles = [Line2D([], [], ls="", marker="o", color=colours(i % 10), label=t) for i, t in enumerate(targets)]
        if len(sizes) > 1:
            handles += [
                Line2D([], [], ls="", marker=MARKERS[i % len(MARKERS)], color="grey", label=s)
                for i, s in enumerate(sizes)
            ]
        handles.append(Line2D([], [], ls="--", color="#555", label="Pareto front"))
        ax.legend(handles=handles, fontsize=LABEL_SIZE + 1, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
        svg = to_svg(figure, "chart-scatter")
    return svg, [data["model"].iloc[i] for i in np.flatnonzero(front)[np.argsort(latency[front])]]


def _label(ax, xs: np.ndarray, ys: np.ndarray, labels: list[str]) -> None:
    """Each point's label beside it, at the first of a few places where it covers no label placed
    before (models with the same WER and similar latency would otherwise print over each other)."""
    ax.autoscale_view()
    scale = ax.figure.dpi / 72  # points to pixels
    frame = ax.bbox.extents  # the axes, in pixels: a label stays inside, clear of the legend beside them
    offsets = [(5, 2), (5, -10), (-5, 2), (-5, -10), (5, 11), (5, -19), (-5, 11), (-5, -19), (5, 20), (5, -28)]
    pixels = ax.transData.transform(np.column_stack([xs, ys]))
    dot = 4 * scale  # a marker's half width: labels keep off the points too
    placed = [(x - dot, y - dot, x + dot, y + dot) for x, y in pixels]
    for k in np.lexsort((-ys, xs)):
        width, height = 0.6 * LABEL_SIZE * scale * len(labels[k]), 1.2 * LABEL_SIZE * scale
        for dx, dy in offsets:
            left = pixels[k, 0] + dx * scale - (width if dx < 0 else 0)
            box = (left, pixels[k, 1] + dy * scale, left + width, pixels[k, 1] + dy * scale + height)
            inside = frame[0] <= box[0] and box[2] <= frame[2] and frame[1] <= box[1] and box[3] <= frame[3]
            if inside and not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        else:
            dx, dy = offsets[0]
        placed.append(box)
        ax.annotate(
            labels[k], (xs[k], ys[k]), xytext=(dx, dy), textcoords="offset points", fontsize=LABEL_SIZE,
            ha="right" if dx < 0 else "left", va="bottom", color="#333",
        )  # fmt: skip


def trends(history: pd.DataFrame, current: str) -> str:
    """WER and p50 latency per model over the history's runs (columns: run_id, started, model, wer,
    p50_ms; oldest first), the run `current` marked."""
    import matplotlib

    runs = list(dict.fromkeys(history["run_id"]))
    models = list(dict.fromkeys(history["model"]))
    colours = matplotlib.colormaps["tab20" if len(models) > 10 else "tab10"]
    with matplotlib.rc_context(_RC):
        figure, (top, bottom) = _figure(9.5, 5.6, rows=2)
        for i, (model, rows) in enumerate(history.groupby("model", sort=False)):
            x = [runs.index(r) for r in rows["run_id"]]
            style = {"color": colours(i % colours.N), "marker": MARKERS[i // colours.N % len(MARKERS)], "ms": 3.5}
            top.plot(x, rows["wer"] * 100, lw=1.2, label=model, **style)
            bottom.plot(x, rows["p50_ms"], lw=1.2, **style)
        for ax in (top, bottom):
            if current in runs:
                ax.axvline(runs.index(current), color="#999", lw=0.8, ls=":")
        top.set_ylabel("WER, %")
        bottom.set_ylabel("p50_ms")
        started = dict(zip(history["run_id"], history["started"], strict=False))
        ticks = np.unique(np.linspace(0, len(runs) - 1, min(len(runs), 8)).round().astype(int))
        bottom.set_xticks(ticks, [str(started[runs[t]])[:16].replace("T", " ") for t in ticks], fontsize=LABEL_SIZE)
        bottom.set_xlabel(f"run (oldest first; {len(runs)} runs; dotted: this run)")
        top.legend(fontsize=LABEL_SIZE, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
        svg = to_svg(figure, "chart-trends")
    return svg


def block_drift(curves: pd.DataFrame) -> str:
    """Each model's median output SNR per block, in data-flow order (columns: model, block, snr_db,
    threshold_db; `block` in order), its bar dotted in the model's colour."""
    import matplotlib

    blocks = list(dict.fromkeys(curves["block"]))
    colours = matplotlib.colormaps["tab10"]
    with matplotlib.rc_context(_RC):
        figure, (ax,) = _figure(9.5, 3.4)
        for i, (model, rows) in enumerate(curves.groupby("model", sort=False)):
            colour = colours(i % colours.N)
            x = [blocks.index(b) for b in rows["block"]]
            finite = np.minimum(rows["snr_db"].to_numpy(dtype=float), 150.0)  # identical outputs: inf dB
            ax.plot(x, finite, lw=1.2, marker=MARKERS[i % len(MARKERS)], ms=3.5, color=colour, label=model)
            ax.axhline(float(rows["threshold_db"].iloc[0]), color=colour, lw=0.8, ls=":")
        names = [b.replace(".blocks.", " ") for b in blocks]
        ax.set_xticks(range(len(blocks)), names, fontsize=LABEL_SIZE, rotation=45)
        ax.set_ylabel("output SNR, dB (median)")
        ax.set_xlabel("block (encoder, then decoder at the first divergent step); dotted: each model's bar")
        ax.legend(fontsize=LABEL_SIZE, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
        svg = to_svg(figure, "chart-layer-drift")
    return svg
