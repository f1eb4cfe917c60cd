"""The nightly report: one static HTML page beside its FVD trend plot and sample videos.

    <night>/report/index.html        metric table (tonight vs the last good night), trend plot, gallery
    <night>/report/fvd_trend.png     FVD over the past nights (matplotlib, Agg: no display needed)
    <night>/report/videos/*.mp4      copies of a few generated videos

Every link is relative and nothing is fetched from the network (no scripts, fonts or style sheets from
elsewhere), so the folder works as it is from a disk, from object storage or as MLflow artifacts.

Metrics with a noise interval (`fvd_lo`/`fvd_hi` beside `fvd`, see `vidgen.eval.bootstrap`) show it as
"fvd 123.4 [110.2, 136.6]" in the tables and as error bars in the trend plot; each judged metric says which
rule judged it (`vidgen.eval.compare.compare`: "interval", "threshold" or "missing"). The FVD protocol and the
set sizes head the page when the night's params and metrics carry them.
"""

from __future__ import annotations

import datetime as dt
import html
import math
import os
import posixpath
import tempfile
from collections.abc import Iterable, Mapping, Sequence

from vidgen import storage
from vidgen.eval.compare import (
    HIGHER,
    LOWER,
    RULE_INTERVAL,
    RULE_MISSING,
    RULE_THRESHOLD,
    Comparison,
    Night,
    bounds,
    direction,
    is_bound,
)

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
figure { margin: 0; } figcaption { font-size: 12px; color: #1d2330; max-width: 256px; overflow-wrap: anywhere; }
figcaption .file { display: block; color: #5b6475; font-size: 11px; }
video { width: 256px; background: #000; display: block; }
img.plot { max-width: 100%; border: 1px solid #e1e4ea; }
.ci { color: #5b6475; font-size: 90%; } .note { color: #5b6475; font-size: 13px; max-width: 900px; }
.warn { color: #c62828; }
"""

# What each rule's regressions are called on the page (the threshold wording predates intervals).
RULE_TEXT = {RULE_THRESHOLD: "Regressed beyond threshold",
             RULE_INTERVAL: "Regressed beyond both nights' noise intervals and the threshold",
             RULE_MISSING: "Missing or NaN tonight"}


def _fmt(v: float | None) -> str:
    if v is None:
        return "&ndash;"
    if math.isnan(v):
        return "NaN"
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


def _with_interval(v: float | None, interval: tuple[float, float] | None) -> str:
    """'123.4 [110.2, 136.6]' (the interval in a muted span), or the value alone."""
    if interval is None or v is None:
        return _fmt(v)
    return f'{_fmt(v)} <span class="ci">[{_fmt(interval[0])}, {_fmt(interval[1])}]</span>'


def threshold_text(t: float | None) -> str:
    """A relative threshold as a percentage with the digits it has: 0.1 -> '10%', 0.001 -> '0.1%'."""
    return "&ndash;" if t is None else f"{t * 100:.3g}%"


def _pct(v: float | None) -> str:
    if v is None:
        return "&ndash;"
    if math.isinf(v):
        return "+inf" if v > 0 else "-inf"
    return f"{v:+.1%}"


def metric_rows(tonight: Mapping[str, float], comparison: Comparison, thresholds: Mapping[str, float],
                higher_is_better: Iterable[str]) -> list[dict]:
    """Rows of the metric table: judged metrics first, then the rest, each with its delta, noise intervals
    (tonight's and the baseline's, None without) and verdict; interval bounds (`fvd_lo`) are no rows of their own.
    """
    base = comparison.baseline.metrics if comparison.baseline else {}
    names = sorted((k for k in tonight if not is_bound(k, tonight)),
                   key=lambda k: (k not in thresholds, k.startswith(("generate/", "n_")), k))
    rows = []
    for name in names:
        delta, way = comparison.deltas.get(name), direction(name, higher_is_better)
        worse = None if delta is None or way not in (HIGHER, LOWER) else -delta if way == HIGHER else delta
        rows.append({"metric": name, "tonight": tonight[name], "baseline": base.get(name), "delta": delta,
                     "interval": bounds(tonight, name), "baseline_interval": bounds(base, name),
                     "threshold": thresholds.get(name), "regressed": name in comparison.regressed,
                     "rule": comparison.rules.get(name),
                     "direction": way, "worse": worse})
    return rows


def protocol_line(tonight: Night, baseline: Night | None) -> str:
    """'FVD protocol <p>; 2048 real and 2048 generated clips.' from the night's params and metrics (escaped
    HTML; '' when it carries neither), with a warning when the last good night used another protocol."""
    e = html.escape
    parts = []
    protocol = tonight.params.get("fvd.protocol")
    if protocol:
        parts.append(f"FVD protocol <b>{e(protocol)}</b>")
    sizes = [(tonight.metrics.get(k), what) for k, what in (("n_real", "real"), ("n_fake", "generated"))]
    sizes = [f"{int(n)} {what}" for n, what in sizes if n is not None and math.isfinite(n)]
    if sizes:
        parts.append(" and ".join(sizes) + " clips")
    text = "; ".join(parts) + "." if parts else ""
    other = baseline.params.get("fvd.protocol") if baseline else None
    if protocol and other and other != protocol:
        # FVDs from different protocols differ by more than any regression: say so next to the verdict
        text += (f' <b class="warn">The last good night used protocol {e(other)}: its numbers are not '
                 "comparable with tonight's.</b>")
    return text


def render_html(*, suite: str, label: str, tonight: Night, comparison: Comparison, rows: Sequence[dict],
                history: Sequence[Night], videos: Sequence[str], plot: str | None,
                captions: Sequence[str] = ()) -> str:
    """The page; `videos` and `plot` are paths relative to it; `captions` are the videos' prompts."""
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
    if protocol := protocol_line(tonight, base):
        out.append(f'<div class="sub" id="protocol">{protocol}</div>')
    if comparison.regressed:
        by_rule = {}
        for name in comparison.regressed:
            by_rule.setdefault(comparison.rules.get(name, RULE_THRESHOLD), []).append(name)
        said = "; ".join(f"{RULE_TEXT.get(rule, e(rule))}: <b>{e(', '.join(names))}</b>"
                         for rule, names in by_rule.items())
        out.append(f'<p id="regressed">{said}</p>')
    out += ["<h2>Metrics</h2>", '<table id="metrics"><thead><tr><th>metric</th><th>tonight</th>',
            f"<th>last good ({e(base.date) if base else '&ndash;'})</th><th>change</th><th>threshold</th>"
            "<th>judged by</th><th>direction</th></tr></thead><tbody>"]
    for r in rows:
        cls = "" if r["worse"] is None else " worse" if r["regressed"] else " better" if r["worse"] < 0 else ""
        thr = threshold_text(r["threshold"])
        out.append(f'<tr><td>{e(r["metric"])}</td><td>{_with_interval(r["tonight"], r["interval"])}</td>'
                   f'<td>{_with_interval(r["baseline"], r["baseline_interval"])}</td>'
                   f'<td class="delta{cls}">{_pct(r["delta"])}</td><td>{thr}</td>'
                   f'<td class="rule">{e(r["rule"]) if r["rule"] else "&ndash;"}</td><td>{r["direction"]}</td></tr>')
    out.append("</tbody></table>")
    if any(r["interval"] or r["baseline_interval"] for r in rows):
        out.append('<p class="note" id="interval-note">[lo, hi]: the noise interval, where the metric computed on '
                   "a fresh draw of as many real and generated clips from the same sources would fall (bootstrap, "
                   "eval.bootstrap resamples). A judged metric with intervals on both nights regresses only when "
                   "tonight's interval lies wholly on the worse side of the last good night's and the change also "
                   "exceeds its threshold; without them, the threshold alone judges.</p>")
    out.append("<h2>FVD over the past nights</h2>")
    if plot:
        out.append(f'<img class="plot" id="trend" src="{e(plot)}" alt="FVD per night, {len(history)} nights">')
    else:
        out.append("<p>No FVD values to plot.</p>")
    out += ['<table id="nights"><thead><tr><th>night</th><th>FVD</th><th>KVD</th><th>status</th><th>run</th>'
            "</tr></thead><tbody>"]
    for n in reversed(history):
        state = "regressed" if n.regressed else "ok" if n.status == "FINISHED" else n.status.lower()
        fvd, kvd = (_with_interval(n.metrics.get(m), bounds(n.metrics, m)) for m in ("fvd", "kvd"))
        out.append(f"<tr><td>{e(n.date)}</td><td>{fvd}</td><td>{kvd}</td><td>{e(state)}</td><td>{e(n.run_id)}</td>"
                   "</tr>")
    out.append("</tbody></table>")
    out.append(f"<h2>Samples ({len(videos)})</h2>")
    out.append('<div class="gallery" id="gallery">')
    for i, v in enumerate(videos):
        name = posixpath.basename(v)
        prompt = captions[i] if i < len(captions) and captions[i] else ""
        caption = (f'{e(prompt)}<span class="file">{e(name)}</span>' if prompt else e(name))
        # muted + playsinline: browsers only autoplay muted video; preload so a frame shows without a click
        out.append(f'<figure title="{e(name)}"><video src="{e(v)}" controls muted loop autoplay playsinline '
                   f'preload="auto"></video><figcaption>{caption}</figcaption></figure>')
    out.append("</div></body></html>")
    return "\n".join(out) + "\n"


def trend_plot(history: Sequence[Night], path: str, metric: str = "fvd",
               threshold: float | None = None, baseline: Night | None = None) -> bool:
    """Write a PNG of `metric` per night (regressed nights in red, noise intervals as error bars where a night
    has one); False when no night has the metric."""
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
    bars = [(x, y, b) for x, y, n in points if (b := bounds(n.metrics, metric)) is not None]
    if bars:
        bx, by = [b[0] for b in bars], [b[1] for b in bars]
        # yerr is the distance below and above the value; max(0, ..) in case a bound sits on the wrong side
        below = [max(0.0, y - b[0]) for _, y, b in bars]
        above = [max(0.0, b[1] - y) for _, y, b in bars]
        ax.errorbar(bx, by, yerr=[below, above], fmt="none", ecolor="#78909c", elinewidth=1, capsize=3, zorder=1,
                    label="noise interval")
    good = [(x, y) for x, y, n in points if not n.regressed]
    bad = [(x, y) for x, y, n in points if n.regressed]
    if good:
        ax.scatter(*zip(*good, strict=True), color="#1565c0", zorder=2, label="good night")
    if bad:
        ax.scatter(*zip(*bad, strict=True), color="#c62828", marker="X", s=70, zorder=3, label="regressed")
    if baseline is not None and threshold is not None and metric in baseline.metrics:
        ax.axhline(baseline.metrics[metric] * (1 + threshold), color="#c62828", linestyle="--", linewidth=1,
                   label=f"threshold ({html.unescape(threshold_text(threshold))} over {baseline.date})")
    if baseline is not None and (b := bounds(baseline.metrics, metric)) is not None:
        # with intervals, tonight must also clear this: its lower end above the last good night's upper end
        ax.axhline(b[1], color="#c62828", linestyle=":", linewidth=1, label=f"top of {baseline.date}'s interval")
    ax.set_ylabel(metric.upper())
    ax.set_title(f"{metric.upper()} per night ({direction(metric)})")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, format="png")
    return True


def write_report(out_dir: str, *, suite: str, label: str, tonight: Night, comparison: Comparison,
                 history: Sequence[Night], videos: Sequence[str], thresholds: Mapping[str, float],
                 higher_is_better: Iterable[str] = (), captions: Sequence[str] = ()) -> str:
    """Write the report folder to `out_dir` (local or remote) and return the URI of its index.html; the gallery
    shows each video's prompt from `captions` (aligned with `videos`), its file name below and as a tooltip."""
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
                           history=history, videos=rel_videos, plot=PLOT if plotted else None, captions=captions)
        with open(os.path.join(tmp, PAGE), "w", encoding="utf-8") as f:
            f.write(page)
        if storage.exists(out_dir):  # a rerun: the new folder replaces the old one whole
            storage.remove(out_dir, recursive=True)
        storage.upload_dir(tmp, out_dir)
    return storage.join(out_dir, PAGE)
