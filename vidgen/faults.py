"""Fault injection for the test suite: a process exits at once at a chosen point (os._exit: no cleanup, as an OOM
kill or a lost node would), so the tests can prove that nothing done is lost.

One environment format for every site, `VIDGEN_FAULT_<SITE>="<point>[,<point>...][@<marker file>]"`, a point
being integers joined by ':' whose meaning is the site's:

    TRAIN     <rank>:<step>  that rank's process exits right after optimizer step <step>, before its checkpoint
    GENERATE  <n>            a generation actor exits while writing a video, after writing <n> of its own
    LATENTS   <n>            the encoding process exits in the middle of a shard, after finishing <n> of its own

With a marker file (on a filesystem every process of the job sees) each point fires once per run, in any order:
the process appends "<index> <pid>" to it before exiting, and a point listed there is skipped when reached again
after the restart. Without one, a point fires every time it is reached.

The driver passes the variables on: in the training workers' runtime env, and as a constructor argument of the
actors (which do not inherit the driver's environment).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

SITES = ("TRAIN", "GENERATE", "LATENTS")
_SPEC = re.compile(r"^(\d+(?::\d+)*(?:,\d+(?::\d+)*)*)(?:@(.+))?$")


def env_name(site: str) -> str:
    if site not in SITES:
        raise ValueError(f"fault site {site!r}: expected one of {', '.join(SITES)}")
    return f"VIDGEN_FAULT_{site}"


def from_env(site: str) -> str | None:
    """This process's spec for `site`, or None."""
    return os.environ.get(env_name(site)) or None


def all_from_env() -> dict[str, str]:
    """Every fault variable set here (for a remote process's environment)."""
    return {env_name(s): os.environ[env_name(s)] for s in SITES if os.environ.get(env_name(s))}


def parse(site: str, spec: str) -> tuple[list[tuple[int, ...]], str | None]:
    """(points, marker file or None)."""
    m = _SPEC.match(spec)
    if not m:
        raise ValueError(f"{env_name(site)}={spec!r}: expected <point>[,<point>...][@<marker file>], a point being "
                         "integers joined by ':'")
    return [tuple(int(x) for x in p.split(":")) for p in m.group(1).split(",")], m.group(2)


def fired(marker: str | None) -> set[int]:
    """Indices of the points already injected (the marker's lines "<index> <pid>")."""
    if marker is None:
        return set()
    try:
        return {int(line.split()[0]) for line in Path(marker).read_text().splitlines() if line.strip()}
    except FileNotFoundError:
        return set()


def maybe_exit(site: str, spec: str | None, *at: int) -> None:
    """Exit this process if `at` is one of the spec's points not fired yet."""
    if not spec:
        return
    points, marker = parse(site, spec)
    done = fired(marker)
    for i, point in enumerate(points):
        if point == at and i not in done:
            if marker is not None:
                with open(marker, "a") as f:  # one short O_APPEND write: two processes dying at once both get a line
                    f.write(f"{i} {os.getpid()}\n")
            log.warning("fault injection: %s exits at %s", site.lower(), ":".join(map(str, at)))
            os._exit(1)
