"""The nightly report: HTML content, the trend plot, and the page as headless Chromium (Debian's `chromium`) sees
it: no console or network errors, nothing fetched from outside the folder, every video decodable, the plot
loaded, and a screenshot taken.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON messages separated by
NUL bytes on fds 3 and 4), so no port, no websocket library and no driver binary are needed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vidgen.data.video import write_video
from vidgen.eval.compare import Night, compare
from vidgen.eval.report import metric_rows, render_html, trend_plot, write_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


# ------------------------------------------------------------------------------------------- fixtures


def _video(path: Path, seed: int) -> str:
    """A moving colour bar: visibly different frames, H.264 (what browsers play)."""
    t, h, w = 8, 48, 64
    frames = np.zeros((t, h, w, 3), np.uint8)
    rng = np.random.default_rng(seed)
    colour = rng.integers(60, 256, 3)
    for i in range(t):
        frames[i, :, :] = (20, 24, 32)
        frames[i, 8:40, 4 + i * 6: 20 + i * 6] = colour
    write_video(str(path), frames, fps=8)
    return str(path)


def _history(n: int = 10) -> list[Night]:
    fvd = [120, 112, 108, 110, 104, 101, 130, 99, 97, 115][:n]
    return [Night(f"2026-01-{i + 1:02d}", {"fvd": float(v), "kvd": v / 100}, f"run{i}", "FINISHED",
                  regressed=(i == 6)) for i, v in enumerate(fvd)]


@pytest.fixture()
def report(tmp_path) -> Path:
    history = _history()
    *past, tonight = history
    tonight.regressed = True
    baseline = past[-1]  # 2026-01-09, FVD 97
    tonight.metrics.update({"n_real": 64.0, "n_fake": 6.0, "temporal_flickering": 3.2, "generate/generated": 6.0})
    baseline.metrics.update({"temporal_flickering": 3.0})
    thresholds = {"fvd": 0.1, "kvd": 0.25}
    cmp = compare(tonight.metrics, baseline, thresholds)
    assert cmp.regressed == ["fvd"]
    videos = [_video(tmp_path / f"sample<{i}>&.mp4", i) for i in range(6)]
    index = write_report(str(tmp_path / "out" / "report"), suite="vbench-subject", label="svd-full-xt",
                         tonight=tonight, comparison=cmp, history=history, videos=videos, thresholds=thresholds)
    return Path(index)


def _browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    if os.environ.get("CI"):
        pytest.fail("chromium not found: CI installs it with `make browser` (Debian package `chromium`)")
    pytest.skip("needs the `chromium` binary (Debian: apt-get install chromium, or `make browser` as root)")


# ------------------------------------------------------------------------------------------- DevTools on a pipe


class Chromium:
    """Headless Chromium with the DevTools protocol on fds 3 (commands in) and 4 (replies and events out)."""

    def __init__(self, binary: str, timeout: float = 60):
        self.timeout, self.events, self._id, self._buf = timeout, [], 0, b""
        self.profile = tempfile.mkdtemp(prefix="vidgen-chromium-")
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()

        def child_fds():  # dup first: dup2 onto the same number would keep close-on-exec set
            a, b = os.dup(cmd_r), os.dup(out_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [binary, "--headless", "--remote-debugging-pipe", "--no-first-run", "--no-default-browser-check",
                "--disable-gpu", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
                "--autoplay-policy=no-user-gesture-required", f"--user-data-dir={self.profile}", "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run its sandbox as root
        self.log = open(os.path.join(self.profile, "stderr.log"), "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(args, preexec_fn=child_fds, close_fds=False, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        os.close(cmd_r)
        os.close(out_w)

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._out_r], [], [], left)[0]:
                raise TimeoutError(f"no DevTools reply within {self.timeout} s:\n{self.stderr()}")
            chunk = os.read(self._out_r, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium closed the DevTools pipe:\n{self.stderr()}")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def stderr(self) -> str:
        with contextlib.suppress(OSError):
            return Path(self.profile, "stderr.log").read_text(errors="replace")[-3000:]
        return ""

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        os.close(self._cmd_w)
        os.close(self._out_r)
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


PAGE_STATE = """JSON.stringify({
  ready: document.readyState,
  videos: [...document.querySelectorAll('video')].map(v => ({src: v.getAttribute('src'), state: v.readyState,
      error: v.error && v.error.code, width: v.videoWidth, duration: v.duration})),
  images: [...document.querySelectorAll('img')].map(i => ({src: i.getAttribute('src'), complete: i.complete,
      width: i.naturalWidth})),
  rows: document.querySelectorAll('#metrics tbody tr').length,
  verdict: (document.getElementById('verdict') || {}).textContent})"""


def inspect_page(binary: str, index: Path, screenshot: Path, settle_s: float = 30) -> dict:
    """Load the page; wait until every video has a frame (or an error); return its state and every problem."""
    browser = Chromium(binary)
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.call(f"{domain}.enable", session=s)
        browser.call("Emulation.setDeviceMetricsOverride",
                     {"width": 1200, "height": 1400, "deviceScaleFactor": 1, "mobile": False}, s)
        browser.call("Page.navigate", {"url": index.resolve().as_uri()}, s)
        deadline = time.monotonic() + settle_s
        while True:
            res = browser.call("Runtime.evaluate", {"expression": PAGE_STATE, "returnByValue": True}, s)
            state = json.loads(res["result"]["value"])
            settled = all(v["state"] >= 2 or v["error"] for v in state["videos"])
            if (state["ready"] == "complete" and settled) or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        shot = browser.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, s)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        problems = []
        for e in browser.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert", "warning"):
                problems.append(f"console.{p['type']}: {p.get('args')}")
            elif m == "Runtime.exceptionThrown":
                problems.append(f"exception: {p['exceptionDetails'].get('text')}")
            elif m == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
                problems.append(f"log {p['entry']['level']}: {p['entry']['text']} {p['entry'].get('url', '')}")
            elif m == "Network.loadingFailed":
                problems.append(f"load failed: {p.get('errorText')}")
            elif m == "Network.requestWillBeSent" and not p["request"]["url"].startswith(("file:", "data:")):
                problems.append(f"fetched from outside the folder: {p['request']['url']}")
        state["problems"] = problems
        return state
    finally:
        browser.close()


# ------------------------------------------------------------------------------------------- tests


def test_report_opens_in_headless_chromium(report):
    binary = _browser()
    shot = report.parent.parent / "screenshot.png"
    state = inspect_page(binary, report, shot)
    assert state["problems"] == []
    assert len(state["videos"]) == 6
    for v in state["videos"]:
        assert v["error"] is None and v["state"] >= 2 and v["width"] == 64 and v["duration"] > 0.5, v
        assert (report.parent / v["src"]).is_file() and not os.path.isabs(v["src"])
    (plot,) = state["images"]
    assert plot["src"] == "fvd_trend.png" and plot["complete"] and plot["width"] == 800
    assert state["rows"] == 6 and state["verdict"] == "regressed"
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[1] == 1200 and image.shape[0] >= 1400
    assert image.std() > 20  # a rendered page, not a blank one
    if keep := os.environ.get("VIDGEN_KEEP_SCREENSHOT"):  # to look at it: VIDGEN_KEEP_SCREENSHOT=/tmp/r.png
        shutil.copyfile(shot, keep)


def test_chromium_check_catches_a_broken_report(report):
    """The browser check can fail: a missing video and a non-video file are reported."""
    binary = _browser()
    videos = sorted((report.parent / "videos").glob("*.mp4"))
    videos[0].unlink()
    videos[1].write_bytes(b"not a video")
    state = inspect_page(binary, report, report.parent / "broken.png", settle_s=10)
    assert any("ERR_FILE_NOT_FOUND" in p for p in state["problems"]), state["problems"]
    errors = [v for v in state["videos"] if v["error"]]
    assert {Path(v["src"]).name for v in errors} == {videos[0].name, videos[1].name}


def test_report_folder_is_self_contained(report):
    page = report.read_text()
    assert "<script" not in page and "http://" not in page and "https://" not in page and "@import" not in page
    assert "sample&lt;0&gt;&amp;.mp4" in page and "sample<0>" not in page  # names are escaped
    files = {p.relative_to(report.parent).as_posix() for p in report.parent.rglob("*") if p.is_file()}
    assert files == {"index.html", "fvd_trend.png", *(f"videos/{i:02d}-sample<{i}>&.mp4" for i in range(6))}
    assert 'id="regressed">Regressed beyond threshold: <b>fvd</b>' in page
    assert "<th>last good (2026-01-09)</th>" in page and "+18.6%" in page  # 115 / 97 - 1


def test_metric_rows_order_and_deltas():
    base = Night("2026-01-01", {"fvd": 100.0, "kvd": 1.0, "clip": 0.3})
    tonight = {"n_real": 10.0, "clip": 0.27, "kvd": 1.1, "fvd": 90.0, "motion": 2.0}
    rows = metric_rows(tonight, compare(tonight, base, {"fvd": 0.1, "clip": 0.05}, ["clip"]),
                       {"fvd": 0.1, "clip": 0.05}, ["clip"])
    assert [r["metric"] for r in rows] == ["clip", "fvd", "kvd", "motion", "n_real"]
    clip, fvd = rows[0], rows[1]
    assert clip["regressed"] and clip["delta"] == pytest.approx(-0.1) and clip["worse"] == pytest.approx(0.1)
    assert not fvd["regressed"] and fvd["worse"] == pytest.approx(-0.1) and rows[3]["baseline"] is None


def test_trend_plot_png_and_first_night(tmp_path):
    history = _history(3)
    assert trend_plot(history, str(tmp_path / "t.png"), threshold=0.1, baseline=history[1])
    png = Image.open(tmp_path / "t.png")
    assert png.format == "PNG" and png.size == (800, 320)
    assert not trend_plot([Night("2026-01-01", {"kvd": 1.0})], str(tmp_path / "none.png"))
    first = render_html(suite="s", label="l", tonight=history[0], comparison=compare({}, None, {}), rows=[],
                        history=history[:1], videos=[], plot=None)
    assert 'class="badge first"' in first and "No FVD values to plot" in first


def _ci_history() -> list[Night]:
    """Four nights with FVD and KVD intervals; the last one regressed beyond the noise."""
    fvd = [(120.0, 10.0), (112.0, 9.0), (110.0, 9.0), (140.0, 11.0)]
    nights = []
    for i, (v, half) in enumerate(fvd):
        metrics = {"fvd": v, "fvd_lo": v - half, "fvd_hi": v + half, "kvd": 1.2, "kvd_lo": math.nan,
                   "kvd_hi": math.nan, "n_real": 2048.0, "n_fake": 1024.0}
        nights.append(Night(f"2026-02-{i + 1:02d}", metrics, f"run{i}", params={"fvd.protocol": "stylegan-v"}))
    return nights


def test_report_shows_intervals_rules_and_protocol(tmp_path):
    *past, tonight = _ci_history()
    baseline = past[-1]  # 110 [101, 119]; tonight 140 [129, 151]
    thresholds = {"fvd": 0.1, "kvd": 0.25}
    cmp = compare(tonight.metrics, baseline, thresholds)
    assert cmp.regressed == ["fvd"] and cmp.rules == {"fvd": "interval", "kvd": "threshold"}
    rows = metric_rows(tonight.metrics, cmp, thresholds, [])
    assert [r["metric"] for r in rows] == ["fvd", "kvd", "n_fake", "n_real"]  # the bounds are no rows
    assert rows[0]["interval"] == (129.0, 151.0) and rows[0]["baseline_interval"] == (101.0, 119.0)
    assert rows[1]["interval"] is None and rows[1]["rule"] == "threshold"  # NaN bounds: intervals were off
    index = write_report(str(tmp_path / "report"), suite="s", label="l", tonight=tonight, comparison=cmp,
                         history=[*past, tonight], videos=[], thresholds=thresholds)
    page = Path(index).read_text()
    assert '<td>140 <span class="ci">[129, 151]</span></td><td>110 <span class="ci">[101, 119]</span></td>' in page
    assert 'id="regressed">Regressed beyond both nights\' noise intervals and the threshold: <b>fvd</b>' in page
    assert '<td class="rule">interval</td>' in page and '<td class="rule">threshold</td>' in page
    assert 'id="interval-note"' in page
    assert '<div class="sub" id="protocol">FVD protocol <b>stylegan-v</b>; 2048 real and 1024 generated clips.' \
        in page and "not comparable" not in page
    assert '<td>2026-02-01</td><td>120 <span class="ci">[110, 130]</span></td><td>1.2</td>' in page  # nights table

    baseline.params = {"fvd.protocol": "tf-gan"}  # a baseline measured otherwise is called out
    other = render_html(suite="s", label="l", tonight=tonight, comparison=cmp, rows=rows, history=[tonight],
                        videos=[], plot=None)
    assert "The last good night used protocol tf-gan" in other


def test_report_without_intervals_or_params_shows_neither(report):
    page = report.read_text()
    assert 'class="ci"' not in page and 'id="interval-note"' not in page and "FVD protocol" not in page
    assert '<div class="sub" id="protocol">64 real and 6 generated clips.</div>' in page
    assert '<td class="rule">threshold</td>' in page


def test_trend_plot_draws_error_bars_for_nights_with_intervals(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    drawn = []
    real_errorbar = Axes.errorbar

    def spy(self, x, y, *args, **kwargs):
        drawn.append((list(x), list(y), kwargs.get("yerr")))
        return real_errorbar(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "errorbar", spy)
    history = _ci_history()
    history.insert(0, Night("2026-01-31", {"fvd": 130.0}))  # from before intervals: a point, no bar
    assert trend_plot(history, str(tmp_path / "t.png"), threshold=0.1, baseline=history[-2])
    ((xs, ys, yerr),) = drawn
    assert len(xs) == 4 and ys == [120.0, 112.0, 110.0, 140.0]
    assert [list(e) for e in yerr] == [[10.0, 9.0, 9.0, 11.0], [10.0, 9.0, 9.0, 11.0]]
    assert Image.open(tmp_path / "t.png").size == (800, 320)
    drawn.clear()
    assert trend_plot(_history(3), str(tmp_path / "plain.png"))
    assert drawn == []  # no intervals, no error bars


def test_every_metric_direction_follows_its_definition():
    from vidgen.eval.compare import HIGHER, LOWER, NEITHER, direction

    assert [direction(m) for m in ("fvd", "windows/late/kvd", "temporal_flickering_mae_mean",
                                   "temporal_flickering_score_mean", "windows/early/temporal_flickering_score",
                                   "motion_magnitude_median", "clip")] == [LOWER, LOWER, LOWER, HIGHER, HIGHER,
                                                                           NEITHER, LOWER]
    assert direction("clip", ["clip"]) == HIGHER


def test_flicker_score_is_higher_is_better_on_the_page_and_in_the_verdict(tmp_path):
    """VBench's temporal_flickering_score is (255 - mae) / 255: a drop is worse (red, regressed), a rise better."""
    base = Night("2026-01-01", {"fvd": 100.0, "temporal_flickering_score_mean": 0.99, "motion_magnitude_mean": 1.0,
                                "temporal_flickering_mae_mean": 2.0})
    thresholds = {"temporal_flickering_score_mean": 0.001}
    for score, regressed in ((0.95, True), (0.995, False)):
        tonight = Night("2026-01-02", {"fvd": 100.0, "temporal_flickering_score_mean": score,
                                       "motion_magnitude_mean": 2.0, "temporal_flickering_mae_mean": 3.0})
        cmp = compare(tonight.metrics, base, thresholds)
        assert cmp.regressed == (["temporal_flickering_score_mean"] if regressed else [])
        rows = {r["metric"]: r for r in metric_rows(tonight.metrics, cmp, thresholds, [])}
        page = render_html(suite="s", label="l", tonight=tonight, comparison=cmp, rows=list(rows.values()),
                           history=[base, tonight], videos=[], plot=None)
        flicker = next(line for line in page.splitlines() if "<td>temporal_flickering_score_mean</td>" in line)
        assert "<td>higher is better</td>" in flicker and "<td>0.1%</td>" in flicker  # not "0%"
        assert f'class="delta {"worse" if regressed else "better"}"' in flicker
        motion = next(line for line in page.splitlines() if "<td>motion_magnitude_mean</td>" in line)
        assert 'class="delta"' in motion and "<td>neither (descriptive)</td>" in motion  # +100%, not coloured
        mae = next(line for line in page.splitlines() if "<td>temporal_flickering_mae_mean</td>" in line)
        assert "<td>lower is better</td>" in mae and "delta better" not in mae


def test_small_thresholds_keep_their_digits():
    from vidgen.eval.report import threshold_text

    assert [threshold_text(t) for t in (0.1, 0.25, 0.001, 0.0005, 0.125, 0.0)] == \
        ["10%", "25%", "0.1%", "0.05%", "12.5%", "0%"]


def test_gallery_shows_prompts_with_the_file_name_as_tooltip_and_second_line(tmp_path):
    videos = [_video(tmp_path / f"v{i}.mp4", i) for i in range(2)]
    night = Night("2026-01-01", {"fvd": 1.0})
    index = write_report(str(tmp_path / "report"), suite="s", label="l", tonight=night,
                         comparison=compare(night.metrics, None, {}), history=[night], videos=videos,
                         thresholds={}, captions=["a red car <turns> left", ""])
    page = Path(index).read_text()
    assert ('<figure title="00-v0.mp4">' in page
            and '<figcaption>a red car &lt;turns&gt; left<span class="file">00-v0.mp4</span></figcaption>' in page)
    assert "<figcaption>01-v1.mp4</figcaption>" in page  # no prompt: the file name alone
