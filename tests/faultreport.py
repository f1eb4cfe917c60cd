"""The fault-injection suite's report (tests/faults/): every test records what it injected, whether the job
survived, and what was lost.

The run ends with a table (and work/fault-report.json): one row per fault, `lost` must be 0. A test records its
row only after its own assertions, so a row says what was measured, and a failing test shows up as a failed test,
not as a row. Rows travel as user properties of the test's report, so the table is whole when pytest-xdist runs
the tests in other processes: the process that prints the summary gets every report.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

KEY = "vidgen_fault"


@dataclass
class FaultRow:
    fault: str  # what was injected, e.g. "rank 1 killed at steps 2, 5 (seed 3)"
    injected: int  # how many times it was injected
    survived: bool  # the job finished (or the bad input got its one-line error / counted skip)
    lost: int  # items lost: steps, metrics, videos, clips, bytes of a checkpoint (must be 0)
    detail: str = ""


_ROWS: list[FaultRow] = []


class FaultRecorder:
    def __init__(self, item: pytest.Item):
        self._item = item

    def record(self, fault: str, *, injected: int, survived: bool, lost: int, detail: str = "") -> None:
        self._item.user_properties.append((KEY, asdict(FaultRow(fault, injected, survived, lost, detail))))


@pytest.fixture
def faults(request) -> FaultRecorder:
    return FaultRecorder(request.node)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":  # the setup and teardown reports carry the same properties
        _ROWS.extend(FaultRow(**value) for key, value in report.user_properties if key == KEY)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not _ROWS or hasattr(config, "workerinput"):  # an xdist worker: the controller reports
        return
    tr = terminalreporter
    tr.section("fault report")
    width = max(len(r.fault) for r in _ROWS)
    tr.write_line(f"{'fault':<{width}}  injected  survived  lost  detail")
    for r in _ROWS:
        survived = "yes" if r.survived else "NO"
        tr.write_line(f"{r.fault:<{width}}  {r.injected:>8}  {survived:>8}  {r.lost:>4}  {r.detail}")
    total_lost = sum(r.lost for r in _ROWS)
    tr.write_line(f"{len(_ROWS)} faults, {sum(r.injected for r in _ROWS)} injections, "
                  f"{sum(not r.survived for r in _ROWS)} not survived, {total_lost} items lost")
    out = Path(config.rootpath) / "work" / "fault-report.json"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps([asdict(r) for r in _ROWS], indent=2))
        os.replace(tmp, out)
        tr.write_line(f"written to {out}")
    except OSError as e:  # a read-only checkout: the table above is the report
        tr.write_line(f"could not write {out}: {e}")
