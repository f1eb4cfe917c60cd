"""The nightly report: one static HTML page beside its FVD trend plot and sample videos.

    <night>/report/index.html        metric table (tonight vs the last good night), trend plot, gallery
    <night>/report/fvd_trend.png     FVD over the past nights (matplotlib, Agg: no display needed)
    <night>/report/videos/*.mp4      copies of a few generated videos

Every link is relative and nothing is fetched from the network (no scripts, fonts or style sheets from
elsewhere), so the folder works as it is from a disk, from object storage or as MLflow artifacts.
"""

from __future__ import annotations

import datetime as dt
import html
import math
import os
import posixpath
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from vidgen import storage

if TYPE_CHECKING:
    from vidgen.eval.compare import Comparison, Night

PLOT = "fvd_trend.png"
PAGE = "index.html"

CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #1d2330; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.sub { color: #5b6475; margin-bottom: 12px; }
.badge { display: inline-block; padding: 3px 10px; border-radius: 12px; font-weight: 600; color: #fff; }
.ok { background: #1f8a4c; } .regressed { background: #c62828; } .first { background: #546e7a; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid #e1e4ea; padding: 5px 12px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td.worse { color: #c62828; font-weight: 600; } td.better { color: #1f8a4c; }
.gallery { display: flex; flex-wrap: wrap; gap: 14px; }
figure { margin: 0; } figcaption { font-size: 12px; color: #5b6475; max-width: 256px; overflow-wrap: anywhere; }
video { width: 256px; background: #000; display: block; }
img.plot { max-width: 100%; border: 1px solid #e1e4ea; }
"""


def _fmt(v: float | None) -> str:
    if v is None:
        return "&ndash;"
    if math.isnan(v):
        return "NaN"
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


def _pct(v: float | None) -> str:
    if v is None:
        return "&ndash;"
    if math.isinf(v):
        return "+inf" if v > 0 else "-inf"
    return f"{v:+.1%}"


def metric_rows(tonight: Mapping[str, float], comparison: Comparison, thresholds: Mapping[str, float],
                higher_is_better: Iterable[str]) -> list[dict]:
    """Rows of the metric table: judged metrics first, then the rest, each with its delta and verdict."""
    base = comparison.baseline.metrics if comparison.baseline else {}
    up = set(higher_is_better)
    names = sorted(tonight, key=lambda k: (k not in thresholds, k.startswith(("generate/", "n_")), k))
    rows = []
    for name in names:
        delta = comparison.deltas.get(name)
        worse = None if delta is None else (-delta if name in up else delta)
        rows.append({"metric": name, "tonight": tonight[name], "baseline": base.get(name), "delta": delta,
                     "threshold": thresholds.get(name), "regressed": name in comparison.regressed,
                     "direction": "count" if name.startswith(("n_", "generate/")) else
                     "higher is better" if name in up else "lower is better",
                     "worse": worse})
    return rows


def render_html(*, suite: str, label: str, tonight: Night, comparison: Comparison, rows: Sequence[dict],
                history: Sequence[Night], videos: Sequence[str], plot: str | None) -> str:
    """The page; `videos` and `plot` are paths relative to it."""
    e = html.escape
    verdict = comparison.verdict
    base = comparison.baseline
    against = (f"compared with the last good night, {e(base.date)} (run {e(base.run_id)})" if base
               else "no earlier good night to compare with")
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>vidgen nightly {e(suite)} {e(tonight.date)} {e(label)}</title>",
           f"<style>{CSS}</style></head><body>",
           f"<h1>Nightly eval: {e(suite)} / {e(label)} / {e(tonight.date)} "
           f'<span class="badge {verdict}" id="verdict">{verdict}</span></h1>',
           f'<div class="sub">MLflow run {e(tonight.run_id)}; {against}.</div>']
    if comparison.regressed:
        out.append(f'<p id="regressed">Regressed beyond threshold: <b>{e(", ".join(comparison.regressed))}</b></p>')
    out += ["<h2>Metrics</h2>", '<table id="metrics"><thead><tr><th>metric</th><th>tonight</th>',
            f"<th>last good ({e(base.date) if base else '&ndash;'})</th><th>change</th><th>threshold</th>"
            "<th>direction</th></tr></thead><tbody>"]
    for r in rows:
        cls = "" if r["worse"] is None else " worse" if r["regressed"] else " better" if r["worse"] < 0 else ""
        thr = "&ndash;" if r["threshold"] is None else f"{r['threshold']:.0%}"
        out.append(f'<tr><td>{e(r["metric"])}</td><td>{_fmt(r["tonight"])}</td><td>{_fmt(r["baseline"])}</td>'
                   f'<td class="delta{cls}">{_pct(r["delta"])}</td><td>{thr}</td><td>{r["direction"]}</td></tr>')
    out.append("</tbody></table>")
    out.append("<h2>FVD over the past nights</h2>")
    if plot:
        out.append(f'<img class="plot" id="trend" src="{e(plot)}" alt="FVD per night, {len(history)} nights">')
    else:
        out.append("<p>No FVD values to plot.</p>")
    out += ['<table id="nights"><thead><tr><th>night</th><th>FVD</th><th>KVD</th><th>status</th><th>run</th>'
            "</tr></thead><tbody>"]
    for n in reversed(history):
        state = "regressed" if n.regressed else "ok" if n.status == "FINISHED" else n.status.lower()
        out.append(f"<tr><td>{e(n.date)}</td><td>{_fmt(n.metrics.get('fvd'))}</td><td>{_fmt(n.metrics.get('kvd'))}"
                   f"</td><td>{e(state)}</td><td>{e(n.run_id)}</td></tr>")
    out.append("</tbody></table>")
    out.append(f"<h2>Samples ({len(videos)})</h2>")
    out.append('<div class="gallery" id="gallery">')
    for v in videos:
        name = posixpath.basename(v)
        # muted + playsinline: browsers only autoplay muted video; preload so a frame shows without a click
        out.append(f'<figure><video src="{e(v)}" controls muted loop autoplay playsinline preload="auto">'
                   f'</video><figcaption>{e(name)}</figcaption></figure>')
    out.append("</div></body></html>")
    return "\n".join(out) + "\n"


def trend_plot(history: Sequence[Night], path: str, metric: str = "fvd",
               threshold: float | None = None, baseline: Night | None = None) -> bool:
    """Write a PNG of `metric` per night (regressed nights in red); False when no night has the metric."""
    import matplotlib  # lazy: heavy

    matplotlib.use("Agg")  # headless: never a display
    from matplotlib.figure import Figure  # lazy: heavy; after matplotlib.use("Agg")

    points = [(dt.date.fromisoformat(n.date), n.metrics[metric], n) for n in history
              if metric in n.metrics and math.isfinite(n.metrics[metric])]
    if not points:
        return False
    fig = Figure(figsize=(8, 3.2), dpi=100)
    ax = fig.subplots()
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    ax.plot(xs, ys, "-", color="#90a4ae", zorder=1)
    good = [(x, y) for x, y, n in points if not n.regressed]
    bad = [(x, y) for x, y, n in points if n.regressed]
    if good:
        ax.scatter(*zip(*good, strict=True), color="#1565c0", zorder=2, label="good night")
    if bad:
        ax.scatter(*zip(*bad, strict=True), color="#c62828", marker="X", s=70, zorder=3, label="regressed")
    if baseline is not None and threshold is not None and metric in baseline.metrics:
        ax.axhline(baseline.metrics[metric] * (1 + threshold), color="#c62828", linestyle="--", linewidth=1,
                   label=f"regression line ({threshold:.0%} over {baseline.date})")
    ax.set_ylabel(metric.upper())
    ax.set_title(f"{metric.upper()} per night (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, format="png")
    return True


def write_report(out_dir: str, *, suite: str, label: str, tonight: Night, comparison: Comparison,
                 history: Sequence[Night], videos: Sequence[str], thresholds: Mapping[str, float],
                 higher_is_better: Iterable[str] = ()) -> str:
    """Write the report folder to `out_dir` (local or remote) and return the URI of its index.html."""
    with tempfile.TemporaryDirectory(prefix="vidgen-report-") as tmp:
        os.makedirs(os.path.join(tmp, "videos"))
        rel_videos = []
        for i, uri in enumerate(videos):
            name = f"{i:02d}-{posixpath.basename(uri.rstrip('/'))}"
            with open(os.path.join(tmp, "videos", name), "wb") as f:
                f.write(storage.read_bytes(uri))
            rel_videos.append(f"videos/{name}")
        plotted = trend_plot(history, os.path.join(tmp, PLOT), threshold=thresholds.get("fvd"),
                             baseline=comparison.baseline)
        rows = metric_rows(tonight.metrics, comparison, thresholds, higher_is_better)
        page = render_html(suite=suite, label=label, tonight=tonight, comparison=comparison, rows=rows,
                           history=history, videos=rel_videos, plot=PLOT if plotted else None)
        with open(os.path.join(tmp, PAGE), "w", encoding="utf-8") as f:
            f.write(page)
        if storage.exists(out_dir):  # a rerun: the new folder replaces the old one whole
            storage.remove(out_dir, recursive=True)
        storage.upload_dir(tmp, out_dir)
    return storage.join(out_dir, PAGE)
